"""Bucket canvases for the exact batched evaluation: which canvas each test image uses.

A canvas side is taken from a fixed ladder: multiples of `multiple` (32) spaced like a
float with a few mantissa steps per octave (steps_per_octave 4: 256, 320, 384, 448, 512,
640, 768, 896, 1024, ...), so that any side wastes at most 1 / steps_per_octave of its
length and the number of distinct canvases grows with the log of the size range, not
with the number of sizes. An image of (h, w) runs in the canvas (ladder(h), ladder(w));
images sharing a canvas are batched, each with its own valid size (models/valid.py).
Nothing here compiles or reads images: eval_plan and the evaluator share it.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Sequence

import ml_collections

# The paper's multi-scale test ratios (mmseg / detectron2 ADE20K configs).
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
DEFAULT_STEPS_PER_OCTAVE = 4
DEFAULT_MULTIPLE = 32


@functools.lru_cache(maxsize=None)
def ladder(steps_per_octave: int = DEFAULT_STEPS_PER_OCTAVE, multiple: int = DEFAULT_MULTIPLE,
           max_side: int = 1 << 15) -> tuple[int, ...]:
  """The canvas sides: every multiple of `multiple` up to multiple * steps_per_octave, then
  steps_per_octave evenly spaced multiples per octave (rounded up to `multiple`)."""
  if steps_per_octave < 1 or multiple < 32 or multiple % 32:
    raise ValueError(f"config.eval.bucket_steps_per_octave ({steps_per_octave}) must be >= 1 "
                     f"and config.eval.bucket_multiple ({multiple}) a multiple of 32 (the "
                     "backbone's total stride: every stage's canvas an exact halving)")
  sides = {multiple * k for k in range(1, steps_per_octave + 1)}
  base = multiple * steps_per_octave
  while base < max_side:
    step = base // steps_per_octave
    sides.update(-(-(base + k * step) // multiple) * multiple for k in range(1, steps_per_octave + 1))
    base *= 2
  return tuple(sorted(sides))


def ceil_side(side: int, sides: Sequence[int]) -> int:
  """The smallest ladder side >= side (beyond the ladder: side rounded up to its last
  step's multiple)."""
  i = bisect.bisect_left(sides, side)
  if i < len(sides):
    return sides[i]
  return -(-side // sides[-1]) * sides[-1]


@dataclasses.dataclass(frozen=True)
class BucketSpec:
  """How canvases are chosen: config.eval.bucket_steps_per_octave / bucket_multiple;
  `pad_multiple`: the model's own pad (Mask2Former's 32, applied before bucketing)."""
  steps_per_octave: int = DEFAULT_STEPS_PER_OCTAVE
  multiple: int = DEFAULT_MULTIPLE
  pad_multiple: int = 0

  @property
  def sides(self) -> tuple[int, ...]:
    return ladder(self.steps_per_octave, self.multiple)

  @property
  def out_sides(self) -> tuple[int, ...]:
    """The ladder of the output canvases (scores at the original sizes; the small resize,
    softmax and metric programs are keyed by them): half the steps per octave, as these
    programs are cheap to pad and costly to multiply (on the 2000 ADE20K val sizes,
    single scale, one image per batch: 56 resize programs and 21 output canvases instead
    of 98 and 56, padded pixels x1.18 instead of x1.11)."""
    return ladder(max(1, self.steps_per_octave // 2), self.multiple)

  def model_size(self, hw: Sequence[int]) -> tuple[int, int]:
    """The size the model sees for a test image of size hw (the model's own pad)."""
    m = self.pad_multiple
    return tuple(int(v) if not m else -(-int(v) // m) * m for v in hw)

  def canvas(self, hw: Sequence[int]) -> tuple[int, int]:
    """The bucket canvas of a test image of size hw."""
    h, w = self.model_size(hw)
    return ceil_side(h, self.sides), ceil_side(w, self.sides)


def bucket_spec(config: ml_collections.ConfigDict, pad_multiple: int) -> BucketSpec:
  ev = config.eval
  return BucketSpec(int(ev.get('bucket_steps_per_octave', DEFAULT_STEPS_PER_OCTAVE)),
                    int(ev.get('bucket_multiple', DEFAULT_MULTIPLE)), int(pad_multiple))


@dataclasses.dataclass
class Plan:
  """What an evaluation over a list of original sizes compiles and pads."""
  canvases: dict[tuple[int, int], int]  # canvas -> number of terms (image x scale)
  valid_pixels: int
  canvas_pixels: int

  @property
  def programs(self) -> int:
    return len(self.canvases)

  @property
  def padded_ratio(self) -> float:
    return self.canvas_pixels / max(self.valid_pixels, 1)


def default_max_programs(num_scales: int) -> int:
  """config.eval.bucket_max_programs by default: about 8 canvases per test scale, at
  least 12."""
  return max(12, 8 * int(num_scales))


def assign(term_sizes: Sequence[Sequence[int]], spec: BucketSpec,
           max_programs: int | None = None) -> dict[tuple[int, int], tuple[int, int]]:
  """Model size -> canvas for every size of the list: its ladder canvas, then, while more
  than max_programs canvases are used, the canvas whose move costs the fewest extra
  pixels (its terms times the area difference) moves into the smallest-cost used canvas
  that holds it. Deterministic in the list (every process computes the same)."""
  counts: dict[tuple[int, int], int] = {}
  to_canvas: dict[tuple[int, int], tuple[int, int]] = {}
  for hw in term_sizes:
    m = spec.model_size(hw)
    c = spec.canvas(hw)
    to_canvas[m] = c
    counts[c] = counts.get(c, 0) + 1
  merged: dict[tuple[int, int], tuple[int, int]] = {c: c for c in counts}
  while max_programs is not None and len(counts) > max_programs:
    best = None
    for c, n in counts.items():
      for d in counts:
        if d != c and d[0] >= c[0] and d[1] >= c[1]:
          cost = n * (d[0] * d[1] - c[0] * c[1])
          if best is None or (cost, c, d) < best:
            best = (cost, c, d)
    if best is None:
      break  # no used canvas holds another: the ladder's count stands
    _, c, d = best
    counts[d] += counts.pop(c)
    for k, v in merged.items():
      if v == c:
        merged[k] = d
  return {m: merged[c] for m, c in to_canvas.items()}


def plan(term_sizes: Iterable[Sequence[int]], spec: BucketSpec,
         max_programs: int | None = None) -> Plan:
  """The canvases that test images of the given sizes use (one model program each) and
  the padding: canvas pixels over the pixels the reference's model sees."""
  term_sizes = [tuple(int(v) for v in hw) for hw in term_sizes]
  to_canvas = assign(term_sizes, spec, max_programs)
  canvases: dict[tuple[int, int], int] = {}
  valid = total = 0
  for hw in term_sizes:
    m = spec.model_size(hw)
    c = to_canvas[m]
    canvases[c] = canvases.get(c, 0) + 1
    valid += math.prod(m)
    total += math.prod(c)
  return Plan(dict(sorted(canvases.items())), valid, total)


def group(items: Sequence[Any], key: Any, batch: int, order: Any = None,
          fits: Callable[[Any, Any], bool] | None = None,
          size: Callable[[Any], float] | None = None) -> list[list[Any]]:
  """Items split into batches of at most `batch` that share key(item), members sorted by
  order(item) (stable; deterministic: every process builds the same batches).

  Without `fits`: the keys in the order of their first appearance. With fits(a, b) (an
  item of key a can run in a batch of key b; for canvases: a's fits in b's at every
  scale) and size(key): the keys from the largest, and the short last batch of a key is
  filled with the largest members of smaller keys that fit it (those slots run anyway:
  a filled slot is one image less elsewhere, and fewer batches). A batch's first member
  always has the batch's key."""
  by_key: dict[Any, list[Any]] = {}
  for it in items:
    by_key.setdefault(key(it), []).append(it)
  if order is not None:
    by_key = {k: sorted(m, key=order) for k, m in by_key.items()}
  keys = list(by_key)
  if fits is not None:
    keys.sort(key=lambda k: -size(k))  # stable: ties keep their first appearance
  out = []
  for n, k in enumerate(keys):
    members = by_key[k]
    out.extend(members[i:i + batch] for i in range(0, len(members), batch))
    if fits is None or not members or len(out[-1]) == batch:
      continue
    last = out[-1]
    for smaller in keys[n + 1:]:
      if not fits(smaller, k):
        continue
      donor = by_key[smaller]
      take = min(batch - len(last), len(donor))
      if take:
        last.extend(donor[len(donor) - take:][::-1])  # its largest members first
        del donor[len(donor) - take:]
      if len(last) == batch:
        break
  return out


def plan_batches(items: Sequence[tuple[Sequence[Sequence[int]], Sequence[int]]],
                 spec: BucketSpec, batch: int, max_programs: int | None = None
                 ) -> tuple[dict[tuple[int, int], tuple[int, int]], list[list[int]]]:
  """items: (test sizes, one per scale; original size) per image -> (model size ->
  canvas, batches of item indices). A batch's images share their canvases at every
  scale, those of its first item; the last batch of a canvas set is filled with images
  of smaller ones (group's fits: they run exactly in a larger canvas)."""
  all_sizes = [tuple(int(v) for v in hw) for sizes, _ in items for hw in sizes]
  to_canvas = assign(all_sizes, spec, max_programs)

  def key(i: int) -> tuple:
    return tuple(to_canvas[spec.model_size(hw)] for hw in items[i][0])

  # Within a canvas set, by original size: a batch's output canvas fits its largest.
  order = lambda i: (items[i][1][0] * items[i][1][1], tuple(items[i][1]))  # noqa: E731
  fits = lambda a, b: all(x[0] <= y[0] and x[1] <= y[1] for x, y in zip(a, b))  # noqa: E731
  size = lambda k: sum(c[0] * c[1] for c in k)  # noqa: E731
  return to_canvas, group(list(range(len(items))), key, batch, order, fits=fits, size=size)


def out_canvas(hws: Iterable[Sequence[int]], spec: BucketSpec) -> tuple[int, int]:
  """The output canvas of a batch of original sizes: its largest sides on the output
  ladder."""
  hws = list(hws)
  return tuple(ceil_side(max(int(hw[i]) for hw in hws), spec.out_sides) for i in (0, 1))


def small_programs(items: Sequence[tuple[Sequence[Sequence[int]], Sequence[int]]],
                   spec: BucketSpec, batch: int, max_programs: int | None = None,
                   flip: bool = False) -> dict[str, int]:
  """The small programs an evaluation compiles beside the model's: resize + softmax + sum
  (one per canvas and output canvas, and whether it starts the sum: the first term of an
  image, scale 0 unflipped) and argmax + confusion matrix (one per output canvas)."""
  to_canvas, batches = plan_batches(items, spec, batch, max_programs)
  post, outs = set(), set()
  for idx in batches:
    out = out_canvas((items[i][1] for i in idx), spec)
    outs.add(out)
    for r, hw in enumerate(items[idx[0]][0]):
      for f in ((False, True) if flip else (False,)):
        post.add((to_canvas[spec.model_size(hw)], out, r == 0 and not f))
  return {'resize_programs': len(post), 'output_canvases': len(outs)}
