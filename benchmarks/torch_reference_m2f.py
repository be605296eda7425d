r"""The Mask2Former family in PyTorch, written as the official detectron2 code computes it.

SeMask-Mask2Former (MSDeformAttn pixel decoder), FaPN-Mask2Former (PixelFANDecoder) and
MSFaPN-Mask2Former (MSDeformAttnPixelFANDecoder) of the official SeMask-Mask2Former and
SeMask-FAPN code (SPEC sections 10 and 12), transcribed operation for operation for the
parts that run in a training or inference step: the SeMask Swin backbone of
torch_reference.py (with these heads' semantic-layer rules), the Branch head's semantic
head (x2 bilinear align_corners=True chains), the pixel decoders (MSDeformAttn on CPU is
the official pure-PyTorch path, `ms_deform_attn_core_pytorch` with grid_sample; FeatureAlign
with DCNv2), the masked-attention transformer decoder with torch's nn.MultiheadAttention,
the HungarianMatcher (point-sampled costs, scipy's linear_sum_assignment), SeMaskSetCriterion
(importance-sampled points, the semantic loss_cate on the final prediction), detectron2's
solver (AdamW with one parameter group per parameter: backbone lr x 0.1, no weight decay on
norms, nn.Embedding weights and position tables; full-model gradient clipping) and
semantic inference. Module names are the checkpoint's, so the golden recipe's state dicts
load with strict=True (tests/test_torch_reference_m2f.py).

DCNv2: the official op (SeMask-FAPN/DCNv2) is a C++ im2col + GEMM on CPU. `--dcn torchvision`
runs torchvision.ops.deform_conv2d (the same layout and rule, SPEC 12); `--dcn im2col` runs
the same im2col written with torch ops (grid_sample with zero padding = DCNv2's bilinear
rule, times the mask, then one matmul); `auto` (default) is torchvision where it imports.

Run through torch_reference.py's command line:
  python benchmarks/torch_reference.py --model mask2former --mode train --batch 2 --size 512
"""
from __future__ import annotations

import itertools
import math
import pathlib
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import torch_reference as tref  # noqa: E402

MODELS = ("mask2former", "fapn", "msfapn")

# ----------------------------------------------------------------------------
# Configs (SPEC 10 / 12): the ADE20K configs with the SeMask-T backbone.
# ----------------------------------------------------------------------------


def head_config(num_classes: int = 150, **overrides) -> dict[str, Any]:
  cfg = dict(conv_dim=256, mask_dim=256, hidden_dim=256, num_queries=100, nheads=8,
             dim_feedforward=2048, dec_layers=9, enc_layers=6, enc_dim_feedforward=1024,
             enc_points=4, deformable_groups=8, train_num_points=12544, oversample_ratio=3.0,
             importance_sample_ratio=0.75, class_weight=2.0, mask_weight=5.0,
             dice_weight=5.0, cate_weight=0.4, no_object_weight=0.1, num_classes=num_classes)
  cfg.update(overrides)
  return cfg


def sem_global_rule(pixel_decoder: str, num_classes: int, num_stages: int = 4) -> list[bool]:
  """SeMask-Mask2Former: global semantic attention only in the last stage and only for 150
  classes; SeMask-FAPN's copy (fapn, msfapn): stages 2 and 3 for every class count."""
  if pixel_decoder in ("fapn", "msfapn"):
    return [i >= 2 for i in range(num_stages)]
  return [i == num_stages - 1 and num_classes == 150 for i in range(num_stages)]


# ----------------------------------------------------------------------------
# detectron2 / Deformable-DETR building blocks.
# ----------------------------------------------------------------------------


class Conv2d(nn.Conv2d):
  """detectron2.layers.Conv2d: the convolution, then `norm`, then `activation`."""

  def __init__(self, *args, norm: nn.Module | None = None, activation=None, **kwargs):
    super().__init__(*args, **kwargs)
    self.norm = norm
    self.activation = activation

  def forward(self, x):
    x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                 self.groups)
    if self.norm is not None:
      x = self.norm(x)
    if self.activation is not None:
      x = self.activation(x)
    return x


