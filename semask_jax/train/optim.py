"""Optimizer of the reference recipe: AdamW, mmcv poly + linear warmup, no-decay mask, accumulation.

SPEC section 6. The schedule is evaluated per *optimizer update* (one mmcv
iteration = one 16-image batch), so with gradient accumulation over k micro
steps the schedule advances once every k micro steps, as in the reference.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Substrings of a parameter's dotted name that switch weight decay off (SPEC 6).
NO_DECAY_KEYS: tuple[str, ...] = ('absolute_pos_embed', 'relative_position_bias_table', 'norm')


def poly_warmup_schedule(base_lr: float, max_iters: int, *, power: float = 1.0,
                         min_lr: float = 0.0, warmup_iters: int = 0,
                         warmup_ratio: float = 1e-6) -> optax.Schedule:
  """mmcv `PolyLrUpdaterHook` with `warmup='linear'`, by iteration.

  regular(it) = (lr0 - min_lr) * (1 - it / max_iters) ** power + min_lr
  warmup(it)  = regular(it) * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))  for it < warmup_iters
  """
  if max_iters <= 0:
    raise ValueError(f'max_iters must be positive, got {max_iters}')

  def schedule(count: jax.Array) -> jax.Array:
    it = jnp.asarray(count, jnp.float32)
    # Written so that float32 keeps full relative precision near it = 0 and it = max_iters.
    remaining = jnp.clip((max_iters - it) / max_iters, 0.0, 1.0)  # 1 - it / max_iters
    regular = (base_lr - min_lr) * remaining ** power + min_lr
    if warmup_iters <= 0:
      return regular
    k = warmup_ratio + (it / warmup_iters) * (1.0 - warmup_ratio)  # 1 - (1 - it/w)(1 - ratio)
    return jnp.where(it < warmup_iters, regular * k, regular)

  return schedule


def param_name(path: Sequence[Any]) -> str:
  """Dotted PyTorch-style name of a pytree path ('backbone.layers.0.blocks.1.attn...')."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '.'.join(parts)


def decay_mask(params: Any, no_decay_keys: Sequence[str] = NO_DECAY_KEYS) -> Any:
  """Pytree of bools like `params`: True where weight decay applies (reference substring rule)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(k in param_name(path) for k in no_decay_keys), params)


def backbone_mask(params: Any) -> Any:
  """True for the parameters of the backbone (names starting with 'backbone.')."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_name(path).startswith('backbone.'), params)


def create_optimizer(config: ml_collections.ConfigDict, params: Any
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ optional MultiSteps accumulation) from `config.optimizer` and `config.total_steps`.

  `config.total_steps` counts optimizer updates (reference iterations); with
  `config.grad_accum_steps = k` the train loop runs k micro steps per update.
  Returns (transformation, schedule of the update count).
  """
  o = config.optimizer
  schedule = poly_warmup_schedule(
      o.learning_rate, config.total_steps, power=o.poly_power, min_lr=o.min_lr,
      warmup_iters=o.warmup_steps, warmup_ratio=o.warmup_ratio)
  mask = decay_mask(params, tuple(o.no_decay_keys))
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  mult = float(o.get('backbone_lr_mult', 1.0))
  if mult != 1.0:
    # detectron2's BACKBONE_MULTIPLIER scales the backbone's learning rate, i.e. its whole
    # AdamW step (the decoupled weight decay is lr * wd * p too).
    tx = optax.chain(tx, optax.masked(optax.scale(mult), backbone_mask(params)))
  if o.get('grad_clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  k = int(config.get('grad_accum_steps', 1))
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx, schedule


def optimizer_updates(opt_state: Any) -> jax.Array:
  """Number of optimizer updates applied so far (the schedule's `it`), with or without MultiSteps."""
  if isinstance(opt_state, optax.MultiStepsState):
    return optimizer_updates(opt_state.inner_opt_state)
  for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)):
    if isinstance(s, optax.ScaleByScheduleState):
      return s.count
  raise ValueError('optimizer state holds no schedule count')


def current_lr(schedule: optax.Schedule, opt_state: Any) -> jax.Array:
  return schedule(optimizer_updates(opt_state))


def count_params(tree: Mapping[str, Any]) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


__all__ = ['NO_DECAY_KEYS', 'poly_warmup_schedule', 'param_name', 'decay_mask',
           'backbone_mask', 'create_optimizer', 'optimizer_updates', 'current_lr', 'count_params']
