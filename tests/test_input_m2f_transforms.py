"""The Mask2Former (detectron2) train/test transforms against the calls detectron2 and
Mask2Former make, written out inline below as the reference (PIL read_image and
resize, torch nearest of the float64 label, RandomCrop_CategoryAreaConstraint,
ColorAugSSDTransform on BGR, HFlip, the mapper's F.pad and the model's
(x - mean) / std), on odd sizes, replaying the transforms' random draws."""
import io

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from input_pipeline import pipeline
from input_pipeline import transforms as T
from input_pipeline.config import default_data_config, short_edge_choices, use_detectron2_recipe

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
# The mapper's label is float64 ('double'); PyTorch 1.9 (SeMask's) computes the nearest
# index in float32 for every dtype, PyTorch 2.x in float64 for float64 inputs. A float32
# label on this PyTorch reproduces 1.9's rule (test_label_nearest_index_rules).
D2_LABEL_DTYPE = 'float32'

# ------------------------------------------------------------------ reference
# detectron2 (data/detection_utils.py read_image, data/transforms/augmentation_impl.py
# ResizeShortestEdge / RandomCrop / RandomCrop_CategoryAreaConstraint / RandomFlip,
# data/transforms/transform.py ResizeTransform), PointRend's ColorAugSSDTransform and
# Mask2Former's MaskFormerSemanticDatasetMapper + MaskFormer.forward normalisation.

D2_EXIF = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM,
           5: Image.TRANSPOSE, 6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}


def d2_read_image(data, fmt=None):
  image = Image.open(io.BytesIO(data))
  try:
    exif = image.getexif()
  except Exception:  # pylint: disable=broad-except
    exif = None
  if exif is not None and D2_EXIF.get(exif.get(0x0112)) is not None:
    image = image.transpose(D2_EXIF[exif.get(0x0112)])
  if fmt is not None:
    image = image.convert(fmt)
  return np.asarray(image)


def d2_get_output_shape(oldh, oldw, short_edge_length, max_size):
  h, w = oldh, oldw
  size = short_edge_length * 1.0
  scale = size / min(h, w)
  if h < w:
    newh, neww = size, scale * w
  else:
    newh, neww = scale * h, size
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh = newh * scale
    neww = neww * scale
  neww = int(neww + 0.5)
  newh = int(newh + 0.5)
  return (newh, neww)


def d2_resize_apply(img, new_h, new_w, interp):
  if img.dtype == np.uint8:
    pil_image = Image.fromarray(img)
    pil_image = pil_image.resize((new_w, new_h), interp)
    return np.asarray(pil_image)
  if any(x < 0 for x in img.strides):
    img = np.ascontiguousarray(img)
  img = torch.from_numpy(img)
  shape = list(img.shape)
  shape_4d = shape[:2] + [1] * (4 - len(shape)) + shape[2:]
  img = img.view(shape_4d).permute(2, 3, 0, 1)  # hw(c) -> nchw
  mode = {Image.NEAREST: 'nearest', Image.BILINEAR: 'bilinear'}[interp]
  align_corners = None if mode == 'nearest' else False
  img = F.interpolate(img, (new_h, new_w), mode=mode, align_corners=align_corners)
  shape[:2] = (new_h, new_w)
  return img.permute(2, 3, 0, 1).view(shape).numpy()  # nchw -> hw(c)


def d2_crop_transform(random, image, sem_seg, crop_size, single_category_max_area, ignored=255):
  h, w = sem_seg.shape
  crop = (min(crop_size[0], h), min(crop_size[1], w))  # get_crop_size('absolute')
  if single_category_max_area >= 1.0:
    y0 = random.randint(h - crop[0] + 1)
    x0 = random.randint(w - crop[1] + 1)
  else:
    for _ in range(10):
      y0 = random.randint(h - crop[0] + 1)
      x0 = random.randint(w - crop[1] + 1)
      sem_seg_temp = sem_seg[y0:y0 + crop[0], x0:x0 + crop[1]]
      labels, cnt = np.unique(sem_seg_temp, return_counts=True)
      cnt = cnt[labels != ignored]
      if len(cnt) > 1 and np.max(cnt) < np.sum(cnt) * single_category_max_area:
        break
  return (image[y0:y0 + crop[0], x0:x0 + crop[1]], sem_seg[y0:y0 + crop[0], x0:x0 + crop[1]])


