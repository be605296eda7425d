"""config.xla_cpu_ynn_fusions='tuned': XLA:CPU's YNNPACK fusions chosen per program. The
training step compiles without YNNPACK's convolutions (Eigen's gradients are faster),
evaluation and prediction without its reduce fusions (which materialise full-size maps of
scalar constants); same outputs and gradients as XLA's defaults."""
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from semask_jax import sharding
from semask_jax.models import build_model, default_model_config


def _config(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"xla_gpu_fast_compile": "train", "xla_cpu_fast_compile": False,
                                    "xla_cpu_ynn_fusions": "tuned", **kw})


def test_the_tuned_lists_go_to_cpu_programs_only(monkeypatch):
  ynn, tuned = sharding._YNN_FUSIONS, sharding._YNN_TUNED
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  for program in sharding.PROGRAMS:
    assert sharding.compiler_options(_config(), program) == {ynn: tuned[program]}
    assert sharding.compiler_options(_config(xla_cpu_ynn_fusions="xla"), program) is None
    assert sharding.compiler_options(_config(xla_cpu_fast_compile=True), program) == {
        **sharding._FAST_COMPILE_CPU, ynn: tuned[program]}
  assert "CONVOLUTION" not in tuned["train"] and "REDUCE" not in tuned["eval"]
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert sharding.compiler_options(_config(xla_gpu_fast_compile="none"), "eval") is None


def test_a_typo_is_refused_before_any_compile():
  with pytest.raises(ValueError, match=r"xla_cpu_ynn_fusions must be one of \('tuned', 'xla'\)"):
    sharding.set_jax_compile_flags(_config(xla_cpu_ynn_fusions="lean"))


def _ynn_fusions_holding(hlo: str, op: str) -> int:
  """YNNPACK fusions of the compiled HLO whose computation holds an `op`."""
  bodies = {m.group(1): m.group(2) for m in
            re.finditer(r"^%(\S+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)}
  called = re.findall(r"%\S*ynn\S* = [^\n]*calls=%([\w.\-]+)", hlo)
  return sum(f" {op}(" in bodies.get(c, "") for c in called)


@pytest.fixture(scope="module")
def tiny():
  cfg = default_model_config("T", 7)
  cfg.update(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), fpn_channels=16,
             window_size=4, sem_window_size=4)
  graphdef, state = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)))
  return graphdef, state, jax.random.normal(jax.random.key(0), (1, 64, 64, 3))


def _compile_both(fn, program, *args):
  """(outputs, compiled HLO) with XLA's defaults, then with the tuned list of `program`."""
  results = []
  for options in (None, sharding.compiler_options(_config(), program, backend="cpu")):
    compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
    results.append((compiled(*args), compiled.as_text()))
  return results


def test_evaluation_drops_the_reduce_fusions_and_keeps_the_outputs(tiny):
  graphdef, state, images = tiny
  (ref, hlo_ref), (got, hlo) = _compile_both(
      lambda s, x: nnx.merge(graphdef, s).segment(x), "eval", state, images)
  # XLA:CPU's default has them (a jaxlib that changes its defaults shows here); tuned none.
  assert _ynn_fusions_holding(hlo_ref, "reduce") > 0
  assert _ynn_fusions_holding(hlo, "reduce") == 0
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_training_drops_the_convolutions_and_keeps_the_gradients(tiny):
  graphdef, state, images = tiny

  def loss(s, x):  # a gradient through every convolution of the model
    out = nnx.merge(graphdef, s)(x, train=False)
    return (out["seg_logits"] ** 2).mean() + (out["cls_logits"] ** 2).mean()

  (ref, hlo_ref), (got, hlo) = _compile_both(jax.grad(loss), "train", state, images)
  assert _ynn_fusions_holding(hlo_ref, "convolution") > 0
  assert _ynn_fusions_holding(hlo, "convolution") == 0
  assert _ynn_fusions_holding(hlo, "reduce") > 0  # the training step keeps those
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    scale = float(np.abs(b).max()) or 1.0
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)
