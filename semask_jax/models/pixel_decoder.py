"""Mask2Former's pixel decoder (`MSDeformAttnPixelDecoder`).

res3..res5 go through a Deformable-DETR encoder (multi-scale deformable
self-attention: every pixel of every level reads a few bilinearly sampled
points of each level around its own position), then one FPN step adds res2.
Module and leaf names follow the torch checkpoint
(`sem_seg_head.pixel_decoder.*`), so conversion is a name map. Maps are NHWC;
the encoder's tokens are the levels flattened row-major and concatenated,
coarsest first, as in the reference.
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
from semask_jax.models.position_encoding import position_embedding_sine
from semask_jax.models.resize import resize_bilinear
from semask_jax.models.sampling import corner_taps

NUM_LEVELS = 3  # res5, res4, res3 go through the deformable encoder.
GROUPS = 32     # the reference's GroupNorm(32, conv_dim).



def encoder_ffn_biases(d_model: int, d_ffn: int, *, rngs: nnx.Rngs
                       ) -> tuple[jax.Array, jax.Array]:
  """The encoder FFN's (linear1, linear2) biases: torch's default, drawn ONCE. The
  reference deep-copies one template layer per encoder layer and its xavier sweep skips
  1-D parameters, so all layers start with bit-identical FFN biases (SPEC 13)."""
  return (layers.pytorch_default_uniform(rngs, (d_ffn,), d_model, d_ffn),
          layers.pytorch_default_uniform(rngs, (d_model,), d_ffn, d_model))


def deform_attn_core(value: jax.Array, spatial_shapes: tuple[tuple[int, int], ...],
                     locations: jax.Array, weights: jax.Array) -> jax.Array:
  """Multi-scale deformable attention without projections (ms_deform_attn_core_pytorch).

  value [B, S, M, D]: M heads of the levels flattened row-major and concatenated
  (S = sum H_l W_l); locations [B, Q, M, L, P, 2] normalised (x, y) per level;
  weights [B, Q, M, L, P] (softmaxed) -> [B, Q, M * D].

  Each sample is grid_sample's bilinear read (zero padding, align_corners=False).
  All L * P * 4 corner taps of a (query, head) are read by one gather from
  value viewed as [B, S * M, D] (index = token * M + head: no transpose of the
  value), with the attention weight folded into the bilinear weights, and
  summed in float32. Its backward is one scatter-add into [B, S * M, D].
  """
  b, s, m, d = value.shape
  _, q, _, n_levels, n_points, _ = locations.shape
  index, tap_weights = [], []
  start = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    idx, wts = corner_taps(locations[:, :, :, lvl], h, w)               # [B, Q, M, P, 4]
    index.append(idx + start)
    tap_weights.append(wts * weights[:, :, :, lvl, :, None].astype(jnp.float32))
    start += h * w
  if start != s:
    raise ValueError(f"value has {s} tokens, spatial shapes {spatial_shapes} make {start}")
  k = n_levels * n_points * 4
  heads = jnp.arange(m, dtype=jnp.int32)[:, None]                        # [M, 1]
  index = jnp.stack(index, axis=3).reshape(b, q, m, k) * m + heads       # [B, Q, M, K]
  tap_weights = jnp.stack(tap_weights, axis=3).reshape(b, q, m, k)       # [B, Q, M, K]
  taps = jnp.take_along_axis(value.reshape(b, s * m, d), index.reshape(b, q * m * k, 1),
                             axis=1, mode="promise_in_bounds")           # [B, Q*M*K, D]
  taps = taps.reshape(b, q, m, k, d).astype(jnp.float32)
  # A batched dot, not multiply + sum: XLA:CPU runs the fused sum over the non-minor
  # K axis ~2x slower forward and ~3x slower forward + backward. HIGHEST: the
  # bilinear weights must not pass through TF32 / bf16 on accelerators.
  out = jnp.einsum("bqmkd,bqmk->bqmd", taps, tap_weights,
                   precision=jax.lax.Precision.HIGHEST)                  # [B, Q, M, D]
  return out.reshape(b, q, m * d).astype(value.dtype)


# Queries per block of the training path's deformable attention: the corner taps of a
# block ([B, block, M, L*P*4, D] float32, and their cotangent in the backward pass) are
# what is live, not those of all queries (504 MB per layer for SeMask-T at 512x512,
# batch 2).
QUERY_BLOCK = 1024


def _query_blocks(q: int) -> tuple[int, int]:
  """(number of blocks, queries per block) of Q queries: blocks of about QUERY_BLOCK."""
  n = max(1, -(-q // QUERY_BLOCK))
  return n, -(-q // n)


def _blocked(x: jax.Array, n: int, size: int) -> jax.Array:
  """[B, Q, ...] -> [n, B, size, ...], the queries zero-padded to n * size."""
  pad = n * size - x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
  return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def _unblocked(x: jax.Array, q: int) -> jax.Array:
  """[n, B, size, ...] -> [B, Q, ...] (the padding dropped)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _deform_attn_core_remat(value: jax.Array, spatial_shapes: tuple[tuple[int, int], ...],
                            locations: jax.Array, weights: jax.Array) -> jax.Array:
  """deform_attn_core over blocks of queries (lax.scan: one block's corner taps live at a
  time), whose backward pass gathers the taps again, block by block, instead of keeping
  them: they are [B, Q, M, L*P*4, D] float32 per layer, 32x the value they are read from.
  As swin.sequenced_remat: the recomputation waits for the output's cotangent
  (layers.after), else XLA:CPU runs it early and keeps it live all the same. Padded
  queries read with weight 0 and are dropped."""
  return _blocked_core(value, spatial_shapes, locations, weights)


