"""Mask2Former pixel decoder against the reference: the golden vectors (SPEC section 10) and
the deformable-attention core against the torch transcription of ms_deform_attn_core_pytorch
in benchmarks/torch_reference_m2f.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from golden_utils import load_submodule, load_vector, m2f_golden_files
from semask_jax.models.pixel_decoder import (MSDeformAttn, MSDeformAttnPixelDecoder,
                                             _deform_attn_core_remat,
                                             deform_attn_core, reference_points)


def _nhwc(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(x.transpose(0, 2, 3, 1))


def _build(cfg: dict, dtype=jnp.float32) -> MSDeformAttnPixelDecoder:
  embed = cfg["embed_dim"]
  return MSDeformAttnPixelDecoder(
      tuple(embed * 2 ** i for i in range(4)), cfg["conv_dim"], cfg["mask_dim"], cfg["nheads"],
      cfg["enc_layers"], cfg["enc_dim_feedforward"], dtype=dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype,rel_tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 4e-2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path", m2f_golden_files(), ids=lambda p: p.stem)
def test_pixel_decoder_matches_golden(path, dtype, rel_tol):
  """float32: the reference's numbers; bfloat16 matmuls (float32 norms, softmax and
  sampling weights): outputs in bfloat16 within a few percent of the reference."""
  vec, meta, sd = load_vector(path)
  dec = _build(meta["config"], dtype)
  load_submodule(dec, sd, "sem_seg_head.pixel_decoder.")
  graphdef, state = nnx.split(dec)

  @jax.jit
  def fwd(state, feats):
    return nnx.merge(graphdef, state)(feats)

  mask_features, multi_scale = fwd(state, [_nhwc(vec[f"feat{i}"]) for i in range(4)])
  outs = {"mask_features": mask_features}
  outs.update({f"multi_scale{i}": m for i, m in enumerate(multi_scale)})
  for name, out in outs.items():
    ref = vec[name].transpose(0, 2, 3, 1)
    assert out.shape == ref.shape and out.dtype == dtype, (name, out.shape, ref.shape)
    err = np.abs(np.asarray(out, np.float32) - ref).max()
    assert err <= rel_tol * max(1.0, np.abs(ref).max()), (name, err, np.abs(ref).max())


def test_deform_attn_core_matches_torch_transcription(load_benchmark):
  # ms_deform_attn_core_pytorch (Mask2Former's CPU path) as benchmarks/ transcribes it.
  torch_core = load_benchmark("torch_reference_m2f").ms_deform_attn_core
  rng = np.random.default_rng(0)
  shapes = ((3, 5), (6, 9), (11, 4))                                     # non-square levels
  n, lq, m, d, n_points = 2, 23, 3, 4, 5
  s = sum(h * w for h, w in shapes)
  value = rng.normal(size=(n, s, m, d)).astype(np.float32)
  # Locations reach well outside [0, 1]: taps off the map must read zeros.
  locations = rng.uniform(-0.4, 1.4, size=(n, lq, m, len(shapes), n_points, 2)).astype(np.float32)
  logits = rng.normal(size=(n, lq, m, len(shapes) * n_points)).astype(np.float32)
  weights = np.asarray(jax.nn.softmax(logits, -1)).reshape(n, lq, m, len(shapes), n_points)
  ref = torch_core(*(torch.tensor(x) if isinstance(x, np.ndarray) else x
                      for x in (value, shapes, locations, weights))).numpy()
  out = jax.jit(deform_attn_core, static_argnums=1)(jnp.asarray(value), shapes,
                                                     jnp.asarray(locations), jnp.asarray(weights))
  assert out.shape == ref.shape == (n, lq, m * d)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6)

  # Gradients w.r.t. value, locations and weights against torch autograd.
  cot = rng.normal(size=ref.shape).astype(np.float32)
  tv, tl, tw = (torch.tensor(x, requires_grad=True) for x in (value, locations, weights))
  (torch_core(tv, shapes, tl, tw) * torch.tensor(cot)).sum().backward()
  # Also through the rematerialising custom VJP that MSDeformAttn uses, in one block of
  # queries and in blocks of 5 (the last one padded).
  from semask_jax.models import pixel_decoder  # pylint: disable=import-outside-toplevel
  assert locations.shape[1] > 5 and locations.shape[1] % 5
  for core, block in ((deform_attn_core, None), (_deform_attn_core_remat, None),
                      (_deform_attn_core_remat, 5)):
    old_block = pixel_decoder.QUERY_BLOCK
    pixel_decoder.QUERY_BLOCK = block or old_block
    try:
      out = jax.jit(core, static_argnums=1)(jnp.asarray(value), shapes, jnp.asarray(locations),
                                            jnp.asarray(weights))
      np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6)
      grads = jax.jit(jax.grad(lambda v, l, w: (core(v, shapes, l, w) * cot).sum(),  # noqa: B023
                             argnums=(0, 1, 2)))(jnp.asarray(value), jnp.asarray(locations),
                                                 jnp.asarray(weights))
    finally:
      pixel_decoder.QUERY_BLOCK = old_block
    for g, t in zip(grads, (tv, tl, tw)):
      ref_g = t.grad.numpy()
      np.testing.assert_allclose(np.asarray(g), ref_g, rtol=0,
                                 atol=1e-5 * max(1.0, np.abs(ref_g).max()))


def test_reference_points_match_get_reference_points():
  """Deformable DETR's encoder get_reference_points (valid ratios 1), transcribed in torch;
  bit-equal, (x, y) order, levels concatenated."""
  shapes = ((2, 3), (7, 5), (1, 2))
  ref = []
  for h, w in shapes:
    ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32),
                                  torch.linspace(0.5, w - 0.5, w, dtype=torch.float32),
                                  indexing="ij")
    ref.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
  np.testing.assert_array_equal(reference_points(shapes), torch.cat(ref).numpy())
  np.testing.assert_allclose(reference_points(shapes)[:3], [[1 / 6, 1 / 4], [1 / 2, 1 / 4],
                                                            [5 / 6, 1 / 4]], rtol=1e-7)


def test_ms_deform_attn_initial_offsets():
  """The reference init: point i of head h at (i + 1) * a unit-max-norm direction, uniform
  attention weights, so the output of a constant map is its projected constant."""
  attn = MSDeformAttn(8, 2, 4, 3, rngs=nnx.Rngs(0))
  bias = np.asarray(attn.sampling_offsets.bias[...]).reshape(4, 2, 3, 2)
  np.testing.assert_allclose(bias[1, 0], [[0, 1], [0, 2], [0, 3]], atol=1e-6)   # 90 degrees
  np.testing.assert_allclose(bias[2, 1], [[-1, 0], [-2, 0], [-3, 0]], atol=1e-6)
  assert not np.asarray(attn.sampling_offsets.kernel[...]).any()
  assert not np.asarray(attn.attention_weights.kernel[...]).any()
