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

The Mask2Former (detectron2) recipe has its own ops (`d2_*`, `D2*`), again the
library's exact calls: PIL decode (detectron2 read_image), PIL bilinear resize
of uint8 images and torch-`nearest` of the (float64) label in ResizeTransform,
RandomCrop_CategoryAreaConstraint, ColorAugSSDTransform (cv2 HSV round trips),
HFlip, the mapper's pad to SIZE_DIVISIBILITY with 128 / 255 and the model's
float32 (x - mean) / std.
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


# detectron2 _apply_exif_orientation: EXIF Orientation tag -> PIL transpose.
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}
_EXIF_SWAPS_SIDES = (5, 6, 7, 8)  # the orientations whose transpose swaps height and width


def exif_orientation(im: Image.Image) -> int | None:
  """The EXIF Orientation tag of an open PIL image (None when absent or unreadable: a
  corrupt EXIF is ignored, as detectron2 does)."""
  try:
    return im.getexif().get(_EXIF_ORIENTATION)
  except Exception:  # pylint: disable=broad-except
    return None


def oriented_size(im: Image.Image) -> tuple[int, int]:
  """(height, width) of an open PIL image once its EXIF orientation is applied (from the
  header: nothing decoded)."""
  w, h = im.size
  return (w, h) if exif_orientation(im) in _EXIF_SWAPS_SIDES else (h, w)


def decode_image_pil(data: bytes | np.ndarray, what: str = 'image') -> np.ndarray:
  """Encoded image bytes (or an array) -> uint8 RGB [H, W, 3], as detectron2 reads it.

  detectron2.data.detection_utils.read_image(format='RGB'): Image.open, the EXIF
  orientation applied, .convert('RGB'), np.asarray. PIL and OpenCV agree on most
  JPEGs but not on every file (grey/palette/CMYK/16-bit conversions), so the
  detectron2 recipe decodes with PIL.
  """
  if isinstance(data, np.ndarray):
    return data
  try:
    with Image.open(io.BytesIO(data)) as im:
      orientation = exif_orientation(im)
      out = im.transpose(_EXIF_TRANSPOSE[orientation]) if orientation in _EXIF_TRANSPOSE else im
      return np.asarray(out.convert('RGB'))
  except Exception as e:
    raise ValueError(f'cannot decode {what}: {e}') from e


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


# ----------------------------------------------------------------- detectron2


def shortest_edge_size(hw: tuple[int, int], short_edge: int, max_size: int) -> tuple[int, int]:
  """detectron2 ResizeShortestEdge.get_output_shape: short side -> short_edge, long side
  at most max_size, each side rounded with int(x + 0.5)."""
  h, w = hw
  size = short_edge * 1.0
  scale = size / min(h, w)
  if h < w:
    newh, neww = size, scale * w
  else:
    newh, neww = scale * h, size
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh = newh * scale
    neww = neww * scale
  return int(newh + 0.5), int(neww + 0.5)


def resize_pil_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """detectron2 ResizeTransform.apply_image on uint8: PIL Image.resize, BILINEAR.

  PIL's filter widens with the downscale factor (antialiased), unlike cv2's.
  """
  return np.asarray(Image.fromarray(image).resize((int(out_hw[1]), int(out_hw[0])),
                                                  Image.Resampling.BILINEAR))


