"""Modulated deformable convolution (DCNv2), FaPN's FeatureAlign op (SPEC section 12).

For output pixel (y, x), kernel tap (i, j) and deformable group g the input is read at
  row = y * stride - pad + i * dilation + dy,   col = x * stride - pad + j * dilation + dx
(pixel units, no half-pixel shift) by bilinear interpolation with zero padding (0 when
row <= -1, col <= -1, row >= H or col >= W; a corner outside the map counts 0), times
the tap's mask. Output = bias + sum over channels and taps of weight * mask * sample.
This is DCNv2's im2col (dcn_v2_im2col_cpu.cpp) and torchvision.ops.deform_conv2d.

Layouts follow the reference: offset channel k = group k // (2 K), tap (k mod 2 K) // 2
(tap = row * kw + col), dy for even k and dx for odd k; mask channel k = group k // K,
tap k mod K; input channel c belongs to group c // (C / dg). Maps are NHWC here, so
the channels are the last axis.

The op is written for XLA: a lax.scan over the kernel taps, each reading all groups by
gathers of the bilinear corners from the input viewed as [B, H * W * dg, C / dg] (index =
pixel * dg + group: no transpose), the four corners blended with the mask folded into
their weights, then one matmul of the tap's columns against its slice of the kernel,
added to the output (im2col one tap at a time: the columns of all taps at once were
K = 9 x larger, 1.2 GB for SeMask-T FaPN's res2 at 512x512, batch 2, with their gradient
as much again). No loop over pixels, no host callback; it runs under jit, vmap and grad
on every backend. The backward pass recomputes the samples tap by tap rather than
keeping them (see _deform_conv_remat). Everything inside is float32, as the reference
casts to float32 before its op.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semask_jax.models import layers
from semask_jax.models import valid


def deform_conv2d(x: jax.Array, offset: jax.Array, mask: jax.Array, kernel: jax.Array,
                  bias: jax.Array | None = None, *, stride: int = 1, padding: int = 0,
                  dilation: int = 1) -> jax.Array:
  """DCNv2 in NHWC: x [B, H, W, C], offset [B, Ho, Wo, 2 dg K], mask [B, Ho, Wo, dg K]
  (already through the sigmoid), kernel [kh, kw, C, O] (HWIO), bias [O] -> [B, Ho, Wo, O]
  float32. The number of deformable groups dg is read off the mask's channels."""
  x = x.astype(jnp.float32)
  offset = offset.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  kernel = kernel.astype(jnp.float32)
  _check_shapes(x.shape, offset.shape, mask.shape, kernel.shape, stride, padding, dilation)
  y = _deform_conv_remat(x, offset, mask, kernel, stride, padding, dilation)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
  return (size + 2 * padding - (dilation * (k - 1) + 1)) // stride + 1


def _check_shapes(x_shape, offset_shape, mask_shape, kernel_shape, stride, padding,
                  dilation) -> None:
  _, h, w, c = x_shape
  kh, kw, c_in, _ = kernel_shape
  taps = kh * kw
  if c_in != c:
    raise ValueError(f"deform_conv2d: kernel expects {c_in} input channels, input has {c}")
  dg = mask_shape[-1] // taps
  if mask_shape[-1] != dg * taps or offset_shape[-1] != 2 * dg * taps or c % dg:
    raise ValueError(f"deform_conv2d: offset {offset_shape} / mask {mask_shape} do not fit "
                     f"{kh}x{kw} taps and {c} channels")
  ho = _out_size(h, kh, stride, padding, dilation)
  wo = _out_size(w, kw, stride, padding, dilation)
  if tuple(offset_shape[1:3]) != (ho, wo) or tuple(mask_shape[1:3]) != (ho, wo):
    raise ValueError(f"deform_conv2d: offset/mask maps {offset_shape[1:3]}, {mask_shape[1:3]}; "
                     f"the output is {ho}x{wo}")


