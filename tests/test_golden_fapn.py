"""SeMask FaPN- and MSFaPN-Mask2Former against the official SeMask-FAPN code
(golden/fapn/*.npz, SPEC section 12).

Data-driven: every *.npz in $SEMASK_FAPN_GOLDEN_DIR (default ../shared/golden/fapn) is
checked; a new vector of the same schema (other class count, window, num_sem_blocks,
mask_dim, deformable groups, input size) needs no code change. The model config is
meta['config'] (its pixel_decoder 'fapn' or 'msfapn'; the deformable groups, where meta
lacks them, from the weights' shapes); the weights are the recipe's state dict with
meta['tied_keys'] applied (the shared GroupNorm stored twice, as in a real checkpoint),
through the converter, and once through a real .pth ({"model": state_dict}). The model
runs in eval mode under jit in float32; every stored output is within 1e-4 x max(1,
max|ref|), and the Mask2Former criterion on its outputs, replaying the stored draws,
gives the stored matches and losses.
"""
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert_weights import ConversionError, convert_semask_mask2former, infer_mask2former_config
from convert_weights.__main__ import main as cli_main
from semask_jax.losses import mask2former as ml
from semask_jax.models import model_config_from_dict
from tests.golden_utils import GOLDEN_DIR, jit_forward, load_vector
from tests.test_mask2former_loss import _case as loss_case

FAPN_GOLDEN_DIR = pathlib.Path(os.environ.get("SEMASK_FAPN_GOLDEN_DIR", GOLDEN_DIR / "fapn"))
FILES = sorted(FAPN_GOLDEN_DIR.glob("*.npz"))
RTOL = 1e-4  # max |err| <= 1e-4 * max(1, max |ref|)
# Config values that no parameter shape shows (the converter takes the window's).
UNSEEN = ("sem_window_size",)


def _check(name: str, got, ref) -> float:
  got, ref = np.asarray(got, np.float32), np.asarray(ref)
  assert got.shape == ref.shape, (name, got.shape, ref.shape)
  err = float(np.abs(got - ref).max())
  bound = RTOL * max(1.0, float(np.abs(ref).max()))
  assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"
  return err


def _nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def test_fapn_golden_vectors_exist():
  assert FILES, "no FaPN golden vectors found; set SEMASK_FAPN_GOLDEN_DIR"
  assert {json.loads(str(np.load(p)["meta"]))["config"]["pixel_decoder"]
          for p in FILES} >= {"fapn", "msfapn"}


@functools.lru_cache(maxsize=None)
def _state_dict(path):
  """(arrays, meta, the checkpoint-like state dict: recipe draws + tied copies)."""
  vec, meta, sd = load_vector(path)
  sd = dict(sd)
  for first, alias in meta["tied_keys"]:
    sd[alias] = sd[first]
  return vec, meta, sd


def _config(meta, sd):
  """meta['config'] as a model config; what meta does not say is read from the shapes."""
  cfg = model_config_from_dict(meta["config"])
  inferred = infer_mask2former_config(sd, nheads=meta["config"].get("nheads"))
  for k in inferred.keys():
    if k in meta["config"] and k not in UNSEEN:
      assert inferred[k] == cfg[k], (k, inferred[k], cfg[k])
  if "deformable_groups" not in meta["config"]:
    cfg.deformable_groups = inferred.deformable_groups
  return cfg


