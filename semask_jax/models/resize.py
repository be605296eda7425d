"""Bilinear resize with the exact numbers of torch F.interpolate(align_corners=False).

jax.image.resize antialiases when it shrinks; the reference does not, and the
FPN head shrinks maps by one pixel at odd sizes (e.g. 13 -> 26 -> 25). So the
interpolation is spelled out: per axis, two source indices and two weights,
computed in NumPy when the (static) shapes are known.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _axis_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices i0, i1 and weight of i1 for each output position."""
  scale = np.float32(in_size / out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0).astype(np.float32)
  return i0, i1, w1


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  i0, i1, w1 = _axis_taps(in_size, out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w1 = jnp.asarray(w1.reshape(shape), x.dtype)
  a = jnp.take(x, i0, axis=axis)
  b = jnp.take(x, i1, axis=axis)
  return a * (1 - w1) + b * w1


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes [B, H, W, C] to [B, size[0], size[1], C] like torch bilinear, align_corners=False."""
  x = _resize_axis(x, 1, int(size[0]))
  return _resize_axis(x, 2, int(size[1]))


def upsample2x(x: jax.Array) -> jax.Array:
  """mmseg Upsample(scale_factor=2, bilinear): a resize to exactly twice the size."""
  return resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
