"""COCO-Stuff 10k (171 classes) from the official cocostuff-10k-v1.1.zip."""
from __future__ import annotations

import io

import numpy as np
import scipy.io

from input_pipeline.builders import common
from input_pipeline.info import IGNORE_INDEX, reference_tables

NUM_CLASSES = 171


def _lut() -> np.ndarray:
  """.mat 'S' value -> train id: datasets.json's map, then reduce_zero_label."""
  table = reference_tables()['coco_stuff10k']['mat_label_to_train_id']
  mapping = {int(raw): (IGNORE_INDEX if int(t) == 0 else int(t) - 1) for raw, t in table.items()}
  return common.build_lut(mapping)


LUT = _lut()


def read_mat_label(data: bytes) -> np.ndarray:
  """The 'S' array of an annotation .mat; ValueError if unreadable or missing."""
  try:
    mat = scipy.io.loadmat(io.BytesIO(data))
  except Exception as e:
    raise ValueError(f'annotation .mat does not load ({type(e).__name__}: {e})') from e
  if 'S' not in mat:
    raise ValueError(f"annotation .mat has no key 'S' (keys: {sorted(k for k in mat if not k.startswith('__'))})")
  return np.asarray(mat['S'])


class SemaskCocoStuff10k(common.SegmentationBuilder):
  """COCO-Stuff 10k v1.1: 171 classes (train ids 0..170), 255 ignore; splits train/test."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put cocostuff-10k-v1.1.zip (or its extracted images/*.jpg, annotations/*.mat and '
      'imageLists/{train,test}.txt) in the manual directory.')
  NUM_CLASSES = NUM_CLASSES
  SPLITS = ('train', 'test')
  ZIPS = ('cocostuff-10k-v1.1.zip',)

  def _pairs(self, tree: common.Tree) -> dict[str, list[common.Pair]]:
    names = tree.names()
    lists = common.match(names, r'imageLists/(train|test)\.txt$')
    images = {k[0]: v for k, v in common.match(names, r'images/([^/]+)\.jpg$').items()}
    labels = {k[0]: v for k, v in common.match(names, r'annotations/([^/]+)\.mat$').items()}
    out = {}
    for split in self.SPLITS:
      if (split,) not in lists:
        raise common.PathNotFoundError(f'{self.name}: imageLists/{split}.txt not found')
      stems = tree.read(lists[(split,)]).decode().split()
      out[split] = [common.Pair(s, images.get(s, f'images/{s}.jpg'), labels.get(s))
                    for s in stems]
    return out

  def _example(self, tree: common.Tree, p: common.Pair) -> dict:
    if not tree.exists(p.image):
      raise ValueError('image file missing')
    return super()._example(tree, p)

  def _train_ids(self, data: bytes) -> np.ndarray:
    return common.map_label(read_mat_label(data), LUT, NUM_CLASSES)
