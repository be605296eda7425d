r"""Throughput, FLOPs, utilisation and memory of SeMask-FPN on the local device.

  python -m semask_jax.bench --config configs/ade20k_semask_fpn.py:T --mode train \
      --batch 2 --size 512 --json /tmp/t.json
  python -m semask_jax.bench --variant B --num_classes 150 --mode infer --batch 1 --size 512

Reported (and written to --json):
  compile_s            lowering + XLA compilation of the benchmarked step (a cold compile:
                       the persistent compilation cache is a fresh directory unless
                       --compile_cache names one); compile_cpu_s: the process CPU time of it
                       (the wall time is not meaningful on a loaded machine)
  cached_compile_s     the same step traced, lowered and compiled again after
                       jax.clear_caches(), so that it comes from the persistent cache (what a
                       resumed run pays); cached_compile_hit: whether it did (cache-hit event);
                       cached_compile_cpu_s its CPU time. The timed steps run this executable.
  images_per_s         batch / median wall time of --runs steps run back to back after
                       --warmup (step_times_s)
  flops_per_image      model FLOPs counted from the jaxpr: 2 per multiply-add of every
                       dot_general and conv_general_dilated (the mmcv/fvcore convention).
                       infer: the forward pass; train: forward + backward of the
                       un-rematerialised step (recomputation is not useful work).
  forward_flops_per_image   the forward pass alone (the paper's "GFLOPs" column)
  hw_flops_per_image   the same count of the step as compiled (includes remat recompute)
  xla_flops_per_image  XLA's own cost analysis of the compiled step (None if unavailable)
  matmul_flops_per_s   a dense square matmul of --dtype measured in the same run, timed
                       alternately with the step (median)
  utilization          achieved FLOP/s over the matmul rate: the median over runs of
                       flops_per_image * batch / step time / (the faster of the two
                       matmul timings around that step), from a second set of --runs
                       steps alternated with the matmul (alternated_step_times_s):
                       robust to a loaded machine
  utilization_back_to_back  achieved FLOP/s of the back-to-back steps over the median
                       matmul rate: on a quiet accelerator the better figure (on the H200
                       the alternation slowed a 12 ms inference step by ~20 %)
  peak_memory_bytes    device peak_bytes_in_use where the backend keeps memory statistics
                       (GPU, TPU), else the process's peak RSS during the warm-up and
                       back-to-back steps, before the matmul exists (CPU: the mark is
                       reset after compiling; where the kernel does not allow that, the
                       whole process's peak, compiler included)
  process_peak_rss_bytes, compile_peak_rss_bytes   the whole process's peak RSS at the end
                       and right after compiling (XLA's compiler is often the largest user)
  xla_memory_bytes     arguments + outputs + temporaries of the compiled step (XLA's
                       memory analysis; outputs aliased with donated inputs counted once)

It runs unchanged on CPU, GPU and TPU (single device: the step is jitted, not sharded).
--profile DIR writes a jax.profiler trace of --runs more steps, run after the timed ones
(TensorBoard / XProf / Perfetto), so that the profiler's cost is not in step_times_s.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from input_pipeline.info import IGNORE_INDEX
from semask_jax import cli
from semask_jax import compile_cache
from semask_jax import sharding
from semask_jax.bench_host import (LABEL_CLASSES, peak_rss_since_reset, process_peak_rss,  # noqa: F401
                                   reset_peak_rss, synthetic_labels)
from semask_jax.losses.segmentation import segmentation_loss
from semask_jax.models import VARIANTS, build_model, default_model_config
from semask_jax.models.config import resolve_block_loop

# ----------------------------------------------------------------------------
# FLOP counting on the jaxpr.
# ----------------------------------------------------------------------------


def _dot_general_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
  batch = int(np.prod([lhs[d] for d in lb], dtype=np.int64))
  contract = int(np.prod([lhs[d] for d in lc], dtype=np.int64))
  lfree = int(np.prod([s for d, s in enumerate(lhs) if d not in lc and d not in lb],
                      dtype=np.int64))
  rb = eqn.params["dimension_numbers"][1][1]
  rfree = int(np.prod([s for d, s in enumerate(rhs) if d not in rc and d not in rb],
                      dtype=np.int64))
  return 2 * batch * contract * lfree * rfree


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  # rhs_spec: (out feature dim, in feature dim, spatial dims...)
  rhs_spec = dn.rhs_spec
  kin = rhs[rhs_spec[1]]
  kspatial = int(np.prod([rhs[d] for d in rhs_spec[2:]], dtype=np.int64))
  # Every output element takes kin * kspatial multiply-adds (feature groups are
  # already reflected in kin = in_features / feature_group_count).
  return 2 * int(np.prod(out, dtype=np.int64)) * kin * kspatial


def _subjaxprs(eqn):
  for v in eqn.params.values():
    vals = v if isinstance(v, (tuple, list)) else (v,)
    for x in vals:
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x


def count_jaxpr_flops(jaxpr) -> int:
  """2 x multiply-adds of dot_general and conv_general_dilated in a (closed) jaxpr.

  Recurses into sub-jaxprs (pjit, remat, custom_jvp/vjp, ...); scan bodies are
  multiplied by their length, cond takes its most expensive branch. while loops
  count one trip (the trip count is not static).
  """
  if isinstance(jaxpr, jax.extend.core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_general_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * count_jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(count_jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      for sub in _subjaxprs(eqn):
        total += count_jaxpr_flops(sub)
  return total


def count_flops(fn: Callable, *args, **kwargs) -> int:
  """FLOPs (2 per multiply-add of matmuls and convolutions) of fn(*args) from its jaxpr."""
  return count_jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))


# ----------------------------------------------------------------------------
# Model and steps.
# ----------------------------------------------------------------------------


def parse_overrides(items: list[str], flag: str = "--override") -> dict[str, Any]:
  """['key=value', ...] (the values of `flag`) -> {key: Python literal, else the string}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise cli.UserError(f"{flag} wants KEY=VALUE, got {item!r}")
    if "." in key:  # ml_collections refuses it with an error about allow_dotted_keys
      raise cli.UserError(f"{flag} takes its config section's own keys (attention_impl=cudnn, "
                          f"not model.attention_impl=cudnn), got {key!r}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def load_experiment_config(config: str, loss_overrides: dict[str, Any] | None = None):
  """config 'path/to/file.py[:ARG]' -> get_config(ARG), the whole experiment config.

  loss_overrides: values for keys of the config's `loss` section (e.g. ce_backward)."""
  path, _, arg = config.partition(":")
  spec = importlib.util.spec_from_file_location("_bench_config", path)
  module = importlib.util.module_from_spec(spec)
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:  # configs import `configs.common`, `input_pipeline`.
    sys.path.insert(0, root)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg or None)
  for key, value in (loss_overrides or {}).items():
    if "loss" not in cfg or key not in cfg.loss:
      raise cli.UserError(f"--loss_override: {config} has no config.loss.{key}")
    cfg.loss[key] = value
  return cfg


