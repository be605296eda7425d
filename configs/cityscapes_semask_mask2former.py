r"""SeMask-Mask2Former on Cityscapes (19 classes), the paper's Table 8 models.

detectron2 recipe (SPEC section 10): AdamW 1e-4, weight decay 0.05, backbone lr x 0.1,
poly 0.9, gradient clipping 0.01, batch 16, 90k iterations, 512x1024 crops, test at
short side 1024. Variant T|S|B|L as the argument:

  python main.py --config=configs/cityscapes_semask_mask2former.py:L \
      --workdir=runs/city_semask_m2f_l --config.data.data_dir=$TFDS_DATA_DIR
"""
from configs import common


def get_config(arg: str | None = None):
  return common.semask_mask2former_config('cityscapes', common.parse_variant(arg))
