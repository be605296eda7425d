"""Shared parts of the TFDS builders: archive access, validation, the base builder.

The builders never need tensorflow: they yield encoded bytes (the original
image file, never re-encoded, and a PNG of train ids made with PIL) and TFDS
writes them to ArrayRecord files. Every example is validated on the way; bad ones are
collected with the reason and either skipped (skip_bad=True) or, after every
split has been scanned so that the report names all of them, turned into a
`BadExamplesError` that aborts the build (TFDS then removes the incomplete
files, so a re-run starts clean).
"""
from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import re
import zipfile
from typing import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from input_pipeline import transforms
from semask_jax.cli import PathNotFoundError
from input_pipeline.info import IGNORE_INDEX

INVALID = -1  # LUT entry for raw label values that have no train id.


class BadExamplesError(RuntimeError):
  """Raised after generation when bad examples were found and not skipped."""

  def __init__(self, bad: list[tuple[str, str, str]], empty_split: str | None = None):
    self.bad = bad
    lines = [f'{len(bad)} bad example(s):'] + [f'  [{s}] {f}: {why}' for s, f, why in bad]
    if empty_split:
      lines.append(f'Split {empty_split!r} has no good example, so nothing can be written.')
    else:
      lines.append('Fix or remove them, or re-run with --skip_bad to write the good ones.')
    super().__init__('\n'.join(lines))


class Tree:
  """Read-only view of files under a directory or inside zip files.

  Paths are '/'-separated and relative to the directory / zip root, so the
  builders work on the official zips and on their extracted folders alike.
  """

  def __init__(self, roots: list[pathlib.Path]):
    self._zips: list[zipfile.ZipFile] = []
    self._where: dict[str, tuple[int, str] | pathlib.Path] = {}
    for root in roots:
      if root.is_dir():
        for dirpath, _, files in os.walk(root):
          for f in files:
            full = pathlib.Path(dirpath) / f
            self._where[full.relative_to(root).as_posix()] = full
      else:
        zf = zipfile.ZipFile(root)
        self._zips.append(zf)
        for name in zf.namelist():
          if not name.endswith('/'):
            self._where[name] = (len(self._zips) - 1, name)

  def names(self) -> list[str]:
    return sorted(self._where)

  def exists(self, name: str) -> bool:
    return name in self._where

  def read(self, name: str) -> bytes:
    where = self._where[name]
    if isinstance(where, pathlib.Path):
      return where.read_bytes()
    return self._zips[where[0]].read(where[1])

  def close(self) -> None:
    for zf in self._zips:
      zf.close()


def match(names: list[str], pattern: str) -> dict[tuple[str, ...], str]:
  """Names matching the regex `pattern` (searched, so any folder prefix is fine),
  keyed by the pattern's groups."""
  rx = re.compile(pattern)
  out = {}
  for name in names:
    m = rx.search(name)
    if m and (m.start() == 0 or name[m.start() - 1] == '/'):
      out[m.groups()] = name
  return out


