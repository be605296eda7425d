"""The backward forms of the row-blocked up-sampled CE (and the Pallas kernels) give the
same loss and gradients, and 'auto' picks the one measured faster on each platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from semask_jax.losses import segmentation as losses


def _case(b=2, h=8, k=5, factor=4, seed=0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(3 * rng.standard_normal((b, h, h, k)), jnp.float32)
  labels = rng.integers(0, k, (b, h * factor, h * factor)).astype(np.int32)
  labels[:, :3] = 255  # ignored rows
  labels[0, 5, 7] = 255
  return logits, jnp.asarray(labels)


@pytest.mark.parametrize("backward, reduction, ohem", [
    ("custom_vjp", "reference", None), ("custom_vjp", "valid", None),
    # The Pallas kernels (on a CPU: the interpreter), both CEs, OHEM's zero weights.
    ("pallas", "reference", 100), ("pallas", "valid", None)])
def test_each_backward_gives_the_remat_loss_and_gradients(backward, reduction, ohem):
  logits, labels = _case()
  outs = {"seg_logits": logits, "cls_logits": 0.5 * logits[..., ::-1]}

  def loss(o, backward):
    return losses.segmentation_loss(o, labels, ignore_index=255, reduction=reduction,
                                    ohem_min_kept=ohem, ce_backward=backward)[0]

  v_remat, g_remat = jax.value_and_grad(loss)(outs, "remat")
  v_vjp, g_vjp = jax.value_and_grad(loss)(outs, backward)
  np.testing.assert_allclose(v_vjp, v_remat, rtol=1e-6)
  for name in outs:
    scale = float(jnp.abs(g_remat[name]).max())
    assert scale > 0
    np.testing.assert_allclose(g_vjp[name], g_remat[name], rtol=0, atol=1e-6 * scale)


def test_custom_vjp_ce_is_the_full_resolution_ce():
  logits, labels = _case(b=1, h=6, k=3, factor=2)
  ce, valid = losses.pixel_cross_entropy(logits, labels, ignore_index=255,
                                         backward="custom_vjp")
  z = losses.resize_bilinear(logits, labels.shape[1:3])
  want = losses.ce_and_logsumexp(z, labels, 255)[0]
  np.testing.assert_allclose(ce, want, rtol=1e-5, atol=1e-6)
  assert not bool(valid[0, 0, 0]) and float(ce[0, 0, 0]) == 0.0


@pytest.mark.parametrize("platform, custom", [("cpu", False), ("cuda", True), ("tpu", True)])
def test_auto_backward_is_remat_on_cpu_and_custom_vjp_elsewhere(platform, custom):
  """'auto' is resolved when the step is lowered, for the platform it is lowered for (a
  deviceless GPU compile on this CPU gets the GPU's form): the hand-written backward
  carries a named scope that shows in the lowered module's locations."""
  logits, labels = _case(b=1)

  def grad(x, backward):
    return jax.grad(lambda z: losses.pixel_cross_entropy(
        z, labels, ignore_index=255, backward=backward)[0].mean())(x)

  def lowered(backward):
    return export.export(jax.jit(grad, static_argnums=1), platforms=[platform])(
        logits, backward).mlir_module()

  assert "ce_custom_vjp_backward" in lowered("custom_vjp")
  assert "ce_custom_vjp_backward" not in lowered("remat")
  assert ("ce_custom_vjp_backward" in lowered("auto")) is custom


def test_unknown_backward_is_refused():
  logits, labels = _case(b=1)
  with pytest.raises(ValueError, match="ce_backward must be one of .*'checkpoint'"):
    losses.pixel_cross_entropy(logits, labels, ignore_index=255, backward="checkpoint")


def test_ohem_selects_per_group_of_images():
  """Groups of 2 images (the reference's per-GPU batch) pick each pair's own hardest
  pixels, exactly as ohem_weights on each pair alone; 0 pools the whole batch."""
  rng = np.random.default_rng(0)
  ce = jnp.asarray(rng.random((4, 6, 6)) * np.array([1, 1, 5, 5])[:, None, None], jnp.float32)
  valid = jnp.asarray(rng.random((4, 6, 6)) > 0.2)
  grouped = np.asarray(losses.ohem_weights(ce, valid, 10, group_size=2))
  for pair in (slice(0, 2), slice(2, 4)):
    np.testing.assert_array_equal(grouped[pair], losses.ohem_weights(ce[pair], valid[pair], 10))
    assert grouped[pair].sum() == 20
  pooled = np.asarray(losses.ohem_weights(ce, valid, 10, group_size=0))
  assert pooled.sum() == 40 and pooled[:2].sum() < 20  # the harder pair takes more
  with pytest.raises(ValueError, match="group_size=3 does not divide .* 4 images"):
    losses.ohem_weights(ce, valid, 10, group_size=3)
