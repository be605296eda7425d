"""The SeMask loss: CE on the Semantic-FPN logits + alpha * CE on the semantic decoder.

Reduction 'reference' is mmseg's: the mean over ALL label pixels, ignored
pixels counting as zero loss but as pixels in the denominator. 'valid' divides
by the number of non-ignored pixels instead. OHEM (mmseg OHEMPixelSampler with
no threshold) weights the batch_size * min_kept hardest valid pixels of the
main loss by 1 and all others by 0; the semantic-decoder loss is never sampled.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from semask_jax.models.resize import resize_bilinear

IGNORE_INDEX = 255


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """logits [B, h, w, K] resized to labels [B, H, W] -> (CE [B, H, W] f32, valid mask)."""
  logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  valid = labels != IGNORE_INDEX
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  # CE = logsumexp(z) - z[label]. The label's logit is picked with a one-hot
  # product (a fused select-and-reduce) rather than take_along_axis, whose
  # backward pass is a scatter into the full-resolution [B, H, W, K] map.
  k = logits.shape[-1]
  onehot = safe[..., None] == jnp.arange(k, dtype=jnp.int32)
  picked = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  ce = jax.nn.logsumexp(logits, axis=-1) - picked
  return jnp.where(valid, ce, 0.0), valid


def ohem_weights(ce: jax.Array, valid: jax.Array, min_kept: int) -> jax.Array:
  """1 for the B * min_kept valid pixels with the highest CE, 0 elsewhere."""
  kept = ce.shape[0] * min_kept
  flat = jnp.where(valid, jax.lax.stop_gradient(ce), -jnp.inf).reshape(-1)
  if kept >= flat.size:
    return valid.astype(jnp.float32)
  threshold = jnp.sort(flat)[flat.size - kept]  # kept-th largest
  return (valid & (jax.lax.stop_gradient(ce) >= threshold)).astype(jnp.float32)


def _reduce(loss: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
  if reduction == "reference":
    return loss.mean()
  if reduction == "valid":
    return loss.sum() / jnp.maximum(valid.sum(), 1).astype(jnp.float32)
  raise ValueError(f"loss reduction must be 'reference' or 'valid', got {reduction!r}")


def segmentation_loss(outputs: Mapping[str, Any], labels: jax.Array, *, cate_w: float = 0.4,
                      reduction: str = "reference", ohem_min_kept: int | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """total = L1 + cate_w * L2; returns (total, {'loss_ce': L1, 'loss_cate': cate_w * L2})."""
  ce, valid = pixel_cross_entropy(outputs["seg_logits"], labels)
  if ohem_min_kept:
    ce = ce * ohem_weights(ce, valid, ohem_min_kept)
  loss_ce = _reduce(ce, valid, reduction)
  aux = {"loss_ce": loss_ce}
  total = loss_ce
  if "cls_logits" in outputs:
    ce2, _ = pixel_cross_entropy(outputs["cls_logits"], labels)
    loss_cate = cate_w * _reduce(ce2, valid, reduction)
    aux["loss_cate"] = loss_cate
    total = total + loss_cate
  return total, aux
