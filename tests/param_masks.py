"""The optimizer's per-parameter masks of a recipe's model, by parameter name (shared by the
no-decay checks of test_configs.py and test_maskformer.py)."""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from semask_jax.models import build_model
from semask_jax.train import optim


def masks_by_name(config: Any) -> tuple[dict[str, bool], dict[str, bool]]:
  """(decay, backbone): optim.decay_mask (with config.optimizer.no_decay_keys) and
  optim.backbone_mask of config.model's parameters, keyed by optim.param_name. The model is
  built with one block per stage and shapes only (the names are what the masks read)."""
  config.model.depths = (1, 1, 1, 1)
  params = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0))), nnx.Param))
  by_name = lambda mask: {optim.param_name(p): v  # noqa: E731
                          for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  return (by_name(optim.decay_mask(params, config.optimizer.no_decay_keys)),
          by_name(optim.backbone_mask(params)))
