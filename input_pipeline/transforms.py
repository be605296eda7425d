"""Per-example transforms matching mmseg 0.x's train and test pipelines.

Pure numpy/PIL functions (testable by hand) plus thin grain wrappers. Random
draws come from the np.random.Generator grain hands to `random_map`, so a
pipeline is reproducible for a seed and resumable without extra state.

Images are uint8 RGB [H, W, 3] until `normalize`, labels uint8 [H, W] train
ids with 255 = ignore. Sizes are (h, w) unless named otherwise.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from input_pipeline.info import IGNORE_INDEX

Example = dict[str, Any]


# ----------------------------------------------------------------- decoding


def decode_image(data: bytes | np.ndarray, what: str = 'image') -> np.ndarray:
  """Encoded image bytes (or an array) -> uint8 RGB [H, W, 3]."""
  if isinstance(data, np.ndarray):
    return data
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert('RGB'))
  except Exception as e:  # PIL raises many types for corrupt data.
    raise ValueError(f'cannot decode {what}: {e}') from e


def decode_label(data: bytes | np.ndarray, what: str = 'label') -> np.ndarray:
  """Encoded single-channel PNG bytes (or an array) -> uint8 [H, W]."""
  if isinstance(data, np.ndarray):
    return data.reshape(data.shape[:2])
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


def _linear_taps(n_out: int, n_in: int):
  """cv2 INTER_LINEAR source taps: half-pixel centres, border replicated."""
  f = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  i0 = np.floor(f).astype(np.int64)
  a = (f - i0).astype(np.float32)
  a[i0 < 0] = 0.0
  i0[i0 < 0] = 0
  hi = i0 >= n_in - 1
  a[hi] = 0.0
  i0[hi] = n_in - 1
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, a


def resize_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize with cv2.INTER_LINEAR semantics (no antialiasing).

  PIL's BILINEAR equals it when no axis shrinks (then it is used, being ~5x
  faster); PIL antialiases when shrinking, so that case is computed here.
  Results agree with cv2 to +-1 grey level (cv2 uses 11-bit fixed point).
  """
  h, w = image.shape[:2]
  oh, ow = out_hw
  if (oh, ow) == (h, w):
    return image
  if oh >= h and ow >= w:
    return np.asarray(Image.fromarray(image).resize((ow, oh), Image.Resampling.BILINEAR))
  y0, y1, ay = _linear_taps(oh, h)
  x0, x1, ax = _linear_taps(ow, w)
  img = image.astype(np.float32)
  ay = ay[:, None, None]
  rows = img[y0] * (1.0 - ay) + img[y1] * ay  # [oh, w, c]
  ax = ax[None, :, None]
  out = rows[:, x0] * (1.0 - ax) + rows[:, x1] * ax  # [oh, ow, c]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_nearest(label: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """cv2.INTER_NEAREST: source index floor(dst * src / dst_size)."""
  h, w = label.shape[:2]
  oh, ow = out_hw
  if (oh, ow) == (h, w):
    return label
  ys = np.minimum(np.floor(np.arange(oh) * (h / oh)).astype(np.int64), h - 1)
  xs = np.minimum(np.floor(np.arange(ow) * (w / ow)).astype(np.int64), w - 1)
  return label[ys[:, None], xs[None, :]]


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
  """mmseg's acceptance test: >= 2 classes and none covering >= the ratio."""
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


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg PhotoMetricDistortion.convert: float affine, clip, cast to uint8."""
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv_u8(rgb: np.ndarray) -> np.ndarray:
  """cv2.COLOR_RGB2HSV on uint8: H in [0, 180) (2-degree units), S and V in [0, 255]."""
  r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  inv = np.divide(60.0, diff, out=np.zeros_like(diff), where=diff > 0)
  h = np.where(v == r, (g - b) * inv, np.where(v == g, (b - r) * inv + 120.0,
                                               (r - g) * inv + 240.0))
  hu = np.rint(h * 0.5)  # in [-60, 180]; wrap without the slow float modulo
  hu[hu < 0] += 180.0
  hu[hu >= 180] -= 180.0
  s = np.divide(diff * 255.0, v, out=np.zeros_like(v), where=v > 0)
  return np.stack([hu, np.rint(s), v], -1).astype(np.uint8)


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
  """cv2.COLOR_HSV2RGB on uint8 (H in [0, 180)): c = V - V S clip(min(k, 4 - k), 0, 1)
  with k = (n + H / 60) mod 6, n = 5, 3, 1 for R, G, B."""
  h, s, v = (hsv[..., c].astype(np.float32) for c in range(3))
  h6 = h * np.float32(2.0 / 60.0)
  vs = v * s * np.float32(1.0 / 255.0)
  out = np.empty(hsv.shape, np.float32)
  for c, n in enumerate((5.0, 3.0, 1.0)):
    k = h6 + np.float32(n)  # in [1, 11): wrap into [0, 6) without the slow float modulo
    k[k >= 6.0] -= 6.0
    out[..., c] = v - vs * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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
  (each through its own HSV round trip); contrast if mode == 0. Each step
  fires with p = 0.5; every step clips to [0, 255] in float then casts to
  uint8, as the reference does.
  """
  img = image
  if rng.integers(2):
    img = _convert(img, beta=rng.uniform(-p.brightness_delta, p.brightness_delta))
  mode = rng.integers(2)
  if mode == 1 and rng.integers(2):
    img = _convert(img, alpha=rng.uniform(*p.contrast_range))
  if rng.integers(2):
    hsv = rgb_to_hsv_u8(img)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*p.saturation_range))
    img = hsv_to_rgb_u8(hsv)
  if rng.integers(2):
    hsv = rgb_to_hsv_u8(img)
    delta = rng.integers(-p.hue_delta, p.hue_delta)  # numpy randint: [-d, d)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + delta) % 180
    img = hsv_to_rgb_u8(hsv)
  if mode == 0 and rng.integers(2):
    img = _convert(img, alpha=rng.uniform(*p.contrast_range))
  return img


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 RGB -> float32 (x - mean) / std."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (image.astype(np.float32) - mean) / std


def pad_to(x: np.ndarray, hw: tuple[int, int], value: float) -> np.ndarray:
  """Pads bottom/right to `hw` with `value` (mmcv.impad with a shape)."""
  h, w = x.shape[:2]
  if h > hw[0] or w > hw[1]:
    raise ValueError(f'cannot pad {x.shape[:2]} to smaller {tuple(hw)}')
  pad = [(0, hw[0] - h), (0, hw[1] - w)] + [(0, 0)] * (x.ndim - 2)
  return np.pad(x, pad, constant_values=value)


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
  prob: float = 0.5

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    if rng.random() < self.prob:
      return dict(ex, image=ex['image'][:, ::-1], label=ex['label'][:, ::-1])
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
           'label': pad_to(ex['label'].astype(np.int32), self.crop_hw, IGNORE_INDEX)}
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
