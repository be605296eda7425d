"""Throughput of the train pipeline: examples per second per worker.

  python -m input_pipeline.bench [--dataset ade20k] [--num_images 48] [--steps 200]
      [--workers 0,2] [--data_dir DIR] [--json FILE]

By default it encodes `num_images` realistic 683x512 JPEGs (ADE20K's typical
size) with region labels in memory (repeated to the size of the train split
for the loader's sampler) and runs the dataset's train recipe
(decode, random resize, crop with cat_max_ratio, flip, photometric
distortion, normalise, pad; 512x512 crops for ADE20K) over them. With
--data_dir it reads the prepared ArrayRecord files instead. It prints a
per-stage breakdown in one process, then the loader's throughput for each
worker count (worker_count=0 runs in the main process). --json FILE writes
`examples_per_s_per_worker` (the loader at worker_count 0), the per-stage
times, and the same numbers in CPU time of the timing thread/process: on a
shared host the wall times grow with the load (recorded as load_average),
the CPU times less (about +25 % at load average 12 on 2 cores).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time

import cv2
import grain
import numpy as np
from PIL import Image

from input_pipeline import fakes
from input_pipeline import pipeline
from input_pipeline import transforms as T
from input_pipeline.config import default_data_config


# Stage names of the train ops in the JSON output.
STAGES = {'Decode': 'decode', 'RandomResize': 'resize', 'RandomCrop': 'crop',
          'RandomFlip': 'flip', 'PhotometricDistortion': 'photometric',
          'NormalizeAndPad': 'normalize_pad'}

# This bench (ADE20K recipe, 48 in-memory 683x512 JPEGs, 200 steps,
# worker_count 0) on the 2-core development host at commit a14ab92, before
# the transforms went through OpenCV (NumPy/PIL re-implementations). Wall
# numbers: one run at load average 0.6 (the loader then sampled the 48
# records directly). CPU numbers: median of 3 runs at load average 12-14.
# Printed and written next to each run for comparison.
BASELINE_A14AB92 = {
    'examples_per_s_per_worker': 24.4,
    'stage_ms': {'decode': 4.80, 'resize': 12.70, 'crop': 3.38, 'flip': 0.02,
                 'photometric': 14.56, 'normalize_pad': 5.50},
    'stage_total_ms': 40.97,
    'examples_per_cpu_s_per_worker': 20.2,
    'stage_cpu_ms': {'decode': 6.14, 'resize': 15.73, 'crop': 4.26, 'flip': 0.04,
                     'photometric': 18.69, 'normalize_pad': 6.71},
    'stage_total_cpu_ms': 51.07,
}


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


class CyclicSource:
  """`records` repeated to `length` entries: the loader's sampler then shuffles
  a split of the real size (grain's index_shuffle costs ~1 ms per index over
  48 records, 0.07 ms over ADE20K's 20,210), while the images stay few."""

  def __init__(self, records: list[dict], length: int):
    self.records, self.length = records, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict:
    return self.records[int(index) % len(self.records)]


# Train split sizes (SPEC section 8) for CyclicSource.
TRAIN_SIZES = {'ade20k': 20210, 'cityscapes': 2975, 'coco_stuff10k': 9000}


def stage_breakdown(records: list[dict], cfg, steps: int
                    ) -> tuple[dict[str, float], dict[str, float]]:
  """Mean milliseconds per example of each train op in this thread: (wall, CPU)."""
  ops = T.train_transforms(cfg)
  wall = {type(op).__name__: 0.0 for op in ops}
  cpu = dict(wall)
  rng = np.random.default_rng(0)
  for i in range(steps):
    ex = records[i % len(records)]
    for op in ops:
      t, c = time.perf_counter(), time.thread_time()
      ex = op.random_map(ex, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(ex)
      wall[type(op).__name__] += time.perf_counter() - t
      cpu[type(op).__name__] += time.thread_time() - c
  return ({k: 1e3 * v / steps for k, v in wall.items()},
          {k: 1e3 * v / steps for k, v in cpu.items()})


def loader_throughput(source, cfg, workers: int, batch: int, steps: int
                      ) -> tuple[float, float]:
  """Examples per second of the full grain train loader over `source`:
  (per wall second, per CPU second of this process; the latter only means
  something at workers=0)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.worker_count = workers
  sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=True, seed=0,
                                        num_epochs=None,
                                        shard_options=grain.sharding.NoSharding())
  ops = T.train_transforms(cfg) + [grain.transforms.Batch(batch, drop_remainder=True)]
  it = iter(pipeline.make_loader(source, sampler, ops, cfg, grain.sharding.NoSharding()))
  for _ in range(max(2, workers * 2)):  # warm-up: worker start-up, first batches
    next(it)
  t, c = time.perf_counter(), time.process_time()
  n = max(1, steps // batch)
  for _ in range(n):
    next(it)
  return n * batch / (time.perf_counter() - t), n * batch / (time.process_time() - c)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(prog='python -m input_pipeline.bench', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dataset', default='ade20k', choices=['ade20k', 'cityscapes', 'coco_stuff10k'])
  p.add_argument('--data_dir', default=None, help='read prepared files instead of in-memory fakes')
  p.add_argument('--num_images', type=int, default=48)
  p.add_argument('--steps', type=int, default=200, help='examples timed per measurement')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--workers', default='0,2', help='comma-separated worker counts')
  p.add_argument('--json', default=None, help='also write the results to this JSON file')
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
    source = CyclicSource(records, max(TRAIN_SIZES[args.dataset], len(records)))
    what = (f'{args.num_images} in-memory {hw[1]}x{hw[0]} JPEGs, sampled as a split of '
            f'{len(source)}')
  load = os.getloadavg()[0]
  print(f'{args.dataset} train pipeline, crop {tuple(cfg.crop_size)}, on {what} '
        f'(load average {load:.1f} on {os.cpu_count()} CPUs)')
  wall, cpu = stage_breakdown(records, cfg, args.steps)
  total, total_cpu = sum(wall.values()), sum(cpu.values())
  base = BASELINE_A14AB92['stage_ms'] if args.dataset == 'ade20k' and not args.data_dir else {}
  b = BASELINE_A14AB92
  print(f'  {"stage":24s} {"wall ms":>8s} {"CPU ms":>8s}'
        + (f' {"a14ab92 wall":>13s} {"CPU":>6s}' if base else ''))
  for name in wall:
    ref = f' {base[STAGES[name]]:13.2f} {b["stage_cpu_ms"][STAGES[name]]:6.2f}' if base else ''
    print(f'  {name:24s} {wall[name]:8.2f} {cpu[name]:8.2f}{ref}')
  ref = f' {b["stage_total_ms"]:13.2f} {b["stage_total_cpu_ms"]:6.2f}' if base else ''
  print(f'  {"total":24s} {total:8.2f} {total_cpu:8.2f}{ref}  = {1e3 / total:.1f} examples/s '
        f'per worker ({1e3 / total_cpu:.1f} per CPU second)')
  result = {
      'dataset': args.dataset, 'source': what, 'crop_size': list(cfg.crop_size),
      'img_scale': list(cfg.img_scale), 'steps': args.steps, 'batch': args.batch,
      'opencv': cv2.__version__, 'cpu_count': os.cpu_count(), 'load_average': load,
      'stage_ms': {STAGES.get(k, k): v for k, v in wall.items()},
      'stage_cpu_ms': {STAGES.get(k, k): v for k, v in cpu.items()},
      'stage_total_ms': total, 'stage_total_cpu_ms': total_cpu, 'loader': {},
  }
  workers = [int(x) for x in args.workers.split(',') if x.strip()]
  if args.json and 0 not in workers:
    workers = [0] + workers  # examples_per_s_per_worker is the worker_count 0 number.
  for w in workers:
    eps, eps_cpu = loader_throughput(source, cfg, w, args.batch, args.steps)
    result['loader'][str(w)] = {'examples_per_s': eps, 'examples_per_s_per_worker': eps / max(w, 1)}
    if w == 0:
      result['examples_per_s_per_worker'] = eps
      result['examples_per_cpu_s_per_worker'] = eps_cpu
    print(f'loader worker_count={w}: {eps:.1f} examples/s total, '
          f'{eps / max(w, 1):.1f} examples/s per worker (batch {args.batch})'
          + (f'; {eps_cpu:.1f} per CPU second' if w == 0 else ''))
  if base:
    result['baseline_a14ab92'] = BASELINE_A14AB92
    print(f'a14ab92 (NumPy/PIL transforms): loader worker_count=0 '
          f'{b["examples_per_s_per_worker"]:.1f} examples/s per worker at load average 0.6; '
          f'{b["examples_per_cpu_s_per_worker"]:.1f} per CPU second at load average 12-14')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()
