"""Class names, palettes and label maps of the supported datasets."""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import numpy as np

IGNORE_INDEX = 255
_JSON = pathlib.Path(__file__).with_name('datasets.json')  # copy of shared/reference/datasets.json


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  palette: np.ndarray  # uint8 [K, 3] RGB
  ignore_index: int = IGNORE_INDEX


@functools.cache
def reference_tables() -> dict:
  """The reference class names, palettes and label maps (datasets.json)."""
  return json.loads(_JSON.read_text())


# (label id, train id) of cityscapesscripts' helpers.labels, ids 0..33; every
# id not listed here maps to 255 (ignore). The license plate (-1) never occurs
# in *_labelIds.png.
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_NUM_IDS = 34


def dataset_info(name: str) -> DatasetInfo:
  """Returns names/palette for `name` ('synthetic' included)."""
  if name == 'synthetic':
    from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
    names, palette = synthetic.class_names_and_palette(synthetic.DEFAULT_NUM_CLASSES)
    return DatasetInfo(name, len(names), tuple(names), palette)
  tables = reference_tables()
  if name not in tables:
    raise ValueError(f'Unknown dataset {name!r}; known: {sorted(tables)} and synthetic.')
  t = tables[name]
  palette = np.asarray(t['palette'], np.uint8)
  return DatasetInfo(name, len(t['classes']), tuple(t['classes']), palette)
