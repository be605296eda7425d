"""Per-example transforms matching mmseg 0.x's train and test pipelines.

The image ops are the OpenCV calls mmcv 1.x makes (cv2.imdecode, cv2.resize,
cv2.cvtColor, cv2.subtract / cv2.multiply), so results equal the reference's
bit for bit; a NumPy re-implementation differs from cv2's fixed-point resize
and truncating HSV conversions on a large share of values. Random draws come
from the np.random.Generator grain hands to `random_map`, so a pipeline is
reproducible for a seed and resumable without extra state.

Images are uint8 RGB [H, W, 3] until `normalize`, labels uint8 [H, W] train
ids with 255 = ignore. Sizes are (h, w) unless named otherwise. mmseg keeps
images BGR until Normalize(to_rgb=True); every op here is per channel or has
an RGB twin of the BGR cv2 call (COLOR_RGB2HSV for COLOR_BGR2HSV), so holding
RGB from the decode on gives the same numbers.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from typing import Any, Sequence

import cv2
import grain
import numpy as np
from PIL import Image

from input_pipeline.info import IGNORE_INDEX

Example = dict[str, Any]

# One grain worker = one core: cv2's own thread pool would oversubscribe the
# host when several workers run, and makes per-worker timings meaningless
# (later mmseg/mmdet versions' setup_multi_processes do the same). Results do
# not depend on the thread count.
cv2.setNumThreads(0)


# ----------------------------------------------------------------- decoding


def decode_image(data: bytes | np.ndarray, what: str = 'image') -> np.ndarray:
  """Encoded image bytes (or an array) -> uint8 RGB [H, W, 3].

  mmcv.imfrombytes(flag='color', backend='cv2'): cv2.imdecode with
  IMREAD_COLOR, which applies the EXIF orientation and turns grey, palette
  and 16-bit files into 8-bit 3-channel BGR; then BGR -> RGB.
  """
  if isinstance(data, np.ndarray):
    return data
  try:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  except cv2.error as e:  # e.g. empty input
    raise ValueError(f'cannot decode {what}: {e}') from e
  if img is None:
    raise ValueError(f'cannot decode {what}: OpenCV does not recognise or cannot read the data')
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)


def _is_grey8_png(data: bytes) -> bool:
  """PNG signature, then IHDR with bit depth 8 and colour type 0 (greyscale)."""
  return (len(data) > 26 and data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR'
          and data[24] == 8 and data[25] == 0)


def decode_label(data: bytes | np.ndarray, what: str = 'label') -> np.ndarray:
  """Encoded single-channel PNG bytes (or an array) -> uint8 [H, W].

  mmseg's LoadAnnotations reads labels with PIL (imdecode_backend 'pillow',
  flag 'unchanged'): np.array of the image, palette indices for mode P. For
  8-bit greyscale PNGs (what the builders write) cv2.imdecode(IMREAD_UNCHANGED)
  returns the same array a little faster; other files go through PIL.
  """
  if isinstance(data, np.ndarray):
    return data.reshape(data.shape[:2])
  if _is_grey8_png(data):
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is not None and arr.ndim == 2 and arr.dtype == np.uint8:
      return arr
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.mode not in ('L', 'P', 'I', 'I;16'):
        raise ValueError(f'expected a single-channel PNG, got mode {im.mode}')
      arr = np.asarray(im)
  except Exception as e:
    raise ValueError(f'cannot decode {what}: {e}') from e
  return arr


# ----------------------------------------------------------------- resizing


def rescale_size(hw: tuple[int, int], scale: Sequence[float]) -> tuple[int, int]:
  """mmcv.imrescale's size: long side <= max(scale), short side <= min(scale)."""
  h, w = hw
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """mmcv.imresize(interpolation='bilinear'): cv2.resize with INTER_LINEAR."""
  if tuple(out_hw) == image.shape[:2]:
    return image  # cv2.resize would return an equal copy.
  return cv2.resize(image, (int(out_hw[1]), int(out_hw[0])), interpolation=cv2.INTER_LINEAR)


