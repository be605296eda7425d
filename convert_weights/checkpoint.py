"""Converted weights on disk: an orbax checkpoint that training starts from.

Layout of a converted directory:
  OUT/state/            orbax StandardCheckpointer item {'params': ..., 'batch_stats': ...}
                        (nested dicts keyed by the model's module names)
  OUT/conversion.json   the model config, the source, and which keys came
                        from the checkpoint ('pretrained_keys')
`load_into_model` restores it into a freshly built model (config.init_from).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from convert_weights import names
from semask_jax.cli import ConfigError, PathNotFoundError

_META = "conversion.json"


def _nested(flat: dict[tuple, np.ndarray]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(str(p), {})
    node[str(path[-1])] = value
  return out


def _flatten(tree: dict[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def save_conversion(conversion, out_dir: str | os.PathLike) -> str:
  """Writes a Conversion (see core.py) to `out_dir`; returns the absolute path."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  state_dir = os.path.join(out_dir, "state")
  if os.path.exists(state_dir):
    raise FileExistsError(f"{state_dir} already exists; choose another --out or remove it")
  os.makedirs(out_dir, exist_ok=True)
  item = {}
  for name, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    flat = {tuple(str(p) for p in path): np.asarray(var[...])
            for path, var in nnx.to_flat_state(nnx.state(conversion.model, kind))}
    item[name] = _nested(flat)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(state_dir, item)
  report = conversion.report
  meta = {
      "source": report.source,
      "model_config": json.loads(conversion.config.to_json()),
      "pretrained_keys": report.loaded,
      "new_keys": report.new,
      "skipped_keys": report.skipped,
      "resized_keys": report.resized,
  }
  with open(os.path.join(out_dir, _META), "w") as f:
    json.dump(meta, f, indent=1)
  return out_dir


def read_conversion_meta(path: str | os.PathLike) -> dict[str, Any]:
  meta_path = os.path.join(os.fspath(path), _META)
  if not os.path.exists(meta_path):
    raise PathNotFoundError(f"{meta_path} not found: {path} is not a directory written by "
                            "`python -m convert_weights`")
  with open(meta_path) as f:
    return json.load(f)


def load_into_model(model: nnx.Module, path: str | os.PathLike, *,
                    only_pretrained: bool = True) -> dict[str, Any]:
  """Restores a converted directory into `model` in place (what config.init_from does).

  only_pretrained: load just the keys that came from the PyTorch checkpoint
  (for a Swin ImageNet conversion: the backbone), leaving the model's own
  initialisation elsewhere, so the class count of the run may differ from the
  conversion's. Every loaded key must exist in the model with the same shape.
  Returns the conversion metadata.
  """
  meta = read_conversion_meta(path)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(os.path.abspath(os.fspath(path)), "state"))
  flat = {}
  for part in ("params", "batch_stats"):
    for p, v in _flatten(restored.get(part, {})).items():
      flat[".".join(p)] = v
  wanted = set(meta["pretrained_keys"]) if only_pretrained else set(flat)
  leaves = {names.model_name(p): var for p, var in
            nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))}
  missing = sorted(k for k in wanted if k not in leaves)
  mismatched = sorted(f"{k}: checkpoint {tuple(np.shape(flat[k]))}, model {tuple(leaves[k][...].shape)}"
                      for k in wanted if k in leaves and np.shape(flat[k]) != leaves[k][...].shape)
  if missing or mismatched:
    # A config mistake (init_from names a conversion of another model): one `error:` line
    # at the command line, not a traceback.
    raise ConfigError(f"config.init_from={os.fspath(path)!r} does not fit the model: keys "
                      f"not in the model {missing[:20]}"
                      f"{' ...' if len(missing) > 20 else ''}; mis-shaped {mismatched[:20]}")
  for k in wanted:
    leaves[k][...] = jax.numpy.asarray(flat[k], leaves[k][...].dtype)
  return meta
