"""SeMask-FPN model in Flax NNX."""
from semask_jax.models.config import (VARIANTS, default_model_config, model_config_from_dict,
                                      reference_sem_global,
                                      resolve_sem_global)
from semask_jax.models.semask_fpn import SeMaskFPN, build_model
from semask_jax.models.resize import resize_bilinear

__all__ = ["VARIANTS", "SeMaskFPN", "build_model", "default_model_config", "model_config_from_dict",
           "reference_sem_global", "resolve_sem_global", "resize_bilinear"]
