"""The SeMask-MaskFormer set criterion (SPEC section 11), jit-able end to end.

MaskFormer's criterion differs from Mask2Former's (losses/mask2former.py) in where the
masks are compared, not in its structure, so the static layout, the targets, the
per-group means, the exact in-graph Hungarian matching and loss_cate are
mask2former.py's and matching.py's:
  * matcher: C = 1 x (-softmax class) + 20 x focal cost + 1 x dice cost over ALL
    pixels of the H/4 x W/4 prediction, the targets read there by torch "nearest"
    (pixel (4i, 4j) of each 4x4 block), no random points;
  * losses: sigmoid focal (alpha 0.25, gamma 2) and dice on FULL-resolution masks,
    the matched predictions upsampled bilinearly (align_corners=False) from H/4 to the
    (padded) label size; the no-object-weighted CE over all queries;
  * deep supervision over the decoder's predictions (6), loss_cate for the final one.

Static layout as mask2former.py: targets are [B, T] slots (T = max_targets) with a
validity mask, the matched query of each slot in the same layout; padded slots match
nothing and add nothing. Target masks are (label == class): ignored (255) and padded
pixels are 0 in every target, as the reference's padded masks. num_masks counts the
valid targets of the whole (global) batch, clamped at >= 1 (the reference's
all-reduced average times the device count; its loss is a sum over matched pairs
divided by it, so the global form is the same number). loss_ce and loss_cate are
means per group of `group_size` consecutive images averaged over the groups, as the
reference's per-GPU means averaged by DDP (0: the whole batch as one group).

Memory: the full-resolution mask losses run over the target slots in chunks of
`slot_chunk` (a lax.scan; a chunk where no image has a target is skipped by
lax.cond), each chunk rematerialised in the backward pass, so what is kept is the
H/4 matched masks, not [B, T, H, W] maps.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from semask_jax.losses.mask2former import (IGNORE_INDEX, _bce_with_logits,
                                           check_slots_and_groups, group_mean,
                                           present_classes, semantic_ce)
from semask_jax.losses.matching import linear_sum_assignment
from semask_jax.models.resize import nearest_index
from semask_jax.models.resize import resize_bilinear

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class MaskFormerCriterionConfig:
  """MaskFormer criterion settings (detectron2 MODEL.MASK_FORMER.* names in comments)."""
  num_classes: int
  max_targets: int = 64          # static target slots per image
  slot_chunk: int = 8            # target slots per step of the full-resolution mask losses
  class_weight: float = 1.0      # cost_class of the matcher; loss_ce's weight is 1 too
  mask_weight: float = 20.0      # MASK_WEIGHT (the matcher's cost_mask)
  dice_weight: float = 1.0       # DICE_WEIGHT (cost_dice)
  cate_weight: float = 0.4       # SeMask's semantic-head weight
  no_object_weight: float = 0.1  # NO_OBJECT_WEIGHT
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  ignore_index: int = IGNORE_INDEX
  group_size: int = 0            # images per loss_ce / loss_cate mean (0: all)

  def __post_init__(self):
    check_slots_and_groups(self)


# ----------------------------------------------------------------------------- matcher


def nearest_label(label: jax.Array, size: tuple[int, int]) -> jax.Array:
  """label [B, H, W] read at the prediction's grid `size` by torch 'nearest' (source
  pixel floor(dst * in / out): (4i, 4j) at stride 4) -> [B, h, w]. Resizing the label
  then comparing is resizing each 0/1 target mask: nearest only picks pixels."""
  rows = nearest_index(label.shape[1], int(size[0]))
  cols = nearest_index(label.shape[2], int(size[1]))
  return label[:, rows][:, :, cols]


def match_cost(logits: jax.Array, masks: jax.Array, targets: jax.Array, classes: jax.Array,
               cfg: MaskFormerCriterionConfig) -> jax.Array:
  """MaskFormer's matching cost for one image: logits [Q, K+1], mask logits [Q, N] and
  0/1 targets [N, T] over the N = h*w pixels, classes [T] -> C [Q, T]
  (batch_sigmoid_focal_loss, batch_dice_loss and -softmax of the target class)."""
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  cost_class = -jnp.take(prob, jnp.clip(classes, 0), axis=1)          # [Q, T]
  x, y = masks.astype(jnp.float32), targets.astype(jnp.float32)
  n = x.shape[1]
  p = jax.nn.sigmoid(x)
  a, g = cfg.focal_alpha, cfg.focal_gamma
  focal_pos = (1.0 - p) ** g * _bce_with_logits(x, 1.0) * a            # [Q, N]
  focal_neg = p ** g * _bce_with_logits(x, 0.0) * (1.0 - a)
  cost_mask = (jnp.einsum("qn,nt->qt", focal_pos, y, precision=_HIGHEST)
               + jnp.einsum("qn,nt->qt", focal_neg, 1.0 - y, precision=_HIGHEST)) / n
  numerator = 2.0 * jnp.einsum("qn,nt->qt", p, y, precision=_HIGHEST)
  denominator = p.sum(-1)[:, None] + y.sum(0)[None, :]
  cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
  return (cfg.mask_weight * cost_mask + cfg.class_weight * cost_class
          + cfg.dice_weight * cost_dice)


def batch_match_cost(pred_logits: jax.Array, pred_masks: jax.Array, label: jax.Array,
                     classes: jax.Array, cfg: MaskFormerCriterionConfig) -> jax.Array:
  """The matching costs [B, Q, T] of one prediction: pred_logits [B, Q, K+1], pred_masks
  [B, Q, h, w], label [B, H, W] (padded), target classes [B, T]. No gradient."""
  pred_logits, pred_masks = jax.lax.stop_gradient((pred_logits, pred_masks))
  b, q, h, w = pred_masks.shape
  small = nearest_label(label, (h, w)).reshape(b, h * w, 1)            # [B, N, 1]
  targets = (small == classes[:, None, :]).astype(jnp.float32)         # [B, N, T]
  return jax.vmap(match_cost, in_axes=(0, 0, 0, 0, None))(
      pred_logits, pred_masks.reshape(b, q, h * w), targets, classes, cfg)


def match(pred_logits: jax.Array, pred_masks: jax.Array, label: jax.Array,
          classes: jax.Array, valid: jax.Array, cfg: MaskFormerCriterionConfig) -> jax.Array:
  """Hungarian matching of one prediction -> the query of each target slot [B, T] int32
  (-1 for padded slots)."""
  cost = batch_match_cost(pred_logits, pred_masks, label, classes, cfg)
  return jax.vmap(linear_sum_assignment)(cost, valid)


# ----------------------------------------------------------------------------- losses


def class_loss(pred_logits: jax.Array, query: jax.Array, classes: jax.Array,
               cfg: MaskFormerCriterionConfig) -> jax.Array:
  """loss_ce: cross-entropy of every query [B, Q, K+1] against its matched class (query
  [B, T] per target slot, classes [B, T]) or no-object (K), weights 1 / no_object_weight,
  weighted mean (F.cross_entropy with empty_weight) per group of cfg.group_size images,
  averaged over the groups."""
  q = pred_logits.shape[1]
  k = cfg.num_classes
  paired = query >= 0                                                  # [B, T]
  hits = (query[:, None, :] == jnp.arange(q, dtype=jnp.int32)[None, :, None]) & paired[:, None]
  target_class = jnp.where(hits.any(-1), jnp.sum(jnp.where(hits, classes[:, None], 0), -1), k)
  logits = pred_logits.astype(jnp.float32)                             # [B, Q, K+1]
  onehot = (target_class[..., None] == jnp.arange(k + 1)).astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.sum(logits * onehot, -1)    # [B, Q]
  weight = jnp.where(target_class == k, cfg.no_object_weight, 1.0)
  return group_mean(jnp.sum(weight * nll, -1), jnp.sum(weight, -1), cfg.group_size)


def _focal_dice(src: jax.Array, label: jax.Array, cls: jax.Array,
                cfg: MaskFormerCriterionConfig) -> jax.Array:
  """src [B, S, h, w] matched mask logits, label [B, H, W], cls [B, S] (-1 = empty slot)
  -> [2]: the sums over live slots of the per-mask focal mean and of the dice loss, at
  the label's resolution."""
  x = resize_bilinear(jnp.moveaxis(src, 1, -1), label.shape[1:3])      # [B, H, W, S]
  t = (label[..., None] == cls[:, None, None, :]).astype(jnp.float32)  # [B, H, W, S]
  p = jax.nn.sigmoid(x)
  ce = _bce_with_logits(x, t)
  p_t = p * t + (1.0 - p) * (1.0 - t)
  a = cfg.focal_alpha
  focal = (a * t + (1.0 - a) * (1.0 - t)) * ce * (1.0 - p_t) ** cfg.focal_gamma
  focal = focal.mean((1, 2))                                           # [B, S]
  dice = 1.0 - (2.0 * jnp.sum(p * t, (1, 2)) + 1.0) / (p.sum((1, 2)) + t.sum((1, 2)) + 1.0)
  live = cls >= 0
  return jnp.stack([jnp.sum(jnp.where(live, focal, 0.0)), jnp.sum(jnp.where(live, dice, 0.0))])


