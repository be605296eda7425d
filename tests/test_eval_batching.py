"""How the exact evaluation forms its batches (evaluation/buckets.group with filling,
bucketed.eval_batch_size, the rows a process reads): no image lost or repeated, every
image in a canvas that holds it at every scale, fewer dummy slots than one group per
canvas."""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from semask_jax.evaluation import bucketed, buckets

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = os.environ.get('SEMASK_EVAL_SIZES', str(ROOT / '..' / 'shared' / 'reference' /
                                               'ade20k_val_sizes.json'))


def _items(n: int, scales=(1.0,)):
  if os.path.exists(SIZES):
    sizes = [tuple(s) for s in json.load(open(SIZES))['sizes'][:n]]
  else:
    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(200, 900)), int(rng.integers(200, 900))) for _ in range(n)]
  # The mmseg ADE20K test resize (keep ratio into 2048 x 512), per scale.
  def resize(hw, r):
    s = min(2048 * r / max(hw), 512 * r / min(hw))
    return int(hw[0] * s + 0.5), int(hw[1] * s + 0.5)
  return [([resize(hw, r) for r in scales], hw) for hw in sizes]


@pytest.mark.parametrize('scales', [(1.0,), buckets.PAPER_SCALES])
@pytest.mark.parametrize('batch', [1, 3, 8])
def test_filled_batches_hold_every_image_once_in_a_canvas_that_fits(batch, scales):
  items = _items(100, scales)
  spec = buckets.BucketSpec()
  to_canvas, batches = buckets.plan_batches(items, spec, batch,
                                            buckets.default_max_programs(len(scales)))
  canvas_of = lambda hw: to_canvas[spec.model_size(hw)]  # noqa: E731
  flat = [i for idx in batches for i in idx]
  assert sorted(flat) == list(range(len(items)))
  for idx in batches:
    assert 1 <= len(idx) <= batch
    canvases = [canvas_of(hw) for hw in items[idx[0]][0]]
    for i in idx:
      own = [canvas_of(hw) for hw in items[i][0]]
      assert all(o[0] <= c[0] and o[1] <= c[1] for o, c in zip(own, canvases)), (i, own, canvases)
      assert all(hw[0] <= c[0] and hw[1] <= c[1] for hw, c in zip(items[i][0], canvases))
  # Against one group per canvas set (the batches before filling): never more slots.
  key = lambda i: tuple(canvas_of(hw) for hw in items[i][0])  # noqa: E731
  unfilled = buckets.group(list(range(len(items))), key, batch)
  assert len(batches) <= len(unfilled)
  if batch > 1 and len(unfilled) > len({key(i) for i in range(len(items))}):
    assert len(batches) < len(unfilled), 'filling saved no batch on 100 real sizes'


def test_group_fills_from_smaller_keys_only():
  # Keys are sizes, largest first: the 16's short batch takes the three 9s (which then
  # need no batch of their own); the 4s fit in nothing left to fill.
  items = [9] * 3 + [4] * 7 + [16]
  got = buckets.group(list(range(len(items))), lambda i: items[i], 4,
                      fits=lambda a, b: a <= b, size=lambda k: k)
  assert [[items[i] for i in idx] for idx in got] == [[16, 9, 9, 9], [4, 4, 4, 4], [4, 4, 4]]
  # Without fits: one group per key, in first-appearance order.
  plain = buckets.group(list(range(len(items))), lambda i: items[i], 4)
  assert [[items[i] for i in idx] for idx in plain] == [[9, 9, 9], [4, 4, 4, 4], [4, 4, 4], [16]]


@pytest.mark.parametrize('requested,devices,want', [(0, 1, 1), (0, 8, 8), (3, 8, 8), (9, 8, 16),
                                                    (8, 1, 8), (None, 4, 4)])
def test_eval_batch_size(requested, devices, want):
  assert bucketed.eval_batch_size(requested, devices) == want


def test_every_row_is_local_on_one_process():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',),
                           axis_types=(jax.sharding.AxisType.Auto,))
  inf = bucketed.BucketedInference(lambda p: None, {}, _eval_cfg(), 3, mesh=mesh,
                                   output_stride=4, batch_size=3)
  assert inf.batch_size == 3 and inf.local_rows() == [0, 1, 2]


def _eval_cfg():
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(dict(mode='whole', scales=(1.0,), flip=False))


def test_small_programs_are_counted_and_few():
  items = _items(100)
  spec = buckets.BucketSpec()
  small = buckets.small_programs(items, spec, 1)
  # A flipped term never starts the sum: single scale + flip has each pair twice.
  flipped = buckets.small_programs(items, spec, 1, flip=True)
  assert flipped['resize_programs'] == 2 * small['resize_programs']
  assert flipped['output_canvases'] == small['output_canvases']
  _, batches = buckets.plan_batches(items, spec, 1)
  outs = {buckets.out_canvas([items[i][1] for i in idx], spec) for idx in batches}
  assert small['output_canvases'] == len(outs)
  assert len(outs) <= small['resize_programs'] <= len(batches)
  for idx in batches:  # every original size fits its batch's output canvas
    out = buckets.out_canvas([items[i][1] for i in idx], spec)
    assert all(items[i][1][0] <= out[0] and items[i][1][1] <= out[1] for i in idx)
