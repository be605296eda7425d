"""`python -m convert_weights semask` reads any trained SeMask checkpoint: the head family
from the keys, the model from the shapes, into the parameters the family's own converter
gives. One vector of each golden family (the official code's weights, as released)."""
import json
import pathlib

import numpy as np
import pytest
import torch
from flax import nnx

from convert_weights import ConversionError, convert_semask_checkpoint, head_family
from convert_weights.__main__ import main as cli_main
from tests.golden_utils import GOLDEN_DIR, load_vector
from tests.test_golden_fapn import FILES as FAPN_FILES
from tests.test_golden_maskformer import FILES as MF_FILES
from tests.golden_utils import m2f_golden_files

# (vector, the family its keys must give): the first of each kind present.
CASES = [(p, "fpn") for p in sorted(GOLDEN_DIR.glob("*.npz"))[:1]]
CASES += [(p, "mask2former") for p in m2f_golden_files()[:1]]
CASES += [(p, "maskformer") for p in MF_FILES[:1]]
for decoder in ("fapn", "msfapn"):
  CASES += [(p, f"{decoder}_mask2former") for p in FAPN_FILES
            if json.loads(str(np.load(p)["meta"]))["config"]["pixel_decoder"] == decoder][:1]


def _released(path: pathlib.Path):
  """(meta, the state dict as the official code saves it: tied copies included)."""
  _, meta, sd = load_vector(path)
  sd = dict(sd)
  for first, alias in meta.get("tied_keys", []):
    sd[alias] = sd[first]
  return meta, sd


@pytest.mark.parametrize("path,family", CASES, ids=[f for _, f in CASES])
def test_semask_command_recognises_the_head_and_reads_the_config(path, family, tmp_path,
                                                                 capsys):
  meta, sd = _released(path)
  assert head_family(sd) == family
  wrapper = "state_dict" if family == "fpn" else "model"  # mmcv / detectron2
  pth = tmp_path / "released.pth"
  torch.save({wrapper: {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, pth)
  nheads = meta["config"].get("nheads")
  argv = ["semask", "--pth", str(pth), "--out", str(tmp_path / "out")]
  assert cli_main(argv + (["--nheads", str(nheads)] if nheads else [])) == 0
  assert f"head: {family}" in capsys.readouterr().out
  got_family, conv = convert_semask_checkpoint(str(pth), nheads=nheads)
  assert got_family == family
  for key in ("embed_dim", "depths", "num_heads", "window_size", "num_classes",
              "num_queries", "pixel_decoder", "deformable_groups", "nheads"):
    if key in meta["config"]:
      want = meta["config"][key]
      got = conv.config[key]
      assert (tuple(got) if isinstance(got, (list, tuple)) else got) == (
          tuple(want) if isinstance(want, list) else want), key
  # Every parameter of the model is the checkpoint's (in this project's layout).
  assert not conv.report.new, conv.report.new[:5]
  n = len(list(nnx.to_flat_state(nnx.state(conv.model, nnx.Param))))
  assert n and len(conv.report.used) >= n


def test_a_checkpoint_of_no_known_head_is_refused_in_one_line(tmp_path, capsys):
  sd = {"backbone.patch_embed.proj.weight": np.zeros((32, 3, 4, 4), np.float32)}
  with pytest.raises(ConversionError, match="not a trained SeMask checkpoint"):
    head_family(sd, "x.pth")
  pth = tmp_path / "swin.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, pth)
  assert cli_main(["semask", "--pth", str(pth), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "swin_imagenet" in err
