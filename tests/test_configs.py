"""The experiment configs carry the reference recipes (SPEC sections 6 and 10)."""
import pytest

from configs import (ade20k_semask_mask2former, cityscapes_semask_mask2former, common,
                     swin_fpn)
from semask_jax.models import ModelConfig
from tests.param_masks import masks_by_name


@pytest.mark.parametrize("dataset", ["ade20k", "cityscapes", "coco_stuff10k"])
@pytest.mark.parametrize("variant", ["T", "S", "B", "L"])
def test_semask_fpn_data_recipe(dataset, variant):
  c = common.semask_fpn_config(dataset, variant)
  crop = {"cityscapes": (768, 768)}.get(dataset, (640, 640) if variant == "L" else (512, 512))
  assert tuple(c.data.crop_size) == crop
  scale = {"cityscapes": (2048, 1024)}.get(dataset, (2560, 640) if variant == "L" else (2048, 512))
  assert tuple(c.data.img_scale) == tuple(c.data.test_scale) == scale
  # cat_max_ratio 0.75 only for ADE20K T and Cityscapes.
  want = 0.75 if dataset == "cityscapes" or (dataset == "ade20k" and variant == "T") else 1.0
  assert c.data.cat_max_ratio == want
  if dataset == "cityscapes":
    assert c.data.ratio_list is None and tuple(c.data.ratio_range) == (0.5, 2.0)
  else:
    assert tuple(c.data.ratio_list) == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@pytest.mark.parametrize("dataset", ["ade20k", "cityscapes", "coco_stuff10k"])
def test_swin_fpn_baselines_use_the_swin_data_recipe(dataset):
  c = swin_fpn.get_config(f"{dataset},S")
  assert c.data.ratio_list is None and tuple(c.data.ratio_range) == (0.5, 2.0)
  assert c.data.cat_max_ratio == 0.75
  assert set(c.model.num_sem_blocks) == {0}


@pytest.mark.parametrize("module,classes,global_stage3", [
    (ade20k_semask_mask2former, 150, True), (cityscapes_semask_mask2former, 19, False)])
def test_mask2former_recipe(module, classes, global_stage3):
  for variant in "TSBL":
    c = module.get_config(variant)
    m = ModelConfig.from_config(c.model)
    assert m.name == "semask_mask2former" and m.num_classes == classes
    # Global semantic attention only in the last stage and only for 150 classes (SPEC 10).
    assert m.backbone.sem_global == (False, False, False, global_stage3)
    assert m.backbone.num_sem_blocks == (1, 1, 1, 1)
    assert (m.head.num_queries, m.head.dec_layers, m.head.enc_dim_feedforward) == (100, 9, 1024)
    o = c.optimizer
    assert (o.learning_rate, o.weight_decay, o.poly_power, o.warmup_steps) == (1e-4, 0.05, 0.9, 0)
    assert (o.backbone_lr_mult, o.grad_clip_norm, c.batch_size) == (0.1, 0.01, 16)
    # SEM_WINDOW_SIZE: the ADE20K yamls set the Swin window; the Cityscapes ones keep
    # detectron2's default 7 (L's Swin window is 12).
    want = c.model.window_size if classes == 150 else 7
    assert m.backbone.sem_window_size == want, (variant, m.backbone.sem_window_size)
  assert cityscapes_semask_mask2former.get_config("L").model.window_size == 12
  assert ade20k_semask_mask2former.get_config("L").data.crop_size == (640, 640)
  assert ade20k_semask_mask2former.get_config("T").total_steps == 160_000


def test_mask2former_no_decay_and_backbone_masks():
  """detectron2's rule: no decay for norms (GroupNorm at input_proj.<l>.1 too), the decoder's
  embeddings and the Swin bias tables; the pixel decoder's bare level_embed decays."""
  decay, backbone = masks_by_name(ade20k_semask_mask2former.get_config("T"))
  pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
  assert not decay[pd + "input_proj.0.1.scale"] and not decay[pd + "adapter_1.norm.bias"]
  assert decay[pd + "input_proj.0.0.kernel"] and decay[pd + "transformer.level_embed"]
  for name in ("query_feat.embedding", "query_embed.embedding", "level_embed.embedding",
               "decoder_norm.scale"):
    assert not decay[pr + name], name
  assert decay[pr + "class_embed.kernel"]
  assert not decay["backbone.layers.0.blocks.0.attn.relative_position_bias_table"]
  assert not decay["backbone.layers.0.semantic_layer.norm1.scale"]
  assert backbone["backbone.patch_embed.proj.kernel"] and not backbone[pd + "mask_features.kernel"]


def test_ignore_index_comes_from_the_data_config():
  """One source for the label value of unlabelled pixels: config.data.ignore_index reaches
  the crop, the label padding of train and eval batches (and, in train.py / evaluate.py,
  the loss and the metrics)."""
  from input_pipeline import transforms as T
  cfg = common.default_data_config("synthetic")
  cfg.ignore_index = 254
  ops = T.train_transforms(cfg)
  crop = next(op for op in ops if isinstance(op, T.RandomCrop))
  assert crop.ignore_index == 254 and ops[-1].ignore_index == 254
  assert T.eval_transform(cfg, (80, 96), (80, 96)).ignore_index == 254
  d2 = ade20k_semask_mask2former.get_config("T").data
  d2.ignore_index = 254
  assert T.train_transforms(d2)[-1].ignore_index == 254


def test_keys_the_code_reads_are_declared():
  """A locked config (as main.py's flags hold it) takes every key the code reads."""
  c = common.base_config()
  c.lock()
  c.eval.precompile = False
  c.eval.size_divisibility = 32
  c.demo_predictions = 2
  assert c.eval.size_divisibility == 32 and common.base_config().eval.size_divisibility is None
  assert common.base_config().eval.precompile is True


def _config_get_defaults():
  """(file, receiver, key, default) of every `<...config/cfg...>.get('key', <literal>)` in
  semask_jax and main.py."""
  import ast
  import pathlib
  root = pathlib.Path(__file__).resolve().parent.parent
  out = []
  for path in sorted(root.glob("semask_jax/**/*.py")) + [root / "main.py"]:
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "get" and len(node.args) == 2
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        receiver = ast.unparse(node.func.value)
        if "config" in receiver or "cfg" in receiver:
          try:
            default = ast.literal_eval(node.args[1])
          except ValueError:
            continue
          out.append((path.name, receiver, node.args[0].value, default))
  return out


def test_one_default_per_key():
  """A `.get(key, default)` fallback in the code never disagrees with base_config's value."""
  values = {}

  def walk(d):
    for k, v in d.items():
      if hasattr(v, "items"):
        walk(v)
      else:
        values.setdefault(k, []).append(v)

  walk(common.base_config())
  disagree = [f"{f}: {r}.get({k!r}, {d!r}) but base_config has {values[k]}"
              for f, r, k, d in _config_get_defaults() if k in values and d not in values[k]]
  assert not disagree, "\n".join(disagree)
