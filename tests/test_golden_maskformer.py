"""SeMask-MaskFormer against the reference (golden/maskformer/*.npz, SPEC section 11).

Data-driven: every *.npz in $SEMASK_MASKFORMER_GOLDEN_DIR (default
../shared/golden/maskformer) is checked; a new vector of the same schema (another
class count, window, num_sem_blocks, mask_dim, non-square input) needs no code
change. The model config is read from meta['config'], the weights come from the
recipe next to the vectors through the converter, and once through a real .pth
({"model": state_dict}, as released). The whole model runs in eval mode under jit in
float32; the criterion on its outputs gives the reference's cost matrices, an
assignment optimal for them, and, with the reference's matching, its losses.
"""
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert_weights import ConversionError, convert_semask_maskformer
from convert_weights.__main__ import main as cli_main
from semask_jax.losses import maskformer as mfl
from semask_jax.losses.matching import linear_sum_assignment
from semask_jax.models import SEMASK_MASKFORMER, model_config_from_dict
from tests.golden_utils import (GOLDEN_DIR, RELEASED_BUFFERS, RTOL, assert_cli_writes,
                                assert_same_params, check, check_layers,
                                check_weights_and_backbone, converted_forward, load_vector, nchw,
                                worst_error, write_released_pth)

MF_GOLDEN_DIR = pathlib.Path(os.environ.get("SEMASK_MASKFORMER_GOLDEN_DIR",
                                            GOLDEN_DIR / "maskformer"))
FILES = sorted(MF_GOLDEN_DIR.glob("*.npz"))
EXTRA_SLOTS = 2  # padded target slots beyond the classes present: they must not matter


def _model_config(meta):
  return model_config_from_dict({**meta["config"], "name": SEMASK_MASKFORMER})


def _criterion_config(meta, label: np.ndarray) -> mfl.MaskFormerCriterionConfig:
  c = meta["config"]
  t = max(len(np.setdiff1d(np.unique(x), [255])) for x in label) + EXTRA_SLOTS
  names = ("class_weight", "mask_weight", "dice_weight", "cate_weight", "no_object_weight")
  return mfl.MaskFormerCriterionConfig(num_classes=c["num_classes"], max_targets=t,
                                       slot_chunk=3, **{k: c[k] for k in names})


def _stored_matches(vec, n_pred: int, batch: int, slots: int) -> np.ndarray:
  """The reference's assignments as [L, B, T] query per target slot (-1 none)."""
  out = np.full((n_pred, batch, slots), -1, np.int32)
  for l in range(n_pred):
    for b in range(batch):
      queries, targets = vec[f"match_{l}_{b}"]
      out[l, b, targets] = queries
  return out


def test_maskformer_golden_vectors_exist():
  assert FILES, "no MaskFormer golden vectors found; set SEMASK_MASKFORMER_GOLDEN_DIR"


@functools.lru_cache(maxsize=None)
def _converted(path):
  """(vec, meta, cfg, conversion from the recipe's state dict, forward outputs)."""
  vec, meta, sd = load_vector(path)
  cfg = _model_config(meta)
  return (vec, meta, cfg) + converted_forward(convert_semask_maskformer, sd, cfg, vec)


