r"""Compile (and optionally run) seconds of the exact evaluation, bucketed vs per image.

  python benchmarks/eval_buckets.py --config configs/ade20k_semask_fpn.py \
      --sizes ../shared/reference/ade20k_val_sizes.json --first 100 [--run] [--scales ...]

Random weights, synthetic images of the listed sizes (the test resize of config.data
applied to the size only). Compiles the model programs of the per-image path (one per
distinct test shape; --per_image_sample N compiles N of them and extrapolates) and of the
bucketed path (one per canvas), and with --run evaluates both over the images. Prints
one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from input_pipeline import pipeline  # noqa: E402
from semask_jax import eval_plan  # noqa: E402
from semask_jax.evaluation import bucketed  # noqa: E402
from semask_jax.evaluation import inference as inference_lib  # noqa: E402
from semask_jax.models import build_model  # noqa: E402
from semask_jax.models.functional import split_model  # noqa: E402
from semask_jax.sharding import make_mesh  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--config', required=True)
  p.add_argument('--config_arg', default=None)
  p.add_argument('--sizes', required=True)
  p.add_argument('--first', type=int, default=100)
  p.add_argument('--scales', default='1.0')
  p.add_argument('--flip', action='store_true')
  p.add_argument('--per_image_sample', type=int, default=0)
  p.add_argument('--run', action='store_true')
  a = p.parse_args()
  config = eval_plan.load_config(a.config, a.config_arg)
  config.eval.scales = tuple(float(s) for s in a.scales.split(','))
  config.eval.flip = a.flip
  sizes = [tuple(s) for s in json.load(open(a.sizes))['sizes'][:a.first]]
  ratios = tuple(config.eval.scales)
  tta = pipeline.is_tta(ratios, a.flip)
  items = [(pipeline.scale_sizes(hw, config.data, ratios, tta=tta), hw) for hw in sizes]
  model = build_model(config.model, rngs=nnx.Rngs(0))
  graphdef, params, stats, rest = split_model(model)
  mesh = make_mesh()
  per_image = inference_lib.make_per_image_inference(config, graphdef, rest, params, stats)
  bucket = bucketed.make_bucketed_inference(config, graphdef, rest, params, stats, mesh)
  out = {'config': a.config, 'config_arg': a.config_arg, 'images': len(sizes),
         'scales': ratios, 'flip': a.flip, 'devices': mesh.devices.size,
         'batch': bucket.batch_size, 'device_kind': jax.devices()[0].device_kind}
  shapes = sorted({tuple(hw) for s, _ in items for hw in s}, key=lambda s: -s[0] * s[1])
  sample = shapes if not a.per_image_sample else shapes[::max(1, len(shapes) // a.per_image_sample)][:a.per_image_sample]
  start = time.perf_counter()
  for hw in sample:
    per_image._model(hw)
  t = time.perf_counter() - start
  out.update(per_image_shapes=len(shapes), per_image_compiled=len(sample),
             per_image_compile_s=round(t, 1),
             per_image_compile_s_all=round(t * len(shapes) / len(sample), 1))
  to_canvas, batches = bucket.make_plan(items)
  canvases = sorted(set(to_canvas.values()))
  start = time.perf_counter()
  for c in canvases:
    bucket._model(c)
  out.update(bucket_canvases=len(canvases), bucket_batches=len(batches),
             bucket_compile_s=round(time.perf_counter() - start, 1))
  if a.run:
    rng = np.random.default_rng(0)
    exs = {}

    def load(i):
      if i not in exs:
        exs[i] = {'images': tuple(rng.standard_normal((*hw, 3)).astype(np.float32)
                                  for hw in items[i][0]),
                  'label': rng.integers(0, config.model.num_classes, items[i][1]).astype(np.uint8)}
      return exs[i]

    names = [str(k) for k in range(config.model.num_classes)]
    start = time.perf_counter()
    res = bucketed.evaluate_bucketed(bucket, items, load, names)
    out.update(bucket_eval_s=round(time.perf_counter() - start, 1),
               bucket_eval_compile_s=round(bucket.compile_seconds, 1), bucket_mIoU=res['mIoU'])
    start = time.perf_counter()
    res = inference_lib.evaluate_per_image(per_image, [load(i) for i in range(len(items))], names)
    out.update(per_image_eval_s=round(time.perf_counter() - start, 1),
               per_image_eval_compile_s=round(per_image.compile_seconds, 1),
               per_image_mIoU=res['mIoU'])
  print(json.dumps(out))


if __name__ == '__main__':
  main()
