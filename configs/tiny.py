r"""A tiny SeMask on small synthetic scenes: for tests and smoke runs, not for results (~1 min on CPU).

  python main.py --config=configs/tiny.py --workdir=/tmp/semask_tiny
"""
from configs import common
from semask_jax.models import default_model_config


def get_config(arg: str | None = None):
  del arg
  c = common.base_config()
  c.data = common.default_data_config('synthetic')
  c.data.img_scale = (48, 40)
  c.data.ratio_list = (0.75, 1.0)
  c.data.crop_size = (32, 32)
  c.data.test_scale = (48, 40)
  c.data.eval_pad_hw = (40, 48)
  c.data.eval_label_pad_hw = (40, 48)
  c.data.synthetic.num_train = 64
  c.data.synthetic.num_eval = 8
  c.data.synthetic.height = 40
  c.data.synthetic.width = 48
  m = default_model_config('T', c.data.num_classes)
  m.embed_dim = 16
  m.depths = (1, 1, 1, 1)
  m.num_heads = (1, 1, 2, 2)
  m.window_size = 4
  m.sem_window_size = 4
  m.fpn_channels = 16
  c.model = m
  c.init_from = ''
  c.xla_cpu_fast_compile = True
  c.batch_size = 8
  c.total_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 0  # no eval during training
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 2
  c.eval.batch_size = 8
  return c
