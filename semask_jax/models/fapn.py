"""SeMask-FAPN's pixel decoders (SPEC section 12): FaPN (`PixelFANDecoder`) and MSFaPN
(`MSDeformAttnPixelFANDecoder`), both feeding Mask2Former's masked-attention decoder.

FaPN is an FPN over res2..res5 whose lateral and top-down maps are merged by a
FeatureAlign step (a DCNv2 that samples the top-down map at offsets predicted from
both) at res4, res3 and res2. MSFaPN is Mask2Former's pixel decoder with that step at
its one FPN level (res2). Module and leaf names follow the released checkpoints
(`sem_seg_head.pixel_decoder.adapter_N`, `align_N.offset`, `align_N.dcpack_L2`, `layer_N`,
`mask_features`). In the reference `align_N.offset` and `layer_N` are built with one and
the same GroupNorm module; here it is one parameter set, `layer_N.norm`, which
FeatureAlign is handed at call time (the checkpoint's copy `align_N.offset.norm.*` is
checked equal and dropped by the converter). Maps are NHWC.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semask_jax.models import layers
from semask_jax.models import valid
from semask_jax.models.dcn import DCN
from semask_jax.models.pixel_decoder import ConvNorm, MSDeformAttnPixelDecoder
from semask_jax.models.resize import resize_bilinear, resize_nearest


def _c2_xavier_conv(in_ch: int, out_ch: int, kernel_size: int, *, use_bias: bool,
                    dtype: jnp.dtype, rngs: nnx.Rngs) -> layers.Conv2d:
  """detectron2 Conv2d with fvcore's c2_xavier_fill: U(+-sqrt(3 / fan_in)), bias 0."""
  conv = layers.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2,
                       use_bias=use_bias, dtype=dtype, rngs=rngs)
  fan_in = in_ch * kernel_size * kernel_size
  conv.kernel = nnx.Param(layers.uniform_init(rngs, conv.kernel[...].shape,
                                              math.sqrt(3.0 / fan_in)))
  if use_bias:
    conv.bias = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
  return conv


