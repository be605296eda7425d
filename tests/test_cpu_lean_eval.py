"""config.xla_cpu_lean_eval: evaluation and prediction on a CPU compile without XLA:CPU's
YNNPACK reduce fusions (which materialise full-size maps of scalar constants), the
training step with them; same outputs."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from semask_jax import sharding
from semask_jax.models import build_model, default_model_config


def _config(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"xla_gpu_fast_compile": "train", "xla_cpu_fast_compile": False,
                                    "xla_cpu_lean_eval": True, **kw})


def test_only_cpu_evaluation_gets_the_lean_options(monkeypatch):
  lean = sharding._LEAN_EVAL_CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert sharding.compiler_options(_config(), "eval") == lean
  assert sharding.compiler_options(_config(), "train") is None
  assert sharding.compiler_options(_config(xla_cpu_lean_eval=False), "eval") is None
  fast = sharding.compiler_options(_config(xla_cpu_fast_compile=True), "eval")
  assert fast == {**sharding._FAST_COMPILE_CPU, **lean}
  assert sharding.compiler_options(_config(xla_cpu_fast_compile=True), "train") == (
      sharding._FAST_COMPILE_CPU)
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert sharding.compiler_options(_config(xla_gpu_fast_compile="none"), "eval") is None


def _ynn_reduce_fusions(hlo: str) -> int:
  """YNNPACK fusions of the compiled HLO whose computation holds a reduce."""
  bodies = {m.group(1): m.group(2) for m in
            re.finditer(r"^%(\S+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)}
  called = re.findall(r"%\S*ynn\S* = [^\n]*calls=%([\w.\-]+)", hlo)
  return sum(" reduce(" in bodies.get(c, "") for c in called)


def test_lean_eval_drops_the_reduce_fusions_and_keeps_the_outputs():
  cfg = default_model_config("T", 7)
  cfg.update(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), fpn_channels=16,
             window_size=4, sem_window_size=4)
  graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
  images = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))

  def segment(state, images):
    return nnx.merge(graphdef, state).segment(images)

  outs, counts = [], []
  for options in (None, sharding.compiler_options(_config(), "eval", backend="cpu")):
    compiled = jax.jit(segment, compiler_options=options).lower(state, images).compile()
    counts.append(_ynn_reduce_fusions(compiled.as_text()))
    outs.append(np.asarray(compiled(state, images)))
  assert counts[0] > 0 and counts[1] == 0, counts  # XLA:CPU's default has them; lean none
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
