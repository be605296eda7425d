"""Model state: building the model, its functional split, the train state, restoring it.

The NNX model is split once into (graphdef, params, batch_stats, rest); the
jitted functions take the pure-dict params and batch statistics as arguments
and merge them back into a module inside the trace. Training, evaluation and
prediction all start from here.
"""
from __future__ import annotations

import os
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from semask_jax.train import checkpointing
from semask_jax.train import optim
from semask_jax import cli
from semask_jax import sharding as sharding_lib
from semask_jax.models import build_model
from semask_jax.models.functional import merge_model, split_model  # noqa: F401  (re-exported)


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 [], micro steps done
  params: Any            # pure dict of f32 arrays (PyTorch-like names)
  batch_stats: Any       # pure dict: BN running mean/var
  opt_state: Any
  rng: jax.Array         # uint32 [2], base key; per step: fold_in(rng, step)
  nonfinite: jax.Array   # int32 [], micro steps skipped for a non-finite loss/grad


def create_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """Builds the model from config.model and loads `config.init_from` if set."""
  model = build_model(config.model, rngs=nnx.Rngs(config.seed))
  if config.get('init_from'):
    path = config.init_from
    if not os.path.exists(path):
      raise cli.PathNotFoundError(f'config.init_from={path!r} does not exist')
    from convert_weights import load_into_model  # pylint: disable=g-import-not-at-top
    report = load_into_model(model, path)
    logging.info('Initialised from %s: %s', path, report)
  return model


def init_train_state(config: ml_collections.ConfigDict, model: nnx.Module, mesh: jax.sharding.Mesh
                     ) -> tuple[TrainState, Any, Any, optax.GradientTransformation, optax.Schedule]:
  """Initial state on the mesh + (graphdef, rest, tx, schedule).

  The state is replicated, or split over the devices where config.state_sharding is
  'fsdp' (sharding.state_shardings)."""
  graphdef, params, batch_stats, rest = split_model(model)
  tx, schedule = optim.create_optimizer(config, params)
  host = TrainState(step=np.int32(0), params=params, batch_stats=batch_stats,
                    opt_state=jax.jit(tx.init)(params),  # one program, not one per leaf shape
                    rng=np.asarray(jax.random.key_data(jax.random.key(config.seed + 1)), np.uint32),
                    nonfinite=np.int32(0))
  host = jax.tree_util.tree_map(np.asarray, host)
  mode, min_size = sharding_lib.check_state_sharding(config)
  shardings = sharding_lib.state_shardings(host, mesh, mode, min_size)
  return sharding_lib.place(host, shardings), graphdef, rest, tx, schedule


@flax.struct.dataclass
class InferenceState:
  """What evaluation and prediction need of a train state."""
  params: Any
  batch_stats: Any


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          mesh: jax.sharding.Mesh) -> tuple[InferenceState, Any, Any, int]:
  """(state, graphdef, rest, step) from workdir's latest checkpoint, or config.init_from.

  From a checkpoint, only params and batch_stats are read, into a model built
  abstractly: no random initialisation, no optimizer state (AdamW's is twice the
  model), so inference holds one copy of the weights.
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  ckpt = checkpointing.Checkpointer(ckpt_dir, async_save=False) if os.path.isdir(ckpt_dir) else None
  latest = ckpt.latest_step() if ckpt else None
  try:
    if latest is None:
      if not config.get('init_from'):  # before building the model: fail fast
        raise cli.PathNotFoundError(f'no checkpoint in {ckpt_dir} and no config.init_from: '
                                    'nothing to evaluate or predict with')
      graphdef, params, batch_stats, rest = split_model(create_model(config))
      state = InferenceState(*sharding_lib.replicate((params, batch_stats), mesh))
      return state, graphdef, rest, 0
    abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(config.seed)))
    graphdef, params, batch_stats, rest = split_model(abstract)
    if jax.tree_util.tree_leaves(rest):  # not checkpointed: would need a concrete init
      raise NotImplementedError('model has variables other than params and batch_stats')
    replicated = sharding_lib.replicated(mesh)
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        {'params': params, 'batch_stats': batch_stats})
    restored = ckpt.restore_fields(latest, target)
    # checkpoints are numbered by optimizer updates
    return InferenceState(restored['params'], restored['batch_stats']), graphdef, rest, latest
  finally:
    if ckpt:
      ckpt.close()
