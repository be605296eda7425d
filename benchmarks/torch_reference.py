r"""SeMask-FPN in PyTorch, written as the official code computes it, timed beside SeMask-JAX.

The issue's CPU and GPU targets are ratios to the official PyTorch code on the same
machine. That code (mmsegmentation 0.x + mmcv) cannot be installed here, so this file
transcribes the parts of it that run in a training or inference step, operation for
operation: Swin's window attention (`q @ k.transpose`, `torch.roll`, the view/permute
window partition, `F.pad` after the norm, the shift mask built per input size), the SeMask
semantic layer, mmseg's FPNHead with its ConvModules and Upsample modules, the
CrossEntropyLoss with mean over all pixels, the OHEM pixel sampler and torch's AdamW with
mmcv's no-decay keys. The training step also computes what the official head and segmentor
compute in every iteration beside the loss: acc_seg (mmseg's top-1 accuracy of the resized
logits) and the .item() of each logged value (BaseSegmentor._parse_losses). The inference
step is the decode head's forward_test: the stride-4 seg logits (with the SeMask class branch,
which BranchFPNHead.forward computes too), what semask_jax.bench times; it leaves out what
EncoderDecoder.simple_test adds (the resize to the image, softmax, argmax, and SeMask's second
extract_feat for the returned feature maps). Module names are the checkpoint's, so a trained
SeMask-FPN state dict loads with strict=True. tests/test_torch_reference.py checks it
against the golden vectors (eval outputs; one training step's losses, gradients, BatchNorm
statistics and AdamW update), so what is timed is the reference's function.

  python benchmarks/torch_reference.py --variant T --mode infer --batch 1 --size 512
  python benchmarks/torch_reference.py --variant T --mode train --batch 2 --size 512
  python benchmarks/torch_reference.py --variant B --mode train --batch 16 --device cuda --amp

--model mask2former | fapn | msfapn times the Mask2Former family instead, as the official
detectron2 code computes it (benchmarks/torch_reference_m2f.py; its own training recipe:
AdamW lr 1e-4, weight decay 0.05, backbone x 0.1, gradient clipping 0.01); the JSON row
carries the model's name (and the DCNv2 op FaPN's ran with: --dcn).

One JSON line per run (and --json FILE): median step time, images/s, peak memory (CPU:
the process's peak RSS during the warm-up and timed steps, the mark reset after the model
is built, as semask_jax.bench does after compiling; CUDA: torch.cuda.max_memory_allocated).
--amp is torch.autocast with bfloat16 (the official code's AMP), on CUDA only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from semask_jax import bench_host  # noqa: E402  (no jax import: the RSS is torch's alone)

# SPEC section 4.
VARIANTS = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}
IGNORE_INDEX = 255
NO_DECAY_KEYS = ("absolute_pos_embed", "relative_position_bias_table", "norm")


# ----------------------------------------------------------------------------
# Backbone: Swin (segmentation flavour) with SeMask semantic layers.
# ----------------------------------------------------------------------------


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
  """[B, H, W, C] -> [B * nW, ws, ws, C]."""
  b, h, w, c = x.shape
  x = x.view(b, h // ws, ws, w // ws, ws, c)
  return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
  """[B * nW, ws, ws, C] -> [B, H, W, C]."""
  b = int(windows.shape[0] / (h * w / ws / ws))
  x = windows.view(b, h // ws, w // ws, ws, ws, -1)
  return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


class DropPath(nn.Module):
  """Stochastic depth per sample (timm's drop_path)."""

  def __init__(self, p: float):
    super().__init__()
    self.p = p

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.p == 0.0 or not self.training:
      return x
    keep = 1 - self.p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype,
                              device=x.device)).floor_()
    return x.div(keep) * mask


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):

  def __init__(self, dim: int, ws: int, num_heads: int):
    super().__init__()
    self.ws, self.num_heads = ws, num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    self.register_buffer("relative_position_index", rel.sum(-1))
    self.qkv = nn.Linear(dim, dim * 3)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, mask=None):
    b_, n, c = x.shape
    qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * self.scale
    attn = q @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    attn = attn + bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    if mask is not None:
      nw = mask.shape[0]
      attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
      attn = attn.view(-1, self.num_heads, n, n)
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
    return self.proj(x)


