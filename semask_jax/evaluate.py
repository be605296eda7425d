"""Inference (whole image, sliding window, multi-scale + flip) and the mIoU evaluation loop.

Eval batches hold images of different sizes padded to one shape (`image_hw`
gives each valid size) and labels at the original size padded with 255
(`label_hw`). Each image's logits are therefore cropped to its valid size and
resized to its original size with per-image (traced) sizes: the bilinear
resize is written as two interpolation matrices, the same numbers as torch
F.interpolate(bilinear, align_corners=False) for every size.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from semask_jax import metrics as metrics_lib
from semask_jax.models.resize import resize_bilinear

ModelFn = Callable[[jax.Array], jax.Array]  # images [B, H, W, 3] -> seg logits [B, h/4, w/4, K]


def interp_matrix(in_size: jax.Array, out_size: jax.Array, n_in: int, n_out: int) -> jax.Array:
  """[n_out, n_in] bilinear weights from the first `in_size` inputs to `out_size` outputs.

  Rows >= out_size are zero. torch align_corners=False: src = (dst + .5) * in/out - .5, clamped at 0.
  """
  in_f = jnp.asarray(in_size, jnp.float32)
  out_f = jnp.asarray(out_size, jnp.float32)
  dst = jnp.arange(n_out, dtype=jnp.float32)
  src = jnp.maximum((dst + 0.5) * (in_f / out_f) - 0.5, 0.0)
  last = jnp.asarray(in_size, jnp.int32) - 1
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
  i1 = jnp.minimum(i0 + 1, last)
  w1 = src - i0.astype(jnp.float32)
  cols = jnp.arange(n_in)
  m = ((cols[None] == i0[:, None]) * (1.0 - w1)[:, None]
       + (cols[None] == i1[:, None]) * w1[:, None])
  return jnp.where((dst < out_f)[:, None], m, 0.0)


def resize_dynamic(x: jax.Array, in_hw: jax.Array, out_hw: jax.Array,
                   out_shape: tuple[int, int]) -> jax.Array:
  """Per image: crop x[b, :in_h, :in_w] and resize it bilinearly to out_hw[b], zero-padded to out_shape.

  x [B, H, W, C]; in_hw, out_hw int [B, 2] -> [B, out_shape[0], out_shape[1], C] float32.
  """
  _, h, w, _ = x.shape
  mh = jax.vmap(lambda i, o: interp_matrix(i, o, h, out_shape[0]))(in_hw[:, 0], out_hw[:, 0])
  mw = jax.vmap(lambda i, o: interp_matrix(i, o, w, out_shape[1]))(in_hw[:, 1], out_hw[:, 1])
  y = jnp.einsum('boh,bhwc->bowc', mh, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('bpw,bowc->bopc', mw, y, precision=jax.lax.Precision.HIGHEST)


def flip_valid(x: jax.Array, width: jax.Array) -> jax.Array:
  """Mirrors each image's valid columns [0, width[b]) in place; padding columns stay put."""
  cols = jnp.arange(x.shape[2])
  idx = jnp.where(cols[None] < width[:, None], width[:, None] - 1 - cols[None], cols[None])  # [B, W]
  return jnp.take_along_axis(x, idx[:, None, :, None], axis=2)


def whole_logits(model_fn: ModelFn, images: jax.Array) -> jax.Array:
  """Logits at the input size [B, H, W, K] (mmseg encode_decode)."""
  logits = model_fn(images)
  return resize_bilinear(logits.astype(jnp.float32), images.shape[1:3])


def slide_logits(model_fn: ModelFn, images: jax.Array, image_hw: jax.Array,
                 crop: tuple[int, int], stride: tuple[int, int], num_classes: int) -> jax.Array:
  """mmseg slide_inference with per-image window positions, [B, H, W, K].

  Window (i, j) of an image of valid size (h, w) spans rows [y1, y1 + crop) with
  y1 = max(min(i * stride, h - crop), 0) and exists when i < grids(h); logits of
  overlapping windows are averaged. Images smaller than a crop are zero-padded
  to it (the reference runs a smaller window there).
  """
  b, h_pad, w_pad, _ = images.shape
  ch, cw = crop
  sh, sw = stride
  hp, wp = max(h_pad, ch), max(w_pad, cw)
  images = jnp.pad(images, ((0, 0), (0, hp - h_pad), (0, wp - w_pad), (0, 0)))
  n_h = max(h_pad - ch + sh - 1, 0) // sh + 1
  n_w = max(w_pad - cw + sw - 1, 0) // sw + 1
  hs, ws = image_hw[:, 0], image_hw[:, 1]
  grids_h = jnp.maximum(hs - ch + sh - 1, 0) // sh + 1  # [B]
  grids_w = jnp.maximum(ws - cw + sw - 1, 0) // sw + 1

  def window(carry, ij):
    preds, count = carry
    i, j = ij // n_w, ij % n_w
    y1 = jnp.maximum(jnp.minimum(i * sh + ch, hs) - ch, 0)  # [B]
    x1 = jnp.maximum(jnp.minimum(j * sw + cw, ws) - cw, 0)
    use = ((i < grids_h) & (j < grids_w)).astype(jnp.float32)  # [B]
    crops = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (ch, cw, im.shape[-1])))(
        images, y1, x1)
    logits = whole_logits(model_fn, crops) * use[:, None, None, None]
    add = lambda acc, v, y, x: jax.lax.dynamic_update_slice(  # noqa: E731
        acc, jax.lax.dynamic_slice(acc, (y, x, 0), v.shape) + v, (y, x, 0))
    preds = jax.vmap(add)(preds, logits, y1, x1)
    ones = jnp.broadcast_to(use[:, None, None, None], (b, ch, cw, 1))
    count = jax.vmap(add)(count, ones, y1, x1)
    return (preds, count), None

  init = (jnp.zeros((b, hp, wp, num_classes), jnp.float32), jnp.zeros((b, hp, wp, 1), jnp.float32))
  (preds, count), _ = jax.lax.scan(window, init, jnp.arange(n_h * n_w))
  return (preds / jnp.maximum(count, 1.0))[:, :h_pad, :w_pad]


