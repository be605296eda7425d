"""Import PyTorch Swin / SeMask-FPN / SeMask-Mask2Former weights into the Flax models.

Three sources (SPEC sections 5 and 10):
  * a Swin ImageNet checkpoint ({'model': state_dict}, no 'backbone.' prefix):
    loaded into the backbone; norm.*, head.* and buffers are skipped; the
    semantic layers, norm0..3 and the decoder keep their initialisation;
    bias tables are resized bicubically when the windows differ;
  * a trained SeMask-FPN / Swin-FPN checkpoint (mmcv {'state_dict': ...}):
    every parameter and batch-norm statistic; the model config (variant,
    window, class count) is read from the shapes;
  * a released SeMask-Mask2Former, FaPN- or MSFaPN-Mask2Former, or SeMask-MaskFormer
    checkpoint (detectron2 {'model': ...}; the FaPN decoders' second copy of each shared
    GroupNorm, align_N.offset.norm.*, is checked equal to layer_N.norm.*):
    backbone.*, sem_seg_head.pixel_decoder.*, sem_seg_head.predictor.*; the
    buffers pixel_mean, pixel_std, criterion.empty_weight are skipped; variant,
    window, classes, queries and layer counts are read from the shapes.
Anything that does not fit is refused with the missing, unexpected and
mis-shaped keys listed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from convert_weights import names
from convert_weights.bicubic import resize_bias_table
from semask_jax.cli import PathNotFoundError
from semask_jax.models import (SEMASK_MASK2FORMER, SEMASK_MASKFORMER, build_model,
                               default_model_config)
from semask_jax.models.config import released_sem_window

StateDict = dict[str, np.ndarray]


class ConversionError(ValueError):
  """A checkpoint that does not fit the requested model."""


@dataclasses.dataclass
class ConversionReport:
  source: str
  used: list[str] = dataclasses.field(default_factory=list)        # torch keys loaded
  skipped: list[str] = dataclasses.field(default_factory=list)     # torch keys deliberately dropped
  new: list[str] = dataclasses.field(default_factory=list)         # model keys left at init
  resized: list[str] = dataclasses.field(default_factory=list)      # bias tables interpolated
  loaded: list[str] = dataclasses.field(default_factory=list)       # model names that were set

  def summary(self) -> str:
    return (f"{self.source}: used {len(self.used)} keys, skipped {len(self.skipped)} "
            f"(buffers, norm.*, head.*), new {len(self.new)} (initialised), "
            f"resized {len(self.resized)} bias tables")


@dataclasses.dataclass
class Conversion:
  """In-memory result: the model with the weights in place, its config and the report."""
  model: nnx.Module
  config: Any
  report: ConversionReport


# ----------------------------------------------------------------------------
# Reading .pth files.
# ----------------------------------------------------------------------------

def read_pth(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, Any]:
  """torch.load a checkpoint on the CPU; the top-level dict, tensors as numpy."""
  import torch  # Only needed to read .pth files.

  if not os.path.exists(path):
    raise PathNotFoundError(f"checkpoint not found: {path}")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name.
    hint = "" if allow_pickle else (" (if you trust this file, retry with allow_pickle=True / "
                                    "--allow_pickle: it holds objects other than tensors)")
    raise ConversionError(f"cannot read {path}: {e}{hint}") from e
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: expected a dict at the top level, got {type(obj).__name__}")
  return obj


def _to_numpy(sd: Mapping[str, Any]) -> StateDict:
  out = {}
  for k, v in sd.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu().numpy()
    out[k] = np.asarray(v)
  return out


def extract_state_dict(obj: Mapping[str, Any], source: str = "checkpoint") -> StateDict:
  """The state dict of a Swin ({'model': ...}), mmcv ({'state_dict': ...}) or bare dict."""
  for key in ("state_dict", "model"):
    if key in obj and isinstance(obj[key], Mapping):
      return _to_numpy(obj[key])
  if all(hasattr(v, "shape") for v in obj.values()):
    return _to_numpy(obj)
  raise ConversionError(f"{source}: no 'state_dict' or 'model' entry; top-level keys "
                        f"{sorted(obj)[:10]}")


def _load(sd_or_path, allow_pickle: bool) -> tuple[StateDict, str]:
  if isinstance(sd_or_path, (str, os.PathLike)):
    return extract_state_dict(read_pth(sd_or_path, allow_pickle=allow_pickle),
                              str(sd_or_path)), str(sd_or_path)
  return extract_state_dict(sd_or_path, "state dict"), "state dict"


# ----------------------------------------------------------------------------
# The model side.
# ----------------------------------------------------------------------------

def model_leaves(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
  """torch key -> (model path, variable) for every Param and BatchStat of the model."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
    out[names.torch_key(path)] = (path, var)
  return out


