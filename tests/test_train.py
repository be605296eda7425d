"""Train step on a tiny SeMask: 1 vs 8 devices, non-finite guard, accumulation, clipping, config errors."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import input_pipeline
from configs import tiny
from semask_jax.train import optim
from semask_jax import sharding as sharding_lib
from semask_jax.train import state as state_lib
from semask_jax.train import loop as train
from tests import agreement


@pytest.fixture(scope='module')
def setup():
  config = tiny.get_config()
  model = state_lib.create_model(config)
  it = input_pipeline.create_train_iterator(config.data, seed=0, global_batch_size=8)
  batch = next(it)
  return config, model, batch


_STEPS = {}  # compiled train steps by device count: each compile takes a while on CPU


def run_steps(config, model, batches, devices, keep_states=False):
  mesh = sharding_lib.make_mesh(devices)
  state, graphdef, rest, tx, schedule = state_lib.init_train_state(config, model, mesh)
  if len(devices) not in _STEPS:
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    _STEPS[len(devices)] = train.jit_train_step(
        train.make_train_step(graphdef, rest, tx, schedule, config), shardings, mesh,
        sharding_lib.compiler_options(config))
  metrics, states = [], []
  for b in batches:
    state, m = _STEPS[len(devices)](state, input_pipeline.make_global_batch(b, mesh))
    metrics.append(jax.device_get(m))
    if keep_states:
      states.append(jax.device_get(state))
  return (states if keep_states else jax.device_get(state)), metrics


def test_one_and_eight_devices_agree(setup):
  config, model, batch = setup
  assert len(jax.devices()) == 8
  s1, m1 = run_steps(config, model, [batch, batch], jax.devices()[:1])
  s8, m8 = run_steps(config, model, [batch, batch], jax.devices())
  for a, b in zip(m1, m8):
    # float32 reductions in another order: 1e-5 relative on the loss terms.
    for k in ('loss', 'loss_ce', 'loss_cate', 'grad_norm'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  assert int(s1.step) == int(s8.step) == 2
  # SyncBN: running statistics from the global batch, the same on 1 and 8 devices.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         s1.batch_stats, s8.batch_stats)
  # Params after 2 AdamW steps: every element within 2 x the applied lr, and beyond 1e-6
  # only where Adam had no gradient (rounding noise: its sign flips; tests/agreement.py).
  agreement.assert_params_agree(
      s8.params, s1.params, agreement.gradient_rms(s1.opt_state, config.optimizer.b2),
      2 * sum(float(m['lr']) for m in m1))
  moved = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
      jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(state_lib.split_model(model)[1]))])
  assert moved.max() > 1e-5  # the update did something


def test_nonfinite_loss_skips_the_update(setup):
  config, model, batch = setup
  bad = dict(batch, image=np.full_like(batch['image'], np.nan))
  states, metrics = run_steps(config, model, [bad, batch], jax.devices(), keep_states=True)
  assert metrics[0]['finite'] == 0.0 and not np.isfinite(metrics[0]['loss'])
  assert metrics[1]['finite'] == 1.0 and np.isfinite(metrics[1]['loss'])
  assert int(states[0].nonfinite) == 1 and int(states[0].step) == 1
  # The skipped step left params, BN statistics and the optimizer state untouched ...
  _, params, batch_stats, _ = state_lib.split_model(model)
  fresh = state_lib.init_train_state(config, model, sharding_lib.make_mesh(jax.devices()[:1]))[0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, (states[0].params, states[0].batch_stats),
                         (params, batch_stats))
  jax.tree_util.tree_map(np.testing.assert_array_equal, states[0].opt_state,
                         jax.device_get(fresh.opt_state))
  # ... so the next good step runs at the schedule's first learning rate and updates.
  assert metrics[1]['lr'] == metrics[0]['lr']
  assert int(states[1].nonfinite) == 1 and int(states[1].step) == 2
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(states[1].params), jax.tree_util.tree_leaves(params)))


def test_micro_batch_size_and_accumulation_config(setup):
  # optax.MultiSteps itself is checked in test_optim (one update every k micro steps).
  config = setup[0].copy_and_resolve_references()
  config.grad_accum_steps = 2
  assert train.micro_batch_size(config) == 4
  config.grad_accum_steps = 3
  with pytest.raises(ValueError, match='grad_accum_steps'):
    train.micro_batch_size(config)


def test_bad_inputs_name_the_key_or_file(tmp_path):
  config = tiny.get_config()
  config.lock()
  with pytest.raises(AttributeError, match='embed_dimm'):
    config.model.embed_dimm = 3
  config.init_from = str(tmp_path / 'missing_ckpt')
  with pytest.raises(FileNotFoundError, match='missing_ckpt'):
    state_lib.create_model(config)
  config.init_from = ''
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    state_lib.restore_for_inference(config, str(tmp_path), sharding_lib.make_mesh(jax.devices()[:1]))
  with pytest.raises(ValueError, match='not divisible'):
    sharding_lib.check_batch_divisible(6, sharding_lib.make_mesh())


# ----------------------------------------------------------------------------- accumulation, clipping


def adam_state(opt_state) -> optax.ScaleByAdamState:
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  return [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(x)][0]


def test_accumulated_update_is_adamw_on_the_mean_micro_gradient(setup):
  """k=2 micro steps of 4 images = one AdamW update with the mean of the two micro gradients.

  The FPN head's BatchNorm normalises each micro batch by its own statistics, so no
  SeMask model gives the whole-batch gradient; the update is compared with AdamW on
  the mean of make_grad_fn's gradients at the keys the step uses.
  """
  config, model, batch = setup
  config = config.copy_and_resolve_references()
  config.grad_accum_steps = 2
  config.optimizer.warmup_steps = 0  # the first update at the full lr (1e-3), well above rounding
  halves = [{k: v[i * 4:(i + 1) * 4] for k, v in batch.items()} for i in range(2)]
  mesh = sharding_lib.make_mesh(jax.devices()[:4])
  state, graphdef, rest, tx, schedule = state_lib.init_train_state(config, model, mesh)
  step = train.make_train_step(graphdef, rest, tx, schedule, config)
  grad_fn = train.make_grad_fn(graphdef, rest, config)

  def step_and_grads(state, batch):
    # One program (XLA merges the two forward/backward passes): the step, and the
    # gradient of the function it differentiates at the key it uses.
    rng = jax.random.fold_in(state.rng, state.step)
    return step(state, batch), grad_fn(state.params, state.batch_stats, batch, rng)[1]

  fn = jax.jit(step_and_grads, compiler_options=sharding_lib.compiler_options(config))
  s0 = jax.device_get(state)
  states, grads = [], []
  for h in halves:
    (state, m), g = fn(state, input_pipeline.make_global_batch(h, mesh))
    assert m['finite'] == 1.0
    states.append(jax.device_get(state))
    grads.append(jax.device_get(g))
  # After the first micro step: no update yet (so both gradients are at the initial
  # parameters), the running statistics already updated; after the second, one update.
  jax.tree_util.tree_map(np.testing.assert_array_equal, states[0].params, s0.params)
  assert int(optim.optimizer_updates(states[0].opt_state)) == 0
  assert int(optim.optimizer_updates(states[1].opt_state)) == 1
  for before, after in ((s0, states[0]), (states[0], states[1])):
    assert all(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(before.batch_stats), jax.tree_util.tree_leaves(after.batch_stats)))
  # The update: AdamW (k=1 optimizer of the same config) on the mean micro gradient.
  one = config.copy_and_resolve_references()
  one.grad_accum_steps = 1
  tx1, _ = optim.create_optimizer(one, s0.params)
  mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *grads)

  @jax.jit  # one program: op by op, optax would compile each op for each leaf shape
  def adamw(params, grads):
    return optax.apply_updates(params, tx1.update(grads, tx1.init(params), params)[0])

  want = adamw(s0.params, mean)
  lr = float(optim.current_lr(schedule, s0.opt_state))
  assert lr == pytest.approx(config.optimizer.learning_rate)
  # Adam's first step is g / (|g| + eps) ~ +-lr per element: compare in units of lr where
  # the gradient is well above rounding (elsewhere the sign is noise).
  for (path, got), w, g in zip(jax.tree_util.tree_flatten_with_path(states[1].params)[0],
                               jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(mean)):
    defined = np.abs(g) > 1e-6
    err = np.abs(np.asarray(got) - np.asarray(w))[defined] / lr
    assert err.max(initial=0.0) < 1e-2, (optim.param_name(path), err.max())
  # Adam's first moment is (1 - b1) * the gradient it was given: the mean, not the sum.
  b1 = config.optimizer.b1
  jax.tree_util.tree_map(
      lambda m, g: np.testing.assert_allclose(m, (1 - b1) * g, rtol=1e-4, atol=1e-9),
      adam_state(states[1].opt_state).mu, mean)


def test_gradient_clipping_applies_to_the_accumulated_mean():
  """config.optimizer.grad_clip_norm clips the global norm of the update's (mean) gradient."""
  c = ml_collections.ConfigDict()
  c.total_steps = 10
  c.grad_accum_steps = 2
  c.optimizer = dict(learning_rate=0.1, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                     poly_power=1.0, min_lr=0.0, warmup_steps=0, warmup_ratio=1e-6,
                     no_decay_keys=optim.NO_DECAY_KEYS, grad_clip_norm=1.0)
  params = {'a': jnp.zeros((3,)), 'b': jnp.zeros((2, 2))}
  g1 = {'a': jnp.asarray([3.0, 0.0, 4.0]), 'b': jnp.zeros((2, 2))}   # norm 5
  g2 = {'a': jnp.asarray([1.0, 0.0, 0.0]), 'b': jnp.full((2, 2), 0.5)}
  mean = jax.tree_util.tree_map(lambda x, y: (x + y) / 2, g1, g2)
  norm = float(optax.tree.norm(mean))
  for clip, scale in ((1.0, 1.0 / norm), (100.0, 1.0)):  # active, inactive
    c.optimizer.grad_clip_norm = clip
    tx, _ = optim.create_optimizer(c, params)
    s = tx.init(params)
    for g in (g1, g2):
      _, s = tx.update(g, s, params)
    assert int(optim.optimizer_updates(s)) == 1
    jax.tree_util.tree_map(lambda m, g: np.testing.assert_allclose(m, 0.1 * scale * g, rtol=1e-6),
                           adam_state(s).mu, mean)


