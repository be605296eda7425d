"""The PyTorch checkpoint converter: key coverage, layouts, bias-table resize, refusals, I/O."""
import json
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from convert_weights import (ConversionError, convert_semask, convert_swin_imagenet,
                             load_into_model, model_leaves, plan_state_dict, resize_bias_table,
                             save_conversion)
from convert_weights import names
from convert_weights.__main__ import main as cli_main
from semask_jax.models import build_model, default_model_config, model_config_from_dict
from tests.golden_utils import GOLDEN_DIR, golden_files, load_vector

KEYS_JSON = GOLDEN_DIR / "swin_imagenet_checkpoint_keys.json"
VARIANT_OF = {"swin_tiny_patch4_window7_224": "T", "swin_small_patch4_window7_224": "S",
              "swin_base_patch4_window12_384_22k": "B", "swin_large_patch4_window12_384_22k": "L"}


def _swin_keys():
  return json.loads(KEYS_JSON.read_text())


def _fake_state_dict(keys):
  """Each tensor filled with a distinct constant (its position), so a mix-up shows."""
  return {k: np.full(shape, i + 1, np.int64 if dtype.startswith("int") else np.float32)
          for i, (k, shape, dtype) in enumerate(keys)}


@pytest.mark.parametrize("head", ["semask_fpn", "semask_mask2former", "semask_maskformer"])
@pytest.mark.parametrize("name", list(VARIANT_OF))
def test_swin_imagenet_key_lists_are_covered(name, head):
  entry = _swin_keys()[name]
  sd = _fake_state_dict(entry["keys"])
  cfg = default_model_config(VARIANT_OF[name], num_classes=19, name=head)
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))  # shapes only: fast
  r, updates = plan_state_dict(model, sd, backbone_only=True)
  skipped = {k for k in sd if k.endswith(("relative_position_index", "attn_mask"))
             or k.startswith(("norm.", "head."))}
  assert set(r.skipped) == skipped
  assert set(r.used) == set(sd) - skipped
  assert not r.resized
  assert all(k.startswith(("decode_head.", "sem_seg_head.")) or ".semantic_layer." in k
             or k.split(".")[1].startswith("norm") and k.split(".")[1][4:].isdigit()
             for k in r.new)
  assert any(".semantic_layer." in k for k in r.new) and "backbone.norm3.weight" in r.new
  leaves = model_leaves(model)
  for i, (k, _, _) in enumerate(entry["keys"]):
    if k in r.used:
      path, var = leaves["backbone." + k]
      value = updates[".".join(map(str, path))]
      assert value.shape == var.get_value().shape and (value == i + 1).all(), k


def test_bias_table_resize_matches_torch():
  rng = np.random.default_rng(0)
  for rows, heads, new_window in [(169, 3, 12), (529, 4, 7), (169, 2, 9)]:
    table = rng.normal(size=(rows, heads)).astype(np.float32)
    n = int(np.sqrt(rows))
    m = 2 * new_window - 1
    ref = F.interpolate(torch.from_numpy(table).permute(1, 0).reshape(1, heads, n, n),
                        size=(m, m), mode="bicubic", align_corners=False)
    ref = ref.reshape(heads, m * m).permute(1, 0).numpy()
    np.testing.assert_allclose(resize_bias_table(table, new_window), ref, rtol=1e-5, atol=1e-5)


def test_window_change_resizes_every_bias_table():
  entry = _swin_keys()["swin_tiny_patch4_window7_224"]
  sd = {k: np.random.default_rng(i).normal(size=shape).astype(np.float32)
        for i, (k, shape, dtype) in enumerate(entry["keys"]) if dtype == "float32"}
  cfg = default_model_config("T", num_classes=19)
  cfg.window_size = cfg.sem_window_size = 12
  cfg.fpn_channels = 16
  conv = convert_swin_imagenet(sd, cfg)
  tables = [k for k in sd if k.endswith("relative_position_bias_table")]
  assert sorted(conv.report.resized) == sorted(tables)
  leaves = model_leaves(conv.model)
  k = tables[3]
  np.testing.assert_allclose(np.asarray(leaves["backbone." + k][1][...]),
                             resize_bias_table(sd[k], 12), rtol=1e-6)


def test_other_variant_is_refused_with_the_keys():
  keys = _swin_keys()
  cfg = default_model_config("T", num_classes=19)
  with pytest.raises(ConversionError) as e:  # Swin-S: deeper stage 2
    convert_swin_imagenet(_fake_state_dict(keys["swin_small_patch4_window7_224"]["keys"]), cfg)
  assert "unexpected keys" in str(e.value) and "layers.2.blocks.6.attn.qkv.weight" in str(e.value)
  with pytest.raises(ConversionError) as e:  # Swin-B: wider
    convert_swin_imagenet(_fake_state_dict(keys["swin_base_patch4_window12_384_22k"]["keys"]), cfg)
  assert "mis-shaped keys" in str(e.value)
  assert "checkpoint: embed 128, depths (2, 2, 18, 2), window 12" in str(e.value)
  assert "model: embed 96, depths (2, 2, 6, 2), window 7" in str(e.value)


