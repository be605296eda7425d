"""grain loaders: sharded, seeded, resumable train stream; finite padded eval.

Train: IndexSampler over this process's shard (shuffled per epoch with the
seed, repeated forever) -> decode -> the recipe's train transforms (mmseg, or
detectron2's for Mask2Former; data.recipe) -> batch of
global_batch_size // process_count, optionally in `worker_count` processes.
Per-example randomness comes from grain's per-record Generator, so batches
depend only on (seed, data, process layout), not on worker count or timing,
and the iterator's small state (grain get_state/set_state) resumes exactly.

Checkpointing the train iterator with orbax:

    mngr = ocp.CheckpointManager(dir, item_names=('state', 'data'))  # or any
    mngr.save(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(train_iter), ...))
    mngr.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(train_iter), ...))

`CheckpointRestore` sets the state of the (freshly created, same-config)
iterator in place; each process writes its own `process_<i>-of-<n>.json`.
Restore with the same seed, batch size, process count and worker_count.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from input_pipeline import synthetic
from input_pipeline import transforms as T


class IndexedSource:
  """Adds the record index to every record (for debugging, shard tests, eval)."""

  def __init__(self, source: Any):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    return dict(self.source[int(index)], index=np.int32(index))

  def __repr__(self) -> str:
    return f'IndexedSource({self.source!r})'


def data_source(cfg: ml_collections.ConfigDict, split: str) -> IndexedSource:
  """Random-access records {'image', 'label', 'file_name', 'height', 'width', 'index'}.

  'image'/'label' are encoded bytes (TFDS, decoded later in the workers) or
  uint8 arrays (synthetic).
  """
  if cfg.name == 'synthetic':
    s = cfg.synthetic
    n = s.num_train if split == cfg.train_split else s.num_eval
    src = synthetic.SyntheticSource(split, n, seed=s.seed, height=s.height, width=s.width,
                                    num_classes=cfg.num_classes, max_objects=s.max_objects)
    return IndexedSource(src)
  from input_pipeline import builders  # pylint: disable=g-import-not-at-top  (imports tfds)
  return IndexedSource(builders.tfds_source(cfg.name, split, cfg.data_dir))


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return process_index, process_count


def make_loader(source: Any, sampler: Any, ops: list, cfg: ml_collections.ConfigDict,
            shard: grain.sharding.ShardOptions) -> grain.DataLoader:
  """grain DataLoader with the config's worker count and prefetch depth."""
  if int(cfg.worker_count) > 0 and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside absl.app (notebooks,
    # scripts) mark the defaults as parsed, as grain's docs advise.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          worker_count=int(cfg.worker_count),
                          worker_buffer_size=int(cfg.prefetch), shard_options=shard)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible by '
                     f'the process count {process_count}')
  return global_batch_size // process_count


def create_train_iterator(data_cfg: ml_collections.ConfigDict, *, seed: int,
                          global_batch_size: int, process_index: int | None = None,
                          process_count: int | None = None,
                          max_targets: int | None = None) -> grain.DataLoaderIterator:
  """Infinite train batches for this process.

  Yields {'image': float32 [b, crop_h, crop_w, 3] normalised, 'label': int32
  [b, crop_h, crop_w] (255 = ignore)} (+ 'index' int32 [b] if keep_index);
  the detectron2 recipe with size_divisibility sd > 0 gives [b, sd, sd]. Mask2Former's
  per-image targets are made from 'label' in the train step, not here.
  b = global_batch_size // process_count. process_index/count default to
  jax's; they are arguments only so that tests can emulate several hosts.
  max_targets: a crop with more classes is an error naming its image (the Mask2Former
  family's static target slots).
  """
  p, n = _process_layout(process_index, process_count)
  b = _local_batch_size(global_batch_size, n)
  source = data_source(data_cfg, data_cfg.train_split)
  shard = grain.sharding.ShardOptions(shard_index=p, shard_count=n, drop_remainder=False)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard,
                                        shuffle=True, num_epochs=None, seed=int(seed))
  ops = T.train_transforms(data_cfg, max_targets) + [grain.transforms.Batch(b, drop_remainder=True)]
  return iter(make_loader(source, sampler, ops, data_cfg, shard))


# ------------------------------------------------------------------------ eval


class PaddedShardSource:
  """This process's contiguous slice of a split, padded to whole batches.

  Position i < len(slice) maps to global record start + i; later positions are
  padding records ({'pad': True}). Every process gets the same number of
  positions, so all hosts run the same number of eval steps.
  """

  def __init__(self, source: Any, start: int, stop: int, length: int):
    self.source, self.start, self.stop, self.length = source, start, stop, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if self.start + i < self.stop:
      return self.source[self.start + i]
    return {'pad': True}

  def __repr__(self) -> str:
    return (f'PaddedShardSource({self.source!r}, [{self.start}, {self.stop}), '
            f'len={self.length})')


