"""SeMask-MaskFormer: the SeMask Swin backbone with MaskFormer's head (SPEC section 11).

Attribute names follow the official detectron2 checkpoint (`backbone.*`,
`sem_seg_head.pixel_decoder.*`, `sem_seg_head.predictor.*`), so conversion is
a name map. The backbone is the other heads', with MaskFormer's rule for global
semantic attention (stage 3, every class count; resolved in ModelConfig); the
semantic head and semantic inference are Mask2Former's.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from semask_jax.models import layers
from semask_jax.models.config import MaskFormerHeadConfig, ModelConfig
from semask_jax.models.maskformer_decoder import TransformerPredictor
from semask_jax.models.maskformer_pixel_decoder import BasePixelDecoder
from semask_jax.models.semask_mask2former import (Detectron2Segment, add_semantic_outputs,
                                                  build_backbone_and_head)


class SemSegHead(nnx.Module):
  """`sem_seg_head` of the checkpoint: FPN pixel decoder + DETR predictor over res5."""

  def __init__(self, in_channels: tuple[int, ...], num_classes: int,
               config: MaskFormerHeadConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    c = config
    self.pixel_decoder = BasePixelDecoder(tuple(in_channels), c.conv_dim, c.mask_dim,
                                          dtype=dtype, rngs=rngs)
    # TRANSFORMER_IN_FEATURE 'res5': the predictor reads the backbone's res5, not the FPN.
    self.predictor = TransformerPredictor(
        in_channels[-1], num_classes, c.hidden_dim, c.num_queries, c.nheads,
        c.dim_feedforward, c.dec_layers, c.mask_dim, dropout=c.dec_dropout,
        enforce_input_project=c.enforce_input_proj, dtype=dtype, rngs=rngs)


class SeMaskMaskFormer(Detectron2Segment, nnx.Module):
  """images [B, H, W, 3] -> MaskFormer predictions + the SeMask semantic prior."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    build_backbone_and_head(self, config, MaskFormerHeadConfig, SemSegHead, rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None) -> dict[str, Any]:
    """images: [B, H, W, 3] normalised, H and W multiples of 32 (the reference pads to
    its size divisibility), as the semantic head predicts at 4x the stride-4 map.

    Returns pred_logits [L, B, Q, K+1] and pred_masks [L, B, Q, H/4, W/4] (index l =
    after decoder layer l + 1; -1 the final one), sem_pred [B, H, W, K], sem_seg
    [B, H, W, K] (eval only: semantic inference of the final prediction, scores in
    [0, 1]), and the intermediates (feats, sems, mask_features, transformer_in,
    transformer_pos, decoder_hs). `rng` drives drop path and dropout when train=True.
    """
    keys = layers.KeyChain(rng if train else None)
    with jax.named_scope("backbone"):  # scopes named as the parameters: profiles by part
      feats, sems = self.backbone(images.astype(self.dtype), keys)
    with jax.named_scope("sem_seg_head/pixel_decoder"):
      mask_features, _ = self.sem_seg_head.pixel_decoder(feats)
    with jax.named_scope("sem_seg_head/predictor"):
      out = dict(self.sem_seg_head.predictor(feats[-1], mask_features, keys))
    add_semantic_outputs(out, sems, tuple(images.shape[1:3]), train)
    out.update(feats=feats, sems=sems, mask_features=mask_features)
    return out

  def valid_head(self, feats: list[jax.Array], sizes: list[jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
    mask_features, _ = self.sem_seg_head.pixel_decoder(feats, sizes)
    out = self.sem_seg_head.predictor(feats[-1], mask_features, valid_hw=sizes[3])
    return out["pred_logits"][-1], out["pred_masks"][-1]
