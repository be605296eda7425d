"""Shared helpers for tests that use the reference golden vectors."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx

GOLDEN_DIR = pathlib.Path(os.environ.get(
    "SEMASK_GOLDEN_DIR",
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden"))


def golden_files() -> list[pathlib.Path]:
  return sorted(GOLDEN_DIR.glob("*.npz"))


def load_recipe(directory: pathlib.Path):
  """The recipe.py that sits next to the vectors (it rebuilds their weights)."""
  spec = importlib.util.spec_from_file_location(f"recipe_{abs(hash(str(directory)))}",
                                                directory / "recipe.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@functools.lru_cache(maxsize=None)
def load_vector(path: pathlib.Path):
  """(arrays, meta, state_dict) of one golden file."""
  vec = dict(np.load(path))
  meta = json.loads(str(vec.pop("meta")))
  sd = load_recipe(path.parent).make_state_dict(meta["manifest"], meta["seed"])
  return vec, meta, sd


def jit_forward(model: nnx.Module, train: bool = False):
  """A jitted functional forward: fn(state, images) -> outputs."""
  graphdef, _ = nnx.split(model)

  @jax.jit
  def fwd(state, images):
    return nnx.merge(graphdef, state)(images, train=train)

  return fwd


M2F_GOLDEN_DIR = pathlib.Path(os.environ.get("SEMASK_M2F_GOLDEN_DIR", GOLDEN_DIR / "mask2former"))


def m2f_golden_files() -> list[pathlib.Path]:
  """The SeMask-Mask2Former vectors (SPEC section 10)."""
  return sorted(M2F_GOLDEN_DIR.glob("*.npz"))


def load_submodule(module: nnx.Module, sd: dict[str, np.ndarray], prefix: str) -> None:
  """Sets every Param / BatchStat of `module` from the torch state dict `sd`, whose keys
  for this module start with `prefix` (e.g. 'sem_seg_head.pixel_decoder.'); every
  model leaf must be found, with its torch shape, and no key under `prefix` may be
  left over."""
  from convert_weights import names

  flat = nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
  used = set()
  for path, var in flat:
    key = prefix + names.torch_key(path)
    assert key in sd, f"no {key} in the state dict"
    value = names.to_model_layout(path, sd[key])
    assert value.shape == var[...].shape, (key, value.shape, var[...].shape)
    var[...] = jax.numpy.asarray(value, var[...].dtype)
    used.add(key)
  left = sorted(k for k in sd if k.startswith(prefix) and k not in used)
  assert not left, f"state-dict keys under {prefix} not used: {left[:10]}"


# ---- Whole-model golden checks shared by test_golden_{mask2former,fapn,maskformer}.py ----

RTOL = 1e-4  # max |err| <= 1e-4 * max(1, max |ref|)
# Buffers of a released detectron2 checkpoint that the converters must skip.
RELEASED_BUFFERS = ("pixel_mean", "pixel_std", "criterion.empty_weight")


def check(name: str, got, ref) -> float:
  """Asserts max |got - ref| <= RTOL * max(1, max |ref|) (same shapes); returns the error."""
  got, ref = np.asarray(got, np.float32), np.asarray(ref)
  assert got.shape == ref.shape, (name, got.shape, ref.shape)
  err = float(np.abs(got - ref).max())
  bound = RTOL * max(1.0, float(np.abs(ref).max()))
  assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"
  return err


def nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def converted_forward(convert, sd: dict[str, np.ndarray], cfg, vec):
  """(conversion of `sd` by `convert(sd, cfg)`, its jitted eval forward on vec['image'])."""
  conv = convert(sd, cfg)
  _, state = nnx.split(conv.model)
  out = jit_forward(conv.model)(state, jax.numpy.asarray(vec["image"].transpose(0, 2, 3, 1)))
  return conv, jax.device_get(out)


def check_weights_and_backbone(sd: dict[str, np.ndarray], out, vec) -> dict[str, float]:
  """The recipe rebuilt the weights `sd` the vector was made with (sum of |w|, 1e-9
  relative), and the four Swin stages' features and semantic maps (NHWC outputs, NCHW
  reference) are within RTOL. Returns the errors by name (for the caller to add to)."""
  abs_sum = sum(float(np.abs(a).astype(np.float64).sum()) for a in sd.values())
  np.testing.assert_allclose(abs_sum, float(vec["weights_abs_sum"]), rtol=1e-9,
                             err_msg="the recipe's random stream changed, not the model")
  errs = {}
  for i in range(4):
    errs[f"feat{i}"] = check(f"feat{i}", nchw(out["feats"][i]), vec[f"feat{i}"])
    errs[f"sem{i}"] = check(f"sem{i}", nchw(out["sems"][i]), vec[f"sem{i}"])
  return errs


def check_multi_scale(errs: dict[str, float], out, vec) -> None:
  """A Mask2Former-style pixel decoder's mask features and multi-scale features."""
  errs["mask_features"] = check("mask_features", nchw(out["mask_features"]),
                                vec["mask_features"])
  for i, ms in enumerate(out["multi_scale_features"]):
    errs[f"multi_scale{i}"] = check(f"multi_scale{i}", nchw(ms), vec[f"multi_scale{i}"])