def d2_color_aug_ssd(random, img, brightness_delta=32, contrast_low=0.5, contrast_high=1.5,
                     saturation_low=0.5, saturation_high=1.5, hue_delta=18, is_rgb=True):
  def convert(img, alpha=1, beta=0):
    img = img.astype(np.float32) * alpha + beta
    img = np.clip(img, 0, 255)
    return img.astype(np.uint8)

  def brightness(img):
    if random.randrange(2):
      return convert(img, beta=random.uniform(-brightness_delta, brightness_delta))
    return img

  def contrast(img):
    if random.randrange(2):
      return convert(img, alpha=random.uniform(contrast_low, contrast_high))
    return img

  def saturation(img):
    if random.randrange(2):
      img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
      img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(saturation_low, saturation_high))
      return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    return img

  def hue(img):
    if random.randrange(2):
      img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
      img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-hue_delta, hue_delta)) % 180
      return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    return img

  if is_rgb:
    img = img[:, :, [2, 1, 0]]
  img = brightness(img)
  if random.randrange(2):
    img = contrast(img)
    img = saturation(img)
    img = hue(img)
  else:
    img = saturation(img)
    img = hue(img)
    img = contrast(img)
  if is_rgb:
    img = img[:, :, [2, 1, 0]]
  return img


def m2f_pad_and_normalize(image, sem_seg_gt, size_divisibility, ignore_label=255):
  """Mapper: CHW tensors, F.pad to size_divisibility (128 / ignore); model: (x - mean) / std."""
  image = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
  sem_seg_gt = torch.as_tensor(sem_seg_gt.astype('long'))
  if size_divisibility > 0:
    image_size = (image.shape[-2], image.shape[-1])
    padding_size = [0, size_divisibility - image_size[1], 0, size_divisibility - image_size[0]]
    image = F.pad(image, padding_size, value=128).contiguous()
    sem_seg_gt = F.pad(sem_seg_gt, padding_size, value=ignore_label).contiguous()
  pixel_mean = torch.Tensor(MEAN).view(-1, 1, 1)
  pixel_std = torch.Tensor(STD).view(-1, 1, 1)
  image = (image - pixel_mean) / pixel_std
  return image.permute(1, 2, 0).numpy(), sem_seg_gt.numpy()


def m2f_train_mapper(image_bytes, label_bytes, cfg, random, py_random):
  """MaskFormerSemanticDatasetMapper.__call__ (train) then the model's normalisation."""
  image = d2_read_image(image_bytes, 'RGB')
  sem_seg = d2_read_image(label_bytes).astype(D2_LABEL_DTYPE)
  h, w = image.shape[:2]
  size = random.choice(list(cfg['short_edge_choices']))  # ResizeShortestEdge 'choice'
  newh, neww = d2_get_output_shape(h, w, size, cfg['max_size'])
  image = d2_resize_apply(image, newh, neww, Image.BILINEAR)
  sem_seg = d2_resize_apply(sem_seg, newh, neww, Image.NEAREST)
  image, sem_seg = d2_crop_transform(random, image, sem_seg, cfg['crop_size'],
                                     cfg['cat_max_ratio'])
  image = d2_color_aug_ssd(py_random, image)
  if random.uniform(0, 1.0) < 0.5:  # RandomFlip: _rand_range() < prob
    image, sem_seg = np.flip(image, axis=1), np.flip(sem_seg, axis=1)
  return m2f_pad_and_normalize(image, sem_seg, cfg['size_divisibility'])


# ------------------------------------------------------------------ random draws


class RecordingRng:
  """np.random.Generator for the transforms, logging every draw for the reference."""

  def __init__(self, seed):
    self.gen, self.log = np.random.default_rng(seed), []

  def integers(self, low, high=None):
    v = int(self.gen.integers(low, high))
    self.log.append(('integers', low, high, v))
    return v

  def uniform(self, low, high):
    v = float(self.gen.uniform(low, high))
    self.log.append(('uniform', low, high, v))
    return v

  def random(self):
    v = float(self.gen.random())
    self.log.append(('random', None, None, v))
    return v


