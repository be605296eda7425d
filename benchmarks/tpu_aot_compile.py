"""Compiles the training step (or the inference forward) for a TPU slice on a machine
without one: libtpu's deviceless AOT, the step exactly as `main.py` jits it.

Why: users train on TPU pods, and no session here has a TPU. A TPU program is compiled
on the host CPU anyway, so this measures what a TPU VM's host spends before the first
step (on a bigger CPU there), and XLA:TPU's own memory analysis says what each chip
holds: whether a variant and a batch per chip fit a chip's HBM, before renting the
slice. The step is `train.make_train_step` under `train.jit_train_step` (state
replicated, or split over the chips with `--state_sharding fsdp`; batch split over a 1-D
data mesh of the slice's chips, state donated), the same config file and overrides as
training; the model is built abstractly (no weights).

  # once: libtpu beside the project (~210 MB; no TPU needed)
  .venv/bin/pip install -e '.[tpu-aot]'
  # SeMask-B FPN, the paper's 16 images a step over a v5e slice of 4 chips
  .venv/bin/python benchmarks/tpu_aot_compile.py --config configs/ade20k_semask_fpn.py:B \\
      --topology v5e:2x2
  # SeMask-L at its 640x640 crops over 8 v5e chips, 2 images each
  .venv/bin/python benchmarks/tpu_aot_compile.py --config configs/ade20k_semask_fpn.py:L \\
      --topology v5e:2x4
  # the same over 4 chips, the parameters and AdamW's moments split over them
  .venv/bin/python benchmarks/tpu_aot_compile.py --config configs/ade20k_semask_fpn.py:L \\
      --topology v5e:2x2 --state_sharding fsdp

Prints one JSON line: the topology and chip kind, compile wall / CPU seconds, XLA's
memory per device (arguments, outputs, temporaries, generated code, and their sum less
what donation aliases), a device's HBM (a chip's, or half of it for a v4 chip whose two
TensorCores are two devices), and the collectives of the optimised program.
`--topology` takes libtpu's names: v4:2x2x1, v5e:2x2, v5p:2x2x1, v6e:2x2, ...
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import time

# libtpu describes a slice for a deviceless compile only if jax does not try to use it
# as its backend (there is no TPU here).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from semask_jax import bench
from semask_jax import cli
from semask_jax.train import optim
from semask_jax import sharding
from semask_jax.train import loop as train  # noqa: E402
from semask_jax.models import build_model  # noqa: E402
from semask_jax.train.state import TrainState, merge_model, split_model  # noqa: E402

# HBM per chip (GiB) by libtpu's device_kind; a chip whose TensorCores are separate
# devices (v4 without megacore) shares it between them (hbm_per_device).
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}


def hbm_per_device(devices: list[jax.Device]) -> float | None:
  """GiB of HBM one device of the slice has: its chip's, divided among the devices on it."""
  chip = HBM_GIB.get(devices[0].device_kind)
  if chip is None:
    return None
  chips = {tuple(getattr(d, "coords", (d.id,))) for d in devices}
  return chip * len(chips) / len(devices)


def tpu_devices(topology: str) -> list[jax.Device]:
  """The compile-only devices of a TPU slice, from libtpu."""
  if importlib.util.find_spec("libtpu") is None:
    raise cli.UserError("no libtpu here: install it beside the project "
                        "(.venv/bin/pip install -e '.[tpu-aot]'; no TPU needed)")
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # libtpu's errors are RuntimeErrors / XlaRuntimeErrors
    raise cli.UserError(f"libtpu cannot describe the slice {topology!r}: {e}") from e
  return list(topo.devices)


def load_config(args):
  """The experiment config with the overrides, its model built as on an accelerator."""
  full = bench.load_experiment_config(
      args.config, bench.parse_overrides(args.loss_override, "--loss_override"))
  full.model.dtype = args.dtype
  full.model.block_loop = "unroll"  # 'auto' on a TPU (the CPU here would pick the scan)
  for k, v in bench.parse_overrides(args.override).items():
    full.model[k] = v
  if args.size:
    full.data.crop_size = (args.size, args.size)
  if args.state_sharding:
    full.state_sharding = args.state_sharding
  if args.fsdp_min_size is not None:
    full.fsdp_min_size = args.fsdp_min_size
  if args.batch:
    full.batch_size = args.batch
    full.grad_accum_steps = 1
  return full


