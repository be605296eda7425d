"""Device mesh and shardings: data parallelism over every device of every process.

Batches are split along the leading axis over the 'data' mesh axis. The train state
(parameters, optimizer state, batch-norm statistics) is replicated by default;
`config.state_sharding='fsdp'` splits its large arrays over the same axis instead
(`state_shardings`). The axis is of type Auto (GSPMD propagation): under Explicit
axes, the default of `jax.make_mesh`, the model's window reshapes of a sharded batch
do not type-check.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semask_jax.cli import ConfigError

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
  return place(tree, state_shardings(tree, mesh))


STATE_SHARDINGS = ('replicated', 'fsdp')


def check_state_sharding(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """(config.state_sharding, config.fsdp_min_size), checked."""
  mode = config.state_sharding
  if mode not in STATE_SHARDINGS:
    raise ConfigError(f'config.state_sharding must be one of {STATE_SHARDINGS}, got {mode!r}')
  min_size = config.fsdp_min_size
  if not isinstance(min_size, int) or min_size < 0:
    raise ConfigError(f'config.fsdp_min_size must be an integer >= 0, got {min_size!r}')
  return mode, min_size


def fsdp_spec(shape: tuple[int, ...], num_devices: int, min_size: int) -> P:
  """The FSDP split of an array of `shape`: its first axis that the devices divide, over
  the data axis; P() (replicated) for an array of fewer than `min_size` elements or with
  no such axis.

  The first axis rather than the largest (big_vision's choice): the kernels here are
  [in, out] and packed ones are packed along `out` (the Mask2Former decoder's attention
  slices q, k and v out of in_proj_weight [C, 3C]); slicing a weight along its split
  axis costs a collective-permute per slice (SeMask-L Mask2Former over 16 v5e chips:
  1361 of them with the largest axis).
  """
  if num_devices == 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
    return P()
  axis = next((a for a, n in enumerate(shape) if n % num_devices == 0), None)
  return P() if axis is None else P(*([None] * axis + [DATA_AXIS]))


def state_shardings(tree: Any, mesh: Mesh, mode: str = 'replicated', min_size: int = 0) -> Any:
  """A NamedSharding per leaf of a train-state tree (arrays or ShapeDtypeStructs).

  'replicated': every leaf whole on every device. 'fsdp' (ZeRO-3 / big_vision's fsdp
  rule): each leaf of at least `min_size` elements split along one axis (fsdp_spec), so
  a device holds 1/n of the parameters and of AdamW's two moments (the moments have the
  parameters' shapes and get the same splits). In the training step each weight is
  gathered whole after its cast to the compute dtype and the gradients are
  reduce-scattered to the splits (train.make_train_step): more collectives, and the
  state's memory per device divided by n. Arrays under `min_size` elements stay whole:
  splitting them saves little and costs a collective each.
  """
  if mode not in STATE_SHARDINGS:
    raise ValueError(f'mode must be one of {STATE_SHARDINGS}, got {mode!r}')
  if mode == 'replicated':
    return jax.tree_util.tree_map(lambda _: replicated(mesh), tree)
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.size, min_size)), tree)


def place(tree: Any, shardings: Any) -> Any:
  """Places a host pytree (identical on every process) on the mesh with per-leaf shardings."""
  def put(x: Any, sharding: NamedSharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree_util.tree_map(put, tree, shardings)


def is_replicated(shardings: Any) -> bool:
  return all(s.is_fully_replicated for s in jax.tree_util.tree_leaves(shardings))


_barrier_ids = itertools.count()


def compile_ahead(jitted: Any, name: str, *args: Any) -> Callable:
  """jitted compiled now for args (its time logged: on a GPU a cold compile can take
  minutes), returned once every process has compiled it.

  With several processes, a process that compiles faster (a cache hit, a less loaded
  host) would otherwise reach the program's first collective long before the others
  and wait there; XLA:CPU's gloo set-up gives up after 30 s of that. The processes meet
  at a barrier of the coordination service (not a device collective) after compiling
  instead. Every process must make the same calls in the same order (the barriers are
  numbered)."""
  logging.info('Compiling %s', name)
  t0 = time.time()
  compiled = jitted.lower(*args).compile()
  if jax.process_count() == 1:
    logging.info('%s compiled in %.1f s', name, time.time() - t0)
    return compiled
  logging.info('%s compiled in %.1f s; waiting for the other processes', name,
               time.time() - t0)
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  multihost.get_barrier_sync_fn()(key=f'semask_{name}_compiled_{next(_barrier_ids)}',
                                  timeout_ms=3_600_000)
  return compiled


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.size
  if global_batch_size % n:
    raise ValueError(f'config.batch_size={global_batch_size} (per micro step) is not divisible by '
                     f'the {n} devices of the mesh; change batch_size or grad_accum_steps')


# XLA:CPU spends minutes optimising the backward pass of a small model; -O0 compiles
# 2-3x faster and runs tiny models about as fast (config.xla_cpu_fast_compile).
_FAST_COMPILE_CPU = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}

# XLA:CPU's YNNPACK fusions, per program (config.xla_cpu_ynn_fusions='tuned'). XLA's default
# list (jaxlib 0.10) hands YNNPACK each dot, each convolution, and each reduction together
# with its element-wise producers (a LayerNorm with the residual add, bias and GELU before
# it). Measured on 2 CPU cores, SeMask-T and -B at 512x512 (docs/performance.md):
# - training without YNNPACK's convolutions: Eigen's convolution gradients are 1.1-2.8x
#   faster (the FPN head's 3x3 96 -> 256 at 128x128: 389 -> 141 ms forward + backward);
#   the SeMask-T step 8-12 % faster, SeMask-B 2.5 %; same memory. The reduce fusions stay:
#   without them the T step was 20 % slower.
# - evaluation and prediction without the reduce fusions: such a fusion takes every scalar
#   constant of its chain as an operand of the chain's full shape, materialised in memory
#   (two [1, 128, 128, 384] maps for the GELU's constants in SeMask-T's first stage).
#   SeMask-T inference 0.73 -> 0.57 GiB peak RSS (XLA temporaries 135 -> 58 MB) and 7 %
#   faster; SeMask-B 1.13 -> 0.95 GiB but 9 % slower.
_YNN_FUSIONS = 'xla_cpu_experimental_ynn_fusion_type'
_YNN_TUNED = {
    'train': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
    'eval': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION',
}
CPU_YNN_FUSIONS = ('tuned', 'xla')


# Faster XLA:GPU compiles (config.xla_gpu_fast_compile). XLA's triton-softmax-rewriter
# turns every softmax / LayerNorm "diamond" (a row reduction and its broadcast back) into
# a Triton fusion, and the priority-fusion pass then prices each producer it could pull
# into one with a tiling search: 140 s of the SeMask-B training step's 198 s cold compile
# on an H200, on one thread. With that pass off, the gemm autotuner (Triton gemm configs
# compiled and timed) is the next long pole; cuBLAS alone ran the step as fast. JAX's
# threefry GPU kernel (jax_threefry_gpu_kernel_lowering: the same bits from one custom
# call instead of ~100 HLO ops per draw) leaves the fusion passes fewer ops to price.
# Measured on an H200 (docs/performance.md, "fourth lease"): cold compile 184 -> 37 s, step
# +1.4-4 %, peak memory -1.4 GiB; inference lost 12 % without the Triton softmax fusions,
# hence 'train'.
_FAST_COMPILE_GPU = {'xla_disable_hlo_passes': 'triton-softmax-rewriter',
                    'xla_gpu_enable_triton_gemm': False}
GPU_FAST_COMPILE = ('train', 'all', 'none')
PROGRAMS = ('train', 'eval')


def gpu_fast_compile(config: ml_collections.ConfigDict, program: str) -> bool:
  """Whether `program` ('train': the training step; 'eval': evaluation and prediction)
  gets the fast-compile XLA:GPU options under config.xla_gpu_fast_compile."""
  if program not in PROGRAMS:
    raise ValueError(f'program must be one of {PROGRAMS}, got {program!r}')
  mode = config.xla_gpu_fast_compile
  if mode not in GPU_FAST_COMPILE:
    raise ConfigError(f'config.xla_gpu_fast_compile must be one of {GPU_FAST_COMPILE}, '
                      f'got {mode!r}')
  return mode == 'all' or (mode == 'train' and program == 'train')


def cpu_ynn_fusions(config: ml_collections.ConfigDict) -> str:
  """config.xla_cpu_ynn_fusions, checked."""
  ynn = config.xla_cpu_ynn_fusions
  if ynn not in CPU_YNN_FUSIONS:
    raise ConfigError(f'config.xla_cpu_ynn_fusions must be one of {CPU_YNN_FUSIONS}, '
                      f'got {ynn!r}')
  return ynn


def set_jax_compile_flags(config: ml_collections.ConfigDict, backend: str | None = None
                          ) -> None:
  """The process-wide JAX side of config.xla_gpu_fast_compile on a GPU (threefry kernel
  lowering, part of every jit's cache key); call before the first jit is lowered. It
  checks that key's value and config.xla_cpu_ynn_fusions' on every backend, so that a typo
  fails before any work. backend: the one compiled for (default jax.default_backend())."""
  cpu_ynn_fusions(config)
  if gpu_fast_compile(config, 'train') and (backend or jax.default_backend()) == 'gpu':
    jax.config.update('jax_threefry_gpu_kernel_lowering', True)


def compiler_options(config: ml_collections.ConfigDict, program: str = 'train',
                     backend: str | None = None) -> dict[str, Any] | None:
  """Per-program XLA options of the config (jax.jit's compiler_options), or None.
  program: 'train' or 'eval' (evaluation, prediction); backend: the one compiled for
  (default jax.default_backend(); 'gpu' for a deviceless GPU compile on a CPU host)."""
  backend = backend or jax.default_backend()
  fast_gpu = gpu_fast_compile(config, program)  # validates both
  ynn = cpu_ynn_fusions(config)
  if backend == 'cpu':
    options = {}
    if config.xla_cpu_fast_compile:
      options.update(_FAST_COMPILE_CPU)
    if ynn == 'tuned':
      options[_YNN_FUSIONS] = _YNN_TUNED[program]
    return options or None
  if fast_gpu and backend == 'gpu':
    return dict(_FAST_COMPILE_GPU)
  return None