def _blocked_core(value: jax.Array, spatial_shapes: tuple[tuple[int, int], ...],
                  locations: jax.Array, weights: jax.Array) -> jax.Array:
  q = locations.shape[1]
  n, size = _query_blocks(q)
  if n == 1:
    return deform_attn_core(value, spatial_shapes, locations, weights)
  out = jax.lax.map(lambda lw: deform_attn_core(value, spatial_shapes, *lw),
                    (_blocked(locations, n, size), _blocked(weights, n, size)))
  return _unblocked(out, q)


def _deform_fwd(value, spatial_shapes, locations, weights):
  return _blocked_core(value, spatial_shapes, locations, weights), (value, locations, weights)


def _deform_bwd(spatial_shapes, res, ct):
  value, locations, weights = res
  value = layers.after(value, ct)
  value, locations, weights = jax.lax.optimization_barrier((value, locations, weights))
  q = locations.shape[1]
  n, size = _query_blocks(q)

  def block(gv, xs):  # the output of a block reads value only: its vjp adds into gv
    loc, wts, c = xs
    _, vjp = jax.vjp(lambda v, l, w: deform_attn_core(v, spatial_shapes, l, w),
                     value, loc, wts)
    dv, dl, dw = vjp(c)
    return gv + dv, (dl, dw)

  gv, (gl, gw) = jax.lax.scan(block, jnp.zeros_like(value),
                              (_blocked(locations, n, size), _blocked(weights, n, size),
                               _blocked(ct, n, size)))
  return gv, _unblocked(gl, q), _unblocked(gw, q)


_deform_attn_core_remat.defvjp(_deform_fwd, _deform_bwd)


