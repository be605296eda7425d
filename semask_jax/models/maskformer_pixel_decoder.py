"""MaskFormer's pixel decoder (`BasePixelDecoder`): a plain top-down FPN.

No transformer encoder and no deformable attention (Mask2Former's pixel
decoder has both): res5 goes through a 3x3 conv, then res4, res3, res2 each add
a 1x1 lateral to the torch-"nearest" upsampled coarser map and go through a 3x3
conv; a 3x3 conv with bias gives the stride-4 mask features. Module names
follow the checkpoint (`sem_seg_head.pixel_decoder.adapter_k`, `layer_k`,
`mask_features`; k = 1 for res2 ... 4 for res5), so conversion is a name map.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semask_jax.models import layers
from semask_jax.models import valid
from semask_jax.models.pixel_decoder import ConvNorm
from semask_jax.models.resize import resize_nearest


class BasePixelDecoder(nnx.Module):
  """res2..res5 [B, h_i, w_i, C_i] -> (mask_features [B, H/4, W/4, mask_dim], the
  top-down outputs [B, h_i, w_i, conv_dim], coarsest first).

  Every conv is detectron2's Conv2d with c2_xavier_fill (U(+-sqrt(3 / fan_in)), zero
  bias); the norms are GroupNorm(32) in float32; matmuls at `dtype`.
  """

  def __init__(self, in_channels: tuple[int, int, int, int], conv_dim: int, mask_dim: int, *,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if len(in_channels) != 4:
      raise ValueError(f"expected the channels of res2..res5, got {in_channels}")
    # The reference builds them in res2 .. res5 order (adapter_1, layer_1, adapter_2, ...).
    for k, ch in enumerate(in_channels[:-1], start=1):
      setattr(self, f"adapter_{k}", ConvNorm(ch, conv_dim, 1, relu=False, dtype=dtype, rngs=rngs))
      setattr(self, f"layer_{k}", ConvNorm(conv_dim, conv_dim, 3, relu=True, dtype=dtype,
                                           rngs=rngs))
    self.layer_4 = ConvNorm(in_channels[-1], conv_dim, 3, relu=True, dtype=dtype, rngs=rngs)
    self.mask_features = layers.Conv2d(conv_dim, mask_dim, 3, padding=1, dtype=dtype, rngs=rngs)
    self.mask_features.kernel = nnx.Param(layers.uniform_init(
        rngs, (3, 3, conv_dim, mask_dim), math.sqrt(3.0 / (9 * conv_dim))))
    self.mask_features.bias = nnx.Param(jnp.zeros((mask_dim,), jnp.float32))

  def __call__(self, feats: list[jax.Array], valid_sizes: list[jax.Array] | None = None
               ) -> tuple[jax.Array, list[jax.Array]]:
    """feats: res2..res5 as NHWC maps. valid_sizes: their [B, 2] valid grids per image
    (canvases, models/valid.py): zero conv borders, GroupNorm and the nearest upsampling
    per image's own map."""
    hw = list(valid_sizes) if valid_sizes is not None else [None] * 4
    y = self.layer_4(feats[3], hw[3])                                    # [B, H/32, W/32, D]
    outs = [y]
    for k in (3, 2, 1):
      lateral = getattr(self, f"adapter_{k}")(feats[k - 1], hw[k - 1])   # [B, h_k, w_k, D]
      if valid_sizes is None:
        up = resize_nearest(y, lateral.shape[1:3])
      else:
        up = valid.resize_nearest(y, hw[k], hw[k - 1], lateral.shape[1:3])
      y = getattr(self, f"layer_{k}")(lateral + up.astype(lateral.dtype), hw[k - 1])
      outs.append(y)
    return self.mask_features(y, hw[0]), outs
