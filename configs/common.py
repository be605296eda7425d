"""Shared config builders: the reference SeMask-FPN / Swin-FPN recipe (SPEC section 6)
and the detectron2 SeMask-Mask2Former recipe (SPEC section 10).

Each experiment file calls `semask_fpn_config(dataset, variant)` or
`semask_mask2former_config(dataset, variant)` and changes what its experiment
changes. Steps (`total_steps`, `*_every_steps`) count
optimizer updates of `batch_size` images, i.e. mmseg iterations.
"""
from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from input_pipeline import default_data_config
from input_pipeline.config import use_detectron2_recipe
from semask_jax.models import SEMASK_MASK2FORMER, default_model_config
from semask_jax.models.config import released_sem_window

# Per-dataset recipe: lr, weight decay, total batch, warmup ratio, OHEM variants.
RECIPES = {
    'ade20k': dict(lr=1e-4, wd=1e-4, batch=16, warmup_ratio=1e-6, ohem=('L',), crop=512),
    'cityscapes': dict(lr=1e-3, wd=5e-2, batch=8, warmup_ratio=1e-5, ohem=(), crop=768),
    'coco_stuff10k': dict(lr=1e-4, wd=1e-4, batch=16, warmup_ratio=1e-6,
                          ohem=('T', 'S', 'B', 'L'), crop=512),
}
OHEM_MIN_KEPT = 100_000
PRETRAINED = {  # converted Swin ImageNet checkpoints (python -m convert_weights ...)
    'T': 'pretrained/swin_tiny_patch4_window7_224',
    'S': 'pretrained/swin_small_patch4_window7_224',
    'B': 'pretrained/swin_base_patch4_window12_384_22k',
    'L': 'pretrained/swin_large_patch4_window12_384_22k',
}


def parse_variant(arg: str | None, default: str = 'T') -> str:
  variant = (arg or default).upper()
  if variant not in PRETRAINED:
    raise ValueError(f'config argument must be one of T, S, B, L; got {arg!r}')
  return variant


