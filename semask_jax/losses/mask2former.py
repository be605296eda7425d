"""The SeMask-Mask2Former set criterion (SPEC section 10), jit-able end to end.

Per prediction (the final one and every auxiliary one) the targets of each
image are matched to queries by an exact in-graph Hungarian matching
(semask_jax.losses.matching) on Mask2Former's cost; the matched pairs then give the
class, mask (BCE) and dice losses on importance-sampled points; the semantic
head adds loss_cate for the final prediction.

Static layout: targets are [B, T] slots (T = max_targets) with a validity mask,
and the matched pairs live in the same [B, T] slots (target t of image b and its
query), so shapes never depend on the data. Padded slots match nothing and add
nothing to any loss or gradient.

Target masks are never materialised: a target mask is (label == class), so its
bilinear sample at a point is the sum of the corner weights whose label pixel
has that class -- the same numbers as sampling the [H, W] 0/1 mask with
bilinear_sample, at the cost of one label gather per point.

Randomness: every point draw comes from a JAX key (set_criterion's `key`: the
matcher's points at once, the mask losses' per computed chunk of slots), or the
caller passes the draws (`CriterionDraws`, e.g. from `draw_points`) -- the golden
test replays the reference's draws this way. Differences from the reference: a label with no valid pixel
gives loss_cate 0 (torch: NaN). The reference has no cap on targets: training's
input pipeline refuses a crop with more classes than max_targets, naming its image
(transforms.CheckTargetSlots); were one to reach the criterion, it would keep its
max_targets smallest classes and count the rest in aux['num_dropped_targets']
(make_targets raises when called outside jit).
Under data parallelism num_masks is the reference's all-reduced count (so the mask
losses are sums over the global batch divided by it, as the reference's DDP average
of per-device losses works out). loss_ce (a weighted mean over queries) and loss_cate
(a mean over non-ignored pixels) are means per group of `group_size` consecutive
images, averaged over the groups: the reference computes them per GPU (2 images) and
DDP averages the GPUs. group_size 0 takes the whole batch as one group.

Memory and work: the matching costs and the point-sampled losses are computed one
prediction at a time (lax.map); the assignments of all predictions and images
run as one batched loop. The mask losses then run over the target slots in chunks
of `slot_chunk` (a lax.scan), and a chunk where no image of the (global) batch has
a target is skipped (lax.cond): slots are filled in class order, so with T = 64
slots and ADE20K's typical 10-30 classes a crop, most of the importance sampling
(37632 points a slot) would otherwise run on padding. With a key, each computed
chunk draws its own points (a skipped chunk draws nothing).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from semask_jax.cli import ConfigError
from semask_jax.losses.matching import linear_sum_assignment
from semask_jax.models.sampling import bilinear_sample, corner_taps

IGNORE_INDEX = 255
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class CriterionConfig:
  """Mask2Former criterion settings (detectron2 MODEL.MASK_FORMER.* names in comments)."""
  num_classes: int
  max_targets: int = 64                  # static target slots per image
  slot_chunk: int = 8                    # target slots per step of the mask losses
  train_num_points: int = 12544          # TRAIN_NUM_POINTS
  oversample_ratio: float = 3.0          # OVERSAMPLE_RATIO
  importance_sample_ratio: float = 0.75  # IMPORTANCE_SAMPLE_RATIO
  class_weight: float = 2.0              # CLASS_WEIGHT (also the matcher's cost_class)
  mask_weight: float = 5.0               # MASK_WEIGHT (cost_mask)
  dice_weight: float = 5.0               # DICE_WEIGHT (cost_dice)
  cate_weight: float = 0.4               # SeMask's semantic-head weight
  no_object_weight: float = 0.1          # NO_OBJECT_WEIGHT
  ignore_index: int = IGNORE_INDEX
  group_size: int = 0                    # images per loss_ce / loss_cate mean (0: all)

  def __post_init__(self):
    check_slots_and_groups(self)

  @property
  def empty_weight(self) -> np.ndarray:
    """The reference criterion's buffer: class weights ones(K + 1), no-object last."""
    w = np.ones(self.num_classes + 1, np.float32)
    w[-1] = self.no_object_weight
    return w

  @property
  def num_oversampled(self) -> int:
    return int(self.train_num_points * self.oversample_ratio)

  @property
  def num_uncertain(self) -> int:
    return int(self.importance_sample_ratio * self.train_num_points)

  @property
  def num_random(self) -> int:
    return self.train_num_points - self.num_uncertain


