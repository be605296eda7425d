"""The functional split of an NNX model: jitted code takes pure dicts, not modules.

Training, evaluation and prediction split a model once into (graphdef, params,
batch_stats, rest) and merge it back inside each trace.
"""
from __future__ import annotations

from typing import Any

from flax import nnx


def split_model(model: nnx.Module) -> tuple[Any, dict, dict, Any]:
  """(graphdef, params, batch_stats, rest) with params/batch_stats as pure dicts."""
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats), rest


def merge_model(graphdef: Any, params: dict, batch_stats: dict, rest: Any) -> nnx.Module:
  """The module of a split (a copy: the trace may not mutate the caller's arrays)."""
  return nnx.merge(graphdef, params, batch_stats, rest, copy=True)
