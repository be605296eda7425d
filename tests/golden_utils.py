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
