"""The training loss's up-sampled cross-entropy, six ways: which is fastest on a GPU?

Why: on an NVIDIA H200 (2026-11-26, commit be2a4ba, PERF_NOTES.md "second lease") the
SeMask-B FPN training step spent ~18.7 ms of its ~102 ms of kernels in the row-blocked
loss (`losses._chunked_upsampled_ce`: logits [16, 128, 128, 150] up-sampled x4 and fused
with the CE, twice per step: the FPN logits and the semantic decoder's). The forms:

  - remat / custom_vjp: each block under `jax.checkpoint` (its forward, the up-sampling
    and both reductions over the classes, runs twice per step), or a hand-written VJP
    that keeps the block's logsumexp and up-samples once more in the backward:
    d CE / dz = exp(z - lse) - onehot.
  - stack: `resize.interleave_phases` stacks the height phases (a concatenate) into one
    [16, 64, 512, 150] float32 block; XLA:GPU wrote it to memory
    (`input_concatenate_fusion`, ~3.3 ms/step) and read it back in each reduction, and
    its backward was slices (`loop_slice_fusion`, ~4.5 ms/step). The library's form
    until 2026-11-27, kept here.
  - select: the phases as a select between the neighbours broadcast over a phase axis:
    the same arithmetic with no concatenate.
  - phases (the library's since 2026-11-27): no interleaved block at all; each height
    phase p (output rows 4i + p) is its own [B, r, W, K] blend of two width-resized rows,
    reduced to its CE and logsumexp; only the per-pixel CE is interleaved.

Measured (value and gradient of the mean CE, B=16, 128x128 -> 512x512, K=150; the
deviceless floor: this script's --deviceless, an H200's time floor from
benchmarks/hlo_traffic.py; CPU: batch 2, medians of 7, the same minutes, 2026-11-27):

  | variant           | H200 (PERF_NOTES "fourth lease") | H200 floor, deviceless | 2-core CPU |
  |-------------------|----------------------------------|------------------------|------------|
  | remat+stack       | 10.06 ms                         | 7.64 ms                | 751-796 ms |
  | custom_vjp+stack  |  8.20 ms                         | 6.14 ms                | 893 ms     |
  | remat+select      | 12.02 ms                         | 7.81 ms                | 768 ms     |
  | custom_vjp+select |  9.88 ms                         | 5.68 ms                | 932 ms     |
  | remat+phases      | not measured                     | 5.33 ms                | 690 ms     |
  | custom_vjp+phases | not measured                     | 4.41 ms                | 623 ms     |

The floor ranks remat against custom_vjp as the H200 did, but not select against stack
(its broadcast and selects cost the device more than the bytes say): the phases forms
are to be timed at the next lease. The library (`losses.pixel_cross_entropy(backward=...)`,
`config.loss.ce_backward`; 'auto': custom_vjp on accelerators, remat on the CPU) has the
phases forms; the others stay here. This script times value_and_grad of the mean CE for
each variant, checks that each gives the first one's loss and gradients, and prints one
JSON line per variant (`device_session.sh` has it as the row `loss_variants`, ~1 min):

  python benchmarks/loss_variants.py                         # B=16, 128x128 -> 512x512, K=150
  python benchmarks/loss_variants.py --batch 2 --runs 3      # a CPU-sized run
  python benchmarks/loss_variants.py --deviceless            # compiled for an H200 here:
                                                             # kernels, bytes, time floor
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

if "--deviceless" in sys.argv:  # as in gpu_aot_compile: the CUDA plugin only describes
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a GPU if jax does not use it as a backend

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from semask_jax.losses import segmentation as losses  # noqa: E402
from semask_jax.models import resize  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_aot_compile, --deviceless

VARIANTS = ("remat+phases", "custom_vjp+phases", "remat+stack", "custom_vjp+stack",
            "remat+select", "custom_vjp+select", "pallas")


def interleave_select(prev: jax.Array, x: jax.Array, nxt: jax.Array,
                      taps: tuple[tuple[int, float], ...], axis: int) -> jax.Array:
  """resize.interleave_phases without a concatenate: the phases are one broadcast over
  a new axis, a select of each phase's pair, then a * (1 - w) + b * w (the same
  arithmetic as the library's one expression per phase)."""
  factor = len(taps)
  bshape = [1] * (x.ndim + 1)
  bshape[axis + 1] = factor
  use_prev = np.array([off < 0 for off, _ in taps]).reshape(bshape)
  wb = jnp.asarray(np.array([w for _, w in taps], np.float32).reshape(bshape), x.dtype)
  prev, xe, nxt = (jnp.expand_dims(t, axis + 1) for t in (prev, x, nxt))  # [..., n, 1, ...]
  a = jnp.where(use_prev, prev, xe)                                      # [..., n, f, ...]
  b = jnp.where(use_prev, xe, nxt)
  y = a * (1 - wb) + b * wb
  shape = list(x.shape)
  shape[axis] *= factor
  return y.reshape(shape)


