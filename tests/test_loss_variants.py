"""benchmarks/loss_variants.py: each candidate form of the up-sampled CE computes the
library's loss and gradients (so that a GPU lease can time them and keep the fastest)."""

import pytest


@pytest.fixture(scope="module")
def loss_variants(load_benchmark):
  return load_benchmark("loss_variants")


def test_every_variant_gives_the_library_loss_and_gradients(loss_variants, tmp_path):
  rows = loss_variants.main(["--batch", "2", "--size", "32", "--classes", "5", "--runs", "1",
                             "--json", str(tmp_path / "rows.json")])
  # On a CPU the default leaves out the Pallas kernels (the interpreter: minutes at the
  # script's default sizes); they are asked for by name below.
  assert [r["variant"] for r in rows] == [v for v in loss_variants.VARIANTS if v != "pallas"]
  assert rows[0]["variant"] == "remat+phases" and "loss_diff" not in rows[0]
  for row in rows[1:]:
    # The per-pixel logits are the same expression in every form; the phases forms
    # reduce [B, r, W, K] blocks where the others reduce [B, 4r, W, K], which XLA
    # vectorises differently: the per-pixel CE may differ by a float32 ulp (~1e-7
    # relative), the mean by a few.
    assert row["loss_rel_diff"] <= 1e-6, row
    assert row["grad_max_rel_diff"] < 1e-5, row
  assert (tmp_path / "rows.json").exists()


def test_the_pallas_kernels_give_the_library_loss_and_gradients(loss_variants):
  rows = loss_variants.main(["--batch", "1", "--size", "32", "--classes", "5", "--runs", "1",
                             "--variants", "remat+phases,pallas"])
  assert [r["variant"] for r in rows] == ["remat+phases", "pallas"]
  assert rows[1]["loss_rel_diff"] <= 1e-6 and rows[1]["grad_max_rel_diff"] < 1e-5, rows[1]


def test_unknown_variant_is_refused(loss_variants):
  with pytest.raises(SystemExit, match="unknown variant 'fused'"):
    loss_variants.main(["--batch", "1", "--size", "32", "--classes", "3", "--variants", "fused"])
