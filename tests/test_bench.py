"""semask_jax.bench: the CLI writes sane numbers; the jaxpr FLOP counter counts by hand.

No timed assertions: only that the numbers exist and are in range.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from semask_jax import bench
from semask_jax import cli
from semask_jax import sharding
from semask_jax.models import layers

TINY = ["--override", "embed_dim=16", "--override", "depths=(1,1,1,1)",
        "--override", "num_heads=(1,1,2,2)", "--override", "fpn_channels=16",
        "--override", "window_size=4", "--override", "sem_window_size=4"]


def test_synthetic_labels_look_like_a_segmentation():
  """A few classes in regions (what the Mask2Former criterion's cost depends on), not
  every class in noise; the top eighth ignored."""
  labels = bench.synthetic_labels(np.random.default_rng(0), 3, 100, 150)
  assert labels.shape == (3, 100, 100) and labels.dtype == np.int32
  assert (labels[:, :12] == 255).all()
  for lab in labels:
    present = np.setdiff1d(np.unique(lab), [255])
    assert 8 <= len(present) <= bench.LABEL_CLASSES and present.max() < 150
  # with fewer classes than LABEL_CLASSES, at most all of them
  assert np.setdiff1d(np.unique(bench.synthetic_labels(np.random.default_rng(1), 1, 64, 5)),
                      [255]).max() < 5


def test_cli_writes_the_json_keys(tmp_path):
  out = tmp_path / "b.json"
  bench.main(["--variant", "T", "--num_classes", "5", "--mode", "infer", "--batch", "1",
              "--size", "40", "--runs", "2", "--warmup", "1", "--matmul_n", "128",
              "--json", str(out), *TINY])
  res = json.loads(out.read_text())
  for k in ("flops_per_image", "images_per_s", "matmul_flops_per_s", "peak_memory_bytes",
            "compile_s", "forward_flops_per_image"):
    assert res[k] > 0, k
  assert 0 < res["utilization"] <= 1.5 and 0 < res["utilization_back_to_back"] <= 1.5
  assert res["utilization_back_to_back"] == pytest.approx(
      res["achieved_flops_per_s"] / res["matmul_flops_per_s"])
  assert res["flops_per_image"] == res["forward_flops_per_image"]
  assert res["block_loop"] == "auto" and res["scanned_blocks"] is False  # infer
  assert res["embed_dim"] == 16
  # The training config's defaults: no GPU options on the CPU; the tuned YNNPACK fusions.
  assert res["xla_gpu_fast_compile"] == "train" and res["xla_cpu_ynn_fusions"] == "tuned"
  assert res["compiler_options"] == {sharding._YNN_FUSIONS: sharding._YNN_TUNED["eval"]}


def test_loss_override_edits_the_config_loss_and_refuses_what_it_cannot():
  cfg = bench.load_model_config("configs/ade20k_semask_fpn.py:T", "T", 150,
                                {"ce_backward": "pallas"})
  assert bench._EXPERIMENT_LOSS[id(cfg)].loss.ce_backward == "pallas"
  with pytest.raises(cli.UserError, match="has no config.loss.ce_backwards"):
    bench.load_model_config("configs/ade20k_semask_fpn.py:T", "T", 150,
                            {"ce_backwards": "pallas"})
  with pytest.raises(cli.UserError, match="--loss_override needs --config"):
    bench.load_model_config(None, "T", 5, {"ce_backward": "pallas"})


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


def test_bfloat16_matmul_reference_keeps_its_dtype():
  """The reference matmul's loop carry stays bfloat16 (it used to promote to float32)."""
  call, flops = bench.make_matmul(jnp.bfloat16, n=16)
  out = call()
  assert out.dtype == jnp.bfloat16 and out.shape == (16, 16) and flops > 0


def test_cached_compile_and_profile(tmp_path):
  """The second compile of the step comes from the persistent cache; --profile writes a trace."""
  out = tmp_path / "b.json"
  bench.main(["--variant", "T", "--num_classes", "5", "--mode", "train", "--batch", "1",
              "--size", "32", "--runs", "1", "--warmup", "0", "--matmul_n", "64",
              "--profile", str(tmp_path / "prof"),
              "--compile_cache", str(tmp_path / "cache"), "--json", str(out), *TINY])
  res = json.loads(out.read_text())
  assert res["cached_compile_hit"] is True
  assert res["compile_s"] > 0 and res["cached_compile_s"] > 0 and res["compile_cpu_s"] > 0
  assert np.isfinite(res["images_per_s"]) and res["dtype"] == "float32"
  assert any((tmp_path / "cache").iterdir())
  assert list((tmp_path / "prof").rglob("*.xplane.pb"))
  # The bench leaves no persistent cache switched on behind it.
  assert jax.config.jax_compilation_cache_dir is None


def test_compile_cache_enable_sets_the_thresholds(tmp_path, monkeypatch):
  from semask_jax import compile_cache
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  monkeypatch.delenv(compile_cache.ENV_DIR, raising=False)
  try:
    path = compile_cache.enable(None)
    assert path == str(tmp_path / "xdg" / "semask_jax" / "xla")
    assert jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
    assert jax.config.jax_compilation_cache_max_size > 0  # LRU, hence the lock file
    other = compile_cache.enable(str(tmp_path / "w" / "jax_cache"))
    assert other.endswith("jax_cache") and jax.config.jax_compilation_cache_dir == other
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()
    assert [p for p in (tmp_path / "w" / "jax_cache").iterdir() if p.name != ".lockfile"]
    # Off, a compile, on again: JAX decides at a compile whether its cache is used; enable()
    # must make it decide again.
    compile_cache.disable()
    jax.jit(lambda x: x * 5 - 2)(jnp.arange(6.0)).block_until_ready()
    third = compile_cache.enable(str(tmp_path / "third"))
    jax.jit(lambda x: x * 7 - 3)(jnp.arange(7.0)).block_until_ready()
    assert [p for p in (tmp_path / "third").iterdir() if p.name != ".lockfile"], third
  finally:
    compile_cache.disable()
  assert jax.config.jax_compilation_cache_dir is None


def test_scanned_stages_equal_the_unrolled_blocks():
  """Swin blocks under lax.scan: the same loss and gradients as the loop over blocks,
  with drop path on (the draws follow the step key) and under remat; odd depths too."""
  from semask_jax.models import build_model
  from semask_jax.losses.segmentation import segmentation_loss
  cfg = bench.load_model_config(None, "T", 5)
  for kv in TINY[1::2]:
    k, v = kv.split("=")
    cfg[k] = eval(v)  # pylint: disable=eval-used
  cfg.depths, cfg.drop_path_rate = (3, 2, 1, 1), 0.5
  images = jax.random.normal(jax.random.key(0), (2, 24, 20, 3))
  labels = jax.random.randint(jax.random.key(1), (2, 24, 20), 0, 5)

  def grad_fn(remat, scan):
    """A jitted (params, rng) -> (loss, grads), and the params."""
    cfg.remat, cfg.block_loop = remat, "scan" if scan else "unroll"
    model = build_model(cfg, rngs=nnx.Rngs(0))
    g, p, r = nnx.split(model, nnx.Param, ...)

    def f(p, rng):
      out = nnx.merge(g, p, r, copy=True)(images, train=True, rng=rng)
      return segmentation_loss(out, labels, ignore_index=255)[0]
    return jax.jit(jax.value_and_grad(f)), p

  f, p = grad_fn(False, False)
  ref = f(p, jax.random.key(3))
  for remat in (False, True):
    f, p = grad_fn(remat, True)
    got = f(p, jax.random.key(3))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  other = f(p, jax.random.key(4))  # same program, another step key
  assert abs(float(other[0]) - float(ref[0])) > 1e-6  # the draws really follow the key


def test_bench_and_model_do_not_import_the_data_loaders():
  """grain (and orbax, tensorstore through it) cost the inference bench ~50 MiB of peak
  RSS; `input_pipeline` loads them only when its loaders are used."""
  import subprocess
  import sys
  code = ("import sys, semask_jax.bench, semask_jax.models, input_pipeline\n"
          "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'grain', 'orbax', "
          "'tensorstore', 'tensorflow_datasets'})\n"
          "assert not heavy, heavy\n"
          "assert callable(input_pipeline.create_train_iterator)\n"
          "assert 'grain' in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_accelerator_script_refuses_unknown_rows_and_documents_its_rows():
  """benchmarks/accelerator.sh: --help lists each row it runs; an unknown row or option
  is refused before anything starts."""
  import pathlib
  import re
  import subprocess
  script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "accelerator.sh"
  for args in (["--rows", "b_train nope"], ["--bogus"]):
    p = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, check=False)
    assert p.returncode == 2 and "accelerator.sh: unknown" in p.stderr, p.stderr
  help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                             check=True).stdout
  known = re.search(r'KNOWN="([^"]*)"', script.read_text()).group(1).split()
  assert "--budget" in help_text and all(r in help_text for r in known)
