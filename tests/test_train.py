"""Train step on a tiny SeMask: 1 vs 8 devices, non-finite guard, accumulation, config errors."""
import jax
import numpy as np
import pytest

import input_pipeline
from configs import tiny
from semask_jax import sharding as sharding_lib
from semask_jax import state as state_lib
from semask_jax import train


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
  # Params after 2 AdamW steps (lr <= 1e-3): an element moves by at most ~2 lr, and the
  # two runs agree to 1e-6 absolute except where a gradient is ~0 and Adam's sign flips.
  diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
      jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s8.params))])
  assert np.mean(diffs <= 1e-6) > 0.999, np.quantile(diffs, [0.5, 0.999, 1.0])
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
