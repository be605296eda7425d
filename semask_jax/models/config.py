"""Model configs: the four SeMask variants, the switches of the paper's ablations, and the
typed, frozen `ModelConfig` that the model classes take whole.

Experiment files hold the model config as a flat ml_collections ConfigDict
(`config.model`, overridable as `--config.model.embed_dim=...`);
`ModelConfig.from_config` validates it once (unknown keys get a suggestion)
and turns it into frozen dataclasses: a `BackboneConfig` shared by every head,
and the head's own (`FPNHeadConfig`, `Mask2FormerHeadConfig` or `MaskFormerHeadConfig`).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import jax
import ml_collections

# Paper Table 1 / reference configs.
VARIANTS: dict[str, dict[str, Any]] = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}

SEMASK_FPN = "semask_fpn"
SEMASK_MASK2FORMER = "semask_mask2former"
SEMASK_MASKFORMER = "semask_maskformer"
MODEL_NAMES = (SEMASK_FPN, SEMASK_MASK2FORMER, SEMASK_MASKFORMER)
# Heads whose num_sem_blocks is one int for every stage (the detectron2 configs).
_ONE_NUM_SEM_BLOCKS = (SEMASK_MASK2FORMER, SEMASK_MASKFORMER)
# What a rematerialised Swin block keeps from its forward pass (see swin.remat_policy_fn).
REMAT_POLICIES = ("full", "dots", "dots_no_batch", "attn")
DTYPES = ("float32", "bfloat16", "float16")
SEM_ATTENTIONS = ("semantic", "plain")
# How a Swin window attention is computed (swin.WindowAttention.attend): "einsum", two
# einsums around a float32 softmax; "fused", jax.nn.dot_product_attention with the
# implementation JAX picks (XLA's, on every platform today); "cudnn", the same call with
# cuDNN's fused flash attention (NVIDIA GPUs, bfloat16/float16; an odd window, 7x7, gets a
# hidden 50th token). The same function, the bias rounded to the compute dtype in the
# last two.
ATTENTION_IMPLS = ("einsum", "fused", "cudnn")
# How training runs a stage's Swin blocks (inference always unrolls): under one lax.scan
# over (regular, shifted) pairs, which compiles one pair per stage, or unrolled, which
# saves the scan's per-iteration residual copies. 'auto': scan on CPU (the same step time,
# SeMask-B compiles ~20 % faster), unroll on accelerators (on an H200 the scan's residual
# slices and copies were ~17 % of a SeMask-B training step's kernel time).
BLOCK_LOOPS = ("auto", "scan", "unroll")
# The Mask2Former head's pixel decoder: Mask2Former's MSDeformAttnPixelDecoder, SeMask-FAPN's
# PixelFANDecoder (FaPN) or MSDeformAttnPixelFANDecoder (MSFaPN), SPEC sections 10 and 12.
PIXEL_DECODERS = ("msdeformattn", "fapn", "msfapn")
# Initialisation (SPEC section 13). Each head family brings its code base's init of the
# whole model: SeMask-FPN mmseg's (every backbone Linear re-drawn trunc_normal(0.02)),
# the detectron2 heads (Mask2Former and those to come) their constructors' (backbone
# Linears left at torch's default). Derived from the model name, not a config key.
INIT_MMSEG = "mmseg"
INIT_DETECTRON2 = "detectron2"
INIT_PATHS = {SEMASK_FPN: INIT_MMSEG}  # every other (detectron2) head: INIT_DETECTRON2
# config.model.semantic_attention_init: 'reference' initialises the semantic attention as
# the model family's reference does. On the detectron2 path that is kaiming-normal q / k / v
# with mlp_res and gamma exactly 0, a saddle the branch never leaves (SPEC 13: mlp_res and
# gamma stay 0, mlp_cls_k and mlp_v get no gradient; what the paper's numbers come from).
# 'trainable' gives the detectron2 heads the FPN path's init (all four Linears
# trunc_normal(0.02), biases 0, gamma 0), so that the branch learns. No effect on SeMask-FPN.
SEMANTIC_ATTENTION_INITS = ("reference", "trainable")


def init_path_of(name: str) -> str:
  """The init path (INIT_MMSEG or INIT_DETECTRON2) of a model name: the head decides."""
  return INIT_PATHS.get(name, INIT_DETECTRON2)


def resolve_block_loop(block_loop: str, platform: str | None = None) -> bool:
  """True where the training step scans the blocks (block_loop on this platform)."""
  if block_loop not in BLOCK_LOOPS:
    raise ValueError(f"model config: block_loop {block_loop!r} not in {BLOCK_LOOPS}")
  if block_loop == "auto":
    return (platform or jax.default_backend()) == "cpu"
  return block_loop == "scan"


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """SeMask Swin (SPEC sections 1-2). Tuples have one entry per stage."""
  embed_dim: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: int
  sem_window_size: int
  num_classes: int
  num_sem_blocks: tuple[int, ...]   # 0 everywhere: plain Swin (the Swin-FPN baseline)
  sem_global: tuple[bool, ...]      # global (True) or windowed semantic attention per stage
  use_gamma: bool = True
  sem_attention: str = "semantic"   # or "plain" (Table 3 ablation)
  sem_dropout: float = 0.1
  drop_path_rate: float = 0.3
  remat: bool = False
  remat_policy: str = "full"
  dtype: str = "float32"            # compute dtype; parameters stay float32
  attention_impl: str = "einsum"    # Swin window attention: ATTENTION_IMPLS
  block_loop: str = "auto"          # training: Swin blocks scanned or unrolled (BLOCK_LOOPS)
  semantic_attention_init: str = "reference"  # SEMANTIC_ATTENTION_INITS
  init_path: str = INIT_MMSEG       # derived from the model name (init_path_of); not a key

  @property
  def semantic_init(self) -> str:
    """How the semantic attention starts: 'frozen' (detectron2's constructor: kaiming q / k
    / v, mlp_res and gamma 0) or 'trunc_normal' (mmseg's backbone init, or 'trainable')."""
    if self.init_path == INIT_DETECTRON2 and self.semantic_attention_init == "reference":
      return "frozen"
    return "trunc_normal"

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  @property
  def widths(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2 ** i for i in range(self.num_stages))

  @property
  def has_semantic(self) -> bool:
    return any(n > 0 for n in self.num_sem_blocks)


@dataclasses.dataclass(frozen=True)
class FPNHeadConfig:
  """Semantic-FPN decoder (SPEC section 3)."""
  fpn_channels: int = 256
  head_dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class Mask2FormerHeadConfig:
  """Pixel decoder + masked-attention transformer decoder (SPEC section 10)."""
  conv_dim: int = 256
  mask_dim: int = 256
  nheads: int = 8
  enc_layers: int = 6
  enc_dim_feedforward: int = 1024
  hidden_dim: int = 256
  num_queries: int = 100
  dim_feedforward: int = 2048
  dec_layers: int = 9
  pixel_decoder: str = "msdeformattn"  # PIXEL_DECODERS
  deformable_groups: int = 8           # FaPN / MSFaPN: DCNv2 groups of FeatureAlign


@dataclasses.dataclass(frozen=True)
class MaskFormerHeadConfig:
  """MaskFormer's FPN pixel decoder + DETR transformer predictor (SPEC section 11)."""
  conv_dim: int = 256
  mask_dim: int = 256
  nheads: int = 8
  hidden_dim: int = 256
  num_queries: int = 100
  dim_feedforward: int = 2048
  enc_layers: int = 0            # ENC_LAYERS: the SeMask configs use none (only 0 is built)
  dec_layers: int = 6
  dec_dropout: float = 0.1       # DROPOUT of the DETR decoder (attention and FFN), training only
  enforce_input_proj: bool = False


HEAD_CONFIGS: dict[str, type] = {SEMASK_FPN: FPNHeadConfig,
                                 SEMASK_MASK2FORMER: Mask2FormerHeadConfig,
                                 SEMASK_MASKFORMER: MaskFormerHeadConfig}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str
  backbone: BackboneConfig
  head: FPNHeadConfig | Mask2FormerHeadConfig | MaskFormerHeadConfig

  @property
  def num_classes(self) -> int:
    return self.backbone.num_classes

  @classmethod
  def from_config(cls, cfg: "Mapping[str, Any] | ModelConfig") -> "ModelConfig":
    """Validates a flat model config (ConfigDict or dict) and freezes it."""
    if isinstance(cfg, ModelConfig):
      return cfg
    validate_model_config(cfg)
    name = cfg.get("name", SEMASK_FPN)
    head_cls = HEAD_CONFIGS[name]
    backbone = BackboneConfig(
        **{f.name: _freeze(cfg[f.name]) for f in dataclasses.fields(BackboneConfig)
           if f.name not in ("num_sem_blocks", "sem_global", "init_path") and f.name in cfg},
        num_sem_blocks=resolve_num_sem_blocks(cfg), sem_global=resolve_sem_global(cfg),
        init_path=init_path_of(name))
    head = head_cls(**{f.name: _freeze(cfg[f.name]) for f in dataclasses.fields(head_cls)
                       if f.name in cfg})
    return cls(name=name, backbone=backbone, head=head)


def _freeze(v: Any) -> Any:
  return tuple(v) if isinstance(v, (list, tuple)) else v


# Flat keys of config.model, per model name (besides `name`).
_BACKBONE_KEYS = tuple(f.name for f in dataclasses.fields(BackboneConfig)
                       if f.name != "init_path")
_HEAD_KEYS = {
    SEMASK_FPN: tuple(f.name for f in dataclasses.fields(FPNHeadConfig)),
    SEMASK_MASK2FORMER: tuple(f.name for f in dataclasses.fields(Mask2FormerHeadConfig)),
    SEMASK_MASKFORMER: tuple(f.name for f in dataclasses.fields(MaskFormerHeadConfig)),
}
# Keys that configs may lack, with their meaning when absent.
_OPTIONAL_KEYS = ("name", "remat_policy", "sem_global", "attention_impl", "block_loop",
                  "pixel_decoder", "deformable_groups", "semantic_attention_init")


def model_keys(name: str = SEMASK_FPN) -> tuple[str, ...]:
  return ("name",) + _BACKBONE_KEYS + _HEAD_KEYS[name]


def released_sem_window(window_size: int, num_classes: int) -> int:
  """The detectron2 heads' MODEL.SEM_WINDOW_SIZE: the released ADE20K (150-class) configs
  set it to the Swin window, the others (Cityscapes) keep detectron2's default, 7 (for L
  too, whose Swin window is 12). Not in a checkpoint's shapes (the windowed semantic
  attention has no position table), so the converter reads it from this rule too."""
  return window_size if num_classes == 150 else 7


def reference_sem_global(embed_dim: int, num_classes: int, num_stages: int = 4,
                         name: str = SEMASK_FPN,
                         pixel_decoder: str = "msdeformattn") -> tuple[bool, ...]:
  """Which stages use global semantic attention in the reference code.

  SeMask-FPN: stages 2-3 for embed 96/192 with more than 19 classes, windowed
  everywhere otherwise. SeMask-Mask2Former: only the last stage, and only for
  150 classes (SPEC section 10). SeMask-FAPN's copy (FaPN / MSFaPN pixel decoders):
  stages 2-3 for every class count (SPEC section 12). SeMask-MaskFormer: the last stage,
  for every class count (SPEC section 11).
  """
  if name == SEMASK_MASKFORMER:
    return tuple(i == num_stages - 1 for i in range(num_stages))
  if name == SEMASK_MASK2FORMER and pixel_decoder in ("fapn", "msfapn"):
    return tuple(i >= 2 for i in range(num_stages))
  if name == SEMASK_MASK2FORMER:
    return tuple(i == num_stages - 1 and num_classes == 150 for i in range(num_stages))
  if embed_dim in (96, 192) and num_classes > 19:
    return tuple(i >= 2 for i in range(num_stages))
  return (False,) * num_stages


def resolve_sem_global(cfg: Mapping[str, Any]) -> tuple[bool, ...]:
  """cfg.sem_global if given, else the reference rule of cfg.name's model."""
  if cfg.get("sem_global") is not None:
    return tuple(bool(g) for g in cfg["sem_global"])
  return reference_sem_global(cfg["embed_dim"], cfg["num_classes"], len(cfg["depths"]),
                              cfg.get("name", SEMASK_FPN),
                              cfg.get("pixel_decoder", "msdeformattn"))


def resolve_num_sem_blocks(cfg: Mapping[str, Any]) -> tuple[int, ...]:
  """Per stage; one int (the Mask2Former configs' form) applies to every stage."""
  n = cfg["num_sem_blocks"]
  if isinstance(n, int):
    return (n,) * len(cfg["depths"])
  return tuple(int(v) for v in n)


def default_model_config(variant: str = "T", num_classes: int = 150, *,
                         num_sem_blocks=(1, 1, 1, 1),
                         name: str = SEMASK_FPN) -> ml_collections.ConfigDict:
  """A flat model config; num_sem_blocks=(0, 0, 0, 0) gives the Swin-FPN baseline,
  name='semask_mask2former' the Mask2Former head with the reference's defaults."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
  if name not in MODEL_NAMES:
    raise ValueError(f"Unknown model name {name!r}; expected one of {MODEL_NAMES}")
  v = VARIANTS[variant]
  if name in _ONE_NUM_SEM_BLOCKS and not isinstance(num_sem_blocks, int):
    if len(set(num_sem_blocks)) != 1:
      raise ValueError(f"{name} has one num_sem_blocks for all stages, "
                       f"got {tuple(num_sem_blocks)}")
    num_sem_blocks = int(num_sem_blocks[0])  # the reference's single int
  elif not isinstance(num_sem_blocks, int):
    num_sem_blocks = tuple(num_sem_blocks)
  cfg = ml_collections.ConfigDict(dict(
      name=name, embed_dim=v["embed_dim"], depths=v["depths"], num_heads=v["num_heads"],
      window_size=v["window_size"], sem_window_size=v["window_size"],
      num_classes=num_classes, num_sem_blocks=num_sem_blocks,
      use_gamma=True, sem_attention="semantic", sem_dropout=0.1,
      drop_path_rate=0.3, dtype="float32", remat=False, remat_policy="full",
      attention_impl="einsum", block_loop="auto",
      semantic_attention_init="reference"))  # or 'trainable': SEMANTIC_ATTENTION_INITS
  head_cls = HEAD_CONFIGS[name]
  for f in dataclasses.fields(head_cls):
    cfg[f.name] = f.default
  # None means "the reference rule" (resolve_sem_global); a tuple of bools overrides it.
  cfg.sem_global = ml_collections.FieldReference(None, field_type=tuple)
  return cfg


def model_config_from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A full model config from a partial dict (e.g. a golden vector's meta['config']).

  Keys that are not model keys (such as cate_w) are ignored; missing ones
  take the defaults of default_model_config. A dict with Mask2Former keys
  (dec_layers) gives a Mask2Former config unless its `name` says otherwise (MaskFormer's
  keys are a subset of Mask2Former's: its vectors need name='semask_maskformer').
  """
  name = d.get("name", SEMASK_MASK2FORMER if "dec_layers" in d else SEMASK_FPN)
  cfg = default_model_config("T", int(d.get("num_classes", 150)), name=name)
  keys = set(model_keys(name))
  for k, v in d.items():
    if k in keys and k not in ("sem_global", "name"):
      cfg[k] = tuple(v) if isinstance(v, list) else v
  if d.get("sem_global") is not None:
    cfg.sem_global = tuple(bool(g) for g in d["sem_global"])
  if "sem_window_size" not in d:
    cfg.sem_window_size = cfg.window_size
  return cfg


def validate_model_config(cfg: Mapping[str, Any]) -> None:
  """Clear errors for typos and inconsistent settings before building anything."""
  name = cfg.get("name", SEMASK_FPN)
  if name not in MODEL_NAMES:
    raise ValueError(f"model config: name {name!r} is not one of {MODEL_NAMES}")
  allowed = set(model_keys(name))
  keys = set(cfg.keys())
  missing = [k for k in model_keys(name) if k not in keys and k not in _OPTIONAL_KEYS]
  unknown = sorted(keys - allowed)
  if missing or unknown:
    hints = []
    for k in unknown:
      close = difflib.get_close_matches(k, sorted(allowed), n=1)
      hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"model config ({name}): missing keys {missing}, unknown keys "
                     f"[{', '.join(hints)}]")
  n = len(cfg["depths"])
  nsb = cfg["num_sem_blocks"]
  for k in ("num_heads",) + (() if isinstance(nsb, int) else ("num_sem_blocks",)):
    if len(cfg[k]) != n:
      raise ValueError(f"model config: {k} has {len(cfg[k])} entries, depths has {n}")
  if cfg.get("sem_global") is not None and len(cfg["sem_global"]) != n:
    raise ValueError(f"model config: sem_global has {len(cfg['sem_global'])} entries, expected {n}")
  for i, h in enumerate(cfg["num_heads"]):
    if (cfg["embed_dim"] * 2 ** i) % h:
      raise ValueError(f"model config: stage {i} width {cfg['embed_dim'] * 2 ** i} "
                       f"is not divisible by num_heads {h}")
  nsb = list(resolve_num_sem_blocks(cfg))
  if any(nsb) and not all(nsb):
    raise ValueError(f"model config: num_sem_blocks {nsb} must be all zero (Swin-FPN) "
                     "or all positive (SeMask: the semantic decoder sums every stage)")
  if cfg["dtype"] not in DTYPES:
    raise ValueError(f"model config: dtype {cfg['dtype']!r} not in {DTYPES}")
  if cfg["sem_attention"] not in SEM_ATTENTIONS:
    raise ValueError(f"model config: sem_attention {cfg['sem_attention']!r} not in "
                     f"{SEM_ATTENTIONS}")
  policy = cfg.get("remat_policy", "full")
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model config: remat_policy {policy!r} not in {REMAT_POLICIES}")
  impl = cfg.get("attention_impl", "einsum")
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model config: attention_impl {impl!r} not in {ATTENTION_IMPLS}")
  resolve_block_loop(cfg.get("block_loop", "auto"), platform="cpu")  # validates
  if name == SEMASK_MASKFORMER:
    if cfg["hidden_dim"] % cfg["nheads"]:
      raise ValueError(f"model config: hidden_dim={cfg['hidden_dim']} is not divisible by "
                       f"nheads={cfg['nheads']}")
    if cfg["conv_dim"] % 32:
      raise ValueError(f"model config: conv_dim={cfg['conv_dim']} must be a multiple of 32 "
                       "(GroupNorm(32) in the pixel decoder)")
    if cfg["enc_layers"] != 0:
      raise ValueError(f"model config: enc_layers={cfg['enc_layers']}: only the SeMask "
                       "configs' DETR transformer without encoder layers (0) is built")
  sai = cfg.get("semantic_attention_init", "reference")
  if sai not in SEMANTIC_ATTENTION_INITS:
    raise ValueError(f"model config: semantic_attention_init {sai!r} not in "
                     f"{SEMANTIC_ATTENTION_INITS}")
  if name == SEMASK_MASK2FORMER:
    for a, b in (("conv_dim", "nheads"), ("hidden_dim", "nheads")):
      if cfg[a] % cfg[b]:
        raise ValueError(f"model config: {a}={cfg[a]} is not divisible by {b}={cfg[b]}")
    pixel_decoder = cfg.get("pixel_decoder", "msdeformattn")
    if pixel_decoder not in PIXEL_DECODERS:
      raise ValueError(f"model config: pixel_decoder {pixel_decoder!r} not in {PIXEL_DECODERS}")
    dg = cfg.get("deformable_groups", 8)
    if pixel_decoder != "msdeformattn" and (dg < 1 or cfg["conv_dim"] % dg):
      raise ValueError(f"model config: conv_dim={cfg['conv_dim']} is not divisible into "
                       f"deformable_groups={dg}")
    if cfg["conv_dim"] % 32:
      raise ValueError(f"model config: conv_dim={cfg['conv_dim']} must be a multiple of 32 "
                       "(GroupNorm(32) in the pixel decoder)")
