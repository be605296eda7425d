"""The SeMask-Mask2Former train step: the same on 1 and 8 devices (num_masks over the
global batch), a learning step, and the Hungarian matching inside the sharded step."""
import jax
import numpy as np

import input_pipeline
from configs import demo_mask2former
from semask_jax import sharding as sharding_lib
from semask_jax.train import state as state_lib
from semask_jax.train import loop as train
from tests import agreement


def tiny_config():
  c = demo_mask2former.get_config()
  c.model.embed_dim = 16
  c.model.num_heads = (1, 1, 2, 2)
  c.model.num_queries = 8
  c.model.dec_layers = 1  # still two matched predictions (deep supervision); compiles ~25 % faster
  c.loss.train_num_points = 64
  c.optimizer.warmup_steps = 0  # a full-lr first step, so that the update shows
  c.xla_cpu_fast_compile = True
  return c


def test_mask2former_step_one_and_eight_devices_agree():
  config = tiny_config()
  model = state_lib.create_model(config)
  batch = next(input_pipeline.create_train_iterator(config.data, seed=0, global_batch_size=8))
  labels = np.asarray(batch['label'])
  want_masks = sum(len(np.setdiff1d(np.unique(l), [255])) for l in labels)
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
    # num_masks counts the targets of the whole global batch, not of one device's share.
    assert m['num_masks'] == want_masks
    assert m['finite'] == 1.0 and m['dropped_targets'] == 0
  for k in ('loss', 'loss_ce', 'loss_mask', 'loss_dice', 'loss_cate', 'grad_norm'):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, err_msg=k)
  # Adam's first step is lr * g / (|g| + eps): where a gradient is at the rounding level
  # (unmatched queries, terms that cancel) the two reduction orders may move an element
  # anywhere within +-lr; everywhere else the runs agree to 1e-6 (tests/agreement.py).
  # The gradient Adam saw is after clipping (grad_clip_norm): its sqrt(v_hat).
  agreement.assert_params_agree(s8.params, s1.params,
                                agreement.gradient_rms(s1.opt_state, config.optimizer.b2),
                                2 * float(m1['lr']))  # the full lr: no warm-up
  assert float(m1['lr']) == np.float32(config.optimizer.learning_rate)
  before = state_lib.split_model(model)[1]
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(before)))
  assert moved > 1e-5  # the update did something
