"""A built-in segmentation data set generated from a seed: no files, no download.

Each scene is a textured background with a few textured shapes. A shape's
class is set by its shape AND its colour together: every shape and every
colour occurs both in some object class and in some distractor pair that is
labelled background, so neither cue alone is enough and the model must learn
the conjunction. Each shape also carries its own surface pattern (circles
smooth, squares checkered, triangles striped), so that the shape is visible
inside the object and not only along its outline: a small model learns the
conjunction in a few minutes on a CPU. Scene i of a split is a pure function of (seed, split, i);
train and eval use different SeedSequence streams, so they never overlap.
"""
from __future__ import annotations

import numpy as np

DEFAULT_NUM_CLASSES = 6
SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 1}
COLOURS = {'red': (205, 45, 40), 'green': (45, 175, 60), 'blue': (45, 75, 215)}
# Object classes 1..K-1 take the first K-1 pairs; the rest are distractors
# (labelled background). The order keeps both cues ambiguous for K >= 4.
PAIRS = (('circle', 'red'), ('square', 'green'), ('triangle', 'blue'),
         ('circle', 'green'), ('square', 'blue'), ('triangle', 'red'),
         ('circle', 'blue'), ('square', 'red'), ('triangle', 'green'))
MAX_NUM_CLASSES = len(PAIRS)  # background + 8 object pairs, >= 1 pair left as distractor


def class_names_and_palette(num_classes: int) -> tuple[list[str], np.ndarray]:
  """Class names ('background', 'red circle', ...) and an RGB palette [K, 3]."""
  _check_num_classes(num_classes)
  names = ['background'] + [f'{c} {s}' for s, c in PAIRS[:num_classes - 1]]
  palette = [(0, 0, 0)] + [COLOURS[c] for _, c in PAIRS[:num_classes - 1]]
  # Brighten repeated colours so that the palette stays distinguishable.
  palette = np.asarray(palette, np.int32)
  for k in range(1, num_classes):
    palette[k] = np.minimum(palette[k] + 40 * ((k - 1) // 3), 255)
  return names, palette.astype(np.uint8)


def _check_num_classes(num_classes: int) -> None:
  if not 2 <= num_classes <= MAX_NUM_CLASSES:
    raise ValueError(f'synthetic num_classes must be in [2, {MAX_NUM_CLASSES}], '
                     f'got {num_classes}')


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
  """Low-frequency noise in [0, 1): a coarse grid upsampled bilinearly. [h, w]."""
  gh, gw = h // cell + 2, w // cell + 2
  grid = rng.random((gh, gw), dtype=np.float32)
  y = np.arange(h, dtype=np.float32) / cell
  x = np.arange(w, dtype=np.float32) / cell
  y0, x0 = y.astype(int), x.astype(int)
  fy, fx = (y - y0)[:, None], (x - x0)[None, :]
  g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
  g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
  return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx
          + g10 * fy * (1 - fx) + g11 * fy * fx)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
                r: float, angle: float) -> np.ndarray:
  """Boolean mask of a circle / rotated square / rotated triangle. [h, w]."""
  dy, dx = yy - cy, xx - cx
  if shape == 'circle':
    return dy * dy + dx * dx <= r * r
  c, s = np.cos(angle), np.sin(angle)
  u, v = c * dx + s * dy, -s * dx + c * dy  # rotate into the shape frame
  if shape == 'square':
    half = r * 0.85
    return (np.abs(u) <= half) & (np.abs(v) <= half)
  if shape == 'triangle':  # equilateral, circumradius 1.2 r
    rr = 1.2 * r
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):  # three half-planes, normals at 90 + 120 k degrees
      a = np.pi / 2 + 2 * np.pi * k / 3
      inside &= (np.cos(a) * u + np.sin(a) * v) <= rr / 2
    return inside
  raise ValueError(f'unknown shape {shape!r}')


def _pattern(shape: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
             ) -> np.ndarray:
  """The surface pattern of a shape in [-1, 1]: smooth, checkered or striped. [h, w]."""
  theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
  u = np.cos(theta) * xx + np.sin(theta) * yy
  v = -np.sin(theta) * xx + np.cos(theta) * yy
  if shape == 'circle':  # smooth: a faint, slow shading
    return 0.3 * np.sin(0.15 * u + phase)
  period = rng.uniform(9.0, 12.0)  # several pixels per 4x4 patch: no aliasing
  if shape == 'square':  # checkerboard
    return np.sign(np.sin(2 * np.pi * u / period + phase) * np.sin(2 * np.pi * v / period))
  return np.sin(2 * np.pi * u / period + phase)  # triangle: stripes


def generate_scene(seed: int, split: str, index: int, *, height: int = 80, width: int = 96,
                   num_classes: int = DEFAULT_NUM_CLASSES, max_objects: int = 5
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Scene `index` of `split`: (uint8 RGB [h, w, 3], uint8 train-id label [h, w])."""
  _check_num_classes(num_classes)
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  h, w = height, width
  # Background: muted (low-saturation) colours, blotchy low-frequency field plus grain.
  base = rng.uniform(80, 160, size=3).astype(np.float32)
  field = _smooth_noise(rng, h, w, cell=max(4, min(h, w) // 5))[..., None]
  tint = rng.uniform(-25, 25, size=3).astype(np.float32)
  image = base + (field - 0.5) * tint * 2 + rng.normal(0, 8, (h, w, 3)).astype(np.float32)
  label = np.zeros((h, w), np.uint8)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  num_objects = int(rng.integers(2, max_objects + 1))
  min_r, max_r = 0.13 * min(h, w), 0.28 * min(h, w)
  for _ in range(num_objects):
    # 80% object classes, 20% distractor pairs (labelled background).
    if rng.random() < 0.8:
      k = int(rng.integers(1, num_classes))
      shape, colour = PAIRS[k - 1]
    else:
      d = int(rng.integers(num_classes - 1, len(PAIRS)))
      k = 0
      shape, colour = PAIRS[d]
    r = rng.uniform(min_r, max_r)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    mask = _shape_mask(shape, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
    if not mask.any():
      continue
    # Texture: jittered colour, the shape's surface pattern, grain.
    rgb = np.asarray(COLOURS[colour], np.float32) + rng.uniform(-20, 20, size=3)
    tex = rgb * (1.0 + 0.3 * _pattern(shape, rng, yy, xx)[..., None])
    tex = tex + rng.normal(0, 8, (h, w, 3))
    image = np.where(mask[..., None], tex, image)
    label[mask] = k
  return np.clip(image, 0, 255).astype(np.uint8), label


class SyntheticSource:
  """grain RandomAccessDataSource of generated scenes (same record layout as TFDS)."""

  def __init__(self, split: str, num_examples: int, *, seed: int = 0, height: int = 80,
               width: int = 96, num_classes: int = DEFAULT_NUM_CLASSES, max_objects: int = 5):
    if split not in SPLIT_IDS:
      raise ValueError(f'synthetic split must be one of {sorted(SPLIT_IDS)}, got {split!r}')
    _check_num_classes(num_classes)
    self.split, self.num_examples, self.seed = split, num_examples, seed
    self.kw = dict(height=height, width=width, num_classes=num_classes, max_objects=max_objects)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    image, label = generate_scene(self.seed, self.split, index, **self.kw)
    return {'image': image, 'label': label, 'file_name': f'synthetic/{self.split}/{index:05d}',
            'height': np.int32(image.shape[0]), 'width': np.int32(image.shape[1])}

  def __repr__(self) -> str:
    return f'SyntheticSource({self.split!r}, n={self.num_examples}, seed={self.seed}, {self.kw})'
