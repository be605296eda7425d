"""Bucketed exact evaluation (evaluation/bucketed.py) against the per-image oracle
(PerImageInference) for every head (SeMask-FPN; Mask2Former with the MSDeformAttn, FaPN
and MSFaPN pixel decoders; MaskFormer), each head's valid-size forward against the model
on each image alone, and the eval_plan counts.

Image sizes come from $SEMASK_EVAL_SIZES (default ../shared/reference/ade20k_val_sizes.json
from the repo root), divided by SCALE_DOWN so that the tiny models run on a CPU, picked
with a fixed seed. Random weights (semantic-attention gammas made nonzero).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from semask_jax.evaluation import bucketed, buckets
from semask_jax.evaluation import inference as inference_lib
from semask_jax.models import (SEMASK_MASK2FORMER, SEMASK_MASKFORMER, build_model,
                               default_model_config, valid)
from semask_jax.models.resize import resize_nearest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = os.environ.get('SEMASK_EVAL_SIZES', str(ROOT / '..' / 'shared' / 'reference' /
                                               'ade20k_val_sizes.json'))
SCALE_DOWN = 16   # 512 x 683 -> 32 x 43
NUM_IMAGES = 5
NUM_CLASSES = 5


def _sizes() -> list[tuple[int, int]]:
  if os.path.exists(SIZES):
    sizes = json.load(open(SIZES))['sizes']
  else:  # no shared list: a synthetic one of the same kind
    rng = np.random.default_rng(1)
    sizes = [(int(rng.integers(256, 800)), int(rng.integers(256, 800))) for _ in range(200)]
  pick = np.random.default_rng(0).choice(len(sizes), NUM_IMAGES, replace=False)
  return [(max(8, int(sizes[i][0]) // SCALE_DOWN), max(8, int(sizes[i][1]) // SCALE_DOWN))
          for i in pick]


DETECTRON2_KINDS = ('m2f', 'fapn', 'msfapn', 'maskformer')  # pad to 32, scores at stride 1
NEW_KINDS = ('fapn', 'msfapn', 'maskformer')


def tiny_model(kind: str):
  """A tiny model of `kind` ('fpn', 'm2f' (MSDeformAttn pixel decoder), 'fapn', 'msfapn'
  or 'maskformer') with random weights: semantic gammas nonzero, and FaPN's DCN offset /
  mask convs random (their zero init would sample only the integer taps), so that its
  taps land between pixels and past the image's edge."""
  if kind == 'fpn':
    m = default_model_config('T', NUM_CLASSES)
    m.embed_dim, m.num_heads, m.fpn_channels = 16, (1, 1, 2, 2), 16
  else:
    name = SEMASK_MASKFORMER if kind == 'maskformer' else SEMASK_MASK2FORMER
    m = default_model_config('T', NUM_CLASSES, num_sem_blocks=1, name=name)
    m.embed_dim, m.num_heads = 16, (1, 2, 2, 4)
    m.conv_dim = m.mask_dim = m.hidden_dim = 32
    m.nheads, m.num_queries, m.dim_feedforward, m.dec_layers = 4, 6, 32, 3
    if kind != 'maskformer':
      m.enc_layers, m.enc_dim_feedforward = 1, 32
      m.pixel_decoder = {'m2f': 'msdeformattn'}.get(kind, kind)
      m.deformable_groups = 2
  m.depths = (2, 2, 2, 2)
  m.window_size = m.sem_window_size = 7
  m.drop_path_rate = m.sem_dropout = 0.0
  model = build_model(m, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  noise = iter(jax.random.split(jax.random.key(1), 64))

  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    if 'gamma' in name:
      return x + 0.5
    if 'conv_offset_mask' in name:  # offsets of a few pixels, masks away from 0.5
      return x + 0.1 * jax.random.normal(next(noise), x.shape, x.dtype)
    return x

  nnx.update(model, jax.tree_util.tree_map_with_path(perturb, params))
  graphdef, state = nnx.split(model)
  return graphdef, state, type(model)


def eval_cfg(mode='whole', scales=(1.0,), flip=False) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(mode=mode, scales=scales, flip=flip, crop_size=(32, 32),
                                        stride=(21, 21), batch_size=3))


