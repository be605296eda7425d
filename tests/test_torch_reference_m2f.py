"""benchmarks/torch_reference_m2f.py computes the official Mask2Former family's function:
the golden recipe's state dicts (golden/mask2former, golden/fapn) load with strict=True
under the checkpoint's names, every stored eval output (backbone features and priors, the
pixel decoder's maps and FeatureAlign intermediates, every layer's pred_logits /
pred_masks, the semantic head and semantic inference) is within 1e-4 x max(1, max|ref|),
and the criterion, replaying the stored point draws through its `rand`, gives the stored
matches, points and losses (1e-4 relative). FaPN's DCNv2 runs as the im2col written with
torch ops and, where torchvision imports, as torchvision.ops.deform_conv2d. Its timings
are the official code's stand-in for the issue's same-machine ratios."""
import functools
import json
import os
import pathlib

import numpy as np
import pytest
import torch

from tests.golden_utils import GOLDEN_DIR, check, load_vector, m2f_golden_files, worst_error
from tests.test_dcn import CASES as DCN_CASES
from tests.test_dcn import _case as dcn_case
from tests.test_dcn import oracle as dcn_oracle
from tests.test_torch_reference import run_bench_cli

FAPN_DIR = pathlib.Path(os.environ.get("SEMASK_FAPN_GOLDEN_DIR", GOLDEN_DIR / "fapn"))
FILES = m2f_golden_files() + sorted(FAPN_DIR.glob("*.npz"))
HEAD_KEYS = ("conv_dim", "mask_dim", "hidden_dim", "num_queries", "nheads", "dim_feedforward",
             "dec_layers", "enc_layers", "enc_dim_feedforward", "train_num_points",
             "oversample_ratio", "importance_sample_ratio", "class_weight", "mask_weight",
             "dice_weight", "cate_weight", "no_object_weight")


@pytest.fixture(scope="module")
def m2f(load_benchmark):
  return load_benchmark("torch_reference_m2f")


def _dcn_impls(path):
  """The DCN ops to check a vector with: im2col always, torchvision where it imports."""
  if "fapn" not in path.stem:
    return [pytest.param(path, "none", id=path.stem)]
  tv = pytest.mark.skipif(
      not _torchvision(), reason="torchvision.ops.deform_conv2d does not import here (CI has "
      "no torchvision; this venv's torch has no matching build)")
  return [pytest.param(path, "im2col", id=f"{path.stem}-im2col"),
          pytest.param(path, "torchvision", id=f"{path.stem}-torchvision", marks=tv)]


@functools.lru_cache(maxsize=None)
def _torchvision() -> bool:
  try:
    from torchvision.ops import deform_conv2d  # noqa: F401
    return True
  except Exception:  # not installed, or built for another torch
    return False


PARAMS = [p for path in FILES for p in _dcn_impls(path)]


def _state_dict(path):
  """(arrays, meta, the checkpoint-like state dict: recipe draws + tied GroupNorm copies)."""
  vec, meta, sd = load_vector(path)
  sd = dict(sd)
  for first, alias in meta.get("tied_keys", []):
    sd[alias] = sd[first]
  return vec, meta, sd


def _load(m2f, path, dcn):
  """The transcription of meta['config'] with the recipe's weights, loaded strictly (the
  relative_position_index buffers, which the recipe does not draw, are the model's own)."""
  vec, meta, sd = _state_dict(path)
  c = meta["config"]
  model = m2f.SeMaskMask2Former(
      pixel_decoder=c.get("pixel_decoder", "msdeformattn"), num_classes=c["num_classes"],
      head={k: c[k] for k in HEAD_KEYS if k in c}, num_sem_blocks=c["num_sem_blocks"],
      sem_window_size=c["sem_window_size"], embed_dim=c["embed_dim"], depths=c["depths"],
      num_heads=c["num_heads"], window_size=c["window_size"],
      dcn="im2col" if dcn == "none" else dcn)
  state = {k: torch.from_numpy(v) for k, v in sd.items()}
  own = model.state_dict()
  undrawn = {k: v for k, v in own.items() if k not in state}
  assert undrawn and all(k.endswith("relative_position_index") for k in undrawn), \
      sorted(undrawn)[:5]
  model.load_state_dict({**undrawn, **state}, strict=True)
  return vec, meta, model


