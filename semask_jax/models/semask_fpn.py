"""SeMask-FPN: SeMask Swin backbone + Semantic-FPN head + semantic decoder."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from semask_jax.models import layers
from semask_jax.models.config import FPNHeadConfig, ModelConfig
from semask_jax.models.decoders import FPNHead, semantic_decoder
from semask_jax.models.swin import SeMaskSwin, stage_sizes

STRIDES = (4, 8, 16, 32)


class SeMaskFPN(nnx.Module):
  """The whole segmentation model; attribute names follow the mmseg checkpoint."""

  # segment() returns logits (multi-scale evaluation averages their softmax).
  SCORES_ARE_PROBABILITIES = False
  # segment()'s scores are at ceil(input size / 4) (the valid-size forward's output).
  OUTPUT_STRIDE = 4

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(config.head, FPNHeadConfig):
      raise ValueError(f"SeMaskFPN needs an FPN head config, got {type(config.head).__name__}")
    bb, head = config.backbone, config.head
    self.config = config
    self.dtype = jnp.dtype(bb.dtype)
    self.backbone = SeMaskSwin(bb, rngs=rngs)
    self.decode_head = FPNHead(list(bb.widths), bb.num_classes, channels=head.fpn_channels,
                               strides=STRIDES, dropout=head.head_dropout, dtype=self.dtype,
                               rngs=rngs)

  def __call__(self, images: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None) -> dict[str, Any]:
    """images: [B, H, W, 3] normalised -> dict of float32 maps at stride 4.

    seg_logits [B, ceil(H/4), ceil(W/4), K]; cls_logits (semantic decoder, same
    shape, absent for the Swin-FPN baseline); feats (4 maps); sems (4 maps or None).
    `rng` drives drop path and dropout when train=True; ignored otherwise.
    """
    keys = layers.KeyChain(rng if train else None)
    with jax.named_scope("backbone"):  # scopes named as the parameters: profiles by part
      feats, sems = self.backbone(images.astype(self.dtype), keys)
    with jax.named_scope("decode_head"):
      seg = self.decode_head(feats, train=train, rng=keys.next())
    out = {"seg_logits": seg, "feats": feats, "sems": sems}
    if self.config.backbone.has_semantic:
      with jax.named_scope("semantic_decoder"):
        out["cls_logits"] = semantic_decoder(sems, STRIDES)
    return out

  def segment(self, images: jax.Array, valid_hw: jax.Array | None = None) -> jax.Array:
    """Eval-mode per-class scores: the Semantic-FPN logits [B, H/4, W/4, K].

    valid_hw: [B, 2] int32 size of each image in the canvas `images` (models/valid.py):
    then per image the logits of images[b, :h, :w] alone, valid over ceil((h, w) / 4)."""
    if valid_hw is None:
      return self(images, train=False)["seg_logits"]
    valid_hw = valid_hw.astype(jnp.int32)
    keys = layers.KeyChain(None)
    feats, _ = self.backbone(images.astype(self.dtype), keys, valid_hw)
    return self.decode_head(feats, train=False, rng=None,
                            valid_sizes=stage_sizes(valid_hw, len(feats)))
