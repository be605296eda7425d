"""The FaPN / MSFaPN-Mask2Former configs: SeMask-Mask2Former's recipe with only the pixel
decoder (and through it the backbone's semantic-attention rule) changed (SPEC 12)."""
import numpy as np
import pytest
from flax import nnx

from configs import (ade20k_semask_fapn_mask2former, ade20k_semask_mask2former,
                     ade20k_semask_msfapn_mask2former)
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
