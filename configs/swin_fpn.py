r"""Swin-FPN baselines (no semantic layers, CE on the FPN logits only), per data set and variant.

The argument is '<dataset>,<variant>' (variant T|S|B|L, default T):

  python main.py --config=configs/swin_fpn.py:ade20k,T --workdir=runs/ade20k_swin_t
  python main.py --config=configs/swin_fpn.py:cityscapes,T --workdir=runs/cityscapes_swin_t
  python main.py --config=configs/swin_fpn.py:coco_stuff10k,T --workdir=runs/coco10k_swin_t
"""
from configs import common


def get_config(arg: str | None = None):
  dataset, _, variant = (arg or 'ade20k').partition(',')
  if dataset not in common.RECIPES:
    raise ValueError(f'swin_fpn.py: dataset {dataset!r} not in {sorted(common.RECIPES)}')
  return common.semask_fpn_config(dataset, common.parse_variant(variant), semask=False)
