"""Mask2Former transformer decoder, SeMask semantic head and semantic inference against
the reference (golden/mask2former/*.npz and torch).

Data-driven over every SeMask-Mask2Former vector: the decoder runs on the stored pixel
decoder outputs (multi_scale0..2, mask_features), the semantic head on the stored prior
maps (sem0..3), semantic inference on the stored final prediction.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from semask_jax.models.mask2former_decoder import MultiScaleMaskedTransformerDecoder
from semask_jax.models.resize import resize_bilinear_align_corners
from semask_jax.models.semantic_head import semantic_head, semantic_inference
from tests.golden_utils import load_submodule, load_vector, m2f_golden_files

FILES = m2f_golden_files()
RTOL = 1e-4  # max |err| <= 1e-4 * max(1, max |ref|)
PREFIX = "sem_seg_head.predictor."
_semantic_inference = jax.jit(semantic_inference, static_argnums=(2, 3, 4),
                              static_argnames="postprocess_before_inference")


def _nhwc(a: np.ndarray) -> jax.Array:
  return jnp.asarray(a.transpose(0, 2, 3, 1))


def _check(name: str, got, ref: np.ndarray) -> float:
  got = np.asarray(got)
  assert got.shape == ref.shape, (name, got.shape, ref.shape)
  err = float(np.abs(got - ref).max())
  bound = RTOL * max(1.0, float(np.abs(ref).max()))
  assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"
  return err


def _decoder(cfg: dict, **kwargs) -> MultiScaleMaskedTransformerDecoder:
  return MultiScaleMaskedTransformerDecoder(
      cfg["conv_dim"], cfg["num_classes"], cfg["hidden_dim"], cfg["num_queries"], cfg["nheads"],
      cfg["dim_feedforward"], cfg["dec_layers"], cfg["mask_dim"], rngs=nnx.Rngs(0), **kwargs)


def _run(dec: MultiScaleMaskedTransformerDecoder, vec: dict) -> dict:
  graphdef, state = nnx.split(dec)
  fwd = jax.jit(lambda s, ms, mf: nnx.merge(graphdef, s)(ms, mf))
  ms = [_nhwc(vec[f"multi_scale{i}"]) for i in range(3)]
  return fwd(state, ms, _nhwc(vec["mask_features"]))


def test_m2f_golden_vectors_exist():
  assert FILES, "no Mask2Former golden vectors found; set SEMASK_M2F_GOLDEN_DIR"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_decoder_golden(path):
  vec, meta, sd = load_vector(path)
  dec = _decoder(meta["config"])
  load_submodule(dec, sd, PREFIX)
  out = _run(dec, vec)
  num_layers = meta["config"]["dec_layers"]
  assert out["pred_logits"].shape[0] == num_layers + 1
  for key in ("pred_logits", "pred_masks"):
    for layer in range(num_layers + 1):  # every prediction, so a failure names its layer
      err = _check(f"{key}[{layer}]", out[key][layer], vec[key][layer])
      print(f"{path.stem} {key}[{layer}] max abs err {err:.2e}")


@pytest.mark.parametrize("path", FILES[:1], ids=[p.stem for p in FILES[:1]])
def test_decoder_input_proj_golden(path):
  """The Conv1x1 input projection (`input_proj.{l}` keys, used when in_channels !=
  hidden_dim or ENFORCE_INPUT_PROJ; identity in the golden config): identity 1x1
  kernels must reproduce the golden outputs."""
  vec, meta, sd = load_vector(path)
  cfg = meta["config"]
  dec = _decoder(cfg, enforce_input_project=True)
  c = cfg["hidden_dim"]
  sd = dict(sd)
  for lvl in range(3):
    sd[f"{PREFIX}input_proj.{lvl}.weight"] = np.eye(c, dtype=np.float32)[:, :, None, None]
    sd[f"{PREFIX}input_proj.{lvl}.bias"] = np.zeros((c,), np.float32)
  load_submodule(dec, sd, PREFIX)
  out = _run(dec, vec)
  _check("pred_logits", out["pred_logits"], vec["pred_logits"])
  _check("pred_masks", out["pred_masks"], vec["pred_masks"])


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_semantic_head_golden(path):
  vec, meta, _ = load_vector(path)
  sems = [_nhwc(vec[f"sem{i}"]) for i in range(4)]
  size = (meta["config"]["height"], meta["config"]["width"])
  got = jax.jit(semantic_head, static_argnums=1)(sems, size)
  err = _check("sem_pred", np.asarray(got).transpose(0, 3, 1, 2), vec["sem_pred"])
  print(f"{path.stem} sem_pred max abs err {err:.2e}")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_semantic_inference_golden(path):
  vec, meta, _ = load_vector(path)
  size = (meta["config"]["height"], meta["config"]["width"])
  for before in (False, True):  # no padding, no resize: both orders are the reference
    got = _semantic_inference(jnp.asarray(vec["pred_logits"][-1]),
                             jnp.asarray(vec["pred_masks"][-1]), size, size, size,
                             postprocess_before_inference=before)
    err = _check("semseg", np.asarray(got).transpose(0, 3, 1, 2), vec["semseg"])
    print(f"{path.stem} semseg (before={before}) max abs err {err:.2e}")


def test_semantic_inference_padded_vs_torch():
  """Padding crop and resize to the original size, against detectron2's order
  (sem_seg_postprocess after / before semantic_inference) spelled out in torch."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 4)).astype(np.float32)           # K = 3
  masks = (3 * rng.normal(size=(2, 5, 8, 10))).astype(np.float32)  # stride-4 masks
  padded, image, out = (32, 40), (27, 33), (41, 23)

  def postprocess(r):  # detectron2 sem_seg_postprocess on [N, C, H, W]
    return F.interpolate(r[:, :, :image[0], :image[1]], size=out, mode="bilinear",
                         align_corners=False)

  tm = F.interpolate(torch.from_numpy(masks), size=padded, mode="bilinear", align_corners=False)
  cls = F.softmax(torch.from_numpy(logits), dim=-1)[..., :-1]
  after = postprocess(torch.einsum("bqc,bqhw->bchw", cls, tm.sigmoid()))
  before = torch.einsum("bqc,bqhw->bchw", cls, postprocess(tm).sigmoid())
  for flag, ref in ((False, after), (True, before)):
    got = _semantic_inference(jnp.asarray(logits), jnp.asarray(masks), padded, image, out,
                             postprocess_before_inference=flag)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref.numpy(),
                               rtol=1e-5, atol=1e-6)
  assert float((after - before).abs().max()) > 1e-3  # the two orders really differ here


@pytest.mark.parametrize("in_hw,out_hw", [((7, 5), (13, 11)), ((13, 11), (7, 5)),
                                          ((5, 9), (5, 17)), ((9, 3), (1, 6))])
def test_resize_align_corners_vs_torch(in_hw, out_hw):
  x = np.random.default_rng(1).normal(size=(2, 3) + in_hw).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x), size=out_hw, mode="bilinear", align_corners=True)
  got = resize_bilinear_align_corners(_nhwc(x), out_hw)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref.numpy(),
                             rtol=1e-6, atol=1e-6)
