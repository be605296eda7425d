"""DCNv2 forward + backward time: semask_jax.models.dcn.deform_conv2d (jit, CPU) against
torchvision.ops.deform_conv2d, at FaPN's shapes (C = 256 in and out, 8 deformable groups,
3x3, padding 1, batch 1). Needs torch + torchvision beside jax (a separate venv: see
docs/dcn.md). Run from the repository root:

  taskset -c 0,1 /tmp/tv/bin/python benchmarks/dcn_speed.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time(fn, repeats: int) -> list[float]:
  fn()  # warm-up (compilation)
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--sizes", default="64,128")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  os.environ.setdefault("XLA_FLAGS", "")
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torchvision

  from semask_jax.models.dcn import deform_conv2d

  torch.set_num_threads(args.threads)
  c, dg, k = 256, 8, 3
  print(f"jax {jax.__version__}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, threads {args.threads}, C {c}, dg {dg}, {k}x{k}")
  for size in (int(s) for s in args.sizes.split(",")):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, c, size, size)).astype(np.float32)
    off = rng.normal(0, 2, size=(1, 2 * dg * k * k, size, size)).astype(np.float32)
    mask = rng.uniform(size=(1, dg * k * k, size, size)).astype(np.float32)
    w = (rng.normal(size=(c, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    b = rng.normal(size=(c,)).astype(np.float32)
    ct = rng.normal(size=(1, c, size, size)).astype(np.float32)

    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    jargs = (nhwc(x), nhwc(off), nhwc(mask), jnp.asarray(w.transpose(2, 3, 1, 0)), jnp.asarray(b))
    jct = nhwc(ct)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(deform_conv2d(*a, padding=1) * jct),
                            argnums=(0, 1, 2, 3, 4)))
    fwd = jax.jit(lambda *a: deform_conv2d(*a, padding=1))
    j_fb = _time(lambda: jax.block_until_ready(grad(*jargs)), args.repeats)
    j_f = _time(lambda: jax.block_until_ready(fwd(*jargs)), args.repeats)

    targs = [torch.tensor(a, requires_grad=True) for a in (x, off, mask, w, b)]
    tct = torch.tensor(ct)

    def t_step(backward=True):
      for t in targs:
        t.grad = None
      y = torchvision.ops.deform_conv2d(targs[0], targs[1], targs[3], targs[4], padding=1,
                                        mask=targs[2])
      if backward:
        (y * tct).sum().backward()
      return y

    def t_fwd():
      with torch.no_grad():
        t_step(False)

    t_fb = _time(t_step, args.repeats)
    t_f = _time(t_fwd, args.repeats)
    jm, tm = min(j_fb), min(t_fb)
    print(f"{size}x{size}: forward+backward jax {jm:.3f} s (median {np.median(j_fb):.3f}), "
          f"torchvision {tm:.3f} s (median {np.median(t_fb):.3f}), torchvision/jax "
          f"{tm / jm:.2f}x | forward jax {min(j_f):.3f} s, torchvision {min(t_f):.3f} s, "
          f"torchvision/jax {min(t_f) / min(j_f):.2f}x")


if __name__ == "__main__":
  main()