def group_mean(num: jax.Array, den: jax.Array, group_size: int) -> jax.Array:
  """Per-image numerators and denominators [B] -> the mean over groups of `group_size`
  consecutive images of sum(num) / sum(den) in the group (0: one group; a group whose
  denominator is 0 counts 0). The reference's per-GPU mean, averaged by DDP."""
  b = num.shape[0]
  g = group_size or b
  if b % g:
    raise ConfigError(f"config.loss.group_size={group_size} does not divide the "
                      f"(micro) batch of {b} images")
  num, den = num.reshape(b // g, g).sum(1), den.reshape(b // g, g).sum(1)
  return jnp.mean(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0))


def check_slots_and_groups(cfg: Any) -> None:
  """The config checks every set criterion shares: its target slots, its chunks of them,
  and the loss groups (config.loss.max_targets, slot_chunk, group_size)."""
  for name in ("max_targets", "slot_chunk"):
    if getattr(cfg, name) < 1:
      raise ConfigError(f"config.loss.{name} must be >= 1, got {getattr(cfg, name)}")
  check_group_size(cfg.group_size)


def check_group_size(group: Any) -> int:
  """config.loss.group_size (the images of one loss mean and of one OHEM selection),
  refused unless an integer >= 0."""
  if not isinstance(group, int) or group < 0:
    raise ConfigError("config.loss.group_size must be an integer >= 0 (0: the whole "
                      f"batch), got {group!r}")
  return group


class CriterionDraws(NamedTuple):
  """The criterion's uniform [0, 1) (x, y) point draws, L1 = number of predictions."""
  match_points: jax.Array        # [L1, B, P, 2] matcher points, one set per image
  oversampled_points: jax.Array  # [L1, B, T, int(P * oversample_ratio), 2] per pair slot
  random_points: jax.Array       # [L1, B, T, P - int(P * importance_ratio), 2] per pair slot


def draw_points(key: jax.Array, num_predictions: int, batch: int, cfg: CriterionConfig
                ) -> CriterionDraws:
  """All the criterion's draws at once (what set_criterion draws from a key only for the
  chunks of slots it computes: another stream, the same distribution)."""
  k1, k2, k3 = jax.random.split(key, 3)
  lb, t = (num_predictions, batch), cfg.max_targets
  return CriterionDraws(
      jax.random.uniform(k1, lb + (cfg.train_num_points, 2), jnp.float32),
      jax.random.uniform(k2, lb + (t, cfg.num_oversampled, 2), jnp.float32),
      jax.random.uniform(k3, lb + (t, cfg.num_random, 2), jnp.float32))


def _chunk_draws(key: jax.Array, chunk: jax.Array, batch: int, slots: int,
                 cfg: CriterionConfig) -> tuple[jax.Array, jax.Array]:
  """One chunk's (oversampled [B, S, M, 2], random [B, S, R, 2]) draws from a
  prediction's key."""
  k2, k3 = jax.random.split(jax.random.fold_in(key, chunk))
  return (jax.random.uniform(k2, (batch, slots, cfg.num_oversampled, 2), jnp.float32),
          jax.random.uniform(k3, (batch, slots, cfg.num_random, 2), jnp.float32))