def resize_nearest(label: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """mmcv.imresize(interpolation='nearest'): cv2.resize with INTER_NEAREST."""
  if tuple(out_hw) == label.shape[:2]:
    return label
  return cv2.resize(label, (int(out_hw[1]), int(out_hw[0])), interpolation=cv2.INTER_NEAREST)


def draw_ratio(rng: np.random.Generator, ratio_list: Sequence[float] | None,
               ratio_range: Sequence[float] | None) -> float:
  """Scale ratio: uniform over the list, else uniform in [lo, hi)."""
  if ratio_list:
    return float(ratio_list[rng.integers(len(ratio_list))])
  if ratio_range:
    lo, hi = ratio_range
    return float(rng.random() * (hi - lo) + lo)
  return 1.0


def target_scale(img_scale: Sequence[int], ratio: float) -> tuple[int, int]:
  """mmseg's random_sample_ratio: each edge bound times ratio, truncated."""
  return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


# ----------------------------------------------------------------- cropping


def crop_bbox(rng: np.random.Generator, hw: tuple[int, int],
              crop_hw: tuple[int, int]) -> tuple[int, int, int, int]:
  """Uniform crop offset; (y1, y2, x1, x2). Crops larger than the image clip."""
  margin_h = max(hw[0] - crop_hw[0], 0)
  margin_w = max(hw[1] - crop_hw[1], 0)
  oy = int(rng.integers(0, margin_h + 1))
  ox = int(rng.integers(0, margin_w + 1))
  return oy, oy + crop_hw[0], ox, ox + crop_hw[1]


def crop_ok(label_crop: np.ndarray, cat_max_ratio: float,
            ignore_index: int = IGNORE_INDEX) -> bool:
  """mmseg's acceptance test: >= 2 classes and none covering >= the ratio.

  uint8 crops are counted with cv2.calcHist (float32 counts, exact below
  2**24 pixels): the same counts as mmseg's np.unique without its sort.
  """
  if label_crop.dtype == np.uint8 and label_crop.ndim == 2 and label_crop.size < 2**24:
    cnt = cv2.calcHist([label_crop], [0], None, [256], [0, 256]).reshape(-1).astype(np.int64)
    if 0 <= ignore_index < 256:
      cnt[ignore_index] = 0
    cnt = cnt[cnt > 0]
  else:
    labels, cnt = np.unique(label_crop, return_counts=True)
    cnt = cnt[labels != ignore_index]
  return len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
                crop_hw: tuple[int, int], cat_max_ratio: float,
                ignore_index: int = IGNORE_INDEX, max_tries: int = 10):
  """mmseg RandomCrop: up to 10 redraws; after 10 failures the 11th box is used."""
  box = crop_bbox(rng, label.shape[:2], crop_hw)
  if cat_max_ratio < 1.0:
    for _ in range(max_tries):
      y1, y2, x1, x2 = box
      if crop_ok(label[y1:y2, x1:x2], cat_max_ratio, ignore_index):
        break
      box = crop_bbox(rng, label.shape[:2], crop_hw)
  y1, y2, x1, x2 = box
  return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


# ----------------------------------------------------------------- colour


def convert_table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg PhotoMetricDistortion.convert as a uint8 -> uint8 table [256].

  convert(img) = uint8(clip(img.astype(float32) * alpha + beta, 0, 255)) (the
  cast truncates) depends on each value alone, so the table made with the
  same float32 arithmetic and applied with cv2.LUT gives the same bytes.
  """
  v = np.arange(256, dtype=np.float32)
  return np.clip(v * float(alpha) + float(beta), 0, 255).astype(np.uint8)


def hue_table(delta: int) -> np.ndarray:
  """mmseg's hue shift (h.astype(int) + delta) % 180 as a uint8 table [256]."""
  return ((np.arange(256) + int(delta)) % 180).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PhotometricParams:
  brightness_delta: float = 32
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: int = 18


