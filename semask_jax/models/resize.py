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


@functools.lru_cache(maxsize=None)
def phase_taps(in_size: int, factor: int) -> tuple[tuple[int, float], ...]:
  """For out = factor * in (factor a power of two): per output phase r, the offset
  (-1 or 0) of its first source tap and the weight of the second, read off the
  exact taps of an interior position (the same float32 numbers as _axis_taps;
  power-of-two factors make them exact, so every interior value is bit-identical
  to the gather form)."""
  i0, _, w1 = _axis_taps(in_size, in_size * factor)
  i = 1  # in_size >= 3: position 1 has both taps inside the map
  return tuple((int(i0[factor * i + r]) - i, float(w1[factor * i + r])) for r in range(factor))


def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
  """Exact integer up-sampling along `axis` with slices instead of gathers.

  Output position factor*i + r mixes x[i-1], x[i] or x[i], x[i+1] with fixed
  weights, edges clamped (at the edges both taps are the same pixel, as in
  torch). No gather, so the backward pass has no scatter, only pads and adds:
  on CPU a scatter-add is one slow serial loop.
  """
  n = x.shape[axis]
  first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
  last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
  prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
  nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
  return interleave_phases(prev, x, nxt, phase_taps(n, factor), axis)


def phase_rows(prev: jax.Array, x: jax.Array, nxt: jax.Array,
               taps: tuple[tuple[int, float], ...]) -> list[jax.Array]:
  """The up-sampled values of each phase r apart: output position factor*i + r blends
  the pair chosen by taps[r] = (offset, weight) of x and its neighbours shifted by
  -1 / +1 (prev[i] = x[i-1], nxt[i] = x[i+1], edges clamped)."""
  phases = []
  for off, w in taps:
    a, b = (prev, x) if off < 0 else (x, nxt)
    wb = jnp.asarray(w, x.dtype)
    phases.append(a * (1 - wb) + b * wb)
  return phases


def interleave_phases(prev: jax.Array, x: jax.Array, nxt: jax.Array,
                      taps: tuple[tuple[int, float], ...], axis: int) -> jax.Array:
  """Up-sampled values along `axis` from x and its neighbours shifted by -1 / +1:
  phase_rows interleaved (output position factor*i + r is phase r's i)."""
  y = jnp.stack(phase_rows(prev, x, nxt, taps), axis=axis + 1)
  shape = list(x.shape)
  shape[axis] = x.shape[axis] * len(taps)
  return y.reshape(shape)


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  factor = out_size // in_size
  if in_size > 2 and factor * in_size == out_size and factor & (factor - 1) == 0:
    return _upsample_axis(x, axis, factor)
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


@functools.lru_cache(maxsize=None)
def _axis_taps_align_corners(in_size: int, out_size: int
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """As _axis_taps for align_corners=True: src = dst * (in - 1) / (out - 1) in float32."""
  scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
  src = np.float32(scale) * np.arange(out_size, dtype=np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(src - i0, 0, 1).astype(np.float32)
  return i0, i1, w1


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes [B, H, W, C] to [B, size[0], size[1], C] like torch bilinear, align_corners=True
  (corner pixels map onto corner pixels; no antialiasing when shrinking)."""
  for axis, out_size in ((1, int(size[0])), (2, int(size[1]))):
    in_size = x.shape[axis]
    if in_size == out_size:
      continue
    i0, i1, w1 = _axis_taps_align_corners(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w = jnp.asarray(w1.reshape(shape), x.dtype)
    x = jnp.take(x, i0, axis=axis) * (1 - w) + jnp.take(x, i1, axis=axis) * w
  return x


@functools.lru_cache(maxsize=None)
def nearest_index(in_size: int, out_size: int) -> np.ndarray:
  """torch's legacy 'nearest' source index (F.interpolate(size=, mode='nearest')):
  min(floor(dst * (in / out)), in - 1), the scale a float32 (no half-pixel offset:
  2 -> 3 reads 0, 0, 1)."""
  if out_size == in_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int], axes: tuple[int, int] = (1, 2)
                   ) -> jax.Array:
  """F.interpolate(x, size, mode='nearest') of the two spatial `axes` of x; a repeat where
  the index is one (no gather, so no scatter in the backward pass)."""
  for axis, out_size in zip(axes, (int(size[0]), int(size[1]))):
    in_size = x.shape[axis]
    if in_size == out_size:
      continue
    idx = nearest_index(in_size, out_size)
    factor = out_size // in_size
    if factor * in_size == out_size and np.array_equal(idx, np.arange(out_size) // factor):
      x = jnp.repeat(x, factor, axis=axis)
    else:
      x = jnp.take(x, jnp.asarray(idx, jnp.int32), axis=axis)
  return x