class SwinBlock(nn.Module):

  def __init__(self, dim: int, num_heads: int, ws: int, shift: int, drop_path: float):
    super().__init__()
    self.ws, self.shift = ws, shift
    self.norm1 = nn.LayerNorm(dim)
    self.attn = WindowAttention(dim, ws, num_heads)
    self.drop_path = DropPath(drop_path)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, 4 * dim)

  def forward(self, x, h: int, w: int, attn_mask):
    b, _, c = x.shape
    shortcut = x
    x = self.norm1(x).view(b, h, w, c)
    pad_r, pad_b = (self.ws - w % self.ws) % self.ws, (self.ws - h % self.ws) % self.ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = x.shape[1], x.shape[2]
    if self.shift > 0:
      x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
    else:
      attn_mask = None
    windows = window_partition(x, self.ws).view(-1, self.ws * self.ws, c)
    windows = self.attn(windows, mask=attn_mask).view(-1, self.ws, self.ws, c)
    x = window_reverse(windows, self.ws, hp, wp)
    if self.shift > 0:
      x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
    x = x[:, :h, :w, :].contiguous().view(b, h * w, c)
    x = shortcut + self.drop_path(x)
    return x + self.drop_path(self.mlp(self.norm2(x)))


class SemanticAttention(nn.Module):
  """One class_injection block: single head, class-space q/k, no scaling (SPEC 2)."""

  def __init__(self, dim: int, num_classes: int, dropout: float):
    super().__init__()
    self.mlp_cls_q = nn.Linear(dim, num_classes)
    self.mlp_cls_k = nn.Linear(dim, num_classes)
    self.mlp_v = nn.Linear(dim, dim)
    self.mlp_res = nn.Linear(dim, dim)
    self.proj_drop = nn.Dropout(dropout)
    self.gamma = nn.Parameter(torch.zeros(1))

  def forward(self, x):
    q = self.mlp_cls_q(x)
    attn = (q @ self.mlp_cls_k(x).transpose(-2, -1)).softmax(dim=-1)
    f = self.proj_drop(self.mlp_res(attn @ self.mlp_v(x)))
    return q, self.gamma * f + x


class SemanticLayer(nn.Module):

  def __init__(self, dim: int, num_classes: int, num_blocks: int, ws: int,
               global_attention: bool, dropout: float):
    super().__init__()
    self.ws, self.global_attention = ws, global_attention
    self.norm1 = nn.LayerNorm(dim)
    self.class_injection = nn.ModuleList(
        [SemanticAttention(dim, num_classes, dropout) for _ in range(num_blocks)])

  def forward(self, x, h: int, w: int):
    """x: [B, H*W, C] -> (semantic map [B, H*W, K], y [B, H*W, C])."""
    b, _, c = x.shape
    y = self.norm1(x)
    if self.global_attention:
      for blk in self.class_injection:
        sem, y = blk(y)
      return sem, y
    y = y.view(b, h, w, c)
    pad_r, pad_b = (self.ws - w % self.ws) % self.ws, (self.ws - h % self.ws) % self.ws
    y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = y.shape[1], y.shape[2]
    y = window_partition(y, self.ws).view(-1, self.ws * self.ws, c)
    for blk in self.class_injection:
      sem, y = blk(y)
    y = window_reverse(y.view(-1, self.ws, self.ws, c), self.ws, hp, wp)
    sem = window_reverse(sem.view(-1, self.ws, self.ws, sem.shape[-1]), self.ws, hp, wp)
    y = y[:, :h, :w, :].contiguous().view(b, h * w, c)
    sem = sem[:, :h, :w, :].contiguous().view(b, h * w, -1)
    return sem, y


