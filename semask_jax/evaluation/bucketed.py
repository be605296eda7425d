"""The reference's exact test, batched: images grouped by bucket canvas, on every device.

For each test term of an image (one per scale ratio and flip, mmseg / detectron2 order)
the model runs on a bucket canvas (evaluation/buckets.py) with the image's own size as
a traced int32 (the valid-size forward, models/valid.py): per image exactly what
PerImageInference computes on it alone. Programs:

* model (one per canvas in use, the expensive compiles): [B, Hc, Wc, 3] images zero
  beyond their sizes -> scores at the input size [B, Hc, Wc, K] ('whole': the model's
  output resized to the image; 'slide': mmseg's windows of each image, each run with its
  own valid size, averaged);
* post (per canvas and output canvas): scores resized to each original size, softmax
  (unless the model's scores are probabilities), flipped back, added to the image's sum;
* finish (per output canvas): argmax, confusion matrix (or the prediction).

A batch is B images that share their canvases at every scale; B (config.eval.batch_size)
is rounded up to a multiple of the devices of the mesh, the batch axis is split over
all of them, and short batches are filled with dummy images whose labels are all
ignored. The confusion matrix stays on device, replicated, summed by the programs.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from semask_jax import sharding as sharding_lib
from semask_jax.evaluation import buckets as buckets_lib
from semask_jax.evaluation import metrics as metrics_lib
from semask_jax.evaluation import inference as inference_lib
from semask_jax.evaluation.inference import flip_valid, test_size_divisibility
from semask_jax.models import model_class, valid
from semask_jax.models.functional import merge_model

# images [B, H, W, 3], valid_hw [B, 2] -> scores [B, H', W', K]
ValidModelFn = Callable[[jax.Array, jax.Array], jax.Array]
DUMMY_HW = 32  # the valid size of a dummy image (finite numbers; its labels are ignored)


class BucketedInference:
  """Bucketed, sharded, reference-exact inference of one model state (see module doc).

  model_fn_from_params(params) -> segment(images, valid_hw); output_stride: the model's
  scores are at ceil(size / output_stride) (4: SeMask-FPN's logits, 1: Mask2Former's
  scores at the input size); pad_multiple: the model's own test pad (detectron2's 32).
  """

  def __init__(self, model_fn_from_params: Callable[[Any], ValidModelFn], params: Any,
               cfg: ml_collections.ConfigDict, num_classes: int, *, mesh: jax.sharding.Mesh,
               output_stride: int, ignore_index: int = 255, probabilities: bool = False,
               pad_multiple: int = 0, batch_size: int | None = None,
               spec: buckets_lib.BucketSpec | None = None, max_programs: int | None = None):
    if cfg.mode not in ('whole', 'slide'):
      raise ValueError(f"config.eval.mode must be 'whole' or 'slide', got {cfg.mode!r}")
    self.model_fn_from_params = model_fn_from_params
    self.cfg = cfg
    self.num_classes = int(num_classes)
    self.mesh = mesh
    self.output_stride = int(output_stride)
    self.ignore_index = int(ignore_index)
    self.probabilities = probabilities
    self.pad_multiple = int(pad_multiple)
    self.flips = (False, True) if cfg.flip else (False,)
    self.scales = tuple(float(r) for r in cfg.scales)
    ndev = mesh.devices.size
    requested = int(batch_size if batch_size is not None else cfg.get('batch_size', ndev))
    # Never refused: rounded up to a multiple of the devices (dummy rows fill the rest).
    self.batch_size = max(1, -(-max(requested, 1) // ndev)) * ndev
    self.spec = spec or buckets_lib.BucketSpec(pad_multiple=self.pad_multiple)
    self.max_programs = (buckets_lib.default_max_programs(len(self.scales))
                         if max_programs is None else max_programs)
    self._rep = sharding_lib.replicated(mesh)
    self._data = NamedSharding(mesh, P(sharding_lib.DATA_AXIS))
    self.set_params(params)
    self._compiled: dict[tuple, Any] = {}
    self.compile_seconds = 0.0
    self.model_canvases: set[tuple[int, int]] = set()

  def set_params(self, params: Any) -> None:
    """The model state evaluated next (placed whole on every device of the mesh)."""
    self.params = jax.device_put(params, self._rep)

  # ------------------------------------------------------------------ programs

  def _scores(self, model_fn: ValidModelFn, x: jax.Array, hw: jax.Array) -> jax.Array:
    """mmseg encode_decode per image: x [B, H, W, 3] (zero beyond hw) -> scores resized to
    the (padded) model input and valid over hw [B, H, W, K] float32."""
    model_hw = valid.round_up(hw, self.pad_multiple) if self.pad_multiple else hw
    out = model_fn(x, model_hw).astype(jnp.float32)
    out_hw = valid.ceil_div(model_hw, self.output_stride)
    if self.output_stride == 1:
      return out  # scores at the input size already (resize to itself: identity)
    return valid.resize(out, out_hw, model_hw, x.shape[1:3])

  def _model_program(self, params: Any, images: jax.Array, hw: jax.Array) -> jax.Array:
    model_fn = self.model_fn_from_params(params)
    if self.cfg.mode == 'whole':
      return self._scores(model_fn, images, hw)
    return self._slide(model_fn, images, hw)

  def _slide(self, model_fn: ValidModelFn, images: jax.Array, hw: jax.Array) -> jax.Array:
    """mmseg slide_inference per image (windows clipped to the image, an image smaller
    than the crop one window of its own size), the windows of the batch run together."""
    b, hc, wc, _ = images.shape
    (ch, cw), (sh, sw) = tuple(self.cfg.crop_size), tuple(self.cfg.stride)
    wh, ww = min(ch, hc), min(cw, wc)                    # the window canvas
    n_h = max(hc - ch + sh - 1, 0) // sh + 1
    n_w = max(wc - cw + sw - 1, 0) // sw + 1
    hs, ws = hw[:, 0], hw[:, 1]
    grids_h = jnp.maximum(hs - ch + sh - 1, 0) // sh + 1
    grids_w = jnp.maximum(ws - cw + sw - 1, 0) // sw + 1
    win_hw = jnp.minimum(hw, jnp.asarray([ch, cw], jnp.int32))
    k = self.num_classes

    def window(carry, ij):
      preds, count = carry
      i, j = ij // n_w, ij % n_w
      y1 = jnp.maximum(jnp.minimum(i * sh + ch, hs) - ch, 0)
      x1 = jnp.maximum(jnp.minimum(j * sw + cw, ws) - cw, 0)
      use = (i < grids_h) & (j < grids_w)
      crops = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (wh, ww, 3)))(
          images, y1, x1)
      crops = valid.mask(crops, win_hw)
      logits = self._scores(model_fn, crops, win_hw)                    # [B, wh, ww, K]
      inside = valid.valid_mask(win_hw, (wh, ww)) & use[:, None, None, None]
      logits = jnp.where(inside, logits, 0.0)
      add = lambda acc, v, y, x: jax.lax.dynamic_update_slice(  # noqa: E731
          acc, jax.lax.dynamic_slice(acc, (y, x, 0), v.shape) + v, (y, x, 0))
      preds = jax.vmap(add)(preds, logits, y1, x1)
      count = jax.vmap(add)(count, inside.astype(jnp.float32), y1, x1)
      return (preds, count), None

    init = (jnp.zeros((b, hc, wc, k), jnp.float32), jnp.zeros((b, hc, wc, 1), jnp.float32))
    (preds, count), _ = jax.lax.scan(window, init, jnp.arange(n_h * n_w))
    return preds / jnp.maximum(count, 1.0)

  def _post_program(self, out_shape: tuple[int, int], acc: jax.Array | None,
                    scores: jax.Array, in_hw: jax.Array, out_hw: jax.Array,
                    flip: jax.Array) -> jax.Array:
    """acc + this term's probabilities at the original sizes [B, Ho, Wo, K]."""
    x = valid.resize(scores, in_hw, out_hw, out_shape)
    probs = x if self.probabilities else jax.nn.softmax(x, axis=-1)
    probs = jnp.where(flip[:, None, None, None], flip_valid(probs, out_hw[:, 1]), probs)
    return probs if acc is None else acc + probs

  def _finish_program(self, n_terms: int, acc: jax.Array, label: jax.Array | None = None,
                      cm: jax.Array | None = None) -> jax.Array:
    return inference_lib.argmax_and_confusion(n_terms, acc, label, cm, self.num_classes,
                                              self.ignore_index)

  # ------------------------------------------------------------------ compilation

  def _spec(self, shape: Sequence[int], dtype: Any, sharded: bool = True) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype),
                                sharding=self._data if sharded else self._rep)

  def _get(self, key: tuple, fn: Callable[..., jax.Array], out_sharding: Any,
           *specs: Any) -> Any:
    compiled = self._compiled.get(key)
    if compiled is None:
      start = time.perf_counter()
      compiled = jax.jit(fn, out_shardings=out_sharding).lower(*specs).compile()
      seconds = time.perf_counter() - start
      self._compiled[key] = compiled
      self.compile_seconds += seconds
      if key[0] == 'model':
        self.model_canvases.add(key[1])
    return compiled

  def _model(self, canvas: tuple[int, int]) -> Any:
    b = self.batch_size
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._rep),
                          self.params)
    return self._get(('model', canvas), self._model_program, self._data, params,
                     self._spec((b, *canvas, 3), jnp.float32), self._spec((b, 2), jnp.int32))

  def _post(self, canvas: tuple[int, int], out: tuple[int, int], first: bool) -> Any:
    b, k = self.batch_size, self.num_classes
    specs = [self._spec((b, *canvas, k), jnp.float32), self._spec((b, 2), jnp.int32),
             self._spec((b, 2), jnp.int32), self._spec((b,), jnp.bool_)]
    if first:
      fn = lambda s, i, o, f: self._post_program(out, None, s, i, o, f)  # noqa: E731
      return self._get(('post', canvas, out, True), fn, self._data, *specs)
    fn = lambda a, s, i, o, f: self._post_program(out, a, s, i, o, f)  # noqa: E731
    return self._get(('post', canvas, out, False), fn, self._data,
                     self._spec((b, *out, k), jnp.float32), *specs)

  def _finish(self, out: tuple[int, int], n_terms: int, with_label: bool) -> Any:
    b, k = self.batch_size, self.num_classes
    acc = self._spec((b, *out, k), jnp.float32)
    fn = lambda *a: self._finish_program(n_terms, *a)  # noqa: E731
    if not with_label:
      return self._get(('pred', out, n_terms), fn, self._data, acc)
    return self._get(('cm', out, n_terms), fn, self._rep, acc,
                     self._spec((b, *out), jnp.uint8), self._spec((k, k), jnp.int32, False))

  # ------------------------------------------------------------------ planning

  def make_plan(self, items: Sequence[tuple[Sequence[tuple[int, int]], tuple[int, int]]]
                ) -> tuple[dict, list[list[int]]]:
    """items: (scale sizes, original size) per image -> (model size -> canvas, batches of
    item indices sharing their canvases at every scale)."""
    all_sizes = [tuple(int(v) for v in hw) for sizes, _ in items for hw in sizes]
    to_canvas = buckets_lib.assign(all_sizes, self.spec, self.max_programs)

    def key(i: int) -> tuple:
      return tuple(to_canvas[self.spec.model_size(hw)] for hw in items[i][0])

    # Within a canvas group, by original size: a batch's output canvas fits its largest.
    order = lambda i: (items[i][1][0] * items[i][1][1], tuple(items[i][1]))  # noqa: E731
    batches = buckets_lib.group(list(range(len(items))), key, self.batch_size, order)
    return to_canvas, batches

  def canvas_of(self, to_canvas: dict, hw: Sequence[int]) -> tuple[int, int]:
    """The canvas of a test image of size hw under a plan (make_plan's first value)."""
    return to_canvas[self.spec.model_size(hw)]

  def out_shape(self, hws: Iterable[Sequence[int]]) -> tuple[int, int]:
    """The output canvas of a batch of original sizes: sides from the model's ladder (the
    post and finish programs are keyed by it: few of them)."""
    hws = list(hws)
    sides = self.spec.sides
    return tuple(buckets_lib.ceil_side(max(int(hw[i]) for hw in hws), sides) for i in (0, 1))

  # ------------------------------------------------------------------ running

  def _global(self, x: np.ndarray, sharded: bool = True) -> jax.Array:
    """A host array (the same on every process) placed on the mesh."""
    sharding = self._data if sharded else self._rep
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  def run_batch(self, examples: Sequence[Mapping[str, Any]], canvases: Sequence[tuple[int, int]],
                cm: jax.Array | None) -> jax.Array:
    """One batch: examples ({'images': per-scale normalised [h, w, 3], 'label' uint8
    original size, or 'out_hw'}), all of whose scale-r images fit canvases[r]. Returns
    cm + the batch's confusion matrix, or (cm None) the predictions [B, Ho, Wo] int32."""
    acc, t, out = self.scores_batch(examples, canvases)
    if cm is None:
      return self._finish(out, t, False)(acc)
    b = self.batch_size
    label = np.full((b, *out), self.ignore_index, np.uint8)
    for i, ex in enumerate(examples):
      lh, lw = ex['label'].shape[:2]
      label[i, :lh, :lw] = ex['label']
    return self._finish(out, t, True)(acc, self._global(label), cm)

  def scores_batch(self, examples: Sequence[Mapping[str, Any]],
                   canvases: Sequence[tuple[int, int]]) -> tuple[jax.Array, int, tuple[int, int]]:
    """(summed per-term probabilities [B, Ho, Wo, K] at the original sizes, number of
    terms, (Ho, Wo)) of a batch (see run_batch)."""
    b, n = self.batch_size, len(examples)
    out_hws = [tuple(ex['label'].shape[:2]) if 'label' in ex else tuple(ex['out_hw'])
               for ex in examples]
    out = self.out_shape(out_hws)
    out_hw = np.full((b, 2), 1, np.int32)
    out_hw[:n] = out_hws
    out_hw_dev = self._global(out_hw)
    acc, t = None, 0
    for r, canvas in enumerate(canvases):
      hw = np.full((b, 2), DUMMY_HW, np.int32)
      sizes = [tuple(ex['images'][r].shape[:2]) for ex in examples]
      hw[:n] = sizes
      in_hw = self._global(hw)
      for flip in self.flips:
        x = np.zeros((b, *canvas, 3), np.float32)
        for i, ex in enumerate(examples):
          im = ex['images'][r]
          x[i, :im.shape[0], :im.shape[1]] = im[:, ::-1] if flip else im
        scores = self._model(canvas)(self.params, self._global(x), in_hw)
        post = self._post(canvas, out, acc is None)
        flips = self._global(np.full((b,), flip, np.bool_))
        acc = (post(scores, in_hw, out_hw_dev, flips) if acc is None
               else post(acc, scores, in_hw, out_hw_dev, flips))
        t += 1
    return acc, t, out

  def zeros_cm(self) -> jax.Array:
    return self._global(np.zeros((self.num_classes, self.num_classes), np.int32), sharded=False)