def inference(model_fn: ModelFn, images: jax.Array, image_hw: jax.Array, label_hw: jax.Array,
              label_shape: tuple[int, int], cfg: ml_collections.ConfigDict,
              num_classes: int, *, probabilities: bool = False) -> jax.Array:
  """Scores at the original size [B, Lh, Lw, K]: logits (one pass) or mean softmax (scales x flip).

  cfg: mode ('whole' | 'slide'), crop_size, stride (slide), scales (list of ratios), flip (bool).
  probabilities: the model's scores are already probabilities (Mask2Former's semantic
  inference): several passes average them as they are.
  """
  scales = tuple(cfg.scales)
  flips = (False, True) if cfg.flip else (False,)
  single = len(scales) == 1 and len(flips) == 1
  total = None
  for scale in scales:
    if scale == 1.0:
      img, hw = images, image_hw
    else:
      hw = jnp.floor(image_hw.astype(jnp.float32) * scale + 0.5).astype(jnp.int32)
      shape = (math.ceil(images.shape[1] * scale), math.ceil(images.shape[2] * scale))
      img = resize_dynamic(images, image_hw, hw, shape)
    for flip in flips:
      x = flip_valid(img, hw[:, 1]) if flip else img
      if cfg.mode == 'whole':
        logits = whole_logits(model_fn, x)
      elif cfg.mode == 'slide':
        logits = slide_logits(model_fn, x, hw, tuple(cfg.crop_size), tuple(cfg.stride),
                              num_classes)
      else:
        raise ValueError(f"config.eval.mode must be 'whole' or 'slide', got {cfg.mode!r}")
      if flip:
        logits = flip_valid(logits, hw[:, 1])
      logits = resize_dynamic(logits, hw, label_hw, label_shape)
      if single:
        return logits
      probs = logits if probabilities else jax.nn.softmax(logits, axis=-1)
      total = probs if total is None else total + probs
  return total / (len(scales) * len(flips))


def make_eval_step(model_fn_from_state: Callable[[Any], ModelFn], num_classes: int,
                   cfg: ml_collections.ConfigDict, *, ignore_index: int,
                   probabilities: bool = False) -> Callable[..., jax.Array]:
  """(cm [K, K], inference state, batch) -> cm + this batch's confusion matrix."""

  def step(cm: jax.Array, state: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    model_fn = model_fn_from_state(state)
    label = batch['label']
    scores = inference(model_fn, batch['image'], batch['image_hw'], batch['label_hw'],
                       label.shape[1:3], cfg, num_classes, probabilities=probabilities)
    pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    return cm + metrics_lib.confusion_matrix(pred, label, num_classes, ignore_index=ignore_index,
                                             valid=batch.get('valid'))

  return step


def evaluate(eval_step: Callable[..., jax.Array], state: Any, batches: Iterable[Mapping[str, Any]],
             num_classes: int, class_names: list[str], to_global: Callable[[Any], Any],
             cm_sharding: Any) -> dict[str, Any]:
  """Runs `eval_step` (jitted) over every batch; returns compute_metrics of the summed matrix."""
  cm = jax.device_put(jnp.zeros((num_classes, num_classes), jnp.int32), cm_sharding)
  start, n = time.time(), 0
  for batch in batches:
    cm = eval_step(cm, state, to_global(batch))
    n += 1
  cm_host = np.asarray(jax.device_get(_fully_replicated(cm)))
  result = metrics_lib.compute_metrics(cm_host, class_names)
  result['num_batches'] = n
  result['seconds'] = time.time() - start
  logging.info('Evaluated %d batches in %.1fs', n, result['seconds'])
  return result


def _fully_replicated(x: jax.Array) -> jax.Array:
  """The local copy of a replicated global array (readable on every process)."""
  return x.addressable_data(0) if not x.is_fully_addressable else x
