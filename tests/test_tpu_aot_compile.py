"""benchmarks/tpu_aot_compile.py: its own logic without libtpu (which CI does not install):
a clear refusal, the collective count, the config it compiles. With libtpu (pip install
-e '.[tpu-aot]'), a small SeMask step compiles for a TPU slice and fits its chips."""

import importlib.util

import pytest

from semask_jax import cli

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
TINY = ["--override", "embed_dim=16", "--override", "depths=(2,2,2,2)",
        "--override", "num_heads=(1,1,2,2)", "--override", "fpn_channels=16"]


@pytest.fixture(name="tpu_aot")
def _tpu_aot(load_benchmark):
  return load_benchmark("tpu_aot_compile")


@pytest.mark.skipif(HAVE_LIBTPU, reason="libtpu is installed here")
def test_without_libtpu_the_script_says_how_to_get_it(tpu_aot):
  with pytest.raises(cli.UserError, match=r"no libtpu here: .*\[tpu-aot\]"):
    tpu_aot.main(["--config", "configs/ade20k_semask_fpn.py:T"])


def test_missing_config_is_refused(tpu_aot):
  with pytest.raises(cli.UserError, match="config file 'configs/nope.py' not found"):
    tpu_aot.main(["--config", "configs/nope.py:T"])


def test_collectives_are_counted_by_kind(tpu_aot):
  hlo = ("%a = f32[4] all-reduce(%x), replica_groups={}\n"
         "%b = f32[4] all-reduce-start(%y)\n%c = f32[8] all-gather(%z), dimensions={0}\n"
         "%d = f32[4] add(%a, %c)  // an all-reduce in a comment is not an op\n")
  assert tpu_aot.collectives(hlo) == {"all-reduce": 2, "all-gather": 1}
  # XLA:TPU's reduce-scatter: a fusion around one all-reduce whose result each chip slices.
  fused = ("%all-reduce-scatter.1 (p: bf16[8]) -> bf16[2] {\n"
           "  %r = bf16[8] all-reduce(%p), replica_groups={{0,1,2,3}}\n"
           "  ROOT %s = bf16[2] dynamic-slice(%r, %i), dynamic_slice_sizes={2}\n}\n"
           "%f = bf16[2] fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1\n")
  assert tpu_aot.collectives(hlo + fused) == {"all-reduce": 2, "all-gather": 1,
                                              "reduce-scatter": 1}


def test_hbm_per_device_shares_a_chip_between_its_devices(tpu_aot):
  class Dev:  # the attributes libtpu's compile-only devices have
    def __init__(self, kind, coords, core):
      self.device_kind, self.coords, self.core_on_chip, self.id = kind, coords, core, 0
  v5e = [Dev("TPU v5 lite", (x, y, 0), 0) for x in range(2) for y in range(2)]
  v4 = [Dev("TPU v4", (x, 0, 0), c) for x in range(2) for c in range(2)]
  assert tpu_aot.hbm_per_device(v5e) == 16
  assert tpu_aot.hbm_per_device(v4) == 16  # 32 GiB per chip, two TensorCores as devices
  assert tpu_aot.hbm_per_device([Dev("TPU v9", (0, 0, 0), 0)]) is None


def test_config_overrides_batch_and_size(tpu_aot):
  args = tpu_aot.argparse.Namespace(
      config="configs/ade20k_semask_fpn.py:T", loss_override=["ce_backward=remat"],
      override=["embed_dim=16"], dtype="bfloat16", batch=8, size=256, state_sharding="fsdp",
      fsdp_min_size=0)
  config = tpu_aot.load_config(args)
  assert config.batch_size == 8 and config.grad_accum_steps == 1
  assert config.state_sharding == "fsdp" and config.fsdp_min_size == 0
  assert tuple(config.data.crop_size) == (256, 256)
  assert config.model.embed_dim == 16 and config.model.dtype == "bfloat16"
  assert config.model.block_loop == "unroll" and config.loss.ce_backward == "remat"


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu: pip install -e '.[tpu-aot]'")
def test_a_tiny_training_step_compiles_for_a_v5e_slice(tpu_aot):
  out = tpu_aot.main(["--config", "configs/ade20k_semask_fpn.py:T", "--topology", "v5e:2x2",
                      "--batch", "4", "--size", "64", *TINY])
  assert out["devices"] == 4 and out["device_kind"] == "TPU v5 lite"
  assert out["hbm_per_device_gib"] == 16
  assert out["fits"] and 0 < out["peak_per_device_bytes"] < 2**30
  # Data parallel: the gradients are summed over the chips.
  assert out["collectives"].get("all-reduce", 0) >= 1
  # The state split over the chips: the weights gathered, the gradients reduce-scattered,
  # a quarter of the state's arguments per chip.
  split = tpu_aot.main(["--config", "configs/ade20k_semask_fpn.py:T", "--topology", "v5e:2x2",
                        "--batch", "4", "--size", "64", "--state_sharding", "fsdp",
                        "--fsdp_min_size", "0", *TINY])
  assert split["state_sharding"] == "fsdp"
  assert split["collectives"].get("all-gather", 0) >= 1
  assert split["collectives"].get("reduce-scatter", 0) >= 1
  arguments = lambda r: r["memory_per_device_bytes"]["argument"]  # noqa: E731
  assert arguments(split) < 0.5 * arguments(out)
