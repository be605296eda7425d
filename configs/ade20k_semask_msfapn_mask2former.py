r"""SeMask MSFaPN-Mask2Former on ADE20K (150 classes), the paper's best model (58.22 %
multi-scale mIoU; the official README: 57.00 / 58.25): Mask2Former's MSDeformAttn pixel
decoder whose res2 level is aligned by FaPN's FeatureAlign (DCNv2).

The official config (SPEC section 12) is configs/ade20k_semask_fapn_mask2former.py's
(SeMask-Mask2Former's Swin-L recipe, global semantic attention in stages 2-3) with this
pixel decoder; T, S and B are DERIVED the same way (the official code has only L).

  python main.py --config=configs/ade20k_semask_msfapn_mask2former.py:L \
      --workdir=runs/ade20k_semask_msfapn_l --config.data.data_dir=$TFDS_DATA_DIR
  ... --mode=eval [--config.eval.scales=0.5,0.75,1.0,1.25,1.5,1.75 --config.eval.flip=True]
"""
from configs import ade20k_semask_fapn_mask2former as fapn

DERIVED_VARIANTS = fapn.DERIVED_VARIANTS


def get_config(arg: str | None = None):
  config = fapn.get_config(arg)
  config.model.pixel_decoder = 'msfapn'
  return config
