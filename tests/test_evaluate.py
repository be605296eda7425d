"""Inference helpers against torch / a NumPy transcription of mmseg's slide_inference."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semask_jax import evaluate
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
  # Same numbers as the model's static resize when nothing is cropped.
  full = evaluate.resize_dynamic(jnp.asarray(x), jnp.asarray([[12, 10]] * 3), jnp.asarray([[31, 26]] * 3), (31, 26))
  np.testing.assert_allclose(full, resize_bilinear(jnp.asarray(x), (31, 26)), rtol=1e-5, atol=1e-5)


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


def mmseg_slide(img_hwc, crop, stride):
  """mmseg 0.x EncoderDecoder.slide_inference for one image (numpy/torch)."""
  h_img, w_img, _ = img_hwc.shape
  (h_crop, w_crop), (h_stride, w_stride) = crop, stride
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  preds = np.zeros((h_img, w_img, 2), np.float32)
  count = np.zeros((h_img, w_img, 1), np.float32)
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * h_stride, w_idx * w_stride
      y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
      y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
      c = img_hwc[y1:y2, x1:x2]
      logit = np.asarray(fake_model(jnp.asarray(c[None])))[0]
      preds[y1:y2, x1:x2] += torch_resize(logit, c.shape[:2])
      count[y1:y2, x1:x2] += 1
  return preds / count


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
    want = mmseg_slide(images[b, :h, :w], (24, 24), (16, 16))
    np.testing.assert_allclose(out[b, :h, :w], want, rtol=1e-5, atol=1e-5)


def test_multiscale_flip_averages_softmax_at_label_size():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((1, 16, 24, 3)).astype(np.float32))
  hw, label_hw = jnp.array([[16, 24]]), jnp.array([[20, 30]])
  cfg = ml_collections.ConfigDict(dict(mode='whole', crop_size=(8, 8), stride=(4, 4),
                                       scales=(1.0,), flip=False))
  single = evaluate.inference(fake_model, images, hw, label_hw, (20, 30), cfg, 2)
  want = torch_resize(np.asarray(evaluate.whole_logits(fake_model, images))[0], (20, 30))
  np.testing.assert_allclose(single[0], want, rtol=1e-5, atol=1e-5)
  cfg.flip = True
  cfg.scales = (1.0, 0.5)
  probs = np.asarray(evaluate.inference(fake_model, images, hw, label_hw, (20, 30), cfg, 2))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  flipped = evaluate.whole_logits(fake_model, images[:, :, ::-1])[:, :, ::-1]
  half = evaluate.resize_dynamic(images, hw, jnp.array([[8, 12]]), (8, 12))
  terms = [evaluate.whole_logits(fake_model, images), flipped,
           evaluate.whole_logits(fake_model, half),
           evaluate.whole_logits(fake_model, half[:, :, ::-1])[:, :, ::-1]]
  want = np.mean([jax.nn.softmax(jnp.asarray(torch_resize(np.asarray(t)[0], (20, 30))), -1)
                  for t in terms], 0)
  np.testing.assert_allclose(probs[0], want, rtol=1e-5, atol=1e-6)
  cfg.mode = 'bogus'
  with pytest.raises(ValueError, match='whole'):
    evaluate.inference(fake_model, images, hw, label_hw, (20, 30), cfg, 2)
