r"""A small SeMask-MaskFormer trained on the synthetic data set on CPU.

  python main.py --config=configs/demo_maskformer.py --workdir=workdir/demo_maskformer

The paper's model and loss (the MaskFormer set criterion: Hungarian matching on
class + focal + dice costs over every stride-4 pixel, full-resolution focal and dice,
deep supervision over the decoder's predictions, the semantic head's loss_cate;
AdamW with the detectron2 no-decay rule, poly 0.9, gradient clipping), scaled down and
trained from scratch: configs/demo_mask2former.py's backbone, data and schedule with
MaskFormer's FPN pixel decoder and a 3-layer DETR decoder, 12 queries for 6 classes.
Measured on the 2-core CPU (shared): 800 steps in about 10 minutes, final mIoU 0.44
(0.40 at step 400); the Mask2Former demo reaches 0.63 in the same steps: MaskFormer's
one-scale, unmasked decoder is known to converge more slowly.
"""
from configs import ade20k_semask_maskformer, demo_mask2former
from semask_jax.models import SEMASK_MASKFORMER, default_model_config


def get_config(arg: str | None = None):
  del arg
  c = demo_mask2former.get_config()
  m = default_model_config('T', c.data.num_classes, num_sem_blocks=1, name=SEMASK_MASKFORMER)
  for k in ('embed_dim', 'depths', 'num_heads', 'window_size', 'sem_window_size',
            'drop_path_rate', 'sem_dropout', 'conv_dim', 'mask_dim', 'hidden_dim', 'nheads',
            'num_queries', 'dim_feedforward', 'dec_layers'):
    m[k] = c.model[k]
  m.dec_dropout = 0.0  # regularisers only slow a short run down
  c.model = m
  c.loss = ade20k_semask_maskformer.maskformer_loss_config()
  c.loss.max_targets = 8
  c.optimizer.no_decay_keys = ade20k_semask_maskformer.MASKFORMER_NO_DECAY_KEYS
  return c
