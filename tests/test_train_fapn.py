"""The FaPN / MSFaPN-Mask2Former train step (the Mask2Former criterion unchanged): the
same on 1 and 8 devices, and a learning step with gradients through the DCN."""
import jax
import numpy as np
import pytest

from semask_jax.train import state as state_lib
from tests import agreement
from tests.test_train_mask2former import tiny_config


# MSFaPN's FeatureAlign is the same module; its 8-device step adds ~2 minutes of compiles
# on this CPU for no new path, so only FaPN (three aligned levels) runs here.
@pytest.mark.parametrize("decoder", ["fapn"])
def test_fapn_step_one_and_eight_devices_agree(decoder):
  config = tiny_config()
  config.model.pixel_decoder = decoder
  config.model.conv_dim = 32            # GroupNorm(32); 8 deformable groups of 4 channels
  model = state_lib.create_model(config)
  # Finite, no target dropped, the loss terms and grad_norm within 1e-5.
  (s1, _), (s8, _) = agreement.mask_step_on_one_and_all_devices(config, model,
                                                                check_num_masks=False)
  # As in test_train_mask2former: Adam's first step.
  agreement.assert_params_mostly_agree(s8.params, s1.params, config.optimizer.learning_rate)
  # The FeatureAlign DCN learns: its kernel and its (zero-initialised) offset conv move.
  before = dict(jax.tree_util.tree_leaves_with_path(state_lib.split_model(model)[1]))
  checked = 0
  for p, a in jax.tree_util.tree_leaves_with_path(s1.params):
    name = jax.tree_util.keystr(p)
    if "align_1" in name and "dcpack_L2" in name:
      assert float(np.abs(np.asarray(a) - np.asarray(before[p])).max()) > 1e-6, name
      checked += 1
  assert checked == 4  # kernel, bias, conv_offset_mask.{kernel, bias}