def _tap_corners(b: int, h: int, w: int, dg: int, rows: jax.Array, cols: jax.Array,
                 mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The four bilinear corners nw, ne, sw, se of one tap's sampling points rows, cols
  [B, Ho, Wo, dg] (pixel units) in the input viewed as [B, H * W * dg, C / dg] (row =
  pixel * dg + group): rows of that view [B, N, 4] and weights [B, N, 4] (bilinear
  weight x mask; 0 outside the map), N = Ho Wo dg."""
  valid = (rows > -1) & (cols > -1) & (rows < h) & (cols < w)
  r0 = jnp.floor(rows)
  c0 = jnp.floor(cols)
  lr, lc = rows - r0, cols - c0                    # weights of the +1 corners
  hr, hc = 1.0 - lr, 1.0 - lc
  # Clip far-away points before the integer cast (they are invalid anyway).
  r0i = jnp.clip(r0, -1, h).astype(jnp.int32)
  c0i = jnp.clip(c0, -1, w).astype(jnp.int32)
  m = jnp.where(valid, mask, 0.0)
  group = jnp.arange(dg, dtype=jnp.int32)
  index, weights = [], []
  # The reference's order: w1 v1 + w2 v2 + w3 v3 + w4 v4 (nw, ne, sw, se), then * mask.
  for dr, dc, wgt in ((0, 0, hr * hc), (0, 1, hr * lc), (1, 0, lr * hc), (1, 1, lr * lc)):
    ri, ci = r0i + dr, c0i + dc
    inside = (ri >= 0) & (ri < h) & (ci >= 0) & (ci < w)
    index.append((jnp.clip(ri, 0, h - 1) * w + jnp.clip(ci, 0, w - 1)) * dg + group)
    weights.append(jnp.where(inside, wgt * m, 0.0))
  n = rows.size // b
  return jnp.stack(index, -1).reshape(b, n, 4), jnp.stack(weights, -1).reshape(b, n, 4)


def _one_tap(x: jax.Array, offset: jax.Array, mask: jax.Array, kernel: jax.Array,
             tap_i: jax.Array, tap_j: jax.Array, stride: int, padding: int, dilation: int,
             *, one_gather: bool) -> jax.Array:
  """One kernel tap (i, j) of deform_conv2d: x [B, H, W, C], offset [B, Ho, Wo, dg, 2]
  (dy, dx), mask [B, Ho, Wo, dg], kernel [C, O] -> [B, Ho Wo, O]: its im2col columns
  (the samples of every group) times the tap's slice of the kernel. Two forms of the
  same numbers (up to float32 rounding): one_gather=False reads each corner by its own
  gather and blends them elementwise, the fastest forward on XLA:CPU; one_gather=True
  reads the four corners by one gather and blends them by a batched dot, whose gradient
  (offsets and mask through the corner weights) is ~4x faster on XLA:CPU."""
  b, h, w, c = x.shape
  _, ho, wo, dg, _ = offset.shape
  cg = c // dg
  base_r = jnp.arange(ho, dtype=jnp.float32) * stride - padding + tap_i * dilation
  base_c = jnp.arange(wo, dtype=jnp.float32) * stride - padding + tap_j * dilation
  rows = base_r[None, :, None, None] + offset[..., 0]                     # [B, Ho, Wo, dg]
  cols = base_c[None, None, :, None] + offset[..., 1]
  index, weights = _tap_corners(b, h, w, dg, rows, cols, mask)           # [B, N, 4]
  flat = x.reshape(b, h * w * dg, cg)
  n = index.shape[1]
  if one_gather:
    samples = jnp.take_along_axis(flat, index.reshape(b, n * 4, 1), axis=1,
                                  mode="promise_in_bounds").reshape(b, n, 4, cg)
    columns = jnp.einsum("bnqc,bnq->bnc", samples, weights,
                         precision=jax.lax.Precision.HIGHEST)              # [B, N, Cg]
  else:
    columns = None
    for q in range(4):
      sample = jnp.take_along_axis(flat, index[:, :, q:q + 1], axis=1,
                                   mode="promise_in_bounds")               # [B, N, Cg]
      term = sample * weights[:, :, q:q + 1]
      columns = term if columns is None else columns + term
  columns = columns.reshape(b, ho * wo, c)        # channel = group * Cg + channel of group
  return jnp.einsum("bpc,co->bpo", columns, kernel, precision=jax.lax.Precision.HIGHEST)


def _per_tap(x: jax.Array, offset: jax.Array, mask: jax.Array, kernel: jax.Array
             ) -> tuple[tuple[int, int, int, int, int], tuple[jax.Array, ...]]:
  """((B, Ho, Wo, dg, K), the scan's per-tap inputs: tap rows, tap columns, offsets
  [K, B, Ho, Wo, dg, 2], masks [K, B, Ho, Wo, dg], kernel slices [K, C, O])."""
  b = x.shape[0]
  kh, kw, c, c_out = kernel.shape
  taps = kh * kw
  dg = mask.shape[-1] // taps
  _, ho, wo, _ = offset.shape
  tap_i, tap_j = np.divmod(np.arange(taps), kw)
  off = jnp.moveaxis(offset.reshape(b, ho, wo, dg, taps, 2), 4, 0)
  msk = jnp.moveaxis(mask.reshape(b, ho, wo, dg, taps), 4, 0)
  xs = (jnp.asarray(tap_i, jnp.float32), jnp.asarray(tap_j, jnp.float32), off, msk,
        kernel.reshape(taps, c, c_out))
  return (b, ho, wo, dg, taps), xs


def _deform_conv(x: jax.Array, offset: jax.Array, mask: jax.Array, kernel: jax.Array,
                 stride: int, padding: int, dilation: int) -> jax.Array:
  """deform_conv2d without bias, float32 arguments: a scan over the kernel taps, each one
  gather per bilinear corner and one matmul into the output (the im2col of one tap at a
  time: [B, Ho Wo, C] live, not the K x larger columns of all taps)."""
  (b, ho, wo, _, _), xs = _per_tap(x, offset, mask, kernel)

  def tap(y, t):
    ti, tj, off, m, k = t
    return y + _one_tap(x, off, m, k, ti, tj, stride, padding, dilation,
                        one_gather=False), None

  y, _ = jax.lax.scan(tap, jnp.zeros((b, ho * wo, kernel.shape[-1]), jnp.float32), xs)
  return y.reshape(b, ho, wo, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _deform_conv_remat(x: jax.Array, offset: jax.Array, mask: jax.Array, kernel: jax.Array,
                       stride: int, padding: int, dilation: int) -> jax.Array:
  """_deform_conv whose backward pass gathers the corner samples again, one tap at a time,
  instead of keeping them ([B, Ho Wo dg K, 4, C / dg] float32: 36x the input), as the
  pixel decoder's deformable attention; the recomputation is the one_gather form, whose
  gradient is fast."""
  return _deform_conv(x, offset, mask, kernel, stride, padding, dilation)


def _deform_fwd(x, offset, mask, kernel, stride, padding, dilation):
  return _deform_conv(x, offset, mask, kernel, stride, padding, dilation), (x, offset, mask,
                                                                            kernel)


def _deform_bwd(stride, padding, dilation, res, ct):
  x, offset, mask, kernel = res
  x = layers.after(x, ct)  # recompute once the cotangent exists, not during the forward
  x, offset, mask, kernel = jax.lax.optimization_barrier((x, offset, mask, kernel))
  (b, ho, wo, dg, taps), xs = _per_tap(x, offset, mask, kernel)
  ct = ct.reshape(b, ho * wo, -1)

  def tap(gx, t):  # y = sum over taps: each tap's vjp of the same cotangent
    ti, tj, off, m, k = t
    _, vjp = jax.vjp(lambda *a: _one_tap(*a, ti, tj, stride, padding, dilation,
                                         one_gather=True), x, off, m, k)
    dx, doff, dm, dk = vjp(ct)
    return gx + dx, (doff, dm, dk)

  gx, (goff, gm, gk) = jax.lax.scan(tap, jnp.zeros_like(x), xs)
  goff = jnp.moveaxis(goff, 0, 4).reshape(offset.shape)                  # [B, Ho, Wo, 2 dg K]
  gm = jnp.moveaxis(gm, 0, 4).reshape(mask.shape)
  return gx, goff, gm, gk.reshape(kernel.shape)


_deform_conv_remat.defvjp(_deform_fwd, _deform_bwd)


class DCN(nnx.Module):
  """DCNv2's `DCN` with extra_offset_mask (FaPN's `dcpack_L2`): a plain conv
  `conv_offset_mask` on a separate offset feature gives 3 dg K channels, split in three:
  offset = cat(o1, o2) (the first 2 dg K channels unchanged), mask = sigmoid(last dg K).
  Leaves `kernel`, `bias`, `conv_offset_mask.{kernel,bias}` (torch `weight`, `bias`, ...).
  The reference's init: conv_offset_mask zero (offsets 0, mask 0.5), kernel
  U(+-1/sqrt(C kh kw)), bias 0."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, stride: int = 1,
               padding: int = 1, dilation: int = 1, deformable_groups: int = 8,
               offset_in_ch: int | None = None, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if in_ch % deformable_groups:
      raise ValueError(f"DCN: {in_ch} channels not divisible into {deformable_groups} groups")
    k = kernel_size
    self.kernel = nnx.Param(layers.uniform_init(rngs, (k, k, in_ch, out_ch),
                                                1.0 / math.sqrt(in_ch * k * k)))
    self.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
    n_out = 3 * deformable_groups * k * k
    self.conv_offset_mask = layers.Conv2d(offset_in_ch or in_ch, n_out, k, stride=stride,
                                          padding=padding, dtype=dtype, rngs=rngs)
    self.conv_offset_mask.kernel = nnx.Param(jnp.zeros_like(self.conv_offset_mask.kernel[...]))
    self.conv_offset_mask.bias = nnx.Param(jnp.zeros((n_out,), jnp.float32))
    self.stride, self.padding, self.dilation = stride, padding, dilation
    self.deformable_groups = deformable_groups

  def __call__(self, x: jax.Array, offset_feat: jax.Array, aux: dict | None = None,
               valid_hw: jax.Array | None = None) -> jax.Array:
    """x [B, H, W, C] (the map sampled), offset_feat [B, H, W, C'] -> [B, Ho, Wo, O] float32.
    aux, if given, receives 'offset_mask_raw' (conv_offset_mask's output).
    valid_hw: [B, 2] each image's map in the canvases x and offset_feat (stride 1,
    models/valid.py): the offset conv pads with zeros beyond it, and x is zeroed there,
    so a tap past the image's edge reads 0 as on the image alone (its bilinear corners
    beyond the edge are 0 in both)."""
    if valid_hw is not None:
      if self.stride != 1:
        raise ValueError("DCN: the valid-size forward needs stride 1")
      x = valid.mask(x, valid_hw)
    raw = self.conv_offset_mask(offset_feat, valid_hw).astype(jnp.float32)  # [B, Ho, Wo, 3 dg K]
    if aux is not None:
      aux["offset_mask_raw"] = raw
    n = raw.shape[-1] // 3
    offset, mask = raw[..., :2 * n], jax.nn.sigmoid(raw[..., 2 * n:])
    return deform_conv2d(x, offset, mask, layers.weight(self.kernel[...], jnp.float32),
                         self.bias[...], stride=self.stride, padding=self.padding,
                         dilation=self.dilation)
