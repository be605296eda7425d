"""The model against the reference PyTorch outputs (golden vectors).

Data-driven: every *.npz in $SEMASK_GOLDEN_DIR (default ../shared/golden) is
checked; a new vector of the same schema needs no code change. The weights
come from the recipe next to the vectors, through the converter, and at least
once through a real .pth file written with torch.save.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert_weights import convert_semask
from semask_jax.losses.segmentation import segmentation_loss
from semask_jax.models import model_config_from_dict
from tests.golden_utils import golden_files, jit_forward, load_vector

FILES = golden_files()
RTOL_MAPS = 1e-4   # max |err| <= 1e-4 * max(1, max |ref|)
RTOL_LOSS = 1e-4


def _check_map(name, got, ref):
  got = np.asarray(got).transpose(0, 3, 1, 2)  # NHWC -> NCHW as stored
  assert got.shape == ref.shape, (name, got.shape, ref.shape)
  err = float(np.abs(got - ref).max())
  bound = RTOL_MAPS * max(1.0, float(np.abs(ref).max()))
  assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"
  return err


def test_golden_vectors_exist():
  assert FILES, "no golden vectors found; set SEMASK_GOLDEN_DIR"


# Every vector from its state dict; the first one also through a real .pth file.
CASES = [(p, False) for p in FILES] + [(p, True) for p in FILES[:1]]


@pytest.mark.parametrize("path,via_pth", CASES,
                         ids=[f"{p.stem}-{'pth_file' if v else 'state_dict'}" for p, v in CASES])
def test_golden(path, via_pth, tmp_path):
  vec, meta, sd = load_vector(path)
  abs_sum = sum(float(np.abs(a).astype(np.float64).sum()) for a in sd.values())
  np.testing.assert_allclose(abs_sum, float(vec["weights_abs_sum"]), rtol=1e-9,
                             err_msg="the recipe's random stream changed, not the model")
  cfg = model_config_from_dict(meta["config"])
  source = sd
  if via_pth:
    import torch
    pth = tmp_path / "ckpt.pth"
    torch.save({"meta": {"note": "golden"},
                "state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, pth)
    source = str(pth)
  conv = convert_semask(source, None if via_pth else cfg)
  if via_pth:  # The config read from the shapes must be the golden one.
    for k in ("embed_dim", "depths", "num_heads", "window_size", "num_classes",
              "num_sem_blocks", "fpn_channels"):
      assert tuple(np.atleast_1d(conv.config[k])) == tuple(np.atleast_1d(cfg[k])), k
  model = conv.model
  _, state = nnx.split(model)
  out = jit_forward(model)(state, jnp.asarray(vec["image"].transpose(0, 2, 3, 1)))
  errs = {}
  for i in range(4):
    errs[f"feat{i}"] = _check_map(f"feat{i}", out["feats"][i], vec[f"feat{i}"])
    errs[f"sem{i}"] = _check_map(f"sem{i}", out["sems"][i], vec[f"sem{i}"])
  errs["seg_logits"] = _check_map("seg_logits", out["seg_logits"], vec["seg_logits"])
  errs["cls_logits"] = _check_map("cls_logits", out["cls_logits"], vec["cls_logits"])
  _, aux = segmentation_loss(out, jnp.asarray(vec["label"]), ignore_index=255,
                             cate_w=meta["config"]["cate_w"])
  for k in ("loss_ce", "loss_cate"):
    np.testing.assert_allclose(float(aux[k]), float(vec[k]), rtol=RTOL_LOSS, err_msg=k)
  print(json.dumps({path.stem: {k: f"{v:.2e}" for k, v in errs.items()}}))
