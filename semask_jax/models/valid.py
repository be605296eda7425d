"""Valid-size primitives: one model program for a batch of images of different sizes.

The valid-size API (every head adopts it the same way):

* A model's `segment(images, valid_hw)` takes images [B, Hc, Wc, 3] padded bottom/right
  to a bucket canvas and `valid_hw` int32 [B, 2], each image's own (h, w) (traced: one
  program per canvas, not per size). For each image it returns what the model computes
  on images[b, :h, :w] alone, in the top-left corner of the canvas output; everything
  outside is don't-care. valid_hw=None is the plain forward (canvas = image).
* Below the input, each map carries the valid size of its grid ([B, 2] int32, e.g.
  ceil(h / 4) after the patch embedding). The invariant: the valid region holds the
  reference's numbers; outside it any finite values (garbage). An op that reads
  neighbours restores the reference's padding first (`mask` with the reference's fill:
  zeros for convolutions, window and merge padding; the qkv bias for Swin's padding
  after norm1), an op with statistics or attention over the map reduces over the valid
  region only (`group_norm`, key masks), and resizes read from and write to valid sizes
  (`resize`, `upsample`). Per-token ops (Linear, LayerNorm, eval BatchNorm) need nothing.
* Garbage must stay finite (a masked softmax weight 0 times an inf is a nan), so the
  canvas input is zeroed outside the valid size, and dummy batch rows get a valid size
  of at least one pixel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from semask_jax.models.resize import phase_taps


def ceil_div(hw: jax.Array, k: int) -> jax.Array:
  """[B, 2] int32 sizes of a map after a stride-k step that pads to a multiple of k."""
  return (hw + (k - 1)) // k


def round_up(hw: jax.Array, k: int) -> jax.Array:
  return ceil_div(hw, k) * k


def valid_mask(hw: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """[B, H, W, 1] bool: True inside each image's valid (h, w) of an H x W canvas."""
  rows = jnp.arange(shape[0])[None, :, None, None] < hw[:, 0, None, None, None]
  cols = jnp.arange(shape[1])[None, None, :, None] < hw[:, 1, None, None, None]
  return rows & cols


def mask(x: jax.Array, hw: jax.Array, fill: jax.Array | float = 0.0) -> jax.Array:
  """x [B, H, W, C] with `fill` (a scalar or a [C] vector) outside each valid size."""
  return jnp.where(valid_mask(hw, x.shape[1:3]), x, jnp.asarray(fill, x.dtype))


def pad_canvas(x: jax.Array, m: int) -> jax.Array:
  """Zero-pads the canvas bottom/right to multiples of m (the valid sizes do not change)."""
  _, h, w, _ = x.shape
  ph, pw = (-h) % m, (-w) % m
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return x


def roll(x: jax.Array, shift: int, extent: jax.Array) -> jax.Array:
  """jnp.roll(x[b, :P, :Q], (shift, shift), axis=(1, 2)) per image, with (P, Q) =
  extent[b] (the image's own padded map); positions beyond it keep their values."""
  _, h, w, _ = x.shape

  def axis_index(n: int, p: jax.Array) -> jax.Array:                   # [B, n]
    i = jnp.arange(n)[None]
    return jnp.where(i < p[:, None], (i - shift) % jnp.maximum(p[:, None], 1), i)

  x = jnp.take_along_axis(x, axis_index(h, extent[:, 0])[:, :, None, None], axis=1)
  return jnp.take_along_axis(x, axis_index(w, extent[:, 1])[:, None, :, None], axis=2)