def make_bucketed_inference(config: ml_collections.ConfigDict, graphdef: Any, rest: Any,
                            params: Any, batch_stats: Any, mesh: jax.sharding.Mesh
                            ) -> BucketedInference:
  """The exact batched inference of a model state (--mode=eval, training's evaluation,
  --mode=predict)."""
  cls = model_class(config.model)

  def model_fn_from_params(params_and_stats):
    p, b = params_and_stats
    return merge_model(graphdef, p, b, rest).segment

  pad = test_size_divisibility(config)
  budget = config.eval.get('bucket_max_programs')
  return BucketedInference(
      model_fn_from_params, (params, batch_stats), config.eval, config.model.num_classes,
      mesh=mesh, output_stride=getattr(cls, 'OUTPUT_STRIDE', 4),
      ignore_index=config.data.ignore_index, probabilities=cls.SCORES_ARE_PROBABILITIES,
      pad_multiple=pad, batch_size=config.eval.batch_size,
      spec=buckets_lib.bucket_spec(config, pad), max_programs=int(budget) if budget else None)


def predict_bucketed(inference: BucketedInference, items: Sequence[tuple[Sequence[tuple[int, int]],
                                                                        tuple[int, int]]],
                     load: Callable[[int], Mapping[str, Any]]
                     ) -> Iterable[tuple[int, np.ndarray]]:
  """(index, class ids int32 [H, W] at the original size) per item, batch by batch;
  load(i) -> {'images': per-scale images} of item i (items as evaluate_bucketed's)."""
  to_canvas, batches = inference.make_plan(items)
  for idx in batches:
    examples = [dict(load(i), out_hw=items[i][1]) for i in idx]
    canvases = [inference.canvas_of(to_canvas, hw) for hw in items[idx[0]][0]]
    pred = np.asarray(jax.device_get(inference.run_batch(examples, canvases, None)))
    for j, i in enumerate(idx):
      h, w = items[i][1]
      yield i, pred[j, :h, :w]


