r"""SeMask-MaskFormer on ADE20K (150 classes): the paper's SeMask-L MaskFormer (54.75 /
56.15 mIoU).

Official recipe for L (SPEC section 11; maskformer_semask_swin_large_IN21k_384_bs16_160k_
res640): AdamW 6e-5 (betas 0.9 / 0.999), weight decay 0.01 (none for norms, the
query_embed table and the position tables), backbone lr multiplier 1.0, poly 0.9 with
a 1500-iteration linear warm-up from factor 1e-6, gradient clipping at global norm
0.01, batch 16, 160k iterations, float32; IN-22k Swin-L weights
(swin_large_patch4_window12_384_22k); short side a uniform choice of 160..1120
(int(0.25 x 640 x), x = 1..7), max 2560, crop 640, ColorAugSSD, flip, pad to 640;
test short side 640, max 2560; TTA short sides 320..1120 (max 4480) and flip.
Criterion: class 1, focal 20, dice 1, cate 0.4, no-object 0.1.

T, S and B are DERIVED (the official code has no SeMask-MaskFormer T/S/B): the L
recipe scaled to a 512 crop as the Mask2Former T/S/B configs are (short sides
int(0.25 x 512 x) = 128..896, max 2048, pad to 512, test 512 / 2048, TTA max 3584),
with each variant's ImageNet weights.

  python main.py --config=configs/ade20k_semask_maskformer.py:L \
      --workdir=runs/ade20k_semask_mf_l --config.data.data_dir=$TFDS_DATA_DIR
  # multi-scale + flip evaluation:
  python main.py --config=configs/ade20k_semask_maskformer.py:L \
      --workdir=runs/ade20k_semask_mf_l --mode=eval \
      --config.eval.scales=0.5,0.75,1.0,1.25,1.5,1.75 --config.eval.flip=True
"""
from __future__ import annotations

import ml_collections

from configs import common
from input_pipeline import default_data_config
from input_pipeline.config import use_detectron2_recipe
from semask_jax.models import SEMASK_MASKFORMER, default_model_config

# Variants with an official SeMask-MaskFormer config; the others are derived (see above).
OFFICIAL_VARIANTS = ('L',)
# detectron2 build_optimizer: no decay for every GroupNorm / LayerNorm, nn.Embedding
# (query_embed) and the Swin position tables; the semantic gamma and biases keep it.
MASKFORMER_NO_DECAY_KEYS = ('absolute_pos_embed', 'relative_position_bias_table', 'norm',
                            'predictor.query_embed')
# MaskFormer's INPUT settings per crop: short sides int(0.25 * base * x), x = 1..7, and
# the Mask2Former-style max / test / TTA sizes of that crop (common.MASK2FORMER_INPUT).
MASKFORMER_INPUT = {
    640: dict(base=640, max_size=2560, size_divisibility=640, test_short_edge=640,
              test_max_size=2560, test_aug_max_size=4480),
    512: dict(base=512, max_size=2048, size_divisibility=512, test_short_edge=512,
              test_max_size=2048, test_aug_max_size=3584),
}


def maskformer_short_edges(base: int) -> tuple[int, ...]:
  """MaskFormer SeMask configs' MIN_SIZE_TRAIN: [int(x * 0.25 * base) for x in 1..7]
  (160..1120 for 640), not Mask2Former's 0.5x..2x list."""
  return tuple(int(x * 0.25 * base) for x in range(1, 8))


def maskformer_loss_config() -> ml_collections.ConfigDict:
  """SeMaskSetCriterion (MaskFormer) settings (SPEC 11): no point sampling (full-resolution
  focal / dice over the slots)."""
  return common.set_criterion_loss_config(1.0, 20.0, 1.0)


def semask_maskformer_config(variant: str) -> ml_collections.ConfigDict:
  """SeMask-MaskFormer with the official ADE20K recipe (L) or its 512-crop derivation."""
  c = common.base_config()
  c.data = default_data_config('ade20k')
  c.model = default_model_config(variant, c.data.num_classes, num_sem_blocks=1,
                                 name=SEMASK_MASKFORMER)
  c.init_from = common.PRETRAINED[variant]  # L: the IN-22k swin_large_patch4_window12_384_22k
  c.batch_size = 16
  c.total_steps = 160_000
  c.checkpoint_every_steps = 5_000
  c.eval_every_steps = 5_000
  c.loss = maskformer_loss_config()
  c.optimizer.learning_rate = 6e-5
  c.optimizer.weight_decay = 0.01
  c.optimizer.poly_power = 0.9
  c.optimizer.warmup_steps = 1500
  c.optimizer.warmup_ratio = 1e-6
  c.optimizer.backbone_lr_mult = 1.0
  c.optimizer.grad_clip_norm = 0.01
  c.optimizer.no_decay_keys = MASKFORMER_NO_DECAY_KEYS
  crop = 640 if variant == 'L' else 512
  c.data.crop_size = (crop, crop)
  inp = MASKFORMER_INPUT[crop]
  use_detectron2_recipe(c.data, **inp)  # also cat_max_ratio 1.0: no category constraint
  c.data.short_edge_choices = maskformer_short_edges(inp['base'])
  c.data.test_scale = (inp['test_max_size'], inp['test_short_edge'])
  c.eval.crop_size = (crop, crop)
  c.eval.stride = (crop * 2 // 3, crop * 2 // 3)
  return c


def get_config(arg: str | None = None):
  return semask_maskformer_config(common.parse_variant(arg))
