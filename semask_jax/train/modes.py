"""The eval and predict modes of main.py: restore a train state, then evaluate or predict.

`--mode=eval` restores the latest checkpoint of a workdir (or config.init_from) and
computes mIoU as the reference does (evaluation.evaluator.evaluate_exact, batched per
bucket canvas on every device; config.eval.per_image: one image at a time);
`--mode=predict` writes colour masks for image files; the demo writes and predicts a
few generated scenes.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import logging

from semask_jax import compile_cache
from semask_jax import sharding as sharding_lib
from semask_jax.evaluation import predict
from semask_jax.evaluation.evaluator import (evaluate_exact, evaluate_per_image,
                                             write_eval_results)
from semask_jax.evaluation.metrics import format_table
from semask_jax.train.state import restore_for_inference


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode eval: the latest checkpoint of workdir (or init_from) on the eval split."""
  mesh = sharding_lib.make_mesh()
  state, graphdef, rest, step = restore_for_inference(config, workdir, mesh)
  if config.eval.per_image:  # one image at a time: the test oracle
    results = evaluate_per_image(config, graphdef, rest, state)
  else:  # the same numbers, batched per bucket canvas on every device
    results = evaluate_exact(config, graphdef, rest, state, mesh)
  path = write_eval_results(workdir, step, results)
  if jax.process_index() == 0:
    logging.info('Eval of step %d (%s):\n%s', step, path, format_table(results))
  return results


def predict_only(config: ml_collections.ConfigDict, workdir: str, inputs: str,
                 output_dir: str | None = None) -> list[str]:
  """--mode predict: colour masks and overlays for an image or a folder of images."""
  if not jax.config.jax_compilation_cache_dir:
    compile_cache.enable(None)
  mesh = sharding_lib.make_mesh()
  state, graphdef, rest, _ = restore_for_inference(config, workdir, mesh)
  output_dir = output_dir or os.path.join(workdir, 'predictions')
  return predict.predict_paths(config, graphdef, rest, state.params, state.batch_stats,
                               inputs, output_dir)



def demo_predictions(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Writes `config.demo_predictions` fresh synthetic scenes as PNGs and predicts them (demo only)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
  s = config.data.synthetic
  in_dir = os.path.join(os.path.abspath(workdir), 'demo_inputs')
  if jax.process_index() == 0:
    os.makedirs(in_dir, exist_ok=True)
    for i in range(config.demo_predictions):
      image, _ = synthetic.generate_scene(s.seed, 'test', s.num_eval + i, height=s.height,
                                          width=s.width, num_classes=config.data.num_classes,
                                          max_objects=s.max_objects)
      Image.fromarray(image).save(os.path.join(in_dir, f'scene_{i}.png'))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('demo_inputs_written')
  return predict_only(config, workdir, in_dir)