def _describe(sd: StateDict, prefix: str) -> str:
  """'embed 128, depths (2, 2, 18, 2), window 12' read off a (partial) state dict."""
  try:
    embed = sd[prefix + "patch_embed.proj.weight"].shape[0]
    depths = tuple(1 + max((int(m.group(1)) for k in sd if (m := re.match(
        rf"{re.escape(prefix)}layers\.{i}\.blocks\.(\d+)\.", k))), default=-1)
                   for i in range(4))
    rows = sd[prefix + "layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    return f"embed {embed}, depths {depths}, window {(math.isqrt(rows) + 1) // 2}"
  except (KeyError, ValueError):
    return "an unrecognised layout"


def _refuse(source: str, missing, unexpected, mismatched, hint: str = "") -> None:
  if not (missing or unexpected or mismatched):
    return
  def block(title, keys):
    if not keys:
      return ""
    shown = "\n    ".join(keys[:40]) + (f"\n    ... and {len(keys) - 40} more" if len(keys) > 40 else "")
    return f"\n  {title} ({len(keys)}):\n    {shown}"
  raise ConversionError(
      f"{source} does not fit the requested model{hint}:"
      + block("missing keys", missing) + block("unexpected keys", unexpected)
      + block("mis-shaped keys", mismatched))


def plan_state_dict(model: nnx.Module, sd: StateDict, *, source: str = "state dict",
                    backbone_only: bool = False
                    ) -> tuple[ConversionReport, dict[str, np.ndarray]]:
  """What loading `sd` into `model` would do, without touching the model.

  Returns the report and {model name: value in the model's layout}, or raises
  ConversionError listing every missing, unexpected and mis-shaped key. Works
  on an abstract model (nnx.eval_shape) too.
  backbone_only: `sd` is a Swin ImageNet state dict (keys without 'backbone.');
  the model keys it cannot provide (semantic layers, norm0..3, the decoder)
  keep their initialisation; bias tables are resized when the windows differ.
  """
  report = ConversionReport(source=source)
  consumed, missing, mismatched, updates = set(), [], [], {}
  torch_shapes = {}
  leaves = model_leaves(model)
  if not backbone_only:
    consumed |= _check_tied_norms(sd, leaves, report, missing, mismatched)
  for mkey, (path, var) in leaves.items():
    want = tuple(var.get_value().shape)
    torch_shapes[mkey] = names.torch_shape(path, want)
    if backbone_only:
      ckey = mkey[len("backbone."):] if mkey.startswith("backbone.") else None
      if ckey is None or _NEW_IN_SEGMENTATION.search(ckey):
        report.new.append(mkey)
        continue
    else:
      ckey = mkey
    if ckey not in sd:
      missing.append(ckey)
      continue
    consumed.add(ckey)
    value = names.to_model_layout(path, np.asarray(sd[ckey]))
    if (backbone_only and value.shape != want and value.ndim == 2
        and path[-1] == "relative_position_bias_table" and value.shape[1] == want[1]):
      value = resize_bias_table(value, (math.isqrt(want[0]) + 1) // 2)
      report.resized.append(ckey)
    if value.shape != want:
      mismatched.append(f"{ckey}: checkpoint {tuple(sd[ckey].shape)}, "
                        f"model {torch_shapes[mkey]}")
      continue
    updates[names.model_name(path)] = value
    report.used.append(ckey)
    report.loaded.append(names.model_name(path))
  skip = (_SKIP_SWIN if backbone_only else
          _SKIP_MASK2FORMER if any(k.startswith("sem_seg_head.") for k in sd) else _SKIP_SEMASK)
  unexpected = []
  for key in sd:
    if key not in consumed:
      (report.skipped if skip.search(key) else unexpected).append(key)
  if missing or unexpected or mismatched:
    model_shapes = {k: types.SimpleNamespace(shape=shape) for k, shape in torch_shapes.items()}
    hint = (f" (checkpoint: {_describe(sd, '' if backbone_only else 'backbone.')}; "
            f"model: {_describe(model_shapes, 'backbone.')})")
    _refuse(source, missing, unexpected, mismatched, hint)
  return report, updates


def load_state_dict(model: nnx.Module, sd: StateDict, *, source: str = "state dict",
                    backbone_only: bool = False) -> ConversionReport:
  """Copies a torch state dict into `model` in place (see plan_state_dict), or raises."""
  report, updates = plan_state_dict(model, sd, source=source, backbone_only=backbone_only)
  leaves = {names.model_name(p): var for p, var in model_leaves(model).values()}
  for name, value in updates.items():
    var = leaves[name]
    var[...] = jax.numpy.asarray(value, var[...].dtype)
  return report


# FaPN / MSFaPN: `align_N.offset` and `layer_N` share one GroupNorm module, stored twice in
# a checkpoint; the model has it once, as layer_N.norm (SPEC section 12).


def _check_tied_norms(sd: StateDict, leaves: Mapping[str, Any], report: ConversionReport,
                      missing: list[str], mismatched: list[str]) -> set[str]:
  """The checkpoint's second copies of the shared GroupNorms, each checked equal to the
  first (layer_N.norm.*, loaded as usual): returns the copies, consumed without loading.
  Only for models with FeatureAlign modules (`align_N.offset.weight` is a model key)."""
  consumed = set()
  for mkey in leaves:
    m = re.match(r"^(.*\.)align_(\d+)\.offset\.weight$", mkey)
    if not m:
      continue
    for leaf in ("weight", "bias"):
      alias = f"{m.group(1)}align_{m.group(2)}.offset.norm.{leaf}"
      first = f"{m.group(1)}layer_{m.group(2)}.norm.{leaf}"
      if alias not in sd:
        missing.append(alias)
        continue
      consumed.add(alias)
      if first in sd and not np.array_equal(np.asarray(sd[alias]), np.asarray(sd[first])):
        mismatched.append(f"{alias}: differs from {first} (one shared GroupNorm: the two "
                          "copies must be equal)")
      else:
        report.skipped.append(alias)
  return consumed


# Keys of a Swin ImageNet checkpoint the segmentation model does not use.
_SKIP_SWIN = re.compile(r"(relative_position_index|attn_mask|num_batches_tracked)$|^(norm|head)\.")
_SKIP_SEMASK = re.compile(r"(relative_position_index|attn_mask|num_batches_tracked)$")
# detectron2 SeMask-Mask2Former buffers: input normalisation and the criterion's class weights.
_SKIP_MASK2FORMER = re.compile(
    r"(relative_position_index|attn_mask|num_batches_tracked)$|^(pixel_mean|pixel_std|"
    r"criterion\.empty_weight)$")
# Backbone keys that a Swin ImageNet checkpoint cannot have.
_NEW_IN_SEGMENTATION = re.compile(r"semantic_layer\.|^norm\d+\.")


# ----------------------------------------------------------------------------
# Config inference from shapes.
# ----------------------------------------------------------------------------

def infer_model_config(sd: StateDict, *, source: str = "state dict"):
  """A model config matching a trained SeMask-FPN / Swin-FPN state dict's shapes."""
  get = _getter(sd, source, "SeMask-FPN (mmseg)")
  bb = _backbone_shapes(sd, get)
  num_classes, fpn_channels = get("decode_head.conv_seg.weight").shape[:2]
  cfg = default_model_config("T", int(num_classes), num_sem_blocks=bb["num_sem_blocks"])
  cfg.update(bb)
  cfg.sem_window_size = cfg.window_size
  cfg.fpn_channels = int(fpn_channels)
  cfg.use_gamma = any(k.endswith(".gamma") for k in sd) or not any(bb["num_sem_blocks"])
  cfg.sem_attention = "plain" if any(".mlp_q." in k for k in sd) else "semantic"
  return cfg


def _count(sd: StateDict, pattern: str) -> int:
  """Number of distinct indices i of keys matching `pattern` (a regex with one (\\d+))."""
  return len({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def _backbone_shapes(sd: StateDict, get) -> dict[str, Any]:
  """embed_dim, depths, num_heads, window_size and per-stage semantic blocks of backbone.*."""
  depths, heads, nsb = [], [], []
  for i in range(4):
    depth = _count(sd, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.")
    if not depth:
      raise ConversionError(f"no blocks for stage {i} (backbone.layers.{i}.blocks.*)")
    depths.append(depth)
    heads.append(int(get(f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table"
                         ).shape[1]))
    nsb.append(_count(sd, rf"backbone\.layers\.{i}\.semantic_layer\.class_injection\.(\d+)\."))
  rows = get("backbone.layers.0.blocks.0.attn.relative_position_bias_table").shape[0]
  return dict(embed_dim=int(get("backbone.patch_embed.proj.weight").shape[0]),
              depths=tuple(depths), num_heads=tuple(heads),
              window_size=(math.isqrt(rows) + 1) // 2, num_sem_blocks=tuple(nsb))


def _getter(sd: StateDict, source: str, kind: str):
  def get(key):
    if key not in sd:
      raise ConversionError(f"{source}: key {key!r} not found; is this a {kind} checkpoint?")
    return sd[key]
  return get


def _detectron2_backbone(sd: StateDict, source: str, kind: str, name: str):
  """(get, backbone shapes, class count, a config of model `name` with the backbone's
  semantic blocks and window set) of a detectron2 SeMask checkpoint: one positive
  number of semantic blocks in every stage, the classes from class_embed (K + 1)."""
  get = _getter(sd, source, f"{kind} (detectron2)")
  bb = _backbone_shapes(sd, get)
  num_classes = int(get("sem_seg_head.predictor.class_embed.weight").shape[0]) - 1
  cfg = default_model_config("T", num_classes, name=name)
  nsb = set(bb.pop("num_sem_blocks"))
  if len(nsb) != 1 or 0 in nsb:
    raise ConversionError(f"{source}: {kind} has the same positive number of semantic "
                          f"blocks in every stage, found {sorted(nsb)}")
  cfg.num_sem_blocks = nsb.pop()
  cfg.sem_window_size = released_sem_window(bb["window_size"], num_classes)
  return get, bb, num_classes, cfg


def infer_mask2former_config(sd: StateDict, *, source: str = "state dict",
                             nheads: int | None = None):
  """A SeMask-Mask2Former model config matching a detectron2 state dict's shapes: variant,
  window, class count, queries, decoder and encoder depths, widths and heads, and the
  pixel decoder (Mask2Former's, FaPN or MSFaPN, from its keys).

  FaPN has no deformable encoder, and the decoder's attention heads do not show in its
  shapes: nheads is then `nheads`, else the released configs' 8."""
  get, bb, num_classes, cfg = _detectron2_backbone(sd, source, "SeMask-Mask2Former",
                                                  SEMASK_MASK2FORMER)
  pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
  cfg.update(bb)
  cfg.mask_dim = int(get(pd + "mask_features.weight").shape[0])
  if pd + "align_3.offset.weight" in sd:
    cfg.pixel_decoder = "fapn"
  elif pd + "align_1.offset.weight" in sd:
    cfg.pixel_decoder = "msfapn"
  if cfg.pixel_decoder != "msdeformattn":
    # conv_offset_mask: 3 (dy, dx, mask) x groups x 9 taps outputs.
    cfg.deformable_groups = int(get(pd + "align_1.dcpack_L2.conv_offset_mask.weight"
                                    ).shape[0]) // 27
  if cfg.pixel_decoder == "fapn":
    cfg.conv_dim = int(get(pd + "layer_4.weight").shape[0])
    cfg.nheads = nheads or cfg.nheads
  else:
    cfg.conv_dim = int(get(pd + "input_proj.0.0.weight").shape[0])
    # sampling_offsets: heads x 3 levels x 4 points x 2 coordinates outputs.
    cfg.nheads = int(get(pd + "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"
                         ).shape[0]) // 24
    cfg.enc_layers = _count(sd, rf"{re.escape(pd)}transformer\.encoder\.layers\.(\d+)\.")
    cfg.enc_dim_feedforward = int(
        get(pd + "transformer.encoder.layers.0.linear1.weight").shape[0])
  cfg.hidden_dim = int(get(pr + "query_feat.weight").shape[1])
  cfg.num_queries = int(get(pr + "query_feat.weight").shape[0])
  cfg.dim_feedforward = int(get(pr + "transformer_ffn_layers.0.linear1.weight").shape[0])
  cfg.dec_layers = _count(sd, rf"{re.escape(pr)}transformer_self_attention_layers\.(\d+)\.")
  cfg.use_gamma = any(k.endswith(".gamma") for k in sd)
  cfg.sem_attention = "plain" if any(".mlp_q." in k for k in sd) else "semantic"
  return cfg


def infer_maskformer_config(sd: StateDict, *, source: str = "state dict"):
  """A SeMask-MaskFormer model config matching a detectron2 state dict's shapes: variant,
  window, class count, queries, decoder depth and widths (SPEC section 11). Not in the
  shapes: the decoder's attention heads (the reference's 8) and the semantic window
  (released_sem_window)."""
  get, bb, num_classes, cfg = _detectron2_backbone(sd, source, "SeMask-MaskFormer",
                                                  SEMASK_MASKFORMER)
  pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
  dec = pr + "transformer.decoder.layers."
  if any(k.startswith(pr + "transformer.encoder.") for k in sd):
    raise ConversionError(f"{source}: a TransformerPredictor with encoder layers "
                          "(transformer.encoder.*) is not supported (the SeMask configs use 0)")
  cfg.update(bb)
  cfg.conv_dim = int(get(pd + "layer_4.weight").shape[0])
  cfg.mask_dim = int(get(pd + "mask_features.weight").shape[0])
  cfg.hidden_dim = int(get(pr + "query_embed.weight").shape[1])
  cfg.num_queries = int(get(pr + "query_embed.weight").shape[0])
  cfg.dim_feedforward = int(get(dec + "0.linear1.weight").shape[0])
  cfg.dec_layers = _count(sd, rf"{re.escape(dec)}(\d+)\.")
  # in_channels == hidden_dim with an input_proj in the checkpoint: ENFORCE_INPUT_PROJ.
  cfg.enforce_input_proj = (pr + "input_proj.weight" in sd
                            and bb["embed_dim"] * 8 == cfg.hidden_dim)
  cfg.use_gamma = any(k.endswith(".gamma") for k in sd)
  cfg.sem_attention = "plain" if any(".mlp_q." in k for k in sd) else "semantic"
  return cfg


# ----------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------

def _convert_trained(sd_or_path, config, infer, allow_pickle: bool, seed: int) -> Conversion:
  """A trained checkpoint -> Conversion; the config read by `infer` from the shapes if None."""
  sd, source = _load(sd_or_path, allow_pickle)
  if config is None:
    config = infer(sd, source=source)
  model = build_model(config, rngs=nnx.Rngs(seed))
  report = load_state_dict(model, sd, source=source)
  return Conversion(model, config, report)


def convert_semask(sd_or_path, config=None, *, allow_pickle: bool = False,
                   seed: int = 0) -> Conversion:
  """A trained SeMask-FPN / Swin-FPN checkpoint (.pth path or state dict) -> Conversion.

  With config=None the model config is read from the shapes; a given config
  must fit the checkpoint exactly.
  """
  return _convert_trained(sd_or_path, config, infer_model_config, allow_pickle, seed)


def convert_semask_mask2former(sd_or_path, config=None, *, allow_pickle: bool = False,
                               seed: int = 0, nheads: int | None = None) -> Conversion:
  """A released SeMask-Mask2Former / FaPN / MSFaPN-Mask2Former checkpoint ({'model':
  state_dict}, .pth path or state dict) -> Conversion. With config=None the config is
  read from the shapes (`nheads`: FaPN's attention heads, which its shapes do not show).
  FaPN's two copies of each shared GroupNorm must be equal."""
  infer = functools.partial(infer_mask2former_config, nheads=nheads)
  return _convert_trained(sd_or_path, config, infer, allow_pickle, seed)


def convert_semask_maskformer(sd_or_path, config=None, *, allow_pickle: bool = False,
                              seed: int = 0) -> Conversion:
  """A released SeMask-MaskFormer checkpoint ({'model': state_dict}, .pth path or state
  dict) -> Conversion. With config=None the config is read from the shapes; the number
  of attention heads is not in the shapes: nheads stays the reference's 8 (pass a
  config for another)."""
  return _convert_trained(sd_or_path, config, infer_maskformer_config, allow_pickle, seed)


HEAD_FAMILIES = ("fpn", "mask2former", "fapn_mask2former", "msfapn_mask2former", "maskformer")


def head_family(sd: StateDict, source: str = "state dict") -> str:
  """Which head a trained SeMask checkpoint belongs to (HEAD_FAMILIES), from its keys:
  mmseg's decode_head.conv_seg (FPN); detectron2's predictor.query_feat (the Mask2Former
  family, the pixel decoder telling FaPN's align_3 and MSFaPN's align_1 apart) or, with
  no query_feat, predictor.query_embed (MaskFormer's DETR decoder)."""
  pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
  if "decode_head.conv_seg.weight" in sd:
    return "fpn"
  if pr + "query_feat.weight" in sd:
    if pd + "align_3.offset.weight" in sd:
      return "fapn_mask2former"
    return "msfapn_mask2former" if pd + "align_1.offset.weight" in sd else "mask2former"
  if pr + "query_embed.weight" in sd:
    return "maskformer"
  raise ConversionError(
      f"{source}: not a trained SeMask checkpoint: no decode_head.conv_seg.weight (SeMask-FPN), "
      f"{pr}query_feat.weight (the Mask2Former family) or {pr}query_embed.weight "
      f"(MaskFormer); for Swin ImageNet weights use the swin_imagenet command. First keys: "
      f"{sorted(sd)[:4]}")


def convert_semask_checkpoint(sd_or_path, *, allow_pickle: bool = False, seed: int = 0,
                              nheads: int | None = None) -> tuple[str, Conversion]:
  """Any trained SeMask checkpoint -> (its head family, Conversion): the head from the
  keys (head_family), the model config from the shapes; `nheads` sets the decoder's
  attention heads where the shapes do not show them (FaPN, MaskFormer; default 8)."""
  sd, source = _load(sd_or_path, allow_pickle)
  family = head_family(sd, source)
  if family == "fpn":
    return family, convert_semask(sd, infer_model_config(sd, source=source), seed=seed)
  if family == "maskformer":
    config = infer_maskformer_config(sd, source=source)
    if nheads is not None:
      config.nheads = nheads
    return family, convert_semask_maskformer(sd, config, seed=seed)
  config = infer_mask2former_config(sd, source=source, nheads=nheads)
  return family, convert_semask_mask2former(sd, config, seed=seed)


def convert_swin_imagenet(sd_or_path, config, *, allow_pickle: bool = False,
                          seed: int = 0) -> Conversion:
  """A Swin ImageNet checkpoint -> the backbone of a model `config` (SeMask-FPN, Swin-FPN
  or SeMask-Mask2Former)."""
  sd, source = _load(sd_or_path, allow_pickle)
  model = build_model(config, rngs=nnx.Rngs(seed))
  report = load_state_dict(model, sd, source=source, backbone_only=True)
  return Conversion(model, config, report)
