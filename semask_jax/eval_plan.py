r"""The bucket canvases an exact evaluation compiles for a list of image sizes (compiles nothing).

  python -m semask_jax.eval_plan --config configs/ade20k_semask_fpn.py \
      --sizes ../shared/reference/ade20k_val_sizes.json [--scales 0.5,0.75,1.0] --json plan.json

SIZES.json: {"sizes": [[h, w], ...]} (original sizes). Prints the canvases of the
single-scale and the multi-scale test (the config's test scales, or the paper's
0.5-1.75 ladder when the config has one scale; --scales overrides) and writes
{"model_programs_single_scale", "model_programs_multi_scale",
"padded_pixel_ratio_single_scale", "padded_pixel_ratio_multi_scale"}: one model program
per canvas; the ratio is canvas pixels over the pixels the reference's model sees. Also
written: the small programs beside them (resize_programs_*, metric_programs_*), which
depend on the batch (--batch, config.eval.batch_size over all devices).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Sequence

from input_pipeline import pipeline
from semask_jax.evaluation import buckets
from semask_jax.evaluation.inference import test_size_divisibility


def load_config(path: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location('eval_plan_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def make_plans(config, sizes: Sequence[Sequence[int]], scales: Sequence[float] | None = None,
               batch: int = 1) -> dict[str, tuple[buckets.Plan, dict[str, int]]]:
  """Per test ('single_scale', 'multi_scale'): the model canvases and padding, and the
  small programs (buckets.small_programs) for batches of `batch` images."""
  spec = buckets.bucket_spec(config, test_size_divisibility(config))
  single = (1.0,)
  multi = tuple(scales) if scales else tuple(float(r) for r in config.eval.scales)
  if len(multi) <= 1:
    multi = buckets.PAPER_SCALES
  budget = config.eval.get('bucket_max_programs')
  out = {}
  for name, ratios, flip in (('single_scale', single, False), ('multi_scale', multi, True)):
    cap = int(budget) if budget else buckets.default_max_programs(len(ratios))
    tta = pipeline.is_tta(ratios, flip)
    items = [(pipeline.scale_sizes(tuple(hw), config.data, ratios, tta=tta), tuple(hw))
             for hw in sizes]
    out[name] = (buckets.plan([s for sz, _ in items for s in sz], spec, cap),
                 buckets.small_programs(items, spec, batch, cap, flip))
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='config file (configs/*.py)')
  parser.add_argument('--config_arg', default=None, help="its argument (e.g. the variant 'L')")
  parser.add_argument('--sizes', required=True, help='JSON {"sizes": [[h, w], ...]}')
  parser.add_argument('--scales', default=None, help='multi-scale ratios, comma separated')
  parser.add_argument('--batch', type=int, default=1,
                      help='images per eval batch (config.eval.batch_size over all devices; '
                           'the small programs depend on it)')
  parser.add_argument('--json', default=None, help='where to write the counts')
  args = parser.parse_args(argv)
  config = load_config(args.config, args.config_arg)
  with open(args.sizes) as f:
    sizes = json.load(f)['sizes']
  scales = tuple(float(s) for s in args.scales.split(',')) if args.scales else None
  plans = make_plans(config, sizes, scales, args.batch)
  result = {}
  for name, (p, small) in plans.items():
    print(f'{name}: {p.programs} model programs, padded pixels x{p.padded_ratio:.3f}; '
          f'{small["resize_programs"]} resize programs and {small["output_canvases"]} '
          f'metric programs (small) at {args.batch} image(s) per batch')
    for c, n in p.canvases.items():
      print(f'  canvas {c[0]}x{c[1]}: {n} test images')
    result[f'model_programs_{name}'] = p.programs
    result[f'padded_pixel_ratio_{name}'] = round(p.padded_ratio, 4)
    result[f'resize_programs_{name}'] = small['resize_programs']
    result[f'metric_programs_{name}'] = small['output_canvases']
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main(sys.argv[1:])