class PatchMerging(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
    self.norm = nn.LayerNorm(4 * dim)

  def forward(self, x, h: int, w: int):
    b, _, c = x.shape
    x = x.view(b, h, w, c)
    if h % 2 or w % 2:
      x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):

  def __init__(self, dim: int, depth: int, num_heads: int, ws: int, drop_paths: Sequence[float],
               num_classes: int, num_sem_blocks: int, global_sem: bool, sem_dropout: float,
               downsample: bool, sem_ws: int | None = None):
    super().__init__()
    self.ws, self.shift = ws, ws // 2
    self.blocks = nn.ModuleList([
        SwinBlock(dim, num_heads, ws, 0 if i % 2 == 0 else ws // 2, drop_paths[i])
        for i in range(depth)])
    self.semantic_layer = (SemanticLayer(dim, num_classes, num_sem_blocks, sem_ws or ws,
                                         global_sem, sem_dropout)
                           if num_sem_blocks > 0 else None)
    self.downsample = PatchMerging(dim) if downsample else None

  def shift_mask(self, h: int, w: int, device) -> torch.Tensor:
    """[nW, N, N]: -100 between tokens of different regions of the padded map."""
    hp, wp = math.ceil(h / self.ws) * self.ws, math.ceil(w / self.ws) * self.ws
    img_mask = torch.zeros((1, hp, wp, 1), device=device)
    cuts = (slice(0, -self.ws), slice(-self.ws, -self.shift), slice(-self.shift, None))
    cnt = 0
    for hs in cuts:
      for wsl in cuts:
        img_mask[:, hs, wsl, :] = cnt
        cnt += 1
    mask_windows = window_partition(img_mask, self.ws).view(-1, self.ws * self.ws)
    mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))

  def forward(self, x, h: int, w: int):
    attn_mask = self.shift_mask(h, w, x.device)
    for blk in self.blocks:
      x = blk(x, h, w, attn_mask)
    sem = None
    if self.semantic_layer is not None:
      sem, x = self.semantic_layer(x, h, w)
    if self.downsample is None:
      return x, sem, None
    return x, sem, self.downsample(x, h, w)


class PatchEmbed(nn.Module):

  def __init__(self, embed_dim: int, patch: int = 4):
    super().__init__()
    self.patch = patch
    self.proj = nn.Conv2d(3, embed_dim, patch, patch)
    self.norm = nn.LayerNorm(embed_dim)

  def forward(self, x):
    _, _, h, w = x.shape
    if w % self.patch:
      x = F.pad(x, (0, self.patch - w % self.patch))
    if h % self.patch:
      x = F.pad(x, (0, 0, 0, self.patch - h % self.patch))
    x = self.proj(x)
    wh, ww = x.shape[2], x.shape[3]
    x = self.norm(x.flatten(2).transpose(1, 2))
    return x.transpose(1, 2).reshape(-1, x.shape[-1], wh, ww)


class SeMaskSwin(nn.Module):

  def __init__(self, *, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
               window_size: int, num_classes: int,
               num_sem_blocks: int | Sequence[int] = (1, 1, 1, 1), drop_path_rate: float = 0.3,
               sem_dropout: float = 0.1, sem_global: Sequence[bool] | None = None,
               sem_window_size: int | None = None):
    super().__init__()
    self.patch_embed = PatchEmbed(embed_dim)
    if isinstance(num_sem_blocks, int):  # the detectron2 heads' one value for all stages
      num_sem_blocks = (num_sem_blocks,) * len(depths)
    if sem_global is None:
      # SPEC 2: global semantic attention in stages 2, 3 for embed 96/192 and > 19 classes.
      fpn_rule = embed_dim in (96, 192) and num_classes > 19
      sem_global = [fpn_rule and i >= 2 for i in range(len(depths))]
    dpr = [float(v) for v in torch.linspace(0, drop_path_rate, sum(depths))]
    self.layers = nn.ModuleList()
    self.widths = [embed_dim * 2 ** i for i in range(len(depths))]
    for i, depth in enumerate(depths):
      start = sum(depths[:i])
      self.layers.append(BasicLayer(
          self.widths[i], depth, num_heads[i], window_size, dpr[start:start + depth],
          num_classes, num_sem_blocks[i], sem_global[i], sem_dropout,
          downsample=i < len(depths) - 1, sem_ws=sem_window_size))
    for i, width in enumerate(self.widths):
      self.add_module(f"norm{i}", nn.LayerNorm(width))

  def forward(self, x):
    """x: [B, 3, H, W] -> (features, semantic maps), each four [B, C, h_i, w_i] maps."""
    x = self.patch_embed(x)
    h, w = x.shape[2], x.shape[3]
    x = x.flatten(2).transpose(1, 2)
    feats, sems = [], []
    for i, layer in enumerate(self.layers):
      out, sem, x = layer(x, h, w)
      out = getattr(self, f"norm{i}")(out)
      feats.append(out.view(-1, h, w, self.widths[i]).permute(0, 3, 1, 2).contiguous())
      sems.append(sem.view(-1, h, w, sem.shape[-1]).permute(0, 3, 1, 2).contiguous())
      h, w = (h + 1) // 2, (w + 1) // 2
    return feats, sems