def mask_losses(pred_masks: jax.Array, query: jax.Array, label: jax.Array, classes: jax.Array,
                num_masks: jax.Array, cfg: MaskFormerCriterionConfig
                ) -> tuple[jax.Array, jax.Array]:
  """(loss_mask, loss_dice) of one prediction: pred_masks [B, Q, h, w], the matched query
  per target slot [B, T] (-1 none), label [B, H, W], classes [B, T]; sums over the
  matched pairs divided by num_masks."""
  b, t = query.shape
  s = min(cfg.slot_chunk, t)
  n_chunks = -(-t // s)
  pad = n_chunks * s - t
  cls = jnp.where(query >= 0, classes, -1)                             # only matched slots
  # The matched masks gathered once and scanned over (a closed-over pred_masks would have
  # its whole gradient accumulated at every chunk).
  src = jnp.take_along_axis(pred_masks.astype(jnp.float32),
                            jnp.clip(query, 0)[:, :, None, None], axis=1)  # [B, T, h, w]
  if pad:
    src = jnp.pad(src, [(0, 0), (0, pad), (0, 0), (0, 0)])
    cls = jnp.pad(cls, [(0, 0), (0, pad)], constant_values=-1)
  src = jnp.moveaxis(src.reshape((b, n_chunks, s) + src.shape[2:]), 1, 0)  # [n, B, s, h, w]
  cls = jnp.moveaxis(cls.reshape(b, n_chunks, s), 1, 0)                 # [n, B, s]
  chunk = jax.checkpoint(lambda x, c: _focal_dice(x, label, c, cfg))
  skip = lambda x, c: jnp.zeros((2,), jnp.float32)  # noqa: E731

  def step(total, xs):
    x, c = xs
    return total + jax.lax.cond(jnp.any(c >= 0), chunk, skip, x, c), None

  sums, _ = jax.lax.scan(step, jnp.zeros((2,), jnp.float32), (src, cls))
  return sums[0] / num_masks, sums[1] / num_masks


def set_criterion(outputs: Mapping[str, Any], label: jax.Array, cfg: MaskFormerCriterionConfig,
                  *, matches: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SeMaskSetCriterion (MaskFormer) on outputs {'pred_logits' [L, B, Q, K+1],
  'pred_masks' [L, B, Q, h, w], 'sem_pred' [B, H, W, K]} (index L - 1 = final
  prediction) and the padded label [B, H, W] -> (total, aux).

  aux: loss_ce, loss_mask, loss_dice, loss_cate [L] unweighted (loss_cate nonzero only for
  the final prediction), num_masks, matches [L, B, T] (query per target slot), costs
  [L, B, Q, T], num_dropped_targets [B]. `matches` replaces the Hungarian matching (e.g.
  the reference's stored assignment); the costs are computed either way.
  """
  pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
  n_pred = pred_logits.shape[0]
  classes, valid, count = present_classes(label, cfg.num_classes, cfg.max_targets,
                                          cfg.ignore_index)
  num_masks = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
  # Costs one prediction at a time (bounds the memory of the [Q, h*w] focal terms); the
  # assignments of all predictions and images in one batched loop.
  cost = jax.lax.map(lambda a: batch_match_cost(*a, label, classes, cfg),
                     (pred_logits, pred_masks))                          # [L, B, Q, T]
  if matches is None:
    matches = jax.vmap(jax.vmap(linear_sum_assignment), in_axes=(0, None))(cost, valid)
  loss_ce = jax.vmap(lambda lg, m: class_loss(lg, m, classes, cfg))(pred_logits, matches)
  loss_mask, loss_dice = jax.lax.map(
      lambda a: mask_losses(a[0], a[1], label, classes, num_masks, cfg), (pred_masks, matches))
  cate = semantic_ce(outputs["sem_pred"], label, cfg.ignore_index, cfg.group_size)
  loss_cate = jnp.zeros((n_pred,), jnp.float32).at[-1].set(cate)
  total = jnp.sum(cfg.class_weight * loss_ce + cfg.mask_weight * loss_mask
                  + cfg.dice_weight * loss_dice + cfg.cate_weight * loss_cate)
  aux = {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice,
         "loss_cate": loss_cate, "num_masks": num_masks, "matches": matches, "costs": cost,
         "num_dropped_targets": jnp.maximum(count - cfg.max_targets, 0)}
  return total, aux
