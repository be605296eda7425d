"""The name map between this project's parameters and the PyTorch checkpoints.

A model leaf path such as ('backbone', 'layers', 0, 'blocks', 1, 'attn', 'qkv',
'kernel') is the torch key 'backbone.layers.0.blocks.1.attn.qkv.weight'
transposed: module names are the reference's, only the leaf names and the
kernel layouts differ.
"""
from __future__ import annotations

import numpy as np

# model leaf name -> torch leaf name
LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "gamma": "gamma",
    "relative_position_bias_table": "relative_position_bias_table",
    # Mask2Former head: nn.Embedding weights, torch nn.MultiheadAttention's
    # packed projection, the pixel decoder's bare level_embed parameter.
    "embedding": "weight",
    "in_proj_weight": "in_proj_weight",
    "in_proj_bias": "in_proj_bias",
    "level_embed": "level_embed",
}

# Leaves stored [in, out] here and (out, in) in torch when 2-D.
_TRANSPOSED_LEAVES = ("kernel", "in_proj_weight")


def torch_key(path: tuple) -> str:
  """Model state path -> torch state-dict key."""
  *mods, leaf = (str(p) for p in path)
  if leaf not in LEAF_TO_TORCH:
    raise KeyError(f"no torch name for model leaf {'.'.join(mods + [leaf])}")
  return ".".join(mods + [LEAF_TO_TORCH[leaf]])


def model_name(path: tuple) -> str:
  """Model state path as a dotted name (as used by the no-decay rule)."""
  return ".".join(str(p) for p in path)


def to_model_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  """Torch tensor -> this project's layout for the leaf at `path`."""
  if path[-1] in _TRANSPOSED_LEAVES:
    if value.ndim == 2:  # Linear (out, in) -> (in, out)
      return value.T
    if value.ndim == 4:  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
      return value.transpose(2, 3, 1, 0)
  return value


def torch_shape(path: tuple, shape: tuple) -> tuple:
  """The torch shape of a model leaf of shape `shape`."""
  if path[-1] in _TRANSPOSED_LEAVES:
    if len(shape) == 2:
      return (shape[1], shape[0])
    if len(shape) == 4:
      return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  """Inverse of to_model_layout."""
  if path[-1] in _TRANSPOSED_LEAVES:
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
  return value
