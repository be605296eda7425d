"""Prediction on image files: colour masks with the data set's palette and overlays, at the original size.

Preprocessing is the eval pipeline's (keep-ratio resize to `test_scale`,
normalisation) and inference is `evaluate.inference`, so predictions match the
evaluated numbers (whole / sliding window, multi-scale + flip per config.eval).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

import input_pipeline
from input_pipeline import transforms as T
from semask_jax import evaluate as evaluate_lib
from semask_jax.cli import InputError
from semask_jax.models import model_class
from semask_jax.state import merge_model

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(inputs: str) -> list[str]:
  """An image path, or the image files (sorted) of a folder."""
  if os.path.isfile(inputs):
    return [inputs]
  if os.path.isdir(inputs):
    files = sorted(os.path.join(inputs, f) for f in os.listdir(inputs)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in {inputs!r}')
    return files
  raise FileNotFoundError(f'prediction input {inputs!r} is neither a file nor a folder')


def load_rgb(path: str) -> np.ndarray:
  """uint8 [H, W, 3]."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except OSError as e:
    raise InputError(f'cannot read image {path!r}: {e}') from e


def check_readable(paths: list[str]) -> None:
  """Opens each image's header (cheap), so that an unreadable file fails before the model is built."""
  for path in paths:
    try:
      with Image.open(path):
        pass
    except OSError as e:
      raise InputError(f'cannot read image {path!r}: {e}') from e


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """Class ids [H, W] -> RGB uint8 [H, W, 3]; ids outside the palette (e.g. 255) are black."""
  palette = np.asarray(palette, np.uint8)
  out = np.zeros(mask.shape + (3,), np.uint8)
  ok = (mask >= 0) & (mask < len(palette))
  out[ok] = palette[mask[ok]]
  return out


def overlay(image: np.ndarray, color: np.ndarray, opacity: float = 0.5) -> np.ndarray:
  """mmseg show_result: image * (1 - opacity) + colour mask * opacity."""
  return (image.astype(np.float32) * (1 - opacity) + color.astype(np.float32) * opacity
          ).round().astype(np.uint8)


def preprocess(image: np.ndarray, data_cfg: ml_collections.ConfigDict,
               pad_multiple: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [H, W, 3] -> (normalised [1, Hp, Wp, 3] zero-padded, resized size int32 [1, 2])."""
  hw = T.rescale_size(image.shape[:2], tuple(data_cfg.test_scale))
  x = T.normalize(T.resize_bilinear(image, hw), tuple(data_cfg.mean), tuple(data_cfg.std))
  pad = tuple(-(-s // pad_multiple) * pad_multiple for s in hw)
  return T.pad_to(x, pad, 0.0)[None], np.asarray([hw], np.int32)


def make_predict_fn(config: ml_collections.ConfigDict, graphdef: Any, rest: Any
                    ) -> Callable[..., jax.Array]:
  """(params, batch_stats, image [1,Hp,Wp,3], image_hw [1,2], out_shape) -> class ids [1, H, W]."""
  @functools.partial(jax.jit, static_argnums=(4,))
  def fn(params, batch_stats, image, image_hw, out_shape):
    model = merge_model(graphdef, params, batch_stats, rest)
    out_hw = jnp.asarray([out_shape], jnp.int32)
    scores = evaluate_lib.inference(
        model.segment, image, image_hw, out_hw, out_shape, config.eval,
        config.model.num_classes,
        probabilities=model_class(config.model).SCORES_ARE_PROBABILITIES)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)

  return fn


def predict_paths(config: ml_collections.ConfigDict, graphdef: Any, rest: Any, params: Any,
                  batch_stats: Any, inputs: str, output_dir: str) -> list[str]:
  """Writes <name>_mask.png (palette colours) and <name>_overlay.png per input; returns the paths."""
  files = list_images(inputs)
  palette = input_pipeline.dataset_info(config.data.name).palette
  fn = make_predict_fn(config, graphdef, rest)
  written = []
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
  for path in files:
    image = load_rgb(path)
    x, hw = preprocess(image, config.data)
    pred = fn(params, batch_stats, x, hw, tuple(image.shape[:2]))
    pred = np.asarray(pred.addressable_data(0) if not pred.is_fully_addressable else pred)[0]
    if jax.process_index() != 0:
      continue
    color = colorize(pred, palette)
    stem = os.path.splitext(os.path.basename(path))[0]
    for suffix, arr in (('mask', color), ('overlay', overlay(image, color, config.predict.opacity))):
      out = os.path.join(output_dir, f'{stem}_{suffix}.png')
      Image.fromarray(arr).save(out)
      written.append(out)
  logging.info('Wrote %d prediction images to %s', len(written), output_dir)
  return written