# ----------------------------------------------------------------------------- targets


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def present_classes(label: jax.Array, num_classes: int, max_targets: int,
                    ignore_index: int = IGNORE_INDEX
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """label [B, H, W] -> (classes [B, T] int32 increasing, -1 padded; valid [B, T] bool;
  number of classes present [B] int32). Values outside [0, num_classes) count as ignored."""
  del ignore_index  # anything outside [0, K) is not a target, 255 included
  b = label.shape[0]
  flat = label.reshape(b, -1).astype(jnp.int32)
  inside = (flat >= 0) & (flat < num_classes)
  idx = jnp.where(inside, flat, num_classes)  # out-of-range pixels land in a spare bin
  presence = jax.vmap(lambda x: jnp.zeros((num_classes + 1,), bool).at[x].set(True))(idx)
  presence = presence[:, :num_classes]  # [B, K]
  count = presence.sum(-1).astype(jnp.int32)
  classes = jax.vmap(lambda p: jnp.nonzero(p, size=max_targets, fill_value=-1)[0])(presence)
  classes = classes.astype(jnp.int32)
  return classes, classes >= 0, count


def make_targets(label: jax.Array, num_classes: int, max_targets: int,
                 ignore_index: int = IGNORE_INDEX
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per image the classes present in label [B, H, W] (ignore excluded) in increasing
  order -> (classes [B, T] int32 (-1 padded), masks [B, T, H, W] float32 0/1, valid [B, T]).

  An image with more than T classes keeps its T smallest ones; called on concrete
  arrays this raises ValueError instead (under jit use present_classes' count, which
  the criterion reports as aux['num_dropped_targets']).
  """
  classes, valid, count = present_classes(label, num_classes, max_targets, ignore_index)
  try:
    most = int(jnp.max(count))
  except jax.errors.ConcretizationTypeError:  # traced: no check possible here
    most = 0
  if most > max_targets:
    raise ValueError(f"an image has {most} classes > max_targets={max_targets}")
  masks = (label[:, None] == classes[:, :, None, None]) & valid[:, :, None, None]
  return classes, masks.astype(jnp.float32), valid


def sample_label_masks(label: jax.Array, classes: jax.Array, points: jax.Array) -> jax.Array:
  """bilinear_sample of the 0/1 masks (label == classes[b, t]) without building them.

  label [B, H, W]; classes [B, T] (-1 = none); points [B, N, 2] shared by all targets
  -> [B, N, T], or points [B, T, N, 2] one set per target -> [B, T, N]. float32.
  """
  b, h, w = label.shape
  index, weights = corner_taps(points, h, w)                      # [B, ..., 4]
  flat = label.reshape(b, h * w).astype(jnp.int32)
  taps = jnp.take_along_axis(flat, index.reshape(b, -1), axis=1).reshape(index.shape)
  if points.ndim == 3:
    hit = taps[..., None] == classes[:, None, None, :]            # [B, N, 4, T]
    wts = weights[..., None]
    axis = 2
  else:
    hit = taps == classes[:, :, None, None]                       # [B, T, N, 4]
    wts = weights
    axis = 3
  terms = jnp.where(hit, wts, 0.0)
  # Summed in bilinear_sample's (torch's) order: ((nw + ne) + sw) + se.
  take = lambda k: jax.lax.index_in_dim(terms, k, axis, keepdims=False)
  return ((take(0) + take(1)) + take(2)) + take(3)


# ----------------------------------------------------------------------------- matcher


def _bce_with_logits(x: jax.Array, y: jax.Array | float) -> jax.Array:
  """torch F.binary_cross_entropy_with_logits(reduction='none'):
  max(x, 0) - x y + log1p(exp(-|x|))."""
  return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def match_cost(logits: jax.Array, mask_points: jax.Array, target_points: jax.Array,
               classes: jax.Array, cfg: CriterionConfig) -> jax.Array:
  """Mask2Former's matching cost for one image: logits [Q, K+1], mask logits at the
  points [P, Q], target masks at the points [P, T], classes [T] -> C [Q, T]
  (batch_sigmoid_ce_loss, batch_dice_loss and -softmax of the target class)."""
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  cost_class = -jnp.take(prob, jnp.clip(classes, 0), axis=1)          # [Q, T]
  x, y = mask_points.astype(jnp.float32), target_points.astype(jnp.float32)
  n = x.shape[0]
  pos = _bce_with_logits(x, 1.0)                                       # [P, Q]
  neg = _bce_with_logits(x, 0.0)
  cost_mask = (jnp.einsum("pq,pt->qt", pos, y, precision=_HIGHEST)
               + jnp.einsum("pq,pt->qt", neg, 1.0 - y, precision=_HIGHEST)) / n
  s = jax.nn.sigmoid(x)
  numerator = 2.0 * jnp.einsum("pq,pt->qt", s, y, precision=_HIGHEST)
  denominator = s.sum(0)[:, None] + y.sum(0)[None, :]
  cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
  return (cfg.mask_weight * cost_mask + cfg.class_weight * cost_class
          + cfg.dice_weight * cost_dice)


def batch_match_cost(pred_logits: jax.Array, pred_masks: jax.Array, label: jax.Array,
                     classes: jax.Array, match_points: jax.Array, cfg: CriterionConfig
                     ) -> jax.Array:
  """The matching costs [B, Q, T] of one prediction: pred_logits [B, Q, K+1], pred_masks
  [B, Q, h, w], label [B, H, W], target classes [B, T], match_points [B, P, 2]. No
  gradient."""
  pred_logits, pred_masks = jax.lax.stop_gradient((pred_logits, pred_masks))
  masks_nhwc = jnp.moveaxis(pred_masks.astype(jnp.float32), 1, -1)    # [B, h, w, Q]
  mask_points = bilinear_sample(masks_nhwc, match_points)              # [B, P, Q]
  target_points = sample_label_masks(label, classes, match_points)     # [B, P, T]
  return jax.vmap(match_cost, in_axes=(0, 0, 0, 0, None))(
      pred_logits, mask_points, target_points, classes, cfg)           # [B, Q, T]


def match(pred_logits: jax.Array, pred_masks: jax.Array, label: jax.Array,
          classes: jax.Array, valid: jax.Array, match_points: jax.Array,
          cfg: CriterionConfig) -> jax.Array:
  """Hungarian matching of one prediction (batch_match_cost's arguments plus valid
  [B, T]) -> the query of each target [B, T] int32 (-1 for padded slots)."""
  cost = batch_match_cost(pred_logits, pred_masks, label, classes, match_points, cfg)
  return jax.vmap(linear_sum_assignment)(cost, valid)


# ----------------------------------------------------------------------------- losses


def importance_points(mask_logits: jax.Array, oversampled: jax.Array, random: jax.Array,
                      num_uncertain: int) -> jax.Array:
  """detectron2 get_uncertain_point_coords_with_randomness with calculate_uncertainty
  = -|logit|: mask_logits [N, h, w], oversampled [N, M, 2], random [N, R, 2] -> the
  num_uncertain most uncertain oversampled points (most uncertain first) then the
  random ones [N, num_uncertain + R, 2]. No gradient."""
  logits = jax.lax.stop_gradient(mask_logits)[..., None]               # [N, h, w, 1]
  at = bilinear_sample(logits, oversampled)[..., 0]                    # [N, M]
  _, idx = jax.lax.top_k(-jnp.abs(at), num_uncertain)                  # [N, k]
  chosen = jnp.take_along_axis(oversampled, idx[..., None], axis=1)    # [N, k, 2]
  return jnp.concatenate([chosen, random], axis=1)


def _prediction_losses(pred_logits: jax.Array, pred_masks: jax.Array, query: jax.Array,
                       draws: Any, label: jax.Array, classes: jax.Array,
                       num_masks: jax.Array, cfg: CriterionConfig
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss_ce, loss_mask, loss_dice) of one prediction given its matching query [B, T]
  and its pair-slot draws: (over [B, T, M, 2], rand [B, T, R, 2]), or a PRNG key from
  which each computed chunk of slots draws its own (_chunk_draws)."""
  b, q = pred_logits.shape[:2]
  t = classes.shape[1]
  paired = query >= 0                                                  # [B, T]

  # Classification: every query, matched class or no-object (K), weighted mean.
  k = cfg.num_classes
  hits = (query[:, None, :] == jnp.arange(q, dtype=jnp.int32)[None, :, None]) & paired[:, None]
  target_class = jnp.where(hits.any(-1), jnp.sum(jnp.where(hits, classes[:, None], 0), -1), k)
  logits = pred_logits.astype(jnp.float32)                             # [B, Q, K+1]
  onehot = (target_class[..., None] == jnp.arange(k + 1)).astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.sum(logits * onehot, -1)    # [B, Q]
  weight = jnp.asarray(cfg.empty_weight)[target_class]                 # [B, Q]
  loss_ce = group_mean(jnp.sum(weight * nll, -1), jnp.sum(weight, -1), cfg.group_size)

  # Masks: chunks of `s` slots; a chunk with no pair in the whole batch is skipped. The
  # matched masks are gathered once and scanned over (a closed-over pred_masks would
  # have its whole gradient accumulated at every chunk).
  s = min(cfg.slot_chunk, t)
  n_chunks = -(-t // s)
  pad = n_chunks * s - t
  src = jnp.take_along_axis(pred_masks.astype(jnp.float32),
                            jnp.clip(query, 0)[:, :, None, None], axis=1)  # [B, T, h, w]
  per_slot = [src, query, classes]
  keyed = isinstance(draws, jax.Array)
  if not keyed:
    per_slot += list(draws)                                            # [B, T, M|R, 2]
  if pad:  # padded slots: no class, no query, any draw
    per_slot = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2),
                        constant_values=-1 if x.dtype == jnp.int32 else 0) for x in per_slot]
  chunked = [jnp.moveaxis(x.reshape((b, n_chunks, s) + x.shape[2:]), 1, 0)
             for x in per_slot]                                        # [n, B, s, ...]

  def chunk_sums(c: jax.Array, xs: list[jax.Array]) -> jax.Array:
    """[sum of the pairs' BCE, sum of their dice] over the slots of chunk c."""
    src, qc, cls = xs[:3]
    over, rand = _chunk_draws(draws, c, b, s, cfg) if keyed else xs[3:]
    src = src.reshape((b * s,) + src.shape[2:])                        # [B*S, h, w]
    over = over.reshape((b * s,) + over.shape[2:])
    rand = rand.reshape((b * s,) + rand.shape[2:])
    points = importance_points(src, over, rand, cfg.num_uncertain)     # [B*S, P, 2]
    point_logits = bilinear_sample(src[..., None], points)[..., 0]     # [B*S, P]
    point_labels = sample_label_masks(label, cls, points.reshape((b, s) + points.shape[1:]))
    point_labels = point_labels.reshape(b * s, -1)                     # [B*S, P]
    bce = _bce_with_logits(point_logits, point_labels).mean(-1)        # [B*S]
    sig = jax.nn.sigmoid(point_logits)
    dice = 1.0 - (2.0 * jnp.sum(sig * point_labels, -1) + 1.0) / (
        sig.sum(-1) + point_labels.sum(-1) + 1.0)
    keep = (qc >= 0).reshape(-1)
    return jnp.stack([jnp.sum(jnp.where(keep, bce, 0.0)), jnp.sum(jnp.where(keep, dice, 0.0))])

  def step(total, cx):
    c, xs = cx
    live = jnp.any(xs[1] >= 0)
    skip = lambda c, xs: jnp.zeros((2,), jnp.float32)  # noqa: E731
    return total + jax.lax.cond(live, chunk_sums, skip, c, xs), None

  sums, _ = jax.lax.scan(step, jnp.zeros((2,), jnp.float32), (jnp.arange(n_chunks), chunked))
  return loss_ce, sums[0] / num_masks, sums[1] / num_masks