def load_model_config(config: str | None, variant: str, num_classes: int,
                      loss_overrides: dict[str, Any] | None = None):
  """config 'path/to/file.py[:ARG]' -> get_config(ARG).model; else default_model_config.

  loss_overrides: values for keys of the config's `loss` section (e.g. ce_backward), which
  make_loss then uses; only with a config file."""
  if not config:
    if loss_overrides:
      raise cli.UserError("--loss_override needs --config (the loss settings of an "
                          "experiment)")
    return default_model_config(variant, num_classes)
  cfg = load_experiment_config(config, loss_overrides)
  if "model" not in cfg:
    return cfg
  # The experiment's loss (the Mask2Former criterion's settings) rides along with the model.
  model_cfg = cfg.model
  _EXPERIMENT_LOSS[id(model_cfg)] = cfg
  return model_cfg


# Full experiment configs of the model configs load_model_config returned (by id).
_EXPERIMENT_LOSS: dict[int, Any] = {}


@jax.named_scope("loss")  # as train.make_loss's
def _fpn_loss(out, labels, rng):
  """The SeMask-FPN loss with the default settings (no config file)."""
  del rng
  return segmentation_loss(out, labels, ignore_index=IGNORE_INDEX)


def make_loss(model_cfg) -> Callable[..., Any]:
  """(outputs, labels, rng) -> (loss, aux): the experiment's loss when the model config came
  from a config file (train.make_loss: FPN or Mask2Former), else the SeMask-FPN loss."""
  full = _EXPERIMENT_LOSS.get(id(model_cfg))
  if full is not None:
    from semask_jax.train import loop as train  # pylint: disable=g-import-not-at-top
    full = full.copy_and_resolve_references()
    full.model = model_cfg
    return train.make_loss(full)
  if model_cfg.get("name", "semask_fpn") != "semask_fpn":
    raise cli.UserError("a Mask2Former bench needs --config (its criterion settings)")
  return _fpn_loss


