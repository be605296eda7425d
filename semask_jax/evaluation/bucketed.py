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

A batch is B images that share their canvases at every scale; B is config.eval.batch_size
(0, the default: one image per device; else rounded up to a multiple of the devices),
the batch axis is split over all of them. A canvas' short last batch is filled with
images of smaller canvases (they run exactly in a larger one), and what is still short
with dummy images whose labels are all ignored. Each process reads only the images of
its devices' rows (a grain dataset reading ahead on threads). The confusion matrix stays
on device, replicated, summed by the programs.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

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


def eval_batch_size(requested: int | None, num_devices: int) -> int:
  """config.eval.batch_size over all devices: 0 (the default) one image per device;
  otherwise rounded up to a multiple of the devices (never refused: dummy rows fill)."""
  per_device = -(-int(requested) // num_devices) if requested and int(requested) > 0 else 1
  return max(1, per_device) * num_devices


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
    self.batch_size = eval_batch_size(batch_size if batch_size is not None
                                      else cfg.get('batch_size', 0), mesh.devices.size)
    self.spec = spec or buckets_lib.BucketSpec(pad_multiple=self.pad_multiple)
    self.max_programs = (buckets_lib.default_max_programs(len(self.scales))
                         if max_programs is None else max_programs)
    self._rep = sharding_lib.replicated(mesh)
    self._data = NamedSharding(mesh, P(sharding_lib.DATA_AXIS))
    self._replicate = jax.jit(lambda p: p, out_shardings=self._rep)
    self.set_params(params)
    self._compiled: dict[tuple, Any] = {}
    self.compile_seconds = 0.0
    self.model_canvases: set[tuple[int, int]] = set()

  def set_params(self, params: Any) -> None:
    """The model state evaluated next, placed whole on every device of the mesh. A state
    split over several processes (config.state_sharding='fsdp') is gathered by one jitted
    identity (its all-gathers in one program): jax.device_put reshards it leaf by leaf,
    and two such calls in a row (the evaluation's, then the summary images') hung on
    XLA:CPU's gloo collectives (tests/test_distributed.py)."""
    local = all(getattr(x, 'is_fully_addressable', True) for x in jax.tree.leaves(params))
    self.params = jax.device_put(params, self._rep) if local else self._replicate(params)

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
    if not with_label:  # replicated: every process gets the whole batch's predictions
      return self._get(('pred', out, n_terms), fn, self._rep, acc)
    return self._get(('cm', out, n_terms), fn, self._rep, acc,
                     self._spec((b, *out), jnp.uint8), self._spec((k, k), jnp.int32, False))

  # ------------------------------------------------------------------ planning

  def make_plan(self, items: Sequence[tuple[Sequence[tuple[int, int]], tuple[int, int]]]
                ) -> tuple[dict, list[list[int]]]:
    """items: (scale sizes, original size) per image -> (model size -> canvas, batches of
    item indices; see buckets.plan_batches)."""
    return buckets_lib.plan_batches(items, self.spec, self.batch_size, self.max_programs)

  def canvas_of(self, to_canvas: dict, hw: Sequence[int]) -> tuple[int, int]:
    """The canvas of a test image of size hw under a plan (make_plan's first value)."""
    return to_canvas[self.spec.model_size(hw)]

  def out_shape(self, hws: Iterable[Sequence[int]]) -> tuple[int, int]:
    """The output canvas of a batch of original sizes (buckets.out_canvas)."""
    return buckets_lib.out_canvas(hws, self.spec)

  # ------------------------------------------------------------------ running

  def _global(self, x: np.ndarray, sharded: bool = True) -> jax.Array:
    """A host array (the same on every process) placed on the mesh."""
    sharding = self._data if sharded else self._rep
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  def _rows(self, shape: tuple[int, ...], dtype: Any, row: Callable[[int], np.ndarray]
            ) -> jax.Array:
    """[B, ...] split over the devices, row(j) called only for the rows of this
    process's devices (the others are another process's to build)."""
    def shard(idx):
      rows = range(*idx[0].indices(shape[0]))
      return np.stack([row(j) for j in rows]).astype(dtype, copy=False)
    return jax.make_array_from_callback(shape, self._data, shard)

  def local_rows(self) -> list[int]:
    """The rows of a batch that live on this process's devices (all of them on one
    process): only their images need to be read here."""
    rows: set[int] = set()
    for idx in self._data.addressable_devices_indices_map((self.batch_size,)).values():
      rows.update(range(*idx[0].indices(self.batch_size)))
    return sorted(rows)

  def run_batch(self, examples: Sequence[Mapping[str, Any] | None],
                canvases: Sequence[tuple[int, int]], cm: jax.Array | None,
                sizes: Sequence[tuple[Sequence[tuple[int, int]], tuple[int, int]]] | None = None
                ) -> jax.Array:
    """One batch: examples ({'images': per-scale normalised [h, w, 3], 'label' uint8
    original size, or 'out_hw'}), all of whose scale-r images fit canvases[r]. Returns
    cm + the batch's confusion matrix, or (cm None) the predictions [B, Ho, Wo] int32.
    sizes: (scale sizes, original size) per example (items'); with them, an example
    that is not on this process's devices may be None (see local_rows)."""
    sizes = sizes if sizes is not None else [_sizes_of(ex) for ex in examples]
    acc, t, out = self.scores_batch(examples, canvases, sizes)
    if cm is None:
      return self._finish(out, t, False)(acc)

    def label(j: int) -> np.ndarray:
      row = np.full(out, self.ignore_index, np.uint8)
      if j < len(examples):
        lab = examples[j]['label']
        if tuple(lab.shape[:2]) != tuple(sizes[j][1]):
          raise ValueError(f'label of size {lab.shape[:2]} where the plan has {sizes[j][1]}')
        row[:lab.shape[0], :lab.shape[1]] = lab
      return row

    return self._finish(out, t, True)(acc, self._rows((self.batch_size, *out), np.uint8,
                                                      label), cm)

  def scores_batch(self, examples: Sequence[Mapping[str, Any] | None],
                   canvases: Sequence[tuple[int, int]],
                   sizes: Sequence[tuple[Sequence[tuple[int, int]], tuple[int, int]]] | None = None
                   ) -> tuple[jax.Array, int, tuple[int, int]]:
    """(summed per-term probabilities [B, Ho, Wo, K] at the original sizes, number of
    terms, (Ho, Wo)) of a batch (see run_batch)."""
    b, n = self.batch_size, len(examples)
    sizes = sizes if sizes is not None else [_sizes_of(ex) for ex in examples]
    out = self.out_shape(hw for _, hw in sizes)
    out_hw = np.full((b, 2), 1, np.int32)
    out_hw[:n] = [hw for _, hw in sizes]
    out_hw_dev = self._global(out_hw)
    acc, t = None, 0
    for r, canvas in enumerate(canvases):
      hw = np.full((b, 2), DUMMY_HW, np.int32)
      hw[:n] = [s[r] for s, _ in sizes]
      in_hw = self._global(hw)
      for flip in self.flips:
        def image(j: int, r: int = r, flip: bool = flip, canvas=canvas) -> np.ndarray:
          x = np.zeros((*canvas, 3), np.float32)
          if j < n:
            im = examples[j]['images'][r]
            if tuple(im.shape[:2]) != tuple(hw[j]):
              raise ValueError(f'image of size {im.shape[:2]} where the plan has {tuple(hw[j])}')
            x[:im.shape[0], :im.shape[1]] = im[:, ::-1] if flip else im
          return x
        x = self._rows((b, *canvas, 3), np.float32, image)
        scores = self._model(canvas)(self.params, x, in_hw)
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


def _sizes_of(ex: Mapping[str, Any]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
  """(scale sizes, original size) of a loaded example."""
  out = tuple(ex['label'].shape[:2]) if 'label' in ex else tuple(ex['out_hw'])
  return [tuple(im.shape[:2]) for im in ex['images']], out


Items = Sequence[tuple[Sequence[tuple[int, int]], tuple[int, int]]]


def load_batches(inference: BucketedInference, items: Items, load: Callable[[int], Any],
                 num_threads: int = 8) -> Iterator[tuple[list[int], list[Any],
                                                          list[tuple[int, int]]]]:
  """(item indices, examples, canvases) per batch of the plan. Only the rows on this
  process's devices are loaded (None elsewhere), by a grain dataset reading ahead on
  `num_threads` threads (decoding releases the GIL) about two batches' worth."""
  import grain  # noqa: PLC0415  (the data loader: only where images are read)
  to_canvas, batches = inference.make_plan(items)
  local = set(inference.local_rows())
  wanted = [i for idx in batches for j, i in enumerate(idx) if j in local]
  examples = iter(())
  if wanted:
    ahead = max(2, 2 * len(local))
    examples = iter(grain.MapDataset.source(wanted).map(load).to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, min(num_threads, ahead)),
                          prefetch_buffer_size=ahead)))
  for idx in batches:
    exs = [next(examples) if j in local else None for j in range(len(idx))]
    yield idx, exs, [inference.canvas_of(to_canvas, hw) for hw in items[idx[0]][0]]


