r"""Command line: convert PyTorch checkpoints into an orbax directory for `config.init_from`.

  # Swin ImageNet backbone -> SeMask-T FPN for ADE20K (150 classes):
  python -m convert_weights swin_imagenet --pth swin_tiny_patch4_window7_224.pth \
      --variant T --num_classes 150 --out /tmp/semask_t_in1k
  # ... or the Swin-FPN baseline:
  python -m convert_weights swin_imagenet --pth swin_tiny_patch4_window7_224.pth \
      --variant T --num_classes 150 --num_sem_blocks 0,0,0,0 --out /tmp/swin_t_fpn_in1k
  # Any trained SeMask checkpoint: SeMask-FPN (mmseg {'state_dict': ...}), SeMask-Mask2Former,
  # FaPN- / MSFaPN-Mask2Former or MaskFormer (detectron2 {'model': ...}); the head from the
  # keys, the variant, window, classes, queries and layer counts from the shapes (FaPN's
  # and MaskFormer's decoder attention heads are not in the shapes: 8 unless --nheads):
  python -m convert_weights semask --pth semask_large_msfapn_mask2former_ade20k.pth \
      --out /tmp/semask_msfapn_l_ade
  # (semask_mask2former and semask_maskformer are the same command for one family.)
  # Swin ImageNet backbone -> SeMask-L Mask2Former for ADE20K:
  python -m convert_weights swin_imagenet --pth swin_large_patch4_window12_384_22k.pth \
      --variant L --num_classes 150 --head mask2former --out /tmp/semask_m2f_l_in22k
"""
from __future__ import annotations

import argparse
import sys

from convert_weights.checkpoint import save_conversion
from convert_weights.core import (ConversionError, convert_semask_checkpoint,
                                  convert_semask_mask2former,
                                  convert_semask_maskformer, convert_swin_imagenet,
                                  infer_maskformer_config, read_pth, extract_state_dict)
from semask_jax import cli
from semask_jax.models import (SEMASK_FPN, SEMASK_MASK2FORMER, SEMASK_MASKFORMER, VARIANTS,
                               default_model_config)


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(t) for t in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert_weights", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="kind", required=True)
  s = sub.add_parser("swin_imagenet", help="a Swin ImageNet .pth into a new model's backbone")
  s.add_argument("--pth", required=True, help="swin_*_patch4_window*_*.pth ({'model': ...})")
  s.add_argument("--variant", required=True, choices=sorted(VARIANTS))
  s.add_argument("--num_classes", type=int, required=True)
  s.add_argument("--head", choices=("fpn", "mask2former", "maskformer", "fapn_mask2former",
                                    "msfapn_mask2former"), default="fpn",
                 help="the model to build around the backbone: SeMask-FPN (default), "
                 "SeMask-Mask2Former, SeMask-MaskFormer, or SeMask FaPN- / MSFaPN-Mask2Former")
  s.add_argument("--num_sem_blocks", type=_ints, default=(1, 1, 1, 1),
                 help="per stage; 0,0,0,0 = the Swin-FPN baseline (default 1,1,1,1)")
  s.add_argument("--window_size", type=int, default=None,
                 help="model window (default: the variant's); bias tables are resized bicubically")
  s.add_argument("--seed", type=int, default=0, help="seed of the new layers' initialisation")
  t = sub.add_parser("semask", help="any trained SeMask .pth: the head (FPN, Mask2Former, "
                     "FaPN-/MSFaPN-Mask2Former, MaskFormer) read from its keys")
  t.add_argument("--pth", required=True,
                 help="mmcv ({'state_dict': ...}) or detectron2 ({'model': ...}) checkpoint")
  m = sub.add_parser("semask_mask2former", help="semask for the Mask2Former family only "
                     "(SeMask-, FaPN-, MSFaPN-Mask2Former; detectron2 {'model': ...})")
  m.add_argument("--pth", required=True, help="detectron2 checkpoint ({'model': ...})")
  f = sub.add_parser("semask_maskformer",
                     help="semask for SeMask-MaskFormer only (detectron2 {'model': ...})")
  f.add_argument("--pth", required=True, help="detectron2 checkpoint ({'model': ...})")
  for q in (t, m, f):
    q.add_argument("--nheads", type=int, default=None,
                   help="FaPN-Mask2Former and MaskFormer: the decoder's attention heads, "
                   "which their shapes do not show (default 8, the released configs')")
  for q in (s, t, m, f):
    q.add_argument("--out", required=True, help="output directory (must not exist yet)")
    q.add_argument("--allow_pickle", action="store_true",
                   help="torch.load with weights_only=False (only for files you trust)")
    q.add_argument("--verbose", action="store_true", help="list every key")
  return p


def main(argv=None) -> int:
  """0, or 2 after one `error:` line on stderr (a missing or unfitting checkpoint, an existing --out)."""
  args = _parser().parse_args(argv)
  try:
    if args.kind == "swin_imagenet":
      name = {"fpn": SEMASK_FPN, "maskformer": SEMASK_MASKFORMER}.get(args.head,
                                                                       SEMASK_MASK2FORMER)
      cfg = default_model_config(args.variant, args.num_classes,
                                 num_sem_blocks=args.num_sem_blocks, name=name)
      if args.head.endswith("fapn_mask2former"):
        cfg.pixel_decoder = args.head.split("_")[0]
      if args.window_size:
        cfg.window_size = cfg.sem_window_size = args.window_size
      conv = convert_swin_imagenet(args.pth, cfg, allow_pickle=args.allow_pickle, seed=args.seed)
    elif args.kind == "semask_maskformer":
      cfg = None
      if args.nheads is not None:
        cfg = infer_maskformer_config(extract_state_dict(
            read_pth(args.pth, allow_pickle=args.allow_pickle), args.pth), source=args.pth)
        cfg.nheads = args.nheads
      conv = convert_semask_maskformer(args.pth, cfg, allow_pickle=args.allow_pickle)
    elif args.kind == "semask_mask2former":
      conv = convert_semask_mask2former(args.pth, allow_pickle=args.allow_pickle,
                                        nheads=args.nheads)
    else:
      family, conv = convert_semask_checkpoint(args.pth, allow_pickle=args.allow_pickle,
                                               nheads=args.nheads)
      print(f"head: {family}")
  except ConversionError as e:  # its key lists follow the error line
    return cli.report(e, details=True)
  except cli.PathNotFoundError as e:
    return cli.report(e)
  r = conv.report
  print(r.summary())
  groups = (("used", r.used), ("skipped", r.skipped), ("new", r.new), ("resized", r.resized))
  if args.verbose:
    for name, keys in groups:
      for k in keys:
        print(f"  {name}: {k}")
  try:
    out = save_conversion(conv, args.out)
  except FileExistsError as e:
    return cli.report(e)
  print(f"wrote {out} (use it as config.init_from)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
