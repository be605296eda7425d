"""DCNv2 (semask_jax.models.dcn.deform_conv2d) against an oracle written from the definition
(SPEC section 12): loops over output pixels, taps and groups, bilinear with DCNv2's zero
rule, in float64. The same oracle on torch tensors gives the reference gradients by
autograd. A second test compares with torchvision.ops.deform_conv2d where it imports
(it cannot be installed beside this venv's torch; see docs/dcn.md)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semask_jax.models.dcn import DCN, deform_conv2d


def _float(v) -> float:
  return float(v.detach()) if hasattr(v, "detach") else float(v)


def _bilinear(img, r, c, xp):
  """img [Cg, H, W] at (r, c): 0 if r <= -1, c <= -1, r >= H or c >= W; else the four
  floor / floor + 1 neighbours, each outside one counting 0."""
  _, h, w = img.shape
  rf, cf = _float(r), _float(c)
  if rf <= -1 or cf <= -1 or rf >= h or cf >= w:
    return img[:, 0, 0] * 0
  r0, c0 = math.floor(rf), math.floor(cf)
  lr, lc = r - r0, c - c0
  val = img[:, 0, 0] * 0
  for ri, ci, wgt in ((r0, c0, (1 - lr) * (1 - lc)), (r0, c0 + 1, (1 - lr) * lc),
                      (r0 + 1, c0, lr * (1 - lc)), (r0 + 1, c0 + 1, lr * lc)):
    if 0 <= ri < h and 0 <= ci < w:
      val = val + wgt * img[:, ri, ci]
  return val


def oracle(x, offset, mask, weight, bias, stride, pad, dil, xp):
  """NCHW as the reference: x [B, C, H, W], offset [B, 2 dg K, Ho, Wo] (group, tap, (dy, dx)),
  mask [B, dg K, Ho, Wo], weight [O, C, kh, kw], bias [O] -> [B, O, Ho, Wo]."""
  b_, c_, h, w = x.shape
  o_, _, kh, kw = weight.shape
  k_ = kh * kw
  dg = mask.shape[1] // k_
  cg = c_ // dg
  ho, wo = offset.shape[2:]
  outs = []
  for b in range(b_):
    cols = []                                           # [C, K] lists of [Ho * Wo]
    per_group = []
    for g in range(dg):
      img = x[b, g * cg:(g + 1) * cg]
      taps = []
      for t in range(k_):
        i, j = divmod(t, kw)
        vals = []
        for y in range(ho):
          for xx in range(wo):
            dy = offset[b, g * 2 * k_ + 2 * t, y, xx]
            dx = offset[b, g * 2 * k_ + 2 * t + 1, y, xx]
            r = y * stride - pad + i * dil + dy
            c = xx * stride - pad + j * dil + dx
            vals.append(mask[b, g * k_ + t, y, xx] * _bilinear(img, r, c, xp))
        taps.append(xp.stack(vals, -1))                 # [Cg, Ho * Wo]
      per_group.append(xp.stack(taps, 1))               # [Cg, K, Ho * Wo]
    cols = xp.concatenate(per_group, 0)                 # [C, K, Ho * Wo]
    out = (weight.reshape(o_, c_ * k_) @ cols.reshape(c_ * k_, ho * wo)).reshape(o_, ho, wo)
    outs.append(out + bias[:, None, None])
  return xp.stack(outs, 0)


def _case(seed, *, b=1, c=8, o=3, h=5, w=7, k=3, dg=2, stride=1, pad=1, dil=1, off_scale=1.5):
  rng = np.random.default_rng(seed)
  ho = (h + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
  wo = (w + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
  x = rng.normal(size=(b, c, h, w))
  offset = rng.normal(0, off_scale, size=(b, 2 * dg * k * k, ho, wo))
  mask = rng.uniform(0, 1, size=(b, dg * k * k, ho, wo))
  weight = rng.normal(size=(o, c, k, k)) / math.sqrt(c * k * k)
  bias = rng.normal(size=(o,))
  return [a.astype(np.float32) for a in (x, offset, mask, weight, bias)], (stride, pad, dil)


def _jax_dcn(x, offset, mask, weight, bias, stride, pad, dil):
  """NCHW arguments as the oracle, through the NHWC op."""
  nhwc = lambda a: jnp.transpose(a, (0, 2, 3, 1))
  y = deform_conv2d(nhwc(x), nhwc(offset), nhwc(mask), jnp.transpose(weight, (2, 3, 1, 0)),
                    bias, stride=stride, padding=pad, dilation=dil)
  return jnp.transpose(y, (0, 3, 1, 2))


CASES = {
    "dg1": dict(dg=1),
    "dg2": dict(dg=2),
    "dg4": dict(dg=4),
    "dg8": dict(dg=8),
    "far_outside": dict(dg=2, off_scale=4.0),
    "stride2": dict(dg=2, stride=2, h=7, w=6),
    "dilation2": dict(dg=4, dil=2, pad=2, h=6, w=5),
    "batch2_nopad": dict(b=2, dg=2, pad=0, h=6, w=7),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_oracle(name):
  args, (s, p, d) = _case(1, **CASES[name])
  want = oracle(*[a.astype(np.float64) for a in args], s, p, d, np)
  got = np.asarray(jax.jit(_jax_dcn, static_argnums=(5, 6, 7))(*args, s, p, d))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * max(1.0, np.abs(want).max()))
  if name == "far_outside":  # the case does exercise taps outside the map
    x, off = args[0], args[1]
    assert np.abs(off).max() > x.shape[2] + 1


@pytest.mark.parametrize("name", ["dg1", "dg8", "far_outside", "stride2", "dilation2"])
def test_gradients_match_oracle_autograd(name):
  torch = pytest.importorskip("torch")
  args, (s, p, d) = _case(2, **CASES[name])
  t_args = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in args]
  want_y = oracle(*t_args, s, p, d, torch)
  ct = np.random.default_rng(3).normal(size=want_y.shape).astype(np.float32)
  (want_y * torch.tensor(ct, dtype=torch.float64)).sum().backward()
  want = [t.grad.numpy() for t in t_args]
  loss = lambda *a: jnp.sum(_jax_dcn(*a, s, p, d) * ct)
  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*[jnp.asarray(a) for a in args])
  for n, g, w in zip(("input", "offset", "mask", "weight", "bias"), got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=0,
                               atol=2e-5 * max(1.0, np.abs(w).max()), err_msg=n)


def test_vmap_and_batch_agree():
  args, (s, p, d) = _case(4, b=3, dg=4)
  batched = _jax_dcn(*args, s, p, d)
  per_example = jax.vmap(lambda x, o, m: _jax_dcn(x[None], o[None], m[None], args[3], args[4],
                                                  s, p, d)[0])(*args[:3])
  np.testing.assert_allclose(np.asarray(per_example), np.asarray(batched), rtol=0, atol=1e-6)


def test_dcn_module_split_and_init():
  """DCN (dcpack_L2): offsets = the first 2/3 of conv_offset_mask's channels unchanged,
  mask = sigmoid of the last third; zero-initialised offsets make it a plain conv with
  mask 0.5."""
  m = DCN(8, 4, 3, deformable_groups=2, rngs=__import__("flax").nnx.Rngs(0))
  assert m.conv_offset_mask.kernel.shape == (3, 3, 8, 54)
  x = jax.random.normal(jax.random.key(0), (1, 5, 6, 8))
  feat = jax.random.normal(jax.random.key(1), (1, 5, 6, 8))
  conv = jax.lax.conv_general_dilated(x, m.kernel[...], (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(m(x, feat)), 0.5 * np.asarray(conv), atol=1e-5)
  bound = 1 / math.sqrt(8 * 9)
  assert float(jnp.abs(m.kernel[...]).max()) <= bound
  # Non-zero offset/mask weights: the module equals deform_conv2d on the split raw output.
  m.conv_offset_mask.kernel[...] = 0.1 * jax.random.normal(jax.random.key(2), (3, 3, 8, 54))
  aux = {}
  y = m(x, feat, aux)
  raw = aux["offset_mask_raw"]
  want = deform_conv2d(x, raw[..., :36], jax.nn.sigmoid(raw[..., 36:]), m.kernel[...],
                       m.bias[...], padding=1)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


@pytest.mark.parametrize("name", ["dg1", "dg2", "dg4", "dg8", "far_outside", "stride2",
                                  "dilation2"])
def test_matches_torchvision(name):
  """torchvision.ops.deform_conv2d with the mask: forward and gradients (input, offset,
  mask, weight, bias), float32."""
  torch = pytest.importorskip("torch")
  tv = pytest.importorskip("torchvision")
  args, (s, p, d) = _case(5, **CASES[name])
  t_args = [torch.tensor(a, requires_grad=True) for a in args]
  x, off, mask, weight, bias = t_args
  want_y = tv.ops.deform_conv2d(x, off, weight, bias, stride=s, padding=p, dilation=d,
                                mask=mask)
  ct = np.random.default_rng(6).normal(size=want_y.shape).astype(np.float32)
  (want_y * torch.tensor(ct)).sum().backward()
  got_y = _jax_dcn(*args, s, p, d)
  scale = max(1.0, float(want_y.detach().abs().max()))
  np.testing.assert_allclose(np.asarray(got_y), want_y.detach().numpy(), rtol=0,
                             atol=2e-6 * scale)
  loss = lambda *a: jnp.sum(_jax_dcn(*a, s, p, d) * ct)
  got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*[jnp.asarray(a) for a in args])
  for n, g, t in zip(("input", "offset", "mask", "weight", "bias"), got, t_args):
    w = t.grad.numpy()
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-5 * max(1.0, np.abs(w).max()),
                               err_msg=n)
