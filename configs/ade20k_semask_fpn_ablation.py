r"""Ablations of SeMask-T FPN on ADE20K (paper Table 5, SPEC section 7); the argument picks one:

  nogamma    semantic layer without the learnable gamma (lambda)        ref. 41.11 mIoU
  ns1222     N_S = [1, 2, 2, 2] semantic attention blocks per stage      ref. 40.60
  ns2222     N_S = [2, 2, 2, 2]                                          ref. 40.09
  plain      plain single-head self-attention instead of semantic attn   ref. 41.42
  alpha0.7   loss weight alpha (cate_w) 0.7                             ref. 41.87
  alpha1.0   alpha 1.0                                                   ref. 41.67

  python main.py --config=configs/ade20k_semask_fpn_ablation.py:nogamma --workdir=runs/abl_nogamma
"""
from configs import common

ABLATIONS = ('nogamma', 'ns1222', 'ns2222', 'plain', 'alpha0.7', 'alpha1.0')


def get_config(arg: str | None = None):
  c = common.semask_fpn_config('ade20k', 'T')
  if arg == 'nogamma':
    c.model.use_gamma = False
  elif arg in ('ns1222', 'ns2222'):
    c.model.num_sem_blocks = tuple(int(d) for d in arg[2:])
  elif arg == 'plain':
    c.model.sem_attention = 'plain'
  elif arg in ('alpha0.7', 'alpha1.0'):
    c.loss.cate_w = float(arg[len('alpha'):])
  else:
    raise ValueError(f'ablation argument must be one of {ABLATIONS}, got {arg!r}')
  return c