def check_layers(errs: dict[str, float], out, vec, keys) -> int:
  """Every decoder layer's `keys` (stacked [L, ...] in both); returns the layer count."""
  n_pred = vec["pred_logits"].shape[0]
  for layer in range(n_pred):
    for key in keys:
      errs[f"{key}{layer}"] = check(f"{key}[{layer}]", out[key][layer], vec[key][layer])
  return n_pred


def check_m2f_semantic(errs: dict[str, float], out, vec, stride: int = 1) -> None:
  """The semantic head's and the final semantic maps, every `stride`-th pixel."""
  errs["sem_pred"] = check("sem_pred", nchw(out["sem_pred"])[:, :, ::stride, ::stride],
                           vec["sem_pred"])
  errs["semseg"] = check("semseg", nchw(out["sem_seg"])[:, :, ::stride, ::stride], vec["semseg"])


def worst_error(errs: dict[str, float]) -> dict[str, str]:
  worst = max(errs, key=errs.get)
  return {"worst": worst, "max_abs_err": f"{errs[worst]:.2e}"}


def assert_m2f_criterion_reproduces_reference(path: pathlib.Path, vec, out) -> None:
  """The Mask2Former criterion on the forward outputs `out`, replaying the reference's
  stored draws: the reference's matches and losses (1e-4 relative)."""
  import functools

  from semask_jax.losses import mask2former as ml
  from tests.test_mask2former_loss import _case as loss_case

  _, cfg, _, label, draws, _ = loss_case(path)
  outputs = {k: jax.numpy.asarray(out[k]) for k in ("pred_logits", "pred_masks", "sem_pred")}
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


def write_released_pth(sd: dict[str, np.ndarray], num_classes: int,
                       path: pathlib.Path) -> pathlib.Path:
  """`sd` saved as a released checkpoint: {"model": state_dict with the buffers, ...}."""
  import torch
  full = {k: torch.from_numpy(v) for k, v in sd.items()}
  full["pixel_mean"] = torch.zeros(3, 1, 1)  # buffers the converter must skip
  full["pixel_std"] = torch.ones(3, 1, 1)
  full["criterion.empty_weight"] = torch.ones(num_classes + 1)
  torch.save({"model": full, "iteration": 0}, path)
  return path


def assert_cli_writes(head: str, pth: pathlib.Path, out: pathlib.Path, *extra: str) -> None:
  """The converter's command line on `pth` succeeds and writes its orbax directory `out`."""
  from convert_weights.__main__ import main as cli_main
  assert cli_main([head, "--pth", str(pth), "--out", str(out), *extra]) == 0
  assert (out / "conversion.json").is_file()


def assert_same_params(got: nnx.Module, want: nnx.Module) -> None:
  """Exactly the same parameters, leaf by leaf."""
  got = nnx.to_flat_state(nnx.state(got, nnx.Param))
  want = dict(nnx.to_flat_state(nnx.state(want, nnx.Param)))
  assert len(got) == len(want)
  for k, v in got:
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(want[k][...]), str(k))
