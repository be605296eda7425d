"""Test setup: 8 fake CPU devices (sharding tests), fast XLA:CPU compiles, parsed absl flags
(grain workers)."""
import os

# -O0 on XLA:CPU: the tests compile many small programs and run each once or twice;
# optimising them costs far more than it saves (about 2x less CPU for the suite).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
