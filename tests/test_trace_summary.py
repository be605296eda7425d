"""benchmarks/trace_summary.py on a real jax.profiler trace of this machine: device time
by category and kernel, and each kernel's HLO computation read from the trace's XSpace."""
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="module")
def trace_summary(load_benchmark):
  return load_benchmark("trace_summary")


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("profile")

  @jax.jit
  def step(x):  # a while loop with a sizeable body, and work outside it
    y = jax.lax.fori_loop(0, 4, lambda i, v: jnp.tanh(v @ v.T) * 0.5 + v, x)
    return jnp.exp(y).sum(axis=0)

  x = jnp.ones((256, 256), jnp.float32) / 256
  jax.block_until_ready(step(x))
  jax.profiler.start_trace(str(out))
  for _ in range(3):
    jax.block_until_ready(step(x))
  jax.profiler.stop_trace()
  return out


def test_summary_attributes_kernels_to_hlo_computations(trace_summary, profile_dir, tmp_path):
  summary = trace_summary.main([str(profile_dir), "--top", "10", "--json",
                                str(tmp_path / "s.json"), "--hlo_dir", str(tmp_path / "hlo")])
  assert summary["kernels"] > 0 and summary["kernel_sum_ms"] > 0
  assert 0 < summary["busy_fraction"] <= 1
  hlo_files = list((tmp_path / "hlo").glob("*.hlo"))
  assert any("jit_step" in f.name for f in hlo_files), hlo_files
  step_text = next(f for f in hlo_files if "jit_step" in f.name).read_text()
  assert " while(" in step_text
  # Kernel time splits over the entry and the loop's body; the top kernels say where.
  assert len(summary["computations"]) >= 2, summary["computations"]
  assert any(r.get("computation") for r in summary["top"]), summary["top"]
  assert json.loads((tmp_path / "s.json").read_text())["computations"] == pytest.approx(
      summary["computations"])


def test_fields_reads_protobuf_wire_format(trace_summary):
  # field 1 varint 150, field 2 bytes b"ab", field 3 fixed64
  buf = bytes([0x08, 0x96, 0x01, 0x12, 0x02]) + b"ab" + bytes([0x19]) + bytes(8)
  assert list(trace_summary._fields(buf)) == [(1, 0, 150), (2, 2, b"ab"), (3, 1, bytes(8))]
