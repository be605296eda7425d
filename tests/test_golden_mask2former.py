"""SeMask-Mask2Former against the reference (golden/mask2former/*.npz, SPEC section 10).

Data-driven: every *.npz in $SEMASK_M2F_GOLDEN_DIR (default
../shared/golden/mask2former) is checked; a new vector of the same schema needs
no code change. The model config is read from meta['config'], the weights come
from the recipe next to the vectors through the converter, and once through a
real .pth file ({"model": state_dict}, as released) whose config the converter
reads from the shapes. The whole model runs in eval mode under jit in float32,
and the criterion on its outputs, replaying the reference's random draws, gives
the reference's matches and losses.
"""
import functools
import json

import pytest

from convert_weights import convert_semask_mask2former
from semask_jax.models import model_config_from_dict
from tests.golden_utils import (RELEASED_BUFFERS, assert_cli_writes,
                                assert_m2f_criterion_reproduces_reference, assert_same_params,
                                check_layers, check_m2f_semantic, check_multi_scale,
                                check_weights_and_backbone, converted_forward, load_vector,
                                m2f_golden_files, worst_error, write_released_pth)

FILES = m2f_golden_files()


def test_mask2former_golden_vectors_exist():
  assert FILES, "no Mask2Former golden vectors found; set SEMASK_M2F_GOLDEN_DIR"


@functools.lru_cache(maxsize=None)
def _converted(path):
  """(vec, meta, cfg, conversion from the recipe's state dict, forward outputs)."""
  vec, meta, sd = load_vector(path)
  cfg = model_config_from_dict(meta["config"])
  return (vec, meta, cfg) + converted_forward(convert_semask_mask2former, sd, cfg, vec)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_mask2former_golden(path):
  vec, meta, _, _, out = _converted(path)
  errs = check_weights_and_backbone(load_vector(path)[2], out, vec)
  check_multi_scale(errs, out, vec)
  n_pred = check_layers(errs, out, vec, ("pred_logits", "pred_masks"))
  assert n_pred == meta["config"]["dec_layers"] + 1
  check_m2f_semantic(errs, out, vec)
  print(json.dumps({path.stem: worst_error(errs)}))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_mask2former_golden_losses_from_our_forward(path):
  """The criterion on this model's outputs, with the reference's stored draws: the same
  matches and the same losses as the reference computed on its own outputs."""
  vec, _, _, _, out = _converted(path)
  assert_m2f_criterion_reproduces_reference(path, vec, out)


@pytest.mark.parametrize("path", FILES[:1], ids=lambda p: p.stem)
def test_mask2former_converter_reads_a_released_pth(path, tmp_path):
  """A .pth as released ({"model": state_dict} with buffers) converts, with the config
  read from the shapes, to exactly the parameters of the state-dict conversion."""
  _, _, sd = load_vector(path)
  _, _, cfg, conv_sd, _ = _converted(path)
  pth = write_released_pth(sd, cfg.num_classes, tmp_path / "model_final.pth")
  conv = convert_semask_mask2former(str(pth))
  for k in cfg.keys():
    assert conv.config[k] == cfg[k], (k, conv.config[k], cfg[k])
  assert set(RELEASED_BUFFERS) <= set(conv.report.skipped)
  # The command line does the same and writes an orbax directory for config.init_from.
  assert_cli_writes("semask_mask2former", pth, tmp_path / "out")
  assert_same_params(conv.model, conv_sd.model)
