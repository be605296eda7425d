"""Inference (whole image, sliding window, multi-scale + flip) and the mIoU evaluation loops.

Two evaluations:
* `PerImageInference` / `evaluate_per_image` (--mode=eval, --mode=predict): what the
  reference computes. Each image alone at its own size (batch 1, no canvas padding;
  Mask2Former pads to its size divisibility as detectron2 does), logits resized to
  the original size, softmax averaged over scales x flips, argmax. One compiled
  model program per distinct input shape (compiled once, optionally ahead of time in
  threads, and kept in the persistent compilation cache); resizing to the original
  size runs in small programs keyed by coarse size buckets.
* `make_eval_step` / `evaluate` (config.eval.approximate=True only; the summary images):
  the old fast approximation below, images padded to one canvas per batch.

The exact evaluation that --mode=eval, --mode=predict and training run is
evaluation/bucketed.py: PerImageInference's numbers, batched per bucket canvas; this
per-image path is its test oracle.

Eval batches hold images of different sizes padded to one shape (`image_hw`
gives each valid size) and labels at the original size padded with 255
(`label_hw`). Each image's logits are therefore cropped to its valid size and
resized to its original size with per-image (traced) sizes: the bilinear
resize is written as two interpolation matrices, the same numbers as torch
F.interpolate(bilinear, align_corners=False) for every size.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from semask_jax.evaluation import metrics as metrics_lib
from semask_jax.models import model_class
from semask_jax.models.functional import merge_model
from semask_jax.models.resize import resize_bilinear
from semask_jax.models.semask_mask2former import SeMaskMask2Former
from semask_jax.models.semask_maskformer import SeMaskMaskFormer

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
  logging.info('Evaluated %d batches in %.1fs on a padded canvas (fast, approximate); '
               '--mode=eval is reference-exact', n, result['seconds'])
  return result


def _fully_replicated(x: jax.Array) -> jax.Array:
  """The local copy of a replicated global array (readable on every process)."""
  return x.addressable_data(0) if not x.is_fully_addressable else x


# --------------------------------------------- per-image (reference-exact) inference


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m


def _taps(in_size: jax.Array, out_size: jax.Array, n_out: int
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """torch bilinear (align_corners=False) source indices and weight for traced sizes.

  src = max(in/out * (dst + .5) - .5, 0) in float32, i0 = floor(src), i1 = i0 + 1 (both
  clamped to in - 1), weight of i1 = src - i0: the float32 numbers of
  models/resize._axis_taps, for sizes known only at run time.
  """
  scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
  dst = jnp.arange(n_out, dtype=jnp.float32)
  src = jnp.maximum(scale * (dst + jnp.float32(0.5)) - jnp.float32(0.5), jnp.float32(0.0))
  last = in_size.astype(jnp.int32) - 1
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
  i1 = jnp.minimum(i0 + 1, last)
  return i0, i1, src - i0.astype(jnp.float32)


def resize_valid(x: jax.Array, in_hw: jax.Array, out_hw: jax.Array,
                 out_shape: tuple[int, int]) -> jax.Array:
  """x[:in_h, :in_w] resized bilinearly to out_hw, in an out_shape canvas ([H, W, C]).

  Sizes are traced (one program per canvas pair, not per image size); the canvas
  beyond out_hw holds don't-care values. Columns first, then rows: torch's
  h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11).
  """
  x = x.astype(jnp.float32)
  i0, i1, w1 = _taps(in_hw[1], out_hw[1], out_shape[1])
  w1 = w1[None, :, None]
  x = jnp.take(x, i0, axis=1) * (1 - w1) + jnp.take(x, i1, axis=1) * w1
  i0, i1, w1 = _taps(in_hw[0], out_hw[0], out_shape[0])
  w1 = w1[:, None, None]
  return jnp.take(x, i0, axis=0) * (1 - w1) + jnp.take(x, i1, axis=0) * w1


def slide_boxes(hw: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]
                ) -> list[tuple[int, int, int, int]]:
  """mmseg slide_inference's windows (y1, y2, x1, x2), clipped to the image: an image
  smaller than the crop gets one window of its own size (no padding)."""
  (h, w), (ch, cw), (sh, sw) = hw, crop, stride
  h_grids = max(h - ch + sh - 1, 0) // sh + 1
  w_grids = max(w - cw + sw - 1, 0) // sw + 1
  boxes = []
  for i in range(h_grids):
    for j in range(w_grids):
      y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
      boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
  return boxes


class PerImageInference:
  """The reference's test-time computation for one image at a time (mmseg simple_test /
  aug_test; detectron2's semantic inference for Mask2Former).

  For each scale image [h, w, 3] (and its mirror when cfg.flip): the model at exactly
  (h, w) (`pad_multiple` > 0: zero-padded to that multiple after normalisation and the
  scores cropped back, as detectron2's ImageList), logits resized to (h, w) (mmseg
  encode_decode) or windows as slide_inference; then resized to the original size,
  softmax (unless the model's scores are probabilities), flipped back, averaged over
  the terms in mmseg's order (scales outer, flips inner), argmax.

  Programs: the model's per distinct input shape (the expensive compiles), resize +
  softmax + accumulate per (canvas, original-size bucket, flip), argmax + confusion
  matrix per bucket. Compiled executables are kept; `compile_seconds` and
  `model_shapes` report what was compiled.
  """

  def __init__(self, model_fn_from_params: Callable[[Any], ModelFn], params: Any,
               cfg: ml_collections.ConfigDict, num_classes: int, *, ignore_index: int = 255,
               probabilities: bool = False, pad_multiple: int = 0,
               device: jax.Device | None = None, canvas_multiple: int = 32,
               out_multiple: int = 64):
    if cfg.mode not in ('whole', 'slide'):
      raise ValueError(f"config.eval.mode must be 'whole' or 'slide', got {cfg.mode!r}")
    self.model_fn_from_params = model_fn_from_params
    self.cfg = cfg
    self.num_classes = int(num_classes)
    self.ignore_index = int(ignore_index)
    self.probabilities = probabilities
    self.pad_multiple = int(pad_multiple)
    self.canvas_multiple = int(canvas_multiple)
    self.out_multiple = int(out_multiple)
    self.flips = (False, True) if cfg.flip else (False,)
    self.device = device or jax.local_devices()[0]
    local = lambda x: x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x  # noqa: E731
    self.params = jax.device_put(jax.tree.map(local, params), self.device)
    self._sharding = jax.sharding.SingleDeviceSharding(self.device)
    self._compiled: dict[tuple, Any] = {}
    self._lock = threading.Lock()
    self.compile_seconds = 0.0
    self.compile_log: list[tuple[tuple, float]] = []  # (program key, seconds) per compile
    self.model_shapes: set[tuple[int, int]] = set()

  # ----------------------------------------------------------- programs

  def encode_decode(self, model_fn: ModelFn, x: jax.Array) -> jax.Array:
    """[n, h, w, 3] -> scores at the input size [n, h, w, K] (mmseg encode_decode; with
    pad_multiple, detectron2's padded forward cropped back to the image)."""
    h, w = x.shape[1:3]
    if self.pad_multiple:
      m = self.pad_multiple
      x = jnp.pad(x, ((0, 0), (0, _round_up(h, m) - h), (0, _round_up(w, m) - w), (0, 0)))
    out = resize_bilinear(model_fn(x).astype(jnp.float32), x.shape[1:3])
    return out[:, :h, :w]

  def _model_program(self, params: Any, image: jax.Array) -> jax.Array:
    """image [1, h, w, 3] -> logits [h, w, K] zero-padded to the canvas."""
    model_fn = self.model_fn_from_params(params)
    h, w = image.shape[1:3]
    if self.cfg.mode == 'whole':
      logits = self.encode_decode(model_fn, image)[0]
    else:
      boxes = slide_boxes((h, w), tuple(self.cfg.crop_size), tuple(self.cfg.stride))
      windows = jnp.stack([image[0, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
      crops = jax.lax.map(lambda c: self.encode_decode(model_fn, c[None])[0], windows)
      logits = jnp.zeros((h, w, crops.shape[-1]), jnp.float32)
      count = np.zeros((h, w, 1), np.float32)
      for k, (y1, y2, x1, x2) in enumerate(boxes):
        logits = logits.at[y1:y2, x1:x2].add(crops[k])
        count[y1:y2, x1:x2] += 1
      logits = logits / jnp.asarray(count)
    hc, wc = self.canvas_shape((h, w))
    return jnp.pad(logits, ((0, hc - h), (0, wc - w), (0, 0)))

  def _post_program(self, flip: bool, out_shape: tuple[int, int], acc: jax.Array | None,
                    canvas: jax.Array, in_hw: jax.Array, out_hw: jax.Array) -> jax.Array:
    """acc + this term's probabilities at the original size (in an out_shape canvas)."""
    scores = resize_valid(canvas, in_hw, out_hw, out_shape)
    probs = scores if self.probabilities else jax.nn.softmax(scores, axis=-1)
    if flip:
      probs = flip_valid(probs[None], out_hw[None, 1])[0]
    return probs if acc is None else acc + probs

  def _finish_program(self, n_terms: int, acc: jax.Array, label: jax.Array | None = None,
                      cm: jax.Array | None = None) -> jax.Array:
    """argmax of the mean; with a label: cm + this image's confusion matrix."""
    return argmax_and_confusion(n_terms, acc, label, cm, self.num_classes, self.ignore_index)

  # ----------------------------------------------------------- compilation

  def canvas_shape(self, hw: Sequence[int]) -> tuple[int, int]:
    return tuple(_round_up(v, self.canvas_multiple) for v in hw)

  def out_shape(self, hw: Sequence[int]) -> tuple[int, int]:
    return tuple(_round_up(v, self.out_multiple) for v in hw)

  def _spec(self, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=self._sharding)

  def _get(self, key: tuple, fn: Callable[..., jax.Array], *specs: Any) -> Any:
    with self._lock:
      compiled = self._compiled.get(key)
    if compiled is None:
      start = time.perf_counter()
      compiled = jax.jit(fn).lower(*specs).compile()
      seconds = time.perf_counter() - start
      with self._lock:
        if key not in self._compiled:
          self._compiled[key] = compiled
          self.compile_seconds += seconds
          self.compile_log.append((key, seconds))
          if key[0] == 'model':
            self.model_shapes.add(key[1])
        compiled = self._compiled[key]
    return compiled

  def _model(self, hw: tuple[int, int]) -> Any:
    return self._get(('model', tuple(hw)), self._model_program, self.params,
                     self._spec((1, *hw, 3), jnp.float32))

  def _post(self, canvas: tuple[int, int], out: tuple[int, int], flip: bool, first: bool) -> Any:
    k = self.num_classes
    hw = self._spec((2,), jnp.int32)
    canvas_spec = self._spec((*canvas, k), jnp.float32)
    if first:
      fn = lambda c, i, o: self._post_program(flip, out, None, c, i, o)  # noqa: E731
      return self._get(('post', canvas, out, flip, True), fn, canvas_spec, hw, hw)
    fn = functools.partial(self._post_program, flip, out)
    return self._get(('post', canvas, out, flip, False), fn, self._spec((*out, k), jnp.float32),
                     canvas_spec, hw, hw)

  def _finish(self, out: tuple[int, int], n_terms: int, with_label: bool) -> Any:
    acc = self._spec((*out, self.num_classes), jnp.float32)
    if not with_label:
      return self._get(('pred', out, n_terms), functools.partial(self._finish_program, n_terms),
                       acc)
    return self._get(('cm', out, n_terms), functools.partial(self._finish_program, n_terms), acc,
                     self._spec(out, jnp.uint8),
                     self._spec((self.num_classes, self.num_classes), jnp.int32))

  def precompile(self, items: Iterable[tuple[Sequence[tuple[int, int]], tuple[int, int]]], *,
                 with_label: bool = True, workers: int | None = None) -> float:
    """Compiles every program the given images need, in `workers` threads (XLA compiles
    release the GIL); items: (scale sizes, original size) per image. Returns wall seconds."""
    jobs: dict[tuple, Callable[[], Any]] = {}
    for sizes, orig in items:
      out = self.out_shape(orig)
      n = len(sizes) * len(self.flips)
      jobs[('finish', out, n)] = functools.partial(self._finish, out, n, with_label)
      t = 0
      for hw in sizes:
        hw = tuple(int(v) for v in hw)
        jobs[('model', hw)] = functools.partial(self._model, hw)
        for flip in self.flips:
          c = self.canvas_shape(hw)
          jobs[('post', c, out, flip, t == 0)] = functools.partial(self._post, c, out, flip, t == 0)
          t += 1
    # The expensive model programs first, largest first.
    order = sorted(jobs, key=lambda k: (k[0] != 'model', -math.prod(k[1]) if k[0] == 'model' else 0))
    start = time.perf_counter()
    workers = workers or min(len(order), os.cpu_count() or 1) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for f in [pool.submit(jobs[k]) for k in order]:
        f.result()
    return time.perf_counter() - start

  # ----------------------------------------------------------- running

  def _put(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(np.ascontiguousarray(x), self.device)

  def scores(self, images: Sequence[np.ndarray], out_hw: tuple[int, int]
             ) -> tuple[jax.Array, int]:
    """Summed per-term probabilities [Ho, Wo, K] (original size out_hw in an out_shape
    canvas) over scales x flips, and the number of terms."""
    out = self.out_shape(out_hw)
    out_hw_dev = self._put(np.asarray(out_hw, np.int32))
    acc, t = None, 0
    for image in images:
      hw = tuple(image.shape[:2])
      canvas = self._model(hw)
      in_hw = self._put(np.asarray(hw, np.int32))
      for flip in self.flips:
        x = image[:, ::-1] if flip else image
        logits = canvas(self.params, self._put(x[None].astype(np.float32, copy=False)))
        post = self._post(self.canvas_shape(hw), out, flip, acc is None)
        acc = post(logits, in_hw, out_hw_dev) if acc is None else post(acc, logits, in_hw,
                                                                      out_hw_dev)
        t += 1
    return acc, t

  def predict(self, images: Sequence[np.ndarray], out_hw: tuple[int, int]) -> np.ndarray:
    """Class ids int32 [H, W] at the original size out_hw."""
    acc, n = self.scores(images, out_hw)
    pred = self._finish(self.out_shape(out_hw), n, False)(acc)
    return np.asarray(pred)[:out_hw[0], :out_hw[1]]

  def update_confusion(self, cm: jax.Array, images: Sequence[np.ndarray],
                       label: np.ndarray) -> jax.Array:
    """cm + the confusion matrix of this image's prediction against label uint8 [H, W]."""
    out_hw = tuple(label.shape[:2])
    acc, n = self.scores(images, out_hw)
    out = self.out_shape(out_hw)
    label = np.asarray(label, np.uint8)
    padded = np.full(out, self.ignore_index, np.uint8)
    padded[:out_hw[0], :out_hw[1]] = label
    return self._finish(out, n, True)(acc, self._put(padded), cm)

  def zeros_cm(self) -> jax.Array:
    return self._put(np.zeros((self.num_classes, self.num_classes), np.int32))


def evaluate_per_image(inference: PerImageInference, examples: Iterable[Mapping[str, Any]],
                       class_names: list[str], *,
                       precompile_items: Iterable[tuple[Sequence[tuple[int, int]],
                                                        tuple[int, int]]] | None = None,
                       sync_every: int = 16) -> dict[str, Any]:
  """mIoU of the reference's per-image test over `examples` ({'images': per-scale images,
  'label': uint8 original size}, this process's share); confusion matrices summed over
  processes. precompile_items: compile every shape first (in threads)."""
  start = time.time()
  precompile_wall = 0.0
  if precompile_items is not None:
    precompile_wall = inference.precompile(precompile_items)
  cm = inference.zeros_cm()
  n = 0
  for ex in examples:
    cm = inference.update_confusion(cm, ex['images'], ex['label'])
    n += 1
    if n % sync_every == 0:
      cm.block_until_ready()  # bound the work queued ahead of the device
  cm_host = np.asarray(cm)
  counts = np.asarray([n, len(inference.model_shapes), inference.compile_seconds], np.float64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    cm_host = np.asarray(multihost_utils.process_allgather(cm_host)).sum(0)
    counts = np.asarray(multihost_utils.process_allgather(counts))
    counts = np.asarray([counts[:, 0].sum(), counts[:, 1].max(), counts[:, 2].max()])
  result = metrics_lib.compute_metrics(cm_host, class_names)
  result.update(num_images=int(counts[0]), num_shapes=int(counts[1]),
                compile_seconds=float(counts[2]), precompile_wall_seconds=precompile_wall,
                seconds=time.time() - start)
  logging.info('Evaluated %d images one at a time at their own sizes (reference-exact): '
               '%d input shapes, %.1fs compiling (%.1fs wall ahead of time), %.1fs in all',
               result['num_images'], result['num_shapes'], result['compile_seconds'],
               precompile_wall, result['seconds'])
  return result


def argmax_and_confusion(n_terms: int, acc: jax.Array, label: jax.Array | None,
                         cm: jax.Array | None, num_classes: int, ignore_index: int
                         ) -> jax.Array:
  """The class map of n_terms summed probabilities acc [..., H, W, K] (the argmax of their
  mean), or with a label [..., H, W]: cm + the maps' confusion matrix."""
  pred = jnp.argmax(acc / n_terms if n_terms > 1 else acc, axis=-1).astype(jnp.int32)
  if label is None:
    return pred
  hw = pred.shape[-2:]
  return cm + metrics_lib.confusion_matrix(pred.reshape((-1,) + hw),
                                           label.astype(jnp.int32).reshape((-1,) + hw),
                                           num_classes, ignore_index=ignore_index)


def test_size_divisibility(config: ml_collections.ConfigDict) -> int:
  """The model's own test-time pad: detectron2 pads SeMask-Mask2Former's and
  SeMask-MaskFormer's normalised input with zeros to MODEL.MASK_FORMER.SIZE_DIVISIBILITY
  (32) and crops the scores back; mmseg runs the FPN model on the image as it is.
  config.eval.size_divisibility overrides."""
  if config.eval.size_divisibility is not None:
    return int(config.eval.size_divisibility)
  detectron2_heads = (SeMaskMask2Former, SeMaskMaskFormer)
  return 32 if issubclass(model_class(config.model), detectron2_heads) else 0


def make_per_image_inference(config: ml_collections.ConfigDict, graphdef: Any, rest: Any,
                             params: Any, batch_stats: Any) -> PerImageInference:
  """The reference-exact per-image inference (PerImageInference) of a model."""
  def model_fn_from_params(params_and_stats):
    p, b = params_and_stats
    return merge_model(graphdef, p, b, rest).segment

  return PerImageInference(
      model_fn_from_params, (params, batch_stats), config.eval, config.model.num_classes,
      ignore_index=config.data.ignore_index,
      probabilities=model_class(config.model).SCORES_ARE_PROBABILITIES,
      pad_multiple=test_size_divisibility(config))
