r"""SeMask FaPN-Mask2Former on ADE20K (150 classes): SeMask-FAPN's PixelFANDecoder (an FPN
with a FeatureAlign DCNv2 at res4, res3, res2) under Mask2Former's decoder; the official
README's SeMask-L row: 56.88 / 58.25 mIoU (single-scale / multi-scale + flip).

The official config (SPEC section 12) is SeMask-Mask2Former's Swin-L one with only the
pixel decoder changed: 640 crops, AdamW 1e-4, weight decay 0.05, backbone lr x 0.1, poly
0.9 without warm-up, clipping at global norm 0.01, batch 16, 160k iterations, IN-22k
weights; global semantic attention in stages 2-3 (FaPN's rule, for every class count).
Variant T|S|B|L as the argument; T, S and B are DERIVED (the official code has only L):
built as the Mask2Former T/S/B configs (512 crops, the variant's ImageNet weights).

  python main.py --config=configs/ade20k_semask_fapn_mask2former.py:L \
      --workdir=runs/ade20k_semask_fapn_l --config.data.data_dir=$TFDS_DATA_DIR
  ... --mode=eval [--config.eval.scales=0.5,0.75,1.0,1.25,1.5,1.75 --config.eval.flip=True]
"""
from configs import common

DERIVED_VARIANTS = ('T', 'S', 'B')


def get_config(arg: str | None = None):
  return common.semask_mask2former_config('ade20k', common.parse_variant(arg, default='L'),
                                          pixel_decoder='fapn')
