"""Cityscapes (fine annotations, 19 train ids) from the official zips."""
from __future__ import annotations

from input_pipeline.builders import common
from input_pipeline.info import CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_NUM_IDS, IGNORE_INDEX

NUM_CLASSES = 19
# cityscapesscripts' label table: ids 0..33, those without a train id -> 255.
LUT = common.build_lut({i: CITYSCAPES_ID_TO_TRAIN_ID.get(i, IGNORE_INDEX)
                        for i in range(CITYSCAPES_NUM_IDS)})


class SemaskCityscapes(common.SegmentationBuilder):
  """Cityscapes gtFine: 19 classes, *_labelIds.png mapped to train ids, 255 ignore."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (or their extracted '
      'leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and '
      'gtFine/{train,val}/<city>/*_gtFine_labelIds.png folders) in the manual directory.')
  NUM_CLASSES = NUM_CLASSES
  LUT = LUT
  IMAGE_FORMAT = 'png'
  SPLITS = ('train', 'validation')
  ZIPS = ('leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip')
  FOLDERS = {'train': 'train', 'validation': 'val'}
  IMAGE_PATTERN = r'leftImg8bit/(train|val)/([^/]+)/([^/]+)_leftImg8bit\.png$'
  LABEL_PATTERN = r'gtFine/(train|val)/([^/]+)/([^/]+)_gtFine_labelIds\.png$'
