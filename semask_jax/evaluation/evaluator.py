"""Evaluation of a model state: the reference-exact mIoU, the periodic evaluation during
training, and the summary images.

`evaluate_exact` computes mIoU over the eval split as the reference does, batched per
bucket canvas on every device (evaluation/bucketed.py); it is what `--mode=eval` and the
evaluation during training (make_eval_fn) run. `evaluate_per_image` (one image at a time,
inference.PerImageInference) is the same numbers and the test oracle
(config.eval.per_image=True selects it for --mode=eval). config.eval.approximate=True
keeps the old fast approximation during training (a batch padded to one canvas: the
padding enters Mask2Former's norms and attention; not the reference's numbers).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import input_pipeline
from input_pipeline import pipeline
from input_pipeline import transforms as T
from semask_jax import compile_cache
from semask_jax.evaluation import bucketed as bucketed_lib
from semask_jax.evaluation import inference as evaluate_lib
from semask_jax.cli import ConfigError
from semask_jax.evaluation import predict
from semask_jax import sharding as sharding_lib
from semask_jax.evaluation.metrics import format_table
from semask_jax.models import model_class
from semask_jax.models.functional import merge_model


class ParamsAndStats(Protocol):
  """What evaluation needs of a model state (a train state, or one restored for inference)."""
  params: Any
  batch_stats: Any


def make_eval_fn(config: ml_collections.ConfigDict, graphdef: Any, rest: Any,
                 mesh: jax.sharding.Mesh, *, cache: dict[str, Any] | None = None
                 ) -> Callable[[ParamsAndStats], dict[str, Any]]:
  """state -> metrics dict over the whole eval split (confusion matrix on device).
  cache: shared with make_summary_images_fn (one set of compiled programs)."""
  info = input_pipeline.dataset_info(config.data.name)
  num_classes = config.model.num_classes
  names = list(info.class_names)
  if len(names) != num_classes:
    raise ConfigError(f'config.model.num_classes={num_classes} but data set '
                     f'{config.data.name!r} has {len(names)} classes')

  replicated = sharding_lib.replicated(mesh)
  if not config.eval.approximate:
    cache = {} if cache is None else cache  # one BucketedInference: compiled once per run

    def run_exact(state: ParamsAndStats) -> dict[str, Any]:
      return evaluate_exact(config, graphdef, rest, state, mesh, cache=cache)

    return run_exact

  def model_fn_from_state(params_and_stats):
    # Whole on every device: a training state split over them (config.state_sharding)
    # is gathered once per call; a replicated one passes as is.
    params, batch_stats = jax.lax.with_sharding_constraint(params_and_stats, replicated)
    model = merge_model(graphdef, params, batch_stats, rest)
    return model.segment

  step = evaluate_lib.make_eval_step(
      model_fn_from_state, num_classes, config.eval, ignore_index=config.data.ignore_index,
      probabilities=model_class(config.model).SCORES_ARE_PROBABILITIES)
  jitted = jax.jit(step, out_shardings=replicated, donate_argnums=(0,),
                   compiler_options=sharding_lib.compiler_options(config, 'eval'))
  to_global = lambda b: input_pipeline.make_global_batch(b, mesh)  # noqa: E731
  compiled: dict[tuple, Callable] = {}

  def eval_step(cm, state, batch):
    # Each batch shape compiled ahead (compile_ahead: timed, and with several processes a
    # barrier after it). The barrier matters where this is the processes' first
    # collective (a resumed run with no steps left): XLA:CPU sets gloo up there and gives
    # up after 30 s of waiting.
    key = tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(batch))
    if key not in compiled:
      compiled[key] = sharding_lib.compile_ahead(jitted, 'eval_step', cm, state, batch)
    return compiled[key](cm, state, batch)

  def run(state: ParamsAndStats) -> dict[str, Any]:
    ndev = mesh.devices.size  # eval.batch_size rounded up to a multiple of the devices
    batch_size = -(-max(int(config.eval.batch_size), 1) // ndev) * ndev
    batches = input_pipeline.create_eval_iterator(config.data, global_batch_size=batch_size)
    return evaluate_lib.evaluate(eval_step, (state.params, state.batch_stats), batches,
                                 num_classes, names, to_global, replicated)

  return run


def evaluate_exact(config: ml_collections.ConfigDict, graphdef: Any, rest: Any,
                   state: ParamsAndStats, mesh: jax.sharding.Mesh | None = None, *,
                   cache: dict[str, Any] | None = None) -> dict[str, Any]:
  """mIoU as the reference computes it, batched per bucket canvas over every device of
  the mesh (bucketed.evaluate_bucketed). Every process plans the whole split and runs
  every batch (each reads the whole batch's images)."""
  if not jax.config.jax_compilation_cache_dir:
    compile_cache.enable(None)
  mesh = mesh or sharding_lib.make_mesh()
  info = input_pipeline.dataset_info(config.data.name)
  names = list(info.class_names)
  if len(names) != config.model.num_classes:
    raise ConfigError(f'config.model.num_classes={config.model.num_classes} but data set '
                      f'{config.data.name!r} has {len(names)} classes')
  inference = _bucketed(config, graphdef, rest, state, mesh, {} if cache is None else cache)
  ratios = tuple(float(r) for r in config.eval.scales)
  tta = pipeline.is_tta(ratios, config.eval.flip)
  sizes = pipeline.per_image_eval_sizes(config.data, process_index=0, process_count=1)
  items = [(pipeline.scale_sizes(hw, config.data, ratios, tta=tta), hw) for hw in sizes]
  source = pipeline.data_source(config.data, config.data.eval_split)
  transform = pipeline.PerImageEvalTransform(config.data, ratios, tta)
  return bucketed_lib.evaluate_bucketed(inference, items,
                                        lambda i: transform.map(source[i]), names)


def _bucketed(config: ml_collections.ConfigDict, graphdef: Any, rest: Any,
              state: ParamsAndStats, mesh: jax.sharding.Mesh,
              cache: dict[str, Any]) -> bucketed_lib.BucketedInference:
  """The cached BucketedInference (its programs compile once per run) with state's params."""
  if 'inference' not in cache:
    cache['inference'] = bucketed_lib.make_bucketed_inference(
        config, graphdef, rest, state.params, state.batch_stats, mesh)
  else:
    cache['inference'].set_params((state.params, state.batch_stats))
  return cache['inference']


def evaluate_per_image(config: ml_collections.ConfigDict, graphdef: Any, rest: Any,
                       state: ParamsAndStats) -> dict[str, Any]:
  """mIoU as the reference computes it: each eval image alone at its own size (see
  evaluate.PerImageInference); every input shape compiled once, ahead of time
  (config.eval.precompile, default on), through the persistent compilation cache."""
  if not jax.config.jax_compilation_cache_dir:
    compile_cache.enable(None)
  info = input_pipeline.dataset_info(config.data.name)
  names = list(info.class_names)
  if len(names) != config.model.num_classes:
    raise ConfigError(f'config.model.num_classes={config.model.num_classes} but data set '
                      f'{config.data.name!r} has {len(names)} classes')
  inference = evaluate_lib.make_per_image_inference(config, graphdef, rest, state.params, state.batch_stats)
  ratios = tuple(float(r) for r in config.eval.scales)
  tta = pipeline.is_tta(ratios, config.eval.flip)
  items = None
  if config.eval.precompile:
    items = [(pipeline.scale_sizes(hw, config.data, ratios, tta=tta), hw)
             for hw in pipeline.per_image_eval_sizes(config.data)]
  examples = pipeline.create_per_image_eval_iterator(config.data, ratios=ratios, tta=tta)
  return evaluate_lib.evaluate_per_image(inference, examples, names, precompile_items=items)


def summary_image(image: np.ndarray, image_hw: np.ndarray, label: np.ndarray,
                  label_hw: np.ndarray, pred: np.ndarray, palette: np.ndarray,
                  data_cfg: ml_collections.ConfigDict) -> np.ndarray:
  """Input | ground truth | prediction of one eval example, uint8 [Lh, 3 * Lw, 3] (original size).

  image: normalised [Hp, Wp, 3] (valid part image_hw); label, pred: [Lh_pad, Lw_pad]
  (valid part label_hw); the masks in the data set's palette, ignored pixels black.
  """
  (h, w), (lh, lw) = image_hw, label_hw
  rgb = image[:h, :w] * np.asarray(data_cfg.std, np.float32) + np.asarray(data_cfg.mean, np.float32)
  rgb = T.resize_bilinear(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), (lh, lw))
  return np.concatenate([rgb, predict.colorize(label[:lh, :lw], palette),
                         predict.colorize(pred[:lh, :lw], palette)], axis=1)


