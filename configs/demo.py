r"""The built-in demo: a small SeMask-FPN trained on the synthetic data set on CPU in ~5 minutes.

What `python main.py` runs with no flags (workdir ./workdir/demo):

  python main.py --config=configs/demo.py --workdir=workdir/demo

It trains from scratch, evaluates (mIoU far above chance), writes checkpoints,
metrics.jsonl, TensorBoard events, and colour masks of a few generated scenes.
"""
from configs import common
from semask_jax.models import default_model_config


def get_config(arg: str | None = None):
  del arg
  c = common.base_config()
  c.data = common.default_data_config('synthetic')
  m = default_model_config('T', c.data.num_classes)
  m.embed_dim = 32
  m.depths = (1, 1, 1, 1)
  m.num_heads = (1, 2, 4, 8)
  m.window_size = 4
  m.sem_window_size = 4
  m.fpn_channels = 32
  m.drop_path_rate = 0.0  # regularisers only slow a 600-step run down
  m.head_dropout = 0.0
  m.sem_dropout = 0.0
  c.model = m
  c.init_from = ''
  c.xla_cpu_fast_compile = False  # -O0 halves the step speed of this model: not worth it
  c.batch_size = 8
  c.total_steps = 600
  c.log_every_steps = 25
  c.checkpoint_every_steps = 200
  c.eval_every_steps = 300
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 1e-2
  c.optimizer.warmup_steps = 30
  c.eval.batch_size = 10
  c.demo_predictions = 4  # generated scenes written as images and predicted at the end
  return c
