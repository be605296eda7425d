r"""SeMask-FPN on COCO-Stuff 10k (171 classes): AdamW 1e-4 / wd 1e-4, batch 16, 80k iterations, OHEM.

  python main.py --config=configs/coco_stuff10k_semask_fpn.py:T --workdir=runs/coco10k_semask_t \
      --config.data.data_dir=$TFDS_DATA_DIR
"""
from configs import common


def get_config(arg: str | None = None):
  return common.semask_fpn_config('coco_stuff10k', common.parse_variant(arg))
