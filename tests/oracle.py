"""The reference's test-time computation per image, written independently of
semask_jax.evaluation and input_pipeline: the expectations of the evaluation and
prediction tests.

mmseg 0.x (SeMask-FPN): MultiScaleFlipAug's keep-ratio resize (mmcv.rescale_size, cv2
bilinear), mmcv normalisation, EncoderDecoder.encode_decode (logits resized to the input
size), whole or slide_inference, logits resized to the original size, softmax, flipped
back, averaged over the augmentations, argmax. detectron2 (SeMask-Mask2Former): the
normalised image zero-padded to the size divisibility (32), the model's semantic scores
cropped back to the image and resized to the original size; several augmentations
average the scores as they are (probabilities).

The only project code run here is the model's own forward (`forward`: normalised images
[1, H, W, 3] -> scores [1, h, w, K], any stride); resizes are torch's
F.interpolate(bilinear, align_corners=False) on CPU.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

Forward = Callable[[np.ndarray], np.ndarray]


def torch_resize(x_hwc: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """[h, w, C] -> [size[0], size[1], C], torch bilinear (align_corners=False), float32."""
  t = torch.from_numpy(np.array(x_hwc, np.float32)).permute(2, 0, 1)[None]
  out = F.interpolate(t, size=tuple(int(s) for s in size), mode='bilinear', align_corners=False)
  return out[0].permute(1, 2, 0).numpy()


def rescale_size(hw: Sequence[int], scale: Sequence[int]) -> tuple[int, int]:
  """mmcv.rescale_size with keep_ratio: scale (long, short) bound -> new (h, w)."""
  h, w = hw
  long_edge, short_edge = max(scale), min(scale)
  f = min(long_edge / max(h, w), short_edge / min(h, w))
  return int(h * f + 0.5), int(w * f + 0.5)


def mmseg_test_images(image_u8: np.ndarray, test_scale: Sequence[int], ratios: Sequence[float],
                      mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
  """One normalised float32 image per ratio: test_scale * ratio (int of each edge), keep
  ratio, cv2 bilinear, (x - mean) / std."""
  out = []
  for r in ratios:
    scale = (int(test_scale[0] * r), int(test_scale[1] * r))
    h, w = rescale_size(image_u8.shape[:2], scale)
    img = cv2.resize(image_u8, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    out.append(((img - np.float32(mean)) / np.float32(std)).astype(np.float32))
  return out


def whole_scores(forward: Forward, x: np.ndarray, pad: int = 0) -> np.ndarray:
  """Scores [h, w, K] at the size of x [h, w, 3]: the model on x (zero-padded to a
  multiple of `pad`, then cropped back), resized to the input size."""
  h, w = x.shape[:2]
  if pad:
    x = np.pad(x, ((0, -h % pad), (0, -w % pad), (0, 0)))
  out = np.asarray(forward(x[None]), np.float32)[0]
  return torch_resize(out, x.shape[:2])[:h, :w]


def slide_scores(forward: Forward, x: np.ndarray, crop: Sequence[int], stride: Sequence[int],
                 pad: int = 0) -> np.ndarray:
  """mmseg slide_inference on one image: windows' scores summed where they overlap, / count."""
  h, w = x.shape[:2]
  (ch, cw), (sh, sw) = crop, stride
  rows = max(h - ch + sh - 1, 0) // sh + 1
  cols = max(w - cw + sw - 1, 0) // sw + 1
  preds, count = None, np.zeros((h, w, 1), np.float32)
  for i in range(rows):
    for j in range(cols):
      y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
      y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
      s = whole_scores(forward, x[y1:y2, x1:x2], pad)
      if preds is None:
        preds = np.zeros((h, w, s.shape[-1]), np.float32)
      preds[y1:y2, x1:x2] += s
      count[y1:y2, x1:x2] += 1
  assert count.min() > 0
  return preds / count


def softmax(x: np.ndarray) -> np.ndarray:
  return torch.softmax(torch.from_numpy(np.array(x, np.float32)), dim=-1).numpy()


def probabilities(forward: Forward, images: Sequence[np.ndarray], out_hw: Sequence[int], *,
                  flip: bool, scores_are_probabilities: bool, pad: int = 0,
                  mode: str = 'whole', crop: Sequence[int] = (), stride: Sequence[int] = ()
                  ) -> np.ndarray:
  """Mean probabilities [H, W, K] at the original size out_hw over images (one per scale)
  x flips (scales outer, flips inner)."""
  terms = []
  for x in images:
    for fl in ((False, True) if flip else (False,)):
      xi = np.ascontiguousarray(x[:, ::-1]) if fl else x
      s = (whole_scores(forward, xi, pad) if mode == 'whole'
           else slide_scores(forward, xi, crop, stride, pad))
      s = torch_resize(s, out_hw)
      p = s if scores_are_probabilities else softmax(s)
      terms.append(p[:, ::-1] if fl else p)
  return np.mean(np.stack(terms), axis=0, dtype=np.float64).astype(np.float32)


def assert_same_class_map(pred: np.ndarray, probs: np.ndarray, *, margin: float = 1e-5,
                          max_fraction: float = 1e-2) -> None:
  """pred equals argmax(probs) except where the two best classes are within `margin`
  (float rounding decides a tie); such pixels at most `max_fraction` of the image."""
  pred = np.asarray(pred)
  want = probs.argmax(-1)
  assert pred.shape == want.shape, (pred.shape, want.shape)
  top2 = np.sort(probs, axis=-1)[..., -2:]
  tie = (top2[..., 1] - top2[..., 0]) < margin
  differ = pred != want
  assert not (differ & ~tie).any(), f'{int((differ & ~tie).sum())} pixels differ off ties'
  assert tie.mean() <= max_fraction, f'{tie.mean():.2%} of pixels are near-ties: a weak check'
