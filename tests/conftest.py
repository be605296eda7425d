"""Test setup: 8 fake CPU devices (sharding tests), fast XLA:CPU compiles, full float32
matmuls on accelerators, parsed absl flags (grain workers), load_benchmark (the scripts of
benchmarks/ as modules)."""
import os

# -O0 on XLA:CPU: the tests compile many small programs and run each once or twice;
# optimising them costs far more than it saves (about 2x less CPU for the suite).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# The golden vectors and the tests' torch oracles are float32 arithmetic. JAX's default
# precision computes float32 matmuls and convolutions in TF32 on NVIDIA GPUs (bfloat16
# passes on TPU), about 1e-3 relative: beyond the golden tolerances (1e-4). The tests ask
# for true float32 (no effect on CPU); training and the bench keep the fast default.
jax.config.update("jax_default_matmul_precision", "highest")

flags.FLAGS.mark_as_parsed()


def _load_benchmark(name: str):
  """A script of benchmarks/ (not a package) imported as a module."""
  import importlib.util
  import pathlib
  import sys
  path = pathlib.Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # as an import would: dataclasses look their module up there
  spec.loader.exec_module(module)
  return module



@pytest.fixture(scope="session")
def load_benchmark():
  return _load_benchmark
