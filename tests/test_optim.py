"""Schedule against mmcv's formula, the no-decay mask against the reference rule, MultiSteps."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from semask_jax.train import optim


def mmcv_poly_warmup_lr(it, base_lr, max_iters, power, min_lr, warmup_iters, warmup_ratio):
  """mmcv PolyLrUpdaterHook.get_lr + LrUpdaterHook.get_warmup_lr('linear'), by iteration."""
  coeff = (1 - it / max_iters) ** power
  regular = (base_lr - min_lr) * coeff + min_lr
  if warmup_iters and it < warmup_iters:
    k = (1 - it / warmup_iters) * (1 - warmup_ratio)
    return regular * (1 - k)
  return regular


@pytest.mark.parametrize('power,min_lr,warmup,ratio', [(1.0, 0.0, 1500, 1e-6), (0.9, 1e-6, 100, 1e-5),
                                                       (1.0, 0.0, 0, 1e-6)])
def test_schedule_matches_mmcv(power, min_lr, warmup, ratio):
  max_iters, base = 80_000, 1e-4
  sched = optim.poly_warmup_schedule(base, max_iters, power=power, min_lr=min_lr,
                                     warmup_iters=warmup, warmup_ratio=ratio)
  its = [0, 1, 2, 50, 99, 100, 101, 750, 1499, 1500, 1501, 40_000, 79_999]
  got = np.asarray([float(sched(i)) for i in its])
  want = np.asarray([mmcv_poly_warmup_lr(i, base, max_iters, power, min_lr, warmup, ratio)
                     for i in its])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-13)
  if warmup:
    assert got[0] == pytest.approx(base * ratio, rel=1e-4)  # first iteration: lr0 * ratio


def _config(k=1, wd=0.5):
  c = ml_collections.ConfigDict()
  c.total_steps = 10
  c.grad_accum_steps = k
  c.optimizer = dict(learning_rate=0.1, weight_decay=wd, b1=0.9, b2=0.999, eps=1e-8,
                     poly_power=1.0, min_lr=0.0, warmup_steps=0, warmup_ratio=1e-6,
                     no_decay_keys=optim.NO_DECAY_KEYS, grad_clip_norm=None)
  return c


PARAMS = {
    'backbone': {'layers': {0: {'blocks': {1: {
        'attn': {'relative_position_bias_table': jnp.ones((49, 3)),
                 'qkv': {'kernel': jnp.ones((4, 12)), 'bias': jnp.ones((12,))}},
        'norm1': {'scale': jnp.ones((4,)), 'bias': jnp.ones((4,))}}},
        'semantic_layer': {'class_injection': {0: {'gamma': jnp.ones(())}}}}},
        'norm0': {'scale': jnp.ones((4,))}, 'absolute_pos_embed': jnp.ones((1, 4))},
    'decode_head': {'scale_heads': {2: {2: {'bn': {'scale': jnp.ones((4,)), 'bias': jnp.ones((4,))}}}},
                    'conv_seg': {'kernel': jnp.ones((1, 1, 4, 3))}},
}


def test_decay_mask_follows_reference_rule():
  mask = optim.decay_mask(PARAMS)
  flat = {optim.param_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  for name, decays in flat.items():
    rule = not any(k in name for k in ('absolute_pos_embed', 'relative_position_bias_table', 'norm'))
    assert decays == rule, name
  assert flat['backbone.layers.0.blocks.1.attn.relative_position_bias_table'] is False
  assert flat['backbone.layers.0.blocks.1.norm1.bias'] is False
  assert flat['backbone.norm0.scale'] is False
  assert flat['decode_head.scale_heads.2.2.bn.scale'] is True  # BN 'bn' is decayed
  assert flat['backbone.layers.0.blocks.1.attn.qkv.bias'] is True
  assert flat['backbone.layers.0.semantic_layer.class_injection.0.gamma'] is True


def test_adamw_skips_decay_on_masked_params():
  tx, _ = optim.create_optimizer(_config(), PARAMS)
  state = tx.init(PARAMS)
  zero = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zero, state, PARAMS)
  new = optax.apply_updates(PARAMS, updates)
  mask = optim.decay_mask(PARAMS)
  for (path, p), m in zip(jax.tree_util.tree_flatten_with_path(new)[0], jax.tree_util.tree_leaves(mask)):
    if m:  # lr 0.1 * wd 0.5 at it 0 (no warmup): 1 - 0.05
      np.testing.assert_allclose(p, 0.95, rtol=1e-6, err_msg=optim.param_name(path))
    else:
      np.testing.assert_array_equal(p, 1.0, err_msg=optim.param_name(path))


def test_multisteps_updates_every_k_and_schedule_counts_updates():
  params = {'w': jnp.ones((3,))}
  tx, sched = optim.create_optimizer(_config(k=3, wd=0.0), params)
  state = tx.init(params)
  grads = {'w': jnp.ones((3,))}
  seen = []
  for micro in range(6):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    seen.append(float(params['w'][0]))
    assert int(optim.optimizer_updates(state)) == (micro + 1) // 3
  assert seen[0] == seen[1] == 1.0 and seen[2] < 1.0  # first update after 3 micro steps
  assert seen[3] == seen[4] == seen[2] and seen[5] < seen[4]
  assert float(optim.current_lr(sched, state)) == pytest.approx(0.1 * (1 - 2 / 10))
