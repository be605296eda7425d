"""The Pallas kernels of the up-sampled CE (pallas_ce.py) compute the library's XLA form:
the per-pixel CE and the gradient, at odd sizes, class counts and tiles, every factor the
loss meets, bfloat16 logits, ignored pixels and zero cotangents. On a CPU they run in
Pallas' interpreter (the same kernel code, the same loads and arithmetic); the Triton
compile and its numbers are checked on a GPU (the last test, in benchmarks/accelerator.sh's
`golden` row)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semask_jax.losses import segmentation as losses
from semask_jax.losses import pallas_ce


@pytest.fixture(autouse=True)
def nan_spare_border(monkeypatch):
  """NaN in the border rows / columns that no load may reach: the interpreter clamps an
  out-of-range offset into them, so a load that would leave the array on a GPU turns the
  results (even a masked pixel's: 0 * NaN) into NaN here."""
  monkeypatch.setattr(pallas_ce, "_SPARE", float("nan"))


def _case(b, h, w, k, factor, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(3 * rng.standard_normal((b, h, w, k)), jnp.float32).astype(dtype)
  labels = rng.integers(0, k, (b, h * factor, w * factor)).astype(np.int32)
  labels[:, :3, : 2 * factor] = 255  # an ignored corner
  labels[-1, -1, -1] = 255
  g = rng.standard_normal(labels.shape).astype(np.float32)
  g[:, -2:] = 0.0  # zero cotangents, as OHEM's unkept pixels have
  return logits, jnp.asarray(labels), jnp.asarray(g)


def _xla_ce(logits, labels, factor):  # the library's GPU form, float32 as the loss casts
  return losses._chunked_upsampled_ce(  # pylint: disable=protected-access
      logits.astype(jnp.float32), labels, factor, 255, "custom_vjp")


@pytest.mark.parametrize("b, h, w, k, factor, tj, kt", [
    (2, 5, 7, 19, 4, 4, 8),    # w not a multiple of the column tile, K of the class chunk
    (1, 3, 6, 5, 2, 2, 4),     # the smallest map, factor 2
    (1, 4, 3, 10, 8, 4, 16),   # factor 8, one class chunk
])
def test_kernels_give_the_xla_ce_and_gradient(b, h, w, k, factor, tj, kt):
  logits, labels, g = _case(b, h, w, k, factor)

  def pallas(x):
    return pallas_ce.upsampled_ce(x, labels, factor, 255, block_cols=tj, block_classes=kt,
                                  interpret=True)

  ce, vjp = jax.vjp(pallas, logits)
  want, want_vjp = jax.vjp(lambda x: _xla_ce(x, labels, factor), logits)
  # The same blends; only the float32 reductions' order differs (chunks of classes).
  np.testing.assert_allclose(ce, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))
  assert float(ce[0, 0, 0]) == 0.0  # ignored
  (grad,), (want_grad,) = vjp(g), want_vjp(g)
  scale = float(jnp.abs(want_grad).max())
  assert scale > 0
  np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-6 * scale)


def test_bfloat16_logits_are_read_as_is_and_get_a_bfloat16_gradient():
  logits, labels, g = _case(1, 4, 5, 12, 4, dtype=jnp.bfloat16)
  ce, vjp = jax.vjp(lambda x: pallas_ce.upsampled_ce(x, labels, 4, 255, block_cols=4,
                                                     block_classes=8, interpret=True), logits)
  want, want_vjp = jax.vjp(lambda x: _xla_ce(x, labels, 4), logits)
  np.testing.assert_allclose(ce, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))
  grad, want_grad = vjp(g)[0], want_vjp(g)[0]
  assert grad.dtype == jnp.bfloat16
  # Both round the same float32 gradient to bfloat16: equal but for rare ties.
  diff = np.abs(np.asarray(grad, np.float32) - np.asarray(want_grad, np.float32))
  assert diff.max() <= 2 ** -7 * float(jnp.abs(want_grad.astype(jnp.float32)).max())


@pytest.mark.parametrize("logits_shape, labels_shape, fits", [
    ((2, 8, 8, 5), (2, 32, 32), True),
    ((2, 8, 6, 5), (2, 32, 24), True),
    ((2, 8, 8, 5), (2, 24, 24), False),   # factor 3
    ((2, 2, 8, 5), (2, 8, 32), False),    # a 2-row map: the edges' taps differ
    ((2, 8, 8, 5), (2, 32, 28), False),   # width not the same factor
    ((2, 8, 8, 5), (2, 8, 8), False),     # no up-sampling
])
def test_fits_and_the_fallback(logits_shape, labels_shape, fits):
  assert pallas_ce.fits(logits_shape, labels_shape) is fits
  if not fits:  # pixel_cross_entropy takes the XLA form (custom_vjp) instead
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal(logits_shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, logits_shape[-1], labels_shape), jnp.int32)
    got = losses.pixel_cross_entropy(logits, labels, ignore_index=255, backward="pallas")[0]
    want = losses.pixel_cross_entropy(logits, labels, ignore_index=255,
                                      backward="custom_vjp")[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("platform, triton, interpreted, xla_form", [
    ("cuda", True, False, False), ("cpu", False, True, False), ("tpu", False, False, True)])
def test_each_platform_lowers_its_form(platform, triton, interpreted, xla_form):
  """ce_backward='pallas' is resolved at lowering (lax.platform_dependent), for the
  platform lowered for: the Triton kernels on a GPU (a deviceless GPU compile on this
  CPU gets them too), the interpreter on a CPU, the XLA form (custom_vjp) on a TPU."""
  logits, labels, _ = _case(1, 8, 8, 5, 4)

  def grad(x):
    return jax.grad(lambda z: losses.pixel_cross_entropy(
        z, labels, ignore_index=255, backward="pallas")[0].mean())(x)

  text = jax.jit(grad).trace(logits).lower(lowering_platforms=(platform,)).as_text(
      debug_info=True)
  assert ("xla.gpu.triton" in text) is triton
  assert ("upsampled_ce_bwd" in text) is (triton or interpreted)
  assert ("ce_custom_vjp_backward" in text) is xla_form


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Triton kernels: GPU only")
def test_triton_kernels_match_the_xla_form_on_gpu():
  """The compiled kernels (default tiles) at the training shapes' class count, bfloat16
  logits as the model gives them: CE and gradient against the XLA form."""
  logits, labels, g = _case(2, 32, 32, 150, 4, dtype=jnp.bfloat16)
  ce, vjp = jax.vjp(lambda x: pallas_ce.upsampled_ce(x, labels, 4, 255), logits)
  want, want_vjp = jax.vjp(lambda x: _xla_ce(x, labels, 4), logits)
  np.testing.assert_allclose(ce, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
  grad = np.asarray(vjp(g)[0], np.float32)
  want_grad = np.asarray(want_vjp(g)[0], np.float32)
  assert np.abs(grad - want_grad).max() <= 2 ** -7 * np.abs(want_grad).max()