@functools.lru_cache(maxsize=None)
def _criterion(path):
  """The criterion on this model's outputs: (cfg, aux with our matching, aux with the
  reference's matching, total with the reference's matching)."""
  vec, meta, _, _, out = _converted(path)
  label = vec["label"]
  cfg = _criterion_config(meta, label)
  outputs = {k: jnp.asarray(out[k]) for k in ("pred_logits", "pred_masks", "sem_pred")}
  n_pred, b = vec["pred_logits"].shape[:2]
  stored = jnp.asarray(_stored_matches(vec, n_pred, b, cfg.max_targets))
  fn = jax.jit(functools.partial(mfl.set_criterion, cfg=cfg))
  _, ours = fn(outputs, jnp.asarray(label))
  total, theirs = fn(outputs, jnp.asarray(label), matches=stored)
  return cfg, jax.device_get(ours), jax.device_get(theirs), float(total)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_maskformer_golden(path):
  vec, meta, _, _, out = _converted(path)
  errs = check_weights_and_backbone(load_vector(path)[2], out, vec)
  for key in ("mask_features", "transformer_in"):
    errs[key] = check(key, nchw(out[key]), vec[key])
  pos = np.broadcast_to(np.asarray(out["transformer_pos"]).transpose(2, 0, 1)[None],
                        vec["transformer_pos"].shape)                  # [h, w, C] -> [B, C, h, w]
  errs["transformer_pos"] = check("transformer_pos", pos, vec["transformer_pos"])
  n_pred = check_layers(errs, out, vec, ("decoder_hs", "pred_logits", "pred_masks"))
  assert n_pred == meta["config"]["dec_layers"]
  sub = int(meta.get("sub", 3))  # sem_pred_sub{sub} = x[..., ::sub, ::sub]
  for name, key in (("sem_pred", "sem_pred"), ("semseg", "sem_seg")):
    errs[f"{name}_sub{sub}"] = check(f"{name}_sub{sub}", nchw(out[key])[..., ::sub, ::sub],
                                     vec[f"{name}_sub{sub}"])
  np.testing.assert_array_equal(np.asarray(out["sem_seg"]).argmax(-1), vec["semseg_argmax"])
  print(json.dumps({path.stem: worst_error(errs)}))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_maskformer_golden_matching(path):
  """Each cost matrix within 1e-4 relative; the in-graph Hungarian assignment on our
  costs is optimal for the stored costs within that tolerance."""
  vec = _converted(path)[0]
  _, ours, _, _ = _criterion(path)
  n_pred, b = vec["pred_logits"].shape[:2]
  same, worst = 0, 0.0
  for l in range(n_pred):
    for i in range(b):
      ref = vec[f"match_cost_{l}_{i}"]                                 # [Q, n]
      n = ref.shape[1]
      got = np.asarray(ours["costs"][l, i, :, :n])
      scale = float(np.abs(ref).max())
      err = float(np.abs(got - ref).max())
      assert err <= RTOL * scale, f"match_cost_{l}_{i}: {err:.3e} > {RTOL * scale:.3e}"
      worst = max(worst, err / scale)
      queries, targets = vec[f"match_{l}_{i}"]
      mine = np.asarray(ours["matches"][l, i, :n])
      assert len(set(mine.tolist())) == n and (mine >= 0).all(), mine
      assert (np.asarray(ours["matches"][l, i, n:]) == -1).all()
      best = float(ref[queries, targets].astype(np.float64).sum())
      cost = float(ref[mine, np.arange(n)].astype(np.float64).sum())
      assert cost <= best + RTOL * scale * n, (l, i, cost, best)
      # ... and the assignment on the stored costs themselves is the stored optimum.
      on_ref = np.asarray(linear_sum_assignment(jnp.asarray(ref)))
      assert float(ref[on_ref, np.arange(n)].astype(np.float64).sum()) <= best + RTOL * scale * n
      same += bool((mine[targets] == queries).all())
  print(json.dumps({path.stem: {"cost_max_rel_err": f"{worst:.2e}",
                                "assignments_equal_to_reference": f"{same}/{n_pred * b}"}}))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_maskformer_golden_losses(path):
  """Every loss term with the stored matching on this model's outputs within relative
  1e-4 of the reference's, and the weighted total."""
  vec, meta, _, _, _ = _converted(path)
  _, _, theirs, total = _criterion(path)
  n_pred = vec["pred_logits"].shape[0]
  assert float(theirs["num_masks"]) == meta["num_masks"]
  worst = 0.0
  for name in ("ce", "mask", "dice", "cate"):
    ref = np.asarray([vec[f"loss_{name}_{l}"] for l in range(n_pred)])
    got = np.asarray(theirs[f"loss_{name}"])
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=0, err_msg=name)
    nz = ref != 0
    worst = max(worst, float(np.abs(got[nz] / ref[nz] - 1).max()))
  np.testing.assert_allclose(total, float(vec["loss_total"]), rtol=RTOL)
  print(json.dumps({path.stem: {"loss_max_rel_err": f"{worst:.2e}",
                                "total_rel_err": f"{abs(total / float(vec['loss_total']) - 1):.2e}"}}))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_maskformer_criterion_on_stored_predictions(path):
  """The criterion alone on the reference's own predictions: its cost matrices and the
  mask and class losses with its matching (no model in the loop)."""
  vec, meta = load_vector(path)[:2]
  label = vec["label"]
  cfg = _criterion_config(meta, label)
  n_pred, b = vec["pred_logits"].shape[:2]
  stored = jnp.asarray(_stored_matches(vec, n_pred, b, cfg.max_targets))
  outputs = {"pred_logits": jnp.asarray(vec["pred_logits"]),
             "pred_masks": jnp.asarray(vec["pred_masks"]),
             "sem_pred": jnp.zeros(label.shape + (cfg.num_classes,), jnp.float32)}
  _, aux = jax.jit(functools.partial(mfl.set_criterion, cfg=cfg))(
      outputs, jnp.asarray(label), matches=stored)
  for l in range(n_pred):
    for i in range(b):
      ref = vec[f"match_cost_{l}_{i}"]
      got = np.asarray(aux["costs"][l, i, :, :ref.shape[1]])
      assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max(), (l, i)
  for name in ("ce", "mask", "dice"):
    ref = np.asarray([vec[f"loss_{name}_{l}"] for l in range(n_pred)])
    np.testing.assert_allclose(np.asarray(aux[f"loss_{name}"]), ref, rtol=RTOL, err_msg=name)


