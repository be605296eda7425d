r"""SeMask MSFaPN-Mask2Former on ADE20K (150 classes), the paper's best model (58.22 %
multi-scale mIoU; the official README: 57.00 / 58.25): Mask2Former's MSDeformAttn pixel
decoder whose res2 level is aligned by FaPN's FeatureAlign (DCNv2).

The official config (SPEC section 12) is SeMask-Mask2Former's Swin-L one with only the
pixel decoder changed: 640 crops, AdamW 1e-4, weight decay 0.05, backbone lr x 0.1, poly
0.9 without warm-up, clipping at global norm 0.01, batch 16, 160k iterations, IN-22k
weights; global semantic attention in stages 2-3 (SeMask-FAPN's rule, for every class
count). Variant T|S|B|L as the argument; T, S and B are DERIVED (the official code has
only L): built as the Mask2Former T/S/B configs (512 crops, the variant's ImageNet weights).

  python main.py --config=configs/ade20k_semask_msfapn_mask2former.py:L \
      --workdir=runs/ade20k_semask_msfapn_l --config.data.data_dir=$TFDS_DATA_DIR
  ... --mode=eval [--config.eval.scales=0.5,0.75,1.0,1.25,1.5,1.75 --config.eval.flip=True]
"""
from configs import common

DERIVED_VARIANTS = ('T', 'S', 'B')


def get_config(arg: str | None = None):
  return common.semask_mask2former_config('ade20k', common.parse_variant(arg, default='L'),
                                          pixel_decoder='msfapn')