def _torch_nearest_index(in_size: int, out_size: int, dtype: type = np.float32) -> np.ndarray:
  """torch F.interpolate(mode='nearest') source index: min(floor(i * scale), in - 1)
  with scale = in / out, both the division and the product in `dtype`."""
  scale = dtype(in_size) / dtype(out_size)
  idx = np.floor(np.arange(out_size, dtype=dtype) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


def resize_label_nearest_torch(label: np.ndarray, out_hw: tuple[int, int],
                               index_dtype: type = np.float32) -> np.ndarray:
  """detectron2 ResizeTransform.apply_segmentation: the mapper holds the label as
  float64, so it goes through torch F.interpolate(mode='nearest'), not PIL.

  PyTorch 1.x (SeMask's 1.9) computes the source index in float32 for every dtype;
  PyTorch 2.x in the input's opmath type, i.e. float64 for this label
  (index_dtype=np.float64). The two pick a different row/column for a few sizes
  (e.g. 512 -> 282: output 141 reads 255 in float32, 256 in float64); cv2's
  INTER_NEAREST (1 / (out / in) in float64) is a third rule.
  """
  rows = _torch_nearest_index(label.shape[0], int(out_hw[0]), index_dtype)
  cols = _torch_nearest_index(label.shape[1], int(out_hw[1]), index_dtype)
  return np.take(np.take(label, rows, axis=0), cols, axis=1)


def d2_crop_box(rng: np.random.Generator, hw: tuple[int, int], crop_hw: tuple[int, int]
                ) -> tuple[int, int, int, int]:
  """detectron2 RandomCrop('absolute'): size min(crop, image), offsets h0 then w0 uniform
  over the valid range; (y1, y2, x1, x2)."""
  ch, cw = min(crop_hw[0], hw[0]), min(crop_hw[1], hw[1])
  y0 = int(rng.integers(hw[0] - ch + 1))
  x0 = int(rng.integers(hw[1] - cw + 1))
  return y0, y0 + ch, x0, x0 + cw


def d2_random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
                   crop_hw: tuple[int, int], single_category_max_area: float = 1.0,
                   ignore_index: int = IGNORE_INDEX):
  """detectron2 RandomCrop_CategoryAreaConstraint: a crop (of at most the image size;
  a smaller image stays smaller); below 1.0 up to 10 draws until >= 2 classes remain and
  max count < sum * ratio (ignore excluded), else the 10th draw."""
  box = d2_crop_box(rng, label.shape[:2], crop_hw)
  if single_category_max_area < 1.0:
    for i in range(10):
      if i:
        box = d2_crop_box(rng, label.shape[:2], crop_hw)
      y1, y2, x1, x2 = box
      labels, cnt = np.unique(label[y1:y2, x1:x2], return_counts=True)
      cnt = cnt[labels != ignore_index]
      if len(cnt) > 1 and np.max(cnt) < np.sum(cnt) * single_category_max_area:
        break
  y1, y2, x1, x2 = box
  return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def color_aug_ssd(rng: np.random.Generator, image: np.ndarray,
                  p: PhotometricParams = PhotometricParams()) -> np.ndarray:
  """detectron2 ColorAugSSDTransform (PointRend) on uint8 RGB.

  The same four steps and arithmetic as mmseg's distortion (float32 affine, clip,
  truncating cast; uint8 HSV round trips), but the order is drawn first:
  brightness; then randrange(2) ? (contrast, saturation, hue) : (saturation, hue,
  contrast); each step with p = 0.5. The hue delta is random.randint(-d, d),
  both ends included (mmseg's numpy randint excludes d). The reference swaps RGB to
  BGR for COLOR_BGR2HSV; COLOR_RGB2HSV on RGB gives the same H, S, V.
  """
  def contrast(img):
    if rng.integers(2):
      return cv2.LUT(img, convert_table(alpha=rng.uniform(*p.contrast_range)))
    return img

  def saturation(img):
    if rng.integers(2):
      hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
      hsv[..., 1] = cv2.LUT(hsv[..., 1], convert_table(alpha=rng.uniform(*p.saturation_range)))
      return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return img

  def hue(img):
    if rng.integers(2):
      hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
      delta = rng.integers(-p.hue_delta, p.hue_delta + 1)  # random.randint: [-d, d]
      hsv[..., 0] = cv2.LUT(hsv[..., 0], hue_table(delta))
      return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return img

  img = image
  if rng.integers(2):
    img = cv2.LUT(img, convert_table(beta=rng.uniform(-p.brightness_delta, p.brightness_delta)))
  if rng.integers(2):
    return hue(saturation(contrast(img)))
  return contrast(hue(saturation(img)))