def position_embedding_sine(x: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0
                            ) -> torch.Tensor:
  """PositionEmbeddingSine(normalize=True, scale 2 pi) of an all-valid mask: [B, 2F, H, W]."""
  mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
  not_mask = ~mask
  y_embed = not_mask.cumsum(1, dtype=torch.float32)
  x_embed = not_mask.cumsum(2, dtype=torch.float32)
  eps, scale = 1e-6, 2 * math.pi
  y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
  x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
  dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
  dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
  pos_x = x_embed[:, :, :, None] / dim_t
  pos_y = y_embed[:, :, :, None] / dim_t
  pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
  pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
  return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def ms_deform_attn_core(value, shapes: Sequence[tuple[int, int]], sampling_locations,
                        attention_weights):
  """ms_deform_attn_core_pytorch: per level grid_sample (bilinear, zeros, align_corners
  False) of each head's values, weighted and summed over levels and points."""
  n, _, m, d = value.shape
  _, lq, m, l, p, _ = sampling_locations.shape
  value_list = value.split([h * w for h, w in shapes], dim=1)
  sampling_grids = 2 * sampling_locations - 1
  sampled = []
  for lid, (h, w) in enumerate(shapes):
    value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
    grid_l = sampling_grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
    sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                 align_corners=False))
  attention_weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, l * p)
  out = (torch.stack(sampled, dim=-2).flatten(-2) * attention_weights).sum(-1).view(n, m * d, lq)
  return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):

  def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
    super().__init__()
    self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
    self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
    self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
    self.value_proj = nn.Linear(d_model, d_model)
    self.output_proj = nn.Linear(d_model, d_model)

  def forward(self, query, reference_points, input_flatten, spatial_shapes, shapes,
              padding_mask):
    n, lq, _ = query.shape
    _, lin, _ = input_flatten.shape
    value = self.value_proj(input_flatten).masked_fill(padding_mask[..., None], float(0))
    value = value.view(n, lin, self.n_heads, self.d_model // self.n_heads)
    offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels,
                                                self.n_points, 2)
    weights = self.attention_weights(query).view(n, lq, self.n_heads,
                                                 self.n_levels * self.n_points)
    weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
    normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
    locations = (reference_points[:, :, None, :, None, :]
                 + offsets / normalizer[None, None, None, :, None, :])
    return self.output_proj(ms_deform_attn_core(value, shapes, locations, weights))


class EncoderLayer(nn.Module):
  """MSDeformAttnTransformerEncoderLayer, post-norm, ReLU FFN (dropout 0)."""

  def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
    super().__init__()
    self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
    self.norm1 = nn.LayerNorm(d_model)
    self.linear1 = nn.Linear(d_model, d_ffn)
    self.linear2 = nn.Linear(d_ffn, d_model)
    self.norm2 = nn.LayerNorm(d_model)

  def forward(self, src, pos, reference_points, spatial_shapes, shapes, padding_mask):
    src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, shapes, padding_mask)
    src = self.norm1(src + src2)
    return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class Encoder(nn.Module):

  def __init__(self, layers: int, *args):
    super().__init__()
    self.layers = nn.ModuleList([EncoderLayer(*args) for _ in range(layers)])

  @staticmethod
  def reference_points(shapes, valid_ratios, device):
    refs = []
    for lvl, (h, w) in enumerate(shapes):
      ref_y, ref_x = torch.meshgrid(
          torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
          torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device), indexing="ij")
      ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
      ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
      refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

  def forward(self, src, spatial_shapes, shapes, valid_ratios, pos, padding_mask):
    ref = self.reference_points(shapes, valid_ratios, src.device)
    for layer in self.layers:
      src = layer(src, pos, ref, spatial_shapes, shapes, padding_mask)
    return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):

  def __init__(self, d_model: int, nhead: int, layers: int, d_ffn: int, levels: int,
               points: int):
    super().__init__()
    self.encoder = Encoder(layers, d_model, d_ffn, levels, nhead, points)
    self.level_embed = nn.Parameter(torch.zeros(levels, d_model))

  def forward(self, srcs, pos_embeds):
    masks = [torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
             for x in srcs]
    src_flat, mask_flat, pos_flat, shapes = [], [], [], []
    for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
      shapes.append((src.shape[2], src.shape[3]))
      src_flat.append(src.flatten(2).transpose(1, 2))
      mask_flat.append(mask.flatten(1))
      pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
    src_flat, mask_flat = torch.cat(src_flat, 1), torch.cat(mask_flat, 1)
    pos_flat = torch.cat(pos_flat, 1)
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flat.device)
    valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)
    memory = self.encoder(src_flat, spatial_shapes, shapes, valid_ratios, pos_flat, mask_flat)
    return memory, shapes

  @staticmethod
  def valid_ratio(mask):
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


# ----------------------------------------------------------------------------
# DCNv2 and FaPN's FeatureAlign.
# ----------------------------------------------------------------------------


def _torchvision_deform_conv2d():
  try:
    from torchvision.ops import deform_conv2d
  except Exception as e:  # ImportError, or a torchvision built for another torch
    raise RuntimeError(
        "--dcn torchvision needs torchvision.ops.deform_conv2d (a torchvision matching this "
        f"torch); it failed to import: {e!r}. Use --dcn im2col (the same op in torch ops).")
  return deform_conv2d


def torchvision_available() -> bool:
  try:
    _torchvision_deform_conv2d()
    return True
  except RuntimeError:
    return False


def resolve_dcn(dcn: str) -> str:
  if dcn == "auto":
    return "torchvision" if torchvision_available() else "im2col"
  if dcn == "torchvision":
    _torchvision_deform_conv2d()
  elif dcn != "im2col":
    raise ValueError(f"dcn {dcn!r}: torchvision, im2col or auto")
  return dcn


