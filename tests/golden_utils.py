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