def shift_mask(extent: jax.Array, canvas: tuple[int, int], m: int, s: int) -> jax.Array:
  """[B, nW, m*m, m*m] float32 additive mask of a shifted Swin block whose padded map is
  extent[b] = (Hp, Wp) (multiples of m) in a canvas of multiples of m: windows.shift_mask
  of each image's own (Hp, Wp) for its windows; the windows beyond are garbage."""
  hc, wc = canvas
  nh, nw = hc // m, wc // m

  def regions(n: int, p: jax.Array) -> jax.Array:                      # [B, n // m, m]
    pos = jnp.arange(n)[None]
    p = p[:, None]
    r = jnp.where(pos < p - m, 0, jnp.where(pos < p - s, 1, 2))
    return r.reshape(-1, n // m, m)

  b = extent.shape[0]
  rows = jnp.broadcast_to(regions(hc, extent[:, 0])[:, :, None, :, None],
                          (b, nh, nw, m, m)).reshape(b, nh * nw, m * m)  # [B, nW, N]
  cols = jnp.broadcast_to(regions(wc, extent[:, 1])[:, None, :, None, :],
                          (b, nh, nw, m, m)).reshape(b, nh * nw, m * m)
  differ = (rows[..., :, None] != rows[..., None, :]) | (cols[..., :, None] != cols[..., None, :])
  return jnp.where(differ, jnp.float32(-100.0), jnp.float32(0.0))


def key_mask(hw: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """[B, H*W] bool: the valid tokens of a canvas flattened row-major."""
  return valid_mask(hw, shape).reshape(hw.shape[0], shape[0] * shape[1])


# ------------------------------------------------------------------- resizes


def _taps(in_size: jax.Array, out_size: jax.Array, n_out: int, align_corners: bool
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per image source indices i0, i1 [B, n_out] and weight of i1 (torch bilinear, traced
  sizes [B]): the float32 numbers of resize._axis_taps / _axis_taps_align_corners."""
  in_f = in_size.astype(jnp.float32)[:, None]
  out_f = out_size.astype(jnp.float32)[:, None]
  dst = jnp.arange(n_out, dtype=jnp.float32)[None]
  if align_corners:
    scale = jnp.where(out_f > 1, (in_f - 1) / jnp.maximum(out_f - 1, 1), 0.0)
    src = scale * dst
  else:
    src = jnp.maximum((in_f / out_f) * (dst + 0.5) - 0.5, 0.0)
  last = in_size.astype(jnp.int32)[:, None] - 1
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
  i1 = jnp.minimum(i0 + 1, last)
  w1 = src - i0.astype(jnp.float32)
  if align_corners:
    w1 = jnp.clip(w1, 0.0, 1.0)
  return i0, i1, w1


def resize(x: jax.Array, in_hw: jax.Array, out_hw: jax.Array, out_shape: tuple[int, int],
           *, align_corners: bool = False) -> jax.Array:
  """Per image: x[b, :in_h, :in_w] resized bilinearly (torch, no antialiasing) to
  out_hw[b], in an out_shape canvas [B, Ho, Wo, C]. Rows first then columns, as
  resize.resize_bilinear. Identity where in == out."""
  dtype = x.dtype
  for axis, n_out in ((1, out_shape[0]), (2, out_shape[1])):
    a = axis - 1
    i0, i1, w1 = _taps(in_hw[:, a], out_hw[:, a], n_out, align_corners)
    shape = (x.shape[0], n_out, 1, 1) if axis == 1 else (x.shape[0], 1, n_out, 1)
    i0, i1 = i0.reshape(shape), i1.reshape(shape)
    w = w1.reshape(shape).astype(dtype)
    full = list(x.shape)
    full[axis] = n_out
    x0 = jnp.take_along_axis(x, jnp.broadcast_to(i0, tuple(full[:3]) + (1,)), axis=axis)
    x1 = jnp.take_along_axis(x, jnp.broadcast_to(i1, tuple(full[:3]) + (1,)), axis=axis)
    x = x0 * (1 - w) + x1 * w
  return x


def resize_nearest(x: jax.Array, in_hw: jax.Array, out_hw: jax.Array,
                   out_shape: tuple[int, int]) -> jax.Array:
  """Per image: torch's legacy F.interpolate(x[b, :in_h, :in_w], size=out_hw[b],
  mode='nearest') in an out_shape canvas [B, Ho, Wo, C]: source index min(floor(dst *
  float32(in / out)), in - 1) (dst >> 1 for an exact x2, identity for equal sizes)."""
  f32 = jnp.float32
  for axis, n_out in ((1, out_shape[0]), (2, out_shape[1])):
    a = axis - 1
    scale = in_hw[:, a].astype(f32) / out_hw[:, a].astype(f32)              # [B]
    src = jnp.floor(jnp.arange(n_out, dtype=f32)[None] * scale[:, None]).astype(jnp.int32)
    src = jnp.minimum(src, in_hw[:, a, None] - 1)                            # [B, n_out]
    shape = (x.shape[0], n_out, 1, 1) if axis == 1 else (x.shape[0], 1, n_out, 1)
    full = list(x.shape)
    full[axis] = n_out
    x = jnp.take_along_axis(x, jnp.broadcast_to(src.reshape(shape), tuple(full[:3]) + (1,)),
                            axis=axis)
  return x


@functools.lru_cache(maxsize=None)
def _phases(factor: int) -> tuple[tuple[int, float], ...]:
  """(offset of the first tap, weight of the second) per output phase of an exact x factor
  upsample (align_corners=False): the interior taps, as resize.phase_taps."""
  return phase_taps(8, factor)


def upsample(x: jax.Array, hw: jax.Array, factor: int) -> jax.Array:
  """resize_bilinear(x[b, :h, :w], factor * (h, w)) per image (factor a power of two),
  in a canvas factor times x's: the phase form of resize._upsample_axis with the far
  edge clamped at each image's last valid row / column instead of the canvas's."""
  for axis in (1, 2):
    n = x.shape[axis]
    last = hw[:, axis - 1]
    pos = jnp.arange(n)
    shape = [x.shape[0], 1, 1, 1]
    shape[axis] = n
    at_end = (pos[None] >= last[:, None] - 1).reshape(shape)            # [B, n] -> bcast
    first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                           jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    nxt = jnp.where(at_end, x, nxt)
    phases = []
    for off, w in _phases(factor):
      a, b = (prev, x) if off < 0 else (x, nxt)
      wb = jnp.asarray(w, x.dtype)
      phases.append(a * (1 - wb) + b * wb)
    y = jnp.stack(phases, axis=axis + 1)
    full = list(x.shape)
    full[axis] = n * factor
    x = y.reshape(full)
  return x


# ------------------------------------------------------------------- norms, positions


def group_norm(x: jax.Array, hw: jax.Array, num_groups: int, scale: jax.Array,
               bias: jax.Array, eps: float, dtype) -> jax.Array:
  """torch GroupNorm of each image's valid region of x [B, H, W, C]: statistics over the
  valid pixels only (mean, then the mean squared deviation, as layers.GroupNorm)."""
  b, h, w, c = x.shape
  g = num_groups
  x32 = x.astype(jnp.float32)
  valid = valid_mask(hw, (h, w))[..., None].astype(jnp.float32)        # [B, H, W, 1, 1]
  xg = x32.reshape(b, h, w, g, c // g)
  count = (hw[:, 0] * hw[:, 1]).astype(jnp.float32)[:, None, None, None, None] * (c // g)
  mean = (xg * valid).sum((1, 2, 4), keepdims=True) / count
  var = (jnp.square(xg - mean) * valid).sum((1, 2, 4), keepdims=True) / count
  y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
  return (y * scale + bias).astype(dtype)


def position_embedding_sine(hw: jax.Array, shape: tuple[int, int], num_pos_feats: int,
                            temperature: float = 10000.0) -> jax.Array:
  """position_encoding.position_embedding_sine of each image's valid (h, w), in an
  H x W canvas: [B, H, W, 2 * num_pos_feats] float32 (positions beyond: don't-care)."""
  f32 = jnp.float32
  scale, eps = f32(2 * np.pi), f32(1e-6)
  d = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = (np.float32(temperature) ** (np.float32(2) * (d // 2) / np.float32(num_pos_feats))
           ).astype(np.float32)

  def embed(n: int, size: jax.Array) -> jax.Array:                     # [B, n, F]
    v = jnp.arange(1, n + 1, dtype=f32)[None] / (size.astype(f32)[:, None] + eps) * scale
    p = v[..., None] / dim_t
    return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(
        v.shape + (num_pos_feats,))

  b = hw.shape[0]
  h, w = shape
  pos_y = jnp.broadcast_to(embed(h, hw[:, 0])[:, :, None], (b, h, w, num_pos_feats))
  pos_x = jnp.broadcast_to(embed(w, hw[:, 1])[:, None, :], (b, h, w, num_pos_feats))
  return jnp.concatenate([pos_y, pos_x], axis=-1)
