"""benchmarks/gpu_aot_compile.py: the pieces of the training step it compiles for a GPU
are the bench's own functions on abstract arguments (checked here by lowering them for
this CPU), and a machine without jax's CUDA plugin gets a clear error."""
import importlib.util

import jax
import numpy as np
import pytest

from semask_jax import bench
from semask_jax import cli

TINY = ["embed_dim=16", "depths=(1,1,1,1)", "num_heads=(1,1,2,2)", "fpn_channels=16",
        "window_size=4", "sem_window_size=4"]


@pytest.fixture(name="aot")
def _aot(load_benchmark):
  return load_benchmark("gpu_aot_compile")


def _args(aot, **changes):
  args = dict(config="configs/ade20k_semask_fpn.py:T", variant="T", num_classes=150,
              mode="train", part="step", dtype="bfloat16", batch=2, size=32, override=TINY,
              loss_override=[],
              target_config=aot.DEFAULT_TARGET)
  return aot.argparse.Namespace(**{**args, **changes})


def test_each_part_lowers_on_abstract_arguments(aot, monkeypatch):
  cpu = jax.devices()[0]
  monkeypatch.setattr(aot, "gpu_device", lambda _: cpu)
  outputs = {}
  for mode, part in [("train", p) for p in aot.PARTS] + [("infer", "step")]:
    args = _args(aot, mode=mode, part=part)
    fn, fn_args, device = aot.build(args)
    assert device is cpu
    leaves = jax.tree.leaves(fn_args)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(x.sharding.device_set == {cpu} for x in leaves)
    outputs[mode, part] = jax.eval_shape(fn, *fn_args)
    jax.jit(fn).trace(*fn_args).lower()  # the program gpu_aot_compile hands to XLA
  # What each piece computes, by its outputs' shapes.
  assert outputs["infer", "step"].shape == (2, 8, 8, 150)  # the FPN logits at 1/4
  loss = outputs["train", "loss"]
  assert loss.shape == () and loss.dtype == np.float32
  (value, _), grads = outputs["train", "grad"]
  assert value.shape == ()
  new_params, _ = outputs["train", "update"]
  assert jax.tree.structure(grads) == jax.tree.structure(new_params)
  (step_params, _, _), step_loss = outputs["train", "step"]
  assert jax.tree.structure(step_params) == jax.tree.structure(new_params)
  assert step_loss.shape == ()


def _has_cuda_plugin() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins at all
    return False


@pytest.mark.skipif(_has_cuda_plugin(), reason="jax's CUDA plugin is installed here")
def test_without_the_cuda_plugin_the_error_says_what_to_install(aot):
  with pytest.raises(cli.UserError, match=r"pip install -e '\.\[gpu-aot\]'"):
    aot.gpu_device(aot.DEFAULT_TARGET)


def test_compiler_options_are_parsed_like_overrides():
  assert bench.parse_overrides(["xla_disable_hlo_passes=triton-softmax-rewriter", "a=3"],
                               "--compiler_option") == {
                                   "xla_disable_hlo_passes": "triton-softmax-rewriter", "a": 3}
  with pytest.raises(cli.UserError, match="--compiler_option wants KEY=VALUE"):
    bench.parse_overrides(["no_value"], "--compiler_option")
  with pytest.raises(cli.UserError, match="own keys .* got 'model.attention_impl'"):
    bench.parse_overrides(["model.attention_impl=cudnn"])


def test_gpu_fast_compile_options_go_to_the_programs_it_names_on_gpus_only(monkeypatch):
  import ml_collections
  from semask_jax import sharding
  fast = {"xla_disable_hlo_passes": "triton-softmax-rewriter",
          "xla_gpu_enable_triton_gemm": False}
  config = ml_collections.ConfigDict({"xla_cpu_fast_compile": False, "xla_cpu_ynn_fusions": "xla",
                                      "xla_gpu_fast_compile": "none"})
  for backend in ("cpu", "gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    for program in sharding.PROGRAMS:
      assert sharding.compiler_options(config, program) is None
  for mode, train, evaluation in (("train", fast, None), ("all", fast, fast)):
    config.xla_gpu_fast_compile = mode
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert sharding.compiler_options(config, "train") == train
    assert sharding.compiler_options(config, "eval") == evaluation
    for backend in ("cpu", "tpu"):
      monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
      assert sharding.compiler_options(config, "train") is None
      # A deviceless GPU compile names the backend it compiles for.
      assert sharding.compiler_options(config, "train", backend="gpu") == train


def test_gpu_fast_compile_typos_are_refused():
  import ml_collections
  from semask_jax import sharding
  config = ml_collections.ConfigDict({"xla_gpu_fast_compile": "training",
                                      "xla_cpu_ynn_fusions": "xla"})
  with pytest.raises(ValueError, match="xla_gpu_fast_compile must be one of .*'training'"):
    sharding.compiler_options(config, "train")
  config.xla_gpu_fast_compile = "all"
  with pytest.raises(ValueError, match="program must be one of"):
    sharding.compiler_options(config, "predict")


def test_gpu_fast_compile_turns_on_the_threefry_kernel_on_gpus_only(monkeypatch):
  import ml_collections
  from semask_jax import sharding
  assert not jax.config.jax_threefry_gpu_kernel_lowering
  try:
    for backend, mode, want in (("cpu", "train", False), ("gpu", "none", False),
                                ("gpu", "train", True)):
      monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
      sharding.set_jax_compile_flags(ml_collections.ConfigDict(
          {"xla_gpu_fast_compile": mode, "xla_cpu_ynn_fusions": "xla"}))
      assert jax.config.jax_threefry_gpu_kernel_lowering is want, (backend, mode)
  finally:
    jax.config.update("jax_threefry_gpu_kernel_lowering", False)


def test_program_stats_carry_the_kernels_and_memory(aot):
  """The JSON row of a compile: kernels by kind and XLA's memory."""
  compiled = jax.jit(lambda x, w: jax.nn.relu(x @ w).sum(0)).lower(
      np.ones((64, 32), np.float32), np.ones((32, 16), np.float32)).compile()
  stats = aot.program_stats(compiled)
  assert stats["argument_bytes"] == (64 * 32 + 32 * 16) * 4 and stats["output_bytes"] == 16 * 4
  assert set(stats) == {"kernels", "temp_bytes", "argument_bytes", "output_bytes"}