def deform_attn_core_valid(value: jax.Array, spatial_shapes: tuple[tuple[int, int], ...],
                           valid_shapes: jax.Array, locations: jax.Array,
                           weights: jax.Array) -> jax.Array:
  """deform_attn_core on canvases: level l is a spatial_shapes[l] canvas (flattened
  row-major) of which each image's own map is valid_shapes[b, l] = (h, w); samples are
  normalised by and read zero outside the valid map. Inference only (no remat)."""
  b, s, m, d = value.shape
  _, q, _, n_levels, n_points, _ = locations.shape
  index, tap_weights = [], []
  start = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    vh = valid_shapes[:, lvl, 0].reshape(b, 1, 1, 1)
    vw = valid_shapes[:, lvl, 1].reshape(b, 1, 1, 1)
    idx, wts = corner_taps(locations[:, :, :, lvl], vh, vw, row_stride=w)  # [B, Q, M, P, 4]
    index.append(idx + start)
    tap_weights.append(wts * weights[:, :, :, lvl, :, None].astype(jnp.float32))
    start += h * w
  k = n_levels * n_points * 4
  heads = jnp.arange(m, dtype=jnp.int32)[:, None]
  index = jnp.stack(index, axis=3).reshape(b, q, m, k) * m + heads
  tap_weights = jnp.stack(tap_weights, axis=3).reshape(b, q, m, k)
  taps = jnp.take_along_axis(value.reshape(b, s * m, d), index.reshape(b, q * m * k, 1),
                             axis=1, mode="promise_in_bounds")
  taps = taps.reshape(b, q, m, k, d).astype(jnp.float32)
  out = jnp.einsum("bqmkd,bqmk->bqmd", taps, tap_weights, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, q, m * d).astype(value.dtype)


def reference_points_valid(spatial_shapes: tuple[tuple[int, int], ...],
                           valid_shapes: jax.Array) -> jax.Array:
  """reference_points of each image's valid maps in the level canvases: [B, S, 2]."""
  f32 = jnp.float32
  out = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    vh = valid_shapes[:, lvl, 0].astype(f32)[:, None, None]
    vw = valid_shapes[:, lvl, 1].astype(f32)[:, None, None]
    ys = (jnp.arange(h, dtype=f32)[None, :, None] + f32(0.5)) / vh     # [B, h, 1]
    xs = (jnp.arange(w, dtype=f32)[None, None, :] + f32(0.5)) / vw     # [B, 1, w]
    ref_x = jnp.broadcast_to(xs, (valid_shapes.shape[0], h, w))
    ref_y = jnp.broadcast_to(ys, (valid_shapes.shape[0], h, w))
    out.append(jnp.stack([ref_x, ref_y], -1).reshape(-1, h * w, 2))
  return jnp.concatenate(out, axis=1)


def reference_points(spatial_shapes: tuple[tuple[int, int], ...]) -> np.ndarray:
  """Deformable DETR's encoder reference points (valid ratios 1): each token's own pixel
  centre ((j + 0.5) / W_l, (i + 0.5) / H_l), (x, y) order -> [S, 2] float32."""
  f32 = np.float32
  out = []
  for h, w in spatial_shapes:
    ys = (np.arange(h, dtype=f32) + f32(0.5)) / f32(h)
    xs = (np.arange(w, dtype=f32) + f32(0.5)) / f32(w)
    ref_y, ref_x = np.meshgrid(ys, xs, indexing="ij")
    out.append(np.stack([ref_x.reshape(-1), ref_y.reshape(-1)], axis=-1))
  return np.concatenate(out, axis=0).astype(f32)