def predict_bucketed(inference: BucketedInference, items: Items,
                     load: Callable[[int], Mapping[str, Any]]
                     ) -> Iterable[tuple[int, np.ndarray, Mapping[str, Any]]]:
  """(index, class ids int32 [H, W] at the original size, load(index) or None where it is
  another process's row) per item, batch by batch; load(i) -> {'images': per-scale
  images, ...} of item i (items as evaluate_bucketed's). Every process of the mesh takes
  part and gets every prediction."""
  for idx, exs, canvases in load_batches(inference, items, load):
    pred = np.asarray(inference.run_batch(exs, canvases, None,
                                          [items[i] for i in idx]).addressable_data(0))
    for j, i in enumerate(idx):
      h, w = items[i][1]
      yield i, pred[j, :h, :w], exs[j]


def evaluate_bucketed(inference: BucketedInference, items: Items,
                      load: Callable[[int], Mapping[str, Any]], class_names: list[str]
                      ) -> dict[str, Any]:
  """mIoU of the reference's test over the eval split, batched per bucket.

  items: (scale sizes, original size) of every image of the split (every process the
  same list); load(i) -> {'images': per-scale images, 'label': uint8} of image i. Every
  process runs every batch (split over all devices) and reads only its rows' images."""
  start = time.time()
  cm = inference.zeros_cm()
  num_batches = 0
  for num_batches, (idx, exs, canvases) in enumerate(load_batches(inference, items, load), 1):
    cm = inference.run_batch(exs, canvases, cm, [items[i] for i in idx])
    if num_batches % 50 == 0:
      logging.info('Evaluated %d batches of %d (%.0fs)', num_batches, inference.batch_size,
                   time.time() - start)
  cm_host = np.asarray(jax.device_get(cm.addressable_data(0)))
  result = metrics_lib.compute_metrics(cm_host, class_names)
  result.update(num_images=len(items), num_batches=num_batches,
                num_shapes=len(inference.model_canvases),
                compile_seconds=inference.compile_seconds, seconds=time.time() - start)
  logging.info('Evaluated %d images in %d batches of %d on %d bucket canvases (reference-'
               'exact): %.1fs compiling, %.1fs in all', len(items), num_batches,
               inference.batch_size, len(inference.model_canvases), inference.compile_seconds,
               result['seconds'])
  return result