class Replay:
  """The recorded draws through the names the reference calls: np.random.{randint,
  choice, uniform} and Python's random.{randrange, uniform, randint}."""

  def __init__(self, log):
    self.log = list(log)

  def _pop(self, *call):
    kind, lo, hi, v = self.log.pop(0)
    assert (kind, lo, hi) == call, f'reference drew {call}, the transform drew {(kind, lo, hi)}'
    return v

  def randint(self, low, high=None):  # np.random.randint(n): [0, n)
    assert high is None
    return self._pop('integers', low, None)

  def choice(self, seq):  # np.random.choice(list): a uniform index
    return seq[self._pop('integers', len(seq), None)]

  def uniform(self, low, high):  # np.random.uniform / random.uniform
    if (low, high) == (0, 1.0):
      return self._pop('random', None, None)
    return self._pop('uniform', low, high)


class PyRandom:
  """Python's random.{randrange, uniform, randint} over the same draw log."""

  def __init__(self, replay: Replay):
    self.replay = replay

  def randrange(self, n):  # [0, n)
    return self.replay._pop('integers', n, None)  # pylint: disable=protected-access

  def uniform(self, a, b):
    return self.replay._pop('uniform', a, b)  # pylint: disable=protected-access

  def randint(self, a, b):  # [a, b]
    return self.replay._pop('integers', a, b + 1)  # pylint: disable=protected-access


# ------------------------------------------------------------------ data


def photo(h, w, seed=0):
  """Smooth colour regions plus noise: every hue, saturation and value occurs."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
  img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
  img += rng.integers(-20, 21, img.shape, dtype=np.int16)
  img[:3, :3] = (0, 0, 0)
  img[-3:, -3:] = (255, 255, 255)
  img[0, -1] = (128, 128, 128)
  return np.clip(img, 0, 255).astype(np.uint8)


def fine_label(h, w, num_classes=150, seed=0):
  """Blocks plus single-pixel detail (nearest picks are visible), some 255."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, num_classes, (max(2, h // 7), max(2, w // 7)), dtype=np.uint8)
  coarse[rng.random(coarse.shape) < 0.15] = 255
  label = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
  label[::3, ::2] = (np.arange(label[::3, ::2].size) % num_classes).reshape(label[::3, ::2].shape)
  return label


def encode(arr, fmt, **kw):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt, **kw)
  return buf.getvalue()


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize('hw', [(512, 683), (683, 512), (37, 53), (1024, 2048), (100, 1000),
                                (333, 333), (481, 719), (2000, 97)])
@pytest.mark.parametrize('short,max_size', [(640, 2560), (512, 2048), (1024, 2048), (37, 101)])
def test_shortest_edge_size_equals_detectron2(hw, short, max_size):
  assert T.shortest_edge_size(hw, short, max_size) == d2_get_output_shape(*hw, short, max_size)


def test_shortest_edge_size_hand_cases():
  assert T.shortest_edge_size((512, 683), 640, 2560) == (640, 854)  # 683 * 1.25 = 853.75
  assert T.shortest_edge_size((1024, 2048), 1024, 2048) == (1024, 2048)
  assert T.shortest_edge_size((1024, 2048), 2048, 4096) == (2048, 4096)
  assert T.shortest_edge_size((100, 1000), 640, 2560) == (256, 2560)  # long side binds
  assert T.shortest_edge_size((1000, 100), 640, 2560) == (2560, 256)


@pytest.mark.parametrize('hw,out_hw', [((37, 53), (61, 88)), ((53, 37), (23, 16)),
                                       ((41, 43), (41, 43)), ((29, 97), (64, 214))])
def test_resize_equals_detectron2_resize_transform(hw, out_hw):
  image, label = photo(*hw), fine_label(*hw)
  got = T.resize_pil_bilinear(image, out_hw)
  np.testing.assert_array_equal(got, d2_resize_apply(image, *out_hw, Image.BILINEAR))
  got_seg = T.resize_label_nearest_torch(label, out_hw)
  ref_seg = d2_resize_apply(label.astype(D2_LABEL_DTYPE), *out_hw, Image.NEAREST)
  assert got_seg.dtype == np.uint8 and got_seg.shape == tuple(out_hw)
  np.testing.assert_array_equal(got_seg, ref_seg)
  if out_hw[0] < hw[0]:  # PIL's bilinear shrink is antialiased: not cv2's 2-tap filter
    assert (got != cv2.resize(image, out_hw[::-1], interpolation=cv2.INTER_LINEAR)).any()


