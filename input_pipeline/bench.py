"""Throughput of the train pipeline: examples per second per worker.

  python -m input_pipeline.bench [--dataset ade20k] [--num_images 48] [--steps 200]
      [--workers 0,2] [--data_dir DIR]

By default it encodes `num_images` realistic 683x512 JPEGs (ADE20K's typical
size) with region labels in memory and runs the dataset's train recipe
(decode, random resize, crop with cat_max_ratio, flip, photometric
distortion, normalise, pad; 512x512 crops for ADE20K) over them. With
--data_dir it reads the prepared ArrayRecord files instead. It prints a
per-stage breakdown in one process, then the loader's throughput for each
worker count (worker_count=0 runs in the main process).
"""
from __future__ import annotations

import argparse
import io
import time

import grain
import numpy as np
from PIL import Image

from input_pipeline import fakes
from input_pipeline import pipeline
from input_pipeline import transforms as T
from input_pipeline.config import default_data_config


def realistic_records(n: int, hw=(512, 683), num_classes: int = 150, seed: int = 0) -> list[dict]:
  """n records like a prepared split: JPEG image bytes, PNG train-id label bytes."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    h, w = hw if i % 4 else hw[::-1]  # a quarter portrait
    img = fakes.realistic_image(rng, h, w)
    coarse = rng.integers(0, num_classes, (max(2, h // 64), max(2, w // 64)), dtype=np.uint8)
    coarse[rng.random(coarse.shape) < 0.1] = 255
    label = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.NEAREST))
    jb, lb = io.BytesIO(), io.BytesIO()
    Image.fromarray(img).save(jb, format='JPEG', quality=90)
    Image.fromarray(label).save(lb, format='PNG')
    records.append({'image': jb.getvalue(), 'label': lb.getvalue(), 'file_name': f'bench_{i}.jpg',
                    'height': np.int32(h), 'width': np.int32(w), 'index': np.int32(i)})
  return records


def stage_breakdown(records: list[dict], cfg, steps: int) -> dict[str, float]:
  """Mean milliseconds per example of each train op, in this process."""
  ops = T.train_transforms(cfg)
  totals = {type(op).__name__: 0.0 for op in ops}
  rng = np.random.default_rng(0)
  for i in range(steps):
    ex = records[i % len(records)]
    for op in ops:
      t = time.perf_counter()
      ex = op.random_map(ex, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(ex)
      totals[type(op).__name__] += time.perf_counter() - t
  return {k: 1e3 * v / steps for k, v in totals.items()}


def loader_throughput(source, cfg, workers: int, batch: int, steps: int) -> float:
  """Examples per second of the full grain train loader over `source`."""
  cfg = cfg.copy_and_resolve_references()
  cfg.worker_count = workers
  sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=True, seed=0,
                                        num_epochs=None,
                                        shard_options=grain.sharding.NoSharding())
  ops = T.train_transforms(cfg) + [grain.transforms.Batch(batch, drop_remainder=True)]
  it = iter(pipeline.make_loader(source, sampler, ops, cfg, grain.sharding.NoSharding()))
  for _ in range(max(2, workers * 2)):  # warm-up: worker start-up, first batches
    next(it)
  t = time.perf_counter()
  n = max(1, steps // batch)
  for _ in range(n):
    next(it)
  return n * batch / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog='python -m input_pipeline.bench', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dataset', default='ade20k', choices=['ade20k', 'cityscapes', 'coco_stuff10k'])
  p.add_argument('--data_dir', default=None, help='read prepared files instead of in-memory fakes')
  p.add_argument('--num_images', type=int, default=48)
  p.add_argument('--steps', type=int, default=200, help='examples timed per measurement')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--workers', default='0,2', help='comma-separated worker counts')
  args = p.parse_args(argv)

  cfg = default_data_config(args.dataset)
  if args.data_dir:
    cfg.data_dir = args.data_dir
    source = pipeline.data_source(cfg, cfg.train_split)
    records = [source[i] for i in range(min(len(source), args.num_images))]
    what = f'{args.data_dir} ({len(source)} train examples)'
  else:
    hw = (1024, 2048) if args.dataset == 'cityscapes' else (512, 683)
    records = realistic_records(args.num_images, hw, cfg.num_classes)
    source = records
    what = f'{args.num_images} in-memory {hw[1]}x{hw[0]} JPEGs'
  print(f'{args.dataset} train pipeline, crop {tuple(cfg.crop_size)}, on {what}')
  stages = stage_breakdown(records, cfg, args.steps)
  total = sum(stages.values())
  for name, ms in stages.items():
    print(f'  {name:24s} {ms:7.2f} ms/example')
  print(f'  {"total":24s} {total:7.2f} ms/example = {1e3 / total:.1f} examples/s per worker')
  for w in [int(x) for x in args.workers.split(',') if x.strip()]:
    eps = loader_throughput(source, cfg, w, args.batch, args.steps)
    print(f'loader worker_count={w}: {eps:.1f} examples/s total, '
          f'{eps / max(w, 1):.1f} examples/s per worker (batch {args.batch})')


if __name__ == '__main__':
  main()
