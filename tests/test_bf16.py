"""Training in bfloat16 (config.model.dtype; parameters and the optimizer stay float32)
against float32: one training step's loss and gradients, and a short run on the demo.

Under bfloat16 every matmul and convolution rounds its inputs to 8 bits of mantissa
(~0.4 % each), so the step is compared per tensor: loss within 1 %, and each parameter's
gradient pointing the same way (cosine >= 0.99) wherever the float32 gradient is
non-negligible (a norm of at least 1e-3 of the largest tensor's). The run: 50 steps of
configs/demo.py on the synthetic set, the same batches in both dtypes, the mean loss of
the last 10 steps within 2 %.

The step runs tiny.py's model on the demo's 64x64 crops: tiny.py's own 32x32 crops leave
1x1 maps at stride 32, where BatchNorm over 8 values and weight gradients of 8 products
are dominated by bfloat16 rounding (the stage-4 FPN tower's cosines 0.96 there, 0.997 on
64x64 crops).

Known failure (test_bf16_bias_gradients_match_float32, xfail): the gradient of a bias
added in the compute dtype (layers.linear, Conv2d: y + bias.astype(dtype)) is the sum of
the bfloat16 cotangent over every position, reduced and returned in bfloat16. Where that
sum is a small residual of terms of both signs, its rounding is a large fraction of it:
measured cosines 0.960 (backbone.layers.0.blocks.0.attn.qkv.bias) and 0.983
(decode_head.conv_seg.bias, 16 % of the largest gradient norm). Adding the bias in
float32 (or reducing its cotangent in float32) restores it; rounding the weights to
bfloat16 alone keeps those cosines above 0.99999, so it is not the weights' rounding.
"""
import jax
import numpy as np
import pytest

import input_pipeline
from configs import demo, tiny
from semask_jax import sharding as sharding_lib
from semask_jax.train import loop as train
from semask_jax.train import optim
from semask_jax.train import state as state_lib

# A gradient tensor is "negligible" when its norm is below this fraction of the largest
# tensor's (e.g. exactly 0: the semantic attention's mlp_res, mlp_v and mlp_cls_k behind
# gamma = 0 at initialisation).
NEGLIGIBLE = 1e-3


def _config(base, dtype):
  c = base.get_config()
  c.model.dtype = dtype
  return c


def grads_of(config, model, batch):
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  state, graphdef, rest, _, _ = state_lib.init_train_state(config, model, mesh)
  fn = jax.jit(train.make_grad_fn(graphdef, rest, config),
               compiler_options=sharding_lib.compiler_options(config))
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, (aux, _)), g = fn(state.params, state.batch_stats,
                           input_pipeline.make_global_batch(batch, mesh), rng)
  return jax.device_get((loss, aux, g))


@pytest.fixture(scope='module')
def step():
  """(loss, metrics, grads) in float32 and bfloat16: tiny.py's model on 8 demo crops."""
  f32, bf16 = _config(tiny, 'float32'), _config(tiny, 'bfloat16')
  for c in (f32, bf16):
    c.data = demo.get_config().data
  # The compute dtype is the model's (its graph): one model per config, the same seed.
  m32, m16 = state_lib.create_model(f32), state_lib.create_model(bf16)
  jax.tree_util.tree_map(np.testing.assert_array_equal, state_lib.split_model(m32)[1:3],
                         state_lib.split_model(m16)[1:3])  # the same float32 parameters
  batch = next(input_pipeline.create_train_iterator(f32.data, seed=0, global_batch_size=8))
  return grads_of(f32, m32, batch), grads_of(bf16, m16, batch)


def cosines(step, select):
  """[(name, cosine, norm / largest norm)] of the non-negligible tensors `select` keeps."""
  (_, _, g32), (_, _, g16) = step
  leaves32, _ = jax.tree_util.tree_flatten_with_path(g32)
  leaves16 = jax.tree_util.tree_leaves(g16)
  norms = [float(np.linalg.norm(np.asarray(g, np.float64))) for _, g in leaves32]
  out = []
  for (path, a), b, n in zip(leaves32, leaves16, norms):
    name = optim.param_name(path)
    assert np.asarray(b).dtype == np.float32, name  # gradients of the float32 parameters
    if n < NEGLIGIBLE * max(norms) or not select(name):
      continue
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    out.append((name, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), n / max(norms)))
  return out


def _is_bias(name):
  """A Linear / Conv2d bias (not a LayerNorm's or BatchNorm's, which compute in float32)."""
  module = name.rsplit('.', 2)[-2]
  return name.endswith('.bias') and 'norm' not in module and module != 'bn'


def test_bf16_step_matches_float32(step):
  (loss32, aux32, _), (loss16, aux16, _) = step
  assert np.isfinite(loss16) and loss16 != loss32  # bfloat16 did round something
  assert abs(loss16 - loss32) <= 0.01 * abs(loss32), (loss16, loss32)
  for k in ('loss_ce', 'loss_cate'):
    assert abs(aux16[k] - aux32[k]) <= 0.01 * abs(aux32[k]), (k, aux16[k], aux32[k])
  # Every tensor but the biases of Linear / Conv2d layers (the xfail below).
  got = cosines(step, lambda name: not _is_bias(name))
  bad = [f'{n}: cosine {c:.4f} (|g| {r:.3g} of the largest)' for n, c, r in got if c < 0.99]
  assert not bad, '\n'.join(bad)
  assert len(got) > 60, len(got)


def test_bf16_bias_gradients_match_float32(step):
  got = cosines(step, _is_bias)
  assert len(got) > 20, len(got)
  bad = [f'{n}: cosine {c:.4f} (|g| {r:.3g} of the largest)' for n, c, r in got if c < 0.99]
  assert not bad, '\n'.join(bad)


def run(config, steps):
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  model = state_lib.create_model(config)
  state, graphdef, rest, tx, schedule = state_lib.init_train_state(config, model, mesh)
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  step = train.jit_train_step(train.make_train_step(graphdef, rest, tx, schedule, config),
                              shardings, mesh, sharding_lib.compiler_options(config, 'train'))
  it = input_pipeline.create_train_iterator(config.data, seed=config.seed,
                                            global_batch_size=config.batch_size)
  losses = []
  for _ in range(steps):
    state, m = step(state, input_pipeline.make_global_batch(next(it), mesh))
    losses.append(float(m['loss']))
  return np.asarray(losses)


def test_bf16_demo_run_reaches_the_float32_loss():
  """50 steps of configs/demo.py (its model, data and schedule) in each dtype."""
  l32 = run(_config(demo, 'float32'), 50)
  l16 = run(_config(demo, 'bfloat16'), 50)
  assert np.isfinite(l16).all()
  assert l32[-10:].mean() < 0.8 * l32[:5].mean()  # it learns: the comparison means something
  final32, final16 = l32[-10:].mean(), l16[-10:].mean()
  assert abs(final16 - final32) <= 0.02 * final32, (final16, final32, l32[-10:], l16[-10:])