def make_summary_images_fn(config: ml_collections.ConfigDict, graphdef: Any, rest: Any,
                           mesh: jax.sharding.Mesh, *, cache: dict[str, Any] | None = None
                           ) -> Callable[[ParamsAndStats], dict[str, np.ndarray]] | None:
  """state -> {'eval/example_<i>': summary_image} for TensorBoard, or None when turned off.

  The first `config.eval.num_summary_images` examples of the eval split, read once and
  predicted with the evaluation's exact inference (bucketed; `cache`: the one make_eval_fn
  uses, so its programs are shared), on every device (every process takes part and gets
  the whole prediction).
  """
  n = int(config.eval.num_summary_images)
  if n <= 0:
    return None
  palette = input_pipeline.dataset_info(config.data.name).palette
  ratios = tuple(float(r) for r in config.eval.scales)
  tta = pipeline.is_tta(ratios, config.eval.flip)
  shown = ratios.index(1.0) if 1.0 in ratios else 0  # the input shown: the 1.0 test image
  cache = {} if cache is None else cache
  examples: list[dict[str, Any]] = []

  def run(state: ParamsAndStats) -> dict[str, np.ndarray]:
    if not examples:
      source = pipeline.data_source(config.data, config.data.eval_split)
      transform = pipeline.PerImageEvalTransform(config.data, ratios, tta)
      examples.extend(transform.map(source[i]) for i in range(min(n, len(source))))
    if not examples:  # an empty eval split
      return {}
    inference = _bucketed(config, graphdef, rest, state, mesh, cache)
    items = [([im.shape[:2] for im in ex['images']], tuple(ex['label'].shape[:2]))
             for ex in examples]
    out = {}
    for i, pred, _ in bucketed_lib.predict_bucketed(inference, items, examples.__getitem__):
      ex = examples[i]  # every process read them all (the load reads only its rows)
      image = ex['images'][shown]
      out[f'eval/example_{i}'] = summary_image(image, image.shape[:2], ex['label'],
                                               ex['label'].shape, pred, palette, config.data)
    return dict(sorted(out.items()))

  return run


def write_eval_results(workdir: str, step: int, results: dict[str, Any]) -> str:
  """workdir/eval/step_<n>.json and workdir/eval_results.json (latest); process 0 only."""
  if jax.process_index() != 0:
    return ''
  results = dict(results, step=int(step))
  os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
  path = os.path.join(workdir, 'eval', f'step_{step}.json')
  for p in (path, os.path.join(workdir, 'eval_results.json')):
    with open(p, 'w') as f:
      json.dump(results, f, indent=1)
  return path