def examples(sizes, scales, seed=0):
  """Per image: random normalised images per scale (size round(r * (h, w))), labels."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in sizes:
    imgs = tuple(rng.standard_normal((max(4, int(h * r + .5)), max(4, int(w * r + .5)), 3)
                                     ).astype(np.float32) for r in scales)
    out.append({'images': imgs, 'label': rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)})
  return out


def compare(kind: str, cfg, num_devices: int = 1):
  graphdef, state, cls = tiny_model(kind)
  seg = lambda p: nnx.merge(graphdef, p).segment  # noqa: E731
  probs = cls.SCORES_ARE_PROBABILITIES
  pad = 32 if kind in DETECTRON2_KINDS else 0
  oracle = inference_lib.PerImageInference(seg, state, cfg, NUM_CLASSES, probabilities=probs,
                                           pad_multiple=pad)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:num_devices]), ('data',),
                           axis_types=(jax.sharding.AxisType.Auto,))
  # The detectron2 heads pad to 32 first, and the ladder has every multiple of 32 up to
  # 256: each image's canvas would be its own padded size. One program for all makes the
  # images of a batch differ in size (and it compiles once).
  bucket = bucketed.BucketedInference(seg, state, cfg, NUM_CLASSES, mesh=mesh,
                                      output_stride=4 if kind == 'fpn' else 1,
                                      probabilities=probs, pad_multiple=pad,
                                      max_programs=1 if pad else None)
  exs = examples(_sizes(), cfg.scales)
  items = [([im.shape[:2] for im in ex['images']], ex['label'].shape) for ex in exs]
  to_canvas, batches = bucket.make_plan(items)
  agree = total = 0
  worst = 0.0
  for idx in batches:
    canvases = [bucket.canvas_of(to_canvas, hw) for hw in items[idx[0]][0]]
    acc, n, _ = bucket.scores_batch([exs[i] for i in idx], canvases)
    acc = np.asarray(jax.device_get(acc))
    for j, i in enumerate(idx):
      want, m = oracle.scores(exs[i]['images'], exs[i]['label'].shape)
      lh, lw = exs[i]['label'].shape
      want = np.asarray(want)[:lh, :lw]
      got = acc[j, :lh, :lw]
      assert m == n
      worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
      agree += int((got.argmax(-1) == want.argmax(-1)).sum())
      total += lh * lw
  names = [str(k) for k in range(NUM_CLASSES)]
  want = inference_lib.evaluate_per_image(oracle, exs, names)
  got = bucketed.evaluate_bucketed(bucket, items, lambda i: exs[i], names)
  return dict(rel=worst, agree=agree / total, miou=abs(got['mIoU'] - want['mIoU']),
              batches=len(batches), devices=mesh.devices.size, batch=bucket.batch_size)


def check(r, label: str):
  print('exactness', label, json.dumps(r))  # pytest -s shows the figures
  assert r['rel'] <= 1e-4, r
  assert r['agree'] >= 0.9999, r
  assert r['miou'] <= 1e-4, r


@pytest.mark.parametrize('kind', ('fpn',) + DETECTRON2_KINDS)
def test_single_scale_equals_per_image(kind):
  check(compare(kind, eval_cfg()), f'{kind}, single scale')


@pytest.mark.parametrize('kind', ('fpn',) + DETECTRON2_KINDS)
def test_multi_scale_flip_equals_per_image(kind):
  check(compare(kind, eval_cfg(scales=(0.5, 1.0, 1.5), flip=True)), f'{kind}, multi-scale + flip')


def test_slide_equals_per_image():
  check(compare('fpn', eval_cfg(mode='slide')), 'fpn, slide')


@pytest.mark.parametrize('kind', NEW_KINDS)
def test_segment_of_a_canvas_equals_each_image_alone(kind):
  """segment(canvas, valid_hw) against segment(image) per image, model only: two sizes
  (multiples of 32, the heads' own pad) in one canvas whose padding is random, not zero
  (the model must not read it)."""
  graphdef, state, _ = tiny_model(kind)
  segment = jax.jit(lambda s, x, hw=None: nnx.merge(graphdef, s).segment(x, hw))
  sizes = [(96, 64), (64, 128)]
  rng = np.random.default_rng(0)
  canvas = 3 * rng.standard_normal((len(sizes), 96, 128, 3)).astype(np.float32)
  alone = [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in sizes]
  for i, (h, w) in enumerate(sizes):
    canvas[i, :h, :w] = alone[i]
  got = np.asarray(segment(state, canvas, np.asarray(sizes, np.int32)))
  for i, (h, w) in enumerate(sizes):
    want = np.asarray(segment(state, alone[i][None]))[0]
    rel = float(np.abs(got[i, :h, :w] - want).max() / np.abs(want).max())
    print('model exactness', kind, (h, w), rel)
    assert np.isfinite(got[i]).all()
    assert rel <= 1e-4, (kind, (h, w), rel)


def test_valid_resize_nearest_is_the_legacy_nearest_per_image():
  """valid.resize_nearest against F.interpolate(size=, 'nearest') of each image alone,
  odd ratios included (2 -> 3, 4 -> 7, 3 -> 5)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 5, 2)).astype(np.float32)
  in_hw = np.asarray([(2, 4), (4, 3), (3, 5)], np.int32)
  out_hw = np.asarray([(3, 7), (7, 5), (5, 5)], np.int32)
  got = np.asarray(valid.resize_nearest(x, in_hw, out_hw, (8, 9)))
  for i, ((h, w), (ho, wo)) in enumerate(zip(in_hw, out_hw)):
    want = np.asarray(resize_nearest(x[i:i + 1, :h, :w], (ho, wo)))[0]
    np.testing.assert_array_equal(got[i, :ho, :wo], want)