def torch_nearest(label, out_hw, dtype):
  x = torch.from_numpy(label.astype(dtype))[None, None]
  return F.interpolate(x, tuple(out_hw), mode='nearest')[0, 0].numpy()


def test_label_nearest_index_rules():
  """torch's rule in float32 (PyTorch 1.x for every dtype: SeMask's 1.9, and 2.x for
  float32) by default; PyTorch 2.x's float64 rule on request; neither is cv2's."""
  diffs32_64 = diffs_cv2 = 0
  for n_in, n_out in [(683, 854), (512, 282), (1024, 318), (20, 98), (27, 306), (1367, 1024)]:
    label = (np.arange(n_in) % 251).astype(np.uint8)[None, :]
    ref32 = torch_nearest(label, (1, n_out), np.float32)
    ref64 = torch_nearest(label, (1, n_out), np.float64)
    np.testing.assert_array_equal(T.resize_label_nearest_torch(label, (1, n_out)), ref32)
    np.testing.assert_array_equal(
        T.resize_label_nearest_torch(label, (1, n_out), index_dtype=np.float64), ref64)
    cv = cv2.resize(label, (n_out, 1), interpolation=cv2.INTER_NEAREST)
    diffs32_64 += int((ref32 != ref64).sum())
    diffs_cv2 += int((cv != ref32).sum())
  assert diffs32_64 > 0 and diffs_cv2 > 0  # sizes where the rules differ are covered
  assert T.resize_label_nearest_torch(np.arange(512)[None], (1, 282))[0, 141] == 255


@pytest.mark.parametrize('hw,crop,max_area', [((57, 43), (33, 29), 1.0), ((57, 43), (33, 29), 0.3),
                                              ((21, 25), (33, 29), 1.0), ((40, 30), (40, 20), 0.5)])