def deform_conv2d_im2col(x, offset, weight, bias, mask):
  """DCNv2's modulated im2col + GEMM, 3x3, stride 1, padding 1, dilation 1: offset [B, 2 dg
  K, H, W] as (group, tap, (dy, dx)), mask [B, dg K, H, W] as (group, tap); each tap's
  sample bilinear with zeros outside (= grid_sample, zeros, align_corners=False) times the
  mask; the columns [C K, H W] times weight [O, C K]."""
  b, c, h, w = x.shape
  o, _, kh, kw = weight.shape
  k = kh * kw
  dg = mask.shape[1] // k
  off = offset.view(b, dg, k, 2, h, w)
  ti = torch.arange(kh, device=x.device).repeat_interleave(kw).view(1, 1, k, 1, 1)
  tj = torch.arange(kw, device=x.device).repeat(kh).view(1, 1, k, 1, 1)
  ys = torch.arange(h, device=x.device).view(1, 1, 1, h, 1)
  xs = torch.arange(w, device=x.device).view(1, 1, 1, 1, w)
  rows = ys - 1 + ti + off[:, :, :, 0]
  cols = xs - 1 + tj + off[:, :, :, 1]
  grid = torch.stack(((2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1), -1)
  grid = grid.reshape(b * dg, k * h, w, 2)
  sampled = F.grid_sample(x.reshape(b * dg, c // dg, h, w), grid, mode="bilinear",
                          padding_mode="zeros", align_corners=False)
  columns = sampled.view(b, dg, c // dg, k, h, w) * mask.view(b, dg, 1, k, h, w)
  out = weight.reshape(o, c * k) @ columns.reshape(b, c * k, h * w)
  return (out + bias.view(1, o, 1)).view(b, o, h, w)


class DCN(nn.Module):
  """DCNv2's DCN(C, C, 3, stride 1, padding 1, deformable_groups=dg, extra_offset_mask=True):
  conv_offset_mask on the offset feature, chunks (o1, o2, mask), offset = cat(o1, o2),
  mask = sigmoid; the op in float32."""

  def __init__(self, channels: int, deformable_groups: int, impl: str = "auto"):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(channels, channels, 3, 3))
    self.bias = nn.Parameter(torch.zeros(channels))
    self.conv_offset_mask = nn.Conv2d(channels, deformable_groups * 3 * 9, 3, padding=1)
    self.impl = resolve_dcn(impl)
    self._op = _torchvision_deform_conv2d() if self.impl == "torchvision" else None

  def forward(self, x, offset_feat, aux: dict | None = None, name: str = ""):
    out = self.conv_offset_mask(offset_feat)
    if aux is not None:
      aux[f"{name}_offset_mask_raw"] = out
    o1, o2, mask = torch.chunk(out, 3, dim=1)
    offset = torch.cat((o1, o2), dim=1)
    mask = torch.sigmoid(mask)
    x, offset, mask = x.float(), offset.float(), mask.float()
    weight, bias = self.weight.float(), self.bias.float()
    if self._op is not None:
      return self._op(x, offset, weight, bias, stride=1, padding=1, dilation=1, mask=mask)
    return deform_conv2d_im2col(x, offset, weight, bias, mask)


class FeatureAlign(nn.Module):
  """FaPN's FeatureAlign without FSM; `norm` is the GroupNorm shared with layer_N."""

  def __init__(self, channels: int, norm: nn.Module, deformable_groups: int, dcn: str):
    super().__init__()
    self.offset = Conv2d(2 * channels, channels, 1, bias=False, norm=norm)
    self.dcpack_L2 = DCN(channels, deformable_groups, dcn)

  def forward(self, feat_l, feat_s, aux: dict | None = None, name: str = ""):
    if feat_l.shape[2:] != feat_s.shape[2:]:
      feat_up = F.interpolate(feat_s, feat_l.shape[2:], mode="bilinear", align_corners=False)
    else:
      feat_up = feat_s
    offset = self.offset(torch.cat([feat_l, feat_up * 2], dim=1))
    dcn = self.dcpack_L2(feat_up.float(), offset.float(), aux, name)
    if aux is not None:
      aux.update({f"{name}_in_lateral": feat_l, f"{name}_in_topdown": feat_s,
                  f"{name}_offset_feat": offset, f"{name}_dcn": dcn})
    return F.relu(dcn) + feat_l


# ----------------------------------------------------------------------------
# Pixel decoders: (features res2..res5, aux) -> (mask_features, multi-scale, coarsest first).
# ----------------------------------------------------------------------------


def _gn(c: int) -> nn.GroupNorm:
  return nn.GroupNorm(32, c)


class MSDeformAttnPixelDecoder(nn.Module):
  """Mask2Former's decoder; align=True is MSFaPN's (FeatureAlign at the res2 level)."""

  def __init__(self, in_channels: Sequence[int], conv_dim: int, mask_dim: int, nheads: int,
               enc_layers: int, enc_dim_feedforward: int, enc_points: int, align: bool = False,
               deformable_groups: int = 8, dcn: str = "auto", **_):
    super().__init__()
    self.input_proj = nn.ModuleList([
        nn.Sequential(nn.Conv2d(c, conv_dim, 1), _gn(conv_dim)) for c in in_channels[1:][::-1]])
    self.transformer = MSDeformAttnTransformerEncoderOnly(conv_dim, nheads, enc_layers,
                                                          enc_dim_feedforward, 3, enc_points)
    self.conv_dim = conv_dim
    self.mask_features = Conv2d(conv_dim, mask_dim, 1)
    output_norm = _gn(conv_dim)
    self.adapter_1 = Conv2d(in_channels[0], conv_dim, 1, bias=False, norm=_gn(conv_dim))
    self.layer_1 = Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False, norm=output_norm,
                          activation=F.relu)
    self.align_1 = (FeatureAlign(conv_dim, output_norm, deformable_groups, dcn)
                    if align else None)

  def forward(self, features, aux: dict | None = None):
    with torch.autocast(features[0].device.type, enabled=False):  # the official guard
      srcs, pos = [], []
      for idx, x in enumerate(features[1:][::-1]):  # res5, res4, res3
        x = x.float()
        srcs.append(self.input_proj[idx](x))
        pos.append(position_embedding_sine(x, self.conv_dim // 2))
      y, shapes = self.transformer(srcs, pos)
      bs = y.shape[0]
      out = [z.transpose(1, 2).view(bs, -1, h, w)
             for z, (h, w) in zip(torch.split(y, [h * w for h, w in shapes], dim=1), shapes)]
      x = features[0].float()
      cur_fpn = self.adapter_1(x)
      y = cur_fpn + F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear",
                                  align_corners=False)
      if self.align_1 is not None:
        y = self.align_1(cur_fpn, y, aux, "align1")
      y = self.layer_1(y)
      out.append(y)
      if aux is not None:
        aux["fpn_res2"] = y
      return self.mask_features(out[-1]), out[:3]


class PixelFANDecoder(nn.Module):
  """FaPN: layer_4 on res5, then at res4, res3, res2 adapter + legacy-nearest top-down,
  FeatureAlign and layer_N (the GroupNorm shared by align_N.offset and layer_N)."""

  def __init__(self, in_channels: Sequence[int], conv_dim: int, mask_dim: int,
               deformable_groups: int = 8, dcn: str = "auto", **_):
    super().__init__()
    n = len(in_channels)
    for idx, c in enumerate(in_channels):
      output_norm = _gn(conv_dim)
      if idx == n - 1:
        self.add_module(f"layer_{idx + 1}", Conv2d(c, conv_dim, 3, padding=1, bias=False,
                                                   norm=output_norm, activation=F.relu))
        continue
      self.add_module(f"adapter_{idx + 1}", Conv2d(c, conv_dim, 1, bias=False,
                                                   norm=_gn(conv_dim)))
      self.add_module(f"align_{idx + 1}", FeatureAlign(conv_dim, output_norm,
                                                       deformable_groups, dcn))
      self.add_module(f"layer_{idx + 1}", Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False,
                                                 norm=output_norm, activation=F.relu))
    self.n = n
    self.mask_features = Conv2d(conv_dim, mask_dim, 3, padding=1)

  def forward(self, features, aux: dict | None = None):
    multi_scale = []
    y = None
    for i in range(self.n, 0, -1):  # res5 .. res2
      x = features[i - 1]
      if i == self.n:
        y = getattr(self, f"layer_{i}")(x)
      else:
        cur_fpn = getattr(self, f"adapter_{i}")(x)
        y = cur_fpn + F.interpolate(y, size=cur_fpn.shape[-2:], mode="nearest")
        y = getattr(self, f"layer_{i}")(getattr(self, f"align_{i}")(cur_fpn, y, aux,
                                                                     f"align{i}"))
      if len(multi_scale) < 3:
        multi_scale.append(y)
    if aux is not None:
      aux["fpn_res2"] = y
    return self.mask_features(y), multi_scale


# ----------------------------------------------------------------------------
# Mask2Former's masked-attention transformer decoder.
# ----------------------------------------------------------------------------


class SelfAttentionLayer(nn.Module):

  def __init__(self, d: int, nhead: int):
    super().__init__()
    self.self_attn = nn.MultiheadAttention(d, nhead, dropout=0.0)
    self.norm = nn.LayerNorm(d)

  def forward(self, tgt, query_pos):
    q = k = tgt + query_pos
    return self.norm(tgt + self.self_attn(q, k, value=tgt, attn_mask=None,
                                          key_padding_mask=None)[0])


class CrossAttentionLayer(nn.Module):

  def __init__(self, d: int, nhead: int):
    super().__init__()
    self.multihead_attn = nn.MultiheadAttention(d, nhead, dropout=0.0)
    self.norm = nn.LayerNorm(d)

  def forward(self, tgt, memory, memory_mask, pos, query_pos):
    tgt2 = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory,
                               attn_mask=memory_mask, key_padding_mask=None)[0]
    return self.norm(tgt + tgt2)