def chunked_ce_interleaved(logits: jax.Array, labels: jax.Array, factor: int,
                           ignore_index: int, backward: str,
                           interleave: Callable[..., jax.Array]) -> jax.Array:
  """The library's row-blocked CE until 2026-11-27 (stack) or its select form: each row
  block's phases interleaved into one [B, r * factor, W, K] block, then its CE."""
  b, h, _, k = logits.shape
  big_h, big_w = labels.shape[1:3]
  r = losses._rows_per_chunk(h)  # pylint: disable=protected-access
  rows, above, below, lab = losses.row_blocks(logits, labels, r, factor)
  taps = resize.phase_taps(h, factor)

  def upsample(x, up, down):  # -> [B, r * factor, W, K]
    ext = resize.resize_bilinear(jnp.concatenate([up, x, down], axis=1), (r + 2, big_w))
    return interleave(ext[:, :r], ext[:, 1:r + 1], ext[:, 2:], taps, axis=1)

  def ce(x, up, down, lb):
    return losses.ce_and_logsumexp(upsample(x, up, down), lb, ignore_index)

  def ce_vjp(x, up, down, lb, lse, g):
    z, vjp = jax.vjp(upsample, x, up, down)
    onehot, valid = losses.onehot_labels(lb, k, ignore_index, z.dtype)
    return vjp((jnp.exp(z - lse[..., None]) - onehot) * jnp.where(valid, g, 0.0)[..., None])

  out = losses.map_row_blocks((rows, above, below, lab), ce, ce_vjp, backward)
  return out.swapaxes(0, 1).reshape(b, big_h, big_w)


def loss_fn(variant: str, labels: jax.Array, ignore_index: int = 255
            ) -> Callable[[jax.Array], jax.Array]:
  """Mean up-sampled CE of logits [B, h, w, K] at labels [B, 4h, 4w], one variant."""
  backward, _, form = variant.partition("+")

  def f(logits):
    fac = labels.shape[1] // logits.shape[1]
    if backward == "pallas":  # the Triton kernels (pallas_ce.py), interpreted on a CPU
      return losses.pixel_cross_entropy(logits, labels, ignore_index=ignore_index,
                                        backward="pallas")[0].mean()
    if form == "phases":  # the library's
      return losses._chunked_upsampled_ce(  # pylint: disable=protected-access
          logits, labels, fac, ignore_index, backward).mean()
    interleave = interleave_select if form == "select" else resize.interleave_phases
    return chunked_ce_interleaved(logits, labels, fac, ignore_index, backward,
                                  interleave).mean()

  return f


