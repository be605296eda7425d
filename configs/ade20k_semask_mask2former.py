r"""SeMask-Mask2Former on ADE20K (150 classes), the paper's best models (Table 7).

detectron2 recipe (SPEC section 10): AdamW 1e-4, weight decay 0.05 (none for norms,
embeddings and position tables), backbone lr x 0.1, poly 0.9 without warm-up,
gradient clipping at global norm 0.01, batch 16, 160k iterations; 512 crops (640
for L). Variant T|S|B|L as the argument. Run on one 8-GPU host:

  python main.py --config=configs/ade20k_semask_mask2former.py:L \
      --workdir=runs/ade20k_semask_m2f_l --config.data.data_dir=$TFDS_DATA_DIR

Evaluate (mIoU, single scale) or with multi-scale + flip:
  python main.py --config=configs/ade20k_semask_mask2former.py:L \
      --workdir=runs/ade20k_semask_m2f_l --mode=eval
  ... --config.eval.scales=0.5,0.75,1.0,1.25,1.5,1.75 --config.eval.flip=True
"""
from configs import common


def get_config(arg: str | None = None):
  return common.semask_mask2former_config('ade20k', common.parse_variant(arg))
