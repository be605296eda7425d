r"""SeMask-FPN on Cityscapes (19 classes): AdamW 1e-3 / wd 5e-2, batch 8, 80k iterations, 768 crops.

  python main.py --config=configs/cityscapes_semask_fpn.py:T --workdir=runs/cityscapes_semask_t \
      --config.data.data_dir=$TFDS_DATA_DIR
"""
from configs import common


def get_config(arg: str | None = None):
  return common.semask_fpn_config('cityscapes', common.parse_variant(arg))
