"""Compiles a bench step for an NVIDIA GPU on a machine without one (XLA deviceless AOT).

XLA:GPU can run its whole pipeline (HLO passes, fusion, LLVM, ptxas) for a GPU described
by a target-config file, with no GPU attached; autotuning is skipped (default configs).
That makes a step's cold compile time and XLA's memory for it (temporaries), on an H200
or H100, something to measure on any CPU machine before renting the GPU
(docs/accelerators.md).

  # once: jax's CUDA plugin and ptxas beside the project (no GPU or driver needed)
  .venv/bin/pip install -e '.[gpu-aot]'
  # the SeMask-B FPN bf16 training step for an H200 as training compiles it
  # (config.xla_gpu_fast_compile='train'):
  .venv/bin/python benchmarks/gpu_aot_compile.py --config configs/ade20k_semask_fpn.py:B
  # for an H100: --target_config benchmarks/gpu_specs/h100_sxm.txtpb
  # with XLA's default fusions (Triton softmax on; gemms: see below)
  ... --xla_gpu_fast_compile none --compiler_option xla_gpu_enable_triton_gemm=False

Triton gemms off with XLA's defaults too: without a GPU nothing is autotuned, and the
default Triton gemm tiles do not fit every small dot ("Couldn't find output tile
sizes"); on the H200 they changed the cold compile by 6 s (docs/performance.md).

Prints one JSON line: trace, lower and compile seconds (wall and process CPU), the
target and the step. `--part` compiles a piece of the training step alone (the forward,
forward + loss, their gradient, or the optimizer update) to find which one a slow pass
is spending its time on. `--override key=value` edits the model config as in the bench,
`--loss_override key=value` the config's loss section.
The target config (`--target_config`, default benchmarks/gpu_specs/h200.txtpb) is an
XLA `GpuTargetConfigProto` in text form.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import time

# The CUDA plugin registers without a GPU only if jax does not try to use it as a backend;
# deviceless compiles go through a topology instead.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from semask_jax import bench
from semask_jax import cli
from semask_jax import sharding  # noqa: E402
from semask_jax.models import build_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TARGET = os.path.join(HERE, "gpu_specs", "h200.txtpb")
PARTS = ("step", "forward", "loss", "grad", "update")


def gpu_device(target_config: str) -> jax.Device:
  """The one compile-only device of a GPU described by a GpuTargetConfigProto file."""
  with open(target_config) as f:
    text = f.read()
  try:
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                        target_config=text)
  except NotImplementedError as e:  # no CUDA plugin: jax cannot describe a GPU
    raise cli.UserError(
        "no jax CUDA plugin here: install it beside the project "
        "(.venv/bin/pip install -e '.[gpu-aot]'; no GPU or driver needed)") from e
  return topo.devices[0]


def abstract(tree, sharding):
  """ShapeDtypeStructs of a tree of arrays or ShapeDtypeStructs, placed on `sharding`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      tree)


def build(args) -> tuple:
  """(function, abstract arguments, the target device) of the requested part of the step."""
  cfg = bench.load_model_config(args.config, args.variant, args.num_classes,
                                bench.parse_overrides(args.loss_override, "--loss_override"))
  cfg.dtype = args.dtype
  # 'auto' would pick the CPU's scan here (the process's backend); compile what a GPU runs.
  cfg.block_loop = "unroll"
  for k, v in bench.parse_overrides(args.override).items():
    cfg[k] = v
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  device = gpu_device(args.target_config)
  s = jax.sharding.SingleDeviceSharding(device)
  b, n = args.batch, args.size
  images = jax.ShapeDtypeStruct((b, n, n, 3), jnp.float32, sharding=s)
  labels = jax.ShapeDtypeStruct((b, n, n), jnp.int32, sharding=s)
  key = abstract(jax.eval_shape(lambda: jax.random.key(1)), s)
  if args.mode == "infer":
    graphdef, state = nnx.split(model)
    return (bench.make_infer_fn(graphdef), (abstract(nnx.to_pure_dict(state), s), images),
            device)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = abstract(nnx.to_pure_dict(params), s), abstract(nnx.to_pure_dict(rest), s)
  tx = optax.adamw(1e-4, weight_decay=1e-4)
  opt_state = abstract(jax.eval_shape(tx.init, params), s)
  loss = bench.make_loss(cfg)
  grad_fn, step = bench.make_train_fns(graphdef, tx, loss)
  if args.part == "step":
    return step, ((params, rest, opt_state), images, labels, key), device
  if args.part == "forward":
    def forward(params, rest, images, rng):
      return nnx.merge(graphdef, params, rest, copy=True)(images, train=True, rng=rng)
    return forward, (params, rest, images, key), device
  if args.part == "loss":
    def forward_loss(params, rest, images, labels, rng):
      out = nnx.merge(graphdef, params, rest, copy=True)(images, train=True, rng=rng)
      return loss(out, labels, rng)[0]
    return forward_loss, (params, rest, images, labels, key), device
  if args.part == "grad":
    return grad_fn, (params, rest, images, labels, key), device
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return update, (params, opt_state, params), device