@functools.lru_cache(maxsize=8)
def _d2_normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """float32 [1, 256, C]: (v - mean) / std of every uint8 value in float32."""
  v = np.arange(256, dtype=np.float32)[None, :, None]
  table = (v - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  table = np.ascontiguousarray(table, np.float32)
  table.flags.writeable = False  # shared by every call
  return table


def d2_normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 RGB -> float32 (x - pixel_mean) / pixel_std as the Mask2Former model computes
  it (float32 tensors, subtraction then division). A table lookup: the same floats.
  (For the ImageNet mean/std this equals mmcv's multiply by a float64 1 / std on all
  256 values; other constants need not.)"""
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == len(mean) <= 4:
    return cv2.LUT(image, _d2_normalize_table(mean, std))
  return ((image.astype(np.float32) - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))


def pad_or_crop_to(x: np.ndarray, hw: tuple[int, int], value: float) -> np.ndarray:
  """torch F.pad(x, [0, W - w, 0, H - h], value): bottom/right pad, or crop where negative."""
  return pad_to(x[:hw[0], :hw[1]], hw, value)


def test_size(hw: tuple[int, int], cfg) -> tuple[int, int]:
  """The test-time resized size of an image of size hw under the data config's recipe."""
  if cfg.recipe == 'detectron2':
    return shortest_edge_size(hw, int(cfg.test_short_edge), int(cfg.test_max_size))
  return rescale_size(hw, tuple(cfg.test_scale))


def test_preprocess(image: np.ndarray, cfg) -> tuple[np.ndarray, tuple[int, int]]:
  """uint8 RGB [H, W, 3] -> (resized, normalised float32 [h, w, 3], (h, w)) as the
  recipe's test pipeline: mmseg keep-ratio resize (cv2) + mmcv normalisation, or
  detectron2 ResizeShortestEdge (PIL) + the model's normalisation."""
  hw = test_size(image.shape[:2], cfg)
  if cfg.recipe == 'detectron2':
    return d2_normalize(resize_pil_bilinear(image, hw), cfg.mean, cfg.std), hw
  return normalize(resize_bilinear(image, hw), cfg.mean, cfg.std), hw


# ----------------------------------------------------------------- grain ops


@dataclasses.dataclass(frozen=True)
class Decode(grain.transforms.Map):
  """Encoded record -> {'image' uint8 [H,W,3], 'label' uint8 [H,W], 'index'}.

  image_backend 'cv2' (mmcv.imfrombytes) or 'pil' (detectron2 read_image).
  """
  image_backend: str = 'cv2'

  def map(self, ex: Example) -> Example:
    name = ex.get('file_name', b'?')
    name = name.decode() if isinstance(name, bytes) else str(name)
    decode = decode_image_pil if self.image_backend == 'pil' else decode_image
    image = decode(ex['image'], f'image of {name}')
    label = decode_label(ex['label'], f'label of {name}')
    if image.shape[:2] != label.shape[:2]:
      raise ValueError(f'{name}: image {image.shape[:2]} vs label {label.shape[:2]}')
    # file_name rides along (for errors that name the image) until the last op drops it.
    return {'image': image, 'label': label, 'index': np.int32(ex.get('index', -1)),
            'file_name': name}


@dataclasses.dataclass(frozen=True)
class CheckTargetSlots(grain.transforms.Map):
  """Refuses a training crop with more classes than the Mask2Former criterion's static
  target slots (config.loss.max_targets), naming its image: the reference has no cap, so
  dropping the extra classes would train a different loss."""
  max_targets: int
  ignore_index: int = IGNORE_INDEX

  def map(self, ex: Example) -> Example:
    counts = np.bincount(np.asarray(ex['label']).ravel(), minlength=256)
    counts[self.ignore_index] = 0
    n = int(np.count_nonzero(counts))
    if n > self.max_targets:
      raise ValueError(f"{ex.get('file_name', '?')} (record {int(ex.get('index', -1))}): a "
                       f'training crop has {n} classes, more than config.loss.max_targets='
                       f'{self.max_targets} target slots; raise config.loss.max_targets')
    return ex


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
  """Normalise, pad image with 0 and label with the ignore index to crop size; int32 labels."""
  crop_hw: tuple[int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  keep_index: bool = False
  ignore_index: int = IGNORE_INDEX

  def map(self, ex: Example) -> Example:
    out = {'image': pad_to(normalize(ex['image'], self.mean, self.std), self.crop_hw, 0.0),
           'label': pad_to(ex['label'], self.crop_hw, self.ignore_index).astype(np.int32)}
    if self.keep_index:
      out['index'] = ex['index']
    return out


@dataclasses.dataclass(frozen=True)
class ResizeShortestEdge(grain.transforms.RandomMap):
  """detectron2 ResizeShortestEdge(sample_style='choice'): the short side a uniform
  choice, long side <= max_size; image PIL bilinear, label torch nearest."""
  short_edge_choices: tuple[int, ...]
  max_size: int

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    size = self.short_edge_choices[rng.integers(len(self.short_edge_choices))]
    hw = shortest_edge_size(ex['image'].shape[:2], int(size), self.max_size)
    return dict(ex, image=resize_pil_bilinear(ex['image'], hw),
                label=resize_label_nearest_torch(ex['label'], hw))


@dataclasses.dataclass(frozen=True)
class D2RandomCrop(grain.transforms.RandomMap):
  """detectron2 RandomCrop_CategoryAreaConstraint('absolute', crop_hw, max_area, 255)."""
  crop_hw: tuple[int, int]
  single_category_max_area: float = 1.0
  ignore_index: int = IGNORE_INDEX

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    image, label = d2_random_crop(rng, ex['image'], ex['label'], self.crop_hw,
                                  self.single_category_max_area, self.ignore_index)
    return dict(ex, image=image, label=label)


@dataclasses.dataclass(frozen=True)
class ColorAugSSD(grain.transforms.RandomMap):
  params: PhotometricParams = PhotometricParams()

  def random_map(self, ex: Example, rng: np.random.Generator) -> Example:
    return dict(ex, image=color_aug_ssd(rng, ex['image'], self.params))


@dataclasses.dataclass(frozen=True)
class D2PadAndNormalize(grain.transforms.Map):
  """MaskFormerSemanticDatasetMapper's pad, then the model's normalisation; int32 labels.

  size_divisibility > 0: image padded with 128 (uint8, before normalising: the pad
  becomes (128 - mean) / std) and label with 255 to exactly (sd, sd), as the mapper's
  F.pad(size_divisibility - size). What is still short of out_hw (size_divisibility <= 0
  and an image smaller than the crop) gets the model's ImageList pad: 0 after
  normalising, label 255 (detectron2 pads its target masks with 0 = no class there).
  Batches thus have one fixed shape, out_hw.
  """
  size_divisibility: int
  out_hw: tuple[int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  keep_index: bool = False
  ignore_index: int = IGNORE_INDEX

  def map(self, ex: Example) -> Example:
    image, label = ex['image'], ex['label']
    sd = self.size_divisibility
    if sd > 0:
      image = pad_or_crop_to(image, (sd, sd), 128)
      label = pad_or_crop_to(label, (sd, sd), self.ignore_index)
    out = {'image': pad_to(d2_normalize(image, self.mean, self.std), self.out_hw, 0.0),
           'label': pad_to(label, self.out_hw, self.ignore_index).astype(np.int32)}
    if self.keep_index:
      out['index'] = ex['index']
    return out


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """Test-time: the recipe's resize (`test_preprocess`), fixed pads, original label kept.

  mmseg: keep-ratio resize to test_scale; detectron2: ResizeShortestEdge(test_short_edge,
  test_max_size) on the PIL-decoded image. The image pad is 0 after normalising (the
  detectron2 model's ImageList pad). Records with index < 0 are padding: zero image,
  all-ignore label, valid=False.
  """
  test_scale: tuple[int, int]
  pad_hw: tuple[int, int]
  label_pad_hw: tuple[int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  recipe: str = 'mmseg'
  test_short_edge: int = 0
  test_max_size: int = 0
  ignore_index: int = IGNORE_INDEX

  def map(self, ex: Example) -> Example:
    if ex.get('pad', False):
      return {'image': np.zeros((*self.pad_hw, 3), np.float32),
              'image_hw': np.zeros(2, np.int32),
              'label': np.full(self.label_pad_hw, self.ignore_index, np.int32),
              'label_hw': np.zeros(2, np.int32),
              'valid': np.bool_(False), 'index': np.int32(-1)}
    ex = Decode('pil' if self.recipe == 'detectron2' else 'cv2').map(ex)
    image, hw = test_preprocess(ex['image'], self)
    return {'image': pad_to(image, self.pad_hw, 0.0),
            'image_hw': np.asarray(hw, np.int32),
            'label': pad_to(ex['label'].astype(np.int32), self.label_pad_hw, self.ignore_index),
            'label_hw': np.asarray(ex['label'].shape[:2], np.int32),
            'valid': np.bool_(True), 'index': ex['index']}


def eval_transform(cfg, pad_hw: tuple[int, int], label_pad_hw: tuple[int, int]
                   ) -> EvalTransform:
  """EvalTransform of a data config."""
  return EvalTransform(tuple(cfg.test_scale), tuple(pad_hw), tuple(label_pad_hw),
                       tuple(cfg.mean), tuple(cfg.std), str(cfg.recipe),
                       int(cfg.test_short_edge), int(cfg.test_max_size), int(cfg.ignore_index))


def _photometric_params(cfg) -> PhotometricParams:
  return PhotometricParams(cfg.brightness_delta, tuple(cfg.contrast_range),
                           tuple(cfg.saturation_range), int(cfg.hue_delta))


def d2_train_out_hw(cfg) -> tuple[int, int]:
  """Train batch (h, w) of the detectron2 recipe: (sd, sd), else the crop size."""
  sd = int(cfg.size_divisibility)
  return (sd, sd) if sd > 0 else tuple(cfg.crop_size)


def detectron2_train_transforms(cfg, max_targets: int | None = None
                                ) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
  """MaskFormerSemanticDatasetMapper (train) as grain ops: read_image, ResizeShortestEdge,
  RandomCrop_CategoryAreaConstraint, ColorAugSSD, RandomFlip, pad; then the model's
  normalisation. Per-image targets (classes + masks) are built in the train step
  (mask2former_loss.present_classes) from the label: a [B, H, W] label moves far
  less data to the device than [B, T, H, W] masks would."""
  ops = [Decode('pil'),
         ResizeShortestEdge(tuple(int(v) for v in cfg.short_edge_choices), int(cfg.max_size)),
         D2RandomCrop(tuple(cfg.crop_size), float(cfg.cat_max_ratio), int(cfg.ignore_index))]
  if max_targets is not None:
    ops.append(CheckTargetSlots(int(max_targets), int(cfg.ignore_index)))
  if cfg.photometric:
    ops.append(ColorAugSSD(_photometric_params(cfg)))
  ops.append(RandomFlip(float(cfg.flip_prob)))
  ops.append(D2PadAndNormalize(int(cfg.size_divisibility), d2_train_out_hw(cfg),
                               tuple(cfg.mean), tuple(cfg.std), bool(cfg.keep_index),
                               int(cfg.ignore_index)))
  return ops


def train_transforms(cfg, max_targets: int | None = None
                     ) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
  """The train pipeline (after loading) as grain ops, from a data config: mmseg's
  (recipe 'mmseg') or Mask2Former's (recipe 'detectron2'). max_targets: refuse a crop
  with more classes (the Mask2Former family's target slots)."""
  if cfg.recipe == 'detectron2':
    return detectron2_train_transforms(cfg, max_targets)
  if cfg.recipe != 'mmseg':
    raise ValueError(f"data.recipe must be 'mmseg' or 'detectron2', got {cfg.recipe!r}")
  ops = [Decode(),
         RandomResize(tuple(cfg.img_scale),
                      tuple(cfg.ratio_list) if cfg.ratio_list else None,
                      tuple(cfg.ratio_range) if cfg.ratio_range else None),
         RandomCrop(tuple(cfg.crop_size), float(cfg.cat_max_ratio), int(cfg.ignore_index))]
  if max_targets is not None:
    ops.append(CheckTargetSlots(int(max_targets), int(cfg.ignore_index)))
  ops.append(RandomFlip(float(cfg.flip_prob)))
  if cfg.photometric:
    ops.append(PhotometricDistortion(_photometric_params(cfg)))
  ops.append(NormalizeAndPad(tuple(cfg.crop_size), tuple(cfg.mean), tuple(cfg.std),
                             bool(cfg.keep_index), int(cfg.ignore_index)))
  return ops
