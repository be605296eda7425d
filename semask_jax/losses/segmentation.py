"""The SeMask loss: CE on the Semantic-FPN logits + alpha * CE on the semantic decoder.

Reduction 'reference' is mmseg's: the mean over ALL label pixels, ignored
pixels counting as zero loss but as pixels in the denominator. 'valid' divides
by the number of non-ignored pixels instead. OHEM (mmseg OHEMPixelSampler with
no threshold) weights the batch_size * min_kept hardest valid pixels of the
main loss by 1 and all others by 0; the semantic-decoder loss is never sampled.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from semask_jax.losses import pallas_ce
from semask_jax.cli import ConfigError
from semask_jax.models.resize import phase_rows, phase_taps, resize_bilinear


def onehot_labels(labels: jax.Array, num_classes: int, ignore_index: int,
                  dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """One-hot [..., K] of integer labels (ignored pixels -> class 0) and their mask [...]."""
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  return (safe[..., None] == jnp.arange(num_classes, dtype=jnp.int32)).astype(dtype), valid


def ce_and_logsumexp(z: jax.Array, labels: jax.Array, ignore_index: int
                     ) -> tuple[jax.Array, jax.Array]:
  """Per-pixel CE of full-resolution logits z [..., K] at integer labels (ignored -> 0),
  and the logsumexp [...] it used (a hand-written backward keeps it).

  CE = logsumexp(z) - z[label]. The label's logit is picked with a one-hot
  multiply-and-reduce rather than take_along_axis, whose backward pass is a
  scatter into the full-resolution map (one slow serial loop on a CPU).
  """
  onehot, valid = onehot_labels(labels, z.shape[-1], ignore_index, z.dtype)
  # A product, not where(onehot, z, 0): the backward of `where` selects against a
  # full-size zero map, which XLA hoists out of the blocked loss's loop and keeps.
  picked = jnp.sum(z * onehot, axis=-1)
  lse = jax.nn.logsumexp(z, axis=-1)
  return jnp.where(valid, lse - picked, 0.0), lse


def _ce_from_logits(z: jax.Array, labels: jax.Array, ignore_index: int) -> jax.Array:
  return ce_and_logsumexp(z, labels, ignore_index)[0]


def _rows_per_chunk(h: int, target: int = 16) -> int:
  return max(r for r in range(1, min(h, target) + 1) if h % r == 0)


def row_blocks(logits: jax.Array, labels: jax.Array, r: int, factor: int
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """logits [B, h, w, K] and labels [B, h * factor, W] cut into h / r blocks of r rows:
  (rows [n, B, r, w, K], the halo row above and below each [n, B, 1, w, K] (edges
  clamped), labels [n, B, r * factor, W])."""
  b, h, w, k = logits.shape
  n = h // r
  above = jnp.concatenate([logits[:, :1], logits[:, r - 1:h - 1:r]], axis=1)  # [B, n, w, K]
  below = jnp.concatenate([logits[:, r:h:r], logits[:, h - 1:]], axis=1)
  rows = logits.reshape(b, n, r, w, k).swapaxes(0, 1)
  above, below = above.swapaxes(0, 1)[:, :, None], below.swapaxes(0, 1)[:, :, None]
  lab = labels.reshape(b, n, r * factor, labels.shape[2]).swapaxes(0, 1)
  return rows, above, below, lab


CE_BACKWARDS = ("auto", "remat", "custom_vjp", "pallas")


def check_ce_backward(backward: str) -> str:
  """backward, if it is one of CE_BACKWARDS ('auto': remat when lowered for the CPU,
  custom_vjp for any other platform; lax.platform_dependent picks at lowering; 'pallas':
  the forward and the backward as fused Triton kernels, pallas_ce.py, on GPUs; lowered
  for the CPU, the same kernels in Pallas' interpreter (slow: for tests); for a TPU, or
  where the shapes do not fit the kernels, custom_vjp).

  On an H200 (docs/performance.md, "fourth lease") the hand-written backward made the up-sampled
  CE of a [16, 128, 128, 150] map 18 % faster (10.06 -> 8.20 ms for value and gradient):
  it does not run each block's forward a second time. On the 2-core CPU it was slower
  (559 -> 761 ms at batch 2), where XLA:CPU fuses the rematerialised form better.
  """
  if backward not in CE_BACKWARDS:
    raise ConfigError(f"config.loss.ce_backward must be one of {CE_BACKWARDS}, "
                      f"got {backward!r}")
  return backward


def _chunked_upsampled_ce(logits: jax.Array, labels: jax.Array, factor: int,
                          ignore_index: int, backward: str = "remat") -> jax.Array:
  """CE of resize_bilinear(logits, labels.shape[1:3]) when the height grows by a
  power-of-two `factor`, without ever holding the full-resolution logits.

  The logits are cut into blocks of source rows (plus one halo row on each
  side); inside a lax.map each block is resized to the full width, and each of its
  `factor` height phases (output rows factor * i + p, a blend of two of those rows) is
  fused with its CE; only the per-pixel CE is interleaved back. The width resize acts
  on each row alone and each phase is the same expression as resize_bilinear's, so the
  logits are bit for bit resize_bilinear's; memory is one block instead of two
  [B, H, W, K] float32 maps for the forward and as many for the backward (1.2 GB for two
  512x512 images and 150 classes), and no [B, h, W, K] width-resized map is ever held.
  Reducing each phase apart, rather than the interleaved [B, r * factor, W, K] block,
  moves ~30 % fewer bytes (an H200's deviceless compile) and runs 17-22 % faster on
  the CPU (docs/performance.md, 2026-11-27).

  backward: how a block's gradient is had without keeping its full-width logits.
  'remat': the block under jax.checkpoint (its forward runs again in the backward);
  'custom_vjp': the block keeps its logsumexp [B, r, factor, W] and the backward
  up-samples once more: d CE / dz = softmax(z) - onehot = exp(z - lse) - onehot;
  'auto': remat on the CPU, custom_vjp elsewhere (check_ce_backward).
  """
  check_ce_backward(backward)
  if backward == "auto":
    return jax.lax.platform_dependent(
        logits, labels,
        cpu=lambda x, y: _chunked_upsampled_ce(x, y, factor, ignore_index, "remat"),
        default=lambda x, y: _chunked_upsampled_ce(x, y, factor, ignore_index, "custom_vjp"))
  b, h, _, k = logits.shape
  big_h, big_w = labels.shape[1:3]
  r = _rows_per_chunk(h)
  rows, above, below, lab = row_blocks(logits, labels, r, factor)
  taps = phase_taps(h, factor)

  def phases(x, up, down):  # [B, r, w, K], [B, 1, w, K] x 2 -> factor x [B, r, W, K]
    ext = resize_bilinear(jnp.concatenate([up, x, down], axis=1), (r + 2, big_w))
    return phase_rows(ext[:, :r], ext[:, 1:r + 1], ext[:, 2:], taps)

  def by_phase(t):  # [B, r * factor, W] -> [B, r, factor, W]: row factor * i + p at [i, p]
    return t.reshape(t.shape[0], r, factor, big_w)

  def ce_lse(x, up, down, lb):  # -> CE [B, r * factor, W], logsumexp [B, r, factor, W]
    lbp = by_phase(lb)
    res = [ce_and_logsumexp(z, lbp[:, :, p], ignore_index)
           for p, z in enumerate(phases(x, up, down))]
    return (jnp.stack([ce for ce, _ in res], axis=2).reshape(lb.shape),
            jnp.stack([lse for _, lse in res], axis=2))

  def ce_vjp(x, up, down, lb, lse, g):  # g: [B, r * factor, W]
    zs, phases_vjp = jax.vjp(phases, x, up, down)  # linear: no residuals of its own
    lbp, gbp = by_phase(lb), by_phase(g)
    dzs = []
    for p, z in enumerate(zs):
      onehot, valid = onehot_labels(lbp[:, :, p], k, ignore_index, z.dtype)
      gp = jnp.where(valid, gbp[:, :, p], 0.0)
      dzs.append((jnp.exp(z - lse[:, :, p, :, None]) - onehot) * gp[..., None])
    return phases_vjp(dzs)

  ce = map_row_blocks((rows, above, below, lab), ce_lse, ce_vjp, backward)
  return ce.swapaxes(0, 1).reshape(b, big_h, big_w)  # [n, B, r * factor, W] -> [B, H, W]


def map_row_blocks(blocks: tuple[jax.Array, ...], ce_lse: Callable, ce_vjp: Callable,
                   backward: str) -> jax.Array:
  """lax.map of a row block's CE over the blocks (row_blocks' four stacks), differentiated
  by rematerialisation or by hand. ce_lse(x, up, down, lb) -> (CE, what the backward
  keeps: the logsumexp); ce_vjp(x, up, down, lb, lse, g) -> the cotangents of x, up, down."""
  if backward == "remat":
    block = jax.checkpoint(lambda args: ce_lse(*args)[0])
  else:  # custom_vjp
    @jax.custom_vjp
    def block_ce(x, up, down, lb):
      return ce_lse(x, up, down, lb)[0]

    def fwd(x, up, down, lb):
      ce, lse = ce_lse(x, up, down, lb)
      return ce, (x, up, down, lb, lse)

    @jax.named_scope("ce_custom_vjp_backward")
    def bwd(res, g):
      return (*ce_vjp(*res, g), None)

    block_ce.defvjp(fwd, bwd)
    block = lambda args: block_ce(*args)  # noqa: E731
  return jax.lax.map(block, blocks)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int,
                        backward: str = "auto") -> tuple[jax.Array, jax.Array]:
  """logits [B, h, w, K] resized to labels [B, H, W] -> (CE [B, H, W] f32, valid mask).

  backward: of the row-blocked up-sampled CE (check_ce_backward); the same numbers."""
  check_ce_backward(backward)
  h, big_h = logits.shape[1], labels.shape[1]
  factor = big_h // h
  valid = labels != ignore_index
  if backward == "pallas":
    if pallas_ce.fits(logits.shape, labels.shape):
      return jax.lax.platform_dependent(
          logits, labels,
          cpu=lambda x, y: pallas_ce.upsampled_ce(x, y, factor, ignore_index, interpret=True),
          tpu=lambda x, y: _chunked_upsampled_ce(x.astype(jnp.float32), y, factor,
                                                 ignore_index, "custom_vjp"),
          default=lambda x, y: pallas_ce.upsampled_ce(x, y, factor, ignore_index)), valid
    backward = "custom_vjp"
  logits = logits.astype(jnp.float32)
  if h > 2 and factor > 1 and factor * h == big_h and factor & (factor - 1) == 0:
    return _chunked_upsampled_ce(logits, labels, factor, ignore_index, backward), valid
  z = resize_bilinear(logits, labels.shape[1:3])
  return _ce_from_logits(z, labels, ignore_index), valid


def ohem_weights(ce: jax.Array, valid: jax.Array, min_kept: int, group_size: int = 0
                 ) -> jax.Array:
  """1 for the G * min_kept valid pixels with the highest CE of each group of G consecutive
  images (group_size; 0: the whole batch is one group), 0 elsewhere.

  mmseg's sampler sees one GPU's batch (the reference trains 2 images per GPU), so its
  selection is per group of 2 images, not over the global batch. Per group, the sort stays
  on the devices that hold the group's images: over the whole batch it was an all-gather
  of every pixel's CE to every device and one sort of all of them on each (SeMask-L at 640,
  16 images: 6.5M floats; docs/performance.md, "Compiling for TPU slices").
  """
  b = ce.shape[0]
  g = group_size or b
  if b % g:
    raise ConfigError(f"config.loss.group_size={group_size} does not divide the "
                      f"(micro) batch of {b} images")
  kept = g * min_kept
  flat = jnp.where(valid, jax.lax.stop_gradient(ce), -jnp.inf).reshape(b // g, -1)
  if kept >= flat.shape[1]:
    return valid.astype(jnp.float32)
  threshold = jnp.sort(flat, axis=1)[:, flat.shape[1] - kept]  # each group's kept-th largest
  threshold = jnp.repeat(threshold, g).reshape((b,) + (1,) * (ce.ndim - 1))
  return (valid & (jax.lax.stop_gradient(ce) >= threshold)).astype(jnp.float32)


REDUCTIONS = ("reference", "valid")  # config.loss.reduction


def _reduce(loss: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
  if reduction == "reference":
    return loss.mean()
  if reduction == "valid":
    return loss.sum() / jnp.maximum(valid.sum(), 1).astype(jnp.float32)
  raise ValueError(f"loss reduction must be 'reference' or 'valid', got {reduction!r}")


def segmentation_loss(outputs: Mapping[str, Any], labels: jax.Array, *, ignore_index: int,
                      cate_w: float = 0.4, reduction: str = "reference",
                      ohem_min_kept: int | None = None, ohem_group_size: int = 0,
                      ce_backward: str = "auto") -> tuple[jax.Array, dict[str, jax.Array]]:
  """total = L1 + cate_w * L2; returns (total, {'loss_ce': L1, 'loss_cate': cate_w * L2}).

  ignore_index: the label value of unlabelled pixels (config.data.ignore_index).
  ohem_group_size: the images of one OHEM selection (ohem_weights; 0: the whole batch).
  ce_backward: how the up-sampled CE is differentiated (check_ce_backward).
  """
  ce, valid = pixel_cross_entropy(outputs["seg_logits"], labels, ignore_index=ignore_index,
                                  backward=ce_backward)
  if ohem_min_kept:
    ce = ce * ohem_weights(ce, valid, ohem_min_kept, ohem_group_size)
  loss_ce = _reduce(ce, valid, reduction)
  aux = {"loss_ce": loss_ce}
  total = loss_ce
  if "cls_logits" in outputs:
    ce2, _ = pixel_cross_entropy(outputs["cls_logits"], labels, ignore_index=ignore_index,
                                 backward=ce_backward)
    loss_cate = cate_w * _reduce(ce2, valid, reduction)
    aux["loss_cate"] = loss_cate
    total = total + loss_cate
  return total, aux