def base_config() -> ml_collections.ConfigDict:
  """Fields every experiment has (values of the reference ADE20K recipe)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ''  # converted checkpoint dir (Swin ImageNet or trained SeMask-FPN)
  c.batch_size = 16  # images per optimizer update, over all devices and processes
  c.grad_accum_steps = 1  # micro steps per update (optax.MultiSteps)
  c.total_steps = 80_000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 4_000
  c.eval_every_steps = 8_000  # and at the end; 0: no evaluation during training
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.xla_cpu_fast_compile = False  # -O0 on the CPU backend: faster compiles for small CPU runs
  # XLA:CPU's YNNPACK fusions per program (semask_jax/sharding.py): 'tuned' trains without
  # YNNPACK's convolutions (SeMask-T step 8-12 % faster) and evaluates without its reduce
  # fusions, which materialise full-size maps of constants (SeMask-T inference 0.16 GiB
  # lower and 7 % faster; SeMask-B 0.18 GiB lower but 9 % slower); 'xla': XLA's defaults.
  c.xla_cpu_ynn_fusions = 'tuned'
  # XLA:GPU options that trade a little step speed for a much shorter cold compile
  # (semask_jax/sharding.py): no Triton softmax/LayerNorm or gemm fusions. SeMask-B train
  # step on an H200: compile 184 -> 37 s, step +1.4-4 %, memory -1.4 GiB; inference was
  # 12 % slower without them. 'train': the training step; 'all': eval/predict too; 'none'.
  c.xla_gpu_fast_compile = 'train'
  # JAX's persistent compilation cache (semask_jax/compile_cache.py): '' = the user cache
  # ($SEMASK_JAX_COMPILATION_CACHE or ~/.cache/semask_jax/xla), a path, or 'off'.
  c.compilation_cache_dir = ''
  c.demo_predictions = 0  # after training: predict this many generated scenes (synthetic data)
  c.max_nonfinite_steps = 20  # stop once more micro steps than this had a NaN/inf loss
  # The train state on the devices (semask_jax/sharding.py): 'replicated' (plain data
  # parallelism) or 'fsdp': each array of at least fsdp_min_size elements (parameters,
  # AdamW's moments) split over the devices along one axis, each weight gathered whole
  # in the step, in the compute dtype. The state's memory per device is divided by the
  # device count, for more collectives (SeMask-L on TPU v5e: 0.8-1.3 GiB less a chip; README).
  c.state_sharding = 'replicated'
  c.fsdp_min_size = 2 ** 16

  c.loss = ml_collections.ConfigDict()
  c.loss.cate_w = 0.4  # alpha
  c.loss.reduction = 'reference'  # mean over all pixels (mmseg); 'valid': non-ignored only
  c.loss.ohem_min_kept = config_dict.placeholder(int)
  # The images of one OHEM selection: groups of this many consecutive images of the batch,
  # as the reference's sampler sees one GPU's 2 images (samples_per_gpu); 0 = the whole
  # (micro) batch. Must divide the micro batch.
  c.loss.group_size = REFERENCE_IMAGES_PER_GPU
  # How the row-blocked up-sampled CE is differentiated: 'remat' (each block's forward
  # again), 'custom_vjp' (a hand-written backward), 'auto' = remat on CPU, custom_vjp
  # elsewhere (the faster of the two on each, measured; same numbers); 'pallas': forward
  # and backward as fused Triton kernels on GPUs (semask_jax/pallas_ce.py; not yet timed
  # on a device, so not the default).
  c.loss.ce_backward = 'auto'

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.poly_power = 1.0
  c.optimizer.min_lr = 0.0
  c.optimizer.warmup_steps = 1500
  c.optimizer.warmup_ratio = 1e-6
  c.optimizer.no_decay_keys = ('absolute_pos_embed', 'relative_position_bias_table', 'norm')
  c.optimizer.grad_clip_norm = config_dict.placeholder(float)
  c.optimizer.backbone_lr_mult = 1.0  # detectron2 BACKBONE_MULTIPLIER (0.1 for Mask2Former)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 0  # images per eval batch over all devices: 0 one per device; else rounded up to a multiple of them
  # The exact evaluation batches images per bucket canvas (docs/evaluation.md): canvas sides
  # from a ladder of multiples of bucket_multiple (of 32) with bucket_steps_per_octave steps
  # per octave, at most bucket_max_programs canvases (0: max(12, 8 per test scale)).
  c.eval.bucket_steps_per_octave = 4
  c.eval.bucket_multiple = 32
  c.eval.bucket_max_programs = 0
  c.eval.approximate = False  # True: the old one-canvas-per-batch approximation during training
  c.eval.per_image = False  # True: --mode=eval one image at a time (same numbers, the test oracle)
  c.eval.mode = 'whole'  # or 'slide'
  c.eval.crop_size = (512, 512)  # slide only
  c.eval.stride = (341, 341)  # slide only
  c.eval.scales = (1.0,)  # multi-scale: (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  c.eval.flip = False
  c.eval.num_summary_images = 3  # TensorBoard: input | ground truth | prediction per eval; 0 = off
  # --mode=eval: compile the step of every distinct test shape first, in threads (through
  # the persistent compilation cache), instead of one at a time as the images come.
  c.eval.precompile = True
  # Test-time pad of the normalised image to a multiple of this, the scores cropped back;
  # None: the model's own (Mask2Former: 32, as detectron2; FPN: none, as mmseg).
  c.eval.size_divisibility = config_dict.placeholder(int)

  c.predict = ml_collections.ConfigDict()
  c.predict.opacity = 0.5
  return c


def semask_fpn_config(dataset: str, variant: str, *, semask: bool = True
                      ) -> ml_collections.ConfigDict:
  """SeMask-FPN (or, semask=False, the Swin-FPN baseline) with `dataset`'s reference recipe."""
  r = RECIPES[dataset]
  c = base_config()
  c.data = default_data_config(dataset)
  nsb = (1, 1, 1, 1) if semask else (0, 0, 0, 0)
  c.model = default_model_config(variant, c.data.num_classes, num_sem_blocks=nsb)
  c.init_from = PRETRAINED[variant]
  c.batch_size = r['batch']
  c.optimizer.learning_rate = r['lr']
  c.optimizer.weight_decay = r['wd']
  c.optimizer.warmup_ratio = r['warmup_ratio']
  if variant == 'L' and r['crop'] == 512:
    # The reference's 640x640 configs (ade20k_640x640.py, ...): img_scale (2560, 640), train
    # and test.
    c.data.crop_size = (640, 640)
    c.data.img_scale = c.data.test_scale = (2560, 640)
  if semask:
    # SeMask's own data configs: cat_max_ratio 0.75 for ADE20K T (ade20k.py ...) and
    # Cityscapes, 1.0 (no redraw) for ADE20K S/B/L and COCO-Stuff 10k (SPEC 6).
    if dataset == 'ade20k' and variant != 'T':
      c.data.cat_max_ratio = 1.0
  else:
    # The Swin-FPN baselines use the Swin data configs (configs/_base_/datasets/swin/): the
    # ratio drawn uniformly from [0.5, 2.0] and cat_max_ratio 0.75 on every data set.
    c.data.ratio_list = None
    c.data.ratio_range = (0.5, 2.0)
    c.data.cat_max_ratio = 0.75
  if variant in r['ohem']:
    c.loss.ohem_min_kept = OHEM_MIN_KEPT
  crop = tuple(c.data.crop_size)
  c.eval.crop_size = crop
  c.eval.stride = tuple(s * 2 // 3 for s in crop)
  return c


# detectron2 SeMask-Mask2Former recipes (SPEC 10): crop and iterations, and the
# Mask2Former INPUT settings (configs/<dataset>/semantic-segmentation/Base-*.yaml,
# swin/*_res640.yaml) per crop: `base` of the short-side choices int(x * 0.1 * base),
# x = 5..20, MAX_SIZE_TRAIN, SIZE_DIVISIBILITY (mapper pad; -1 none), MIN/MAX_SIZE_TEST,
# TEST.AUG.MAX_SIZE (multi-scale / flip test). ADE20K scales all of them with the crop
# (512: 512/2048/3584, 640: 640/2560/4480).
# Both reference code bases train on 8 GPUs with 2 images each: the losses' per-GPU means
# (and OHEM's per-GPU selection) see groups of 2 images.
REFERENCE_IMAGES_PER_GPU = 2

MASK2FORMER_RECIPES = {
    'ade20k': dict(crop=(512, 512), crop_l=(640, 640), steps=160_000),
    'cityscapes': dict(crop=(512, 1024), crop_l=(512, 1024), steps=90_000),
}
MASK2FORMER_INPUT = {
    ('ade20k', 512): dict(base=512, max_size=2048, size_divisibility=512,
                          test_short_edge=512, test_max_size=2048, test_aug_max_size=3584),
    ('ade20k', 640): dict(base=640, max_size=2560, size_divisibility=640,
                          test_short_edge=640, test_max_size=2560, test_aug_max_size=4480),
    ('cityscapes', 512): dict(base=1024, max_size=4096, size_divisibility=-1,
                              test_short_edge=1024, test_max_size=2048, test_aug_max_size=4096),
}
# No weight decay (detectron2 build_optimizer): every norm (LayerNorm, GroupNorm -- the
# pixel decoder's input_proj.<l>.1 --, the semantic layers' norm1), the decoder's
# nn.Embedding tables and the Swin position tables. The pixel decoder's bare
# `transformer.level_embed` Parameter keeps its decay, as in the reference.
MASK2FORMER_NO_DECAY_KEYS = ('absolute_pos_embed', 'relative_position_bias_table', 'norm',
                             'input_proj.0.1.', 'input_proj.1.1.', 'input_proj.2.1.',
                             'predictor.query_feat', 'predictor.query_embed',
                             'predictor.level_embed')


def set_criterion_loss_config(class_weight: float, mask_weight: float, dice_weight: float,
                              **extra: Any) -> ml_collections.ConfigDict:
  """The settings of a SeMask set criterion (Mask2Former's, MaskFormer's): the three
  matching / loss weights and `extra`, beside what both share."""
  loss = ml_collections.ConfigDict()
  loss.class_weight = class_weight
  loss.mask_weight = mask_weight
  loss.dice_weight = dice_weight
  loss.cate_weight = 0.4  # SeMask's semantic head
  loss.no_object_weight = 0.1
  loss.update(extra)
  # Static target slots per image (ADE20K crops have <= ~40 classes). The reference has no
  # cap: a training crop with more classes stops the run with an error naming its image.
  loss.max_targets = 64
  # The mask losses run over the slots in chunks of this many; a chunk with no target in
  # any image of the batch is skipped (ADE20K crops fill 10-30 of the 64 slots).
  loss.slot_chunk = 8
  # loss_ce and loss_cate are means per GPU (IMS_PER_BATCH 16 over 8 GPUs: 2 images) that
  # DDP averages: here means per group of this many consecutive images, averaged over the
  # groups; 0 = the whole (micro) batch. Must divide the micro batch.
  loss.group_size = REFERENCE_IMAGES_PER_GPU
  return loss


def mask2former_loss_config() -> ml_collections.ConfigDict:
  """SeMaskSetCriterion settings (detectron2 MODEL.MASK_FORMER.* defaults, SPEC 10)."""
  return set_criterion_loss_config(2.0, 5.0, 5.0, train_num_points=12544,
                                   oversample_ratio=3.0, importance_sample_ratio=0.75)


def semask_mask2former_config(dataset: str, variant: str, pixel_decoder: str = 'msdeformattn'
                              ) -> ml_collections.ConfigDict:
  """SeMask-Mask2Former with `dataset`'s detectron2 recipe: AdamW 1e-4, wd 0.05, backbone
  lr x 0.1, poly 0.9 without warm-up, gradient clipping at global norm 0.01, batch 16;
  data: the Mask2Former transforms (data.recipe 'detectron2', MASK2FORMER_INPUT).
  pixel_decoder 'fapn' / 'msfapn': SeMask-FAPN's FaPN / MSFaPN-Mask2Former, whose configs
  differ only in the pixel decoder (and, through it, the backbone's semantic-attention
  rule; SPEC section 12)."""
  r = MASK2FORMER_RECIPES[dataset]
  c = base_config()
  c.data = default_data_config(dataset)
  c.model = default_model_config(variant, c.data.num_classes, num_sem_blocks=1,
                                 name=SEMASK_MASK2FORMER)
  c.model.sem_window_size = released_sem_window(c.model.window_size, c.data.num_classes)
  c.model.pixel_decoder = pixel_decoder
  # How the semantic attention starts (SPEC 13, models/config.py): 'reference' as the
  # official detectron2 code, whose mlp_res and gamma start at 0 and stay 0 (the branch
  # only feeds loss_cate through mlp_cls_q: what the paper's numbers come from);
  # 'trainable' starts it as SeMask-FPN does (trunc_normal 0.02), so that it learns.
  c.model.semantic_attention_init = 'reference'
  c.init_from = PRETRAINED[variant]
  c.batch_size = 16
  c.total_steps = r['steps']
  c.checkpoint_every_steps = 5_000
  c.eval_every_steps = 5_000
  c.loss = mask2former_loss_config()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 0.05
  c.optimizer.poly_power = 0.9
  c.optimizer.warmup_steps = 0
  c.optimizer.backbone_lr_mult = 0.1
  c.optimizer.grad_clip_norm = 0.01
  c.optimizer.no_decay_keys = MASK2FORMER_NO_DECAY_KEYS
  crop = r['crop_l'] if variant == 'L' else r['crop']
  c.data.crop_size = crop
  inp = MASK2FORMER_INPUT[(dataset, crop[0])]
  use_detectron2_recipe(c.data, **inp)  # also cat_max_ratio 1.0: no category constraint
  # mmseg-style bound equal to ResizeShortestEdge(test_short_edge, test_max_size) up to
  # rounding; only what still reads test_scale (semask_jax/predict.py) uses it.
  c.data.test_scale = (inp['test_max_size'], inp['test_short_edge'])
  c.eval.crop_size = crop
  c.eval.stride = tuple(s * 2 // 3 for s in crop)
  return c
