"""Inference helpers against torch / a NumPy transcription of mmseg's slide_inference."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semask_jax.evaluation import inference as evaluate
from semask_jax.models.resize import resize_bilinear


def torch_resize(x_hwc: np.ndarray, size) -> np.ndarray:
  t = torch.from_numpy(np.array(x_hwc)).permute(2, 0, 1)[None]
  return F.interpolate(t, size=size, mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()


def test_resize_dynamic_crops_then_resizes_like_torch():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 12, 10, 4)).astype(np.float32)
  in_hw = np.array([[12, 10], [7, 9], [5, 3]], np.int32)
  out_hw = np.array([[30, 25], [13, 17], [4, 2]], np.int32)
  out = np.asarray(jax.jit(evaluate.resize_dynamic, static_argnums=(3,))(
      jnp.asarray(x), jnp.asarray(in_hw), jnp.asarray(out_hw), (31, 26)))
  for b in range(3):
    (ih, iw), (oh, ow) = in_hw[b], out_hw[b]
    want = torch_resize(x[b, :ih, :iw], (int(oh), int(ow)))
    np.testing.assert_allclose(out[b, :oh, :ow], want, rtol=1e-5, atol=1e-5)
    assert np.all(out[b, oh:] == 0) and np.all(out[b, :, ow:] == 0)
  # Nothing cropped: torch's resize of the whole image.
  full = evaluate.resize_dynamic(jnp.asarray(x), jnp.asarray([[12, 10]] * 3), jnp.asarray([[31, 26]] * 3), (31, 26))
  for b in range(3):
    np.testing.assert_allclose(full[b], torch_resize(x[b], (31, 26)), rtol=1e-5, atol=1e-5)


def test_flip_valid_mirrors_only_the_valid_columns():
  x = jnp.arange(2 * 1 * 5 * 1, dtype=jnp.float32).reshape(2, 1, 5, 1)
  out = np.asarray(evaluate.flip_valid(x, jnp.array([5, 3])))[..., 0]
  np.testing.assert_array_equal(out[0, 0], [4, 3, 2, 1, 0])
  np.testing.assert_array_equal(out[1, 0], [7, 6, 5, 8, 9])


def fake_model(images):
  """A deterministic, position-dependent 'model': stride-4 average pooling of a 2-class projection."""
  b, h, w, _ = images.shape
  feats = jnp.stack([images.sum(-1), images[..., 0] * 2 - images[..., 1]], -1)
  hp, wp = -(-h // 4) * 4, -(-w // 4) * 4
  feats = jnp.pad(feats, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  return feats.reshape(b, hp // 4, 4, wp // 4, 4, 2).mean((2, 4))


def mmseg_slide(x_hwc, crop, stride, encode_decode):
  """mmseg 0.x EncoderDecoder.slide_inference for one image (before the rescale),
  transcribed; encode_decode(crop) -> logits at the crop's size."""
  h_img, w_img, _ = x_hwc.shape
  (h_crop, w_crop), (h_stride, w_stride) = crop, stride
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  preds, count = 0.0, np.zeros((h_img, w_img, 1), np.float32)
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * h_stride, w_idx * w_stride
      y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
      y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
      crop_logit = encode_decode(x_hwc[y1:y2, x1:x2])
      preds = preds + np.pad(crop_logit, ((y1, h_img - y2), (x1, w_img - x2), (0, 0)))
      count[y1:y2, x1:x2] += 1
  assert (count == 0).sum() == 0
  return preds / count


def fake_encode_decode(c):
  return torch_resize(np.asarray(fake_model(jnp.asarray(c[None])))[0], c.shape[:2])


def test_slide_inference_matches_mmseg_per_image():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 40, 52, 3)).astype(np.float32)
  hw = np.array([[40, 52], [33, 45]], np.int32)
  images[1, 33:] = 0
  images[1, :, 45:] = 0
  out = np.asarray(jax.jit(evaluate.slide_logits, static_argnums=(0, 3, 4, 5))(
      fake_model, jnp.asarray(images), jnp.asarray(hw), (24, 24), (16, 16), 2))
  for b in range(2):
    h, w = hw[b]
    want = mmseg_slide(images[b, :h, :w], (24, 24), (16, 16), fake_encode_decode)
    np.testing.assert_allclose(out[b, :h, :w], want, rtol=1e-5, atol=1e-5)