def eval_shard(num_examples: int, local_batch: int, process_index: int,
               process_count: int) -> tuple[int, int, int]:
  """(start, stop, padded_length) of a process's eval slice; all lengths equal."""
  per_process = math.ceil(num_examples / process_count)
  num_batches = max(1, math.ceil(per_process / local_batch))
  start = min(process_index * per_process, num_examples)
  stop = min(start + per_process, num_examples)
  return start, stop, num_batches * local_batch


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def eval_pads(cfg: ml_collections.ConfigDict, source: Any) -> tuple[tuple[int, int], tuple[int, int]]:
  """Fixed (image, label) pad sizes: from the config or the max over the split."""
  if cfg.eval_pad_hw is not None and cfg.eval_label_pad_hw is not None:
    return tuple(cfg.eval_pad_hw), tuple(cfg.eval_label_pad_hw)
  sizes = np.asarray([(int(r['height']), int(r['width'])) for r in _records_for_sizes(source)])
  resized = np.asarray([T.test_size(tuple(s), cfg) for s in sizes])
  m = int(cfg.eval_pad_multiple)
  pad = tuple(_round_up(int(v), m) for v in resized.max(0))
  label_pad = tuple(int(v) for v in sizes.max(0))
  return (tuple(cfg.eval_pad_hw) if cfg.eval_pad_hw is not None else pad,
          tuple(cfg.eval_label_pad_hw) if cfg.eval_label_pad_hw is not None else label_pad)


def _records_for_sizes(source: Any) -> Iterable[dict]:
  """Records with 'height'/'width', skipping image decoding where possible."""
  inner = getattr(source, 'source', source)
  sized = getattr(inner, 'sizes', None)  # TfdsSource exposes a cheap size scan.
  if sized is not None:
    return [{'height': h, 'width': w} for h, w in sized()]
  return (source[i] for i in range(len(source)))


def create_eval_iterator(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                         process_index: int | None = None,
                         process_count: int | None = None) -> grain.DataLoader:
  """Finite, deterministic eval batches; re-iterable (each iter() starts over).

  Yields {'image': float32 [b, Hp, Wp, 3] (resized by the recipe's test resize, 0-padded),
  'image_hw': int32 [b, 2] (resized size), 'label': int32 [b, Lh, Lw]
  (original size, 255-padded), 'label_hw': int32 [b, 2] (original size),
  'valid': bool [b], 'index': int32 [b] (record index, -1 for padding)}.
  Over all processes every record appears exactly once with valid=True.
  """
  p, n = _process_layout(process_index, process_count)
  b = _local_batch_size(global_batch_size, n)
  source = data_source(data_cfg, data_cfg.eval_split)
  pad_hw, label_pad_hw = eval_pads(data_cfg, source)
  start, stop, length = eval_shard(len(source), b, p, n)
  padded = PaddedShardSource(source, start, stop, length)
  sampler = grain.samplers.IndexSampler(num_records=length, shard_options=grain.sharding.NoSharding(),
                                        shuffle=False, num_epochs=1)
  ops = [T.eval_transform(data_cfg, pad_hw, label_pad_hw),
         grain.transforms.Batch(b, drop_remainder=False)]
  return make_loader(padded, sampler, ops, data_cfg, grain.sharding.NoSharding())


