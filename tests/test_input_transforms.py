"""Each train/test transform against hand-computed cases (mmseg 0.x semantics)
and, bit for bit, against the OpenCV call sequences mmcv 1.x / mmseg 0.x make
(written out inline below as the reference, on BGR images as mmseg holds them)."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from input_pipeline import transforms as T


class ScriptedRng:
  """Stands in for np.random.Generator, returning scripted draws in order."""

  def __init__(self, *draws):
    self.draws = list(draws)

  def _pop(self, kind, lo, hi):
    k, v = self.draws.pop(0)
    assert k == kind, f'expected a {k} draw, the transform made a {kind} draw'
    if lo is not None:
      assert lo <= v < hi or (kind == 'uniform' and v == hi), (v, lo, hi)
    return v

  def integers(self, low, high=None):
    lo, hi = (0, low) if high is None else (low, high)
    return self._pop('int', lo, hi)

  def uniform(self, low, high):
    return self._pop('uniform', low, high)

  def random(self):
    return self._pop('random', 0.0, 1.0)

  def exhausted(self):
    return not self.draws


@pytest.mark.parametrize('hw,scale,expected', [
    ((512, 683), (2048, 512), (512, 683)),   # ADE landscape at ratio 1: unchanged
    ((683, 512), (2048, 512), (683, 512)),   # portrait: short side bound again
    ((512, 683), (1024, 256), (256, 342)),   # ratio 0.5: 683 * 0.5 + 0.5 -> 342
    ((1024, 2048), (3072, 1536), (1536, 3072)),  # Cityscapes at ratio 1.5
    ((100, 1000), (2048, 512), (205, 2048)),  # long side binds: 2.048 * 100 -> 205
    ((480, 640), (2048, 512), (512, 683)),    # COCO: 640 * 16/15 = 682.67 -> 683
])
def test_rescale_size(hw, scale, expected):
  assert T.rescale_size(hw, scale) == expected


def test_target_scale_and_ratio_draws():
  assert T.target_scale((2048, 512), 0.75) == (1536, 384)
  assert T.target_scale((2048, 1024), 1.3) == (2662, 1331)  # int() truncates
  assert T.draw_ratio(ScriptedRng(('int', 2)), (0.5, 0.75, 1.0), None) == 1.0
  assert T.draw_ratio(ScriptedRng(('random', 0.25)), None, (0.5, 2.0)) == pytest.approx(0.875)


def test_resize_nearest_uses_cv2_floor_rule():
  label = np.arange(8, dtype=np.uint8).reshape(2, 4)
  # rows floor([0,1,2,3] * 2/4) = [0,0,1,1]; cols floor([0,1] * 4/2) = [0,2]
  np.testing.assert_array_equal(T.resize_nearest(label, (4, 2)),
                                [[0, 2], [0, 2], [4, 6], [4, 6]])
  # 2 -> 3 columns: floor([0, 1, 2] * 2/3) = [0, 0, 1]
  np.testing.assert_array_equal(T.resize_nearest(np.array([[10, 20]], np.uint8), (1, 3)),
                                [[10, 10, 20]])
  assert T.resize_nearest(label, (2, 4)) is label


def test_resize_bilinear_hand_cases():
  row = np.array([0, 100, 200, 255], np.uint8)
  img = np.repeat(np.repeat(row[None, :, None], 2, 0), 3, 2)  # [2, 4, 3]
  # Shrink 4 -> 2: src x = (x+.5)*2-.5 = 0.5, 2.5 -> 50, 227.5 -> 228 (no antialiasing)
  out = T.resize_bilinear(img, (2, 2))
  np.testing.assert_array_equal(out[..., 0], [[50, 228], [50, 228]])
  # Grow 2 -> 4: src x = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
  img2 = np.repeat(np.array([[0, 100]], np.uint8)[..., None], 3, 2)
  out2 = T.resize_bilinear(img2, (1, 4))
  np.testing.assert_array_equal(out2[0, :, 0], [0, 25, 75, 100])
  # Mixed (one axis shrinks): a constant stays constant.
  const = np.full((6, 5, 3), 77, np.uint8)
  assert (T.resize_bilinear(const, (3, 9)) == 77).all()


def _two_class_label():
  label = np.zeros((4, 8), np.uint8)
  label[:, 6:] = 1  # columns 0..5 class 0, 6..7 class 1
  return label


def test_crop_redraws_until_constraint_holds():
  label = _two_class_label()
  image = np.arange(32, dtype=np.uint8).reshape(4, 8)[..., None].repeat(3, 2)
  # x offsets 0,1,2: one class; 3: 3 of 4 columns = 0.75, not < 0.75; 4: accepted.
  rng = ScriptedRng(*[d for x in (0, 1, 2, 3, 4) for d in (('int', 0), ('int', x))])
  img_c, lab_c = T.random_crop(rng, image, label, (4, 4), cat_max_ratio=0.75)
  assert rng.exhausted()
  np.testing.assert_array_equal(lab_c, label[:, 4:8])
  np.testing.assert_array_equal(img_c, image[:, 4:8])


def test_crop_after_ten_failures_uses_eleventh_box():
  label = _two_class_label()
  draws = [d for x in [0] * 10 + [1] for d in (('int', 0), ('int', x))]
  rng = ScriptedRng(*draws)
  _, lab_c = T.random_crop(rng, label[..., None], label, (4, 4), cat_max_ratio=0.75)
  assert rng.exhausted()  # 1 + 10 redraws, the last one unchecked
  np.testing.assert_array_equal(lab_c, label[:, 1:5])


def test_crop_without_constraint_and_ignore_excluded():
  label = _two_class_label()
  rng = ScriptedRng(('int', 0), ('int', 0))
  _, lab_c = T.random_crop(rng, label, label, (4, 4), cat_max_ratio=1.0)
  assert rng.exhausted() and (lab_c == 0).all()  # single class, no redraw at 1.0
  # Ignore pixels do not count: 12 x 255, 2 x class 0, 2 x class 1 is balanced.
  lab = np.full((4, 4), 255, np.uint8)
  lab[0, :2], lab[0, 2:] = 0, 1
  assert T.crop_ok(lab, 0.75)
  assert not T.crop_ok(np.where(lab == 1, 255, lab), 0.75)  # one class left
  # Crop larger than the image: offsets 0, result is the whole image.
  _, small = T.random_crop(ScriptedRng(('int', 0), ('int', 0)), label, label, (6, 10), 1.0)
  assert small.shape == (4, 8)


def test_flip():
  ex = {'image': np.arange(6, dtype=np.uint8).reshape(1, 2, 3), 'label': np.array([[1, 2]], np.uint8)}
  out = T.RandomFlip(0.5).random_map(ex, ScriptedRng(('random', 0.3)))
  np.testing.assert_array_equal(out['label'], [[2, 1]])
  np.testing.assert_array_equal(out['image'][0, 0], [3, 4, 5])
  same = T.RandomFlip(0.5).random_map(ex, ScriptedRng(('random', 0.7)))
  np.testing.assert_array_equal(same['label'], [[1, 2]])


def test_photometric_brightness_then_contrast_last_clips_as_uint8():
  img = np.array([[[0, 100, 250]]], np.uint8)
  rng = ScriptedRng(('int', 1), ('uniform', 10.5),  # brightness +10.5
                    ('int', 0),                      # mode 0: contrast last
                    ('int', 0), ('int', 0),          # no saturation, no hue
                    ('int', 1), ('uniform', 1.5))    # contrast x1.5
  out = T.photometric_distortion(rng, img)
  assert rng.exhausted()
  # (x + 10.5) -> clip -> uint8 truncation: 10, 110, 255; x1.5 -> 15, 165, 255.
  np.testing.assert_array_equal(out, [[[15, 165, 255]]])


def test_photometric_contrast_first_in_mode_one():
  img = np.array([[[100, 100, 100]]], np.uint8)
  rng = ScriptedRng(('int', 0), ('int', 1), ('int', 1), ('uniform', 0.5), ('int', 0), ('int', 0))
  np.testing.assert_array_equal(T.photometric_distortion(rng, img), [[[50, 50, 50]]])
  assert rng.exhausted()


def test_photometric_hue_and_saturation():
  red = np.array([[[255, 0, 0]]], np.uint8)
  # hue +10 (cv2 units of 2 degrees): 20 degrees, g = 255 / 3; -10: 340 degrees.
  rng = ScriptedRng(('int', 0), ('int', 1), ('int', 0), ('int', 0), ('int', 1), ('int', 10))
  np.testing.assert_array_equal(T.photometric_distortion(rng, red), [[[255, 85, 0]]])
  rng = ScriptedRng(('int', 0), ('int', 1), ('int', 0), ('int', 0), ('int', 1), ('int', -10))
  np.testing.assert_array_equal(T.photometric_distortion(rng, red), [[[255, 0, 85]]])
  # saturation x0.5: HSV (10, 191, 200) -> S = uint8(95.5) = 95; back to RGB:
  # g = 200 * (1 - 95/255 * 2/3) = 150.3, b = 200 * (1 - 95/255) = 125.5 (float32).
  col = np.array([[[200, 100, 50]]], np.uint8)
  rng = ScriptedRng(('int', 0), ('int', 1), ('int', 0), ('int', 1), ('uniform', 0.5), ('int', 0))
  np.testing.assert_array_equal(T.photometric_distortion(rng, col), [[[200, 150, 125]]])


def test_normalize_and_pad_values():
  ex = {'image': np.full((2, 3, 3), 255, np.uint8), 'label': np.full((2, 3), 7, np.uint8),
        'index': np.int32(5)}
  op = T.NormalizeAndPad((4, 5), (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
  out = op.map(ex)
  assert set(out) == {'image', 'label'}
  assert out['image'].shape == (4, 5, 3) and out['image'].dtype == np.float32
  assert out['label'].shape == (4, 5) and out['label'].dtype == np.int32
  np.testing.assert_allclose(out['image'][0, 0], [(255 - 123.675) / 58.395,
                                                  (255 - 116.28) / 57.12,
                                                  (255 - 103.53) / 57.375], rtol=1e-6)
  assert (out['image'][2:] == 0).all() and (out['image'][:, 3:] == 0).all()
  assert (out['label'][:2, :3] == 7).all()
  assert (out['label'][2:] == 255).all() and (out['label'][:, 3:] == 255).all()
  with pytest.raises(ValueError, match='cannot pad'):
    T.pad_to(np.zeros((5, 5)), (4, 5), 0)
  # Every channel gets the value, for cv2's and the fallback's dtypes.
  for dtype in (np.uint8, np.float32, np.int64):
    padded = T.pad_to(np.ones((1, 2, 3), dtype), (3, 3), 7)
    assert padded.dtype == dtype and padded.shape == (3, 3, 3)
    np.testing.assert_array_equal(padded[1:], 7)
    np.testing.assert_array_equal(padded[:1, 2], 7)
    np.testing.assert_array_equal(padded[:1, :2], 1)


def test_random_resize_op_resizes_image_and_label_together():
  ex = {'image': np.zeros((8, 12, 3), np.uint8), 'label': np.ones((8, 12), np.uint8)}
  op = T.RandomResize((24, 8), ratio_list=(0.5, 1.0, 2.0))
  out = op.random_map(ex, ScriptedRng(('int', 2)))  # ratio 2: scale (48, 16)
  assert out['image'].shape == (16, 24, 3) and out['label'].shape == (16, 24)
  out = T.RandomResize((24, 8), ratio_range=(0.5, 2.0)).random_map(ex, ScriptedRng(('random', 0.0)))
  assert out['label'].shape == (4, 6)  # ratio 0.5: scale (12, 4)


def test_eval_transform_keeps_original_label():
  image = np.full((6, 8, 3), 100, np.uint8)
  label = np.arange(48, dtype=np.uint8).reshape(6, 8)
  op = T.EvalTransform((16, 12), (16, 20), (8, 8), (0, 0, 0), (1, 1, 1))
  out = op.map({'image': image, 'label': label, 'index': np.int32(3)})
  np.testing.assert_array_equal(out['image_hw'], [12, 16])  # min(16/8, 12/6) = 2
  np.testing.assert_array_equal(out['label_hw'], [6, 8])
  assert (out['image'][:12, :16] == 100).all() and (out['image'][12:] == 0).all()
  assert (out['image'][:, 16:] == 0).all()
  np.testing.assert_array_equal(out['label'][:6, :8], label)
  assert (out['label'][6:] == 255).all() and out['valid'] and out['index'] == 3
  pad = op.map({'pad': True})
  assert not pad['valid'] and (pad['label'] == 255).all() and pad['index'] == -1
  assert pad['image'].shape == (16, 20, 3)


def test_decode_rejects_bad_bytes():
  with pytest.raises(ValueError, match='cannot decode image of x.jpg'):
    T.decode_image(b'\xff\xd8garbage', 'image of x.jpg')


# ---------------------------------------------- mmcv / mmseg reference sequences
# The calls mmcv 1.3 and mmseg 0.11 make, written out: LoadImageFromFile
# (imfrombytes, flag 'color', backend cv2), LoadAnnotations (imfrombytes,
# flag 'unchanged', backend pillow), Resize (imrescale), RandomCrop,
# RandomFlip (imflip), PhotoMetricDistortion, Normalize (imnormalize, to_rgb)
# and Pad (impad). Images are BGR, as mmseg holds them until Normalize.

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def mmcv_imfrombytes_color(data):
  return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # BGR


def mmseg_load_label(data):
  return np.array(Image.open(io.BytesIO(data))).squeeze().astype(np.uint8)


def mmcv_imrescale(img, scale, interpolation):
  h, w = img.shape[:2]
  scale_factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  new_size = int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)
  codes = {'bilinear': cv2.INTER_LINEAR, 'nearest': cv2.INTER_NEAREST}
  return cv2.resize(img, new_size, interpolation=codes[interpolation])


def mmseg_random_crop(img, seg, crop_size, cat_max_ratio, random, ignore_index=255):
  def get_crop_bbox():
    margin_h = max(img.shape[0] - crop_size[0], 0)
    margin_w = max(img.shape[1] - crop_size[1], 0)
    offset_h = random.randint(0, margin_h + 1)
    offset_w = random.randint(0, margin_w + 1)
    return offset_h, offset_h + crop_size[0], offset_w, offset_w + crop_size[1]

  def crop(x, b):
    return x[b[0]:b[1], b[2]:b[3], ...]

  bbox = get_crop_bbox()
  if cat_max_ratio < 1.:
    for _ in range(10):
      labels, cnt = np.unique(crop(seg, bbox), return_counts=True)
      cnt = cnt[labels != ignore_index]
      if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
        break
      bbox = get_crop_bbox()
  return crop(img, bbox), crop(seg, bbox)


def mmseg_photometric(img, random, brightness_delta=32, contrast_range=(0.5, 1.5),
                      saturation_range=(0.5, 1.5), hue_delta=18):
  def convert(img, alpha=1, beta=0):
    img = img.astype(np.float32) * alpha + beta
    img = np.clip(img, 0, 255)
    return img.astype(np.uint8)

  def contrast(img):
    if random.randint(2):
      return convert(img, alpha=random.uniform(*contrast_range))
    return img

  if random.randint(2):  # brightness
    img = convert(img, beta=random.uniform(-brightness_delta, brightness_delta))
  mode = random.randint(2)
  if mode == 1:
    img = contrast(img)
  if random.randint(2):  # saturation
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)  # mmcv.bgr2hsv
    img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(*saturation_range))
    img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)  # mmcv.hsv2bgr
  if random.randint(2):  # hue
    img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-hue_delta, hue_delta)) % 180
    img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
  if mode == 0:
    img = contrast(img)
  return img


def mmcv_imnormalize(img, mean, std, to_rgb=True):
  mean, std = np.array(mean, np.float32), np.array(std, np.float32)  # mmseg Normalize
  img = img.copy().astype(np.float32)
  mean = np.float64(mean.reshape(1, -1))
  stdinv = 1 / np.float64(std.reshape(1, -1))
  if to_rgb:
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
  cv2.subtract(img, mean, img)
  cv2.multiply(img, stdinv, img)
  return img


def mmcv_impad(img, shape, pad_val):
  return cv2.copyMakeBorder(img, 0, shape[0] - img.shape[0], 0, shape[1] - img.shape[1],
                            cv2.BORDER_CONSTANT, value=pad_val)


class RecordingRng:
  """A np.random.Generator for the transforms that logs each draw, so that the
  reference can replay them through the np.random names mmseg calls."""

  def __init__(self, seed):
    self.gen, self.log = np.random.default_rng(seed), []

  def integers(self, low, high=None):
    v = self.gen.integers(low, high)
    self.log.append(('randint', low, high, v))
    return v

  def uniform(self, low, high):
    v = self.gen.uniform(low, high)
    self.log.append(('uniform', low, high, v))
    return v

  def random(self):
    v = self.gen.random()
    self.log.append(('rand', None, None, v))
    return v

  def replay(self):
    return Replay(self.log)


class Replay:
  """np.random-like source returning the recorded draws, checking kind and bounds."""

  def __init__(self, log):
    self.log = list(log)

  def _pop(self, *call):
    kind, lo, hi, v = self.log.pop(0)
    assert (kind, lo, hi) == call, f'reference drew {call}, the transform drew {(kind, lo, hi)}'
    return v

  def randint(self, low, high=None):
    return self._pop('randint', low, high)

  def uniform(self, low, high):
    return self._pop('uniform', low, high)

  def rand(self):
    return self._pop('rand', None, None)


def photo(h, w, seed=0):
  """Smooth colour regions plus noise: every hue, saturation and value occurs."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
  img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
  img += rng.integers(-20, 21, img.shape, dtype=np.int16)
  img[:3, :3] = (0, 0, 0)  # grey pixels (S = 0, H undefined) and saturated ends
  img[-3:, -3:] = (255, 255, 255)
  img[0, -1] = (128, 128, 128)
  return np.clip(img, 0, 255).astype(np.uint8)


