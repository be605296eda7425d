"""benchmarks/torch_reference.py computes the reference's function: the golden vectors'
eval outputs and one training step (losses, gradients, BatchNorm statistics, AdamW update)
from the recipe's weights, loaded strictly under the checkpoint's names. Its timings are
the official code's stand-in for the issue's same-machine ratios."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.golden_utils import GOLDEN_DIR, golden_files, load_vector
# The golden tests' own tolerances: max |err| <= RTOL_MAPS * max(1, max |ref|) for maps;
# for gradients RTOL_GRAD of the tensor's max |ref| plus RTOL_GRAD_MODEL of the model's.
from tests.test_golden import RTOL_LOSS, RTOL_MAPS
from tests.test_golden_train import GRAD_DEFINED, PARAM_TOL_LR, RTOL_BN, RTOL_GRAD, RTOL_GRAD_MODEL
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tr(load_benchmark):
  return load_benchmark("torch_reference")


def _load(tr, meta, sd, **kwargs):
  """The transcription of meta['config'] with the recipe's weights, loaded strictly (the
  integer relative_position_index buffers, which the recipe does not draw, are the
  model's own)."""
  c = meta["config"]
  model = tr.SeMaskFPN(num_classes=c["num_classes"], fpn_channels=c["fpn_channels"],
                       embed_dim=c["embed_dim"], depths=c["depths"], num_heads=c["num_heads"],
                       window_size=c["window_size"], num_sem_blocks=c["num_sem_blocks"],
                       **kwargs)
  state = {k: torch.from_numpy(v) for k, v in sd.items()}
  own = model.state_dict()
  undrawn = {k: v for k, v in own.items() if k not in state}
  assert undrawn and all(k.endswith(("relative_position_index", "num_batches_tracked"))
                         for k in undrawn), sorted(undrawn)[:5]
  model.load_state_dict({**undrawn, **state}, strict=True)
  return model


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_eval_outputs_are_the_golden_ones(tr, path):
  vec, meta, sd = load_vector(path)
  model = _load(tr, meta, sd).eval()
  with torch.no_grad():
    seg, cls, feats, sems = model(torch.from_numpy(vec["image"]))
    loss_ce, loss_cate = tr.segmentation_loss(seg, cls, torch.from_numpy(vec["label"]).long(),
                                              meta["config"]["cate_w"])
  maps = {"seg_logits": seg, "cls_logits": cls}
  maps.update({f"feat{i}": f for i, f in enumerate(feats)})
  maps.update({f"sem{i}": s for i, s in enumerate(sems)})
  for name, got in maps.items():
    ref = vec[name]
    assert tuple(got.shape) == ref.shape, name
    err = float(np.abs(got.numpy() - ref).max())
    assert err <= RTOL_MAPS * max(1.0, float(np.abs(ref).max())), (name, err)
  for name, got in (("loss_ce", loss_ce), ("loss_cate", loss_cate)):
    np.testing.assert_allclose(float(got.detach()), float(vec[name]), rtol=RTOL_LOSS,
                               err_msg=name)


TRAIN_FILES = sorted((GOLDEN_DIR / "train").glob("*.npz"))