def run(variant: str, logits: jax.Array, labels: jax.Array, runs: int,
        reference: tuple[np.ndarray, np.ndarray] | None = None
        ) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
  """One variant's row (times, memory, difference from `reference`) and its results."""
  step = jax.jit(jax.value_and_grad(loss_fn(variant, labels)))
  t0 = time.perf_counter()
  compiled = step.lower(logits).compile()
  compile_s = time.perf_counter() - t0
  value, grad = jax.block_until_ready(compiled(logits))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(logits))
    times.append(time.perf_counter() - t0)
  mem = compiled.memory_analysis()
  out = {"variant": variant, "step_ms": 1e3 * float(np.median(times)),
         "step_ms_all": [round(1e3 * t, 3) for t in times], "compile_s": compile_s,
         "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0),
         "device": jax.devices()[0].device_kind, "shape": list(logits.shape)}
  if reference is not None:
    ref_value, ref_grad = reference
    out["loss_diff"] = float(abs(float(value) - float(ref_value)))
    out["loss_rel_diff"] = out["loss_diff"] / max(abs(float(ref_value)), 1e-30)
    out["grad_max_rel_diff"] = float(np.abs(np.asarray(grad) - ref_grad).max()
                                     / max(np.abs(ref_grad).max(), 1e-30))
  return out, (np.asarray(value), np.asarray(grad))


def deviceless(variant: str, batch: int, size: int, classes: int, target_config: str
               ) -> dict:
  """One variant's value_and_grad compiled for the GPU of `target_config` on this machine
  (gpu_aot_compile.py) and read by hlo_traffic.py: kernels, bytes, the time floor."""
  import gpu_aot_compile  # pylint: disable=g-import-not-at-top (needs jax's CUDA plugin)
  device = gpu_aot_compile.gpu_device(target_config)
  sharding = jax.sharding.SingleDeviceSharding(device)
  logits = jax.ShapeDtypeStruct((batch, size // 4, size // 4, classes), jnp.float32,
                                sharding=sharding)
  labels = jax.ShapeDtypeStruct((batch, size, size), jnp.int32, sharding=sharding)
  step = jax.jit(jax.value_and_grad(lambda x, y: loss_fn(variant, y)(x)))
  t0 = time.perf_counter()
  compiled = step.trace(logits, labels).lower(lowering_platforms=("cuda",)).compile()
  stats = gpu_aot_compile.program_stats(compiled)
  return {"variant": variant, "target": device.device_kind, "shape": list(logits.shape),
          "compile_s": time.perf_counter() - t0, **stats}


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=512, help="label size; logits are size/4")
  p.add_argument("--classes", type=int, default=150)
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--variants", default=None,
                 help="comma-separated (default all; on a CPU all but pallas, which runs "
                 "there in Pallas' interpreter: minutes at these sizes)")
  p.add_argument("--json", help="also write the rows to this file")
  p.add_argument("--deviceless", nargs="?", const="benchmarks/gpu_specs/h200.txtpb",
                 metavar="TARGET_CONFIG", help="compile each variant for this GPU (default "
                 "an H200) without one and print hlo_traffic.py's floor instead of timing")
  a = p.parse_args(argv)
  if a.variants:
    variants = a.variants.split(",")
  else:
    on_cpu = not a.deviceless and jax.default_backend() == "cpu"
    variants = [v for v in VARIANTS if not (on_cpu and v == "pallas")]
  for variant in variants:
    if variant not in VARIANTS:
      raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
  if a.deviceless:
    rows = [deviceless(v, a.batch, a.size, a.classes, a.deviceless) for v in variants]
    for row in rows:
      print(json.dumps(row), flush=True)
    return rows
  small = a.size // 4
  logits = 3 * jax.random.normal(jax.random.key(0), (a.batch, small, small, a.classes))
  labels = np.array(jax.random.randint(jax.random.key(1), (a.batch, a.size, a.size), 0,
                                        a.classes))
  labels[:, : a.size // 10] = 255  # some ignored rows
  labels = jnp.asarray(labels)
  rows, reference = [], None
  for variant in variants:
    row, result = run(variant, logits, labels, a.runs, reference)
    if reference is None:
      reference = result
    rows.append(row)
    print(json.dumps(row), flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
