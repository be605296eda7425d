r"""A small SeMask-Mask2Former trained on the synthetic data set on CPU in a few minutes.

  python main.py --config=configs/demo_mask2former.py --workdir=workdir/demo_mask2former

The paper's model and loss (set criterion with Hungarian matching, deep supervision,
the semantic head's loss_cate, AdamW with the detectron2 no-decay rule, poly 0.9,
gradient clipping), scaled down and trained from scratch (so no backbone lr
multiplier): a 32-wide backbone, one deformable encoder layer, three decoder layers
(one round over the three levels), 12 queries for 6 classes, 1024 sampled points per
mask, 800 steps of 8 crops of 64x64.
"""
from configs import common
from semask_jax.models import SEMASK_MASK2FORMER, default_model_config


def get_config(arg: str | None = None):
  del arg
  c = common.base_config()
  # The FPN demo's data recipe: on these small scenes the detectron2 one (short edge drawn
  # up to 2x the scene) learns more slowly (mIoU 0.48 after 600 steps against 0.55); it is
  # what configs/ade20k_semask_mask2former.py uses, and tests/test_input_m2f_transforms.py
  # checks it against detectron2's calls.
  c.data = common.default_data_config('synthetic')
  m = default_model_config('T', c.data.num_classes, num_sem_blocks=1, name=SEMASK_MASK2FORMER)
  m.embed_dim = 32
  m.depths = (1, 1, 1, 1)
  m.num_heads = (1, 2, 4, 8)
  m.window_size = 4
  m.sem_window_size = 4
  m.drop_path_rate = 0.0  # regularisers only slow a short run down
  m.sem_dropout = 0.0
  m.conv_dim = 32
  m.mask_dim = 32
  m.hidden_dim = 32
  m.nheads = 4
  m.enc_layers = 1
  m.enc_dim_feedforward = 64
  m.num_queries = 12
  m.dim_feedforward = 64
  m.dec_layers = 3
  c.model = m
  c.loss = common.mask2former_loss_config()
  c.loss.train_num_points = 1024
  c.loss.max_targets = 8
  c.init_from = ''
  c.batch_size = 8
  c.total_steps = 800
  c.log_every_steps = 25
  c.checkpoint_every_steps = 200
  c.eval_every_steps = 400
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.poly_power = 0.9
  c.optimizer.warmup_steps = 30
  c.optimizer.grad_clip_norm = 1.0  # 0.01 (the paper's) is for a 160k-step run
  c.optimizer.no_decay_keys = common.MASK2FORMER_NO_DECAY_KEYS
  c.eval.batch_size = 10
  c.demo_predictions = 4
  return c