# ----------------------------------------------------------------------------
# mmseg's FPNHead with SeMask's semantic decoder, and the loss.
# ----------------------------------------------------------------------------


class ConvModule(nn.Module):

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    self.bn = nn.BatchNorm2d(cout)
    self.activate = nn.ReLU(inplace=True)

  def forward(self, x):
    return self.activate(self.bn(self.conv(x)))


class Upsample(nn.Module):
  """mmseg.ops.Upsample(scale_factor=2): a resize to twice the size."""

  def forward(self, x):
    return F.interpolate(x, size=[2 * s for s in x.shape[-2:]], mode="bilinear",
                         align_corners=False)


class FPNHead(nn.Module):

  def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256,
               strides: Sequence[int] = (4, 8, 16, 32), dropout: float = 0.1):
    super().__init__()
    self.strides = strides
    self.scale_heads = nn.ModuleList()
    for i, stride in enumerate(strides):
      units = []
      for k in range(max(1, int(math.log2(stride // strides[0])))):
        units.append(ConvModule(in_channels[i] if k == 0 else channels, channels))
        if stride != strides[0]:
          units.append(Upsample())
      self.scale_heads.append(nn.Sequential(*units))
    self.dropout = nn.Dropout2d(dropout)
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)

  def forward(self, feats, sems):
    out = self.scale_heads[0](feats[0])
    for i in range(1, len(feats)):
      out = out + F.interpolate(self.scale_heads[i](feats[i]), size=out.shape[2:],
                                mode="bilinear", align_corners=False)
    seg = self.conv_seg(self.dropout(out))
    cls = sems[0]
    for i in range(1, len(sems)):
      y = sems[i]
      for _ in range(int(math.log2(self.strides[i] // self.strides[0]))):
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
      cls = cls + F.interpolate(y, size=cls.shape[2:], mode="bilinear", align_corners=False)
    return seg, cls


class SeMaskFPN(nn.Module):

  def __init__(self, *, num_classes: int, fpn_channels: int = 256, drop_path_rate: float = 0.3,
               sem_dropout: float = 0.1, head_dropout: float = 0.1, **backbone):
    super().__init__()
    self.backbone = SeMaskSwin(num_classes=num_classes, drop_path_rate=drop_path_rate,
                               sem_dropout=sem_dropout, **backbone)
    self.decode_head = FPNHead(self.backbone.widths, num_classes, fpn_channels,
                               dropout=head_dropout)

  def forward(self, images):
    """images [B, 3, H, W] -> (seg_logits, cls_logits, feats, sems), NCHW at stride 4."""
    feats, sems = self.backbone(images)
    seg, cls = self.decode_head(feats, sems)
    return seg, cls, feats, sems


def ohem_weights(ce: torch.Tensor, labels: torch.Tensor, min_kept: int) -> torch.Tensor:
  """mmseg's OHEMPixelSampler without a threshold: the batch * min_kept valid pixels of
  highest CE get weight 1."""
  with torch.no_grad():
    valid = labels != IGNORE_INDEX
    weight = ce.new_zeros(labels.shape)
    valid_weight = weight[valid]
    _, order = ce[valid].sort(descending=True)
    valid_weight[order[:min_kept * labels.shape[0]]] = 1.0
    weight[valid] = valid_weight
  return weight


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
  """mmseg.models.losses.accuracy with topk=1: the percentage of ALL pixels (255 included)
  whose top-1 class is the label."""
  _, pred_label = pred.topk(1, dim=1)
  pred_label = pred_label.transpose(0, 1)  # [1, B, H, W]
  correct = pred_label.eq(target.unsqueeze(0).expand_as(pred_label))
  return correct[:1].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / target.numel())


def decode_head_losses(seg, cls, labels, cate_w: float = 0.4, ohem_min_kept: int | None = None,
                       with_acc: bool = True) -> dict[str, torch.Tensor]:
  """SeMaskBaseDecodeHead.losses: loss_ce, loss_cate (CE of the logits resized to the labels,
  ignore 255, mean over ALL pixels: mmseg's CrossEntropyLoss; the cate term already times
  cate_w) and, as the official head computes in every training iteration, acc_seg (top-1
  accuracy of the resized seg logits)."""
  size = labels.shape[1:]
  seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=False)
  ce = F.cross_entropy(seg, labels, reduction="none", ignore_index=IGNORE_INDEX)
  if ohem_min_kept:
    ce = ce * ohem_weights(ce.detach(), labels, ohem_min_kept)
  cls = F.interpolate(cls, size=size, mode="bilinear", align_corners=False)
  ce2 = F.cross_entropy(cls, labels, reduction="none", ignore_index=IGNORE_INDEX)
  out = {"loss_ce": ce.mean(), "loss_cate": cate_w * ce2.mean()}
  if with_acc:
    out["acc_seg"] = accuracy(seg, labels)
  return out


def segmentation_loss(seg, cls, labels, cate_w: float = 0.4, ohem_min_kept: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
  """(loss_ce, loss_cate) of decode_head_losses, without the accuracy."""
  out = decode_head_losses(seg, cls, labels, cate_w, ohem_min_kept, with_acc=False)
  return out["loss_ce"], out["loss_cate"]


def parse_losses(losses: dict[str, torch.Tensor]) -> torch.Tensor:
  """BaseSegmentor._parse_losses: the sum of the 'loss' entries; every logged value (the
  accuracy included) is read back to the host with .item() in each iteration."""
  log_vars = {k: v.mean() for k, v in losses.items()}
  loss = sum(v for k, v in log_vars.items() if "loss" in k)
  log_vars["loss"] = loss
  for v in log_vars.values():
    v.item()
  return loss


def adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
  """torch AdamW with mmcv's paramwise custom_keys: no decay for NO_DECAY_KEYS names."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if any(k in name for k in NO_DECAY_KEYS) else decay).append(p)
  return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def build(variant: str, num_classes: int, **kwargs) -> SeMaskFPN:
  return SeMaskFPN(num_classes=num_classes, **VARIANTS[variant], **kwargs)


# ----------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------


def synthetic_batch(batch: int, size: int, num_classes: int, seed: int = 0):
  """Normalised random images [B, 3, H, W] and semask_jax.bench's region labels."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
  labels = bench_host.synthetic_labels(rng, batch, size, num_classes).astype(np.int64)
  return torch.from_numpy(images), torch.from_numpy(labels)


def run_bench(*, model: str = "fpn", variant: str = "T", num_classes: int = 150,
              mode: str = "infer", batch: int = 1, size: int = 512, device: str = "cpu",
              amp: bool = False, threads: int | None = None, warmup: int = 1, runs: int = 5,
              lr: float | None = None, weight_decay: float | None = None,
              dcn: str = "auto") -> dict[str, Any]:
  """model 'fpn' (this file; lr 6e-5, weight decay 0.01 by default) or one of the Mask2Former
  family of torch_reference_m2f.py (lr 1e-4, weight decay 0.05)."""
  if threads:
    torch.set_num_threads(threads)
  if amp and device != "cuda":
    raise SystemExit("--amp is for --device cuda (bfloat16 matmuls are emulated on CPUs)")
  if device == "cuda":
    torch.backends.cudnn.benchmark = True  # mmseg's default_runtime: cudnn_benchmark = True
  torch.manual_seed(0)
  images, labels = synthetic_batch(batch, size, num_classes)
  images, labels = images.to(device), labels.to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp)
  extra: dict[str, Any] = {"model": model}
  if model != "fpn":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import torch_reference_m2f as m2f
    if model not in m2f.MODELS:
      raise SystemExit(f"--model {model}: fpn or one of {m2f.MODELS}")
    step, extra = m2f.make_step(
        model, variant=variant, num_classes=num_classes, mode=mode, images=images,
        labels=labels, device=device, autocast=autocast, dcn=dcn,
        lr=1e-4 if lr is None else lr, weight_decay=0.05 if weight_decay is None else weight_decay)
  elif mode == "infer":
    net = build(variant, num_classes).to(device).eval()

    def step():
      with torch.no_grad(), autocast:
        return net(images)[0]
  else:
    net = build(variant, num_classes).to(device).train()
    opt = adamw(net, 6e-5 if lr is None else lr, 0.01 if weight_decay is None else weight_decay)

    def step():
      with autocast:
        seg, cls, _, _ = net(images)
        # SeMaskBaseDecodeHead.losses (acc_seg included) and BaseSegmentor._parse_losses
        loss = parse_losses(decode_head_losses(seg.float(), cls.float(), labels))
      opt.zero_grad()
      loss.backward()
      opt.step()
      return loss

  losses = []

  def timed() -> float:
    t = time.perf_counter()
    out = step()
    if device == "cuda":
      torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    if mode == "train":
      losses.append(float(out))
      if not math.isfinite(losses[-1]):
        raise FloatingPointError(f"training step produced loss {losses[-1]}")
    return elapsed

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  rss_was_reset = bench_host.reset_peak_rss()
  for _ in range(warmup):
    timed()
  times = [timed() for _ in range(runs)]
  if device == "cuda":
    peak, peak_kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
  else:
    peak, peak_kind = bench_host.peak_rss_since_reset(rss_was_reset)
  median = statistics.median(times)
  return dict(
      impl="torch_reference", **extra, variant=variant, num_classes=num_classes, mode=mode,
      batch=batch, size=size, dtype="amp_bfloat16" if amp else "float32",
      threads=torch.get_num_threads(), step_times_s=times, median_step_s=median,
      images_per_s=batch / median, **({"losses": losses} if mode == "train" else {}),
      peak_memory_bytes=peak, peak_memory_kind=peak_kind,
      process_peak_rss_bytes=bench_host.process_peak_rss(),
      device=device if device == "cpu" else f"cuda:{torch.cuda.get_device_name()}",
      host=platform.node(), cpu_count=os.cpu_count(), torch_version=torch.__version__,
      date=datetime.datetime.now().isoformat(timespec="seconds"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="fpn", choices=("fpn", "mask2former", "fapn", "msfapn"),
                 help="SeMask-FPN (this file) or the Mask2Former family (torch_reference_m2f.py)")
  p.add_argument("--variant", default="T", choices=sorted(VARIANTS))
  p.add_argument("--num_classes", type=int, default=150)
  p.add_argument("--mode", choices=("infer", "train"), default="infer")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  p.add_argument("--amp", action="store_true", help="torch.autocast bfloat16 (CUDA)")
  p.add_argument("--threads", type=int, default=None,
                 help="torch.set_num_threads (default: torch's, one per core)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--dcn", default="auto", choices=("auto", "torchvision", "im2col"),
                 help="FaPN/MSFaPN's DCNv2 op (torch_reference_m2f.py); auto: torchvision "
                 "where it imports")
  p.add_argument("--json", default=None, help="also write the result here")
  a = p.parse_args(argv)
  res = run_bench(model=a.model, dcn=a.dcn, variant=a.variant, num_classes=a.num_classes,
                  mode=a.mode, batch=a.batch, size=a.size, device=a.device, amp=a.amp,
                  threads=a.threads, warmup=a.warmup, runs=a.runs)
  print(json.dumps(res))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
