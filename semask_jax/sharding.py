"""Device mesh and shardings: data parallelism over every device of every process.

Parameters, optimizer state and batch-norm statistics are replicated; batches
are split along the leading axis over the 'data' mesh axis. The axis is of type
Auto (GSPMD propagation): under Explicit axes, the default of `jax.make_mesh`,
the model's window reshapes of a sharded batch do not type-check.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  if devices == jax.devices():
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree (identical on every process) replicated on the mesh."""
  sharding = replicated(mesh)

  def put(x: Any) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree_util.tree_map(put, tree)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.size
  if global_batch_size % n:
    raise ValueError(f'config.batch_size={global_batch_size} (per micro step) is not divisible by '
                     f'the {n} devices of the mesh; change batch_size or grad_accum_steps')


# XLA:CPU spends minutes optimising the backward pass of a small model; -O0 compiles
# 2-3x faster and runs tiny models about as fast (config.xla_cpu_fast_compile).
_FAST_COMPILE_CPU = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


# XLA:GPU's triton-softmax-rewriter turns every softmax / LayerNorm "diamond" (a row
# reduction and its broadcast back) into a Triton fusion; the priority-fusion pass then
# prices each producer it could pull into one of them with a tiling search. For SeMask-B
# training that is most of the cold compile (PERF_NOTES, "deviceless GPU compiles").
_NO_TRITON_SOFTMAX_GPU = {'xla_disable_hlo_passes': 'triton-softmax-rewriter'}


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """Per-program XLA options of the config for the default backend (jax.jit's
  compiler_options), or None."""
  backend = jax.default_backend()
  if config.get('xla_cpu_fast_compile') and backend == 'cpu':
    return dict(_FAST_COMPILE_CPU)
  if not config.get('xla_gpu_triton_softmax_fusions', True) and backend == 'gpu':
    return dict(_NO_TRITON_SOFTMAX_GPU)
  return None
