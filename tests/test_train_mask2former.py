"""The SeMask-Mask2Former train step: the same on 1 and 8 devices (num_masks over the
global batch), a learning step, and the Hungarian matching inside the sharded step."""
import numpy as np

from configs import demo_mask2former
from semask_jax.train import state as state_lib
from tests import agreement


def tiny_config():
  c = agreement.tiny_mask_config(demo_mask2former.get_config())
  c.model.dec_layers = 1  # still two matched predictions (deep supervision); compiles ~25 % faster
  c.loss.train_num_points = 64
  return c


def test_mask2former_step_one_and_eight_devices_agree():
  config = tiny_config()
  model = state_lib.create_model(config)
  # num_masks over the whole global batch; the loss terms and grad_norm within 1e-5.
  (s1, m1), (s8, _) = agreement.mask_step_on_one_and_all_devices(config, model)
  # Adam's first step is lr * g / (|g| + eps): where a gradient is at the rounding level
  # (unmatched queries, terms that cancel) the two reduction orders may move an element
  # anywhere within +-lr; everywhere else the runs agree to 1e-6 (tests/agreement.py).
  # The gradient Adam saw is after clipping (grad_clip_norm): its sqrt(v_hat).
  agreement.assert_params_agree(s8.params, s1.params,
                                agreement.gradient_rms(s1.opt_state, config.optimizer.b2),
                                2 * float(m1['lr']))  # the full lr: no warm-up
  assert float(m1['lr']) == np.float32(config.optimizer.learning_rate)
  assert agreement.largest_move(s1.params, model) > 1e-5  # the update did something