@pytest.mark.parametrize("path", TRAIN_FILES, ids=lambda p: p.stem)
def test_training_step_is_the_golden_one(tr, path):
  vec, meta, sd = load_vector(path)
  c = meta["config"]
  model = _load(tr, meta, sd, drop_path_rate=c["drop_path_rate"], sem_dropout=c["sem_dropout"],
                head_dropout=c["dropout_ratio"]).train()
  labels = torch.from_numpy(vec["label"]).long()
  seg, cls, _, _ = model(torch.from_numpy(vec["image"]))
  loss_ce, loss_cate = tr.segmentation_loss(seg, cls, labels, c["cate_w"], c["ohem_min_kept"])
  for name, got in (("loss_ce", loss_ce), ("loss_cate", loss_cate),
                    ("loss_total", loss_ce + loss_cate)):
    np.testing.assert_allclose(float(got.detach()), float(vec[name]), rtol=RTOL_LOSS,
                               err_msg=name)
  opt = tr.adamw(model, c["lr"], c["weight_decay"], tuple(c["betas"]), c["eps"])
  opt.zero_grad()
  (loss_ce + loss_cate).backward()

  params = dict(model.named_parameters())
  ref_grads = {k[len("grad/"):]: v for k, v in vec.items() if k.startswith("grad/")}
  assert set(ref_grads) == set(params), sorted(set(ref_grads) ^ set(params))[:5]
  model_max = max(float(np.abs(g).max()) for g in ref_grads.values())
  for key, ref in ref_grads.items():
    err = float(np.abs(params[key].grad.numpy() - ref).max())
    assert err <= RTOL_GRAD * float(np.abs(ref).max()) + RTOL_GRAD_MODEL * model_max, (key, err)

  buffers = dict(model.named_buffers())
  bn_refs = {k[len("bn_after/"):]: v for k, v in vec.items() if k.startswith("bn_after/")}
  assert bn_refs
  for key, ref in bn_refs.items():
    err = float(np.abs(buffers[key].numpy() - ref).max()) / float(np.abs(ref).max())
    assert err <= RTOL_BN, (key, err)

  before = {k: p.detach().clone().numpy() for k, p in params.items()}
  opt.step()
  moved = 0.0
  for key, p in params.items():
    ref = vec[f"param_after/{key}"]
    err = np.abs(p.detach().numpy() - ref) / c["lr"]
    defined = np.abs(ref_grads[key]) > GRAD_DEFINED  # elsewhere Adam's step is noise/|noise|
    assert float(err[defined].max(initial=0.0)) <= PARAM_TOL_LR, key
    moved = max(moved, float(np.abs(p.detach().numpy() - before[key]).max()) / c["lr"])
  assert moved > 0.5, moved  # the step moved the parameters (by about lr)


def run_bench_cli(tmp_path, *args: str) -> dict:
  """benchmarks/torch_reference.py with `args` (and --json) in its own process: it succeeds,
  prints the one JSON row it writes, and never imports jax (its runtime would count in the
  reference's peak RSS). Returns the row."""
  out = tmp_path / "row.json"
  code = (f"import runpy, sys; sys.argv = ['torch_reference', *{list(args)!r}, '--json', "
          f"{str(out)!r}]; runpy.run_path('benchmarks/torch_reference.py', run_name='__main__');"
          " assert 'jax' not in sys.modules, 'jax was imported'")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  row = json.loads(out.read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == row
  return row


def test_bench_runs_without_jax(tmp_path):
  """A tiny training bench: the timings, SeMask-FPN by default."""
  row = run_bench_cli(tmp_path, "--mode", "train", "--size", "64", "--batch", "1", "--runs",
                      "2", "--threads", "1")
  assert row["impl"] == "torch_reference" and row["mode"] == "train" and row["threads"] == 1
  assert row["model"] == "fpn"
  assert len(row["step_times_s"]) == 2 and row["images_per_s"] > 0
  assert row["peak_memory_bytes"] > 0


def test_decode_head_losses_add_mmseg_accuracy(tr):
  """The training step's losses as SeMaskBaseDecodeHead.losses computes them: the two CE
  terms of segmentation_loss and acc_seg, the top-1 accuracy (in %) of the resized logits
  over ALL pixels, ignored ones included (mmseg 0.x's accuracy)."""
  gen = torch.Generator().manual_seed(0)
  seg, cls = torch.randn(2, 5, 4, 4, generator=gen), torch.randn(2, 5, 4, 4, generator=gen)
  labels = torch.randint(0, 5, (2, 8, 8), generator=gen)
  labels[0, 0] = 255
  out = tr.decode_head_losses(seg, cls, labels, 0.4)
  ce, cate = tr.segmentation_loss(seg, cls, labels, 0.4)
  assert torch.equal(out["loss_ce"], ce) and torch.equal(out["loss_cate"], cate)
  up = torch.nn.functional.interpolate(seg, size=(8, 8), mode="bilinear", align_corners=False)
  want = (up.argmax(1) == labels).float().mean() * 100
  torch.testing.assert_close(out["acc_seg"], want.reshape(1))
  assert float(tr.parse_losses(out)) == pytest.approx(float(ce + cate))