class MSDeformAttn(nnx.Module):
  """Multi-scale deformable attention (Deformable DETR's MSDeformAttn, 2-d references).

  Per query and head: L * P sampling points at reference + offset / (W_l, H_l)
  on level l, their values weighted by a softmax over the L * P points.
  """

  def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, *,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if d_model % n_heads:
      raise ValueError(f"MSDeformAttn: {d_model} channels not divisible into {n_heads} heads")
    self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
    # The reference's _reset_parameters: zero offset kernels and a bias that puts
    # point i of head h at (i + 1) * the unit-max-norm direction of angle 2 pi h / M.
    thetas = np.arange(n_heads, dtype=np.float32) * np.float32(2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)                    # [M, 2]
    grid = np.tile(grid[:, None, None], (1, n_levels, n_points, 1))
    grid = grid * np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
    n_off = n_heads * n_levels * n_points
    self.sampling_offsets = layers.Linear(
        d_model, n_off * 2, init=layers.LinearInit(layers.zeros, layers.given(grid.reshape(-1))),
        dtype=dtype, rngs=rngs)
    self.attention_weights = layers.Linear(d_model, n_off, init=layers.ZEROS, dtype=dtype,
                                           rngs=rngs)
    self.value_proj = layers.Linear(d_model, d_model, init=layers.XAVIER_ZERO_BIAS,
                                    dtype=dtype, rngs=rngs)
    self.output_proj = layers.Linear(d_model, d_model, init=layers.XAVIER_ZERO_BIAS,
                                     dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, query: jax.Array, reference: jax.Array, input_flatten: jax.Array,
               spatial_shapes: tuple[tuple[int, int], ...],
               valid_shapes: jax.Array | None = None) -> jax.Array:
    """query [B, Q, C]; reference [B or 1, Q, 2] normalised (x, y), the same on every
    level (the encoder's case); input_flatten [B, S, C] -> [B, Q, C].
    valid_shapes: [B, L, 2] each image's map in the level canvases spatial_shapes
    (models/valid.py): offsets normalised by it, samples outside it read zero."""
    b, q, c = query.shape
    m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
    value = self.value_proj(input_flatten).reshape(b, -1, m, c // m)    # [B, S, M, D]
    offsets = self.sampling_offsets(query).astype(jnp.float32)
    offsets = offsets.reshape(b, q, m, n_levels, n_points, 2)
    logits = self.attention_weights(query).astype(jnp.float32).reshape(b, q, m, n_levels * n_points)
    weights = jax.nn.softmax(logits, axis=-1).reshape(b, q, m, n_levels, n_points)
    if valid_shapes is not None:
      normaliser = valid_shapes[..., ::-1].astype(jnp.float32)[:, None, None, :, None, :]
      locations = (reference[:, :, None, None, None, :].astype(jnp.float32)
                   + offsets / normaliser)                               # [B, Q, M, L, P, 2]
      out = deform_attn_core_valid(value, spatial_shapes, valid_shapes, locations, weights)
      return self.output_proj(out)
    normaliser = np.array([[w, h] for h, w in spatial_shapes], np.float32)  # [L, 2]
    locations = (reference[:, :, None, None, None, :].astype(jnp.float32)
                 + offsets / normaliser[:, None, :])                     # [B, Q, M, L, P, 2]
    out = _deform_attn_core_remat(value, spatial_shapes, locations, weights)  # [B, Q, C]
    return self.output_proj(out)


class MSDeformAttnTransformerEncoderLayer(nnx.Module):
  """Post-norm: x = LN(x + MSDeformAttn(x + pos)); x = LN(x + W2 relu(W1 x))."""

  def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int, *,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
               ffn_biases: tuple[jax.Array, jax.Array] | None = None):
    """ffn_biases: the (linear1, linear2) biases (encoder_ffn_biases, shared by the
    encoder's layers); drawn here if None. The FFN kernels are xavier-uniform."""
    self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, dtype=dtype, rngs=rngs)
    self.norm1 = layers.LayerNorm(d_model, dtype=dtype)
    b1, b2 = ffn_biases or encoder_ffn_biases(d_model, d_ffn, rngs=rngs)
    self.linear1 = layers.Linear(d_model, d_ffn, dtype=dtype, rngs=rngs,
                                 init=layers.LinearInit(layers.xavier_uniform, layers.given(b1)))
    self.linear2 = layers.Linear(d_ffn, d_model, dtype=dtype, rngs=rngs,
                                 init=layers.LinearInit(layers.xavier_uniform, layers.given(b2)))
    self.norm2 = layers.LayerNorm(d_model, dtype=dtype)

  def __call__(self, src: jax.Array, pos: jax.Array, reference: jax.Array,
               spatial_shapes: tuple[tuple[int, int], ...],
               valid_shapes: jax.Array | None = None) -> jax.Array:
    """src [B, S, C], pos [1 or B, S, C] -> [B, S, C]."""
    attn = self.self_attn(src + pos.astype(src.dtype), reference, src, spatial_shapes,
                          valid_shapes)
    src = self.norm1(src + attn)
    return self.norm2(src + self.linear2(jax.nn.relu(self.linear1(src))))