@pytest.mark.parametrize("path", FILES[:1], ids=lambda p: p.stem)
def test_maskformer_converter_reads_a_released_pth(path, tmp_path):
  """A .pth as released ({"model": state_dict} with buffers) converts to exactly the
  parameters of the state-dict conversion; the config read from its shapes is the
  vector's but for the attention heads, which the shapes do not hold."""
  _, meta, sd = load_vector(path)
  _, _, cfg, conv_sd, _ = _converted(path)
  pth = write_released_pth(sd, cfg.num_classes, tmp_path / "model_final.pth")
  inferred = convert_semask_maskformer(str(pth)).config
  for k in cfg.keys():
    if k != "nheads":
      assert inferred[k] == cfg[k], (k, inferred[k], cfg[k])
  conv = convert_semask_maskformer(str(pth), cfg)
  assert set(RELEASED_BUFFERS) <= set(conv.report.skipped)
  assert_same_params(conv.model, conv_sd.model)
  # The command line does the same and writes an orbax directory for config.init_from.
  assert_cli_writes("semask_maskformer", pth, tmp_path / "out",
                    "--nheads", str(meta["config"]["nheads"]))


@pytest.mark.parametrize("path", FILES[:1], ids=lambda p: p.stem)
def test_maskformer_converter_refuses_a_mismatch(path, tmp_path, capsys):
  """A missing, an unexpected and a mis-shaped key are all named in the refusal."""
  _, _, sd = load_vector(path)
  _, _, cfg, _, _ = _converted(path)
  bad = dict(sd)
  missing = "sem_seg_head.pixel_decoder.layer_2.norm.bias"
  shaped = "sem_seg_head.predictor.query_embed.weight"
  del bad[missing]
  bad["sem_seg_head.predictor.extra.weight"] = np.zeros((2,), np.float32)
  bad[shaped] = np.zeros((3, cfg.hidden_dim), np.float32)
  with pytest.raises(ConversionError) as e:
    convert_semask_maskformer(bad, cfg)
  msg = str(e.value)
  for key in (missing, "sem_seg_head.predictor.extra.weight", shaped):
    assert key in msg, (key, msg)
  import torch
  pth = tmp_path / "bad.pth"
  torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in bad.items()}}, pth)
  assert cli_main(["semask_maskformer", "--pth", str(pth), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:") and missing in err, err