def evaluate_bucketed(inference: BucketedInference, items: Sequence[tuple[Sequence[tuple[int, int]],
                                                                         tuple[int, int]]],
                      load: Callable[[int], Mapping[str, Any]], class_names: list[str]
                      ) -> dict[str, Any]:
  """mIoU of the reference's test over the eval split, batched per bucket.

  items: (scale sizes, original size) of every image of the split (every process the
  same list); load(i) -> {'images': per-scale images, 'label': uint8} of image i. Every
  process runs every batch (the batch is split over all devices)."""
  start = time.time()
  to_canvas, batches = inference.make_plan(items)
  cm = inference.zeros_cm()
  for idx in batches:
    examples = [load(i) for i in idx]
    canvases = [inference.canvas_of(to_canvas, hw) for hw in items[idx[0]][0]]
    cm = inference.run_batch(examples, canvases, cm)
  cm_host = np.asarray(jax.device_get(cm.addressable_data(0)))
  result = metrics_lib.compute_metrics(cm_host, class_names)
  result.update(num_images=len(items), num_batches=len(batches),
                num_shapes=len(inference.model_canvases),
                compile_seconds=inference.compile_seconds, seconds=time.time() - start)
  logging.info('Evaluated %d images in %d batches of %d on %d bucket canvases (reference-'
               'exact): %.1fs compiling, %.1fs in all', len(items), len(batches),
               inference.batch_size, len(inference.model_canvases), inference.compile_seconds,
               result['seconds'])
  return result