@pytest.mark.parametrize("path,dcn", PARAMS)
def test_eval_outputs_are_the_golden_ones(m2f, path, dcn):
  vec, meta, model = _load(m2f, path, dcn)
  aux = {}
  with torch.no_grad():
    logits, masks, sem_pred = model.eval()(torch.from_numpy(vec["image"]), aux)
    semseg = m2f.semantic_inference(logits[-1], masks[-1], tuple(vec["image"].shape[-2:]))
  assert len(logits) == meta["config"]["dec_layers"] + 1
  s = meta.get("full_res_stride", 1)
  got = {"sem_pred": sem_pred[:, :, ::s, ::s], "semseg": semseg[:, :, ::s, ::s],
         "mask_features": aux["mask_features"], "pred_logits": torch.stack(logits),
         "pred_masks": torch.stack(masks)}
  got.update({f"feat{i}": f for i, f in enumerate(aux["feats"])})
  got.update({f"sem{i}": f for i, f in enumerate(aux["sems"])})
  got.update({f"multi_scale{i}": f for i, f in enumerate(aux["multi_scale_features"])})
  stored_aux = sorted(k for k in vec if k.startswith("align") or k == "fpn_res2")
  if "fapn" in path.stem:
    assert len(stored_aux) == 5 * len(meta["align_levels"]) + 1, stored_aux
  got.update({k: aux[k] for k in stored_aux})
  errs = {k: check(k, v.numpy(), vec[k]) for k, v in got.items()}
  print(json.dumps({f"{path.stem}/{dcn}": worst_error(errs)}))


@pytest.mark.parametrize("path,dcn", PARAMS[:1] + [p for p in PARAMS if p.values[1] == "im2col"])
def test_losses_with_the_stored_draws_are_the_golden_ones(m2f, path, dcn):
  """The criterion on the model's eval outputs, its uniform draws replayed from the vector
  in the reference's order (final prediction first, then 0 .. L-1; per prediction the
  matcher's draw per image, then the mask loss's oversampled and random draws): the
  stored matches, points and losses."""
  vec, meta, model = _load(m2f, path, dcn)
  n_pred = meta["config"]["dec_layers"] + 1
  order = [n_pred - 1] + list(range(n_pred - 1))  # golden index of each criterion pass
  draws = []
  for l in order:
    draws += [vec[f"match_points_{l}"][b][None] for b in range(vec["image"].shape[0])]
    draws += [vec[f"loss_oversampled_points_{l}"], vec[f"loss_random_points_{l}"]]
  draws.reverse()

  def rand(*shape, device=None):
    a = draws.pop()
    assert a.shape == shape, (a.shape, shape)
    return torch.from_numpy(a)

  criterion = m2f.SeMaskCriterion(model.cfg, rand=rand)
  with torch.no_grad():
    logits, masks, sem_pred = model.eval()(torch.from_numpy(vec["image"]))
    losses = criterion(logits, masks, sem_pred, m2f.prepare_targets(
        torch.from_numpy(vec["label"]).long()))
  assert not draws
  for k, l in enumerate(order):
    for b, (queries, targets) in enumerate(criterion.matches[k]):
      np.testing.assert_array_equal(np.stack([queries.numpy(), targets.numpy()]),
                                    vec[f"match_{l}_{b}"], f"match {l} {b}")
    # The same points per matched pair; top-k may order near-equal uncertainties (equal to
    # float rounding, between the two forwards) differently.
    np.testing.assert_array_equal(_sorted_points(criterion.points[k].numpy()),
                                  _sorted_points(vec[f"loss_points_{l}"]), f"points {l}")
    suffix = "" if k == 0 else f"_{l}"
    for name in ("ce", "mask", "dice", "cate"):
      np.testing.assert_allclose(float(losses[f"loss_{name}{suffix}"].sum()),
                                 float(vec[f"loss_{name}_{l}"]), rtol=1e-4, atol=1e-7,
                                 err_msg=f"loss_{name}_{l}")
  total = sum(criterion.weighted(losses).values())
  np.testing.assert_allclose(float(total.sum()), float(vec["loss_total"]), rtol=1e-4)


def _sorted_points(p: np.ndarray) -> np.ndarray:
  """[N, P, 2] with each row's points in lexicographic order."""
  order = np.lexsort((p[..., 1], p[..., 0]), axis=-1)
  return np.take_along_axis(p, order[..., None], axis=1)


