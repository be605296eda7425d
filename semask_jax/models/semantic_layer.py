"""The SeMask semantic layer (SPEC section 2).

After the Swin blocks of a stage, y = LN(x) goes through `num_sem_blocks`
semantic-attention blocks. Each predicts a K-channel semantic prior q (the map
supervised by the semantic decoder), uses it as query and a second K-channel
projection as key over the tokens, and adds gamma * proj(attn @ v) to its input.
The result replaces the stage's tokens (no skip around the layer).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from semask_jax.models import layers
from semask_jax.models import valid
from semask_jax.models.windows import pad_to_multiple, window_partition, window_reverse

# How a semantic attention starts (SemanticAttention's init; BackboneConfig.semantic_init).
SEMANTIC_INITS = ("trunc_normal", "frozen")


class SemanticAttention(nnx.Module):
  """One block of `class_injection`: single-head attention with class-space q/k.

  attention='plain' is the paper's Table 3 ablation: q/k become ordinary C->C
  projections (scaled by C^-0.5) while mlp_cls_q still predicts the semantic
  map for the semantic decoder.
  """

  def __init__(self, dim: int, num_classes: int, *, use_gamma: bool, attention: str,
               dropout: float, init: str = "trunc_normal", dtype, rngs: nnx.Rngs):
    """init (SPEC 13): 'trunc_normal', mmseg's backbone init (all four Linears
    N(0, 0.02^2), biases 0); 'frozen', the constructor's own init_weight as detectron2 keeps
    it (q / k / v kaiming-normal, biases 0, mlp_res 0: with gamma 0 the branch never
    trains). gamma starts at 0 either way."""
    if attention not in ("semantic", "plain"):
      raise ValueError(f"sem_attention must be 'semantic' or 'plain', got {attention!r}")
    if init not in SEMANTIC_INITS:
      raise ValueError(f"semantic attention init must be one of {SEMANTIC_INITS}, got {init!r}")
    qkv, res = ((layers.TRUNC_NORMAL, layers.TRUNC_NORMAL) if init == "trunc_normal"
                else (layers.KAIMING_NORMAL, layers.ZEROS))
    self.attention = attention
    self.mlp_cls_q = layers.Linear(dim, num_classes, init=qkv, dtype=dtype, rngs=rngs)
    if attention == "semantic":
      self.mlp_cls_k = layers.Linear(dim, num_classes, init=qkv, dtype=dtype, rngs=rngs)
      self.scale = 1.0  # The reference does not scale q k^T.
    else:
      self.mlp_q = layers.Linear(dim, dim, init=qkv, dtype=dtype, rngs=rngs)
      self.mlp_k = layers.Linear(dim, dim, init=qkv, dtype=dtype, rngs=rngs)
      self.scale = dim ** -0.5
    self.mlp_v = layers.Linear(dim, dim, init=qkv, dtype=dtype, rngs=rngs)
    self.mlp_res = layers.Linear(dim, dim, init=res, dtype=dtype, rngs=rngs)
    self.gamma = nnx.Param(jnp.zeros((1,), jnp.float32)) if use_gamma else None
    self.dropout = dropout

  def __call__(self, y: jax.Array, rng: jax.Array | None,
               key_valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """y: [B, nW, N, C] token groups -> (new y, semantic map [B, nW, N, K]).
    key_valid: [B, N] bool, the keys of each image's own map (valid-size forward of the
    global attention; the others get softmax weight 0)."""
    sem = self.mlp_cls_q(y)
    if self.attention == "semantic":
      q, k = sem, self.mlp_cls_k(y)
    else:
      q, k = self.mlp_q(y), self.mlp_k(y)
    logits = jnp.einsum("bwqc,bwkc->bwqk", q, k).astype(jnp.float32) * self.scale
    if key_valid is not None:
      logits = jnp.where(key_valid[:, None, None, :], logits, -jnp.inf)
    attn = jax.nn.softmax(logits, axis=-1).astype(y.dtype)
    f = self.mlp_res(jnp.einsum("bwqk,bwkc->bwqc", attn, self.mlp_v(y)))
    f = layers.dropout(f, self.dropout, rng)
    if self.gamma is not None:
      f = f * self.gamma[...].astype(f.dtype)
    return f + y, sem


class SemanticLayer(nnx.Module):
  """LN, then semantic attention windowed (no shift) or over the whole map."""

  def __init__(self, dim: int, num_classes: int, num_blocks: int, *, window_size: int,
               global_attention: bool, use_gamma: bool = True, attention: str = "semantic",
               dropout: float = 0.1, init: str = "trunc_normal", dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.window_size = window_size
    self.global_attention = global_attention
    self.norm1 = layers.LayerNorm(dim, dtype=dtype)
    self.class_injection = nnx.List([
        SemanticAttention(dim, num_classes, use_gamma=use_gamma, attention=attention,
                          dropout=dropout, init=init, dtype=dtype, rngs=rngs)
        for _ in range(num_blocks)])

  def __call__(self, x: jax.Array, keys: layers.KeyChain, valid_hw: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """x: [B, H, W, C] -> (y [B, H, W, C], semantic map [B, H, W, K] float32).
    valid_hw: [B, 2] token grid per image (valid-size forward, models/valid.py)."""
    b, h, w, c = x.shape
    y = self.norm1(x)
    key_valid = None
    if self.global_attention:
      y = y.reshape(b, 1, h * w, c)
      if valid_hw is not None:
        key_valid = valid.key_mask(valid_hw, (h, w))                   # [B, HW]
    else:  # Zero padding after the norm; padded tokens take part, no mask.
      m = self.window_size
      if valid_hw is not None:
        y = valid.mask(y, valid_hw)
      y = window_partition(pad_to_multiple(y, m), m)
    for blk in self.class_injection:
      y, sem = blk(y, keys.next(), key_valid)
    if self.global_attention:
      y, sem = y.reshape(b, h, w, c), sem.reshape(b, h, w, -1)
    else:
      hp, wp = -(-h // m) * m, -(-w // m) * m
      y = window_reverse(y, m, hp, wp)[:, :h, :w]
      sem = window_reverse(sem, m, hp, wp)[:, :h, :w]
    return y, sem.astype(jnp.float32)