def blocky_label(h, w, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, num_classes, (max(2, h // 9), max(2, w // 9)), dtype=np.uint8)
  coarse[rng.random(coarse.shape) < 0.15] = 255
  return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)


def encode(arr, fmt, **kw):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt, **kw)
  return buf.getvalue()


@pytest.mark.parametrize('kind', ['rgb_jpeg', 'grey_jpeg', 'cmyk_jpeg', 'rgba_png', 'palette_png',
                                  'grey16_png'])
def test_decode_equals_mmcv_imfrombytes(kind):
  rgb = photo(37, 53)
  data = {'rgb_jpeg': lambda: encode(rgb, 'JPEG', quality=90),
          'grey_jpeg': lambda: encode(rgb[..., 1], 'JPEG'),
          'cmyk_jpeg': lambda: encode_pil(Image.fromarray(rgb).convert('CMYK'), 'JPEG'),
          'rgba_png': lambda: encode(np.dstack([rgb, rgb[..., :1]]), 'PNG'),
          'palette_png': lambda: encode_pil(Image.fromarray(rgb).quantize(17), 'PNG'),
          'grey16_png': lambda: encode(rgb[..., 0].astype(np.uint16) * 257, 'PNG'),
          }[kind]()
  got = T.decode_image(data)
  ref = mmcv_imfrombytes_color(data)
  assert got.shape == (37, 53, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, ref[..., ::-1])  # mmseg's BGR, swapped by Normalize(to_rgb)
  if kind.startswith('grey'):
    assert (got == got[..., :1]).all()
  else:
    assert (got[..., 0] != got[..., 2]).any()


def encode_pil(im, fmt):
  buf = io.BytesIO()
  im.save(buf, format=fmt)
  return buf.getvalue()


@pytest.mark.parametrize('mode', ['L', 'P', 'I;16'])
def test_decode_label_equals_mmseg_pillow_load(mode):
  label = blocky_label(37, 53, 150)
  im = Image.fromarray(label)
  if mode == 'P':
    im = im.convert('P')
    im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
  elif mode == 'I;16':
    im = Image.fromarray(label.astype(np.uint16))
  data = encode_pil(im, 'PNG')
  assert T._is_grey8_png(data) == (mode == 'L')
  got = T.decode_label(data)
  assert got.shape == (37, 53)
  np.testing.assert_array_equal(got, mmseg_load_label(data))
  np.testing.assert_array_equal(got, label)


@pytest.mark.parametrize('orientation,rot90_k', [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_decode_applies_exif_orientation(orientation, rot90_k):
  rgb = photo(13, 21)
  exif = Image.Exif()
  exif[0x0112] = orientation  # Orientation tag
  data = encode(rgb, 'JPEG', quality=95, exif=exif.tobytes())
  got = T.decode_image(data)
  stored = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  assert stored.shape == (13, 21, 3)
  np.testing.assert_array_equal(got, np.rot90(stored, rot90_k)[..., ::-1])
  np.testing.assert_array_equal(got, mmcv_imfrombytes_color(data)[..., ::-1])
  # PIL's own reading of the tag turns the picture the same way (its decoder
  # may differ by a grey level or two).
  with Image.open(io.BytesIO(data)) as im:
    upright = np.asarray(ImageOps.exif_transpose(im).convert('RGB'), np.float32)
  assert upright.shape == got.shape
  assert np.abs(upright - got).mean() < 2


@pytest.mark.parametrize('hw,img_scale,ratio', [
    ((37, 53), (101, 41), 1.75),   # grows, short side binds
    ((53, 37), (101, 41), 0.5),    # portrait, shrinks
    ((29, 97), (61, 45), 1.25),    # long side binds
    ((41, 43), (50, 30), 0.75),    # shrinks to 21x22
    ((31, 45), (45, 31), 1.0),     # same size
])
def test_random_resize_equals_mmcv_imrescale(hw, img_scale, ratio):
  image, label = photo(*hw), blocky_label(*hw, 150)
  label[::5, ::3] = np.arange(label[::5, ::3].size).reshape(label[::5, ::3].shape) % 150  # fine detail
  op = T.RandomResize(img_scale, ratio_list=(0.3, ratio))
  out = op.random_map({'image': image, 'label': label}, ScriptedRng(('int', 1)))
  scale = int(img_scale[0] * ratio), int(img_scale[1] * ratio)  # mmseg random_sample_ratio
  ref_img = mmcv_imrescale(image[..., ::-1], scale, 'bilinear')
  ref_seg = mmcv_imrescale(label, scale, 'nearest')
  np.testing.assert_array_equal(out['image'], ref_img[..., ::-1])
  np.testing.assert_array_equal(out['label'], ref_seg)


@pytest.mark.parametrize('seed', range(6))
def test_random_crop_equals_mmseg(seed):
  image, label = photo(47, 59, seed), blocky_label(47, 59, 3, seed)
  label[: 47 // 2] = 1  # one class covers much of the map: redraws happen
  for crop_hw, ratio in (((23, 31), 0.75), ((23, 31), 1.0), ((51, 31), 0.75)):
    rng = RecordingRng(seed)
    img_c, lab_c = T.random_crop(rng, image, label, crop_hw, ratio)
    replay = rng.replay()
    ref_img, ref_seg = mmseg_random_crop(image[..., ::-1], label, crop_hw, ratio, replay)
    assert not replay.log
    np.testing.assert_array_equal(img_c, ref_img[..., ::-1])
    np.testing.assert_array_equal(lab_c, ref_seg)


def test_crop_ok_counts_as_np_unique():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = rng.integers(1, 5)
    lab = rng.choice(np.array([0, 3, 7, 255, 149][:n], np.uint8), (rng.integers(1, 9), 7),
                     p=rng.dirichlet(np.ones(n)))
    labels, cnt = np.unique(lab, return_counts=True)
    cnt = cnt[labels != 255]
    ref = len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < 0.75
    assert T.crop_ok(lab, 0.75) == ref
    assert T.crop_ok(lab.astype(np.int32), 0.75) == ref


def test_photometric_equals_mmseg_sequence():
  image = photo(37, 53)[:, ::-1]  # after a flip, as in the pipeline: a strided view
  seen = set()
  for seed in range(48):
    rng = RecordingRng(seed)
    got = T.photometric_distortion(rng, image)
    seen.update((d[0], d[1], d[2]) for d in rng.log)
    replay = rng.replay()
    ref = mmseg_photometric(image[..., ::-1], replay)
    assert not replay.log
    assert got.dtype == np.uint8 and got.shape == image.shape
    np.testing.assert_array_equal(got, ref[..., ::-1], err_msg=f'seed {seed}: {rng.log}')
  # Every step ran: brightness, contrast, saturation and hue draws were made.
  assert {('uniform', -32, 32), ('uniform', 0.5, 1.5), ('randint', -18, 18)} <= seen


class AllStepsRng(RecordingRng):
  """Every p=0.5 step fires; the second coin (mmseg's `mode`) is `mode`."""

  def __init__(self, seed, mode):
    super().__init__(seed)
    self.coins = [1, mode]

  def integers(self, low, high=None):
    if high is None and low == 2:
      v = self.coins.pop(0) if self.coins else 1
      self.log.append(('randint', low, high, v))
      return v
    return super().integers(low, high)


@pytest.mark.parametrize('mode', [0, 1])
def test_photometric_all_steps_equal_mmseg_sequence(mode):
  image = photo(41, 35, seed=mode)
  for seed in range(4):
    rng = AllStepsRng(seed, mode)
    got = T.photometric_distortion(rng, image)
    assert [d[0] for d in rng.log].count('uniform') == 3  # brightness, contrast, saturation
    replay = rng.replay()
    np.testing.assert_array_equal(got, mmseg_photometric(image[..., ::-1], replay)[..., ::-1])
    assert not replay.log


@pytest.mark.parametrize('hw,crop_hw', [((23, 31), (29, 33)), ((29, 33), (29, 33))])
def test_normalize_and_pad_equal_mmcv(hw, crop_hw):
  image, label = photo(*hw), blocky_label(*hw, 150)
  out = T.NormalizeAndPad(crop_hw, MEAN, STD).map({'image': image, 'label': label})
  ref_img = mmcv_impad(mmcv_imnormalize(image[..., ::-1], MEAN, STD, to_rgb=True), crop_hw, 0)
  ref_seg = mmcv_impad(label, crop_hw, 255)
  assert out['image'].dtype == np.float32 and out['image'].shape == (*crop_hw, 3)
  np.testing.assert_array_equal(out['image'], ref_img)
  np.testing.assert_array_equal(out['label'], ref_seg)


def mmseg_train(image_bytes, label_bytes, cfg, random):
  """mmseg's train pipeline on a record, as configured by a project data config."""
  img = mmcv_imfrombytes_color(image_bytes)
  seg = mmseg_load_label(label_bytes)
  ratio = cfg['ratio_list'][random.randint(len(cfg['ratio_list']))]
  scale = int(cfg['img_scale'][0] * ratio), int(cfg['img_scale'][1] * ratio)
  img = mmcv_imrescale(img, scale, 'bilinear')
  seg = mmcv_imrescale(seg, scale, 'nearest')
  img, seg = mmseg_random_crop(img, seg, cfg['crop_size'], cfg['cat_max_ratio'], random)
  if random.rand() < 0.5:
    img, seg = np.flip(img, axis=1), np.flip(seg, axis=1)  # mmcv.imflip 'horizontal'
  img = mmseg_photometric(img, random)
  img = mmcv_imnormalize(img, MEAN, STD, to_rgb=True)
  return mmcv_impad(img, cfg['crop_size'], 0), mmcv_impad(seg, cfg['crop_size'], 255)


def test_train_transforms_equal_mmseg_pipeline():
  from input_pipeline.config import default_data_config  # pylint: disable=import-outside-toplevel
  cfg = default_data_config('ade20k')
  cfg.update(img_scale=(91, 37), crop_size=(33, 29), cat_max_ratio=0.75)
  ops = T.train_transforms(cfg)
  records = []
  for i, hw in enumerate([(43, 57), (57, 43), (31, 77)]):
    records.append({'image': encode(photo(*hw, i), 'JPEG', quality=85),
                    'label': encode(blocky_label(*hw, 150, i), 'PNG'),
                    'file_name': f'r{i}.jpg', 'index': np.int32(i)})
  flips = set()
  for seed in range(12):
    rec = records[seed % len(records)]
    rng = RecordingRng(seed)
    ex = rec
    for op in ops:
      ex = op.random_map(ex, rng) if hasattr(op, 'random_map') else op.map(ex)
    flips.add(next(d[3] < 0.5 for d in rng.log if d[0] == 'rand'))
    replay = rng.replay()
    ref_img, ref_seg = mmseg_train(rec['image'], rec['label'], dict(cfg), replay)
    assert not replay.log
    np.testing.assert_array_equal(ex['image'], ref_img)
    np.testing.assert_array_equal(ex['label'], ref_seg)
  assert flips == {True, False}


def test_eval_transform_equals_mmseg_test_pipeline():
  rgb, label = photo(41, 67), blocky_label(41, 67, 150)
  rec = {'image': encode(rgb, 'JPEG'), 'label': encode(label, 'PNG'), 'index': np.int32(0)}
  op = T.EvalTransform((101, 43), (48, 112), (48, 72), MEAN, STD)
  out = op.map(rec)
  ref = mmcv_imnormalize(mmcv_imrescale(mmcv_imfrombytes_color(rec['image']), (101, 43),
                                        'bilinear'), MEAN, STD)
  assert ref.shape == (43, 70, 3)
  np.testing.assert_array_equal(out['image_hw'], ref.shape[:2])
  np.testing.assert_array_equal(out['image'], mmcv_impad(ref, (48, 112), 0))
  np.testing.assert_array_equal(out['label'][:41, :67], mmseg_load_label(rec['label']))
