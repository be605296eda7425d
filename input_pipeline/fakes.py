"""Small fake downloads in each official layout, for tests and the benchmark.

Writers put images and raw labels (the download's own label ids) where the
real archives have them, optionally zipped like the official files, and can
plant the bad cases the builders must catch. They return {file name: raw
label} for the good examples so tests can check the stored train ids.
"""
from __future__ import annotations

import io
import pathlib
import zipfile

import numpy as np
import scipy.io
from PIL import Image

BAD_KINDS = ('corrupt_image', 'truncated_label', 'out_of_range', 'size_mismatch')


def realistic_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """Natural-looking uint8 RGB [h, w, 3]: smooth colour regions, edges and grain
  (so JPEG sizes and decode costs resemble photographs, unlike white noise)."""
  gh, gw = max(2, h // 32), max(2, w // 32)
  coarse = rng.uniform(0, 255, (gh, gw, 3)).astype(np.uint8)
  img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32)
  yy, xx = np.mgrid[0:h, 0:w]
  for _ in range(6):  # a few hard-edged blobs
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
    m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img[m] = rng.uniform(0, 255, 3)
  img += rng.normal(0, 6, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def blocky_label(rng: np.random.Generator, h: int, w: int, values: np.ndarray) -> np.ndarray:
  """Raw label [h, w] of 4x4-pixel blocks drawn from `values` (uint8 or uint16)."""
  small = rng.choice(values, size=(-(-h // 4), -(-w // 4)))
  return np.kron(small, np.ones((4, 4), small.dtype))[:h, :w]


def _jpeg(img: np.ndarray) -> bytes:
  b = io.BytesIO()
  Image.fromarray(img).save(b, format='JPEG', quality=90)
  return b.getvalue()


def _png(arr: np.ndarray) -> bytes:
  b = io.BytesIO()
  Image.fromarray(arr).save(b, format='PNG')
  return b.getvalue()


def _mat(arr: np.ndarray) -> bytes:
  b = io.BytesIO()
  scipy.io.savemat(b, {'S': arr, 'names': np.array(['x'], dtype=object)})
  return b.getvalue()


class _Writer:
  """Writes files under a root folder, or into zip archives named per file."""

  def __init__(self, root: pathlib.Path, zips: dict[str, str] | None):
    self.root, self.zips, self._open = root, zips, {}

  def put(self, rel: str, data: bytes) -> None:
    if self.zips is None:
      p = self.root / rel
      p.parent.mkdir(parents=True, exist_ok=True)
      p.write_bytes(data)
      return
    zname = next(z for prefix, z in self.zips.items() if rel.startswith(prefix))
    if zname not in self._open:
      self.root.mkdir(parents=True, exist_ok=True)
      self._open[zname] = zipfile.ZipFile(self.root / zname, 'w')
    self._open[zname].writestr(rel, data)

  def close(self) -> None:
    for z in self._open.values():
      z.close()


def _example(rng, h, w, values, bad: str | None, label_fmt: str, image_fmt: str):
  """(image bytes, label bytes, raw label or None) for one example."""
  img = realistic_image(rng, h, w)
  raw = blocky_label(rng, h, w, values)
  image = _jpeg(img) if image_fmt == 'jpeg' else _png(img)
  enc = _png if label_fmt == 'png' else _mat
  label = enc(raw)
  if bad == 'corrupt_image':
    image = image[:20] + bytes(rng.integers(0, 256, 200, dtype=np.uint8))
  elif bad == 'truncated_label':
    label = label[: len(label) // 2]
  elif bad == 'out_of_range':
    raw = raw.copy()
    raw[0, 0] = 250
    label = enc(raw)
  elif bad == 'size_mismatch':
    label = enc(raw[:-4])
  elif bad is not None:
    raise ValueError(f'unknown bad kind {bad!r}; expected one of {BAD_KINDS}')
  return image, label, (None if bad else raw)


def write_ade20k(root: pathlib.Path, *, zipped: bool, counts: dict[str, int],
                 bad: dict[str, list[str]] | None = None, hw=(24, 32), seed: int = 0,
                 ) -> dict[str, np.ndarray]:
  """ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*."""
  rng = np.random.default_rng(seed)
  w = _Writer(root, {'': 'ADEChallengeData2016.zip'} if zipped else None)
  values = np.arange(0, 151, dtype=np.uint8)
  good = {}
  for folder, split in (('training', 'train'), ('validation', 'val')):
    kinds = [None] * counts.get(folder, 0) + list((bad or {}).get(folder, []))
    for i, kind in enumerate(kinds):
      stem = f'ADE_{split}_{i + 1:08d}'
      h, wd = (hw[1], hw[0]) if i % 2 else hw  # both orientations
      image, label, raw = _example(rng, h, wd, values, kind, 'png', 'jpeg')
      img_rel = f'ADEChallengeData2016/images/{folder}/{stem}.jpg'
      w.put(img_rel, image)
      w.put(f'ADEChallengeData2016/annotations/{folder}/{stem}.png', label)
      if raw is not None:
        good[img_rel] = raw
  w.close()
  return good


def write_cityscapes(root: pathlib.Path, *, zipped: bool, counts: dict[str, int],
                     bad: dict[str, list[str]] | None = None, hw=(16, 32), seed: int = 0,
                     cities=('aachen', 'bremen')) -> dict[str, np.ndarray]:
  """leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/.../*_gtFine_labelIds.png."""
  rng = np.random.default_rng(seed)
  zips = {'leftImg8bit/': 'leftImg8bit_trainvaltest.zip', 'gtFine/': 'gtFine_trainvaltest.zip'}
  w = _Writer(root, zips if zipped else None)
  values = np.arange(0, 34, dtype=np.uint8)
  good = {}
  for split in ('train', 'val'):
    kinds = [None] * counts.get(split, 0) + list((bad or {}).get(split, []))
    for i, kind in enumerate(kinds):
      city = cities[i % len(cities)]
      stem = f'{city}_{i:06d}_000019'
      image, label, raw = _example(rng, *hw, values, kind, 'png', 'png')
      img_rel = f'leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png'
      w.put(img_rel, image)
      w.put(f'gtFine/{split}/{city}/{stem}_gtFine_labelIds.png', label)
      w.put(f'gtFine/{split}/{city}/{stem}_gtFine_color.png', b'not read')
      if raw is not None:
        good[img_rel] = raw
  w.close()
  return good


def write_coco_stuff10k(root: pathlib.Path, *, zipped: bool, counts: dict[str, int],
                        bad: dict[str, list[str]] | None = None, hw=(24, 32), seed: int = 0,
                        ) -> dict[str, np.ndarray]:
  """images/*.jpg, annotations/*.mat (key 'S'), imageLists/{train,test}.txt."""
  rng = np.random.default_rng(seed)
  w = _Writer(root, {'': 'cocostuff-10k-v1.1.zip'} if zipped else None)
  # 0 (unlabeled), 1..182 minus the unused thing ids.
  from input_pipeline.info import reference_tables  # pylint: disable=g-import-not-at-top
  values = np.asarray(sorted(int(k) for k in reference_tables()['coco_stuff10k']['mat_label_to_train_id']),
                      np.uint16)
  good = {}
  for split, tag in (('train', 'train2014'), ('test', 'val2014')):
    kinds = [None] * counts.get(split, 0) + list((bad or {}).get(split, []))
    stems = []
    for i, kind in enumerate(kinds):
      stem = f'COCO_{tag}_{i + 1:012d}'
      image, label, raw = _example(rng, *hw, values, kind, 'mat', 'jpeg')
      w.put(f'images/{stem}.jpg', image)
      w.put(f'annotations/{stem}.mat', label)
      stems.append(stem)
      if raw is not None:
        good[f'images/{stem}.jpg'] = raw
    w.put(f'imageLists/{split}.txt', ('\n'.join(stems) + '\n').encode())
  w.close()
  return good


WRITERS = {'ade20k': write_ade20k, 'cityscapes': write_cityscapes,
           'coco_stuff10k': write_coco_stuff10k}
