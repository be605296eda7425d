"""config.init_from end to end: a reference-format .pth (torch.save of a state dict named
as the official checkpoints: mmseg's {'state_dict': ...} for SeMask-FPN, detectron2's
{'model': ...} for SeMask-Mask2Former, buffers included) converted by
`python -m convert_weights`, then one training step (train_and_evaluate) and --mode=eval
(evaluate_only) from it; a conversion of another shape is refused in one line that names
the key.

The .pth holds the weights of a model built with another seed than the run's, and
random BatchNorm statistics, so that a value not loaded shows.
"""
import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from configs import demo_mask2former, tiny
from convert_weights import names
from convert_weights.__main__ import main as convert_main
from semask_jax import cli
from semask_jax import compile_cache
from semask_jax import sharding as sharding_lib
from semask_jax.evaluation import evaluator
from semask_jax.models import build_model
from semask_jax.models.functional import split_model
from semask_jax.train import checkpointing
from semask_jax.train import loop as train
from semask_jax.train import modes
from semask_jax.train import state as state_lib

PTH_SEED = 7  # the .pth's model; the runs use config.seed = 0


def fpn_config():
  c = tiny.get_config()
  c.data.synthetic.num_eval = 2
  c.async_checkpointing = False
  return c


def m2f_config():
  """The Mask2Former demo at tests/test_train_mask2former.py's size, on tiny.py's scenes."""
  c = demo_mask2former.get_config()
  t = tiny.get_config()
  c.data = t.data
  c.data.synthetic.num_eval = 2
  c.model.embed_dim = 16
  c.model.num_heads = (1, 1, 2, 2)
  c.model.num_queries = 8
  c.model.dec_layers = 1
  c.loss.train_num_points = 64
  c.xla_cpu_fast_compile = True
  c.eval_every_steps = 0
  c.async_checkpointing = False
  return c


def torch_state_dict(model) -> dict[str, torch.Tensor]:
  """The model's params and batch statistics under the official checkpoints' keys and
  layouts (convert_weights.names), with the buffers those hold."""
  sd = {}
  bn_prefixes = set()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
    key = names.torch_key(path)
    sd[key] = torch.from_numpy(np.array(
        names.to_torch_layout(path, np.asarray(var[...]))))
    if key.endswith('.running_mean'):
      bn_prefixes.add(key[:-len('running_mean')])
    if key.endswith('.relative_position_bias_table'):
      n = int(round(np.sqrt(var[...].shape[0])))
      window = (n + 1) // 2
      sd[key[:-len('relative_position_bias_table')] + 'relative_position_index'] = torch.zeros(
          (window * window, window * window), dtype=torch.long)
  for p in bn_prefixes:
    sd[p + 'num_batches_tracked'] = torch.tensor(1000, dtype=torch.long)
  return sd


def write_pth(config, path, *, kind: str, model_overrides=None):
  """A model of `config` (seed PTH_SEED, random BN statistics) saved as the reference saves
  it; returns the state dict (torch layout, numpy)."""
  mc = config.model.copy_and_resolve_references()
  mc.update(model_overrides or {})
  model = build_model(mc, rngs=nnx.Rngs(PTH_SEED))
  rng = np.random.default_rng(PTH_SEED)
  for leaf, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
    shape = var[...].shape
    value = rng.uniform(0.5, 1.5, shape) if leaf[-1] == 'var' else rng.normal(0, 0.1, shape)
    var[...] = jax.numpy.asarray(value, np.float32)
  sd = torch_state_dict(model)
  if kind == 'mask2former':  # detectron2: {'model': ...} with its input and criterion buffers
    sd['pixel_mean'] = torch.tensor([123.675, 116.28, 103.53]).reshape(3, 1, 1)
    sd['pixel_std'] = torch.tensor([58.395, 57.12, 57.375]).reshape(3, 1, 1)
    sd['criterion.empty_weight'] = torch.ones(mc.num_classes + 1)
    torch.save({'model': sd, 'iteration': 160000}, str(path))
  else:  # mmcv: {'meta': ..., 'state_dict': ...}
    torch.save({'meta': {'iter': 80000}, 'state_dict': sd}, str(path))
  return {k: v.numpy() for k, v in sd.items()}


def convert(pth, out, kind) -> str:
  assert convert_main(['semask' if kind == 'fpn' else 'semask_mask2former', '--pth', str(pth),
                       '--out', str(out)]) == 0
  return str(out)


def model_values(params, batch_stats) -> dict[str, np.ndarray]:
  """{torch key: torch-layout value} of a params / batch_stats pure-dict pair."""
  out = {}
  for tree in (params, batch_stats):
    for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
      p = tuple(k.key for k in path)
      out[names.torch_key(p)] = names.to_torch_layout(p, np.asarray(v))
  return out


@pytest.fixture
def no_user_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / 'jax_cache'))
  yield
  compile_cache.disable()


def _first_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if 'loss' in r]


