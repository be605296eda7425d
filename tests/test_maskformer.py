"""SeMask-MaskFormer beyond the golden vectors: the backbone rule, the recipe configs,
detectron2's initialisation of the new modules, a non-square / other-class-count model
with its loss and gradients, and the training step on 1 and 8 devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ade20k_semask_maskformer, demo_maskformer
from semask_jax.losses import maskformer as mfl
from semask_jax.train import state as state_lib
from semask_jax.models import (SEMASK_MASKFORMER, ModelConfig, SeMaskMaskFormer, build_model,
                               default_model_config, reference_sem_global)
from semask_jax.models.resize import resize_nearest
from tests import agreement
from tests.param_masks import masks_by_name


@pytest.mark.parametrize("classes", [150, 19, 171])
def test_semantic_attention_rule(classes):
  """MaskFormer: global semantic attention in stage 3 for every class count (SPEC 11)."""
  for embed in (96, 128, 192):
    assert reference_sem_global(embed, classes, 4, SEMASK_MASKFORMER) == (False,) * 3 + (True,)
  m = ModelConfig.from_config(default_model_config("B", classes, num_sem_blocks=1,
                                                   name=SEMASK_MASKFORMER))
  assert m.backbone.sem_global == (False, False, False, True)
  assert m.backbone.num_sem_blocks == (1, 1, 1, 1)


def test_parameter_count_of_semask_l():
  """SPEC 11: SeMask-L MaskFormer for ADE20K has 218,719,231 parameters (backbone
  202.3M, head 16.4M)."""
  cfg = default_model_config("L", 150, num_sem_blocks=1, name=SEMASK_MASKFORMER)
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))  # shapes only
  count = lambda m: sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert count(model) == 218_719_231
  assert count(model.backbone) == 202_344_808


def test_resize_nearest_is_torch_nearest():
  import torch
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  for size in ((10, 14), (20, 28), (8, 9), (3, 4)):
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                           mode="nearest").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(x), size)), want)


def test_recipe():
  c = ade20k_semask_maskformer.get_config("L")
  m = ModelConfig.from_config(c.model)
  assert m.name == SEMASK_MASKFORMER and m.num_classes == 150
  assert (m.backbone.embed_dim, m.backbone.window_size, m.backbone.sem_window_size) == (192, 12, 12)
  assert (m.head.num_queries, m.head.dec_layers, m.head.enc_layers, m.head.dim_feedforward,
          m.head.hidden_dim, m.head.nheads, m.head.dec_dropout) == (100, 6, 0, 2048, 256, 8, 0.1)
  o = c.optimizer
  assert (o.learning_rate, o.weight_decay, o.backbone_lr_mult, o.poly_power) == (6e-5, 0.01, 1.0, 0.9)
  assert (o.warmup_steps, o.warmup_ratio, o.grad_clip_norm, c.batch_size) == (1500, 1e-6, 0.01, 16)
  assert c.init_from.endswith("swin_large_patch4_window12_384_22k")
  assert tuple(c.data.short_edge_choices) == (160, 320, 480, 640, 800, 960, 1120)
  assert (tuple(c.data.crop_size), c.data.max_size, c.data.size_divisibility) == ((640, 640), 2560, 640)
  assert (c.data.test_short_edge, c.data.test_max_size, c.data.test_aug_max_size) == (640, 2560, 4480)
  assert c.data.recipe == "detectron2" and c.data.cat_max_ratio == 1.0
  l = c.loss
  assert (l.class_weight, l.mask_weight, l.dice_weight, l.cate_weight, l.no_object_weight) == (
      1.0, 20.0, 1.0, 0.4, 0.1)
  assert c.total_steps == 160_000
  t = ade20k_semask_maskformer.get_config("T")  # derived: the 512-crop scaling
  assert tuple(t.data.crop_size) == (512, 512) and t.data.short_edge_choices[-1] == 896
  assert "T" not in ade20k_semask_maskformer.OFFICIAL_VARIANTS


def test_no_decay_mask():
  decay, _ = masks_by_name(ade20k_semask_maskformer.get_config("T"))
  pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
  dec = pr + "transformer.decoder."
  for name in (pd + "adapter_1.norm.scale", pd + "layer_4.norm.bias", dec + "norm.scale",
               dec + "layers.0.norm3.bias", pr + "query_embed.embedding",
               "backbone.layers.0.blocks.0.attn.relative_position_bias_table"):
    assert not decay[name], name
  for name in (pd + "layer_4.kernel", pd + "mask_features.bias", dec + "layers.0.linear1.kernel",
               dec + "layers.0.self_attn.in_proj_weight", pr + "input_proj.kernel",
               pr + "class_embed.kernel",
               "backbone.layers.3.semantic_layer.class_injection.0.gamma"):
    assert decay[name], name


def test_detectron2_initialisation():
  """SPEC 13 for the new modules: c2_xavier_fill convs with zero bias, xavier in_proj /
  out_proj / FFN matrices, zero attention biases, N(0, 1) query_embed, GroupNorm 1 / 0."""
  c = default_model_config("T", 150, num_sem_blocks=1, name=SEMASK_MASKFORMER)
  c.depths = (1, 1, 1, 1)
  model = build_model(c, rngs=nnx.Rngs(0))
  pd, pr = model.sem_seg_head.pixel_decoder, model.sem_seg_head.predictor
  def bound(x, b):
    x = np.asarray(x[...])
    assert np.abs(x).max() <= b and np.abs(x).max() > 0.9 * b, (np.abs(x).max(), b)
  bound(pd.layer_4.kernel, np.sqrt(3 / (768 * 9)))
  bound(pd.adapter_1.kernel, np.sqrt(3 / 96))
  bound(pd.mask_features.kernel, np.sqrt(3 / (256 * 9)))
  assert not np.asarray(pd.mask_features.bias[...]).any()
  np.testing.assert_array_equal(np.asarray(pd.layer_2.norm.scale[...]), 1)
  bound(pr.input_proj.kernel, np.sqrt(3 / 768))
  assert not np.asarray(pr.input_proj.bias[...]).any()
  layer = pr.transformer.decoder.layers[0]
  bound(layer.self_attn.in_proj_weight, np.sqrt(6 / (256 + 768)))
  bound(layer.multihead_attn.out_proj.kernel, np.sqrt(6 / 512))
  bound(layer.linear1.kernel, np.sqrt(6 / (256 + 2048)))
  bound(layer.linear1.bias, 1 / 16)
  assert not np.asarray(layer.self_attn.in_proj_bias[...]).any()
  assert not np.asarray(layer.multihead_attn.out_proj.bias[...]).any()
  q = np.asarray(pr.query_embed.embedding[...])
  assert q.shape == (100, 256) and abs(q.std() - 1) < 0.02
  bound(pr.class_embed.kernel, 1 / 16)


def _small_config(classes: int = 19):
  c = default_model_config("T", classes, num_sem_blocks=2, name=SEMASK_MASKFORMER)
  c.update(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=3,
           sem_window_size=2, conv_dim=32, mask_dim=24, hidden_dim=16, nheads=2,
           num_queries=6, dim_feedforward=32, dec_layers=2)
  return c


def test_non_square_model_loss_and_gradients():
  """Another class count, window, num_sem_blocks, mask_dim and a non-square input: the
  shapes, a finite loss with gradients reaching every head, and dropout only in training."""
  c = _small_config()
  model = build_model(c, rngs=nnx.Rngs(1))
  assert isinstance(model, SeMaskMaskFormer)
  b, h, w = 2, 64, 96
  images = jax.random.normal(jax.random.key(0), (b, h, w, 3))
  label = jax.random.randint(jax.random.key(1), (b, h, w), 0, 4)
  label = label.at[:, :8].set(255).at[1, :, :40].set(18)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  cfg = mfl.MaskFormerCriterionConfig(num_classes=19, max_targets=8, slot_chunk=3)

  @jax.jit
  def loss_fn(params, rng):
    out = nnx.merge(graphdef, params, rest)(images, train=True, rng=rng)
    total, aux = mfl.set_criterion(out, label, cfg)
    return total, (aux, out["pred_masks"].shape, out["sem_pred"].shape)

  (total, (aux, mshape, sshape)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, jax.random.key(2))
  assert mshape == (2, b, 6, h // 4, w // 4) and sshape == (b, h, w, 19)
  assert np.isfinite(float(total)) and float(aux["num_masks"]) == 9
  assert (np.asarray(aux["matches"])[:, 0, :4] >= 0).all()
  flat = dict(nnx.to_flat_state(grads))
  for name in (("sem_seg_head", "pixel_decoder", "layer_4", "kernel"),
               ("sem_seg_head", "predictor", "query_embed", "embedding"),
               # (layer 0's self-attention reads tgt = 0: only its value bias learns)
               ("sem_seg_head", "predictor", "transformer", "decoder", "layers", 1,
                "self_attn", "in_proj_weight"),
               ("sem_seg_head", "predictor", "transformer", "decoder", "layers", 0,
                "multihead_attn", "in_proj_weight"),
               ("sem_seg_head", "predictor", "class_embed", "kernel")):
    g = np.asarray(flat[name][...])
    assert np.isfinite(g).all() and np.abs(g).max() > 0, name
  fwd = jax.jit(lambda p, r: nnx.merge(graphdef, p, rest)(images, train=True, rng=r)["decoder_hs"])
  d1, d2 = fwd(params, jax.random.key(3)), fwd(params, jax.random.key(4))
  assert np.abs(np.asarray(d1) - np.asarray(d2)).max() > 1e-3  # dropout and drop path
  out = jax.jit(lambda p: nnx.merge(graphdef, p, rest)(images))(params)
  assert out["sem_seg"].shape == (b, h, w, 19)


def tiny_config():
  c = agreement.tiny_mask_config(demo_maskformer.get_config())
  c.model.dec_layers = 2  # two matched predictions (deep supervision)
  return c


def test_maskformer_step_one_and_eight_devices_agree():
  config = tiny_config()
  model = state_lib.create_model(config)
  # num_masks over the whole global batch; the loss terms and grad_norm within 1e-5.
  (s1, _), (s8, _) = agreement.mask_step_on_one_and_all_devices(config, model)
  # As in test_train_mask2former: Adam's first step moves rounding-level gradients by up
  # to lr; everything else agrees to 1e-6.
  agreement.assert_params_mostly_agree(s8.params, s1.params, config.optimizer.learning_rate)
  assert agreement.largest_move(s1.params, model) > 1e-5  # the update did something
