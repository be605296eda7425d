"""Bicubic resize of relative-position bias tables, as torch's F.interpolate.

torch bicubic (align_corners=False): source x = (dst + 0.5) * in/out - 0.5
(no clamping), cubic convolution with A = -0.75 on the four neighbours
floor(x) - 1 .. floor(x) + 2, indices clamped to the border.
"""
from __future__ import annotations

import numpy as np

_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Weights of the 4 taps for fractional offsets t in [0, 1): [..., 4]."""
  def near(x):  # |x| <= 1
    return ((_A + 2) * x - (_A + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] interpolation matrix for one axis."""
  scale = in_size / out_size
  src = (np.arange(out_size) + 0.5) * scale - 0.5
  i0 = np.floor(src).astype(np.int64)
  w = _cubic_weights(src - i0)
  mat = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    idx = np.clip(i0 - 1 + tap, 0, in_size - 1)
    np.add.at(mat, (np.arange(out_size), idx), w[:, tap])
  return mat


def resize_bias_table(table: np.ndarray, new_window: int) -> np.ndarray:
  """[(2M'-1)^2, heads] -> [(2M-1)^2, heads] bicubically, per head."""
  n_old = int(round(np.sqrt(table.shape[0])))
  if n_old * n_old != table.shape[0]:
    raise ValueError(f"bias table of {table.shape[0]} rows is not a square grid")
  n_new = 2 * new_window - 1
  heads = table.shape[1]
  grid = table.astype(np.float64).T.reshape(heads, n_old, n_old)
  rows, cols = _resize_matrix(n_old, n_new), _resize_matrix(n_old, n_new)
  out = np.einsum("oi,hij,pj->hop", rows, grid, cols)
  return out.reshape(heads, n_new * n_new).T.astype(table.dtype)