@pytest.mark.parametrize('kind', ['fpn', 'mask2former'])
def test_train_and_eval_from_a_converted_pth(kind, tmp_path, no_user_cache):
  config = fpn_config() if kind == 'fpn' else m2f_config()
  sd = write_pth(config, tmp_path / 'ref.pth', kind=kind)
  config.init_from = convert(tmp_path / 'ref.pth', tmp_path / 'converted', kind)
  # Every parameter and BatchNorm statistic of the model came from the .pth.
  loaded = model_values(*split_model(state_lib.create_model(config))[1:3])
  fresh = model_values(*split_model(build_model(config.model, rngs=nnx.Rngs(config.seed)))[1:3])
  assert loaded.keys() <= sd.keys()
  for k, v in loaded.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  # (the run's own initialisation differs from the .pth's: seed 0 against 7)
  drawn = [k for k in loaded if sd[k].ndim >= 2]
  assert sum(not np.array_equal(fresh[k], sd[k]) for k in drawn) > 0.9 * len(drawn)

  # --mode=eval: the parameters it evaluates are the .pth's, and its mIoU is the one of
  # the model that wrote the .pth.
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  state, graphdef, rest, step = state_lib.restore_for_inference(config, str(tmp_path / 'e'), mesh)
  assert step == 0
  for k, v in model_values(state.params, state.batch_stats).items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  got = modes.evaluate_only(config, str(tmp_path / 'eval'))
  ref_config = config.copy_and_resolve_references()
  ref_config.init_from = ''
  ref_model = build_model(ref_config.model, rngs=nnx.Rngs(PTH_SEED))
  _, p, b, _ = split_model(ref_model)
  # The seed-7 model with the .pth's statistics: the .pth itself, loaded by hand.
  p = _replace_from(p, sd)
  b = _replace_from(b, sd)
  want = evaluator.evaluate_per_image(ref_config, graphdef, rest, state_lib.InferenceState(p, b))
  assert got['num_images'] == want['num_images'] == 2
  assert got['mIoU'] == pytest.approx(want['mIoU'], abs=1e-12)
  assert got['aAcc'] == pytest.approx(want['aAcc'], abs=1e-12)

  # One training step from it: the first update (warm-up lr ~1e-9) moves no parameter by
  # more than 2 x lr from the .pth's value, where a fresh initialisation is ~1e-2 away.
  config.total_steps = 1
  config.checkpoint_every_steps = 1
  workdir = tmp_path / 'train'
  train.train_and_evaluate(config, str(workdir))
  (record,) = _first_records(workdir)
  assert np.isfinite(record['loss']) and 0 < record['lr'] < 1e-6
  ckpt = checkpointing.Checkpointer(str(workdir / 'checkpoints'), async_save=False)
  try:
    s0 = state_lib.init_train_state(config, state_lib.create_model(config),
                                    sharding_lib.make_mesh())[0]
    after = jax.device_get(ckpt.restore(1, checkpointing.abstract_like(s0)))
  finally:
    ckpt.close()
  for k, v in model_values(after.params, {}).items():  # (+ the float32 rounding of the sum)
    np.testing.assert_allclose(v, sd[k], rtol=np.finfo(np.float32).eps, atol=2 * record['lr'],
                               err_msg=k)


def _replace_from(tree, sd):
  def leaf(path, v):
    p = tuple(k.key for k in path)
    return names.to_model_layout(p, sd[names.torch_key(p)])
  return jax.tree_util.tree_map_with_path(leaf, jax.device_get(tree))


@pytest.mark.parametrize(argnames='kind,override,pattern',
                         ids=['fpn-classes', 'fpn-embed_dim', 'mask2former-classes'], argvalues=[
    ('fpn', dict(num_classes=4), r'decode_head\.conv_seg\.kernel: checkpoint \([\d, ]*4\), '
     r'model \([\d, ]*6\)'),
    # 20 keys named, the first in order: a Swin block's.
    ('fpn', dict(embed_dim=24), r'backbone\.layers\.0\.blocks\.0\.attn\.proj\.bias: checkpoint '
     r'\(24,\), model \(16,\)'),
    ('mask2former', dict(num_classes=4), r'sem_seg_head\.predictor\.class_embed\.kernel: '
     r'checkpoint \(32, 5\), model \(32, 7\)'),
])
def test_a_misshaped_conversion_is_refused_in_one_line(kind, override, pattern, tmp_path, capsys):
  config = fpn_config() if kind == 'fpn' else m2f_config()
  write_pth(config, tmp_path / 'other.pth', kind=kind, model_overrides=override)
  config.init_from = convert(tmp_path / 'other.pth', tmp_path / 'converted', kind)
  capsys.readouterr()
  # As main.py runs: a user's mistake is one `error:` line and exit status 2.
  with pytest.raises(SystemExit) as exit_info:
    cli.run(state_lib.create_model, config)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('error: config.init_from='), err
  assert re.search(pattern, err) and 'Traceback' not in err, err
