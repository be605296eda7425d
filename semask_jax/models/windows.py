"""Window partitioning, padding, relative-position index and shift mask.

The index table and the masks are NumPy constants, computed once per static
shape (cached) at trace time, never inside the compiled step.
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
def shift_mask(hp: int, wp: int, m: int, s: int) -> np.ndarray:
  """[nW, m*m, m*m] additive mask (0 or -100) of a shifted block on the padded map."""
  img = np.zeros((hp, wp), np.int32)
  cnt = 0
  for hs in (slice(0, -m), slice(-m, -s), slice(-s, None)):
    for ws in (slice(0, -m), slice(-m, -s), slice(-s, None)):
      img[hs, ws] = cnt
      cnt += 1
  win = img.reshape(hp // m, m, wp // m, m).transpose(0, 2, 1, 3).reshape(-1, m * m)
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)
