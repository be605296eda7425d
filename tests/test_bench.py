"""semask_jax.bench: the CLI writes sane numbers; the jaxpr FLOP counter counts by hand.

No timed assertions: only that the numbers exist and are in range.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from semask_jax import bench
from semask_jax.models import layers

TINY = ["--override", "embed_dim=16", "--override", "depths=(1,1,1,1)",
        "--override", "num_heads=(1,1,2,2)", "--override", "fpn_channels=16",
        "--override", "window_size=4", "--override", "sem_window_size=4"]


def test_cli_writes_the_json_keys(tmp_path):
  out = tmp_path / "b.json"
  bench.main(["--variant", "T", "--num_classes", "5", "--mode", "infer", "--batch", "1",
              "--size", "40", "--runs", "2", "--warmup", "1", "--matmul_n", "128",
              "--json", str(out), *TINY])
  res = json.loads(out.read_text())
  for k in ("flops_per_image", "images_per_s", "matmul_flops_per_s", "peak_memory_bytes",
            "compile_s", "forward_flops_per_image"):
    assert res[k] > 0, k
  assert 0 < res["utilization"] <= 1.5
  assert res["flops_per_image"] == res["forward_flops_per_image"]
  assert res["embed_dim"] == 16


def test_linear_flops_by_hand():
  lin = layers.Linear(7, 5, rngs=nnx.Rngs(0))
  x = jnp.ones((3, 4, 7))
  assert bench.count_flops(lambda x: lin(x), x) == 2 * 3 * 4 * 7 * 5


def test_conv_flops_by_hand():
  conv = layers.Conv2d(3, 8, 3, stride=2, padding=1, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 9, 9, 3))
  # Output 5x5 per image, each 3*3*3 multiply-adds per output channel.
  assert bench.count_flops(lambda x: conv(x), x) == 2 * 2 * 5 * 5 * 8 * (3 * 3 * 3)


def test_batched_matmul_and_nested_jit():
  a, b = jnp.ones((4, 6, 5)), jnp.ones((4, 5, 3))
  f = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))
  assert bench.count_flops(lambda a, b: f(a, b) + f(a, b), a, b) == 2 * (2 * 4 * 6 * 5 * 3)


def test_scan_multiplies_by_length():
  w = jnp.ones((8, 8))

  def f(x):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

  assert bench.count_flops(f, jnp.ones((2, 8))) == 5 * 2 * 2 * 8 * 8


def test_train_flops_are_forward_plus_backward():
  """Backward of a matmul layer costs two matmuls: the step is about 3x the forward."""
  cfg = bench.load_model_config(None, "T", 5)
  for kv in TINY[1::2]:
    k, v = kv.split("=")
    cfg[k] = eval(v)  # pylint: disable=eval-used
  graphdef, state = bench._abstract_state(cfg)  # pylint: disable=protected-access
  images = jnp.zeros((1, 32, 32, 3))
  fwd = bench.count_flops(bench.make_infer_fn(graphdef), state, images)
  g, p, r = nnx.split(nnx.eval_shape(lambda: bench.build_model(cfg, rngs=nnx.Rngs(0))),
                      nnx.Param, ...)
  grad_fn, _ = bench.make_train_fns(g, bench.optax.adamw(1e-4))
  step = bench.count_flops(grad_fn, p, r, images, jnp.zeros((1, 32, 32), jnp.int32),
                           jax.random.key(0))
  assert 2.5 * fwd < step < 3.5 * fwd, (fwd, step)
  assert np.isfinite(fwd)
