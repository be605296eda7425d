"""TFDS builders of the paper's data sets, and readers of the prepared files."""
from __future__ import annotations

import tensorflow_datasets as tfds

from input_pipeline.builders.ade20k import SemaskAde20k
from input_pipeline.builders.cityscapes import SemaskCityscapes
from input_pipeline.builders.coco_stuff10k import SemaskCocoStuff10k
from input_pipeline.builders.common import BadExamplesError, SegmentationBuilder, skipped_counts
from semask_jax.cli import PathNotFoundError

BUILDERS: dict[str, type[SegmentationBuilder]] = {
    'ade20k': SemaskAde20k,
    'cityscapes': SemaskCityscapes,
    'coco_stuff10k': SemaskCocoStuff10k,
}


def get_builder(name: str, data_dir: str | None, **kwargs) -> SegmentationBuilder:
  if name not in BUILDERS:
    raise ValueError(f'Unknown TFDS dataset {name!r}; expected one of {sorted(BUILDERS)}.')
  return BUILDERS[name](data_dir=data_dir, file_format='array_record', **kwargs)


class TfdsSource:
  """Random access to a prepared split; images/labels stay encoded bytes.

  Decoding happens later in the grain workers (with RGB conversion), and a
  size scan (`sizes`) does not pay for it.
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    builder = get_builder(name, data_dir)
    if not builder.is_prepared():
      raise PathNotFoundError(
          f'{name} is not prepared in data_dir={data_dir!r} ({builder.data_dir}); run '
          f'python -m input_pipeline.prepare --dataset {name} --manual_dir DIR --data_dir DIR')
    self.name, self.split = name, split
    skip = tfds.decode.SkipDecoding()
    self._source = builder.as_data_source(split, decoders={'image': skip, 'label': skip})

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return self._source[index]

  def sizes(self) -> list[tuple[int, int]]:
    """(height, width) of every record, in index order."""
    return [(int(r['height']), int(r['width'])) for r in self._source]

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, {self.split!r}, n={len(self)})'


def tfds_source(name: str, split: str, data_dir: str | None) -> TfdsSource:
  return TfdsSource(name, split, data_dir)


__all__ = ['BUILDERS', 'BadExamplesError', 'SegmentationBuilder', 'TfdsSource', 'get_builder',
           'skipped_counts', 'tfds_source']
