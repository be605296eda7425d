"""Window partitioning, padding, relative-position index and shift mask.

The index table and the shift mask's per-axis region ids are NumPy constants, computed
once per static shape (cached) at trace time; the mask itself is a few comparisons of
them in the graph (shift_mask).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def window_partition(x: jax.Array, m: int) -> jax.Array:
  """[B, H, W, C] (H, W multiples of m) -> [B, nW, m*m, C], windows row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // m, m, w // m, m, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // m) * (w // m), m * m, c)


def window_reverse(x: jax.Array, m: int, h: int, w: int) -> jax.Array:
  """Inverse of window_partition: [B, nW, m*m, C] -> [B, h, w, C]."""
  b, _, _, c = x.shape
  x = x.reshape(b, h // m, w // m, m, m, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def pad_to_multiple(x: jax.Array, m: int, fill: jax.Array | None = None) -> jax.Array:
  """Pads [B, H, W, C] bottom/right to multiples of m with zeros, or with the
  per-channel vector `fill` [C]."""
  _, h, w, _ = x.shape
  ph, pw = (-h) % m, (-w) % m
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    if fill is not None:
      valid = np.zeros((1, h + ph, w + pw, 1), bool)
      valid[:, :h, :w] = True
      x = jnp.where(valid, x, fill)
  return x


@functools.lru_cache(maxsize=None)
def relative_position_index(m: int) -> np.ndarray:
  """[m*m, m*m] index into the ((2m-1)^2, heads) bias table."""
  coords = np.stack(np.meshgrid(np.arange(m), np.arange(m), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (m - 1)
  return (rel[..., 0] * (2 * m - 1) + rel[..., 1]).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shift_regions(n: int, m: int, s: int) -> np.ndarray:
  """[n // m, m] int32: the region (0, 1 or 2) of each position of a padded axis of length
  n in a block shifted by s, by window and position in the window. The regions are those
  of the rolled map: the last window of an axis holds positions from both sides of the
  wrap, which must not attend to each other."""
  pos = np.arange(n)
  region = np.where(pos < n - m, 0, np.where(pos < n - s, 1, 2))
  return region.reshape(n // m, m).astype(np.int32)


def shift_mask(hp: int, wp: int, m: int, s: int) -> jax.Array:
  """[nW, m*m, m*m] float32 additive mask of a shifted block on the padded map: -100
  between two tokens of a window whose regions differ along either axis, else 0.

  Built in the graph from the two axes' region ids (hp + wp int32 constants), not held
  as an [nW, N, N] constant: XLA:TPU compiles constants into the program, and that one
  was 10 MB of code for each shifted block of SeMask-T's first stage at 512x512; the
  comparisons fuse into the scores' addition instead."""
  nh, nw = hp // m, wp // m
  rows = jnp.broadcast_to(jnp.asarray(shift_regions(hp, m, s))[:, None, :, None],
                          (nh, nw, m, m)).reshape(nh * nw, m * m)  # [nW, N]: token's row region
  cols = jnp.broadcast_to(jnp.asarray(shift_regions(wp, m, s))[None, :, None, :],
                          (nh, nw, m, m)).reshape(nh * nw, m * m)
  differ = (rows[:, :, None] != rows[:, None, :]) | (cols[:, :, None] != cols[:, None, :])
  return jnp.where(differ, jnp.float32(-100.0), jnp.float32(0.0))
