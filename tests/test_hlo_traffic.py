"""benchmarks/hlo_traffic.py: bytes, FLOPs and a time bound per kernel of an optimised HLO."""
import jax
import jax.numpy as jnp
import pytest

# A scheduled GPU module in the form XLA prints it (gpu_aot_compile --hlo_out), cut down:
# a cuBLAS gemm, an element-wise fusion, and a while loop (8 trips) whose body slices a
# row out of its carry and writes one back in place.
_HLO = """\
HloModule jit_step, is_scheduled=true

%fused_slice (param_0: f32[8,1024]) -> f32[1,1024] {
  %param_0 = f32[8,1024]{1,0} parameter(0)
  ROOT %slice.1 = f32[1,1024]{1,0} slice(%param_0), slice={[2:3], [0:1024]}
}

%fused_dus (param_0.1: f32[8,1024], param_1: f32[1,1024], param_2: s32[]) -> f32[8,1024] {
  %param_0.1 = f32[8,1024]{1,0} parameter(0)
  %param_1 = f32[1,1024]{1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %constant_0 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[8,1024]{1,0} dynamic-update-slice(%param_0.1, %param_1, %param_2, %constant_0)
}

%fused_add (param_0.2: bf16[64,32], param_1.2: bf16[64,32]) -> bf16[64,32] {
  %param_0.2 = bf16[64,32]{1,0} parameter(0)
  %param_1.2 = bf16[64,32]{1,0} parameter(1)
  ROOT %add.3 = bf16[64,32]{1,0} add(%param_0.2, %param_1.2)
}

%body (arg: (s32[], f32[8,1024])) -> (s32[], f32[8,1024]) {
  %arg = (s32[], f32[8,1024]{1,0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%arg), index=0
  %gte.1 = f32[8,1024]{1,0} get-tuple-element(%arg), index=1
  %loop_slice_fusion = f32[1,1024]{1,0} fusion(%gte.1), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/transpose(jvp(loss))/while/body/slice"}
  %loop_dynamic_update_slice_fusion = f32[8,1024]{1,0} fusion(%gte.1, %loop_slice_fusion, %gte.0), kind=kLoop, calls=%fused_dus, metadata={op_name="jit(step)/transpose(jvp(loss))/while/body/dynamic_update_slice"}
  ROOT %tuple.1 = (s32[], f32[8,1024]{1,0}) tuple(%gte.0, %loop_dynamic_update_slice_fusion)
}

%cond (arg.1: (s32[], f32[8,1024])) -> pred[] {
  %arg.1 = (s32[], f32[8,1024]{1,0}) parameter(0)
  %gte.2 = s32[] get-tuple-element(%arg.1), index=0
  %constant_8 = s32[] constant(8)
  ROOT %lt = pred[] compare(%gte.2, %constant_8), direction=LT
}

ENTRY %main.9 (p0: f32[8,1024], a: bf16[64,32], b: bf16[32,16]) -> (bf16[64,16], bf16[64,32], (s32[], f32[8,1024])) {
  %p0 = f32[8,1024]{1,0} parameter(0)
  %a = bf16[64,32]{1,0} parameter(1)
  %b = bf16[32,16]{1,0} parameter(2)
  %cublas-lt-matmul.1 = (bf16[64,16]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(backbone)/layers.0/blocks/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %get-tuple-element.5 = bf16[64,16]{1,0} get-tuple-element(%cublas-lt-matmul.1), index=0
  %loop_add_fusion = bf16[64,32]{1,0} fusion(%a, %a), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp(backbone)/layers.0/blocks/add"}
  %constant_1 = s32[] constant(0)
  %tuple.2 = (s32[], f32[8,1024]{1,0}) tuple(%constant_1, %p0)
  %while.3 = (s32[], f32[8,1024]{1,0}) while(%tuple.2), condition=%cond, body=%body, metadata={op_name="jit(step)/transpose(jvp(loss))/while"}, backend_config={"known_trip_count":{"n":"8"},"known_init_step":{"init":"0","step":"1"}}
  ROOT %tuple.4 = (bf16[64,16]{1,0}, bf16[64,32]{1,0}, (s32[], f32[8,1024]{1,0})) tuple(%get-tuple-element.5, %loop_add_fusion, %while.3)
}
"""


@pytest.fixture(scope="module")
def hlo_traffic(load_benchmark):
  return load_benchmark("hlo_traffic")


def test_kernels_of_a_module(hlo_traffic):
  ks = {k["name"]: k for k in hlo_traffic.kernels(_HLO)}
  assert set(ks) == {"cublas-lt-matmul.1", "loop_add_fusion", "loop_slice_fusion",
                     "loop_dynamic_update_slice_fusion"}  # no tuples, constants, whiles
  gemm = ks["cublas-lt-matmul.1"]
  # a, b and the result (not the s8 workspace); 2 * M * N * K.
  assert gemm["bytes"] == 64 * 32 * 2 + 32 * 16 * 2 + 64 * 16 * 2
  assert gemm["flops"] == 2 * 64 * 16 * 32 and gemm["kind"] == "gemm"
  assert gemm["part"] == "backbone/layers.0"
  assert ks["loop_add_fusion"]["bytes"] == 3 * 64 * 32 * 2
  # The body runs 8 times; the slice reads one row of its [8, 1024] operand, not all.
  sl = ks["loop_slice_fusion"]
  assert sl["times"] == 8 and sl["bytes"] == 8 * 2 * 1024 * 4
  assert sl["part"] == "loss (backward)"
  # In place: reads the update and the index, writes the update; the buffer is untouched.
  assert ks["loop_dynamic_update_slice_fusion"]["bytes"] == 8 * (2 * 1024 * 4 + 4)


def test_summary_and_time_bound(hlo_traffic, capsys):
  s = hlo_traffic.summarize(_HLO, bandwidth=1e9, matmul_flops=1e6, launch_us=1.0, top=2)
  assert s["launches"] == 18
  gemm_ms = 1e3 * max(7168 / 1e9, 65536 / 1e6) + 1e-3
  assert s["by_kind"][0]["kind"] == "gemm" and s["by_kind"][0]["time_ms"] == pytest.approx(gemm_ms)
  assert s["time_ms"] == pytest.approx(sum(r["time_ms"] for r in s["by_part"]))
  assert s["matmul_ms"] == pytest.approx(65.536)
  assert [k["name"] for k in s["top"]] == ["cublas-lt-matmul.1", "loop_dynamic_update_slice_fusion"]
  hlo_traffic.print_summary(s)
  out = capsys.readouterr().out
  assert "18 kernel launches" in out and "loss (backward)" in out


def test_a_real_module_and_the_command_line(hlo_traffic, tmp_path, capsys):
  """A module XLA compiled here (CPU): its loop body's kernels run its trip count."""
  def f(x, w):
    return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ w) + i, x)
  text = jax.jit(f).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
  path = tmp_path / "module.hlo"
  path.write_text(text)
  s = hlo_traffic.main([str(path), "--json", str(tmp_path / "s.json")])
  assert s["launches"] > 5 and any(k["times"] == 5 for k in hlo_traffic.kernels(text))
  assert (tmp_path / "s.json").stat().st_size > 0
  with pytest.raises(SystemExit):
    hlo_traffic.main([str(tmp_path / "missing.hlo")])
  assert "no such file" in capsys.readouterr().err
  with pytest.raises(ValueError, match="no ENTRY"):
    hlo_traffic.kernels("not an HLO module")