def run_fake(x_hwc: np.ndarray) -> np.ndarray:
  """The stand-in model on one image [h, w, 3] -> its stride-4 logits (NumPy)."""
  return np.asarray(fake_model(jnp.asarray(x_hwc[None])))[0]


def test_multiscale_flip_averages_softmax_at_label_size():
  """The batched inference against torch alone: each term is the model's logits resized
  to its input (F.interpolate), flipped back, resized to the label size, softmax; the
  0.5 scale image is F.interpolate's. No function of the inference module computes the
  expectation."""
  rng = np.random.default_rng(0)
  image = rng.standard_normal((16, 24, 3)).astype(np.float32)
  images = jnp.asarray(image[None])
  hw, label_hw = jnp.array([[16, 24]]), jnp.array([[20, 30]])
  cfg = ml_collections.ConfigDict(dict(mode='whole', crop_size=(8, 8), stride=(4, 4),
                                       scales=(1.0,), flip=False))
  single = evaluate.inference(fake_model, images, hw, label_hw, (20, 30), cfg, 2)
  want = torch_resize(torch_resize(run_fake(image), (16, 24)), (20, 30))
  np.testing.assert_allclose(single[0], want, rtol=1e-5, atol=1e-5)
  cfg.flip = True
  cfg.scales = (1.0, 0.5)
  probs = np.asarray(evaluate.inference(fake_model, images, hw, label_hw, (20, 30), cfg, 2))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  half = torch_resize(image, (8, 12))  # floor(16 * 0.5 + 0.5), floor(24 * 0.5 + 0.5)
  terms = []
  for x in (image, half):
    for flip in (False, True):
      xi = np.ascontiguousarray(x[:, ::-1]) if flip else x
      logits = torch_resize(run_fake(xi), xi.shape[:2])
      logits = np.ascontiguousarray(logits[:, ::-1]) if flip else logits
      terms.append(torch.softmax(torch.from_numpy(torch_resize(logits, (20, 30))), -1).numpy())
  want = np.mean(terms, 0)
  np.testing.assert_allclose(probs[0], want, rtol=1e-5, atol=1e-6)
  # A missing scale would show. (A missing flip would not: this stand-in is equivariant
  # under a flip of a width divisible by 4; tests/test_eval_oracle.py checks flips.)
  assert np.abs(terms[2] - terms[0]).max() > 1e-2
  cfg.mode = 'bogus'
  with pytest.raises(ValueError, match='whole'):
    evaluate.inference(fake_model, images, hw, label_hw, (20, 30), cfg, 2)


# ------------------------------------------- per-image (reference-exact) evaluation

import cv2  # noqa: E402

from input_pipeline import pipeline  # noqa: E402
from semask_jax.evaluation import metrics  # noqa: E402

