"""SeMask-Mask2Former: the SeMask Swin backbone with Mask2Former's head (SPEC section 10).

Attribute names follow the official detectron2 checkpoint (`backbone.*`,
`sem_seg_head.pixel_decoder.*`, `sem_seg_head.predictor.*`), so conversion is
the same name map as for SeMask-FPN. The backbone is the FPN model's, with the
Mask2Former rule for global semantic attention (resolved in ModelConfig).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from semask_jax.models import layers
from semask_jax.models import valid
from semask_jax.models.config import Mask2FormerHeadConfig, ModelConfig
from semask_jax.models.fapn import MSDeformAttnPixelFANDecoder, PixelFANDecoder
from semask_jax.models.mask2former_decoder import MultiScaleMaskedTransformerDecoder
from semask_jax.models.pixel_decoder import MSDeformAttnPixelDecoder
from semask_jax.models.semantic_head import semantic_head, semantic_inference
from semask_jax.models.swin import SeMaskSwin, stage_sizes


class SemSegHead(nnx.Module):
  """`sem_seg_head` of the checkpoint: pixel decoder + transformer decoder (`predictor`)."""

  def __init__(self, in_channels: tuple[int, ...], num_classes: int,
               config: Mask2FormerHeadConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    c = config
    if c.pixel_decoder == "fapn":
      self.pixel_decoder = PixelFANDecoder(tuple(in_channels), c.conv_dim, c.mask_dim,
                                           c.deformable_groups, dtype=dtype, rngs=rngs)
    elif c.pixel_decoder == "msfapn":
      self.pixel_decoder = MSDeformAttnPixelFANDecoder(
          tuple(in_channels), c.conv_dim, c.mask_dim, c.nheads, c.enc_layers,
          c.enc_dim_feedforward, deformable_groups=c.deformable_groups, dtype=dtype, rngs=rngs)
    else:
      self.pixel_decoder = MSDeformAttnPixelDecoder(
          tuple(in_channels), c.conv_dim, c.mask_dim, c.nheads, c.enc_layers,
          c.enc_dim_feedforward, dtype=dtype, rngs=rngs)
    self.predictor = MultiScaleMaskedTransformerDecoder(
        c.conv_dim, num_classes, c.hidden_dim, c.num_queries, c.nheads, c.dim_feedforward,
        c.dec_layers, c.mask_dim, dtype=dtype, rngs=rngs)


def add_semantic_outputs(out: dict[str, Any], sems: list[jax.Array], size: tuple[int, int],
                         train: bool) -> None:
  """out['sem_pred'] (the semantic head's prior sum at the input size) and, in eval mode,
  out['sem_seg'] (semantic inference of the final prediction; the criterion does not
  read it, and its [B, H, W, K] map costs memory in training)."""
  with jax.named_scope("semantic_head"):
    out["sem_pred"] = semantic_head([s.astype(jnp.float32) for s in sems], size)
  if not train:
    out["sem_seg"] = semantic_inference(out["pred_logits"][-1], out["pred_masks"][-1],
                                        size, size, size)


def build_backbone_and_head(model: nnx.Module, config: ModelConfig, head_config: type,
                            head: type, *, rngs: nnx.Rngs) -> None:
  """Sets model.config, .dtype, .backbone (SeMask Swin) and .sem_seg_head (`head` of the
  `head_config`): what the detectron2 heads (Mask2Former, MaskFormer) build alike. Their
  semantic head sums the four prior maps, so every stage needs semantic layers."""
  name = type(model).__name__
  if not isinstance(config.head, head_config):
    raise ValueError(f"{name} needs a {head_config.__name__}, got {type(config.head).__name__}")
  bb = config.backbone
  if not bb.has_semantic:
    raise ValueError(f"{name} needs semantic layers (num_sem_blocks > 0): its semantic "
                     "head sums the four prior maps")
  model.config = config
  model.dtype = jnp.dtype(bb.dtype)
  model.backbone = SeMaskSwin(bb, rngs=rngs)
  model.sem_seg_head = head(bb.widths, bb.num_classes, config.head, dtype=model.dtype,
                            rngs=rngs)


class Detectron2Segment:
  """segment() of the detectron2 heads (Mask2Former, MaskFormer): semantic inference of
  the final prediction; each head's valid_head gives it in canvases (models/valid.py)."""

  # segment() returns class-times-mask scores in [0, 1], averaged as they are over
  # scales and flips (detectron2's test-time augmentation), not through a softmax.
  SCORES_ARE_PROBABILITIES = True
  # segment()'s scores are at the input size.
  OUTPUT_STRIDE = 1

  def valid_head(self, feats: list[jax.Array], sizes: list[jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
    """res2..res5 canvases and their valid grids [B, 2] -> the final prediction's class
    logits [B, Q, K+1] and mask logits [B, Q, H/4, W/4], per image as alone."""
    raise NotImplementedError

  def segment(self, images: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
    """Eval-mode per-class scores at the input size [B, H, W, K] (semantic inference).

    valid_hw: [B, 2] int32 multiples of 32, each image's (already padded) size in the
    canvas `images` (whose sides are multiples of 32; models/valid.py): then per image the
    scores of images[b, :h, :w] alone, valid over (h, w): detectron2 pads each image to
    its size divisibility 32 first, so the valid size is the padded one."""
    if valid_hw is None:
      return self(images, train=False)["sem_seg"]
    if images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f"valid-size forward: canvas {images.shape[1:3]} is not a multiple "
                       "of 32")
    valid_hw = valid_hw.astype(jnp.int32)
    sizes = stage_sizes(valid_hw, 4)
    feats, _ = self.backbone(images.astype(self.dtype), layers.KeyChain(None), valid_hw)
    logits, masks = self.valid_head(feats, sizes)                      # [B, Q, K+1], [B, Q, h, w]
    # semantic_inference at the padded size (= the valid size): masks x4 from their own
    # valid map, class probabilities times mask sigmoids.
    masks = valid.upsample(jnp.transpose(masks, (0, 2, 3, 1)), sizes[0], 4)  # [B, H, W, Q]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]
    return jnp.einsum("bqk,bhwq->bhwk", probs, jax.nn.sigmoid(masks))


class SeMaskMask2Former(Detectron2Segment, nnx.Module):
  """images [B, H, W, 3] -> Mask2Former predictions + the SeMask semantic prior."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    build_backbone_and_head(self, config, Mask2FormerHeadConfig, SemSegHead, rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None) -> dict[str, Any]:
    """images: [B, H, W, 3] normalised, H and W multiples of 32 (the reference pads to
    its size divisibility), as the semantic head predicts at 4x the stride-4 map.

    Returns pred_logits [L+1, B, Q, K+1] and pred_masks [L+1, B, Q, H/4, W/4] (index l =
    after l decoder layers; -1 the final one), sem_pred [B, H, W, K], sem_seg [B, H, W, K]
    (semantic inference of the final prediction at the input size: per-class scores in
    [0, 1], not logits), and the intermediate maps (feats, sems, mask_features,
    multi_scale_features, and pixel_decoder_aux: the res2 level `fpn_res2` and, for FaPN /
    MSFaPN, each FeatureAlign's inputs and DCN intermediates `alignN_*`). `rng` drives
    drop path when train=True.
    """
    keys = layers.KeyChain(rng if train else None)
    with jax.named_scope("backbone"):  # scopes named as the parameters: profiles by part
      feats, sems = self.backbone(images.astype(self.dtype), keys)
    pixel_aux: dict[str, jax.Array] = {}
    with jax.named_scope("sem_seg_head/pixel_decoder"):
      mask_features, multi_scale = self.sem_seg_head.pixel_decoder(feats, pixel_aux)
    with jax.named_scope("sem_seg_head/predictor"):
      out = dict(self.sem_seg_head.predictor(multi_scale, mask_features))
    add_semantic_outputs(out, sems, tuple(images.shape[1:3]), train)
    out.update(feats=feats, sems=sems, mask_features=mask_features,
               multi_scale_features=multi_scale, pixel_decoder_aux=pixel_aux)
    return out

  def valid_head(self, feats: list[jax.Array], sizes: list[jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
    mask_features, multi_scale = self.sem_seg_head.pixel_decoder(feats, valid_sizes=sizes)
    out = self.sem_seg_head.predictor(multi_scale, mask_features, sizes[:0:-1])
    return out["pred_logits"][-1], out["pred_masks"][-1]
