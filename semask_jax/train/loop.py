"""Training loop: data-parallel SeMask training with checkpoint/resume, periodic eval and logging.

Functional core: the NNX model is split once into (graphdef, params,
batch_stats); the jitted step merges them, runs the model in train mode (batch
norm over the global batch = SyncBN under GSPMD), and returns the new state.
Every random draw comes from `fold_in(state.rng, state.step)`, and the data
stream is the grain iterator saved with each checkpoint, so a restarted run
reproduces an uninterrupted one batch for batch and loss for loss.

Steps: everything a user sees counts optimizer updates (reference iterations
of `batch_size` images): `config.total_steps`, every `*_every_steps`, the log
lines, the checkpoint directories (`checkpoints/<update>`), `eval/step_<update>.json`
and TensorBoard. Only the internal `state.step` counts micro steps (one jitted
call on `batch_size // grad_accum_steps` images; `grad_accum_steps` per update),
since it keys the per-call randomness; checkpoints are written at update
boundaries only.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

import input_pipeline
from semask_jax.train import checkpointing
from semask_jax.train import optim
from semask_jax import sharding as sharding_lib
from semask_jax.train import summary
from semask_jax.cli import ConfigError
from semask_jax.evaluation.evaluator import make_eval_fn, make_summary_images_fn, write_eval_results
from semask_jax.losses import mask2former as mask2former_loss
from semask_jax.losses import maskformer as maskformer_loss
from semask_jax.losses.segmentation import REDUCTIONS, check_ce_backward, segmentation_loss
from semask_jax.models import SeMaskMask2Former, SeMaskMaskFormer, layers, model_class
from semask_jax.train.state import TrainState, create_model, init_train_state, merge_model


class NonFiniteLossError(RuntimeError):
  pass


def micro_batch_size(config: ml_collections.ConfigDict) -> int:
  k = int(config.grad_accum_steps)
  if k < 1 or config.batch_size % k:
    raise ConfigError(f'config.batch_size={config.batch_size} is not divisible by '
                     f'config.grad_accum_steps={k}')
  return config.batch_size // k


# ----------------------------------------------------------------------------- step


LossFn = Callable[[Mapping[str, Any], jax.Array, jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]
# fold_in constant that separates the criterion's point draws from the model's dropout keys.
_CRITERION_STREAM = 0x51EB


def criterion_config(config: ml_collections.ConfigDict, cls: type) -> Any:
  """A set criterion's settings (`cls`: mask2former_loss.CriterionConfig or
  maskformer_loss.MaskFormerCriterionConfig) from config.loss and config.data."""
  fields = [f.name for f in dataclasses.fields(cls)]
  return cls(num_classes=config.model.num_classes, ignore_index=config.data.ignore_index,
             **{k: config.loss[k] for k in fields if k in config.loss and k != 'num_classes'})


def check_group_size(config: ml_collections.ConfigDict, used: bool) -> int:
  """config.loss.group_size, refused up front where it is not an integer >= 0 or, where
  the loss uses it, does not divide the micro batch."""
  group = mask2former_loss.check_group_size(config.loss.group_size)
  if used and group and micro_batch_size(config) % group:
    raise ConfigError(f'config.loss.group_size={group} does not divide the micro batch '
                      f'of {micro_batch_size(config)} images (config.batch_size / '
                      f'config.grad_accum_steps)')
  return group


def make_loss(config: ml_collections.ConfigDict) -> LossFn:
  """(model outputs, labels [B, H, W], rng) -> (loss, scalar metrics) for config.model's head.

  SeMask-FPN: CE on the FPN logits + cate_w * CE on the semantic decoder (SPEC 3).
  SeMask-Mask2Former / SeMask-MaskFormer: the set criterion over all predictions
  (SPEC 10 / 11); the metrics are the final prediction's terms.
  """
  family = model_class(config.model)
  if family in (SeMaskMask2Former, SeMaskMaskFormer):
    check_group_size(config, used=True)  # loss_ce and loss_cate are per-group means
    if family is SeMaskMask2Former:
      crit = criterion_config(config, mask2former_loss.CriterionConfig)
      criterion = lambda out, labels, rng: mask2former_loss.set_criterion(  # noqa: E731
          out, labels, crit, key=jax.random.fold_in(rng, _CRITERION_STREAM))
    else:  # the MaskFormer criterion draws nothing
      crit = criterion_config(config, maskformer_loss.MaskFormerCriterionConfig)
      criterion = lambda out, labels, rng: maskformer_loss.set_criterion(  # noqa: E731
          out, labels, crit)

    @jax.named_scope("loss")
    def set_loss(out, labels, rng):
      total, aux = criterion(out, labels, rng)
      metrics = {f'loss_{k}': aux[f'loss_{k}'][-1] for k in ('ce', 'mask', 'dice', 'cate')}
      metrics['num_masks'] = aux['num_masks']
      metrics['dropped_targets'] = aux['num_dropped_targets'].sum().astype(jnp.float32)
      return total, metrics

    return set_loss
  loss_cfg = config.loss
  check_ce_backward(loss_cfg.ce_backward)
  group = check_group_size(config, used=bool(loss_cfg.ohem_min_kept))
  if loss_cfg.reduction not in REDUCTIONS:
    raise ConfigError(f'config.loss.reduction must be one of {REDUCTIONS}, '
                      f'got {loss_cfg.reduction!r}')

  @jax.named_scope("loss")
  def fpn_loss(out, labels, rng):
    del rng
    return segmentation_loss(out, labels, ignore_index=config.data.ignore_index,
                             cate_w=loss_cfg.cate_w, reduction=loss_cfg.reduction,
                             ohem_min_kept=loss_cfg.ohem_min_kept,
                             ohem_group_size=group,
                             ce_backward=loss_cfg.ce_backward)

  return fpn_loss


GradFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array],
                  tuple[tuple[jax.Array, tuple[dict[str, jax.Array], Any]], Any]]


def make_grad_fn(graphdef: Any, rest: Any, config: ml_collections.ConfigDict) -> GradFn:
  """The train step's forward (train mode) and backward, on its own for checks and tools:

  (params, batch_stats, batch, rng) -> ((loss, (metrics, new batch_stats)), grads wrt params).
  """
  compute_loss = make_loss(config)

  def loss_fn(params, batch_stats, batch, rng):
    model = merge_model(graphdef, params, batch_stats, rest)
    out = model(batch['image'], train=True, rng=rng)
    loss, aux = compute_loss(out, batch['label'], rng)
    new_bs = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return loss, (aux, new_bs)

  return jax.value_and_grad(loss_fn, has_aux=True)


def make_train_step(graphdef: Any, rest: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict,
                    param_shardings: Any = None
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """One micro step: forward/backward on a global batch, (accumulated) AdamW update, guard.

  param_shardings: the state's parameter shardings, where they split the parameters
  (config.state_sharding='fsdp'): each matmul and convolution weight is then gathered
  whole after its cast to the compute dtype (layers.gathered_weights), and the gradients
  are constrained to the parameters' splits (XLA reduce-scatters them), so that the
  optimizer updates each device's part alone. Gathering the float32 parameters whole up
  front held a float32 copy of the model through the step (SeMask-T on a v5e-4: 3.59
  against 3.29 GiB per chip); leaving the weights to GSPMD let their splits reach the
  activations (docs/performance.md).

  The guard: a micro step whose loss or gradient norm is not finite changes nothing but
  the step and `nonfinite` counters (its micro batch is dropped; the run stops after
  config.max_nonfinite_steps of them). Under accumulation every update still averages
  k finite micro batches, so after a dropped one the updates fall one micro step later
  than the loop's k-step log windows, and the run's last update may be left incomplete.
  """
  grad_fn = make_grad_fn(graphdef, rest, config)
  split = param_shardings is not None and not sharding_lib.is_replicated(param_shardings)
  whole = (sharding_lib.replicated(jax.tree_util.tree_leaves(param_shardings)[0].mesh)
           if split else None)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    with layers.gathered_weights(whole):
      (loss, (aux, new_bs)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    if split:
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    with jax.named_scope("optimizer"):
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


def jit_train_step(train_step: Callable, state_sharding: Any, mesh: jax.sharding.Mesh,
                   options: dict[str, Any] | None = None) -> Callable:
  batch_sharding = sharding_lib.data_sharded(mesh)
  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,), compiler_options=options)


# ----------------------------------------------------------------------------- logging helpers


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))


def progress_line(update: int, total: int, m: Mapping[str, float], images_per_s: float,
                  eta_s: float) -> str:
  terms = ' '.join(f'{k} {m[k]:.4f}' for k in ('loss', 'loss_ce', 'loss_mask', 'loss_dice',
                                                'loss_cate') if k in m)
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
  sharding_lib.set_jax_compile_flags(config)
  make_loss(config)  # its settings checked before the data and the model are built
  sharding_lib.check_state_sharding(config)
  mesh = sharding_lib.make_mesh()
  k = int(config.grad_accum_steps)
  micro_bs = micro_batch_size(config)
  sharding_lib.check_batch_divisible(micro_bs, mesh)
  logging.info('Mesh %s over %d processes; global micro batch %d x %d accumulation',
               dict(mesh.shape), jax.process_count(), micro_bs, k)

  # The data first: a data set that is not prepared fails before the model is built.
  set_heads = (SeMaskMask2Former, SeMaskMaskFormer)  # a fixed number of target slots
  slots = config.loss.max_targets if model_class(config.model) in set_heads else None
  train_iter = input_pipeline.create_train_iterator(config.data, seed=config.seed,
                                                    global_batch_size=micro_bs,
                                                    max_targets=slots)
  model = create_model(config)
  state, graphdef, rest, tx, schedule = init_train_state(config, model, mesh)
  del model
  logging.info('Parameters: %d (train state %s)', optim.count_params(state.params),
               config.state_sharding)
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  train_step = jit_train_step(make_train_step(graphdef, rest, tx, schedule, config,
                                              state_sharding.params),
                              state_sharding, mesh,
                              sharding_lib.compiler_options(config, 'train'))
  inference_cache: dict = {}  # the evaluation's compiled programs, shared by both
  run_eval = make_eval_fn(config, graphdef, rest, mesh, cache=inference_cache)
  summary_images = make_summary_images_fn(config, graphdef, rest, mesh,
                                          cache=inference_cache)  # None: off
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    keep=config.keep_checkpoints,
                                    async_save=config.async_checkpointing)
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info('Resuming from %s/%d', ckpt.directory, latest)
    state = ckpt.restore(latest, checkpointing.abstract_like(state), train_iter)
  # After the resume: a config refused by the workdir's checkpoint leaves its config.json.
  save_config(config, workdir)
  micro = int(jax.device_get(state.step.addressable_data(0)))
  start_micro = micro
  total_micro = config.total_steps * k

  first_batch = None
  if micro < total_micro:  # compiled ahead: the log says how long, processes start together
    first_batch = input_pipeline.make_global_batch(next(train_iter), mesh)
    train_step = sharding_lib.compile_ahead(train_step, 'train_step', state, first_batch)

  writer = summary.MetricWriter(workdir, enabled=jax.process_index() == 0)
  results: dict[str, Any] = {}
  pending: list[dict[str, jax.Array]] = []
  t_last, micro_last = time.time(), micro
  last_loss = float('nan')
  try:
    with _SigtermFlag() as sigterm:
      while micro < total_micro:
        if first_batch is not None:
          batch, first_batch = first_batch, None
        else:
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
          ckpt.save(update, state, train_iter, force=last)
        if config.eval_every_steps and (update % config.eval_every_steps == 0 or last):
          results = run_eval(state)
          write_eval_results(workdir, update, results)
          writer.write_scalars(update, {f'eval/{m}': results[m] for m in ('mIoU', 'mAcc', 'aAcc')})
          if summary_images:  # every process: a jitted call on the replicated state
            writer.write_images(update, summary_images(state))
          if jax.process_index() == 0:
            logging.info('eval step %d: mIoU %.4f aAcc %.4f mAcc %.4f', update,
                         results['mIoU'], results['aAcc'], results['mAcc'])
        # Multi-process: the flag is agreed on (a collective) at log steps only.
        if ((jax.process_count() == 1 or update % config.log_every_steps == 0 or last)
            and sigterm.any_process()):
          ckpt.save(update, state, train_iter, force=True)
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
