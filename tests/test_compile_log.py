"""benchmarks/compile_log.py: XLA's own compile log summarised (passes, phases, silences)."""
import os
import subprocess
import sys

import pytest

_LOG = """\
I1126 14:53:33.000000   100 cpu_compiler.cc:2091] Compiling: jit_step
I1126 14:53:33.100000   100 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_step: outer
I1126 14:53:33.100000   100 hlo_pass_pipeline.cc:176] HLO pass: dce time: 100 ms (100000 us) (cumulative: 1 us, max: 1 us, #called: 1)
I1126 14:53:33.200000   100 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_step: simplification
I1126 14:53:33.700000   100 hlo_pass_pipeline.cc:176] HLO pass: algsimp time: 500 ms (500000 us) (cumulative: 1 us, max: 1 us, #called: 2)
I1126 14:53:33.700000   100 hlo_pass_pipeline.cc:176] HLO pass: simplification time: 500 ms (500000 us) (cumulative: 1 us, max: 1 us, #called: 3)
I1126 14:53:36.700000   100 cpu_compiler.cc:2094] Compiling [jit_step] for CPU using JIT time: 3.60 s (3600000 us) (cumulative: 1 us, max: 1 us, #called: 1)
not a glog line
I1126 14:53:36.800000   200 hlo_pass_pipeline.cc:303] Running HLO pass pipeline on module jit_other: outer
I1126 14:53:36.900000   200 hlo_pass_pipeline.cc:176] HLO pass: dce time: 10 ms (10000 us) (cumulative: 1 us, max: 1 us, #called: 4)
"""


@pytest.fixture(scope="module")
def compile_log(load_benchmark):
  return load_benchmark("compile_log")


def test_summary_of_a_log(compile_log):
  s = compile_log.summarize(_LOG.splitlines(keepends=True))
  assert s["lines"] == 9 and s["span_s"] == pytest.approx(3.9)
  step = s["modules"]["jit_step"]
  assert list(s["modules"]) == ["jit_step", "jit_other"]  # longest span first
  assert step["span_s"] == pytest.approx(3.6)
  # The nested pipeline's own summary line is not counted twice.
  assert step["pipelines"] == pytest.approx({"outer": 0.1, "simplification": 0.5})
  assert step["passes_s"] == pytest.approx(0.6)
  assert step["timers"]["Compiling [jit_step] for CPU using JIT"] == pytest.approx(3.6)
  assert step["timers"]["algsimp"] == pytest.approx(0.5)
  # The 3 s with no line (LLVM) is the longest silence, on jit_step's thread.
  top = s["silences"][0]
  assert top["s"] == pytest.approx(3.0) and top["module"] == "jit_step"
  assert "HLO pass: simplification" in top["after"] and "Compiling [jit_step]" in top["before"]
  assert s["modules"]["jit_other"]["passes_s"] == pytest.approx(0.01)


def test_no_glog_lines_is_a_clear_error(compile_log):
  with pytest.raises(ValueError, match="TF_CPP_MIN_LOG_LEVEL=0"):
    compile_log.summarize(["hello\n"])


def test_a_real_xla_log(compile_log, tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0",
             TF_CPP_VMODULE="hlo_pass_pipeline=1,cpu_compiler=1")
  code = ("import jax, jax.numpy as jnp\n"
          "jax.jit(lambda x: jnp.tanh(x @ x.T).sum()).lower(jnp.ones((8, 8))).compile()\n")
  log = tmp_path / "compile.log"
  with open(log, "w") as f:
    subprocess.run([sys.executable, "-c", code], stderr=f, env=env, check=True, timeout=120)
  s = compile_log.main([str(log), "--json", str(tmp_path / "s.json")])
  lam = [m for name, m in s["modules"].items() if "lambda" in name]
  assert lam and lam[0]["passes_s"] > 0 and lam[0]["timers"], s["modules"].keys()
  assert (tmp_path / "s.json").exists()
