"""SeMask-Mask2Former's semantic head (the summed prior maps, supervised by loss_cate)
and Mask2Former's semantic inference (queries' classes times their masks).

Both are parameter-free functions of NHWC maps.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from semask_jax.models.resize import resize_bilinear, resize_bilinear_align_corners


def semantic_head(sems: Sequence[jax.Array], image_size: tuple[int, int] | None = None, *,
                  strides: Sequence[int] = (4, 8, 16, 32)) -> jax.Array:
  """The backbone's prior maps [B, h_i, w_i, K] (finest first, at `strides`) -> sem_pred
  [B, 4 h_0, 4 w_0, K].

  As the reference `SemanticHead`: each coarser map goes through log2(stride_i /
  stride_0) successive x2 bilinear upsamples (align_corners=True), then a bilinear resize
  to the finest map's size (align_corners=True, an identity when the sizes agree), and
  they are summed in order; the sum is resized x4 (align_corners=True). The reference
  resizes to exactly 4x the stride-4 map, which is the (padded) input size whenever the
  input is a multiple of 32; `image_size`, if given, must be that size.
  """
  out = sems[0]
  h0, w0 = out.shape[1], out.shape[2]
  for sem, stride in zip(sems[1:], strides[1:]):
    x = sem
    for _ in range(max(1, int(math.log2(stride) - math.log2(strides[0])))):
      x = resize_bilinear_align_corners(x, (2 * x.shape[1], 2 * x.shape[2]))
    out = out + resize_bilinear_align_corners(x, (h0, w0)).astype(out.dtype)
  size = (4 * h0, 4 * w0)
  if image_size is not None and tuple(image_size) != size:
    raise ValueError(f"semantic_head: the reference predicts at 4x the stride-4 map, {size}, "
                     f"not {tuple(image_size)}; pad the input to a multiple of 32")
  return resize_bilinear_align_corners(out, size)


def semantic_inference(pred_logits: jax.Array, pred_masks: jax.Array,
                       padded_size: tuple[int, int], image_size: tuple[int, int],
                       out_size: tuple[int, int], *,
                       postprocess_before_inference: bool = False) -> jax.Array:
  """Class logits [B, Q, K+1] and mask logits [B, Q, h, w] -> per-class scores
  [B, out_h, out_w, K] = sum_q softmax(class_q)[:K] * sigmoid(mask_q).

  As the reference: masks resized to the padded input size (bilinear,
  align_corners=False); then, by default (SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
  False, the semantic configs), the scores are computed there, cropped to the image
  (top-left `image_size`) and resized to `out_size` (detectron2's sem_seg_postprocess);
  with `postprocess_before_inference` the masks are cropped and resized first. The two
  agree exactly when no crop or resize is needed. One image_size for the batch.
  """
  num_classes = pred_logits.shape[-1] - 1
  b, q, h, w = pred_masks.shape
  masks = jnp.transpose(pred_masks.astype(jnp.float32), (0, 2, 3, 1))  # [B, h, w, Q]
  masks = resize_bilinear(masks, padded_size)                          # [B, Hp, Wp, Q]
  probs = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :num_classes]

  def postprocess(x: jax.Array) -> jax.Array:                          # crop, resize
    return resize_bilinear(x[:, :image_size[0], :image_size[1]], out_size)

  if postprocess_before_inference:
    masks = postprocess(masks)
  semseg = jnp.einsum("bqk,bhwq->bhwk", probs, jax.nn.sigmoid(masks))  # [B, H', W', K]
  if not postprocess_before_inference:
    semseg = postprocess(semseg)
  return semseg