def photometric_distortion(rng: np.random.Generator, image: np.ndarray,
                           p: PhotometricParams = PhotometricParams()) -> np.ndarray:
  """mmseg 0.x PhotoMetricDistortion on uint8 RGB, same step order and casts.

  brightness; mode = randint(2); contrast if mode == 1; saturation and hue
  (each through its own uint8 cv2.cvtColor HSV round trip, H in [0, 180));
  contrast if mode == 0. Each step fires with p = 0.5 and ends in uint8 as
  in the reference (float32 affine, clip, truncating cast; see
  convert_table).
  """
  img = image
  if rng.integers(2):
    img = cv2.LUT(img, convert_table(beta=rng.uniform(-p.brightness_delta, p.brightness_delta)))
  mode = rng.integers(2)
  if mode == 1 and rng.integers(2):
    img = cv2.LUT(img, convert_table(alpha=rng.uniform(*p.contrast_range)))
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = cv2.LUT(hsv[..., 1], convert_table(alpha=rng.uniform(*p.saturation_range)))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    delta = rng.integers(-p.hue_delta, p.hue_delta)  # numpy randint: [-d, d)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], hue_table(delta))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if mode == 0 and rng.integers(2):
    img = cv2.LUT(img, convert_table(alpha=rng.uniform(*p.contrast_range)))
  return img


