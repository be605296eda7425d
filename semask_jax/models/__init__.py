"""SeMask models in Flax NNX: the Swin backbone and its heads, built from one ModelConfig."""
from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from semask_jax.models.config import (MODEL_NAMES, SEMASK_FPN, SEMASK_MASK2FORMER,
                                      SEMASK_MASKFORMER, VARIANTS, BackboneConfig,
                                      FPNHeadConfig, Mask2FormerHeadConfig,
                                      MaskFormerHeadConfig, ModelConfig, default_model_config, model_config_from_dict,
                                      reference_sem_global, resolve_sem_global)
from semask_jax.models.resize import resize_bilinear
from semask_jax.models.semask_fpn import SeMaskFPN
from semask_jax.models.semask_mask2former import SeMaskMask2Former
from semask_jax.models.semask_maskformer import SeMaskMaskFormer


def model_class(cfg: Mapping[str, Any] | ModelConfig) -> type:
  """SeMaskFPN, SeMaskMask2Former or SeMaskMaskFormer, by the config's name."""
  name = cfg.name if isinstance(cfg, ModelConfig) else cfg.get("name", SEMASK_FPN)
  return {SEMASK_MASK2FORMER: SeMaskMask2Former,
          SEMASK_MASKFORMER: SeMaskMaskFormer}.get(name, SeMaskFPN)


def build_model(cfg: Mapping[str, Any] | ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model of a (flat ml_collections or typed) model config; validates it first."""
  config = ModelConfig.from_config(cfg)
  return model_class(config)(config, rngs=rngs)


__all__ = ["MODEL_NAMES", "SEMASK_FPN", "SEMASK_MASK2FORMER", "SEMASK_MASKFORMER", "VARIANTS",
           "MaskFormerHeadConfig", "SeMaskMaskFormer", "BackboneConfig",
           "FPNHeadConfig", "Mask2FormerHeadConfig", "ModelConfig", "SeMaskFPN", "SeMaskMask2Former", "build_model", "model_class",
           "default_model_config", "model_config_from_dict", "reference_sem_global",
           "resolve_sem_global", "resize_bilinear"]