def _abstract_state(cfg):
  """(graphdef, abstract state) without running any initialiser."""
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def make_infer_fn(graphdef):
  def infer(state, images):
    model = nnx.merge(graphdef, state, copy=True)
    return model.segment(images)  # FPN logits / Mask2Former semantic inference
  return infer


def make_train_fns(graphdef, tx, loss=None):
  """(loss_and_grad(params, rest, images, labels, rng), step(carry, images, labels, rng)).

  loss: (outputs, labels, rng) -> (loss, aux); default the SeMask-FPN loss."""
  if loss is None:
    loss = _fpn_loss

  def loss_fn(params, rest, images, labels, rng):
    model = nnx.merge(graphdef, params, rest, copy=True)
    out = model(images, train=True, rng=rng)
    value, _ = loss(out, labels, rng)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return value, nnx.to_pure_dict(new_rest)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(carry, images, labels, rng):
    params, rest, opt_state = carry
    (loss, rest), grads = grad_fn(params, rest, images, labels, rng)
    with jax.named_scope("optimizer"):  # as train.make_train_step
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return (params, rest, opt_state), loss

  return grad_fn, step


# ----------------------------------------------------------------------------
# Device measurements.
# ----------------------------------------------------------------------------


def _block(x):
  return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def make_matmul(dtype, n: int | None = None) -> tuple[Callable[[], Any], float]:
  """(call, flops): a chain of dense n x n x n matmuls of `dtype`, jitted and warmed up."""
  platform_name = jax.devices()[0].platform
  if n is None:
    n = 2048 if platform_name == "cpu" else 8192
  reps = 2 if platform_name == "cpu" else 16
  ka, kb = jax.random.split(jax.random.key(0))
  # Scaled in float32, then cast: a NumPy scalar would promote a bfloat16 array to
  # float32, and the loop carry (cast back to `dtype` by the body) would change type.
  a = (jax.random.normal(ka, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)

  @jax.jit
  def chain(a, b):
    def body(_, x):
      return jnp.dot(x, b, preferred_element_type=jnp.float32).astype(dtype)
    return jax.lax.fori_loop(0, reps, body, a)

  call = lambda: chain(a, b)  # noqa: E731
  _block(call())
  return call, 2.0 * n ** 3 * reps


def peak_memory(rss_was_reset: bool) -> tuple[int, str]:
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and stats.get("peak_bytes_in_use"):
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return peak_rss_since_reset(rss_was_reset)


def _xla_costs(compiled, batch: int) -> tuple[float | None, int | None]:
  flops = mem = None
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else None
    if ca and ca.get("flops", -1) > 0:
      flops = float(ca["flops"]) / batch
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      mem = int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  return flops, mem


def _time(fn: Callable[[], Any], warmup: int, runs: int) -> list[float]:
  for _ in range(warmup):
    _block(fn())
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t)
  return times


# ----------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------


