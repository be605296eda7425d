"""2 processes x 2 CPU devices joined by jax.distributed on localhost train, checkpoint and evaluate."""
import json
import os
import re
import subprocess

import jax
import numpy as np
import portpicker
import pytest

from configs import tiny
from semask_jax.evaluation import evaluator as eval_and_predict
from semask_jax.train import state as state_lib
from semask_jax.sharding import make_mesh

from test_resume import ROOT, cpu_env, losses, main_cmd


@pytest.mark.parametrize('state_sharding', ['replicated', 'fsdp'])
def test_two_processes_train_and_agree(tmp_path, state_sharding):
  """fsdp: the state split over the 4 devices of both processes (each process places and
  checkpoints its own pieces)."""
  workdir = tmp_path / 'run'
  port = portpicker.pick_unused_port()
  env = cpu_env(tmp_path, devices=2)
  steps = ['--config.total_steps=3', '--config.eval_every_steps=3', '--config.eval.batch_size=4',
           f'--config.state_sharding={state_sharding}', '--config.fsdp_min_size=0']
  procs = [subprocess.Popen(
      main_cmd(workdir, *steps, f'--coordinator_address=localhost:{port}', '--num_processes=2',
               f'--process_id={i}'),
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Every process saw the same (replicated) loss at the end.
  finals = [re.findall(r'process (\d) of 2 finished at step (\d+); last loss ([\d.e+-]+)', err)
            for _, err in outs]
  assert [f[0][0] for f in finals] == ['0', '1']
  assert finals[0][0][1:] == finals[1][0][1:]
  assert sorted(losses(workdir)) == [1, 2, 3]
  ckpt = workdir / 'checkpoints' / '3' / 'data_iter'
  assert sorted(f for f in os.listdir(ckpt) if f.startswith('process_')) == [
      'process_0-of-2.json', 'process_1-of-2.json']  # one grain iterator state per process

  # The confusion matrix summed over both processes equals a 1-process eval of the checkpoint.
  with open(workdir / 'eval_results.json') as f:
    dist = json.load(f)
  config = tiny.get_config()
  config.eval.batch_size = 4
  mesh = make_mesh(jax.devices()[:4])
  state, graphdef, rest, step = state_lib.restore_for_inference(config, str(workdir), mesh)
  assert step == 3
  single = eval_and_predict.make_eval_fn(config, graphdef, rest, mesh)(state)
  assert dist['num_pixels'] == single['num_pixels'] == 8 * 40 * 48
  np.testing.assert_allclose(dist['mIoU'], single['mIoU'], rtol=1e-6)
  np.testing.assert_allclose(dist['aAcc'], single['aAcc'], rtol=1e-6)