def make_global_batch(local_batch: dict, mesh: jax.sharding.Mesh,
                      data_axis: str | tuple[str, ...] = 'data') -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays sharded along `data_axis` (dim 0)."""
  sharding = NamedSharding(mesh, PartitionSpec(data_axis))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


# --------------------------------------------------- eval, one image at a time


def is_tta(ratios: Iterable[float], flip: bool) -> bool:
  """Whether an evaluation with these test ratios and flip is a test-time augmentation (the
  detectron2 recipe then resizes every pass with TEST.AUG's fixed max size)."""
  return tuple(float(r) for r in ratios) != (1.0,) or bool(flip)


def scale_images(image: np.ndarray, data_cfg: ml_collections.ConfigDict,
                 ratios: Iterable[float], *, tta: bool | None = None) -> list[np.ndarray]:
  """The reference's test images of one ORIGINAL uint8 RGB image: one normalised float32
  [h_r, w_r, 3] per ratio, each at its own size (no padding).

  mmseg MultiScaleFlipAug: ratio r keep-ratio resizes the original to
  (int(long * r), int(short * r)) of test_scale (r = 1.0: test_scale itself),
  cv2 bilinear, mmcv normalisation. The detectron2 recipe (data.recipe, Mask2Former)
  uses its own test resize and normalisation: short side test_short_edge, long side at
  most test_max_size. Under test-time augmentation (`tta`; default: several ratios or one
  other than 1.0; pass is_tta(ratios, flip) when flipping) it is detectron2's
  DatasetMapperTTA, which resizes the test loader's image, already resized so, again:
  short side int(test_short_edge * r), long side at most test_aug_max_size, both resizes
  PIL bilinear on uint8.
  """
  ratios = tuple(ratios)
  if data_cfg.get('recipe', 'mmseg') == 'detectron2':
    if tta is None:
      tta = is_tta(ratios, False)
    if not tta:
      return [np.asarray(T.test_preprocess(image, data_cfg)[0], np.float32)]
    loaded = T.resize_pil_bilinear(image, T.test_size(image.shape[:2], data_cfg))
    return [T.d2_normalize(T.resize_pil_bilinear(loaded, hw), data_cfg.mean, data_cfg.std)
            for hw in scale_sizes(image.shape[:2], data_cfg, ratios, tta=True)]
  out = []
  for r in ratios:
    hw = scale_sizes(image.shape[:2], data_cfg, (r,))[0]
    out.append(T.normalize(T.resize_bilinear(image, hw), tuple(data_cfg.mean),
                           tuple(data_cfg.std)))
  return out


def _d2_scaled(data_cfg: ml_collections.ConfigDict, r: float, ratios: tuple[float, ...],
               tta: bool | None) -> ml_collections.ConfigDict:
  """The data config whose test resize is detectron2's for ratio r of `ratios`."""
  if tta is None:
    tta = is_tta(ratios, False)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.test_short_edge = int(cfg.test_short_edge * r)
  if tta:
    if cfg.get('test_aug_max_size') is None:
      raise ValueError('data config: test_aug_max_size (detectron2 TEST.AUG.MAX_SIZE) is '
                       'needed for a multi-scale or flipped test of the detectron2 recipe')
    cfg.test_max_size = int(cfg.test_aug_max_size)
  return cfg


def scale_sizes(hw: tuple[int, int], data_cfg: ml_collections.ConfigDict,
                ratios: Iterable[float], *, tta: bool | None = None) -> list[tuple[int, int]]:
  """The (h, w) of scale_images' outputs for an original of size hw (no decoding)."""
  ratios = tuple(ratios)
  if data_cfg.get('recipe', 'mmseg') == 'detectron2':
    if tta is None:
      tta = is_tta(ratios, False)
    if tta:  # DatasetMapperTTA resizes the test loader's (already resized) image
      hw = T.test_size(tuple(hw), data_cfg)
    return [tuple(T.test_size(tuple(hw), _d2_scaled(data_cfg, r, ratios, tta))) for r in ratios]
  return [T.rescale_size(tuple(hw), (int(data_cfg.test_scale[0] * r), int(data_cfg.test_scale[1] * r)))
          for r in ratios]


@dataclasses.dataclass(frozen=True)
class PerImageEvalTransform(grain.transforms.Map):
  """Record -> {'images': tuple of normalised [h_r, w_r, 3] (one per ratio, own size),
  'label': uint8 [H, W] (original), 'index': int32}."""
  data_cfg: Any
  ratios: tuple[float, ...]
  tta: bool | None = None  # see scale_images

  def map(self, ex: dict) -> dict:
    d2 = self.data_cfg.get('recipe', 'mmseg') == 'detectron2'
    ex = T.Decode(**({'image_backend': 'pil'} if d2 else {})).map(ex)
    return {'images': tuple(scale_images(ex['image'], self.data_cfg, self.ratios, tta=self.tta)),
            'label': ex['label'], 'index': ex['index']}


def per_image_eval_slice(data_cfg: ml_collections.ConfigDict, *,
                         process_index: int | None = None,
                         process_count: int | None = None) -> tuple[Any, int, int]:
  """(eval source, start, stop): this process's contiguous slice of the eval split."""
  p, n = _process_layout(process_index, process_count)
  source = data_source(data_cfg, data_cfg.eval_split)
  start, stop, _ = eval_shard(len(source), 1, p, n)
  return source, start, stop


def per_image_eval_sizes(data_cfg: ml_collections.ConfigDict, *,
                         process_index: int | None = None,
                         process_count: int | None = None) -> list[tuple[int, int]]:
  """Original (h, w) of this process's eval images, in iteration order (cheap size scan
  where the source has one): lets the evaluator compile every shape up front."""
  source, start, stop = per_image_eval_slice(data_cfg, process_index=process_index,
                                             process_count=process_count)
  sizes = [(int(r['height']), int(r['width'])) for r in _records_for_sizes(source)]
  return sizes[start:stop]


def create_per_image_eval_iterator(data_cfg: ml_collections.ConfigDict, *,
                                   ratios: Iterable[float] = (1.0,),
                                   tta: bool | None = None,
                                   process_index: int | None = None,
                                   process_count: int | None = None) -> Iterable[dict]:
  """This process's eval images one at a time, as the reference tests them (batch 1).

  Yields {'images': tuple of float32 [h_r, w_r, 3] (one per ratio, see scale_images
  and its `tta`),
  'label': uint8 [H, W] original size, 'index': int32}. Every record of the split
  appears on exactly one process (contiguous slices, as create_eval_iterator's);
  processes may get different counts (no collective runs per image).
  """
  source, start, stop = per_image_eval_slice(data_cfg, process_index=process_index,
                                             process_count=process_count)
  if stop <= start:
    return iter(())
  sub = PaddedShardSource(source, start, stop, stop - start)
  sampler = grain.samplers.IndexSampler(num_records=stop - start,
                                        shard_options=grain.sharding.NoSharding(),
                                        shuffle=False, num_epochs=1)
  ops = [PerImageEvalTransform(data_cfg, tuple(float(r) for r in ratios), tta)]
  return make_loader(sub, sampler, ops, data_cfg, grain.sharding.NoSharding())
