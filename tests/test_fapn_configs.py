"""The FaPN / MSFaPN-Mask2Former configs: SeMask-Mask2Former's recipe with only the pixel
decoder (and through it the backbone's semantic-attention rule) changed (SPEC 12)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import (ade20k_semask_fapn_mask2former, ade20k_semask_mask2former,
                     ade20k_semask_msfapn_mask2former, demo_mask2former,
                     demo_msfapn_mask2former)
from semask_jax.models import ModelConfig, build_model

MODULES = {"fapn": ade20k_semask_fapn_mask2former, "msfapn": ade20k_semask_msfapn_mask2former}


@pytest.mark.parametrize("decoder", sorted(MODULES))
def test_fapn_recipes(decoder):
  module = MODULES[decoder]
  assert module.DERIVED_VARIANTS == ("T", "S", "B")
  assert module.get_config().model.embed_dim == 192  # the official config: L
  for variant in "TSBL":
    c = module.get_config(variant)
    m = ModelConfig.from_config(c.model)
    assert m.name == "semask_mask2former" and m.num_classes == 150
    assert m.head.pixel_decoder == decoder and m.head.deformable_groups == 8
    # SeMask-FAPN: global semantic attention in stages 2-3 for every class count.
    assert m.backbone.sem_global == (False, False, True, True)
    assert m.backbone.num_sem_blocks == (1, 1, 1, 1)
    assert (m.head.conv_dim, m.head.mask_dim, m.head.hidden_dim) == (256, 256, 256)
    assert (m.head.num_queries, m.head.dec_layers, m.head.nheads) == (100, 9, 8)
    # Everything else is the SeMask-Mask2Former config of the same variant.
    want = ade20k_semask_mask2former.get_config(variant).to_dict()
    got = c.to_dict()
    assert got["model"].pop("pixel_decoder") == decoder
    assert want["model"].pop("pixel_decoder") == "msdeformattn"
    assert got == want
    assert tuple(c.data.crop_size) == ((640, 640) if variant == "L" else (512, 512))
    assert c.total_steps == 160_000


@pytest.mark.parametrize("decoder,millions", [("fapn", 227), ("msfapn", 224)])
def test_fapn_l_parameter_count(decoder, millions):
  """The official README's model sizes (SeMask-L, 150 classes): 227M and 224M."""
  c = MODULES[decoder].get_config("L")
  model = nnx.eval_shape(lambda: build_model(c.model, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert round(n / 1e6) == millions, n


def test_msfapn_demo_config_builds_and_runs():
  """configs/demo_msfapn_mask2former.py: the Mask2Former demo with the pixel decoder
  (MSFaPN, 4 deformable groups) and the schedule's length changed; it builds and runs a
  forward on a demo crop."""
  c = demo_msfapn_mask2former.get_config()
  got, want = c.to_dict(), demo_mask2former.get_config().to_dict()
  for k in ("total_steps", "checkpoint_every_steps", "eval_every_steps"):
    want.pop(k)
  assert (got.pop("total_steps"), got.pop("checkpoint_every_steps"),
          got.pop("eval_every_steps")) == (1600, 400, 800)
  assert got["model"].pop("pixel_decoder") == "msfapn"
  assert got["model"].pop("deformable_groups") == 4
  want["model"].pop("pixel_decoder")
  want["model"].pop("deformable_groups", None)
  assert got == want
  m = ModelConfig.from_config(c.model)
  assert m.backbone.sem_global == (False, False, True, True)  # the FaPN heads' rule
  model = build_model(c.model, rngs=nnx.Rngs(0))
  h, w = c.data.crop_size
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)["sem_seg"])  # jit: ~4x faster than eager
  sem_seg = fwd(state, jax.random.normal(jax.random.key(0), (1, h, w, 3), jnp.float32))
  assert sem_seg.shape == (1, h, w, c.data.num_classes)
  assert np.isfinite(np.asarray(sem_seg)).all()
