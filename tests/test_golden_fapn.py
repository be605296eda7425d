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
from semask_jax.models import model_config_from_dict
from tests.golden_utils import (GOLDEN_DIR, RELEASED_BUFFERS, assert_cli_writes,
                                assert_m2f_criterion_reproduces_reference, assert_same_params,
                                check, check_layers, check_m2f_semantic, check_multi_scale,
                                check_weights_and_backbone, converted_forward, load_vector, nchw,
                                worst_error, write_released_pth)

FAPN_GOLDEN_DIR = pathlib.Path(os.environ.get("SEMASK_FAPN_GOLDEN_DIR", GOLDEN_DIR / "fapn"))
FILES = sorted(FAPN_GOLDEN_DIR.glob("*.npz"))
# Config values that no parameter shape shows (the converter takes the window's).
UNSEEN = ("sem_window_size",)


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
  return (vec, meta, cfg) + converted_forward(convert_semask_mask2former, sd, cfg, vec)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_fapn_golden(path):
  vec, meta, cfg, conv, out = _converted(path)
  assert cfg.pixel_decoder == meta["config"]["pixel_decoder"]
  assert conv.model.config.backbone.sem_global == (False, False, True, True)
  for pair in meta["tied_keys"]:  # one copy loaded (layer_N.norm), the other checked equal
    assert {k in conv.report.used for k in pair} == {True, False}, pair
    assert {k in conv.report.skipped for k in pair} == {True, False}, pair
  errs = check_weights_and_backbone(_state_dict(path)[2], out, vec)
  aux = out["pixel_decoder_aux"]
  align_keys = sorted(k for k in vec if k.startswith("align"))
  n_levels = len(meta["align_levels"])
  assert len(align_keys) == 5 * n_levels, align_keys
  for k in align_keys + ["fpn_res2"]:
    errs[k] = check(k, nchw(aux[k]), vec[k])
  check_multi_scale(errs, out, vec)
  n_pred = check_layers(errs, out, vec, ("pred_logits", "pred_masks"))
  assert n_pred == meta["config"]["dec_layers"] + 1
  check_m2f_semantic(errs, out, vec, stride=meta["full_res_stride"])
  print(json.dumps({path.stem: {**worst_error(errs),
                                "errors": {k: f"{v:.2e}" for k, v in errs.items()}}}))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_fapn_golden_losses_from_our_forward(path):
  """The (unchanged) Mask2Former criterion on this model's outputs with the reference's
  stored draws: the same matches and the same losses as the reference."""
  vec, _, _, _, out = _converted(path)
  assert_m2f_criterion_reproduces_reference(path, vec, out)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_fapn_converter_reads_a_released_pth(path, tmp_path):
  """A .pth as released ({"model": state_dict} with buffers and both copies of the shared
  GroupNorms) converts, with the config read from the shapes, to exactly the parameters
  of the state-dict conversion; the command line writes the orbax directory."""
  _, meta, sd = _state_dict(path)
  _, _, cfg, conv_sd, _ = _converted(path)
  pth = write_released_pth(sd, cfg.num_classes, tmp_path / "model_final.pth")
  nheads = meta["config"]["nheads"] if cfg.pixel_decoder == "fapn" else None
  conv = convert_semask_mask2former(str(pth), nheads=nheads)
  for k in cfg.keys():
    if k not in UNSEEN:
      assert conv.config[k] == cfg[k], (k, conv.config[k], cfg[k])
  assert set(RELEASED_BUFFERS) <= set(conv.report.skipped)
  assert_cli_writes("semask_mask2former", pth, tmp_path / "out",
                    *(["--nheads", str(nheads)] if nheads else []))
  assert_same_params(conv.model, conv_sd.model)


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
