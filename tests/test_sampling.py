"""bilinear_sample against torch F.grid_sample (bilinear, zero padding, align_corners=False),
values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semask_jax.models.sampling import bilinear_sample


def _torch_sample(value_nhwc: np.ndarray, points: np.ndarray, grads: bool = False):
  """The reference: grid_sample on grid = 2 * points - 1, as Mask2Former's point_sample."""
  v = torch.tensor(value_nhwc).permute(0, 3, 1, 2).contiguous().requires_grad_(grads)
  p = torch.tensor(points).requires_grad_(grads)
  out = F.grid_sample(v, 2.0 * p[:, :, None] - 1.0, mode="bilinear", padding_mode="zeros",
                      align_corners=False)[..., 0].permute(0, 2, 1)   # [B, P, C]
  return v, p, out


def _points(rng, b, p, lo=-0.3, hi=1.3):
  pts = rng.uniform(lo, hi, size=(b, p, 2)).astype(np.float32)
  # Exact pixel centres, exact edges and points just outside: the tap masks' corner cases.
  special = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [1.0, 0.0], [-1e-7, 0.5],
                      [0.5, 1.0 + 1e-7], [5.0, -4.0], [1e9, -1e9]], np.float32)
  n = min(p, len(special))
  pts[:, :n] = special[:n]
  return pts


@pytest.mark.parametrize("b,h,w,c,p", [(2, 8, 8, 3, 37), (3, 5, 11, 4, 101), (1, 1, 7, 2, 13),
                                       (2, 9, 2, 5, 1)])
def test_forward_matches_grid_sample(b, h, w, c, p):
  rng = np.random.default_rng(h * 100 + w)
  value = rng.normal(size=(b, h, w, c)).astype(np.float32)
  pts = _points(rng, b, p)
  _, _, ref = _torch_sample(value, pts)
  out = jax.jit(bilinear_sample)(jnp.asarray(value), jnp.asarray(pts))
  assert out.shape == (b, p, c) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref.numpy(), rtol=0, atol=1e-6)
  # Points far outside read exactly zero.
  if p > 7:
    assert not np.asarray(out)[:, 6:8].any()


def test_gradients_match_torch_autograd():
  rng = np.random.default_rng(7)
  b, h, w, c, p = 2, 6, 9, 3, 53
  value = rng.normal(size=(b, h, w, c)).astype(np.float32)
  pts = rng.uniform(-0.2, 1.2, size=(b, p, 2)).astype(np.float32)
  cot = rng.normal(size=(b, p, c)).astype(np.float32)
  v, pt, ref = _torch_sample(value, pts, grads=True)
  (ref * torch.tensor(cot)).sum().backward()

  def loss(val, q):
    return (bilinear_sample(val, q) * cot).sum()

  gv, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(value), jnp.asarray(pts))
  np.testing.assert_allclose(np.asarray(gv), v.grad.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)
  # d/dp carries a factor of the map size; relative to its scale.
  gp_ref = pt.grad.numpy()
  np.testing.assert_allclose(np.asarray(gp), gp_ref, rtol=0, atol=1e-5 * max(1, np.abs(gp_ref).max()))
  assert np.abs(gp_ref).max() > 0.1  # the comparison is not vacuous


def test_bfloat16_values_and_vmap():
  """Low-precision maps: float32 weights, output in the map's dtype; batching via vmap
  agrees with the batch axis."""
  rng = np.random.default_rng(3)
  value = rng.normal(size=(4, 7, 5, 2)).astype(np.float32)
  pts = rng.uniform(0, 1, size=(4, 19, 2)).astype(np.float32)
  out = bilinear_sample(jnp.asarray(value, jnp.bfloat16), jnp.asarray(pts))
  assert out.dtype == jnp.bfloat16
  ref = bilinear_sample(jnp.asarray(value), jnp.asarray(pts))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2)
  per = jax.vmap(lambda v, q: bilinear_sample(v[None], q[None])[0])(jnp.asarray(value),
                                                                    jnp.asarray(pts))
  np.testing.assert_allclose(np.asarray(per), np.asarray(ref), rtol=0, atol=1e-6)
