"""MaskFormer's transformer predictor (`TransformerPredictor`): the DETR decoder.

`num_queries` queries start at zero (the learned `query_embed` is only their
position) and go through `dec_layers` post-norm layers, each self-attention,
then cross-attention over the one stride-32 memory input_proj(res5) (no mask,
no level round robin: Mask2Former's decoder differs in all of these), then an
FFN. Every layer's output goes through the shared decoder norm and the class and
mask heads: `dec_layers` predictions, none from the initial queries. Dropout
(0.1 in the reference: attention probabilities, after each attention, inside and
after the FFN) runs in training only.

Module names follow the checkpoint (`sem_seg_head.predictor.transformer.decoder.
layers.i.{self_attn, multihead_attn, linear1, linear2, norm1..3}`,
`...decoder.norm`, `query_embed`, `input_proj`, `class_embed`, `mask_embed`).
Queries are batch-first ([B, Q, C]); torch runs them sequence-first, which changes
nothing in the numbers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semask_jax.models import layers
from semask_jax.models import valid
from semask_jax.models.mask2former_decoder import MLP, MultiheadAttention, _linear
from semask_jax.models.position_encoding import position_embedding_sine


class TransformerDecoderLayer(nnx.Module):
  """DETR's post-norm decoder layer: self-attention, cross-attention, FFN (ReLU)."""

  def __init__(self, dim: int, num_heads: int, dim_feedforward: int, dropout: float, *,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    # The Transformer's _reset_parameters: xavier_uniform on every matrix (in_proj,
    # out_proj, linear1/2); MHA biases 0; FFN biases torch's default.
    self.self_attn = MultiheadAttention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.multihead_attn = MultiheadAttention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.linear1 = _linear(dim, dim_feedforward, xavier=True, dtype=dtype, rngs=rngs)
    self.linear2 = _linear(dim_feedforward, dim, xavier=True, dtype=dtype, rngs=rngs)
    self.norm1 = layers.LayerNorm(dim)
    self.norm2 = layers.LayerNorm(dim)
    self.norm3 = layers.LayerNorm(dim)
    self.dropout = dropout

  def __call__(self, tgt: jax.Array, memory: jax.Array, memory_with_pos: jax.Array,
               query_pos: jax.Array, keys: layers.KeyChain,
               memory_mask: jax.Array | None = None) -> jax.Array:
    """tgt [B, Q, C] float32, memory / memory_with_pos [B, S, C], query_pos [B, Q, C];
    memory_mask [B, 1, S] bool, True = a key the queries may not attend (None: all)."""
    r = self.dropout
    qk = tgt + query_pos
    x = self.self_attn(qk, qk, tgt, rate=r, rng=keys.next())
    tgt = self.norm1(tgt + layers.dropout(x, r, keys.next()))
    x = self.multihead_attn(tgt + query_pos, memory_with_pos, memory, memory_mask, rate=r,
                            rng=keys.next())
    tgt = self.norm2(tgt + layers.dropout(x, r, keys.next()))
    x = layers.dropout(jax.nn.relu(self.linear1(tgt)), r, keys.next())
    x = self.linear2(x)
    return self.norm3(tgt + layers.dropout(x, r, keys.next()))


class TransformerDecoder(nnx.Module):
  """The stack of layers and the shared output norm (`transformer.decoder`)."""

  def __init__(self, dim: int, num_heads: int, dim_feedforward: int, num_layers: int,
               dropout: float, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.layers = nnx.List([
        TransformerDecoderLayer(dim, num_heads, dim_feedforward, dropout, dtype=dtype, rngs=rngs)
        for _ in range(num_layers)])
    self.norm = layers.LayerNorm(dim)

  def __call__(self, tgt: jax.Array, memory: jax.Array, memory_with_pos: jax.Array,
               query_pos: jax.Array, keys: layers.KeyChain,
               memory_mask: jax.Array | None = None) -> jax.Array:
    """-> every layer's output through the shared norm [L, B, Q, C] float32
    (return_intermediate=True: the last entry is norm(final output))."""
    hs = []
    for layer in self.layers:
      tgt = layer(tgt, memory, memory_with_pos, query_pos, keys, memory_mask)
      hs.append(self.norm(tgt))
    return jnp.stack(hs)


class Transformer(nnx.Module):
  """DETR's Transformer with 0 encoder layers (post-norm: no encoder norm), so the
  memory is the projected res5 itself; only `decoder` holds parameters."""

  def __init__(self, dim: int, num_heads: int, dim_feedforward: int, num_layers: int,
               dropout: float, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.decoder = TransformerDecoder(dim, num_heads, dim_feedforward, num_layers, dropout,
                                      dtype=dtype, rngs=rngs)


class TransformerPredictor(nnx.Module):
  """res5 [B, h, w, C_in] and mask features [B, H/4, W/4, mask_dim] -> dec_layers
  predictions (class logits and mask logits)."""

  def __init__(self, in_channels: int, num_classes: int, hidden_dim: int, num_queries: int,
               nheads: int, dim_feedforward: int, dec_layers: int, mask_dim: int, *,
               dropout: float = 0.1, enforce_input_project: bool = False,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.hidden_dim = hidden_dim
    self.transformer = Transformer(hidden_dim, nheads, dim_feedforward, dec_layers, dropout,
                                   dtype=dtype, rngs=rngs)
    self.query_embed = layers.Embedding(num_queries, hidden_dim, rngs=rngs)   # N(0, 1)
    if in_channels != hidden_dim or enforce_input_project:
      # detectron2 Conv2d 1x1 with c2_xavier_fill: U(+-sqrt(3 / fan_in)) kernel, zero bias.
      self.input_proj = layers.Conv2d(in_channels, hidden_dim, 1, dtype=dtype, rngs=rngs)
      self.input_proj.kernel = nnx.Param(layers.uniform_init(
          rngs, (1, 1, in_channels, hidden_dim), math.sqrt(3.0 / in_channels)))
      self.input_proj.bias = nnx.Param(jnp.zeros((hidden_dim,), jnp.float32))
    else:
      self.input_proj = None  # nn.Sequential(): identity, no weights.
    self.class_embed = _linear(hidden_dim, num_classes + 1, xavier=False, dtype=dtype, rngs=rngs)
    self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3, dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, res5: jax.Array, mask_features: jax.Array,
               keys: layers.KeyChain | None = None, valid_hw: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """Returns pred_logits [L, B, Q, K+1], pred_masks [L, B, Q, H/4, W/4] (float32; index
    l = after layer l + 1), decoder_hs [L, B, Q, C] (normed layer outputs),
    transformer_in [B, h, w, C] (the memory before flattening) and transformer_pos
    [h, w, C] ([B, h, w, C] with valid_hw). `keys` drives dropout (None or deterministic:
    eval). valid_hw: [B, 2] each image's res5 grid in the canvas res5 (models/valid.py):
    the sine positions of that grid, and cross-attention over its keys only."""
    keys = keys or layers.KeyChain(None)
    b, h, w, _ = res5.shape
    x = res5 if self.input_proj is None else self.input_proj(res5)      # [B, h, w, C]
    memory = x.reshape(b, h * w, self.hidden_dim).astype(jnp.float32)   # [B, S, C]
    if valid_hw is None:
      pos = position_embedding_sine(h, w, self.hidden_dim // 2)         # [h, w, C] numpy
      memory_with_pos = memory + np.asarray(pos).reshape(1, h * w, -1)  # keys carry the position
      memory_mask = None
    else:
      pos = valid.position_embedding_sine(valid_hw, (h, w), self.hidden_dim // 2)
      memory_with_pos = memory + pos.reshape(b, h * w, -1)              # [B, S, C]
      memory_mask = ~valid.key_mask(valid_hw, (h, w))[:, None, :]       # [B, 1, S]
    query_pos = self.query_embed()                                      # [Q, C]
    query_pos = jnp.broadcast_to(query_pos[None], (b,) + query_pos.shape)
    tgt = jnp.zeros_like(query_pos)                                     # [B, Q, C] zeros
    hs = self.transformer.decoder(tgt, memory, memory_with_pos, query_pos, keys,
                                  memory_mask)                          # [L, B, Q, C]
    logits = self.class_embed(hs).astype(jnp.float32)                   # [L, B, Q, K+1]
    embed = self.mask_embed(hs)                                         # [L, B, Q, D]
    masks = jnp.einsum("lbqd,bhwd->lbqhw", embed, mask_features.astype(self.dtype),
                       preferred_element_type=jnp.float32)              # [L, B, Q, H/4, W/4]
    return {"pred_logits": logits, "pred_masks": masks, "decoder_hs": hs,
            "transformer_in": x, "transformer_pos": jnp.asarray(pos)}