_SUBPROCESS = r'''
import json, sys
sys.path.insert(0, {root!r})
import jax
from tests import test_eval_buckets as t
assert len(jax.devices()) == 8
out = {{}}
for kind in {kinds!r}:
  out[kind] = t.compare(kind, t.eval_cfg(scales=(0.5, 1.0), flip=True), 8)
out['slide'] = t.compare('fpn', t.eval_cfg(mode='slide'), 8)
print('RESULT' + json.dumps(out))
'''


def test_eight_devices_batch_not_divisible():
  """8 fake CPU devices (multi-scale + flip for both models, slide), eval batch_size 3
  (rounded up to 8, dummies filling). The tests above run on one device, batch 3."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _SUBPROCESS.format(root=str(ROOT),
                                                                   kinds=['fpn', 'm2f'])],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  for kind, r in json.loads(line[len('RESULT'):]).items():
    assert r['devices'] == 8 and r['batch'] == 8
    check(r, f'8 devices, {kind}')


# ------------------------------------------------------------------ eval_plan


def _brute_canvas(hw, multiple=32, steps=4):
  """The ladder side, computed independently: the smallest multiple of `multiple` >= the
  side among {k * 2^e / steps}-style values below."""
  sides = set(range(multiple, multiple * steps + 1, multiple))
  base = multiple * steps
  while base < 1 << 15:
    sides |= {-(-(base + k * base // steps) // multiple) * multiple for k in range(1, steps + 1)}
    base *= 2
  return tuple(min(s for s in sides if s >= v) for v in hw)


def test_ladder_and_plan_counts():
  assert buckets.ladder(4, 32)[:12] == (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
  sizes = [(512, 683), (512, 683), (300, 400), (512, 512), (700, 512), (100, 1000)]
  spec = buckets.BucketSpec()
  p = buckets.plan(sizes, spec)
  want = {}
  for hw in sizes:
    c = _brute_canvas(hw)
    want[c] = want.get(c, 0) + 1
  assert p.canvases == want
  assert p.programs == 5
  assert p.padded_ratio == pytest.approx(sum(np.prod(_brute_canvas(hw)) for hw in sizes)
                                         / sum(np.prod(hw) for hw in sizes))
  # A budget merges the cheapest canvas into one that holds it.
  p2 = buckets.plan(sizes, spec, max_programs=4)
  assert p2.programs == 4 and p2.canvas_pixels > p.canvas_pixels
  # Mask2Former's pad to 32 comes first.
  p3 = buckets.plan([(500, 500)], buckets.BucketSpec(pad_multiple=32))
  assert p3.canvases == {(512, 512): 1} and p3.valid_pixels == 512 * 512


def test_eval_plan_cli(tmp_path):
  sizes = tmp_path / 'sizes.json'
  sizes.write_text(json.dumps({'sizes': [[512, 683], [375, 500], [480, 640], [683, 512]]}))
  out = tmp_path / 'plan.json'
  proc = subprocess.run([sys.executable, '-m', 'semask_jax.eval_plan', '--config',
                         'configs/ade20k_semask_fpn.py', '--sizes', str(sizes), '--json',
                         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())
  # mmseg test resize to (2048, 512): short side 512 -> 512x683 (three), 683x512.
  tests = [(512, 683)] * 3 + [(683, 512)]
  assert got['model_programs_single_scale'] == len({_brute_canvas(hw) for hw in tests}) == 2
  assert got['padded_pixel_ratio_single_scale'] == pytest.approx(
      sum(np.prod(_brute_canvas(hw)) for hw in tests) / sum(np.prod(hw) for hw in tests),
      abs=1e-4)
  assert got['model_programs_multi_scale'] >= got['model_programs_single_scale']
  assert got['padded_pixel_ratio_multi_scale'] >= 1.0