class MSDeformAttnTransformerEncoder(nnx.Module):
  def __init__(self, num_layers: int, d_model: int, d_ffn: int, n_levels: int, n_heads: int,
               n_points: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    biases = encoder_ffn_biases(d_model, d_ffn, rngs=rngs)  # one draw for all layers
    self.layers = nnx.List([
        MSDeformAttnTransformerEncoderLayer(d_model, d_ffn, n_levels, n_heads, n_points,
                                            dtype=dtype, rngs=rngs, ffn_biases=biases)
        for _ in range(num_layers)])

  def __call__(self, src: jax.Array, pos: jax.Array, reference: jax.Array,
               spatial_shapes: tuple[tuple[int, int], ...],
               valid_shapes: jax.Array | None = None) -> jax.Array:
    for layer in self.layers:
      src = layer(src, pos, reference, spatial_shapes, valid_shapes)
    return src


class MSDeformAttnTransformerEncoderOnly(nnx.Module):
  """The encoder and the learned per-level embedding added to the sine positions."""

  def __init__(self, d_model: int, n_heads: int, num_layers: int, d_ffn: int, n_levels: int,
               n_points: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.encoder = MSDeformAttnTransformerEncoder(num_layers, d_model, d_ffn, n_levels, n_heads,
                                                  n_points, dtype=dtype, rngs=rngs)
    # normal_(level_embed) after the encoder's reset: N(0, 1).
    self.level_embed = nnx.Param(layers.normal(1.0)(rngs, (n_levels, d_model), d_model,
                                                    n_levels))

  def __call__(self, srcs: list[jax.Array], valid_sizes: list[jax.Array] | None = None
               ) -> list[jax.Array]:
    """srcs: NHWC maps [B, h_l, w_l, C] -> the encoded maps, same shapes.
    valid_sizes: [B, 2] per level (canvases; models/valid.py)."""
    b, _, _, c = srcs[0].shape
    shapes = tuple((x.shape[1], x.shape[2]) for x in srcs)
    flat = jnp.concatenate([x.reshape(b, h * w, c) for x, (h, w) in zip(srcs, shapes)], axis=1)
    level_embed = self.level_embed[...]                                  # [L, C]
    valid_shapes = None
    if valid_sizes is None:
      pos = jnp.concatenate([
          jnp.asarray(position_embedding_sine(h, w, c // 2).reshape(h * w, c)) + level_embed[lvl]
          for lvl, (h, w) in enumerate(shapes)], axis=0)[None]           # [1, S, C] float32
      reference = jnp.asarray(reference_points(shapes))[None]            # [1, S, 2]
    else:
      valid_shapes = jnp.stack(valid_sizes, axis=1)                      # [B, L, 2]
      pos = jnp.concatenate([
          valid.position_embedding_sine(hw, (h, w), c // 2).reshape(b, h * w, c)
          + level_embed[lvl] for lvl, ((h, w), hw) in enumerate(zip(shapes, valid_sizes))],
          axis=1)                                                        # [B, S, C] float32
      reference = reference_points_valid(shapes, valid_shapes)           # [B, S, 2]
    out = self.encoder(flat, pos, reference, shapes, valid_shapes)       # [B, S, C]
    maps, start = [], 0
    for h, w in shapes:
      maps.append(out[:, start:start + h * w].reshape(b, h, w, c))
      start += h * w
    return maps


class ConvNorm(layers.Conv2d):
  """detectron2's Conv2d(norm=GroupNorm, activation) without bias: the norm is the
  attribute `norm` of the conv (keys `adapter_1.weight`, `adapter_1.norm.weight`)."""

  def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, relu: bool,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2, use_bias=False,
                     init=layers.C2_XAVIER, dtype=dtype, rngs=rngs)
    self.norm = layers.GroupNorm(GROUPS, out_ch, dtype=dtype)
    self.relu = relu

  def __call__(self, x: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
    """valid_hw: [B, 2] (models/valid.py): zero padding beyond it, GroupNorm within."""
    y = self.norm(super().__call__(x, valid_hw), valid_hw)
    return jax.nn.relu(y) if self.relu else y


def _input_proj(in_ch: int, out_ch: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.List:
  """nn.Sequential(Conv2d 1x1 with bias, GroupNorm(32)) as a list: keys `.0.*`, `.1.*`.
  The reference inits the conv xavier-uniform with a zero bias."""
  conv = layers.Conv2d(in_ch, out_ch, 1, init=layers.XAVIER_ZERO_BIAS, dtype=dtype, rngs=rngs)
  return nnx.List([conv, layers.GroupNorm(GROUPS, out_ch, dtype=dtype)])


class MSDeformAttnPixelDecoder(nnx.Module):
  """res2..res5 -> (mask_features [B, H/4, W/4, mask_dim], the three encoder levels
  [B, h_l, w_l, conv_dim] coarsest first).

  Everything after the input projections runs at `dtype` for its matmuls with
  float32 softmaxes, norms and sampling weights.
  """

  def __init__(self, in_channels: tuple[int, int, int, int], conv_dim: int, mask_dim: int,
               nheads: int, enc_layers: int, enc_dim_feedforward: int, n_points: int = 4, *,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if len(in_channels) != 4:
      raise ValueError(f"expected the channels of res2..res5, got {in_channels}")
    # res5, res4, res3 in that order (coarsest first), as the reference's ModuleList.
    self.input_proj = nnx.List([_input_proj(ch, conv_dim, dtype=dtype, rngs=rngs)
                                for ch in in_channels[:0:-1]])
    self.transformer = MSDeformAttnTransformerEncoderOnly(
        conv_dim, nheads, enc_layers, enc_dim_feedforward, NUM_LEVELS, n_points,
        dtype=dtype, rngs=rngs)
    self.mask_features = layers.Conv2d(conv_dim, mask_dim, 1, init=layers.C2_XAVIER,
                                       dtype=dtype, rngs=rngs)
    # One FPN level (res3 stride 8 -> common stride 4): lateral 1x1, output 3x3.
    self.adapter_1 = ConvNorm(in_channels[0], conv_dim, 1, relu=False, dtype=dtype, rngs=rngs)
    self.layer_1 = ConvNorm(conv_dim, conv_dim, 3, relu=True, dtype=dtype, rngs=rngs)

  def __call__(self, feats: list[jax.Array], aux: dict | None = None,
               valid_sizes: list[jax.Array] | None = None
               ) -> tuple[jax.Array, list[jax.Array]]:
    """feats: res2..res5 as NHWC maps; aux, if given, receives named intermediates.
    valid_sizes: their [B, 2] valid grids per image (canvases whose maps are exact
    halvings, as multiples of 32 give; models/valid.py)."""
    res2, res3, res4, res5 = feats
    hw2, hw3, hw4, hw5 = list(valid_sizes) if valid_sizes is not None else [None] * 4
    srcs = [proj[1](proj[0](x), hw) for proj, x, hw in
            zip(self.input_proj, (res5, res4, res3), (hw5, hw4, hw3))]
    multi_scale = self.transformer(srcs, None if valid_sizes is None else [hw5, hw4, hw3])
    lateral = self.adapter_1(res2, hw2)                                  # [B, H/4, W/4, C]
    if valid_sizes is None:
      up = resize_bilinear(multi_scale[-1], lateral.shape[1:3])
    else:
      if any(2 * a != b for a, b in zip(res3.shape[1:3], res2.shape[1:3])):
        raise ValueError("valid-size pixel decoder: the canvas must be a multiple of 32")
      up = valid.upsample(multi_scale[-1], hw3, 2)
    y = self.res2_level(lateral, lateral + up.astype(lateral.dtype), aux, hw2)
    if aux is not None:
      aux["fpn_res2"] = y
    return self.mask_features(y), multi_scale

  def res2_level(self, lateral: jax.Array, top_down: jax.Array, aux: dict | None,
                 valid_hw: jax.Array | None = None) -> jax.Array:
    """The res2 level's output from its lateral and top-down maps (MSFaPN aligns them);
    valid_hw: the res2 grid per image (models/valid.py)."""
    del lateral, aux
    return self.layer_1(top_down, valid_hw)