def program_stats(compiled) -> dict:
  """What XLA built, to compare two compiles of one step without running them: the
  entry's kernels by kind (Triton block-level fusions counted apart) and the temporary
  memory. (A deviceless executable has no cost analysis.)"""
  text = compiled.as_text()
  kinds = collections.Counter(re.findall(r"\bfusion\(.*?kind=(k\w+)", text))
  kinds["__triton"] = text.count('"kind":"__triton"')
  kinds["custom-call"] = len(re.findall(r"\bcustom-call\(", text))
  mem = compiled.memory_analysis()
  return {"kernels": dict(sorted(kinds.items())),
          "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0),
          "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0) or 0),
          "output_bytes": int(getattr(mem, "output_size_in_bytes", 0) or 0)}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/ade20k_semask_fpn.py:B",
                 help="experiment config 'file.py[:ARG]' (its model and loss)")
  p.add_argument("--variant", default="B", help="model variant when --config is empty")
  p.add_argument("--num_classes", type=int, default=150)
  p.add_argument("--mode", choices=("train", "infer"), default="train")
  p.add_argument("--part", choices=PARTS, default="step",
                 help="train mode: the whole step or one piece of it")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--loss_override", action="append", default=[], metavar="KEY=VALUE",
                 help="the config's loss section, e.g. ce_backward=pallas")
  p.add_argument("--compiler_option", action="append", default=[], metavar="KEY=VALUE",
                 help="an XLA option for this compile (jax.jit compiler_options), e.g. "
                 "xla_disable_hlo_passes=triton-softmax-rewriter")
  p.add_argument("--xla_gpu_fast_compile", choices=sharding.GPU_FAST_COMPILE, default="train",
                 help="as the training config's (semask_jax/sharding.py): 'train' (default) "
                 "compiles a training step without Triton softmax/LayerNorm and gemm fusions and "
                 "with the threefry kernel, 'all' inference too, 'none' with XLA's defaults "
                 "(then pass --compiler_option xla_gpu_enable_triton_gemm=False: no autotuning "
                 "here)")
  p.add_argument("--target_config", default=DEFAULT_TARGET,
                 help="XLA GpuTargetConfigProto text file (default: an H200)")
  p.add_argument("--hlo_out", help="write the optimised HLO text here")
  args = p.parse_args(argv)
  if args.mode == "infer" and args.part != "step":
    p.error("--part is for --mode train")

  # As training sets them on a GPU (this process's own backend is the CPU).
  compile_cfg = ml_collections.ConfigDict({"xla_gpu_fast_compile": args.xla_gpu_fast_compile,
                                          "xla_cpu_ynn_fusions": "xla"})
  sharding.set_jax_compile_flags(compile_cfg, backend="gpu")
  program = "train" if args.mode == "train" else "eval"
  options = {**(sharding.compiler_options(compile_cfg, program, backend="gpu") or {}),
             **bench.parse_overrides(args.compiler_option, "--compiler_option")} or None
  fn, fn_args, device = build(args)
  # The training step donates its carry (as training does); inference keeps the weights.
  donate = 0 if args.part == "step" and args.mode == "train" else ()
  jitted = jax.jit(fn, donate_argnums=donate,
                   compiler_options=options)
  t, c = time.perf_counter(), time.process_time()
  traced = jitted.trace(*fn_args)
  t1, c1 = time.perf_counter(), time.process_time()
  lowered = traced.lower(lowering_platforms=("cuda",))
  t2, c2 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t3, c3 = time.perf_counter(), time.process_time()
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(compiled.as_text())
  row = {"config": args.config, "mode": args.mode, "part": args.part, "dtype": args.dtype,
         "batch": args.batch, "size": args.size, "overrides": args.override,
         "loss_overrides": args.loss_override,
         "xla_gpu_fast_compile": args.xla_gpu_fast_compile, "compiler_options": options,
         "target": device.device_kind,
         "target_config": os.path.relpath(args.target_config),
         "trace_s": t1 - t, "lower_s": t2 - t1, "compile_s": t3 - t2,
         "compile_cpu_s": c3 - c2, "trace_lower_cpu_s": c2 - c,
         "jax_version": jax.__version__, **program_stats(compiled)}
  print(json.dumps(row), flush=True)
  return row


if __name__ == "__main__":
  cli.run(main)