def run_bench(*, config: str | None = None, variant: str = "T", num_classes: int = 150,
              mode: str = "infer", batch: int = 1, size: int = 512, dtype: str = "float32",
              remat: str = "none", warmup: int = 1, runs: int = 5,
              matmul_n: int | None = None, model_overrides: dict | None = None,
              profile_dir: str | None = None, cache_dir: str | None = None,
              xla_gpu_fast_compile: str = "train", xla_cpu_ynn_fusions: str = "tuned",
              loss_overrides: dict | None = None) -> dict[str, Any]:
  """The measurements of the module docstring, as a dict (the --json file).

  xla_gpu_fast_compile: as the training config's (sharding.compiler_options): 'train'
  compiles a training step (not inference) with the fast-compile XLA:GPU options.
  xla_cpu_ynn_fusions: as the config's: 'tuned' (XLA:CPU's YNNPACK fusions chosen per program,
  sharding.compiler_options) or 'xla' (XLA's defaults).
  cache_dir: persistent compilation cache directory; None for a fresh temporary one
  (so that compile_s is a cold compile).
  loss_overrides: keys of the config file's `loss` section (load_model_config).
  """
  if cache_dir is None:
    with tempfile.TemporaryDirectory(prefix="semask_bench_cache_") as tmp:
      return run_bench(config=config, variant=variant, num_classes=num_classes, mode=mode,
                       batch=batch, size=size, dtype=dtype, remat=remat, warmup=warmup,
                       runs=runs, matmul_n=matmul_n, model_overrides=model_overrides,
                       profile_dir=profile_dir, cache_dir=tmp,
                       xla_gpu_fast_compile=xla_gpu_fast_compile,
                       xla_cpu_ynn_fusions=xla_cpu_ynn_fusions, loss_overrides=loss_overrides)
  previous_cache = jax.config.jax_compilation_cache_dir
  previous_threefry = jax.config.jax_threefry_gpu_kernel_lowering
  compile_cache.enable(cache_dir)
  if mode == "train":  # as train_and_evaluate sets it
    sharding.set_jax_compile_flags(
        ml_collections.ConfigDict({"xla_gpu_fast_compile": xla_gpu_fast_compile,
                                   "xla_cpu_ynn_fusions": xla_cpu_ynn_fusions}))
  try:
    return _run_bench(config=config, variant=variant, num_classes=num_classes, mode=mode,
                      batch=batch, size=size, dtype=dtype, remat=remat, warmup=warmup,
                      runs=runs, matmul_n=matmul_n, model_overrides=model_overrides,
                      profile_dir=profile_dir, xla_gpu_fast_compile=xla_gpu_fast_compile,
                      xla_cpu_ynn_fusions=xla_cpu_ynn_fusions, loss_overrides=loss_overrides)
  finally:
    jax.config.update("jax_threefry_gpu_kernel_lowering", previous_threefry)
    if previous_cache:
      compile_cache.enable(previous_cache)
    else:
      compile_cache.disable()


class _CacheHits:
  """Counts persistent-cache hits (JAX monitoring events) while active."""

  def __init__(self):
    self.hits = 0
    self.active = False
    jax.monitoring.register_event_listener(self._on_event)

  def _on_event(self, event: str, **_):
    if self.active and event == "/jax/compilation_cache/cache_hits":
      self.hits += 1


_cache_hits: _CacheHits | None = None


def _timed_compile(lower: Callable[[], Any]) -> tuple[Any, float, float]:
  """(compiled, wall s, process CPU s) of lower().compile()."""
  t, c = time.perf_counter(), time.process_time()
  compiled = lower().compile()
  return compiled, time.perf_counter() - t, time.process_time() - c


