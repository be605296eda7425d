"""Data configs: the reference (mmseg 0.x / SeMask) recipe values per dataset.

Configs do `config.data = default_data_config('ade20k')` and then override
fields. Sizes follow the project's conventions: `img_scale`/`test_scale` are
(long, short) edge bounds as in mmseg's keep-ratio Resize, `crop_size` and the
`eval_*_hw` pads are (height, width).

`recipe` picks the transforms: 'mmseg' (SeMask-FPN, SPEC 6) or 'detectron2'
(SeMask-Mask2Former, SPEC 10: ResizeShortestEdge, crop, ColorAugSSD, flip,
pad to `size_divisibility`; `use_detectron2_recipe` sets its values).
"""
from __future__ import annotations

import ml_collections

from input_pipeline.info import IGNORE_INDEX

DATASETS = ('synthetic', 'ade20k', 'cityscapes', 'coco_stuff10k')

# ImageNet statistics on RGB, 0..255 (mmseg img_norm_cfg).
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
MMSEG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
RECIPES = ('mmseg', 'detectron2')


def short_edge_choices(base: int) -> tuple[int, ...]:
  """Mask2Former's MIN_SIZE_TRAIN: [int(x * 0.1 * base) for x in range(5, 21)]."""
  return tuple(int(x * 0.1 * base) for x in range(5, 21))


def default_data_config(name: str) -> ml_collections.ConfigDict:
  """Returns the reference data recipe for `name` (see SPEC section 6)."""
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {DATASETS}.')
  c = ml_collections.ConfigDict()
  c.name = name
  # TFDS data_dir holding the prepared ArrayRecord files (None: TFDS's default); a str
  # placeholder so that --config.data.data_dir=DIR can set it.
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.ignore_index = IGNORE_INDEX  # label value of unlabelled pixels: loss, metrics, crop, pad
  c.recipe = 'mmseg'  # or 'detectron2' (Mask2Former); see use_detectron2_recipe
  # Train transforms (mmseg order: resize, crop, flip, photometric, norm, pad).
  c.img_scale = (2048, 512)  # (long, short) bound, times the drawn ratio.
  c.ratio_list = MMSEG_RATIOS  # Ratio drawn uniformly from this list, or ...
  c.ratio_range = None  # ... uniformly from [lo, hi) when ratio_list is None.
  c.crop_size = (512, 512)  # (h, w)
  c.cat_max_ratio = 0.75  # >= 1.0 disables the crop redraws.
  c.flip_prob = 0.5
  c.photometric = True
  c.brightness_delta = 32
  c.contrast_range = (0.5, 1.5)
  c.saturation_range = (0.5, 1.5)
  c.hue_delta = 18
  c.mean = MEAN_RGB
  c.std = STD_RGB
  # detectron2 recipe only (recipe='detectron2'; crop_size, cat_max_ratio (as
  # SINGLE_CATEGORY_MAX_AREA), flip_prob, the photometric values (ColorAugSSD), mean and
  # std are shared): the short side is drawn from `short_edge_choices` with the long
  # side at most `max_size`; image (128) and label (255) padded to size_divisibility
  # (<= 0: none); test: short side test_short_edge, long side at most test_max_size.
  # Multi-scale / flip test (Mask2Former's SemanticSegmentorWithTTA, TEST.AUG): short side
  # int(test_short_edge * r) for each ratio r, long side at most test_aug_max_size (fixed,
  # not scaled by r), for every ratio including 1.0.
  c.short_edge_choices = short_edge_choices(512)
  c.max_size = 2048
  c.size_divisibility = 512
  c.test_short_edge = 512
  c.test_max_size = 2048
  c.test_aug_max_size = 3584
  # Eval: keep-ratio resize to test_scale, fixed pads (None: max over split).
  c.test_scale = (2048, 512)
  c.eval_pad_hw = None  # (h, w) pad of the resized image.
  c.eval_label_pad_hw = None  # (h, w) pad of the original-size label.
  c.eval_pad_multiple = 32  # Rounding of the pads computed from the data.
  # Loader.
  c.worker_count = 4  # grain worker processes (0: in the main process).
  c.prefetch = 2  # Batches each worker prepares ahead.
  c.keep_index = False  # Also yield 'index' (record index) in train batches.

  if name == 'ade20k':
    c.num_classes = 150
  elif name == 'coco_stuff10k':
    c.num_classes = 171
    c.eval_split = 'test'
    c.cat_max_ratio = 1.0
  elif name == 'cityscapes':
    c.num_classes = 19
    c.img_scale = (2048, 1024)
    c.ratio_list = None
    c.ratio_range = (0.5, 2.0)
    c.crop_size = (768, 768)
    c.test_scale = (2048, 1024)
    c.eval_pad_hw = (1024, 2048)
    c.eval_label_pad_hw = (1024, 2048)
  elif name == 'synthetic':
    # Sized for a ~5 minute CPU demo of a small SeMask: 96x80 scenes, 64 crops.
    c.num_classes = 6
    c.img_scale = (96, 80)
    c.ratio_list = (0.75, 1.0, 1.25, 1.5)
    c.crop_size = (64, 64)
    c.test_scale = (96, 80)
    c.eval_pad_hw = (80, 96)
    c.eval_label_pad_hw = (80, 96)
    c.worker_count = 0  # Generation is cheap; no process start-up cost.
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.seed = 0
    c.synthetic.num_train = 400
    c.synthetic.num_eval = 50
    c.synthetic.height = 80
    c.synthetic.width = 96
    c.synthetic.max_objects = 5
  return c


def use_detectron2_recipe(c: ml_collections.ConfigDict, *, base: int, max_size: int,
                          size_divisibility: int, test_short_edge: int, test_max_size: int,
                          test_aug_max_size: int) -> ml_collections.ConfigDict:
  """Switches a data config to the Mask2Former (detectron2) transforms in place.

  Short side a uniform choice of int(x * 0.1 * base), x = 5..20; crop with no
  category constraint (SINGLE_CATEGORY_MAX_AREA 1.0); ColorAugSSD with the
  photometric values of section 6; flip 0.5. `crop_size` is left as it is.
  """
  c.recipe = 'detectron2'
  c.short_edge_choices = short_edge_choices(base)
  c.max_size = int(max_size)
  c.size_divisibility = int(size_divisibility)
  c.test_short_edge = int(test_short_edge)
  c.test_max_size = int(test_max_size)
  c.test_aug_max_size = int(test_aug_max_size)
  c.cat_max_ratio = 1.0
  c.photometric = True
  c.flip_prob = 0.5
  return c
