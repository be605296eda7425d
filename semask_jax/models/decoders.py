"""Semantic-FPN head and the light semantic decoder (SPEC section 3)."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from semask_jax.models import layers
from semask_jax.models import valid
from semask_jax.models.resize import resize_bilinear, upsample2x

class ConvModule(nnx.Module):
  """Conv3x3 (no bias) -> BatchNorm -> ReLU, named like mmcv's ConvModule."""

  def __init__(self, in_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs):
    # mmcv ConvModule.init_weights (at construction): kaiming_init, N(0, 2 / fan_out).
    self.conv = layers.Conv2d(in_ch, out_ch, 3, padding=1, use_bias=False,
                              init=layers.LinearInit(layers.kaiming_normal_fan_out, layers.zeros),
                              dtype=dtype, rngs=rngs)
    self.bn = layers.BatchNorm(out_ch)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x), train=train))


class Upsample(nnx.Module):
  """Parameter-free x2 bilinear upsample; a module so that list indices match mmseg's."""

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train
    return upsample2x(x)


class FPNHead(nnx.Module):
  """Semantic-FPN: per-level conv/upsample towers summed at stride 4, then conv_seg."""

  def __init__(self, in_channels: Sequence[int], num_classes: int, *, channels: int = 256,
               strides: Sequence[int] = (4, 8, 16, 32), dropout: float = 0.1,
               dtype=jnp.float32, rngs: nnx.Rngs):
    heads = []
    for i, stride in enumerate(strides):
      n = max(1, int(math.log2(stride // strides[0])))
      units = []
      for k in range(n):
        units.append(ConvModule(in_channels[i] if k == 0 else channels, channels,
                                dtype=dtype, rngs=rngs))
        if stride != strides[0]:
          units.append(Upsample())
      heads.append(nnx.List(units))
    self.scale_heads = nnx.List(heads)
    # decode_head.init_weights: mmcv normal_init(conv_seg, std=0.01), bias 0.
    self.conv_seg = layers.Conv2d(channels, num_classes, 1,
                                  init=layers.LinearInit(layers.normal(0.01), layers.zeros),
                                  dtype=dtype, rngs=rngs)
    self.dropout = dropout

  def __call__(self, feats: Sequence[jax.Array], *, train: bool,
               rng: jax.Array | None, valid_sizes: Sequence[jax.Array] | None = None
               ) -> jax.Array:
    """feats: stride-4..32 maps [B, h_i, w_i, C_i] -> logits [B, h_0, w_0, K] float32.

    valid_sizes: [B, 2] valid grid of each map per image (valid-size forward, see
    models/valid.py): zeros beyond it before each 3x3 conv, upsamples and the resize to
    the stride-4 map from and to the valid sizes."""
    if valid_sizes is not None:
      return self._call_valid(feats, valid_sizes)
    out = None
    for i, head in enumerate(self.scale_heads):
      y = feats[i]
      for unit in head:
        y = unit(y, train=train)
      out = y if out is None else out + resize_bilinear(y, out.shape[1:3])
    out = layers.dropout(out, self.dropout, rng, broadcast_dims=(1, 2))  # Dropout2d.
    return self.conv_seg(out).astype(jnp.float32)

  def _call_valid(self, feats: Sequence[jax.Array], sizes: Sequence[jax.Array]) -> jax.Array:
    out = None
    for i, head in enumerate(self.scale_heads):
      y, hw = feats[i], sizes[i]
      for unit in head:
        if isinstance(unit, Upsample):
          y, hw = valid.upsample(y, hw, 2), hw * 2
        else:
          y = unit(valid.mask(y, hw), train=False)
      out = y if out is None else out + valid.resize(y, hw, sizes[0], out.shape[1:3])
    return self.conv_seg(out).astype(jnp.float32)


def semantic_decoder(sems: Sequence[jax.Array], strides: Sequence[int] = (4, 8, 16, 32)
                     ) -> jax.Array:
  """Sum of the semantic maps, each brought to stride 4 by successive x2 upsamples.

  Two or three x2 steps are not the same numbers as one x4 or x8 resize,
  so the steps are kept as the reference takes them.
  """
  out = sems[0]
  for i in range(1, len(sems)):
    y = sems[i]
    for _ in range(int(math.log2(strides[i] // strides[0]))):
      y = upsample2x(y)
    out = out + resize_bilinear(y, out.shape[1:3])
  return out