def _run_bench(*, config, variant, num_classes, mode, batch, size, dtype, remat, warmup,
               runs, matmul_n, model_overrides, profile_dir, xla_gpu_fast_compile,
               xla_cpu_ynn_fusions, loss_overrides) -> dict[str, Any]:
  global _cache_hits
  if _cache_hits is None:
    _cache_hits = _CacheHits()
  cfg = load_model_config(config, variant, num_classes, loss_overrides)
  cfg.dtype = dtype
  cfg.remat = remat not in ("none", "", None, False)
  if cfg.remat:
    cfg.remat_policy = "full" if remat is True else remat
  for k, v in (model_overrides or {}).items():
    cfg[k] = v
  cdtype = jnp.dtype(dtype)
  k = int(cfg.num_classes)

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32))
  labels = jnp.asarray(synthetic_labels(rng, batch, size, k))
  key = jax.random.key(1)

  tx = optax.adamw(1e-4, weight_decay=1e-4)
  options = sharding.compiler_options(
      ml_collections.ConfigDict({"xla_gpu_fast_compile": xla_gpu_fast_compile,
                                 "xla_cpu_ynn_fusions": xla_cpu_ynn_fusions,
                                 "xla_cpu_fast_compile": False}),
      "train" if mode == "train" else "eval")

  # Real model (host-side init), then compile and time.
  model = build_model(cfg, rngs=nnx.Rngs(0))
  # Pure dicts of arrays, as train.py passes them: flattening nnx.State's Variables on
  # every call cost the host ~70 ms per SeMask-B training step (H200 profile), which
  # showed as ~10 ms of idle GPU between steps that are timed one by one.
  if mode == "infer":
    graphdef, state = nnx.split(model)
    state = nnx.to_pure_dict(state)
    infer_fn = make_infer_fn(graphdef)
    lower = lambda: jax.jit(infer_fn, compiler_options=options).lower(state, images)  # noqa: E731
  elif mode == "train":
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    _, step = make_train_fns(graphdef, tx, make_loss(cfg))
    carry = (params, rest, tx.init(params))
    lower = lambda: jax.jit(step, donate_argnums=0, compiler_options=options).lower(  # noqa: E731
        carry, images, labels, key)
  else:
    raise ValueError(f"mode must be infer or train, got {mode!r}")
  _block((carry if mode == "train" else state))
  compiled, compile_s, compile_cpu_s = _timed_compile(lower)
  # Again from the persistent cache, as a resumed run would: new trace, new lowering.
  jax.clear_caches()
  hits0 = _cache_hits.hits
  _cache_hits.active = True
  try:
    compiled, cached_compile_s, cached_compile_cpu_s = _timed_compile(lower)
  finally:
    _cache_hits.active = False
  cached_compile_hit = _cache_hits.hits > hits0
  if mode == "infer":
    call = lambda: compiled(state, images)  # noqa: E731
  else:
    holder = [carry]

    def call():
      holder[0], loss = compiled(holder[0], images, labels, key)
      return loss
  del model

  xla_flops, xla_mem = _xla_costs(compiled, batch)
  compile_peak_rss = process_peak_rss()
  rss_was_reset = reset_peak_rss()
  # Speed and memory: the steps back to back, as a training or inference loop runs them.
  for _ in range(warmup):
    _block(call())
  times = [_time(call, 0, 1)[0] for _ in range(runs)]
  if profile_dir:  # as many steps again under the profiler, apart: its cost is not timed
    jax.profiler.start_trace(profile_dir)
    try:
      for i in range(runs):
        with jax.profiler.StepTraceAnnotation(mode, step_num=i):
          _block(call())
    finally:
      jax.profiler.stop_trace()
  peak, peak_kind = peak_memory(rss_was_reset)
  # FLOPs from the jaxpr, on abstract values (no initialisation, no compile), after the
  # memory is read: tracing the whole model leaves Python heap behind (~60 MiB for
  # SeMask-T) that is the bench's, not the step's.
  graphdef, abstract = _abstract_state(cfg)
  fwd_flops = count_flops(make_infer_fn(graphdef), abstract, images) / batch
  if mode == "train":
    g_abs, p_abs, r_abs = nnx.split(
        nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    grad_fn, _ = make_train_fns(g_abs, tx, make_loss(cfg))
    hw_flops = count_flops(grad_fn, p_abs, r_abs, images, labels, key) / batch
    cfg_plain = cfg.copy_and_resolve_references()
    cfg_plain.remat = False
    g0, p0, r0 = nnx.split(
        nnx.eval_shape(lambda: build_model(cfg_plain, rngs=nnx.Rngs(0))), nnx.Param, ...)
    model_flops = count_flops(make_train_fns(g0, tx, make_loss(cfg))[0], p0, r0, images, labels,
                              key) / batch
  else:
    model_flops = hw_flops = fwd_flops

  # Utilization: the matmul reference and the step timed alternately, so that both see
  # the same machine load; the median of the per-run ratios. (Alternating slows the
  # step on CPU by up to ~25 %: caches and thread pools are the matmul's in between;
  # hence the separate timing above.)
  mm_call, mm_flops = make_matmul(cdtype, matmul_n)
  alt_times, rates = [], []
  for _ in range(runs):
    rates.append(mm_flops / _time(mm_call, 0, 1)[0])
    alt_times.append(_time(call, 0, 1)[0])
  rates.append(mm_flops / _time(mm_call, 0, 1)[0])
  if mode == "train":
    final_loss = float(call())
    if not np.isfinite(final_loss):
      raise FloatingPointError(f"training step produced loss {final_loss}")
  median = statistics.median(times)
  images_per_s = batch / median
  mm = statistics.median(rates)
  utilization = statistics.median(
      [model_flops * batch / t / max(r0, r1) for t, r0, r1 in zip(alt_times, rates, rates[1:])])
  dev = jax.devices()[0]
  return dict(
      config=config or f"variant={variant},num_classes={num_classes}",
      variant=variant if not config else None,
      num_classes=k, embed_dim=int(cfg.embed_dim), window_size=int(cfg.window_size),
      mode=mode, batch=batch, size=size, dtype=dtype, remat=str(remat),
      attention_impl=cfg.get("attention_impl", "einsum"),
      loss_overrides={k: str(v) for k, v in (loss_overrides or {}).items()},
      xla_gpu_fast_compile=xla_gpu_fast_compile, xla_cpu_ynn_fusions=xla_cpu_ynn_fusions,
      compiler_options=options,
      threefry_gpu_kernel_lowering=bool(jax.config.jax_threefry_gpu_kernel_lowering),
      block_loop=cfg.get("block_loop", "auto"),
      scanned_blocks=mode == "train" and resolve_block_loop(cfg.get("block_loop", "auto")),
      compile_s=compile_s, compile_cpu_s=compile_cpu_s, cached_compile_s=cached_compile_s,
      cached_compile_cpu_s=cached_compile_cpu_s, cached_compile_hit=cached_compile_hit,
      profile_dir=profile_dir, step_times_s=times, median_step_s=median,
      images_per_s=images_per_s,
      flops_per_image=model_flops, forward_flops_per_image=fwd_flops,
      hw_flops_per_image=hw_flops, xla_flops_per_image=xla_flops,
      achieved_flops_per_s=model_flops * images_per_s,
      matmul_flops_per_s=mm, matmul_flops_per_s_samples=rates,
      alternated_step_times_s=alt_times,
      utilization=utilization,
      utilization_back_to_back=model_flops * images_per_s / mm,
      peak_memory_bytes=peak, peak_memory_kind=peak_kind, xla_memory_bytes=xla_mem,
      process_peak_rss_bytes=process_peak_rss(), compile_peak_rss_bytes=compile_peak_rss,
      device=f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
      host=platform.node(), cpu_count=os.cpu_count(),
      jax_version=jax.__version__,
      date=datetime.datetime.now().isoformat(timespec="seconds"),
  )


def table_row(res: dict[str, Any]) -> str:
  """One markdown row of the docs/performance.md / README table from a result dict."""
  name = res.get("variant") or res["config"]
  xm = res.get("xla_memory_bytes")
  return (f"| SeMask-{name} FPN | {res['mode']} | {res['batch']} | {res['remat']} "
          f"| {res['forward_flops_per_image'] / 1e9:.1f} | {res['images_per_s']:.3f} "
          f"| {res['matmul_flops_per_s'] / 1e9:.1f} | {res['utilization']:.2f} "
          f"| {res['peak_memory_bytes'] / 2**30:.2f} GiB "
          f"| {'n/a' if xm is None else f'{xm / 2**30:.2f} GiB'} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  if argv is None:
    argv = sys.argv[1:]
  if argv and argv[0] == "--table":  # python -m semask_jax.bench --table a.json b.json ...
    for path in argv[1:]:
      with open(path) as f:
        print(table_row(json.load(f)))
    return {}
  p = argparse.ArgumentParser(prog="python -m semask_jax.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=None,
                 help="config file with get_config(arg), as PATH[:ARG]; its .model is used")
  p.add_argument("--variant", default="T", help="T|S|B|L when no --config is given")
  p.add_argument("--num_classes", type=int, default=150)
  p.add_argument("--mode", choices=("infer", "train"), default="infer")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--remat", default="none",
                 help="none | full | dots | dots_no_batch | attn: rematerialise each Swin block "
                 "in the backward pass, saving nothing / all matmul outputs / Linear outputs / "
                 "all but the attention matrices")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--matmul_n", type=int, default=None,
                 help="side of the reference matmul (default 2048 on CPU, 8192 elsewhere)")
  p.add_argument("--override", action="append", default=[],
                 help="model config override KEY=VALUE (Python literal), e.g. fpn_channels=128")
  p.add_argument("--loss_override", action="append", default=[],
                 help="loss config override KEY=VALUE (needs --config), e.g. "
                 "ce_backward=pallas")
  p.add_argument("--json", default=None, help="write the result here")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="write a jax.profiler trace of --runs more steps (after the timed ones) to DIR")
  p.add_argument("--xla_gpu_fast_compile", choices=sharding.GPU_FAST_COMPILE, default="train",
                 help="as the training config's: 'train' (default) compiles a GPU training step "
                 "without Triton softmax/LayerNorm and gemm fusions (a much shorter cold "
                 "compile), 'all' inference too, 'none' with XLA's defaults")
  p.add_argument("--xla_cpu_ynn_fusions", choices=sharding.CPU_YNN_FUSIONS, default="tuned",
                 help="as the config's: 'tuned' (default) trains on a CPU without XLA:CPU's "
                 "YNNPACK convolutions and runs inference without its reduce fusions; 'xla': "
                 "XLA's defaults")
  p.add_argument("--compile_cache", default=None, metavar="DIR",
                 help="persistent compilation cache directory (default: a fresh temporary "
                 "one, so that compile_s is a cold compile)")
  a = p.parse_args(argv)
  config_file = (a.config or "").partition(":")[0]
  if a.config and not os.path.isfile(config_file):
    raise cli.UserError(f"config file {config_file!r} not found")
  if not a.config and a.variant.upper() not in VARIANTS:
    raise cli.UserError(f"--variant must be one of {'|'.join(VARIANTS)}, got {a.variant!r}")
  overrides = parse_overrides(a.override)
  res = run_bench(config=a.config, variant=a.variant.upper(), num_classes=a.num_classes,
                  mode=a.mode, batch=a.batch, size=a.size, dtype=a.dtype, remat=a.remat,
                  warmup=a.warmup, runs=a.runs, matmul_n=a.matmul_n, model_overrides=overrides,
                  profile_dir=a.profile, cache_dir=a.compile_cache,
                  xla_gpu_fast_compile=a.xla_gpu_fast_compile,
                  xla_cpu_ynn_fusions=a.xla_cpu_ynn_fusions,
                  loss_overrides=parse_overrides(a.loss_override, "--loss_override"))
  g = 1e9
  print(f"{res['config']} {a.mode} batch={a.batch} size={a.size} {a.dtype} remat={a.remat} "
        f"on {res['device']}")
  print(f"  compile {res['compile_s']:.1f} s ({res['compile_cpu_s']:.1f} s CPU); from the "
        f"persistent cache {res['cached_compile_s']:.1f} s ({res['cached_compile_cpu_s']:.1f} s "
        f"CPU, {'hit' if res['cached_compile_hit'] else 'MISS'})")
  print(f"  step median {res['median_step_s'] * 1e3:.1f} ms -> {res['images_per_s']:.3f} img/s")
  xf = res["xla_flops_per_image"]
  print(f"  GFLOP/img: model {res['flops_per_image'] / g:.1f} (forward "
        f"{res['forward_flops_per_image'] / g:.1f}, as compiled {res['hw_flops_per_image'] / g:.1f}"
        f", XLA {'n/a' if xf is None else f'{xf / g:.1f}'})")
  print(f"  achieved {res['achieved_flops_per_s'] / g:.1f} GFLOP/s; matmul "
        f"{res['matmul_flops_per_s'] / g:.1f} GFLOP/s; utilization {res['utilization']:.3f} "
        f"(back to back {res['utilization_back_to_back']:.3f})")
  xm = res["xla_memory_bytes"]
  print(f"  peak memory {res['peak_memory_bytes'] / 2**30:.2f} GiB ({res['peak_memory_kind']})"
        f"; XLA step memory {'n/a' if xm is None else f'{xm / 2**30:.2f} GiB'}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  cli.run(main)