def _imnormalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """mmcv.imnormalize's arithmetic on a float32 copy of `img`.

  mmseg holds mean/std as float32 arrays; mmcv widens them to float64, takes
  stdinv = 1 / std in float64 and runs cv2.subtract then cv2.multiply in
  place (OpenCV multiplies in float64 and rounds to float32).
  """
  out = img.astype(np.float32, order='C')  # always a fresh array
  mean64 = np.float64(np.asarray(mean, np.float32).reshape(1, -1))
  stdinv = 1 / np.float64(np.asarray(std, np.float32).reshape(1, -1))
  cv2.subtract(out, mean64, out)
  cv2.multiply(out, stdinv, out)
  return out


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """float32 [1, 256, C]: mmcv.imnormalize of every uint8 value, per channel."""
  values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], len(mean), axis=2)
  table = _imnormalize(values, mean, std)
  table.flags.writeable = False  # shared by every call
  return table


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 RGB -> float32 (x - mean) / std, as mmcv.imnormalize computes it.

  mmseg's to_rgb swap is the decode's here. Elementwise, so for uint8 images
  the result is looked up (cv2.LUT) in a table made by the same cv2 calls:
  the same floats at 2/3 of the time.
  """
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == len(mean) <= 4:
    return cv2.LUT(image, _normalize_table(mean, std))
  return _imnormalize(image, mean, std)


_CV_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)


def pad_to(x: np.ndarray, hw: tuple[int, int], value: float) -> np.ndarray:
  """Pads bottom/right to `hw` with `value`: mmcv.impad with a shape (cv2.copyMakeBorder)."""
  h, w = x.shape[:2]
  if h > hw[0] or w > hw[1]:
    raise ValueError(f'cannot pad {x.shape[:2]} to smaller {tuple(hw)}')
  if (h, w) == tuple(hw):
    return x
  if x.dtype in _CV_DTYPES and (x.ndim == 2 or x.ndim == 3 and x.shape[2] <= 4):
    # A bare number would be Scalar(v, 0, 0, 0): only channel 0 gets v.
    return cv2.copyMakeBorder(x, 0, hw[0] - h, 0, hw[1] - w, cv2.BORDER_CONSTANT,
                              value=(float(value),) * 4)
  out = np.full((hw[0], hw[1], *x.shape[2:]), value, x.dtype)
  out[:h, :w] = x
  return out


# ----------------------------------------------------------------- grain ops


class Decode(grain.transforms.Map):
  """Encoded record -> {'image' uint8 [H,W,3], 'label' uint8 [H,W], 'index'}."""

  def map(self, ex: Example) -> Example:
    name = ex.get('file_name', b'?')
    name = name.decode() if isinstance(name, bytes) else str(name)
    image = decode_image(ex['image'], f'image of {name}')
    label = decode_label(ex['label'], f'label of {name}')
    if image.shape[:2] != label.shape[:2]:
      raise ValueError(f'{name}: image {image.shape[:2]} vs label {label.shape[:2]}')
    return {'image': image, 'label': label, 'index': np.int32(ex.get('index', -1))}


@dataclasses.dataclass(frozen=True)
class RandomResize(grain.transforms.RandomMap):
  """Keep-ratio resize to img_scale times a random ratio (image bilinear, label nearest)."""
  img_scale: tuple[int, int]
  ratio_list: tuple[float, ...] | None = None
  ratio_range: tuple[float, float] | None = None

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    ratio = draw_ratio(rng, self.ratio_list, self.ratio_range)
    hw = rescale_size(ex['image'].shape[:2], target_scale(self.img_scale, ratio))
    return dict(ex, image=resize_bilinear(ex['image'], hw),
                label=resize_nearest(ex['label'], hw))


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  crop_hw: tuple[int, int]
  cat_max_ratio: float = 1.0
  ignore_index: int = IGNORE_INDEX

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    image, label = random_crop(rng, ex['image'], ex['label'], self.crop_hw,
                               self.cat_max_ratio, self.ignore_index)
    return dict(ex, image=image, label=label)


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """mmcv.imflip 'horizontal' (np.flip, a view); cv2.flip gives the same pixels
  in a contiguous array, 20x faster than copying the reversed view later."""
  prob: float = 0.5

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    if rng.random() < self.prob:
      return dict(ex, image=cv2.flip(ex['image'], 1), label=cv2.flip(ex['label'], 1))
    return ex


@dataclasses.dataclass(frozen=True)
class PhotometricDistortion(grain.transforms.RandomMap):
  params: PhotometricParams = PhotometricParams()

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    return dict(ex, image=photometric_distortion(rng, ex['image'], self.params))


@dataclasses.dataclass(frozen=True)
class NormalizeAndPad(grain.transforms.Map):
  """Normalise, pad image with 0 and label with 255 to crop size; int32 labels."""
  crop_hw: tuple[int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  keep_index: bool = False

  def map(self, ex: Example) -> Example:
    out = {'image': pad_to(normalize(ex['image'], self.mean, self.std), self.crop_hw, 0.0),
           'label': pad_to(ex['label'], self.crop_hw, IGNORE_INDEX).astype(np.int32)}
    if self.keep_index:
      out['index'] = ex['index']
    return out


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """Test-time: keep-ratio resize to test_scale, fixed pads, original label kept.

  Records with index < 0 are padding: zero image, all-ignore label, valid=False.
  """
  test_scale: tuple[int, int]
  pad_hw: tuple[int, int]
  label_pad_hw: tuple[int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def map(self, ex: Example) -> Example:
    if ex.get('pad', False):
      return {'image': np.zeros((*self.pad_hw, 3), np.float32),
              'image_hw': np.zeros(2, np.int32),
              'label': np.full(self.label_pad_hw, IGNORE_INDEX, np.int32),
              'label_hw': np.zeros(2, np.int32),
              'valid': np.bool_(False), 'index': np.int32(-1)}
    ex = Decode().map(ex)
    hw = rescale_size(ex['image'].shape[:2], self.test_scale)
    image = normalize(resize_bilinear(ex['image'], hw), self.mean, self.std)
    return {'image': pad_to(image, self.pad_hw, 0.0),
            'image_hw': np.asarray(hw, np.int32),
            'label': pad_to(ex['label'].astype(np.int32), self.label_pad_hw, IGNORE_INDEX),
            'label_hw': np.asarray(ex['label'].shape[:2], np.int32),
            'valid': np.bool_(True), 'index': ex['index']}


def train_transforms(cfg) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
  """The mmseg train pipeline (after loading) as grain ops, from a data config."""
  ops = [Decode(),
         RandomResize(tuple(cfg.img_scale),
                      tuple(cfg.ratio_list) if cfg.ratio_list else None,
                      tuple(cfg.ratio_range) if cfg.ratio_range else None),
         RandomCrop(tuple(cfg.crop_size), float(cfg.cat_max_ratio), int(cfg.ignore_index)),
         RandomFlip(float(cfg.flip_prob))]
  if cfg.photometric:
    ops.append(PhotometricDistortion(PhotometricParams(
        cfg.brightness_delta, tuple(cfg.contrast_range), tuple(cfg.saturation_range),
        int(cfg.hue_delta))))
  ops.append(NormalizeAndPad(tuple(cfg.crop_size), tuple(cfg.mean), tuple(cfg.std),
                             bool(cfg.keep_index)))
  return ops
