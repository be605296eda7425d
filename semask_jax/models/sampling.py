"""Bilinear point sampling with the numbers of torch F.grid_sample.

Mask2Former reads maps at continuous points in two places: the deformable
attention of the pixel decoder and the point-sampled mask losses. Both call
F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False) on
grid = 2 * points - 1. Here it is a gather of the four corner taps from the
flattened map (one XLA gather, whose backward is one scatter-add), with taps
outside the map masked to weight 0: no host callback, any backend, jit-able.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _unnormalize(g: jax.Array, size: int) -> jax.Array:
  """(g + 1) * (size / 2) - 0.5 with one rounding, as torch's CPU kernel computes it
  (its compiler contracts the product and the difference into an FMA; a separately
  rounded product moves x by an ulp, i.e. the output by ~1e-6 where the map varies).

  No FMA primitive in XLA, so the product is split exactly: a = hi + lo with hi
  the top 12 significand bits; hi * s - 0.5 and lo * s are exact in float32
  (s = size / 2 has <= 12 significant bits for size <= 4096), so their sum is
  rounded once. Exact for |g + 1| >= 2**-12, i.e. all but points within
  2**-13 of the map's left/top outer edge. The gradient is the plain
  d/dg = size / 2 (hi is a constant piece of a).
  """
  a = g + 1.0
  hi_bits = jax.lax.bitcast_convert_type(jax.lax.stop_gradient(a), jnp.uint32)
  hi = jax.lax.bitcast_convert_type(hi_bits & jnp.uint32(0xFFFFF000), jnp.float32)
  lo = a - hi
  s = size / 2
  return (hi * s - 0.5) + lo * s


def corner_taps(points: jax.Array, height: int | jax.Array, width: int | jax.Array,
                row_stride: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Flat indices [..., 4] into an H*W map and their weights [..., 4] (float32, 0 for
  taps outside the map) for points [..., 2] given as normalised (x, y), corners in
  the order nw, ne, sw, se.

  The arithmetic is that of torch's CPU kernel (the reference's numbers):
  grid = 2 p - 1, x = (g + 1) * (W / 2) - 0.5, weights from the fractional
  parts w = x - floor(x), e = 1 - w (and n, s along y).

  height / width may be traced arrays broadcasting against points[..., 0] (each image's
  valid map in a canvas, models/valid.py); row_stride is then the canvas width.
  """
  grid = 2.0 * points.astype(jnp.float32) - 1.0
  ix = _unnormalize(grid[..., 0], width)                               # [...]
  iy = _unnormalize(grid[..., 1], height)
  x0 = jnp.floor(ix)
  y0 = jnp.floor(iy)
  fw = ix - x0
  fe = 1.0 - fw
  fn = iy - y0
  fs = 1.0 - fn
  xs = jnp.stack([x0, x0 + 1.0, x0, x0 + 1.0], axis=-1)               # [..., 4]
  ys = jnp.stack([y0, y0, y0 + 1.0, y0 + 1.0], axis=-1)
  weights = jnp.stack([fs * fe, fs * fw, fn * fe, fn * fw], axis=-1)
  if jnp.ndim(width) or jnp.ndim(height):  # traced sizes: broadcast over the 4 corners
    height, width = jnp.asarray(height)[..., None], jnp.asarray(width)[..., None]
  inside = (xs >= 0) & (xs <= width - 1) & (ys >= 0) & (ys <= height - 1)
  # Clip before the integer cast (far-away points must not overflow); masked taps
  # read pixel 0 with weight 0.
  xi = jnp.clip(xs, 0, width - 1).astype(jnp.int32)
  yi = jnp.clip(ys, 0, height - 1).astype(jnp.int32)
  index = jnp.where(inside, yi * (width if row_stride is None else row_stride) + xi, 0)
  return index, jnp.where(inside, weights, 0.0)


def bilinear_sample(value: jax.Array, points: jax.Array) -> jax.Array:
  """Samples value [B, H, W, C] at points [B, P, 2] (normalised (x, y), 0..1 spans the
  map's outer pixel edges) -> [B, P, C] in value's dtype.

  Equal to torch F.grid_sample(value_nchw, 2 * points[:, :, None] - 1, 'bilinear',
  padding_mode='zeros', align_corners=False)[..., 0] transposed to [B, P, C];
  corner taps outside the map contribute 0. Coordinates and weights are float32;
  the weighted sum of the taps is float32 too.
  """
  b, h, w, c = value.shape
  p = points.shape[1]
  index, weights = corner_taps(points, h, w)                          # [B, P, 4]
  flat = value.reshape(b, h * w, c)
  taps = jnp.take_along_axis(flat, index.reshape(b, p * 4, 1), axis=1,
                             mode="promise_in_bounds")                 # [B, 4P, C]
  taps = taps.reshape(b, p, 4, c).astype(jnp.float32)
  wts = weights[..., None]                                             # [B, P, 4, 1]
  # Summed in torch's order: ((nw + ne) + sw) + se.
  out = taps[:, :, 0] * wts[:, :, 0]
  for k in range(1, 4):
    out = out + taps[:, :, k] * wts[:, :, k]                           # [B, P, C]
  return out.astype(value.dtype)