def build_lut(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
  """Raw value -> train id table; values not in `mapping` are INVALID. int16 [size]."""
  lut = np.full(size, INVALID, np.int16)
  for raw, train_id in mapping.items():
    lut[int(raw)] = train_id
  return lut


def map_label(raw: np.ndarray, lut: np.ndarray, num_classes: int) -> np.ndarray:
  """Applies `lut`, raising ValueError naming the offending raw values."""
  raw = np.asarray(raw)
  if raw.ndim != 2:
    raise ValueError(f'label must be 2-D, got shape {raw.shape}')
  if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
    bad = np.unique(raw[(raw < 0) | (raw >= len(lut))])[:8]
    raise ValueError(f'label values {bad.tolist()} out of range')
  out = lut[raw.astype(np.int64)]
  if (out == INVALID).any():
    bad = np.unique(raw[out == INVALID])[:8]
    raise ValueError(f'label values {bad.tolist()} out of range')
  assert ((out >= 0) & (out < num_classes) | (out == IGNORE_INDEX)).all()
  return out.astype(np.uint8)


def check_image(data: bytes) -> tuple[bytes, tuple[int, int]]:
  """Fully decodes `data`; returns (the same bytes, (h, w) as decoded). ValueError if bad.

  The original file is stored whatever its mode (grey, CMYK, palette,
  16-bit, alpha): the loader decodes it as mmcv does, with cv2.imdecode
  (IMREAD_COLOR), into 8-bit 3-channel pixels with the EXIF orientation
  applied, so (h, w) is taken from that decode (the label must match it).
  PIL decodes it too, because OpenCV only warns about a truncated file and
  returns the partial image. As in mmcv, the content decides the format, not
  the file name.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Full decode: catches truncated / corrupt files.
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise ValueError(f'image does not decode ({type(e).__name__}: {e})') from e
  try:
    image = transforms.decode_image(data)
  except ValueError as e:
    raise ValueError(f'image does not decode with OpenCV ({e})') from e
  return data, image.shape[:2]


def read_png_label(data: bytes) -> np.ndarray:
  """Decodes a single-channel label PNG fully. ValueError if bad."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode not in ('L', 'P', 'I', 'I;16'):
        raise ValueError(f'expected a single-channel label, got mode {im.mode}')
      return np.asarray(im)
  except Exception as e:
    raise ValueError(f'label does not decode ({type(e).__name__}: {e})') from e


def encode_png(label: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(label.astype(np.uint8), mode='L').save(buf, format='PNG')
  return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example in the download: its key, image path and label path (or None)."""
  key: str
  image: str
  label: str | None


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
  """Base: (image bytes, train-id PNG, file name, original size) per example."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: train-id labels, 255 = ignore.',
      '1.1.0': 'Image files stored as they are (grey, CMYK, palette no longer re-encoded); '
               'height/width as cv2.imdecode(IMREAD_COLOR) gives them (EXIF orientation).',
  }
  NUM_CLASSES: int
  IMAGE_FORMAT = 'jpeg'
  SPLITS: tuple[str, ...]

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    self.skip_bad = skip_bad
    self._bad: list[tuple[str, str, str]] = []
    self._pending: set[str] = set()  # splits whose generator has not finished
    self._all_pairs: dict[str, list[Pair]] = {}
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def _checksums_path(cls) -> None:
    """No URL downloads, so no checksums file. (TFDS's own lookup imports the
    optional `importlib_resources` for builders defined in a package.)"""
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format=self.IMAGE_FORMAT),
            'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'file_name': tfds.features.Text(),
            'height': np.int32,
            'width': np.int32,
        }),
        supervised_keys=('image', 'label'),
        metadata=tfds.core.MetadataDict(),
    )

  # Default pairing: regexes whose first group is the split folder (FOLDERS
  # maps split -> folder) and whose other groups identify the example.
  IMAGE_PATTERN: str
  LABEL_PATTERN: str
  FOLDERS: dict[str, str]

  def _pairs(self, tree: Tree) -> dict[str, list[Pair]]:
    """split name -> examples, from the files in the manual download."""
    names = tree.names()
    images = match(names, self.IMAGE_PATTERN)
    labels = match(names, self.LABEL_PATTERN)
    return {split: [Pair(key[-1], path, labels.get(key))
                     for key, path in sorted(images.items()) if key[0] == folder]
            for split, folder in self.FOLDERS.items()}

  LUT: np.ndarray  # raw label value -> train id (build_lut)

  def _train_ids(self, data: bytes) -> np.ndarray:
    """Raw label file bytes -> uint8 train ids [H, W] (ValueError if bad)."""
    return map_label(read_png_label(data), self.LUT, self.NUM_CLASSES)

  ZIPS: tuple[str, ...] = ()  # Official archive names looked for in manual_dir.

  def _open(self, manual_dir: pathlib.Path) -> Tree:
    """The official zips present in manual_dir, plus the folder itself (extracted)."""
    if not manual_dir.is_dir():
      raise PathNotFoundError(f'{self.name}: manual_dir {manual_dir} is not a folder.\n'
                              f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    zips = [manual_dir / z for z in self.ZIPS if (manual_dir / z).is_file()]
    return Tree(zips + [manual_dir])

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    tree = self._open(pathlib.Path(dl_manager.manual_dir))
    pairs = self._pairs(tree)
    empty = [s for s in self.SPLITS if not pairs.get(s)]
    if empty:
      raise PathNotFoundError(
          f'{self.name}: no examples for split(s) {empty} in {dl_manager.manual_dir}.\n'
          f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    self._pending = set(self.SPLITS)
    self._all_pairs = pairs
    self.info.metadata['skipped'] = {}
    return {s: self._generate_examples(tree, s, pairs[s]) for s in self.SPLITS}

  def _example(self, tree: Tree, p: Pair) -> dict:
    """Reads and validates one example; ValueError naming the problem."""
    if p.label is None or not tree.exists(p.label):
      raise ValueError(f'label file missing ({p.label or "no match"})')
    image, (h, w) = check_image(tree.read(p.image))
    try:
      label = self._train_ids(tree.read(p.label))
    except ValueError as e:
      raise ValueError(f'{p.label}: {e}') from e
    if label.shape != (h, w):
      raise ValueError(f'label size {label.shape[1]}x{label.shape[0]} != '
                       f'image size {w}x{h} (WxH)')
    return {'image': image, 'label': encode_png(label),
            'file_name': p.image, 'height': h, 'width': w}

  def _validate(self, tree: Tree, split: str, pairs: list[Pair]) -> Iterator[tuple[str, dict]]:
    """Good examples of `pairs`; bad ones are recorded in self._bad."""
    for p in pairs:
      try:
        ex = self._example(tree, p)
      except ValueError as e:
        self._bad.append((split, p.image, str(e)))
        continue
      yield p.key, ex

  def _generate_examples(self, tree: Tree, split: str, pairs: list[Pair]
                         ) -> Iterator[tuple[str, dict]]:
    num_bad, num_good = len(self._bad), 0
    for key, ex in self._validate(tree, split, pairs):
      num_good += 1
      yield key, ex
    self.info.metadata['skipped'][split] = [[f, why] for _, f, why in self._bad[num_bad:]]
    self._pending.discard(split)
    if num_good == 0:
      # TFDS cannot write an empty split: stop now, but scan the remaining
      # splits first so that the report still names every bad file.
      for s in sorted(self._pending):
        for _ in self._validate(tree, s, self._all_pairs[s]):
          pass
      self._pending.clear()
    if not self._pending:
      tree.close()
      if num_good == 0 or (self._bad and not self.skip_bad):
        raise BadExamplesError(self._bad, empty_split=split if num_good == 0 else None)


def skipped_counts(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
  """split -> number of examples skipped when the data set was prepared."""
  skipped = builder.info.metadata.get('skipped', {}) if builder.info.metadata else {}
  return {s: len(v) for s, v in skipped.items()}