class FFNLayer(nn.Module):

  def __init__(self, d: int, dim_feedforward: int):
    super().__init__()
    self.linear1 = nn.Linear(d, dim_feedforward)
    self.linear2 = nn.Linear(dim_feedforward, d)
    self.norm = nn.LayerNorm(d)

  def forward(self, tgt):
    return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):

  def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
    super().__init__()
    h = [hidden_dim] * (num_layers - 1)
    self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

  def forward(self, x):
    for i, layer in enumerate(self.layers):
      x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
    return x


class MultiScaleMaskedTransformerDecoder(nn.Module):

  def __init__(self, in_channels: int, num_classes: int, hidden_dim: int, num_queries: int,
               nheads: int, dim_feedforward: int, dec_layers: int, mask_dim: int, **_):
    super().__init__()
    self.num_heads, self.num_layers, self.hidden_dim = nheads, dec_layers, hidden_dim
    self.transformer_self_attention_layers = nn.ModuleList(
        SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
    self.transformer_cross_attention_layers = nn.ModuleList(
        CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
    self.transformer_ffn_layers = nn.ModuleList(
        FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
    self.decoder_norm = nn.LayerNorm(hidden_dim)
    self.query_feat = nn.Embedding(num_queries, hidden_dim)
    self.query_embed = nn.Embedding(num_queries, hidden_dim)
    self.num_feature_levels = 3
    self.level_embed = nn.Embedding(3, hidden_dim)
    self.input_proj = nn.ModuleList(
        nn.Conv2d(in_channels, hidden_dim, 1) if in_channels != hidden_dim else nn.Sequential()
        for _ in range(3))
    self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
    self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

  def forward(self, x, mask_features):
    """-> (pred_logits, pred_masks): lists of the dec_layers + 1 predictions."""
    src, pos, size_list = [], [], []
    for i in range(self.num_feature_levels):
      size_list.append(x[i].shape[-2:])
      pos.append(position_embedding_sine(x[i], self.hidden_dim // 2).flatten(2).permute(2, 0, 1))
      src.append((self.input_proj[i](x[i]).flatten(2)
                  + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
    bs = src[0].shape[1]
    query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
    output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
    classes, masks = [], []
    c, m, attn_mask = self.prediction_heads(output, mask_features, size_list[0])
    classes.append(c)
    masks.append(m)
    for i in range(self.num_layers):
      level = i % self.num_feature_levels
      attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
      output = self.transformer_cross_attention_layers[i](output, src[level], attn_mask,
                                                          pos[level], query_embed)
      output = self.transformer_self_attention_layers[i](output, query_embed)
      output = self.transformer_ffn_layers[i](output)
      c, m, attn_mask = self.prediction_heads(output, mask_features,
                                              size_list[(i + 1) % self.num_feature_levels])
      classes.append(c)
      masks.append(m)
    return classes, masks

  def prediction_heads(self, output, mask_features, target_size):
    decoder_output = self.decoder_norm(output).transpose(0, 1)
    outputs_class = self.class_embed(decoder_output)
    outputs_mask = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoder_output), mask_features)
    attn_mask = F.interpolate(outputs_mask, size=target_size, mode="bilinear",
                              align_corners=False)
    attn_mask = (attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1)
                 .flatten(0, 1) < 0.5).bool().detach()
    return outputs_class, outputs_mask, attn_mask


# ----------------------------------------------------------------------------
# The model: backbone + Branch head (semantic head, pixel decoder, predictor).
# ----------------------------------------------------------------------------


def semantic_head(sems: Sequence[torch.Tensor], strides=(4, 8, 16, 32)) -> torch.Tensor:
  """SemanticHead: res2's prior + each coarser prior through log2(stride/4) x2 bilinear
  (align_corners=True) upsamples, resized to res2's size (align_corners=True); the sum x4."""
  out = sems[0]
  for i in range(1, len(strides)):
    y = sems[i]
    for _ in range(max(1, int(np.log2(strides[i]) - np.log2(strides[0])))):
      y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
    out = out + F.interpolate(y, size=out.shape[2:], mode="bilinear", align_corners=True)
  _, _, h, w = out.shape
  return F.interpolate(out, (h * 4, w * 4), mode="bilinear", align_corners=True)


class BranchHead(nn.Module):

  def __init__(self, in_channels: Sequence[int], pixel_decoder: str, cfg: dict[str, Any],
               dcn: str = "auto"):
    super().__init__()
    if pixel_decoder == "fapn":
      self.pixel_decoder = PixelFANDecoder(in_channels, dcn=dcn, **cfg)
    else:
      self.pixel_decoder = MSDeformAttnPixelDecoder(in_channels, align=pixel_decoder == "msfapn",
                                                    dcn=dcn, **cfg)
    self.predictor = MultiScaleMaskedTransformerDecoder(cfg["conv_dim"], **cfg)

  def forward(self, feats, sems, aux: dict | None = None):
    sem_pred = semantic_head(sems)
    mask_features, multi_scale = self.pixel_decoder(feats, aux)
    if aux is not None:
      aux.update(mask_features=mask_features, multi_scale_features=multi_scale)
    logits, masks = self.predictor(multi_scale, mask_features)
    return logits, masks, sem_pred


class SeMaskMask2Former(nn.Module):

  def __init__(self, *, pixel_decoder: str = "msdeformattn", num_classes: int,
               head: dict[str, Any] | None = None, num_sem_blocks: int = 1,
               sem_window_size: int | None = None, drop_path_rate: float = 0.3,
               dcn: str = "auto", **backbone):
    super().__init__()
    depths = backbone["depths"]
    self.backbone = tref.SeMaskSwin(
        num_classes=num_classes, num_sem_blocks=num_sem_blocks, drop_path_rate=drop_path_rate,
        sem_dropout=0.1, sem_window_size=sem_window_size,
        sem_global=sem_global_rule(pixel_decoder, num_classes, len(depths)), **backbone)
    self.cfg = head_config(num_classes, **(head or {}))
    self.sem_seg_head = BranchHead(self.backbone.widths, pixel_decoder, self.cfg, dcn)

  def forward(self, images, aux: dict | None = None):
    """images [B, 3, H, W] -> (pred_logits, pred_masks: lists over the predictions, first
    from the queries alone, last the final one; sem_pred [B, K, H, W])."""
    feats, sems = self.backbone(images)
    if aux is not None:
      aux.update(feats=feats, sems=sems)
    return self.sem_seg_head(feats, sems, aux)


def build(model: str, variant: str, num_classes: int, dcn: str = "auto",
          **head) -> SeMaskMask2Former:
  v = tref.VARIANTS[variant]
  # The released configs' SEM_WINDOW_SIZE: the Swin window for 150 classes, else 7.
  sem_ws = v["window_size"] if num_classes == 150 else 7
  return SeMaskMask2Former(pixel_decoder="msdeformattn" if model == "mask2former" else model,
                           num_classes=num_classes, head=head, sem_window_size=sem_ws,
                           dcn=dcn, **v)


# ----------------------------------------------------------------------------
# Targets, matcher, criterion (SPEC 10).
# ----------------------------------------------------------------------------


def prepare_targets(labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
  """The semantic dataset mapper's instances: per image the classes present (255 out) in
  increasing order and their binary masks; seg_maps = the label map."""
  targets = []
  for lab in labels:
    classes = torch.unique(lab)
    classes = classes[classes != tref.IGNORE_INDEX]
    targets.append({"labels": classes, "masks": lab[None] == classes[:, None, None],
                    "seg_maps": lab})
  return targets


def nested_tensor_from_tensor_list(tensors: Sequence[torch.Tensor]):
  """DETR's: zero-padded to the largest shape of the list (here: the most targets), with
  the padding mask."""
  max_size = [max(s) for s in zip(*[t.shape for t in tensors])]
  b, (_, h, w) = len(tensors), max_size
  out = torch.zeros([b] + max_size, dtype=tensors[0].dtype, device=tensors[0].device)
  mask = torch.ones((b, h, w), dtype=torch.bool, device=tensors[0].device)
  for t, pad, m in zip(tensors, out, mask):
    pad[:t.shape[0], :t.shape[1], :t.shape[2]].copy_(t)
    m[:t.shape[1], :t.shape[2]] = False
  return out, mask


def point_sample(inp, coords):
  """detectron2's point_sample: grid_sample at 2 * coords - 1, align_corners=False."""
  return F.grid_sample(inp, 2.0 * coords.unsqueeze(2) - 1.0, align_corners=False).squeeze(3)


def batch_sigmoid_ce(inputs, targets):
  hw = inputs.shape[1]
  pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
  neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
  return (torch.einsum("nc,mc->nm", pos, targets)
          + torch.einsum("nc,mc->nm", neg, (1 - targets))) / hw


def batch_dice(inputs, targets):
  inputs = inputs.sigmoid().flatten(1)
  numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
  denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
  return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_ce_loss(inputs, targets, num_masks: float):
  loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
  return loss.mean(1).sum() / num_masks


def dice_loss(inputs, targets, num_masks: float):
  inputs = inputs.sigmoid().flatten(1)
  numerator = 2 * (inputs * targets).sum(-1)
  denominator = inputs.sum(-1) + targets.sum(-1)
  return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class SeMaskCriterion:
  """HungarianMatcher + SeMaskSetCriterion. `rand(*shape)` draws the uniform points (torch.rand
  by default; the tests replay the golden draws through it, in the reference's order)."""

  def __init__(self, cfg: dict[str, Any], rand: Callable[..., torch.Tensor] | None = None):
    self.num_classes = cfg["num_classes"]
    self.num_points = cfg["train_num_points"]
    self.oversample_ratio = cfg["oversample_ratio"]
    self.importance_sample_ratio = cfg["importance_sample_ratio"]
    self.cost = (cfg["class_weight"], cfg["mask_weight"], cfg["dice_weight"])
    self.weight_dict = {"loss_ce": cfg["class_weight"], "loss_mask": cfg["mask_weight"],
                        "loss_dice": cfg["dice_weight"], "loss_cate": cfg["cate_weight"]}
    for i in range(cfg["dec_layers"]):
      self.weight_dict.update({f"{k}_{i}": v for k, v in list(self.weight_dict.items())[:4]})
    self.empty_weight = torch.ones(self.num_classes + 1)
    self.empty_weight[-1] = cfg["no_object_weight"]
    self.rand = rand or (lambda *shape, device=None: torch.rand(*shape, device=device))
    # Per prediction of the last call (final first), for the tests: the matching and the
    # points of the mask losses.
    self.matches: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    self.points: list[torch.Tensor] = []

  @torch.no_grad()
  def match(self, logits, masks, targets):
    from scipy.optimize import linear_sum_assignment
    indices = []
    for b in range(logits.shape[0]):
      out_prob = logits[b].softmax(-1)
      tgt_ids = targets[b]["labels"]
      cost_class = -out_prob[:, tgt_ids]
      out_mask = masks[b][:, None]
      tgt_mask = targets[b]["masks"].to(out_mask)[:, None]
      coords = self.rand(1, self.num_points, 2, device=out_mask.device)
      tgt_mask = point_sample(tgt_mask, coords.repeat(tgt_mask.shape[0], 1, 1)).squeeze(1)
      out_mask = point_sample(out_mask, coords.repeat(out_mask.shape[0], 1, 1)).squeeze(1)
      with torch.autocast(out_mask.device.type, enabled=False):
        out_mask, tgt_mask = out_mask.float(), tgt_mask.float()
        cost_mask = batch_sigmoid_ce(out_mask, tgt_mask)
        cost_dice = batch_dice(out_mask, tgt_mask)
      c = (self.cost[1] * cost_mask + self.cost[0] * cost_class + self.cost[2] * cost_dice)
      indices.append(linear_sum_assignment(c.reshape(logits.shape[1], -1).cpu()))
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            for i, j in indices]

  def uncertain_points(self, logits):
    """get_uncertain_point_coords_with_randomness with uncertainty -|logit|."""
    n = logits.shape[0]
    num_sampled = int(self.num_points * self.oversample_ratio)
    coords = self.rand(n, num_sampled, 2, device=logits.device)
    uncertainty = -(torch.abs(point_sample(logits, coords)))
    num_uncertain = int(self.importance_sample_ratio * self.num_points)
    num_random = self.num_points - num_uncertain
    idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
    idx += num_sampled * torch.arange(n, dtype=torch.long, device=logits.device)[:, None]
    coords = coords.view(-1, 2)[idx.view(-1), :].view(n, num_uncertain, 2)
    if num_random > 0:
      coords = torch.cat([coords, self.rand(n, num_random, 2, device=logits.device)], dim=1)
    return coords

  def losses(self, logits, masks, sem_pred, targets, indices, num_masks):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    tgt_batch = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
    tgt_idx = torch.cat([tgt for _, tgt in indices])
    # labels
    src_logits = logits.float()
    target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                device=src_logits.device)
    target_classes[batch_idx, src_idx] = torch.cat(
        [t["labels"][j] for t, (_, j) in zip(targets, indices)])
    out = {"loss_ce": F.cross_entropy(src_logits.transpose(1, 2), target_classes,
                                      self.empty_weight.to(src_logits.device))}
    # labels_cate
    if sem_pred is None:
      out["loss_cate"] = torch.tensor([0], dtype=logits.dtype).to(logits.device)
    else:
      seg = torch.cat([t["seg_maps"].unsqueeze(0) for t in targets], dim=0)
      out["loss_cate"] = F.cross_entropy(sem_pred, seg, ignore_index=tref.IGNORE_INDEX)
    # masks
    src_masks = masks[batch_idx, src_idx][:, None]
    target_masks, _ = nested_tensor_from_tensor_list([t["masks"] for t in targets])
    target_masks = target_masks.to(src_masks)
    target_masks = target_masks[tgt_batch, tgt_idx][:, None]
    with torch.no_grad():
      coords = self.uncertain_points(src_masks)
      self.points.append(coords)
      point_labels = point_sample(target_masks, coords).squeeze(1)
    point_logits = point_sample(src_masks, coords).squeeze(1)
    out["loss_mask"] = sigmoid_ce_loss(point_logits, point_labels, num_masks)
    out["loss_dice"] = dice_loss(point_logits, point_labels, num_masks)
    return out

  def __call__(self, pred_logits, pred_masks, sem_pred, targets):
    """Unweighted losses {loss_ce, loss_cate, loss_mask, loss_dice} of the final prediction
    and {..._i} of the earlier ones (i = 0 .. L-1, 0 = from the queries alone)."""
    self.matches, self.points = [], []
    num_masks = sum(len(t["labels"]) for t in targets)
    num_masks = torch.clamp(torch.as_tensor([num_masks], dtype=torch.float), min=1).item()
    indices = self.match(pred_logits[-1], pred_masks[-1], targets)
    self.matches.append(indices)
    losses = self.losses(pred_logits[-1], pred_masks[-1], sem_pred, targets, indices, num_masks)
    for i, (logits, masks) in enumerate(zip(pred_logits[:-1], pred_masks[:-1])):
      indices = self.match(logits, masks, targets)
      self.matches.append(indices)
      l_dict = self.losses(logits, masks, None, targets, indices, num_masks)
      losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
    return losses

  def weighted(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The meta-architecture's loss dict: each loss times its weight (unweighted ones
    dropped); the trainer sums its values."""
    return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}


# ----------------------------------------------------------------------------
# detectron2's solver and semantic inference.
# ----------------------------------------------------------------------------

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
              nn.LocalResponseNorm)


def build_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                    backbone_multiplier: float = 0.1, clip: float = 0.01):
  """Mask2Former's train_net build_optimizer: one group per parameter (each once, shared
  GroupNorms included), backbone lr x multiplier, weight decay 0 for position tables, norm
  modules and nn.Embedding; AdamW whose step first clips the global gradient norm."""
  params, memo = [], set()
  for module_name, module in model.named_modules():
    for param_name, value in module.named_parameters(recurse=False):
      if not value.requires_grad or value in memo:
        continue
      memo.add(value)
      hp = {"lr": lr, "weight_decay": weight_decay}
      if "backbone" in module_name:
        hp["lr"] = lr * backbone_multiplier
      if "relative_position_bias_table" in param_name or "absolute_pos_embed" in param_name:
        hp["weight_decay"] = 0.0
      if isinstance(module, NORM_TYPES):
        hp["weight_decay"] = 0.0
      if isinstance(module, nn.Embedding):
        hp["weight_decay"] = 0.0
      params.append({"params": [value], **hp})

  class FullModelGradientClippingAdamW(torch.optim.AdamW):

    def step(self, closure=None):
      all_params = itertools.chain(*[x["params"] for x in self.param_groups])
      torch.nn.utils.clip_grad_norm_(all_params, clip)
      return super().step(closure=closure)

  return FullModelGradientClippingAdamW(params, lr)


def semantic_inference(pred_logits, pred_masks, image_size: tuple[int, int]):
  """The meta-architecture's eval path: masks resized to the (padded) input, then per image
  cropped and resized to the output size (sem_seg_postprocess) and
  einsum(softmax(class)[:, :K], sigmoid(mask)) -> [B, K, H, W]."""
  masks = F.interpolate(pred_masks, size=image_size, mode="bilinear", align_corners=False)
  out = []
  for mask_cls, mask_pred in zip(pred_logits, masks):
    mask_pred = mask_pred[:, :image_size[0], :image_size[1]].expand(1, -1, -1, -1)
    mask_pred = F.interpolate(mask_pred, size=image_size, mode="bilinear",
                              align_corners=False)[0]
    mask_cls = F.softmax(mask_cls.to(mask_pred), dim=-1)[..., :-1]
    out.append(torch.einsum("qc,qhw->chw", mask_cls, mask_pred.sigmoid()))
  return torch.stack(out)


# ----------------------------------------------------------------------------
# The benchmark's step (timed by torch_reference.run_bench).
# ----------------------------------------------------------------------------


def make_step(model_name: str, *, variant: str, num_classes: int, mode: str, images, labels,
              device: str, autocast, dcn: str = "auto", lr: float = 1e-4,
              weight_decay: float = 0.05) -> tuple[Callable[[], Any], dict[str, Any]]:
  """(step, extra JSON fields): one training step (forward in train mode, the criterion,
  the weighted sum, backward, the clipped AdamW step) or one inference (eval forward +
  semantic inference). Targets are built once, as the data loader does off the step."""
  model = build(model_name, variant, num_classes, dcn).to(device)
  extra = {"model": model_name}
  if model_name != "mask2former":
    extra["dcn_impl"] = resolve_dcn(dcn)
  size = tuple(images.shape[-2:])
  if mode == "infer":
    model.eval()

    def step():
      with torch.no_grad(), autocast:
        logits, masks, _ = model(images)
        return semantic_inference(logits[-1], masks[-1], size)
    return step, extra
  model.train()
  opt = build_optimizer(model, lr, weight_decay)
  criterion = SeMaskCriterion(model.cfg)
  targets = prepare_targets(labels)

  def step():
    with autocast:
      logits, masks, sem_pred = model(images)
      loss_dict = criterion.weighted(criterion(logits, masks, sem_pred.float(), targets))
      loss = sum(loss_dict.values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach().sum()
  return step, extra
