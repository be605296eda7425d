"""Each train/test transform against hand-computed cases (mmseg 0.x semantics)."""
import numpy as np
import pytest

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
  # Shrink 4 -> 2 (numpy path): src x = (x+.5)*2-.5 = 0.5, 2.5 -> 50, 227.5 -> 228
  out = T.resize_bilinear(img, (2, 2))
  np.testing.assert_array_equal(out[..., 0], [[50, 228], [50, 228]])
  # Grow 2 -> 4 (PIL path): src x = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
  img2 = np.repeat(np.array([[0, 100]], np.uint8)[..., None], 3, 2)
  out2 = T.resize_bilinear(img2, (1, 4))
  np.testing.assert_array_equal(out2[0, :, 0], [0, 25, 75, 100])
  # Mixed (one axis shrinks): numpy path, constant stays constant.
  const = np.full((6, 5, 3), 77, np.uint8)
  assert (T.resize_bilinear(const, (3, 9)) == 77).all()


def test_resize_bilinear_paths_agree():
  """PIL (growing) and numpy (shrinking) paths implement the same rule."""
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
  y0, y1, ay = T._linear_taps(15, 7)
  x0, x1, ax = T._linear_taps(20, 9)
  f = img.astype(np.float64)
  r = f[y0] * (1 - ay)[:, None, None] + f[y1] * ay[:, None, None]
  ref = r[:, x0] * (1 - ax)[None, :, None] + r[:, x1] * ax[None, :, None]
  got = T.resize_bilinear(img, (15, 20)).astype(np.float64)
  assert np.abs(got - ref).max() <= 1.0


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


def test_hsv_matches_cv2_conventions():
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [128, 64, 0]]], np.uint8)
  hsv = T.rgb_to_hsv_u8(rgb)
  np.testing.assert_array_equal(hsv[0, :4], [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 255]])
  np.testing.assert_array_equal(hsv[0, 4], [15, 255, 128])  # 30 degrees -> 15
  rnd = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
  back = T.hsv_to_rgb_u8(T.rgb_to_hsv_u8(rnd)).astype(int)
  assert np.abs(back - rnd).max() <= 5  # H has 2-degree steps: up to 255/60 off, as in cv2


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