def semantic_ce(sem_pred: jax.Array, label: jax.Array, ignore_index: int = IGNORE_INDEX,
                group_size: int = 0) -> jax.Array:
  """F.cross_entropy(sem_pred, label, ignore_index): sem_pred [B, H, W, K] at the label's
  size -> mean over the non-ignored pixels (0 when there is none) of each group of
  `group_size` images (0: the whole batch), averaged over the groups."""
  assert sem_pred.shape[1:3] == label.shape[1:3], (sem_pred.shape, label.shape)
  z = sem_pred.astype(jnp.float32)
  valid = label != ignore_index
  safe = jnp.where(valid, label, 0).astype(jnp.int32)
  onehot = (safe[..., None] == jnp.arange(z.shape[-1], dtype=jnp.int32)).astype(z.dtype)
  ce = jax.nn.logsumexp(z, axis=-1) - jnp.sum(z * onehot, axis=-1)
  return group_mean(jnp.sum(jnp.where(valid, ce, 0.0), (1, 2)),
                    valid.sum((1, 2)).astype(jnp.float32), group_size)


def set_criterion(outputs: Mapping[str, Any], label: jax.Array, cfg: CriterionConfig, *,
                  key: jax.Array | None = None, draws: CriterionDraws | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SeMaskSetCriterion on outputs {'pred_logits' [L1, B, Q, K+1], 'pred_masks'
  [L1, B, Q, h, w], 'sem_pred' [B, H, W, K]} (index L1 - 1 = final prediction) and
  label [B, H, W] -> (total, aux).

  aux: loss_ce, loss_mask, loss_dice, loss_cate [L1] unweighted (loss_cate nonzero only
  for the final prediction), num_masks, matches [L1, B, T] (query per target slot),
  num_dropped_targets [B]. Point draws come from `key` unless `draws` is given.
  num_masks counts the valid targets of the whole (global) batch, clamped at >= 1.
  """
  pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
  n_pred, b = pred_logits.shape[:2]
  if draws is None:
    if key is None:
      raise ValueError("set_criterion needs a PRNG key or explicit draws")
    k1, k2 = jax.random.split(key)
    match_points = jax.random.uniform(k1, (n_pred, b, cfg.train_num_points, 2), jnp.float32)
    slot_draws = jax.random.split(k2, n_pred)  # [L1] keys: each chunk draws its own
  else:
    match_points, slot_draws = draws.match_points, (draws.oversampled_points,
                                                    draws.random_points)
  classes, valid, count = present_classes(label, cfg.num_classes, cfg.max_targets,
                                          cfg.ignore_index)
  num_masks = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
  # Costs and losses one prediction at a time (bounds the memory of the point
  # sampling); the assignments of all predictions and images in one batched loop.
  cost = jax.lax.map(lambda a: batch_match_cost(*a[:2], label, classes, a[2], cfg),
                     (pred_logits, pred_masks, match_points))            # [L1, B, Q, T]
  matches = jax.vmap(jax.vmap(linear_sum_assignment), in_axes=(0, None))(cost, valid)
  loss_ce, loss_mask, loss_dice = jax.lax.map(
      lambda a: _prediction_losses(*a, label, classes, num_masks, cfg),
      (pred_logits, pred_masks, matches, slot_draws))
  cate = semantic_ce(outputs["sem_pred"], label, cfg.ignore_index, cfg.group_size)
  loss_cate = jnp.zeros((n_pred,), jnp.float32).at[-1].set(cate)
  total = jnp.sum(cfg.class_weight * loss_ce + cfg.mask_weight * loss_mask
                  + cfg.dice_weight * loss_dice + cfg.cate_weight * loss_cate)
  aux = {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice,
         "loss_cate": loss_cate, "num_masks": num_masks, "matches": matches,
         "num_dropped_targets": jnp.maximum(count - cfg.max_targets, 0)}
  return total, aux
