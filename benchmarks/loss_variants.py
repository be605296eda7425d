"""The training loss's up-sampled cross-entropy, four ways: which is fastest on a GPU?

Why: on an NVIDIA H200 (2026-11-26, commit be2a4ba, PERF_NOTES.md "second lease") the
SeMask-B FPN training step spent ~18.7 ms of its ~102 ms of kernels in the row-blocked
loss (`losses._chunked_upsampled_ce`: logits [16, 128, 128, 150] up-sampled x4 and fused
with the CE, twice per step: the FPN logits and the semantic decoder's). Two things
there look avoidable:

  - remat: each block runs under `jax.checkpoint`, so its forward (the up-sampling and
    both reductions over the classes) runs twice per step. A hand-written VJP keeps the
    block's logsumexp [B, r*4, W] and up-samples once more in the backward:
    d CE / dz = exp(z - lse) - onehot.
  - stack: `resize.interleave_phases` stacks the phases (a concatenate). XLA:GPU wrote
    that [16, 64, 512, 150] float32 block to memory (`input_concatenate_fusion`, ~3.3
    ms/step) and read it back in each reduction; its backward was slices
    (`loop_slice_fusion`, ~4.5 ms/step). A select between the neighbours broadcast over
    a phase axis is the same arithmetic with no concatenate.

Measured (value and gradient of the mean CE, B=16, 128x128 -> 512x512, K=150):

  | variant           | H200 (2026-11-26, PERF_NOTES "fourth lease") | 2-core CPU, batch 2 |
  |-------------------|----------------------------------------------|---------------------|
  | remat+stack       | 10.06 ms                                     | 559 ms              |
  | custom_vjp+stack  |  8.20 ms                                     | 761 ms              |
  | remat+select      | 12.02 ms                                     | 549 ms              |
  | custom_vjp+select |  9.88 ms                                     | 585 ms              |

The library has both stack forms (`losses.pixel_cross_entropy(backward=...)`,
`config.loss.ce_backward`): 'auto' takes custom_vjp+stack on accelerators and
remat+stack on the CPU. The select forms stay here. This script times value_and_grad of
the mean CE for each variant, checks that each gives the first one's loss and gradients,
and prints one JSON line per variant (`device_session.sh` has it as the row
`loss_variants`, ~1 min):

  python benchmarks/loss_variants.py                         # B=16, 128x128 -> 512x512, K=150
  python benchmarks/loss_variants.py --batch 2 --runs 3      # a CPU-sized run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from semask_jax import losses
from semask_jax.models import resize

VARIANTS = ("remat+stack", "custom_vjp+stack", "remat+select", "custom_vjp+select")


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


def loss_fn(variant: str, labels: jax.Array, ignore_index: int = 255
            ) -> Callable[[jax.Array], jax.Array]:
  """Mean up-sampled CE of logits [B, h, w, K] at labels [B, 4h, 4w], one variant."""
  backward, form = variant.split("+")
  interleave = interleave_select if form == "select" else resize.interleave_phases

  def f(logits):
    fac = labels.shape[1] // logits.shape[1]
    saved = losses.interleave_phases
    losses.interleave_phases = interleave  # read when the loss is traced
    try:
      ce = losses._chunked_upsampled_ce(logits, labels, fac, ignore_index, backward)
    finally:
      losses.interleave_phases = saved
    return ce.mean()

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
    out["grad_max_rel_diff"] = float(np.abs(np.asarray(grad) - ref_grad).max()
                                     / max(np.abs(ref_grad).max(), 1e-30))
  return out, (np.asarray(value), np.asarray(grad))


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=512, help="label size; logits are size/4")
  p.add_argument("--classes", type=int, default=150)
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--json", help="also write the rows to this file")
  a = p.parse_args(argv)
  small = a.size // 4
  logits = 3 * jax.random.normal(jax.random.key(0), (a.batch, small, small, a.classes))
  labels = np.array(jax.random.randint(jax.random.key(1), (a.batch, a.size, a.size), 0,
                                        a.classes))
  labels[:, : a.size // 10] = 255  # some ignored rows
  labels = jnp.asarray(labels)
  rows, reference = [], None
  for variant in a.variants.split(","):
    if variant not in VARIANTS:
      raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
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
