"""benchmarks/trace_summary.py on a real jax.profiler trace of this machine: device time
by category and kernel, and each kernel's HLO computation read from the trace's XSpace."""
import gzip
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
  def step(x):  # a while loop with a sizeable body, and work outside it, in named scopes
    with jax.named_scope("loop"):
      y = jax.lax.fori_loop(0, 4, lambda i, v: jnp.tanh(v @ v.T) * 0.5 + v, x)
    with jax.named_scope("tail"):
      return jnp.exp(y).sum(axis=0)

  @jax.jit
  def decoy(x):  # the same kernels by name in another module, loaded but not traced
    with jax.named_scope("decoy"):
      y = jax.lax.fori_loop(0, 4, lambda i, v: jnp.tanh(v @ v.T) * 0.5 + v, x)
      return jnp.exp(y).sum(axis=0)

  x = jnp.ones((256, 256), jnp.float32) / 256
  jax.block_until_ready(step(x))
  jax.block_until_ready(decoy(x))
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
  # Device time per model part, from the named scopes in the kernels' op_names.
  assert summary["parts"].get("loop", 0) > 0, summary["parts"]
  assert not any("decoy" in p for p in summary["parts"]), summary["parts"]
  assert sum(summary["parts"].values()) == pytest.approx(summary["kernel_sum_ms"])
  trace = trace_summary.find_trace(profile_dir)
  assert trace_summary.executed_modules(trace_summary.load_events(trace)) == {"jit_step"}  # decoy ran before the trace


def test_hlo_index_prefers_the_traced_modules_names(trace_summary):
  # The trace carries every module the process loaded, and instruction names repeat
  # across them (a CI run attributed a step's kernels to another test's einsums).
  def text(module, scope):
    return (f"HloModule {module}, is_scheduled=true\n\n"
            "ENTRY %main (p: f32[2]) -> f32[2] {\n"
            "  ROOT %fusion.1 = f32[2]{0} fusion(f32[2]{0} %p), kind=kLoop, calls=%fc, "
            f'metadata={{op_name="jit(f)/{scope}/add"}}\n}}\n')
  for order in (("jit_step", "jit_other"), ("jit_other", "jit_step")):
    texts = {m: text(m, "mine" if m == "jit_step" else "theirs") for m in order}
    index = trace_summary.hlo_index(texts, prefer={"jit_step"})
    assert index["fusion.1"]["part"] == "mine" and index["fusion_1"]["part"] == "mine"


def test_model_part_reads_named_scopes_from_op_names(trace_summary):
  part = trace_summary.model_part
  assert part("jit(step)/jvp(backbone)/layers.0/blocks/while/body/add") == "backbone/layers.0"
  assert part("jit(step)/transpose(jvp(backbone))/layers.2/blocks/dot_general", 3) == (
      "backbone/layers.2/blocks (backward)")
  # A rematerialised forward inside the backward names its scope twice: once counted.
  assert part("jit(step)/transpose(jvp(decode_head))/jvp(decode_head)/checkpoint/reduce_sum"
              ) == "decode_head (backward)"
  # jit(f) is a function, not a scope; JAX's control-flow components are dropped.
  assert part("jit(step)/jvp(decode_head)/jit(_bernoulli)/jit(_uniform)/while/body/"
              "closed_call/shift_right_logical") == "decode_head"
  assert part("jit(step)/optimizer/add") == "optimizer"
  assert part("reduce_sum") == "(no scope)"


def test_fields_reads_protobuf_wire_format(trace_summary):
  # field 1 varint 150, field 2 bytes b"ab", field 3 fixed64
  buf = bytes([0x08, 0x96, 0x01, 0x12, 0x02]) + b"ab" + bytes([0x19]) + bytes(8)
  assert list(trace_summary._fields(buf)) == [(1, 0, 150), (2, 2, b"ab"), (3, 1, bytes(8))]


def test_cpu_kernels_on_the_client_thread_count_and_wrappers_do_not(trace_summary, tmp_path):
  # Under load the CPU client's own thread may run every kernel (a CI run saw no kernel on
  # the Eigen pool's threads). A while loop's event encloses its body's kernels, and
  # "end: ..." markers and runtime calls are not kernels: none of those may be counted.
  meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
          dict(ph="M", name="thread_name", pid=1, tid=1, args=dict(name="python")),
          dict(ph="M", name="thread_name", pid=1, tid=2,
               args=dict(name="tf_XLAPjRtCpuClient/123"))]
  x = lambda name, ts, dur, tid=2: dict(ph="X", pid=1, tid=tid, name=name, ts=ts, dur=dur)  # noqa: E731
  events = meta + [
      x("$api.py:2479 block_until_ready", 0, 100, tid=1),
      x("ThunkExecutor::Execute (wait for completion)", 0, 100),
      x("copy.6", 0, 10), x("end: copy.6", 10, 1),
      x("while.5", 11, 80), x("ynn_fusion", 11, 50), x("end: ynn_fusion", 61, 1),
      x("multiply_add_fusion", 62, 20), x("end: while.5", 91, 1)]
  trace = tmp_path / "vm.trace.json.gz"
  with gzip.open(trace, "wt") as f:
    json.dump(dict(traceEvents=events), f)
  s = trace_summary.summarize(trace)
  assert s["source"] == "host XLA threads"
  assert s["kernels"] == 3 and s["kernel_sum_ms"] == pytest.approx(0.080)
  assert {r["name"] for r in s["top"]} == {"copy.6", "ynn_fusion", "multiply_add_fusion"}