def test_loss_settings_fail_as_config_errors_before_any_work(tmp_path, monkeypatch):
  """An OHEM group that the micro batch does not divide, or an unknown reduction, is a
  ConfigError from train_and_evaluate before the data or the model is built."""
  from semask_jax.cli import ConfigError
  built = []
  monkeypatch.setattr(input_pipeline, 'create_train_iterator', lambda *a, **k: built.append(a))
  monkeypatch.setattr(train, 'create_model', lambda *a, **k: built.append(a))
  config = tiny.get_config()  # batch 8
  config.loss.ohem_min_kept = 100
  config.loss.group_size = 3
  with pytest.raises(ConfigError, match=r'group_size=3 does not divide the micro batch of 8'):
    train.train_and_evaluate(config, str(tmp_path))
  config.loss.group_size, config.grad_accum_steps = 4, 4  # micro batch 2
  with pytest.raises(ConfigError, match=r'group_size=4 does not divide the micro batch of 2'):
    train.train_and_evaluate(config, str(tmp_path))
  config.loss.group_size, config.grad_accum_steps = 2, 1
  config.loss.reduction = 'sum'
  with pytest.raises(ConfigError, match=r"config.loss.reduction must be one of \('reference', "
                                        r"'valid'\), got 'sum'"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not built
