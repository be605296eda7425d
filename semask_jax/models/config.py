"""Model configs: the four SeMask variants and the switches of the paper's ablations."""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

# Paper Table 1 / reference configs.
VARIANTS: dict[str, dict[str, Any]] = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}

_KEYS = ("embed_dim", "depths", "num_heads", "window_size", "sem_window_size", "num_classes",
         "num_sem_blocks", "sem_global", "use_gamma", "sem_attention", "sem_dropout",
         "drop_path_rate", "fpn_channels", "head_dropout", "dtype", "remat")
# Keys that older configs may lack, with their defaults.
_OPTIONAL_KEYS = {"remat_policy": "full"}
# What a rematerialised Swin block keeps from its forward pass (see swin.REMAT_POLICIES).
REMAT_POLICIES = ("full", "dots", "dots_no_batch", "attn")


def reference_sem_global(embed_dim: int, num_classes: int, num_stages: int = 4) -> tuple[bool, ...]:
  """The reference's rule: global semantic attention in stages 2-3 only for
  embed 96/192 with more than 19 classes; windowed everywhere otherwise."""
  if embed_dim in (96, 192) and num_classes > 19:
    return tuple(i >= 2 for i in range(num_stages))
  return (False,) * num_stages


def resolve_sem_global(cfg: Mapping[str, Any]) -> tuple[bool, ...]:
  """cfg.sem_global if given, else the reference rule."""
  if cfg.get("sem_global") is not None:
    return tuple(bool(g) for g in cfg["sem_global"])
  return reference_sem_global(cfg["embed_dim"], cfg["num_classes"], len(cfg["depths"]))


def default_model_config(variant: str = "T", num_classes: int = 150, *,
                         num_sem_blocks=(1, 1, 1, 1)) -> ml_collections.ConfigDict:
  """A SeMask-FPN config; num_sem_blocks=(0, 0, 0, 0) gives the Swin-FPN baseline."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
  v = VARIANTS[variant]
  cfg = ml_collections.ConfigDict(dict(
      embed_dim=v["embed_dim"], depths=v["depths"], num_heads=v["num_heads"],
      window_size=v["window_size"], sem_window_size=v["window_size"],
      num_classes=num_classes, num_sem_blocks=tuple(num_sem_blocks),
      use_gamma=True, sem_attention="semantic", sem_dropout=0.1,
      drop_path_rate=0.3, fpn_channels=256, head_dropout=0.1,
      dtype="float32", remat=False, remat_policy="full"))
  # None means "the reference rule" (resolve_sem_global); a tuple of 4 bools overrides it.
  cfg.sem_global = ml_collections.FieldReference(None, field_type=tuple)
  return cfg


def model_config_from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A full model config from a partial dict (e.g. a golden vector's meta['config']).

  Keys that are not model keys (such as cate_w) are ignored; missing ones
  take the defaults of default_model_config.
  """
  cfg = default_model_config("T", int(d.get("num_classes", 150)))
  for k, v in d.items():
    if (k in _KEYS or k in _OPTIONAL_KEYS) and k != "sem_global":
      cfg[k] = tuple(v) if isinstance(v, list) else v
  if d.get("sem_global") is not None:
    cfg.sem_global = tuple(bool(g) for g in d["sem_global"])
  if "sem_window_size" not in d:
    cfg.sem_window_size = cfg.window_size
  return cfg


def validate_model_config(cfg: Mapping[str, Any]) -> None:
  """Clear errors for typos and inconsistent settings before building anything."""
  keys = set(cfg.keys())
  missing = [k for k in _KEYS if k not in keys]
  unknown = sorted(keys - set(_KEYS) - set(_OPTIONAL_KEYS))
  if missing or unknown:
    raise ValueError(f"model config: missing keys {missing}, unknown keys {unknown}")
  n = len(cfg["depths"])
  for k in ("num_heads", "num_sem_blocks"):
    if len(cfg[k]) != n:
      raise ValueError(f"model config: {k} has {len(cfg[k])} entries, depths has {n}")
  if cfg.get("sem_global") is not None and len(cfg["sem_global"]) != n:
    raise ValueError(f"model config: sem_global has {len(cfg['sem_global'])} entries, expected {n}")
  for i, h in enumerate(cfg["num_heads"]):
    if (cfg["embed_dim"] * 2 ** i) % h:
      raise ValueError(f"model config: stage {i} width {cfg['embed_dim'] * 2 ** i} "
                       f"is not divisible by num_heads {h}")
  nsb = list(cfg["num_sem_blocks"])
  if any(nsb) and not all(nsb):
    raise ValueError(f"model config: num_sem_blocks {nsb} must be all zero (Swin-FPN) "
                     "or all positive (SeMask-FPN: the semantic decoder sums every stage)")
  if cfg["dtype"] not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"model config: dtype {cfg['dtype']!r} not in float32/bfloat16/float16")
  policy = cfg.get("remat_policy", "full")
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model config: remat_policy {policy!r} not in {REMAT_POLICIES}")