class FeatureAlign(nnx.Module):
  """FaPN's FeatureAlign_V2 (`align_N`): offset feature = GroupNorm(offset(cat[feat_l,
  2 feat_s])) (1x1 conv, no bias; the GroupNorm is layer_N's, passed in), then
  relu(DCN(feat_s, offset feature)) + feat_l. The DCN samples the top-down map."""

  def __init__(self, conv_dim: int, deformable_groups: int = 8, *,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.offset = _c2_xavier_conv(2 * conv_dim, conv_dim, 1, use_bias=False, dtype=dtype,
                                  rngs=rngs)
    self.dcpack_L2 = DCN(conv_dim, conv_dim, 3, padding=1, deformable_groups=deformable_groups,
                         dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, feat_l: jax.Array, feat_s: jax.Array, norm: layers.GroupNorm,
               aux: dict | None = None, prefix: str = "align",
               valid_hw: jax.Array | None = None) -> jax.Array:
    """feat_l (lateral) and feat_s (top-down) [B, h, w, C] -> [B, h, w, C] in `dtype`.
    aux, if given, receives {prefix}_in_lateral, _in_topdown, _offset_feat,
    _offset_mask_raw and _dcn (the DCN output before the ReLU). valid_hw: [B, 2] each
    image's map in the canvases (models/valid.py; both maps the same canvas)."""
    if feat_s.shape[1:3] != feat_l.shape[1:3]:
      if valid_hw is not None:
        raise ValueError("FeatureAlign: the valid-size forward needs maps of one size")
      feat_s = resize_bilinear(feat_s, feat_l.shape[1:3])
    # The offset conv runs at the compute dtype (under AMP the reference's does too); the
    # DCN casts to float32 inside, as the reference's op exists only in float32.
    offset = norm(self.offset(jnp.concatenate([feat_l, feat_s * 2], axis=-1)), valid_hw)
    dcn_aux = {} if aux is not None else None
    dcn = self.dcpack_L2(feat_s, offset, dcn_aux, valid_hw)             # [B, h, w, C] float32
    out = jax.nn.relu(dcn) + feat_l.astype(jnp.float32)
    if aux is not None:
      aux.update({f"{prefix}_in_lateral": feat_l, f"{prefix}_in_topdown": feat_s,
                  f"{prefix}_offset_feat": offset,
                  f"{prefix}_offset_mask_raw": dcn_aux["offset_mask_raw"],
                  f"{prefix}_dcn": dcn})
    return out.astype(self.dtype)


class PixelFANDecoder(nnx.Module):
  """FaPN: res2..res5 -> (mask_features [B, H/4, W/4, mask_dim], the res5, res4, res3
  level outputs [B, h_l, w_l, conv_dim], coarsest first).

  res5: layer_4 (3x3 conv + GN + ReLU). res4, res3, res2 (N = 3, 2, 1): lateral =
  adapter_N (1x1 + GN), top-down = lateral + the coarser output upsampled by torch's
  legacy nearest, output = layer_N(align_N(lateral, top-down)). mask_features is a 3x3
  conv with bias on the res2 output.
  """

  def __init__(self, in_channels: tuple[int, int, int, int], conv_dim: int, mask_dim: int,
               deformable_groups: int = 8, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if len(in_channels) != 4:
      raise ValueError(f"expected the channels of res2..res5, got {in_channels}")
    # Constructed in the reference's order (res5 first), so the init draws follow it.
    self.layer_4 = ConvNorm(in_channels[3], conv_dim, 3, relu=True, dtype=dtype, rngs=rngs)
    for n in (3, 2, 1):
      setattr(self, f"adapter_{n}", ConvNorm(in_channels[n - 1], conv_dim, 1, relu=False,
                                             dtype=dtype, rngs=rngs))
      setattr(self, f"align_{n}", FeatureAlign(conv_dim, deformable_groups, dtype=dtype,
                                               rngs=rngs))
      setattr(self, f"layer_{n}", ConvNorm(conv_dim, conv_dim, 3, relu=True, dtype=dtype,
                                           rngs=rngs))
    self.mask_features = _c2_xavier_conv(conv_dim, mask_dim, 3, use_bias=True, dtype=dtype,
                                         rngs=rngs)

  def __call__(self, feats: list[jax.Array], aux: dict | None = None,
               valid_sizes: list[jax.Array] | None = None
               ) -> tuple[jax.Array, list[jax.Array]]:
    """feats: res2..res5 as NHWC maps; aux, if given, receives alignN_* and fpn_res2.
    valid_sizes: their [B, 2] valid grids per image (canvases, models/valid.py): zero
    conv borders, GroupNorm, the nearest upsampling and the DCN per image's own map."""
    hw = list(valid_sizes) if valid_sizes is not None else [None] * 4
    y = self.layer_4(feats[3], hw[3])                                   # [B, H/32, W/32, C]
    multi_scale = [y]
    for n in (3, 2, 1):
      lateral = getattr(self, f"adapter_{n}")(feats[n - 1], hw[n - 1])  # [B, h, w, C]
      if valid_sizes is None:
        up = resize_nearest(y, lateral.shape[1:3])
      else:
        up = valid.resize_nearest(y, hw[n], hw[n - 1], lateral.shape[1:3])
      top_down = lateral + up.astype(lateral.dtype)
      layer = getattr(self, f"layer_{n}")
      y = layer(getattr(self, f"align_{n}")(lateral, top_down, layer.norm, aux, f"align{n}",
                                            hw[n - 1]), hw[n - 1])
      if len(multi_scale) < 3:
        multi_scale.append(y)
    if aux is not None:
      aux["fpn_res2"] = y
    return self.mask_features(y, hw[0]), multi_scale


class MSDeformAttnPixelFANDecoder(MSDeformAttnPixelDecoder):
  """MSFaPN: Mask2Former's pixel decoder whose res2 level is layer_1(align_1(lateral,
  top-down)) instead of layer_1(top-down); align_1's offset GroupNorm is layer_1's."""

  def __init__(self, in_channels: tuple[int, int, int, int], conv_dim: int, mask_dim: int,
               nheads: int, enc_layers: int, enc_dim_feedforward: int, n_points: int = 4,
               deformable_groups: int = 8, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    super().__init__(in_channels, conv_dim, mask_dim, nheads, enc_layers, enc_dim_feedforward,
                     n_points, dtype=dtype, rngs=rngs)
    self.align_1 = FeatureAlign(conv_dim, deformable_groups, dtype=dtype, rngs=rngs)

  def res2_level(self, lateral: jax.Array, top_down: jax.Array, aux: dict | None,
                 valid_hw: jax.Array | None = None) -> jax.Array:
    return self.layer_1(self.align_1(lateral, top_down, self.layer_1.norm, aux, "align1",
                                     valid_hw), valid_hw)