@functools.lru_cache(maxsize=None)
def _converted(path):
  """(vec, meta, cfg, conversion of the state dict, forward outputs)."""
  vec, meta, sd = _state_dict(path)
  cfg = _config(meta, sd)
  conv = convert_semask_mask2former(sd, cfg)
  _, state = nnx.split(conv.model)
  out = jit_forward(conv.model)(state, jnp.asarray(vec["image"].transpose(0, 2, 3, 1)))
  return vec, meta, cfg, conv, jax.device_get(out)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_fapn_golden(path):
  vec, meta, cfg, conv, out = _converted(path)
  abs_sum = sum(float(np.abs(a).astype(np.float64).sum()) for a in _state_dict(path)[2].values())
  np.testing.assert_allclose(abs_sum, float(vec["weights_abs_sum"]), rtol=1e-9,
                             err_msg="the recipe's random stream changed, not the model")
  assert cfg.pixel_decoder == meta["config"]["pixel_decoder"]
  assert conv.model.config.backbone.sem_global == (False, False, True, True)
  for pair in meta["tied_keys"]:  # one copy loaded (layer_N.norm), the other checked equal
    assert {k in conv.report.used for k in pair} == {True, False}, pair
    assert {k in conv.report.skipped for k in pair} == {True, False}, pair
  errs = {}
  for i in range(4):
    errs[f"feat{i}"] = _check(f"feat{i}", _nchw(out["feats"][i]), vec[f"feat{i}"])
    errs[f"sem{i}"] = _check(f"sem{i}", _nchw(out["sems"][i]), vec[f"sem{i}"])
  aux = out["pixel_decoder_aux"]
  align_keys = sorted(k for k in vec if k.startswith("align"))
  n_levels = len(meta["align_levels"])
  assert len(align_keys) == 5 * n_levels, align_keys
  for k in align_keys + ["fpn_res2"]:
    errs[k] = _check(k, _nchw(aux[k]), vec[k])
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
  s = meta["full_res_stride"]
  errs["sem_pred"] = _check("sem_pred", _nchw(out["sem_pred"])[:, :, ::s, ::s], vec["sem_pred"])
  errs["semseg"] = _check("semseg", _nchw(out["sem_seg"])[:, :, ::s, ::s], vec["semseg"])
  worst = max(errs, key=errs.get)
  print(json.dumps({path.stem: {"worst": worst, "max_abs_err": f"{errs[worst]:.2e}",
                                "errors": {k: f"{v:.2e}" for k, v in errs.items()}}}))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_fapn_golden_losses_from_our_forward(path):
  """The (unchanged) Mask2Former criterion on this model's outputs with the reference's
  stored draws: the same matches and the same losses as the reference."""
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


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_fapn_converter_reads_a_released_pth(path, tmp_path):
  """A .pth as released ({"model": state_dict} with buffers and both copies of the shared
  GroupNorms) converts, with the config read from the shapes, to exactly the parameters
  of the state-dict conversion; the command line writes the orbax directory."""
  import torch
  _, meta, sd = _state_dict(path)
  _, _, cfg, conv_sd, _ = _converted(path)
  full = {k: torch.from_numpy(v) for k, v in sd.items()}
  full["pixel_mean"] = torch.zeros(3, 1, 1)  # buffers the converter must skip
  full["pixel_std"] = torch.ones(3, 1, 1)
  full["criterion.empty_weight"] = torch.ones(cfg.num_classes + 1)
  pth = tmp_path / "model_final.pth"
  torch.save({"model": full, "iteration": 0}, pth)
  nheads = meta["config"]["nheads"] if cfg.pixel_decoder == "fapn" else None
  conv = convert_semask_mask2former(str(pth), nheads=nheads)
  for k in cfg.keys():
    if k not in UNSEEN:
      assert conv.config[k] == cfg[k], (k, conv.config[k], cfg[k])
  assert {"pixel_mean", "pixel_std", "criterion.empty_weight"} <= set(conv.report.skipped)
  argv = ["semask_mask2former", "--pth", str(pth), "--out", str(tmp_path / "out")]
  assert cli_main(argv + (["--nheads", str(nheads)] if nheads else [])) == 0
  assert (tmp_path / "out" / "conversion.json").is_file()
  got = nnx.to_flat_state(nnx.state(conv.model, nnx.Param))
  want = dict(nnx.to_flat_state(nnx.state(conv_sd.model, nnx.Param)))
  assert len(got) == len(want)
  for k, v in got:
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(want[k][...]), str(k))


@pytest.mark.parametrize("path", FILES[:1], ids=lambda p: p.stem)
def test_fapn_converter_refuses_unequal_or_missing_copies(path):
  """The shared GroupNorm's two copies must agree; a missing copy, an unexpected key and a
  mis-shaped key are refused, each named."""
  _, meta, sd = _state_dict(path)
  _, _, cfg, _, _ = _converted(path)
  copy = next(k for pair in meta["tied_keys"] for k in pair if ".offset.norm." in k)
  first = copy.replace(".align_", ".layer_").replace(".offset.norm.", ".norm.")
  bad = dict(sd)
  bad[copy] = sd[first] + 1e-3
  with pytest.raises(ConversionError, match=f"{copy}: differs from {first}"):
    convert_semask_mask2former(bad, cfg)
  bad = dict(sd)
  del bad[copy]
  bad["sem_seg_head.pixel_decoder.align_9.offset.weight"] = sd[first]
  key = "sem_seg_head.pixel_decoder.mask_features.bias"
  bad[key] = sd[key][:-1]
  with pytest.raises(ConversionError) as e:
    convert_semask_mask2former(bad, cfg)
  msg = str(e.value)
  assert f"missing keys (1):\n    {copy}" in msg
  assert "unexpected keys (1):\n    sem_seg_head.pixel_decoder.align_9.offset.weight" in msg
  assert f"mis-shaped keys (1):\n    {key}" in msg


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_fapn_bfloat16_pixel_decoder_is_close_to_float32(path):
  """The pixel decoder in compute dtype bfloat16 (parameters float32; GroupNorms and the
  DCN float32 inside, as the reference casts) on the float32 backbone features: within a
  few % of float32, as Mask2Former's (tests/test_golden_m2f_pixel_decoder.py)."""
  vec, meta, cfg, conv, out32 = _converted(path)
  cfg = model_config_from_dict(cfg.to_dict())
  cfg.dtype = "bfloat16"
  model = convert_semask_mask2former(_state_dict(path)[2], cfg).model
  graphdef, state = nnx.split(model.sem_seg_head.pixel_decoder)

  @jax.jit
  def decode(state, feats):
    aux = {}
    mask_features, multi_scale = nnx.merge(graphdef, state)(feats, aux)
    return mask_features, multi_scale, aux

  mask_features, multi_scale, aux = jax.device_get(
      decode(state, [jnp.asarray(f) for f in out32["feats"]]))
  assert mask_features.dtype == jnp.bfloat16 and aux["align1_dcn"].dtype == np.float32
  pairs = {"mask_features": (out32["mask_features"], mask_features)}
  for i in range(3):
    pairs[f"multi_scale{i}"] = (out32["multi_scale_features"][i], multi_scale[i])
  for k in aux:
    pairs[k] = (out32["pixel_decoder_aux"][k], aux[k])
  rels = {}
  for k, (ref, got) in pairs.items():
    ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
    rels[k] = float(np.abs(got - ref).max() / np.abs(ref).max())
  print(json.dumps({path.stem: {k: f"{v:.1e}" for k, v in rels.items()}}))
  assert all(0 < r <= 4e-2 for r in rels.values()), rels