K = 3
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def stand_in(images):
  """Stride-4 'model' whose logits depend on position AND on the input size (zero
  padding of the input would change every logit), [B, ceil(h/4), ceil(w/4), 3]."""
  b, h, w, _ = images.shape
  feats = jnp.stack([images.sum(-1), images[..., 0] * 2 - images[..., 1], images[..., 2]], -1)
  hp, wp = -(-h // 4) * 4, -(-w // 4) * 4
  feats = jnp.pad(feats, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  feats = feats.reshape(b, hp // 4, 4, wp // 4, 4, 3).mean((2, 4))
  yy = jnp.arange(hp // 4, dtype=jnp.float32)[:, None]
  xx = jnp.arange(wp // 4, dtype=jnp.float32)[None, :]
  pos = jnp.stack([jnp.sin(0.7 * yy + 0.13 * h) * jnp.cos(0.5 * xx + 0 * yy),
                   jnp.cos(0.3 * xx + 0.11 * w) + 0 * yy,
                   jnp.sin(0.2 * (yy + xx))], -1)
  return feats + pos


def stand_in_probs(images):
  """Mask2Former-like: per-class scores in (0, 1) at the input size."""
  return jax.nn.sigmoid(resize_bilinear(stand_in(images), images.shape[1:3]))


def run_model(fn, x_hwc):
  return np.asarray(fn(jnp.asarray(x_hwc[None])))[0]


def mmseg_encode_decode(x_hwc):
  """EncoderDecoder.encode_decode: logits resized to the input size."""
  return torch_resize(run_model(stand_in, x_hwc), x_hwc.shape[:2])


def mmseg_test_images(image_u8, test_scale, ratios, flip):
  """MultiScaleFlipAug(img_ratios, flip) + Resize(keep_ratio) + RandomFlip + Normalize:
  (normalised image, flip) per augmentation, scales outer, flips inner."""
  out = []
  for r in ratios:
    long_edge, short_edge = int(test_scale[0] * r), int(test_scale[1] * r)
    h, w = image_u8.shape[:2]
    f = min(long_edge / max(h, w), short_edge / min(h, w))  # mmcv.rescale_size
    new_w, new_h = int(w * f + 0.5), int(h * f + 0.5)
    img = cv2.resize(image_u8, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    for fl in ((False, True) if flip else (False,)):
      x = img[:, ::-1] if fl else img
      # mmcv.imnormalize in NumPy (not input_pipeline's, which the code under test uses).
      x = (x.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
      out.append((np.ascontiguousarray(x, np.float32), fl))
  return out


def mmseg_aug_test(image_u8, test_scale, ratios, flip, mode='whole', crop=None, stride=None):
  """EncoderDecoder.inference per augmentation (rescale to ori_shape, softmax, flip back),
  summed and divided as aug_test: mean probabilities [H, W, K]."""
  ori = image_u8.shape[:2]
  total = None
  augs = mmseg_test_images(image_u8, test_scale, ratios, flip)
  for x, fl in augs:
    logit = (mmseg_encode_decode(x) if mode == 'whole'
             else mmseg_slide(x, crop, stride, mmseg_encode_decode))
    logit = torch_resize(logit, ori)
    out = torch.softmax(torch.from_numpy(logit), dim=-1).numpy()
    if fl:
      out = out[:, ::-1]
    total = out if total is None else total + out
  return total / len(augs) if len(augs) > 1 else total


def d2_semantic(image_u8, test_scale, pad):
  """detectron2 MaskFormer inference (single scale): normalise, pad with zeros to the
  size divisibility, scores at the padded size, crop to the image, resize to the original."""
  (x, _), = mmseg_test_images(image_u8, test_scale, (1.0,), False)
  h, w = x.shape[:2]
  xp = np.pad(x, ((0, -(-h // pad) * pad - h), (0, -(-w // pad) * pad - w), (0, 0)))
  r = run_model(stand_in_probs, xp)[:h, :w]
  return torch_resize(r, image_u8.shape[:2])


def data_cfg(test_scale):
  return ml_collections.ConfigDict(dict(test_scale=test_scale, mean=MEAN, std=STD))


def eval_cfg(**kw):
  c = dict(mode='whole', crop_size=(24, 24), stride=(16, 16), scales=(1.0,), flip=False)
  c.update(kw)
  return ml_collections.ConfigDict(c)


SIZES = [(37, 53), (61, 29), (50, 50)]  # original sizes: odd, portrait, square


def random_images(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def per_image_scores(inf, image_u8, test_scale, ratios):
  images = pipeline.scale_images(image_u8, data_cfg(test_scale), ratios)
  acc, n = inf.scores(images, image_u8.shape[:2])
  h, w = image_u8.shape[:2]
  return np.asarray(acc)[:h, :w] / n


@pytest.mark.parametrize('ratios,flip', [((1.0,), False), ((0.5, 0.75, 1.25), True)])
def test_per_image_whole_matches_mmseg(ratios, flip):
  test_scale = (56, 36)
  inf = evaluate.PerImageInference(lambda p: stand_in, {}, eval_cfg(scales=ratios, flip=flip), K)
  for image in random_images():
    want = mmseg_aug_test(image, test_scale, ratios, flip)
    got = per_image_scores(inf, image, test_scale, ratios)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    pred = inf.predict(pipeline.scale_images(image, data_cfg(test_scale), ratios), image.shape[:2])
    np.testing.assert_array_equal(pred, want.argmax(-1))
  # One model program per distinct input shape, whatever the flips.
  shapes = {x.shape[:2] for image in random_images()
            for x, _ in mmseg_test_images(image, test_scale, ratios, False)}
  assert inf.model_shapes == shapes


def test_padding_changes_the_stand_in():
  """The stand-in sees padding, so the tests above would catch a padded canvas."""
  (x, _), = mmseg_test_images(random_images()[0], (56, 36), (1.0,), False)
  padded = np.pad(x, ((0, 32 - x.shape[0] % 32), (0, 32 - x.shape[1] % 32), (0, 0)))
  a = mmseg_encode_decode(x)
  b = mmseg_encode_decode(padded)[:x.shape[0], :x.shape[1]]
  assert (a.argmax(-1) != b.argmax(-1)).mean() > 0.05


def test_per_image_slide_matches_mmseg_including_images_smaller_than_the_crop():
  test_scale = (56, 36)
  crop, stride = (24, 30), (16, 20)
  ratios = (0.5, 1.0)  # at 0.5 the images are smaller than the crop: one smaller window
  inf = evaluate.PerImageInference(lambda p: stand_in, {},
                                   eval_cfg(mode='slide', crop_size=crop, stride=stride,
                                            scales=ratios, flip=True), K)
  for image in random_images(1):
    want = mmseg_aug_test(image, test_scale, ratios, True, 'slide', crop, stride)
    got = per_image_scores(inf, image, test_scale, ratios)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert evaluate.slide_boxes((10, 13), (24, 30), (16, 20)) == [(0, 10, 0, 13)]


def test_per_image_pads_to_the_size_divisibility_for_mask2former():
  test_scale = (56, 36)
  inf = evaluate.PerImageInference(lambda p: stand_in_probs, {}, eval_cfg(), K,
                                   probabilities=True, pad_multiple=16)
  for image in random_images(2):
    want = d2_semantic(image, test_scale, 16)
    got = per_image_scores(inf, image, test_scale, (1.0,))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def cuda_bilinear(x, out_hw):
  """torch's CUDA upsample_bilinear2d (align_corners=False) in float32 NumPy:
  h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11)."""
  def taps(n_in, n_out):
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5))
                     - np.float32(0.5), np.float32(0))
    i0 = np.minimum(src.astype(np.int32), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)
  h0, h1, hl = taps(x.shape[0], out_hw[0])
  w0, w1, wl = taps(x.shape[1], out_hw[1])
  wl, hl = wl[None, :, None], hl[:, None, None]
  rows = lambda r: (1 - wl) * x[r][:, w0] + wl * x[r][:, w1]  # noqa: E731
  return (1 - hl) * rows(h0) + hl * rows(h1)


def test_resize_valid_is_torch_bilinear_for_traced_sizes():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 20, 3)).astype(np.float32)
  fn = jax.jit(evaluate.resize_valid, static_argnums=(3,))
  for (ih, iw), (oh, ow) in [((16, 20), (16, 20)), ((11, 7), (37, 53)), ((13, 19), (5, 4))]:
    out = np.asarray(fn(jnp.asarray(x), jnp.array([ih, iw]), jnp.array([oh, ow]), (64, 64)))
    # The formula of the reference's (CUDA) kernel: equal up to XLA's FMA contraction.
    np.testing.assert_allclose(out[:oh, :ow], cuda_bilinear(x[:ih, :iw], (oh, ow)),
                               rtol=0, atol=5e-7)
    # torch's CPU kernel rounds differently (weight products first, vectorised): a few
    # float32 ulps of the O(1) inputs.
    np.testing.assert_allclose(out[:oh, :ow], torch_resize(x[:ih, :iw], (oh, ow)),
                               rtol=0, atol=2e-6)


def test_evaluate_per_image_confusion_matrix_and_precompile():
  test_scale = (56, 36)
  ratios = (0.75, 1.0)
  images = random_images(3)
  rng = np.random.default_rng(4)
  labels = [rng.integers(0, K + 1, im.shape[:2]).astype(np.uint8) for im in images]
  for lab in labels:
    lab[lab == K] = 255
  inf = evaluate.PerImageInference(lambda p: stand_in, {}, eval_cfg(scales=ratios, flip=True), K)
  examples = [{'images': pipeline.scale_images(im, data_cfg(test_scale), ratios), 'label': lab}
              for im, lab in zip(images, labels)]
  items = [(pipeline.scale_sizes(im.shape[:2], data_cfg(test_scale), ratios), im.shape[:2])
           for im in images]
  res = evaluate.evaluate_per_image(inf, examples, ['a', 'b', 'c'], precompile_items=items)
  compiled = len(inf._compiled)  # pylint: disable=protected-access
  want_cm = np.zeros((K, K), np.int64)
  for im, lab in zip(images, labels):
    pred = mmseg_aug_test(im, test_scale, ratios, True).argmax(-1)
    ok = lab != 255
    np.add.at(want_cm, (lab[ok].astype(int), pred[ok]), 1)
  want = metrics.compute_metrics(want_cm, ['a', 'b', 'c'])
  assert res['mIoU'] == pytest.approx(want['mIoU'], abs=1e-12)
  assert res['num_pixels'] == int((np.concatenate([l.ravel() for l in labels]) != 255).sum())
  assert res['num_images'] == 3
  assert res['num_shapes'] == len({hw for sizes, _ in items for hw in sizes})
  assert res['compile_seconds'] > 0
  assert len(inf._compiled) == compiled  # pylint: disable=protected-access  (all ahead of time)


def test_mode_eval_with_a_tiny_semask_equals_per_image_reference(tmp_path, monkeypatch):
  """--mode=eval's evaluation (eval_and_predict.evaluate_per_image) on a real tiny SeMask:
  the mIoU of running the model on each image alone (batch 1, its own size) and the
  mmseg test steps written out here."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from semask_jax import compile_cache
  from semask_jax.evaluation import evaluator as eval_and_predict  # pylint: disable=g-import-not-at-top
  from semask_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from semask_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  import input_pipeline  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.synthetic.num_eval = 3
  config.data.test_scale = (45, 37)  # 40x48 scenes -> 37x44 (odd sizes)
  config.eval.scales = (1.0, 0.75)
  config.eval.flip = True
  model = state_lib.create_model(config)
  state, graphdef, rest, _, _ = state_lib.init_train_state(
      config, model, sharding_lib.make_mesh(jax.devices()[:1]))
  monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / 'cache'))
  try:
    res = eval_and_predict.evaluate_per_image(config, graphdef, rest, state)
  finally:
    compile_cache.disable()
  segment = jax.jit(state_lib.merge_model(graphdef, state.params, state.batch_stats, rest).segment)
  k = config.model.num_classes
  cm = np.zeros((k, k), np.int64)
  source = pipeline.data_source(config.data, config.data.eval_split)
  shapes = set()
  for i in range(len(source)):
    image, label = source[i]['image'], source[i]['label']
    total = None
    for x, fl in mmseg_test_images(image, config.data.test_scale, config.eval.scales, True):
      shapes.add(x.shape[:2])
      logit = torch_resize(np.asarray(segment(jnp.asarray(x[None])))[0], x.shape[:2])
      prob = torch.softmax(torch.from_numpy(torch_resize(logit, image.shape[:2])), -1).numpy()
      prob = prob[:, ::-1] if fl else prob
      total = prob if total is None else total + prob
    pred = (total / 4).argmax(-1)
    ok = label != 255
    np.add.at(cm, (label[ok].astype(int), pred[ok]), 1)
  names = list(input_pipeline.dataset_info(config.data.name).class_names)
  want = metrics.compute_metrics(cm, names)
  assert res['mIoU'] == pytest.approx(want['mIoU'], abs=1e-12)
  assert res['aAcc'] == pytest.approx(want['aAcc'], abs=1e-12)
  assert res['num_images'] == 3 and res['num_shapes'] == len(shapes) == 2
