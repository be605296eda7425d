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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert_weights import convert_semask_mask2former
from convert_weights.__main__ import main as cli_main
from semask_jax.losses import mask2former as ml
from semask_jax.models import model_config_from_dict
from tests.golden_utils import jit_forward, load_vector, m2f_golden_files
from tests.test_mask2former_loss import _case as loss_case

FILES = m2f_golden_files()
RTOL = 1e-4  # max |err| <= 1e-4 * max(1, max |ref|)


def _check(name: str, got, ref) -> float:
  got, ref = np.asarray(got, np.float32), np.asarray(ref)
  assert got.shape == ref.shape, (name, got.shape, ref.shape)
  err = float(np.abs(got - ref).max())
  bound = RTOL * max(1.0, float(np.abs(ref).max()))
  assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"
  return err


def _nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def test_mask2former_golden_vectors_exist():
  assert FILES, "no Mask2Former golden vectors found; set SEMASK_M2F_GOLDEN_DIR"


@functools.lru_cache(maxsize=None)
def _converted(path):
  """(vec, meta, cfg, conversion from the recipe's state dict, forward outputs)."""
  vec, meta, sd = load_vector(path)
  cfg = model_config_from_dict(meta["config"])
  conv = convert_semask_mask2former(sd, cfg)
  _, state = nnx.split(conv.model)
  out = jit_forward(conv.model)(state, jnp.asarray(vec["image"].transpose(0, 2, 3, 1)))
  return vec, meta, cfg, conv, jax.device_get(out)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_mask2former_golden(path):
  vec, meta, _, _, out = _converted(path)
  _, _, sd = load_vector(path)
  abs_sum = sum(float(np.abs(a).astype(np.float64).sum()) for a in sd.values())
  np.testing.assert_allclose(abs_sum, float(vec["weights_abs_sum"]), rtol=1e-9,
                             err_msg="the recipe's random stream changed, not the model")
  errs = {}
  for i in range(4):
    errs[f"feat{i}"] = _check(f"feat{i}", _nchw(out["feats"][i]), vec[f"feat{i}"])
    errs[f"sem{i}"] = _check(f"sem{i}", _nchw(out["sems"][i]), vec[f"sem{i}"])
  errs["mask_features"] = _check("mask_features", _nchw(out["mask_features"]),
                                 vec["mask_features"])
  for i, ms in enumerate(out["multi_scale_features"]):
    errs[f"multi_scale{i}"] = _check(f"multi_scale{i}", _nchw(ms), vec[f"multi_scale{i}"])
  n_pred = vec["pred_logits"].shape[0]
  assert n_pred == meta["config"]["dec_layers"] + 1
  for layer in range(n_pred):
    errs[f"pred_logits{layer}"] = _check(f"pred_logits[{layer}]", out["pred_logits"][layer],
                                         vec["pred_logits"][layer])
    errs[f"pred_masks{layer}"] = _check(f"pred_masks[{layer}]", out["pred_masks"][layer],
                                        vec["pred_masks"][layer])
  errs["sem_pred"] = _check("sem_pred", _nchw(out["sem_pred"]), vec["sem_pred"])
  errs["semseg"] = _check("semseg", _nchw(out["sem_seg"]), vec["semseg"])
  worst = max(errs, key=errs.get)
  print(json.dumps({path.stem: {"worst": worst, "max_abs_err": f"{errs[worst]:.2e}"}}))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_mask2former_golden_losses_from_our_forward(path):
  """The criterion on this model's outputs, with the reference's stored draws: the same
  matches and the same losses as the reference computed on its own outputs."""
  vec, _, _, _, out = _converted(path)
  _, cfg, _, label, draws, _ = loss_case(path)
  outputs = {k: jnp.asarray(out[k]) for k in ("pred_logits", "pred_masks", "sem_pred")}
  total, aux = jax.jit(functools.partial(ml.set_criterion, cfg=cfg))(outputs, label,
                                                                      draws=draws)
  matches = np.asarray(aux["matches"])  # [L1, B, T] query per target slot
  for layer in range(matches.shape[0]):
    for b in range(matches.shape[1]):
      queries, targets = vec[f"match_{layer}_{b}"]
      np.testing.assert_array_equal(matches[layer, b, targets], queries, f"match {layer} {b}")
  for name in ("ce", "mask", "dice", "cate"):
    ref = np.asarray([vec[f"loss_{name}_{l}"] for l in range(matches.shape[0])])
    np.testing.assert_allclose(np.asarray(aux[f"loss_{name}"]), ref, rtol=1e-4, atol=1e-7,
                               err_msg=name)
  np.testing.assert_allclose(float(total), float(vec["loss_total"]), rtol=1e-4)


@pytest.mark.parametrize("path", FILES[:1], ids=lambda p: p.stem)
def test_mask2former_converter_reads_a_released_pth(path, tmp_path):
  """A .pth as released ({"model": state_dict} with buffers) converts, with the config
  read from the shapes, to exactly the parameters of the state-dict conversion."""
  import torch
  _, _, sd = load_vector(path)
  _, _, cfg, conv_sd, _ = _converted(path)
  full = {k: torch.from_numpy(v) for k, v in sd.items()}
  full["pixel_mean"] = torch.zeros(3, 1, 1)  # buffers the converter must skip
  full["pixel_std"] = torch.ones(3, 1, 1)
  full["criterion.empty_weight"] = torch.ones(cfg.num_classes + 1)
  pth = tmp_path / "model_final.pth"
  torch.save({"model": full, "iteration": 0}, pth)
  conv = convert_semask_mask2former(str(pth))
  for k in cfg.keys():
    assert conv.config[k] == cfg[k], (k, conv.config[k], cfg[k])
  assert {"pixel_mean", "pixel_std", "criterion.empty_weight"} <= set(conv.report.skipped)
  # The command line does the same and writes an orbax directory for config.init_from.
  assert cli_main(["semask_mask2former", "--pth", str(pth), "--out", str(tmp_path / "out")]) == 0
  assert (tmp_path / "out" / "conversion.json").is_file()
  got = nnx.to_flat_state(nnx.state(conv.model, nnx.Param))
  want = dict(nnx.to_flat_state(nnx.state(conv_sd.model, nnx.Param)))
  assert len(got) == len(want)
  for k, v in got:
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(want[k][...]), str(k))