def build(args):
  """(jitted function, abstract arguments, devices) of the requested program."""
  devices = tpu_devices(args.topology)
  mesh = sharding.make_mesh(devices)
  config = load_config(args)
  micro_bs = train.micro_batch_size(config)
  sharding.check_batch_divisible(micro_bs, mesh)
  crop = tuple(config.data.crop_size)
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  sds = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s)  # noqa: E731
  on = lambda tree, s: jax.tree.map(lambda x: sds(x.shape, x.dtype, s), tree)  # noqa: E731
  model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
  graphdef, params, batch_stats, rest = split_model(model)
  images = sds((micro_bs, *crop, 3), jnp.float32, data)
  if args.mode == "infer":
    infer = bench.make_infer_fn(nnx.graphdef(model))
    state = on(nnx.to_pure_dict(nnx.state(model)), rep)
    return (jax.jit(infer, in_shardings=(rep, data), out_shardings=data), (state, images),
            config, mesh)
  labels = sds((micro_bs, *crop), jnp.int32, data)
  if args.part != "step":  # a piece of the step, to find where a slow compile goes
    key = sds((2,), jnp.uint32, rep)
    p_, bs_ = on(params, rep), on(batch_stats, rep)
    if args.part == "grad":
      grad_fn = train.make_grad_fn(graphdef, rest, config)
      fn = lambda p, b, x, y, k: grad_fn(p, b, {"image": x, "label": y},  # noqa: E731
                                         jax.random.wrap_key_data(k))
    else:
      loss_fn = train.make_loss(config)

      def fn(p, b, x, y, k):
        model = merge_model(graphdef, p, b, rest)
        out = model(x, train=True, rng=jax.random.wrap_key_data(k))
        return loss_fn(out, y, jax.random.wrap_key_data(k)) if args.part == "loss" else out
    return jax.jit(fn), (p_, bs_, images, labels, key), config, mesh
  tx, schedule = optim.create_optimizer(config, params)
  state = TrainState(step=sds((), jnp.int32, rep), params=params, batch_stats=batch_stats,
                     opt_state=jax.eval_shape(tx.init, params),
                     rng=sds((2,), jnp.uint32, rep), nonfinite=sds((), jnp.int32, rep))
  # As state.init_train_state places it: replicated, or split (config.state_sharding).
  state_sharding = sharding.state_shardings(state, mesh, *sharding.check_state_sharding(config))
  state = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, s), state, state_sharding)
  batch = {"image": images, "label": labels}
  step = train.jit_train_step(train.make_train_step(graphdef, rest, tx, schedule, config,
                                                    state_sharding.params),
                              state_sharding, mesh,
                              sharding.compiler_options(config, "train", backend="tpu"))
  return step, (state, batch), config, mesh


def collectives(hlo: str) -> dict[str, int]:
  """Collective ops of an optimised HLO module, by kind (all-reduce, all-gather, ...).

  XLA:TPU writes a reduce-scatter as an `all-reduce-scatter` fusion around one all-reduce
  whose result each chip slices: counted as a reduce-scatter, its all-reduce not."""
  counts = collections.Counter(re.findall(
      r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
      hlo))
  fused = len(re.findall(r"calls=%all-reduce-scatter\b", hlo))
  if fused:
    counts["reduce-scatter"] += fused
    counts["all-reduce"] -= fused
  return {k: n for k, n in counts.items() if n}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/ade20k_semask_fpn.py:B",
                 help="config file with get_config(arg), as PATH[:ARG]")
  p.add_argument("--topology", default="v5e:2x2", help="libtpu's slice name")
  p.add_argument("--mode", choices=("train", "infer"), default="train")
  p.add_argument("--part", choices=("step", "grad", "loss", "forward"), default="step",
                 help="train mode: the whole step (default), or its forward + loss + "
                 "backward, forward + loss, train-mode forward alone")
  p.add_argument("--batch", type=int, default=None,
                 help="global batch (default: the config's micro batch)")
  p.add_argument("--size", type=int, default=None,
                 help="square crop side (default: the config's data.crop_size)")
  p.add_argument("--dtype", default="bfloat16", help="the model's compute dtype")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="model config override, as in the bench")
  p.add_argument("--loss_override", action="append", default=[], metavar="KEY=VALUE",
                 help="the config's loss section, as in the bench")
  p.add_argument("--state_sharding", choices=sharding.STATE_SHARDINGS, default=None,
                 help="config.state_sharding: the train state replicated, or split over "
                 "the chips (fsdp) (default: the config's)")
  p.add_argument("--fsdp_min_size", type=int, default=None,
                 help="config.fsdp_min_size: fsdp leaves smaller arrays whole (elements)")
  p.add_argument("--hlo_out", help="write the optimised HLO text here")
  p.add_argument("--json", help="also write the result here")
  args = p.parse_args(argv)
  if not os.path.isfile(args.config.partition(":")[0]):
    raise cli.UserError(f"config file {args.config.partition(':')[0]!r} not found")
  t0, c0 = time.perf_counter(), time.process_time()
  fn, fn_args, config, mesh = build(args)
  lowered = fn.trace(*fn_args).lower()
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  mem = compiled.memory_analysis()
  field = lambda name: int(getattr(mem, name, 0) or 0)  # noqa: E731
  per_device = {k: field(f"{k}_size_in_bytes")
              for k in ("argument", "output", "alias", "temp", "generated_code")}
  peak = (per_device["argument"] + per_device["output"] - per_device["alias"] + per_device["temp"]
          + per_device["generated_code"])
  text = compiled.as_text()
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(text)
  device = mesh.devices.flat[0]
  hbm = hbm_per_device(list(mesh.devices.flat))
  out = {"config": args.config, "mode": args.mode, "part": args.part,
         "topology": args.topology,
         "devices": int(mesh.devices.size), "device_kind": device.device_kind,
         "dtype": args.dtype, "global_batch": train.micro_batch_size(config),
         "crop": list(config.data.crop_size), "overrides": args.override,
         "loss_overrides": args.loss_override,
         "state_sharding": config.state_sharding,
         "trace_lower_s": t1 - t0, "trace_lower_cpu_s": c1 - c0,
         "compile_s": t2 - t1, "compile_cpu_s": c2 - c1,
         "memory_per_device_bytes": per_device, "peak_per_device_bytes": peak,
         "hbm_per_device_gib": hbm,
         "fits": None if hbm is None else peak <= hbm * 2**30,
         "collectives": collectives(text), "jax_version": jax.__version__}
  print(json.dumps(out), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  cli.run(main)
