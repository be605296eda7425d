"""SeMask-FPN: SeMask Swin backbone + Semantic-FPN head + semantic decoder."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from semask_jax.models import layers
from semask_jax.models.decoders import FPNHead, semantic_decoder
from semask_jax.models.swin import SeMaskSwin

STRIDES = (4, 8, 16, 32)


class SeMaskFPN(nnx.Module):
  """The whole segmentation model; attribute names follow the mmseg checkpoint."""

  def __init__(self, *, embed_dim: int, depths, num_heads, window_size: int, num_classes: int,
               num_sem_blocks, sem_window_size: int, sem_global, use_gamma: bool = True,
               sem_attention: str = "semantic", sem_dropout: float = 0.1,
               drop_path_rate: float = 0.3, fpn_channels: int = 256, head_dropout: float = 0.1,
               remat: bool = False, remat_policy: str = "full", dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.has_semantic = any(n > 0 for n in num_sem_blocks)
    self.backbone = SeMaskSwin(
        embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
        num_classes=num_classes, num_sem_blocks=num_sem_blocks,
        sem_window_size=sem_window_size, sem_global=sem_global, use_gamma=use_gamma,
        sem_attention=sem_attention, sem_dropout=sem_dropout, drop_path_rate=drop_path_rate,
        remat=remat, remat_policy=remat_policy, dtype=dtype, rngs=rngs)
    self.decode_head = FPNHead([embed_dim * 2 ** i for i in range(len(depths))], num_classes,
                               channels=fpn_channels, strides=STRIDES, dropout=head_dropout,
                               dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, images: jax.Array, *, train: bool = False,
               rng: jax.Array | None = None) -> dict[str, Any]:
    """images: [B, H, W, 3] normalised -> dict of float32 maps at stride 4.

    seg_logits [B, ceil(H/4), ceil(W/4), K]; cls_logits (semantic decoder, same
    shape, absent for the Swin-FPN baseline); feats (4 maps); sems (4 maps or None).
    `rng` drives drop path and dropout when train=True; ignored otherwise.
    """
    keys = layers.KeyChain(rng if train else None)
    feats, sems = self.backbone(images.astype(self.dtype), keys)
    seg = self.decode_head(feats, train=train, rng=keys.next())
    out = {"seg_logits": seg, "feats": feats, "sems": sems}
    if self.has_semantic:
      if any(s is None for s in sems):
        raise ValueError("The semantic decoder needs a semantic layer in every stage; "
                         "got num_sem_blocks with zeros and others non-zero.")
      out["cls_logits"] = semantic_decoder(sems, STRIDES)
    return out


def build_model(cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> SeMaskFPN:
  """Builds SeMaskFPN from a model config (see semask_jax.models.config)."""
  from semask_jax.models.config import resolve_sem_global, validate_model_config

  validate_model_config(cfg)
  return SeMaskFPN(
      embed_dim=cfg["embed_dim"], depths=tuple(cfg["depths"]), num_heads=tuple(cfg["num_heads"]),
      window_size=cfg["window_size"], num_classes=cfg["num_classes"],
      num_sem_blocks=tuple(cfg["num_sem_blocks"]), sem_window_size=cfg["sem_window_size"],
      sem_global=resolve_sem_global(cfg), use_gamma=cfg["use_gamma"],
      sem_attention=cfg["sem_attention"], sem_dropout=cfg["sem_dropout"],
      drop_path_rate=cfg["drop_path_rate"], fpn_channels=cfg["fpn_channels"],
      head_dropout=cfg["head_dropout"], remat=bool(cfg["remat"]),
      remat_policy=cfg.get("remat_policy", "full"),
      dtype=jnp.dtype(cfg["dtype"]), rngs=rngs)