def _city():
  path = [p for p in golden_files() if "city" in p.stem] or golden_files()
  vec, meta, sd = load_vector(path[0])
  return vec, meta, sd


def test_trained_checkpoint_of_other_class_count_or_missing_key_is_refused():
  _, meta, sd = _city()
  cfg = model_config_from_dict(meta["config"])
  cfg.num_classes = cfg.num_classes + 1
  with pytest.raises(ConversionError) as e:
    convert_semask(sd, cfg)
  assert "decode_head.conv_seg.weight" in str(e.value)
  broken = dict(sd)
  del broken["backbone.norm2.weight"]
  broken["backbone.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as e:
    convert_semask(broken, model_config_from_dict(meta["config"]))
  assert "missing keys (1)" in str(e.value) and "backbone.norm2.weight" in str(e.value)
  assert "unexpected keys (1)" in str(e.value) and "backbone.extra.weight" in str(e.value)


def test_batchnorm_statistics_are_imported():
  _, meta, sd = _city()
  conv = convert_semask(sd, model_config_from_dict(meta["config"]))
  bn = conv.model.decode_head.scale_heads[3][2].bn  # torch scale_heads.3.2.bn
  np.testing.assert_array_equal(np.asarray(bn.mean[...]),
                                sd["decode_head.scale_heads.3.2.bn.running_mean"])
  np.testing.assert_array_equal(np.asarray(bn.var[...]),
                                sd["decode_head.scale_heads.3.2.bn.running_var"])
  qkv = conv.model.backbone.layers[1].blocks[0].attn.qkv.kernel[...]
  np.testing.assert_array_equal(np.asarray(qkv),
                                sd["backbone.layers.1.blocks.0.attn.qkv.weight"].T)


def test_cli_and_orbax_round_trip(tmp_path):
  _, meta, sd = _city()
  pth = tmp_path / "trained.pth"
  torch.save({"meta": {}, "state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, pth)
  out = tmp_path / "converted"
  assert cli_main(["semask", "--pth", str(pth), "--out", str(out)]) == 0
  assert cli_main(["semask", "--pth", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "x")]) == 2
  cfg = model_config_from_dict(meta["config"])
  model = build_model(cfg, rngs=nnx.Rngs(123))  # a different init, then overwritten
  meta_out = load_into_model(model, out)
  assert meta_out["model_config"]["num_classes"] == cfg.num_classes
  leaves = model_leaves(model)
  for k, v in sd.items():
    if k in leaves:
      path, var = leaves[k]
      np.testing.assert_array_equal(names.to_torch_layout(path, np.asarray(var[...])), v, k)


def test_swin_conversion_loads_only_the_backbone_into_another_head(tmp_path):
  entry = _swin_keys()["swin_tiny_patch4_window7_224"]
  sd = _fake_state_dict(entry["keys"])
  cfg = default_model_config("T", num_classes=19)
  cfg.fpn_channels = 16
  out = save_conversion(convert_swin_imagenet(sd, cfg), tmp_path / "swin_t")
  cfg2 = default_model_config("T", num_classes=5)  # another class count: decoder not loaded
  cfg2.fpn_channels = 16
  model = build_model(cfg2, rngs=nnx.Rngs(0))
  seg_before = np.asarray(model.decode_head.conv_seg.kernel[...])
  load_into_model(model, out)
  np.testing.assert_array_equal(np.asarray(model.decode_head.conv_seg.kernel[...]), seg_before)
  assert (np.asarray(model.backbone.patch_embed.proj.kernel[...]) == 1).all()
  with pytest.raises(FileExistsError):
    save_conversion(convert_swin_imagenet(sd, cfg), out)
  with pytest.raises(FileNotFoundError, match="conversion.json"):
    load_into_model(model, pathlib.Path(tmp_path))


@pytest.mark.parametrize("num_classes,want", [(150, 12), (19, 7)])
def test_mask2former_semantic_window_follows_the_released_yamls(num_classes, want):
  """The semantic window is not in the shapes: 150 classes (ADE20K) take the Swin window,
  other class counts (Cityscapes) detectron2's default SEM_WINDOW_SIZE of 7."""
  from convert_weights import infer_mask2former_config  # pylint: disable=g-import-not-at-top
  cfg = default_model_config("T", num_classes, num_sem_blocks=1, name="semask_mask2former")
  cfg.update(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=12,
             sem_window_size=12, conv_dim=32, mask_dim=32, hidden_dim=32, dim_feedforward=64,
             enc_layers=1, enc_dim_feedforward=64, dec_layers=1, num_queries=4, nheads=2)
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  sd = {names.torch_key(p): np.zeros(names.to_torch_layout(p, np.zeros(v.shape)).shape,
                                      np.float32)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  inferred = infer_mask2former_config(sd)
  assert inferred.window_size == 12 and inferred.sem_window_size == want
