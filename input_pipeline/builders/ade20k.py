"""ADE20K (SceneParsing, 150 classes) from the official ADEChallengeData2016."""
from __future__ import annotations

from input_pipeline.builders import common
from input_pipeline.info import IGNORE_INDEX

NUM_CLASSES = 150
# reduce_zero_label: 0 (other) -> 255, k -> k - 1.
LUT = common.build_lut({0: IGNORE_INDEX, **{k: k - 1 for k in range(1, NUM_CLASSES + 1)}})


class SemaskAde20k(common.SegmentationBuilder):
  """ADE20K SceneParsing (ADEChallengeData2016): 150 classes, train ids 0..149, 255 ignore.

  Not the catalogue's scene_parse150, which reads the instance-challenge
  annotations instead of these 150-class maps.
  """

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put ADEChallengeData2016.zip (or its extracted ADEChallengeData2016/ folder, '
      'with images/{training,validation}/*.jpg and annotations/{training,validation}/*.png) '
      'in the manual directory.')
  NUM_CLASSES = NUM_CLASSES
  LUT = LUT
  SPLITS = ('train', 'validation')
  ZIPS = ('ADEChallengeData2016.zip',)
  FOLDERS = {'train': 'training', 'validation': 'validation'}
  IMAGE_PATTERN = r'images/(training|validation)/([^/]+)\.jpg$'
  LABEL_PATTERN = r'annotations/(training|validation)/([^/]+)\.png$'
