"""Prediction on image files: colour masks with the data set's palette and overlays, at the original size.

Prediction computes what `--mode=eval` computes, with the same code
(evaluation.bucketed: the reference's test per image, batched per bucket canvas): the
eval pipeline's decode, resize and normalisation per config.eval.scales ratio, each
image at its own size (no padding but the Mask2Former model's own), whole / sliding
window, multi-scale + flip per config.eval, scores at the original size, argmax.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

import input_pipeline
from input_pipeline import pipeline
from input_pipeline import transforms as T
from semask_jax.cli import InputError, PathNotFoundError
from semask_jax import sharding as sharding_lib
from semask_jax.evaluation import bucketed

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(inputs: str) -> list[str]:
  """An image path, or the image files (sorted) of a folder."""
  if os.path.isfile(inputs):
    return [inputs]
  if os.path.isdir(inputs):
    files = sorted(os.path.join(inputs, f) for f in os.listdir(inputs)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise PathNotFoundError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in {inputs!r}')
    return files
  raise PathNotFoundError(f'prediction input {inputs!r} is neither a file nor a folder')


def load_rgb(path: str, recipe: str = 'mmseg') -> np.ndarray:
  """uint8 RGB [H, W, 3], decoded as the evaluation decodes (mmcv's cv2.imdecode, or PIL
  for the detectron2 recipe), EXIF orientation applied."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
    decode = T.decode_image_pil if recipe == 'detectron2' else T.decode_image
    return decode(data, f'image {path!r}')
  except (OSError, ValueError) as e:
    raise InputError(f'cannot read image {path!r}: {e}') from e


def output_names(files: list[str]) -> list[str]:
  """Each input's output name: its stem (photo.jpg -> photo_mask.png), or, where two inputs
  share a stem, the stem and the extension (a.jpg, a.png -> a_jpg_mask.png, a_png_mask.png),
  so that no prediction overwrites another."""
  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  shared = {s for s in stems if stems.count(s) > 1}
  return [f'{s}_{os.path.splitext(f)[1].lstrip(".")}' if s in shared else s
          for s, f in zip(stems, files)]


def image_size(path: str) -> tuple[int, int]:
  """(height, width) of an image file as load_rgb decodes it (EXIF orientation applied),
  from its header; an unreadable file is refused in one line."""
  try:
    with Image.open(path) as im:
      return T.oriented_size(im)
  except OSError as e:
    raise InputError(f'cannot read image {path!r}: {e}') from e


def check_readable(paths: list[str]) -> None:
  """Opens each image's header (cheap), so that an unreadable file fails before the model is built."""
  for path in paths:
    image_size(path)


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


def scale_images(image: np.ndarray, config: ml_collections.ConfigDict) -> list[np.ndarray]:
  """uint8 [H, W, 3] -> the evaluation's test images (one normalised [h, w, 3] per
  config.eval.scales ratio, each at its own size: no padding)."""
  ratios = tuple(float(r) for r in config.eval.scales)
  return pipeline.scale_images(image, config.data, ratios,
                               tta=pipeline.is_tta(ratios, config.eval.flip))


def predict_paths(config: ml_collections.ConfigDict, graphdef: Any, rest: Any, params: Any,
                  batch_stats: Any, inputs: str, output_dir: str) -> list[str]:
  """Writes <name>_mask.png (palette colours) and <name>_overlay.png per input (name:
  output_names); returns the paths."""
  files = list_images(inputs)
  written = []
  if jax.process_index() != 0:  # process 0 predicts and writes every file
    return written
  palette = input_pipeline.dataset_info(config.data.name).palette
  local = lambda x: x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x  # noqa: E731
  params, batch_stats = jax.tree.map(local, (params, batch_stats))
  recipe = config.data.recipe
  # Batched per bucket canvas on this process's devices: process 0 alone predicts.
  inference = bucketed.make_bucketed_inference(config, graphdef, rest, params, batch_stats,
                                               sharding_lib.make_mesh(jax.local_devices()))
  ratios = tuple(float(r) for r in config.eval.scales)
  tta = pipeline.is_tta(ratios, config.eval.flip)
  sizes = [image_size(path) for path in files]  # headers only: each image decoded once
  items = [(pipeline.scale_sizes(hw, config.data, ratios, tta=tta), hw) for hw in sizes]

  def load(i: int) -> dict[str, Any]:
    rgb = load_rgb(files[i], recipe)
    if rgb.shape[:2] != sizes[i]:
      raise InputError(f'image {files[i]!r} decodes to {rgb.shape[:2]}, its header says '
                       f'{sizes[i]}')
    return {'images': scale_images(rgb, config), 'rgb': rgb}

  preds = ((i, pred, ex['rgb'])
           for i, pred, ex in bucketed.predict_bucketed(inference, items, load))
  os.makedirs(output_dir, exist_ok=True)
  stems = output_names(files)
  for i, pred, image in preds:
    stem = stems[i]
    color = colorize(pred, palette)
    for suffix, arr in (('mask', color), ('overlay', overlay(image, color, config.predict.opacity))):
      out = os.path.join(output_dir, f'{stem}_{suffix}.png')
      Image.fromarray(arr).save(out)
      written.append(out)
  logging.info('Wrote %d prediction images to %s', len(written), output_dir)
  return written