@pytest.mark.parametrize("name", ["dg2", "dg8", "far_outside"])
def test_im2col_dcn_is_dcnv2(m2f, name):
  """The im2col DCN (3x3, stride 1, padding 1) against tests/test_dcn.py's oracle of DCNv2,
  in float64, offsets up to several pixels outside the map."""
  (x, offset, mask, weight, bias), (stride, pad, dil) = dcn_case(0, **DCN_CASES[name])
  assert (stride, pad, dil) == (1, 1, 1)
  args = [torch.from_numpy(a).double() for a in (x, offset, mask, weight, bias)]
  want = dcn_oracle(*args, 1, 1, 1, torch)
  x, offset, mask, weight, bias = args
  got = m2f.deform_conv2d_im2col(x, offset, weight, bias, mask)
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)


def test_training_step_and_solver(m2f):
  """One training step of the tiny FaPN model (train mode, criterion, backward, clipped
  AdamW): finite, every parameter moved or had no gradient, and detectron2's groups (each
  parameter once, the shared GroupNorm too; backbone lr x 0.1; no decay on norms,
  nn.Embedding and position tables, decay on the pixel decoder's bare level_embed)."""
  path = next(p for p in FILES if "msfapn" in p.stem)
  vec, meta, model = _load(m2f, path, "im2col")
  opt = m2f.build_optimizer(model.train())
  groups = {id(g["params"][0]): g for g in opt.param_groups}
  assert len(groups) == len(opt.param_groups) == len(list(model.parameters()))
  names = {n: groups[id(p)] for n, p in model.named_parameters()}
  pd = "sem_seg_head.pixel_decoder."
  assert pd + "layer_1.norm.weight" in names and pd + "align_1.offset.norm.weight" not in names
  for name, g in names.items():
    assert g["lr"] == pytest.approx(1e-5 if name.startswith("backbone.") else 1e-4), name
  decay = {"backbone.patch_embed.proj.weight": 0.05,
           "backbone.patch_embed.norm.weight": 0.0,
           "backbone.layers.0.blocks.0.attn.relative_position_bias_table": 0.0,
           "backbone.layers.0.semantic_layer.class_injection.0.gamma": 0.05,
           "backbone.norm3.bias": 0.0,
           pd + "input_proj.0.0.weight": 0.05,
           pd + "input_proj.0.1.weight": 0.0,  # GroupNorm
           pd + "transformer.level_embed": 0.05,  # a bare Parameter, not an nn.Embedding
           pd + "transformer.encoder.layers.0.norm1.weight": 0.0,
           pd + "layer_1.norm.weight": 0.0,
           pd + "align_1.dcpack_L2.weight": 0.05,
           "sem_seg_head.predictor.query_feat.weight": 0.0,
           "sem_seg_head.predictor.query_embed.weight": 0.0,
           "sem_seg_head.predictor.level_embed.weight": 0.0,
           "sem_seg_head.predictor.decoder_norm.weight": 0.0,
           "sem_seg_head.predictor.class_embed.weight": 0.05}
  assert {k: names[k]["weight_decay"] for k in decay} == decay
  criterion = m2f.SeMaskCriterion(model.cfg)
  torch.manual_seed(0)
  logits, masks, sem_pred = model(torch.from_numpy(vec["image"]))
  labels = torch.from_numpy(vec["label"]).long()
  # Other target counts per image (the criterion pads the target masks), ignored pixels.
  labels[1][labels[1] == labels[1].max()] = 255
  labels[0][:, :8] = 149
  targets = m2f.prepare_targets(labels)
  assert len(targets[0]["labels"]) != len(targets[1]["labels"])
  loss = sum(criterion.weighted(criterion(logits, masks, sem_pred, targets)).values())
  assert torch.isfinite(loss).all()
  before = {n: p.detach().clone() for n, p in model.named_parameters()}
  opt.zero_grad()
  loss.backward()
  total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                         if p.grad is not None])
  assert total > 0.01  # so the clipping acts
  opt.step()
  for n, p in model.named_parameters():
    assert (p.grad is None) or not torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("model,mode", [("mask2former", "train"), ("fapn", "infer")])
def test_bench_runs_without_jax(tmp_path, model, mode):
  """torch_reference.py --model: a tiny bench, one JSON row with the model's name."""
  row = run_bench_cli(tmp_path, "--model", model, "--mode", mode, "--size", "64", "--batch",
                      "1", "--warmup", "0", "--runs", "1", "--threads", "1")
  assert row["model"] == model and row["mode"] == mode and row["threads"] == 1
  assert len(row["step_times_s"]) == 1 and row["peak_memory_bytes"] > 0
  if mode == "train":
    assert len(row["losses"]) == 1 and np.isfinite(row["losses"]).all() and row["losses"][0] > 0
  if model == "fapn":
    assert row["dcn_impl"] in ("torchvision", "im2col")
