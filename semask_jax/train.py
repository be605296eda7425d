"""Training loop: data-parallel SeMask training with checkpoint/resume, periodic eval and logging.

Functional core: the NNX model is split once into (graphdef, params,
batch_stats); the jitted step merges them, runs the model in train mode (batch
norm over the global batch = SyncBN under GSPMD), and returns the new state.
Every random draw comes from `fold_in(state.rng, state.step)`, and the data
stream is the grain iterator saved with each checkpoint, so a restarted run
reproduces an uninterrupted one batch for batch and loss for loss.

Steps: `state.step` counts micro steps (one jitted call on one global batch of
`batch_size // grad_accum_steps` images); `config.total_steps` and all
`*_every_steps` count optimizer updates (reference iterations of
`batch_size` images), i.e. `grad_accum_steps` micro steps each.
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

import input_pipeline
from semask_jax import checkpointing
from semask_jax import evaluate as evaluate_lib
from semask_jax import optim
from semask_jax import sharding as sharding_lib
from semask_jax import summary
from semask_jax.losses import segmentation_loss
from semask_jax.models import build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 [], micro steps done
  params: Any            # pure dict of f32 arrays (PyTorch-like names)
  batch_stats: Any       # pure dict: BN running mean/var
  opt_state: Any
  rng: jax.Array         # uint32 [2], base key; per step: fold_in(rng, step)
  nonfinite: jax.Array   # int32 [], micro steps skipped for a non-finite loss/grad


class NonFiniteLossError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- model / state


def create_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """Builds the model from config.model and loads `config.init_from` if set."""
  model = build_model(config.model, rngs=nnx.Rngs(config.seed))
  if config.get('init_from'):
    path = config.init_from
    if not os.path.exists(path):
      raise FileNotFoundError(f'config.init_from={path!r} does not exist')
    from convert_weights import load_into_model  # pylint: disable=g-import-not-at-top
    report = load_into_model(model, path)
    logging.info('Initialised from %s: %s', path, report)
  return model


def split_model(model: nnx.Module) -> tuple[Any, dict, dict, Any]:
  """(graphdef, params, batch_stats, rest) with params/batch_stats as pure dicts."""
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats), rest


def merge_model(graphdef: Any, params: dict, batch_stats: dict, rest: Any) -> nnx.Module:
  return nnx.merge(graphdef, params, batch_stats, rest, copy=True)


def micro_batch_size(config: ml_collections.ConfigDict) -> int:
  k = int(config.grad_accum_steps)
  if k < 1 or config.batch_size % k:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by '
                     f'config.grad_accum_steps={k}')
  return config.batch_size // k


# ----------------------------------------------------------------------------- step


def make_train_step(graphdef: Any, rest: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """One micro step: forward/backward on a global batch, (accumulated) AdamW update, guard."""
  loss_cfg = config.loss

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      model = merge_model(graphdef, params, state.batch_stats, rest)
      out = model(batch['image'], train=True, rng=rng)
      loss, aux = segmentation_loss(out, batch['label'], cate_w=loss_cfg.cate_w,
                                    reduction=loss_cfg.reduction,
                                    ohem_min_kept=loss_cfg.ohem_min_kept)
      new_bs = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return loss, (aux, new_bs)

    (loss, (aux, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        batch_stats=keep(new_bs, state.batch_stats),
        opt_state=keep(new_opt, state.opt_state),
        nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite.astype(jnp.float32),
               'lr': optim.current_lr(schedule, state.opt_state), **aux}
    return new_state, metrics

  return train_step


# XLA:CPU spends minutes optimising the backward pass of a small model; -O0 compiles
# 2-3x faster and runs tiny models about as fast (config.xla_cpu_fast_compile).
_FAST_COMPILE_CPU = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  if config.get('xla_cpu_fast_compile') and jax.default_backend() == 'cpu':
    return dict(_FAST_COMPILE_CPU)
  return None


def jit_train_step(train_step: Callable, state_sharding: Any, mesh: jax.sharding.Mesh,
                   options: dict[str, Any] | None = None) -> Callable:
  batch_sharding = sharding_lib.data_sharded(mesh)
  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,), compiler_options=options)


def init_train_state(config: ml_collections.ConfigDict, model: nnx.Module, mesh: jax.sharding.Mesh
                     ) -> tuple[TrainState, Any, Any, optax.GradientTransformation, optax.Schedule]:
  """Replicated initial state + (graphdef, rest, tx, schedule)."""
  graphdef, params, batch_stats, rest = split_model(model)
  tx, schedule = optim.create_optimizer(config, params)
  host = TrainState(step=np.int32(0), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params),
                    rng=np.asarray(jax.random.key_data(jax.random.key(config.seed + 1)), np.uint32),
                    nonfinite=np.int32(0))
  host = jax.tree_util.tree_map(np.asarray, host)
  return sharding_lib.replicate(host, mesh), graphdef, rest, tx, schedule


# ----------------------------------------------------------------------------- eval glue


def make_eval_fn(config: ml_collections.ConfigDict, graphdef: Any, rest: Any,
                 mesh: jax.sharding.Mesh) -> Callable[[TrainState], dict[str, Any]]:
  """state -> metrics dict over the whole eval split (confusion matrix on device)."""
  info = input_pipeline.dataset_info(config.data.name)
  num_classes = config.model.num_classes
  names = list(info.class_names)
  if len(names) != num_classes:
    raise ValueError(f'config.model.num_classes={num_classes} but data set '
                     f'{config.data.name!r} has {len(names)} classes')

  def model_fn_from_state(params_and_stats):
    params, batch_stats = params_and_stats
    model = merge_model(graphdef, params, batch_stats, rest)
    return lambda images: model(images, train=False)['seg_logits']

  step = evaluate_lib.make_eval_step(model_fn_from_state, num_classes, config.eval)
  replicated = sharding_lib.replicated(mesh)
  eval_step = jax.jit(step, out_shardings=replicated, donate_argnums=(0,),
                      compiler_options=compiler_options(config))
  to_global = lambda b: input_pipeline.make_global_batch(b, mesh)  # noqa: E731

  def run(state: TrainState) -> dict[str, Any]:
    batches = input_pipeline.create_eval_iterator(config.data,
                                                  global_batch_size=config.eval.batch_size)
    return evaluate_lib.evaluate(eval_step, (state.params, state.batch_stats), batches,
                                 num_classes, names, to_global, replicated)

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


# ----------------------------------------------------------------------------- logging helpers


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))


def progress_line(update: int, total: int, m: Mapping[str, float], images_per_s: float,
                  eta_s: float) -> str:
  terms = ' '.join(f'{k} {m[k]:.4f}' for k in ('loss', 'loss_ce', 'loss_cate') if k in m)
  eta = time.strftime('%H:%M:%S', time.gmtime(max(eta_s, 0)))
  return (f'step {update}/{total} {terms} lr {m["lr"]:.3e} '
          f'{images_per_s:.1f} img/s ETA {eta}')


class _SigtermFlag:
  """Set by SIGTERM (preemption); the loop then saves a final checkpoint and returns."""

  def __init__(self):
    self.set = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.set = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    """The flag OR-ed over processes (all of them must take part in the final save)."""
    if jax.process_count() == 1:
      return self.set
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.set))))


# ----------------------------------------------------------------------------- entry points


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from workdir if it holds a checkpoint), evaluates, returns the last eval."""
  workdir = os.path.abspath(workdir)
  save_config(config, workdir)
  mesh = sharding_lib.make_mesh()
  k = int(config.grad_accum_steps)
  micro_bs = micro_batch_size(config)
  sharding_lib.check_batch_divisible(micro_bs, mesh)
  logging.info('Mesh %s over %d processes; global micro batch %d x %d accumulation',
               dict(mesh.shape), jax.process_count(), micro_bs, k)

  model = create_model(config)
  state, graphdef, rest, tx, schedule = init_train_state(config, model, mesh)
  del model
  logging.info('Parameters: %d', optim.count_params(state.params))
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  train_step = jit_train_step(make_train_step(graphdef, rest, tx, schedule, config),
                              state_sharding, mesh, compiler_options(config))
  run_eval = make_eval_fn(config, graphdef, rest, mesh)

  train_iter = input_pipeline.create_train_iterator(config.data, seed=config.seed,
                                                    global_batch_size=micro_bs)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    keep=config.keep_checkpoints,
                                    async_save=config.async_checkpointing)
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info('Resuming from %s/%d', ckpt.directory, latest)
    state = ckpt.restore(latest, checkpointing.abstract_like(state), train_iter)
  micro = int(jax.device_get(state.step.addressable_data(0)))
  start_micro = micro
  total_micro = config.total_steps * k

  writer = summary.MetricWriter(workdir, enabled=jax.process_index() == 0)
  results: dict[str, Any] = {}
  pending: list[dict[str, jax.Array]] = []
  t_last, micro_last = time.time(), micro
  last_loss = float('nan')
  try:
    with _SigtermFlag() as sigterm:
      while micro < total_micro:
        batch = input_pipeline.make_global_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch)
        micro += 1
        pending.append(metrics)
        if micro % k:
          continue
        update = micro // k
        last = micro == total_micro
        if update % config.log_every_steps == 0 or last:
          host = jax.device_get(pending)
          pending = []
          avg = {key: float(np.mean([h[key] for h in host])) for key in host[0]}
          skipped = int(jax.device_get(state.nonfinite.addressable_data(0)))
          avg['nonfinite_total'] = skipped
          now = time.time()
          ips = (micro - micro_last) * micro_bs / max(now - t_last, 1e-9)
          eta = (total_micro - micro) * (now - t_last) / max(micro - micro_last, 1)
          t_last, micro_last = now, micro
          avg['images_per_s'] = ips
          last_loss = avg['loss']
          writer.write_scalars(update, avg)
          if jax.process_index() == 0:
            logging.info(progress_line(update, config.total_steps, avg, ips, eta))
          if skipped > config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f'{skipped} steps had a non-finite loss or gradient (limit '
                f'config.max_nonfinite_steps={config.max_nonfinite_steps}); stopped at step '
                f'{update}. Lower the learning rate, use float32, or check the data.')
        if update % config.checkpoint_every_steps == 0 or last:
          ckpt.save(micro, state, train_iter, force=last)
        if config.eval_every_steps and (update % config.eval_every_steps == 0 or last):
          results = run_eval(state)
          write_eval_results(workdir, update, results)
          writer.write_scalars(update, {f'eval/{m}': results[m] for m in ('mIoU', 'mAcc', 'aAcc')})
          if jax.process_index() == 0:
            logging.info('eval step %d: mIoU %.4f aAcc %.4f mAcc %.4f', update,
                         results['mIoU'], results['aAcc'], results['mAcc'])
        # Multi-process: the flag is agreed on (a collective) at log steps only.
        if ((jax.process_count() == 1 or update % config.log_every_steps == 0 or last)
            and sigterm.any_process()):
          ckpt.save(micro, state, train_iter, force=True)
          logging.warning('Stopped by SIGTERM after step %d; checkpoint saved.', update)
          break
      if not results and config.eval_every_steps and micro >= total_micro:
        results = run_eval(state)  # a finished run restarted: report its evaluation again
        write_eval_results(workdir, micro // k, results)
      if micro == start_micro:  # restarted after the last step: nothing was trained
        logging.info('process %d of %d: already at step %d of %d, nothing to train',
                     jax.process_index(), jax.process_count(), micro // k, config.total_steps)
      else:
        logging.info('process %d of %d finished at step %d; last loss %.8g', jax.process_index(),
                     jax.process_count(), micro // k, last_loss)  # every process: for checks
  finally:
    writer.close()
    ckpt.close()
  return results


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          mesh: jax.sharding.Mesh) -> tuple[TrainState, Any, Any, int]:
  """(state, graphdef, rest, step) from workdir's latest checkpoint, or config.init_from."""
  model = create_model(config)
  state, graphdef, rest, _, _ = init_train_state(config, model, mesh)
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  step = 0
  if os.path.isdir(ckpt_dir):
    ckpt = checkpointing.Checkpointer(ckpt_dir, async_save=False)
    latest = ckpt.latest_step()
    if latest is not None:
      state = ckpt.restore(latest, checkpointing.abstract_like(state))
      step = latest // int(config.grad_accum_steps)
    ckpt.close()
  if step == 0 and not config.get('init_from'):
    raise FileNotFoundError(f'no checkpoint in {ckpt_dir} and no config.init_from: '
                            'nothing to evaluate or predict with')
  return state, graphdef, rest, step


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode eval: the latest checkpoint of workdir (or init_from) on the eval split."""
  mesh = sharding_lib.make_mesh()
  state, graphdef, rest, step = restore_for_inference(config, workdir, mesh)
  results = make_eval_fn(config, graphdef, rest, mesh)(state)
  path = write_eval_results(workdir, step, results)
  from semask_jax.metrics import format_table  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    logging.info('Eval of step %d (%s):\n%s', step, path, format_table(results))
  return results


def predict_only(config: ml_collections.ConfigDict, workdir: str, inputs: str,
                 output_dir: str | None = None) -> list[str]:
  """--mode predict: colour masks and overlays for an image or a folder of images."""
  from semask_jax import predict  # pylint: disable=g-import-not-at-top
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
