"""The FaPN / MSFaPN-Mask2Former train step (the Mask2Former criterion unchanged): the
same on 1 and 8 devices, and a learning step with gradients through the DCN."""
import jax
import numpy as np
import pytest

import input_pipeline
from semask_jax import sharding as sharding_lib
from semask_jax.train import state as state_lib
from semask_jax.train import loop as train
from tests.test_train_mask2former import tiny_config


# MSFaPN's FeatureAlign is the same module; its 8-device step adds ~2 minutes of compiles
# on this CPU for no new path, so only FaPN (three aligned levels) runs here.
@pytest.mark.parametrize("decoder", ["fapn"])
def test_fapn_step_one_and_eight_devices_agree(decoder):
  config = tiny_config()
  config.model.pixel_decoder = decoder
  config.model.conv_dim = 32            # GroupNorm(32); 8 deformable groups of 4 channels
  model = state_lib.create_model(config)
  batch = next(input_pipeline.create_train_iterator(config.data, seed=0, global_batch_size=8))
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding_lib.make_mesh(devices)
    state, graphdef, rest, tx, schedule = state_lib.init_train_state(config, model, mesh)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    step = train.jit_train_step(train.make_train_step(graphdef, rest, tx, schedule, config),
                                shardings, mesh, sharding_lib.compiler_options(config))
    state, metrics = step(state, input_pipeline.make_global_batch(batch, mesh))
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (s1, m1), (s8, m8) = results
  for m in (m1, m8):
    assert m['finite'] == 1.0 and m['dropped_targets'] == 0
  for k in ('loss', 'loss_ce', 'loss_mask', 'loss_dice', 'loss_cate', 'grad_norm'):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, err_msg=k)
  flat1 = dict(jax.tree_util.tree_leaves_with_path(s1.params))
  diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(flat1[p])).ravel()
                          for p, a in jax.tree_util.tree_leaves_with_path(s8.params)])
  lr = config.optimizer.learning_rate  # as in test_train_mask2former: Adam's first step
  assert diffs.max() <= 2 * lr and np.mean(diffs <= 1e-6) > 0.995, np.quantile(
      diffs, [0.5, 0.995, 1.0])
  # The FeatureAlign DCN learns: its kernel and its (zero-initialised) offset conv move.
  before = dict(jax.tree_util.tree_leaves_with_path(state_lib.split_model(model)[1]))
  checked = 0
  for p, a in jax.tree_util.tree_leaves_with_path(s1.params):
    name = jax.tree_util.keystr(p)
    if "align_1" in name and "dcpack_L2" in name:
      assert float(np.abs(np.asarray(a) - np.asarray(before[p])).max()) > 1e-6, name
      checked += 1
  assert checked == 4  # kernel, bias, conv_offset_mask.{kernel, bias}