def test_random_crop_equals_detectron2(hw, crop, max_area):
  image, label = photo(*hw), fine_label(*hw, num_classes=4)
  label[:, :hw[1] // 2] = 255  # ignored pixels do not count
  label[-8:, hw[1] // 2:] = 3
  redraws = 0
  for seed in range(8):
    rng = RecordingRng(seed)
    got_img, got_seg = T.d2_random_crop(rng, image, label, crop, max_area)
    redraws += len(rng.log) > 2
    replay = Replay(rng.log)
    ref_img, ref_seg = d2_crop_transform(replay, image, label.astype('double'), crop, max_area)
    assert not replay.log
    assert got_img.shape[:2] == (min(crop[0], hw[0]), min(crop[1], hw[1]))  # never padded
    np.testing.assert_array_equal(got_img, ref_img)
    np.testing.assert_array_equal(got_seg, ref_seg)
  assert (redraws > 0) == (max_area < 1.0 and hw[0] > crop[0])


def test_random_crop_constraint_redraws_then_keeps_the_tenth():
  label = np.zeros((20, 20), np.uint8)
  label[:, :2] = 1  # a crop touching column 0/1 holds two classes
  image = photo(20, 20)
  rng = RecordingRng(0)
  _, seg = T.d2_random_crop(rng, image, label, (10, 10), 0.99)
  draws = len(rng.log) // 2
  ok = len(np.unique(seg)) > 1
  assert ok or draws == 10
  assert draws <= 10
  one = T.d2_random_crop(RecordingRng(0), image, np.zeros((20, 20), np.uint8), (10, 10), 0.99)
  assert one[1].shape == (10, 10)


@pytest.mark.parametrize('seed', range(24))
def test_color_aug_ssd_equals_pointrend_transform(seed):
  image = photo(23, 31, seed)[3:20, 2:29]  # a crop view, as the pipeline hands it over
  rng = RecordingRng(seed)
  got = T.color_aug_ssd(rng, image)
  replay = Replay(rng.log)
  ref = d2_color_aug_ssd(PyRandom(replay), image)
  assert not replay.log
  assert got.dtype == np.uint8 and got.shape == image.shape
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize('order', [0, 1])
def test_color_aug_ssd_all_steps_and_inclusive_hue_delta(order):
  image = photo(19, 27, 3)

  class Forced(RecordingRng):
    """Every step on, the given order, extreme parameters (hue delta +18 included)."""

    def integers(self, low, high=None):
      v = (order if len([d for d in self.log if d[1] == 2]) == 1 else 1) if high is None else high - 1
      self.log.append(('integers', low, high, v))
      return v

    def uniform(self, low, high):
      self.log.append(('uniform', low, high, high))
      return high

  rng = Forced(0)
  got = T.color_aug_ssd(rng, image)
  assert ('integers', -18, 19, 18) in rng.log
  assert sum(d[1] == 2 for d in rng.log) == 5  # brightness, order, contrast, saturation, hue
  replay = Replay(rng.log)
  np.testing.assert_array_equal(got, d2_color_aug_ssd(PyRandom(replay), image))
  assert not replay.log


@pytest.mark.parametrize('hw,sd,out_hw', [((37, 29), 40, (40, 40)), ((40, 40), 40, (40, 40)),
                                          ((45, 33), 40, (40, 40)), ((31, 64), -1, (32, 64))])
def test_pad_and_normalize_equal_mapper_and_model(hw, sd, out_hw):
  image, label = photo(*hw), fine_label(*hw)
  out = T.D2PadAndNormalize(sd, out_hw, MEAN, STD).map({'image': image, 'label': label})
  ref_img, ref_seg = m2f_pad_and_normalize(image, label, sd)
  assert out['image'].dtype == np.float32 and out['label'].dtype == np.int32
  assert out['image'].shape == (*out_hw, 3) and out['label'].shape == out_hw
  h, w = ref_seg.shape
  np.testing.assert_array_equal(out['image'][:h, :w], ref_img)
  np.testing.assert_array_equal(out['label'][:h, :w], ref_seg)
  # Beyond the mapper's size: the model's ImageList pad (0) and no-target label.
  assert (out['image'][h:] == 0).all() and (out['image'][:, w:] == 0).all()
  assert (out['label'][h:] == 255).all() and (out['label'][:, w:] == 255).all()
  if sd > 0 and hw[0] < sd:  # the 128 pad, normalised in float32 as torch does
    pad = (np.float32(128) - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_array_equal(out['image'][hw[0]:], np.broadcast_to(pad, (sd - hw[0], sd, 3)))


def test_normalize_is_the_models_float32():
  image = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, 2)
  got = T.d2_normalize(image, MEAN, STD)
  ref = ((torch.as_tensor(image.transpose(2, 0, 1)) - torch.Tensor(MEAN).view(-1, 1, 1))
         / torch.Tensor(STD).view(-1, 1, 1)).permute(1, 2, 0).numpy()
  np.testing.assert_array_equal(got, ref)
  # For the ImageNet constants mmcv's float64 1 / std product rounds to the same floats.
  np.testing.assert_array_equal(got, T.normalize(image, MEAN, STD))


@pytest.mark.parametrize('kind', ['rgb_jpeg', 'grey_png', 'palette_png', 'exif6_jpeg',
                                  'exif8_jpeg'])
def test_decode_equals_detectron2_read_image(kind):
  rgb = photo(13, 21)
  if kind.startswith('exif'):
    exif = Image.Exif()
    exif[0x0112] = int(kind[4])
    data = encode(rgb, 'JPEG', quality=95, exif=exif.tobytes())
  else:
    data = {'rgb_jpeg': lambda: encode(rgb, 'JPEG', quality=90),
            'grey_png': lambda: encode(rgb[..., 1], 'PNG'),
            'palette_png': lambda: encode(np.asarray(Image.fromarray(rgb).quantize(7)), 'PNG')}[kind]()
  got = T.decode_image_pil(data)
  ref = d2_read_image(data, 'RGB')
  np.testing.assert_array_equal(got, ref)
  assert got.shape == ((21, 13, 3) if kind.startswith('exif') else (13, 21, 3))


def d2_cfg(**kw):
  cfg = default_data_config('ade20k')
  use_detectron2_recipe(cfg, base=40, max_size=150, size_divisibility=36, test_short_edge=40,
                        test_max_size=150, test_aug_max_size=210)
  cfg.crop_size = (36, 36)
  cfg.update(kw)
  return cfg


def test_train_transforms_equal_mask2former_mapper():
  cfg = d2_cfg()
  assert tuple(cfg.short_edge_choices) == (20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68,
                                           72, 76, 80)
  ops = T.train_transforms(cfg)
  assert [type(op).__name__ for op in ops] == ['Decode', 'ResizeShortestEdge', 'D2RandomCrop',
                                               'ColorAugSSD', 'RandomFlip', 'D2PadAndNormalize']
  records = []
  for i, hw in enumerate([(43, 57), (57, 43), (31, 77)]):
    records.append({'image': encode(photo(*hw, i), 'JPEG', quality=85),
                    'label': encode(fine_label(*hw, seed=i), 'PNG'),
                    'file_name': f'r{i}.jpg', 'index': np.int32(i)})
  flips, padded = set(), set()
  for seed in range(16):
    rec = records[seed % len(records)]
    rng = RecordingRng(seed)
    ex = rec
    for op in ops:
      ex = op.random_map(ex, rng) if hasattr(op, 'random_map') else op.map(ex)
    flips.add(next(d[3] < 0.5 for d in rng.log if d[0] == 'random'))
    replay = Replay(rng.log)
    ref_img, ref_seg = m2f_train_mapper(rec['image'], rec['label'], dict(cfg), replay,
                                        PyRandom(replay))
    assert not replay.log
    assert ex['image'].shape == (36, 36, 3) and ex['label'].shape == (36, 36)
    np.testing.assert_array_equal(ex['image'], ref_img)
    np.testing.assert_array_equal(ex['label'], ref_seg)
    padded.add(bool((ex['label'] == 255).all(0).any() or (ex['label'] == 255).all(1).any()))
  assert flips == {True, False}
  assert True in padded  # short sides below the crop occurred: 128 / 255 padding checked


def test_train_transform_shapes_and_pad_values_on_a_synthetic_scene():
  from input_pipeline import synthetic  # pylint: disable=import-outside-toplevel
  image, label = synthetic.generate_scene(0, 'train', 3, height=40, width=48)
  cfg = d2_cfg(short_edge_choices=(20,), photometric=False, flip_prob=0.0)
  ex = {'image': image, 'label': label, 'index': np.int32(3)}
  for op in T.train_transforms(cfg):
    ex = op.random_map(ex, np.random.default_rng(0)) if hasattr(op, 'random_map') else op.map(ex)
  # 40x48 -> short side 20: 20x24, crop keeps it, the mapper pads to 36x36.
  assert ex['image'].shape == (36, 36, 3) and ex['label'].shape == (36, 36)
  pad = (np.float32(128) - np.float32(MEAN)) / np.float32(STD)
  assert (ex['image'][20:] == pad).all() and (ex['image'][:, 24:] == pad).all()
  assert (ex['label'][20:] == 255).all() and (ex['label'][:, 24:] == 255).all()
  assert set(np.unique(ex['label'][:20, :24])) <= set(np.unique(label))
  np.testing.assert_array_equal(ex['label'][:20, :24], T.resize_label_nearest_torch(label, (20, 24)))


@pytest.mark.parametrize('hw', [(41, 67), (67, 41), (30, 200)])
def test_eval_transform_equals_detectron2_test_resize(hw):
  cfg = d2_cfg()
  rgb, label = photo(*hw), fine_label(*hw)
  rec = {'image': encode(rgb, 'JPEG'), 'label': encode(label, 'PNG'), 'index': np.int32(0)}
  op = T.eval_transform(cfg, (160, 160), (224, 224))
  out = op.map(rec)
  newh, neww = d2_get_output_shape(*hw, 40, 150)
  assert tuple(T.test_size(hw, cfg)) == (newh, neww)
  image = d2_resize_apply(d2_read_image(rec['image'], 'RGB'), newh, neww, Image.BILINEAR)
  ref, _ = m2f_pad_and_normalize(image, np.zeros(image.shape[:2]), -1)
  np.testing.assert_array_equal(out['image_hw'], (newh, neww))
  np.testing.assert_array_equal(out['image'][:newh, :neww], ref)
  assert (out['image'][newh:] == 0).all() and (out['image'][:, neww:] == 0).all()
  np.testing.assert_array_equal(out['label'][:hw[0], :hw[1]], label)
  np.testing.assert_array_equal(out['label_hw'], hw)
  # test_preprocess (what prediction can call) is the same computation.
  pre, pre_hw = T.test_preprocess(d2_read_image(rec['image'], 'RGB'), cfg)
  assert pre_hw == (newh, neww)
  np.testing.assert_array_equal(pre, ref)


def test_configs_carry_the_mask2former_input_recipe():
  from configs import ade20k_semask_mask2former as ade  # pylint: disable=import-outside-toplevel
  from configs import cityscapes_semask_mask2former as city  # pylint: disable=import-outside-toplevel
  assert default_data_config('ade20k').recipe == 'mmseg'
  d = ade.get_config('L').data
  assert d.recipe == 'detectron2' and tuple(d.crop_size) == (640, 640)
  assert list(d.short_edge_choices) == [int(x * 0.1 * 640) for x in range(5, 21)]
  assert (d.max_size, d.size_divisibility, d.test_short_edge, d.test_max_size) == (2560, 640, 640,
                                                                                     2560)
  assert d.test_aug_max_size == 4480  # swin/*_res640.yaml TEST.AUG.MAX_SIZE
  assert d.cat_max_ratio == 1.0 and d.flip_prob == 0.5 and d.photometric
  d = ade.get_config('T').data
  assert tuple(d.crop_size) == (512, 512) and tuple(d.short_edge_choices) == short_edge_choices(512)
  assert (d.max_size, d.size_divisibility, d.test_short_edge, d.test_max_size) == (2048, 512, 512,
                                                                                     2048)
  assert d.test_aug_max_size == 3584
  d = city.get_config('L').data
  assert tuple(d.crop_size) == (512, 1024)
  assert list(d.short_edge_choices) == [int(x * 0.1 * 1024) for x in range(5, 21)]
  assert (d.max_size, d.size_divisibility, d.test_short_edge) == (4096, -1, 1024)
  assert (d.test_max_size, d.test_aug_max_size) == (2048, 4096)
  assert T.d2_train_out_hw(d) == (512, 1024)
  assert T.test_size((1024, 2048), d) == (1024, 2048)


def test_multi_scale_test_sizes_are_mask2formers_tta():
  # detectron2's DatasetMapperTTA resizes the test loader's image, which DatasetMapper has
  # already resized with ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST), again with
  # ResizeShortestEdge(min_size, TEST.AUG.MAX_SIZE) for each of TEST.AUG.MIN_SIZES
  # (= int(MIN_SIZE_TEST * r)), the max size fixed for every ratio (1.0 included), flip or
  # not; both PIL bilinear on uint8. A single pass keeps the one resize. A 10:1 panorama
  # reaches both caps, and the double resize lands 1 px away from a direct one.
  from configs import ade20k_semask_mask2former as ade  # pylint: disable=import-outside-toplevel
  d = ade.get_config('T').data
  hw = (100, 1000)
  ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  mins = [256, 384, 512, 640, 768, 896]  # Base-ADE20K-SemanticSegmentation.yaml TEST.AUG
  loaded = d2_get_output_shape(*hw, 512, 2048)
  assert loaded == (205, 2048)
  want = [d2_get_output_shape(*loaded, m, 3584) for m in mins]
  assert pipeline.scale_sizes(hw, d, ratios) == want
  assert pipeline.scale_sizes(hw, d, ratios, tta=pipeline.is_tta(ratios, False)) == want
  assert want[2] == (359, 3584) != d2_get_output_shape(*hw, 512, 3584)  # (358, 3584)
  assert pipeline.scale_sizes(hw, d, (1.0,)) == [loaded]
  assert pipeline.scale_sizes(hw, d, (1.0,), tta=pipeline.is_tta((1.0,), True)) == [
      d2_get_output_shape(*loaded, 512, 3584)]
  # The pixels: PIL twice, then the model's normalisation.
  image = np.random.default_rng(0).integers(0, 256, hw + (3,), dtype=np.uint8)
  first = Image.fromarray(image).resize(loaded[::-1], Image.Resampling.BILINEAR)
  got = pipeline.scale_images(image, d, (0.5, 1.0))
  for im, size in zip(got, (want[0], want[2])):
    ref = np.asarray(first.resize(size[::-1], Image.Resampling.BILINEAR), np.float32)
    ref = (ref - np.asarray(d.mean, np.float32)) / np.asarray(d.std, np.float32)
    np.testing.assert_allclose(im, ref, rtol=0, atol=1e-5)
  single = pipeline.scale_images(image, d, (1.0,))[0]  # no TTA: one resize
  ref = np.asarray(Image.fromarray(image).resize(loaded[::-1], Image.Resampling.BILINEAR),
                   np.float32)
  np.testing.assert_allclose(single, (ref - np.asarray(d.mean, np.float32))
                             / np.asarray(d.std, np.float32), rtol=0, atol=1e-5)


def test_loaders_with_the_detectron2_recipe():
  cfg = default_data_config('synthetic')
  use_detectron2_recipe(cfg, base=40, max_size=160, size_divisibility=32, test_short_edge=40,
                        test_max_size=160, test_aug_max_size=224)
  cfg.synthetic.num_train, cfg.synthetic.num_eval = 8, 3
  cfg.synthetic.height, cfg.synthetic.width = 40, 48
  cfg.crop_size = (32, 32)
  cfg.eval_pad_hw = cfg.eval_label_pad_hw = None  # computed with the detectron2 test size
  it = pipeline.create_train_iterator(cfg, seed=0, global_batch_size=4, process_index=0,
                                      process_count=1)
  batch = next(it)
  assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 32, 32) and batch['label'].dtype == np.int32
  assert set(np.unique(batch['label'])) <= set(range(cfg.num_classes)) | {255}
  ev = next(iter(pipeline.create_eval_iterator(cfg, global_batch_size=4, process_index=0,
                                               process_count=1)))
  assert ev['image'].shape == (4, 64, 64, 3)  # test size 40x48 rounded up to 32
  np.testing.assert_array_equal(ev['image_hw'][:3], [[40, 48]] * 3)
  assert ev['valid'].tolist() == [True, True, True, False]


def test_a_crop_with_more_classes_than_target_slots_is_refused_naming_its_image():
  label = np.full((6, 6), 255, np.uint8)
  label[0, :3] = [1, 4, 7]
  ex = {'image': np.zeros((6, 6, 3), np.uint8), 'label': label, 'index': np.int32(5),
        'file_name': 'ADE_train_00000006.jpg'}
  assert T.CheckTargetSlots(3).map(ex) is ex  # three classes, three slots; 255 not a class
  with pytest.raises(ValueError, match=r'ADE_train_00000006\.jpg \(record 5\): a training crop '
                                       r'has 3 classes, more than config.loss.max_targets=2'):
    T.CheckTargetSlots(2).map(ex)
  # In the loader: the synthetic scenes hold several classes a crop; one slot is too few.
  cfg = default_data_config('synthetic')
  use_detectron2_recipe(cfg, base=40, max_size=160, size_divisibility=32, test_short_edge=40,
                        test_max_size=160, test_aug_max_size=224)
  cfg.synthetic.num_train, cfg.synthetic.height, cfg.synthetic.width = 4, 40, 48
  cfg.crop_size = (32, 32)
  cfg.worker_count = 0
  ok = pipeline.create_train_iterator(cfg, seed=0, global_batch_size=2, process_index=0,
                                      process_count=1, max_targets=cfg.num_classes)
  assert next(ok)['label'].shape == (2, 32, 32)
  bad = pipeline.create_train_iterator(cfg, seed=0, global_batch_size=2, process_index=0,
                                       process_count=1, max_targets=1)
  with pytest.raises(Exception, match=r'synthetic/train/\d+ \(record \d+\): a training crop'):
    next(bad)
