"""Mask2Former's transformer decoder (`MultiScaleMaskedTransformerDecoder`).

Learned queries attend, layer after layer, to the three pixel-decoder levels
(coarsest first, round robin) with masked cross-attention: each query only
sees the pixels its previous mask prediction covers. Module and leaf names
follow the torch checkpoint (`sem_seg_head.predictor.*`) so that conversion
is a name map. Queries are batch-first here ([B, Q, C]); torch runs them
sequence-first, which changes nothing in the numbers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semask_jax.models import layers
from semask_jax.models import valid
from semask_jax.models.position_encoding import position_embedding_sine
from semask_jax.models.resize import resize_bilinear

NUM_FEATURE_LEVELS = 3  # Mask2Former always uses three scales.



def _linear(in_features: int, out_features: int, *, xavier: bool, zero_bias: bool = False,
            dtype: jnp.dtype, rngs: nnx.Rngs) -> layers.Linear:
  """A Linear with the reference init: xavier-uniform kernels inside the decoder layers
  (their _reset_parameters sweeps the 2-D parameters only: the FFN biases keep torch's
  default, MultiheadAttention zeroes out_proj.bias), torch's default Linear init
  (U(+-1/sqrt(fan_in)) for kernel and bias) for the heads."""
  if xavier:
    init = layers.XAVIER_ZERO_BIAS if zero_bias else layers.XAVIER_DEFAULT_BIAS
  else:
    init = layers.LinearInit(layers.pytorch_default_uniform,
                             layers.zeros if zero_bias else layers.pytorch_default_uniform)
  return layers.Linear(in_features, out_features, init=init, dtype=dtype, rngs=rngs)


class MultiheadAttention(nnx.Module):
  """torch.nn.MultiheadAttention: packed in-projection, q scaled by
  1/sqrt(head_dim) after it, boolean mask True = may not attend, softmax in float32.

  `in_proj_weight` is stored [C, 3C] (q | k | v columns); the converter transposes
  torch's [3C, C].
  """

  def __init__(self, dim: int, num_heads: int, *, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"MultiheadAttention: {dim} channels not divisible into {num_heads} heads")
    # xavier_uniform_ over torch's whole [3C, C] matrix (fan_in C, fan_out 3C), bias 0.
    self.in_proj_weight = nnx.Param(layers.xavier_uniform(rngs, (dim, 3 * dim), dim, 3 * dim))
    self.in_proj_bias = nnx.Param(jnp.zeros((3 * dim,), jnp.float32))
    self.out_proj = _linear(dim, dim, xavier=True, zero_bias=True, dtype=dtype, rngs=rngs)
    self.num_heads = num_heads
    self.dtype = dtype

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
               mask: jax.Array | None = None, rate: float = 0.0,
               rng: jax.Array | None = None) -> jax.Array:
    """query [B, Q, C], key / value [B, S, C], mask [B, Q, S] bool (broadcast over
    heads) -> [B, Q, C]. With a key, dropout at `rate` on the attention probabilities
    (torch nn.MultiheadAttention(dropout=rate): MaskFormer's DETR decoder)."""
    b, nq, c = query.shape
    h = self.num_heads
    d = c // h
    w = layers.weight(self.in_proj_weight[...], self.dtype)             # [C, 3C]
    bias = self.in_proj_bias[...]                                       # [3C] float32

    def proj(x: jax.Array, i: int) -> jax.Array:                        # [B, N, C] -> [B, N, h, d]
      y = jnp.einsum("bnc,co->bno", x.astype(self.dtype), w[:, i * c:(i + 1) * c])
      y = layers.add_bias(y, bias[i * c:(i + 1) * c])
      return y.reshape(x.shape[0], x.shape[1], h, d)

    q = proj(query, 0) * jnp.asarray(math.sqrt(1.0 / d), self.dtype)  # [B, Q, h, d]
    k = proj(key, 1)                                                    # [B, S, h, d]
    v = proj(value, 2)                                                  # [B, S, h, d]
    logits = jnp.einsum("bqhd,bshd->bhqs", q, k,
                        preferred_element_type=jnp.float32)             # [B, h, Q, S]
    if mask is not None:
      logits = jnp.where(mask[:, None], -jnp.inf, logits)
    attn = layers.dropout(jax.nn.softmax(logits, axis=-1), rate, rng).astype(self.dtype)
    out = jnp.einsum("bhqs,bshd->bqhd", attn, v).reshape(b, nq, c)      # [B, Q, C]
    return self.out_proj(out)


class SelfAttentionLayer(nnx.Module):
  """Post-norm self-attention among the queries: x = LN(x + MHA(x + pos, x + pos, x))."""

  def __init__(self, dim: int, num_heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.self_attn = MultiheadAttention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.norm = layers.LayerNorm(dim)

  def __call__(self, x: jax.Array, query_pos: jax.Array) -> jax.Array:
    qk = x + query_pos
    return self.norm(x + self.self_attn(qk, qk, x))


class CrossAttentionLayer(nnx.Module):
  """Post-norm masked cross-attention: x = LN(x + MHA(x + query_pos, memory + pos, memory))."""

  def __init__(self, dim: int, num_heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.multihead_attn = MultiheadAttention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.norm = layers.LayerNorm(dim)

  def __call__(self, x: jax.Array, memory_with_pos: jax.Array, memory: jax.Array,
               query_pos: jax.Array, mask: jax.Array | None) -> jax.Array:
    return self.norm(x + self.multihead_attn(x + query_pos, memory_with_pos, memory, mask))


class FFNLayer(nnx.Module):
  """Post-norm feed-forward block: x = LN(x + W2 relu(W1 x))."""

  def __init__(self, dim: int, dim_feedforward: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.linear1 = _linear(dim, dim_feedforward, xavier=True, dtype=dtype, rngs=rngs)
    self.linear2 = _linear(dim_feedforward, dim, xavier=True, dtype=dtype, rngs=rngs)
    self.norm = layers.LayerNorm(dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(x + self.linear2(jax.nn.relu(self.linear1(x))))


class MLP(nnx.Module):
  """`num_layers` Linears with ReLU between them (the mask embedding head)."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    self.layers = nnx.List([_linear(i, o, xavier=False, dtype=dtype, rngs=rngs)
                            for i, o in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


def attention_mask(masks: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Mask logits [B, Q, h, w] -> the cross-attention mask [B, Q, H*W] at `size` (bool,
  True = may not attend): bilinear resize (align_corners=False), sigmoid < 0.5; a query
  whose whole row is masked attends everywhere instead. No gradient flows through it."""
  b, q, h, w = masks.shape
  m = jax.lax.stop_gradient(masks).astype(jnp.float32).reshape(b * q, h, w, 1)
  m = resize_bilinear(m, size).reshape(b, q, size[0] * size[1])        # [B, Q, HW]
  blocked = jax.nn.sigmoid(m) < 0.5
  return blocked & ~blocked.all(axis=-1, keepdims=True)


def attention_mask_valid(masks: jax.Array, size: tuple[int, int], level_hw: jax.Array
                         ) -> jax.Array:
  """attention_mask of each image's own maps in canvases: masks [B, Q, h, w] (valid
  region an exact multiple of the level's, as canvases of multiples of 32 give) -> [B, Q,
  H*W] over the level canvas `size`: keys beyond the level's valid map level_hw [B, 2]
  are always masked, and the unmasking of a fully masked row covers the valid keys."""
  b, q, h, w = masks.shape
  m = jax.lax.stop_gradient(masks).astype(jnp.float32).reshape(b * q, h, w, 1)
  # The canvas ratio is the valid maps' ratio, and a shrink reads only inside the valid
  # map: the same taps as the reference's resize of the image's own map.
  m = resize_bilinear(m, size).reshape(b, q, size[0] * size[1])        # [B, Q, HW]
  key_valid = valid.key_mask(level_hw, size)[:, None, :]               # [B, 1, HW]
  blocked = (jax.nn.sigmoid(m) < 0.5) | ~key_valid
  return jnp.where(blocked.all(axis=-1, keepdims=True), ~key_valid, blocked)


class MultiScaleMaskedTransformerDecoder(nnx.Module):
  """Mask2Former's decoder: `dec_layers` rounds of masked cross-attention (to level
  i mod 3), self-attention and FFN on `num_queries` learned queries, with a class and
  mask prediction from the initial queries and after every layer."""

  def __init__(self, in_channels: int, num_classes: int, hidden_dim: int, num_queries: int,
               nheads: int, dim_feedforward: int, dec_layers: int, mask_dim: int, *,
               enforce_input_project: bool = False, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.hidden_dim = hidden_dim
    self.num_heads = nheads
    self.num_layers = dec_layers
    self.transformer_self_attention_layers = nnx.List([
        SelfAttentionLayer(hidden_dim, nheads, dtype=dtype, rngs=rngs) for _ in range(dec_layers)])
    self.transformer_cross_attention_layers = nnx.List([
        CrossAttentionLayer(hidden_dim, nheads, dtype=dtype, rngs=rngs) for _ in range(dec_layers)])
    self.transformer_ffn_layers = nnx.List([
        FFNLayer(hidden_dim, dim_feedforward, dtype=dtype, rngs=rngs) for _ in range(dec_layers)])
    self.decoder_norm = layers.LayerNorm(hidden_dim)
    self.query_feat = layers.Embedding(num_queries, hidden_dim, rngs=rngs)
    self.query_embed = layers.Embedding(num_queries, hidden_dim, rngs=rngs)
    self.level_embed = layers.Embedding(NUM_FEATURE_LEVELS, hidden_dim, rngs=rngs)
    if in_channels != hidden_dim or enforce_input_project:
      # detectron2 Conv2d 1x1 with c2_xavier_fill: kaiming_uniform(a=1) kernel, zero bias.
      self.input_proj = nnx.List([
          layers.Conv2d(in_channels, hidden_dim, 1, init=layers.C2_XAVIER, dtype=dtype,
                        rngs=rngs)
          for _ in range(NUM_FEATURE_LEVELS)])
    else:
      self.input_proj = None  # nn.Sequential(): identity, no weights.
    self.class_embed = _linear(hidden_dim, num_classes + 1, xavier=False, dtype=dtype, rngs=rngs)
    self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3, dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def prediction_heads(self, output: jax.Array, mask_features: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """Queries [B, Q, C], mask features [B, h, w, D] -> class logits [B, Q, K+1] and mask
    logits [B, Q, h, w], float32."""
    x = self.decoder_norm(output)                                       # [B, Q, C] float32
    logits = self.class_embed(x).astype(jnp.float32)                    # [B, Q, K+1]
    embed = self.mask_embed(x)                                          # [B, Q, D]
    masks = jnp.einsum("bqd,bhwd->bqhw", embed, mask_features.astype(self.dtype),
                       preferred_element_type=jnp.float32)              # [B, Q, h, w]
    return logits, masks

  def __call__(self, multi_scale_features: list[jax.Array], mask_features: jax.Array,
               valid_sizes: list[jax.Array] | None = None) -> dict[str, jax.Array]:
    """multi_scale_features: 3 maps [B, h_l, w_l, C_in], coarsest first; mask_features
    [B, h, w, mask_dim]. Returns pred_logits [L+1, B, Q, K+1] and pred_masks
    [L+1, B, Q, h, w] (float32), index l = prediction after l decoder layers.
    valid_sizes: [B, 2] valid grid of each level per image, coarsest first (canvases,
    models/valid.py): sine positions of the valid sizes, attention over valid keys."""
    if len(multi_scale_features) != NUM_FEATURE_LEVELS:
      raise ValueError(f"expected {NUM_FEATURE_LEVELS} feature levels, "
                       f"got {len(multi_scale_features)}")
    sizes, memory, memory_with_pos = [], [], []
    level_embed = self.level_embed()                                    # [3, C]
    for lvl, x in enumerate(multi_scale_features):
      b, h, w, _ = x.shape
      sizes.append((h, w))
      if self.input_proj is not None:
        x = self.input_proj[lvl](x)
      src = x.reshape(b, h * w, self.hidden_dim).astype(jnp.float32) + level_embed[lvl]
      if valid_sizes is None:
        pos = np.asarray(position_embedding_sine(h, w, self.hidden_dim // 2)).reshape(h * w, -1)
      else:
        pos = valid.position_embedding_sine(valid_sizes[lvl], (h, w), self.hidden_dim // 2
                                            ).reshape(b, h * w, -1)
      memory.append(src)                                                # [B, HW, C]
      memory_with_pos.append(src + pos)                                 # keys carry the position

    b = mask_features.shape[0]
    query_pos = jnp.broadcast_to(self.query_embed()[None], (b,) + self.query_embed().shape)
    output = jnp.broadcast_to(self.query_feat()[None], (b,) + self.query_feat().shape)

    logits, masks = self.prediction_heads(output, mask_features)
    all_logits, all_masks = [logits], [masks]
    def make_mask(masks, lvl):
      if valid_sizes is None:
        return attention_mask(masks, sizes[lvl])
      return attention_mask_valid(masks, sizes[lvl], valid_sizes[lvl])

    mask = make_mask(masks, 0)
    for i in range(self.num_layers):
      lvl = i % NUM_FEATURE_LEVELS
      output = self.transformer_cross_attention_layers[i](
          output, memory_with_pos[lvl], memory[lvl], query_pos, mask)
      output = self.transformer_self_attention_layers[i](output, query_pos)
      output = self.transformer_ffn_layers[i](output)
      logits, masks = self.prediction_heads(output, mask_features)
      all_logits.append(logits)
      all_masks.append(masks)
      if i + 1 < self.num_layers:  # the last prediction's mask is never used
        mask = make_mask(masks, (i + 1) % NUM_FEATURE_LEVELS)
    return {"pred_logits": jnp.stack(all_logits), "pred_masks": jnp.stack(all_masks)}
