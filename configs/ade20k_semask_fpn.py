r"""SeMask-FPN on ADE20K (150 classes), reference recipe: AdamW 1e-4 / wd 1e-4, batch 16, 80k iterations.

Variant T|S|B|L as the argument (L: 640 crops and OHEM). Run on one 8-GPU host:

  python main.py --config=configs/ade20k_semask_fpn.py:T --workdir=runs/ade20k_semask_t \
      --config.data.data_dir=$TFDS_DATA_DIR

With fewer devices keep the 16-image batch by accumulating:
  --config.grad_accum_steps=4   (4 micro steps of 4 images)
"""
from configs import common


def get_config(arg: str | None = None):
  return common.semask_fpn_config('ade20k', common.parse_variant(arg))
