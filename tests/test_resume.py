"""A run killed with SIGKILL after a checkpoint and restarted reproduces the uninterrupted losses."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from semask_jax import state as state_lib
from semask_jax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 12


def main_cmd(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, 'main.py'), '--config=' + os.path.join(ROOT, 'configs', 'tiny.py'),
          f'--workdir={workdir}', f'--config.total_steps={TOTAL}', '--config.checkpoint_every_steps=2',
          '--config.log_every_steps=1', *extra]


def cpu_env(tmp_root, devices=2):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             # The three runs compile the same step: share it through the persistent cache.
             JAX_COMPILATION_CACHE_DIR=str(tmp_root / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


def losses(workdir):
  """step -> loss, the last record of each step (a restarted run logs some steps again)."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'loss' in r:
        out[r['step']] = r['loss']
  return out


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """(env, losses) of an uninterrupted run; the env shares its compilation cache."""
  root = tmp_path_factory.mktemp('resume')
  env = cpu_env(root)
  subprocess.run(main_cmd(root / 'ref'), env=env, check=True, capture_output=True, cwd=ROOT)
  ref = losses(root / 'ref')
  assert sorted(ref) == list(range(1, TOTAL + 1))
  return env, ref


def test_sigkill_and_restart_reproduces_losses(tmp_path, reference_run):
  env, ref = reference_run
  run_dir = tmp_path / 'run'

  proc = subprocess.Popen(main_cmd(run_dir), env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = run_dir / 'checkpoints' / '4'
  while not ckpt.is_dir() and proc.poll() is None:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)  # possibly while checkpoint 6 is being written
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
  killed_at = max(losses(run_dir))
  assert killed_at < TOTAL

  out = subprocess.run(main_cmd(run_dir), env=env, capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Resuming from' in out.stderr
  got = losses(run_dir)
  assert sorted(got) == list(range(1, TOTAL + 1))
  np.testing.assert_allclose([got[s] for s in range(1, TOTAL + 1)],
                             [ref[s] for s in range(1, TOTAL + 1)], rtol=1e-6)

  # A checkpoint of another model is refused with a message saying so.
  config = tiny.get_config()
  config.model.embed_dim = 24
  with pytest.raises(ValueError, match='does not match'):
    state_lib.restore_for_inference(config, str(run_dir), make_mesh(jax.devices()[:1]))


def test_sigterm_saves_a_final_checkpoint_and_the_restart_continues(tmp_path, reference_run):
  """Preemption: SIGTERM stops the run cleanly with a checkpoint of the step it reached."""
  env, ref = reference_run
  run_dir = tmp_path / 'run'
  cmd = main_cmd(run_dir, '--config.checkpoint_every_steps=1000')  # no periodic checkpoint
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = run_dir / 'metrics.jsonl'
  while proc.poll() is None and not (metrics.exists() and len(losses(run_dir)) >= 3):
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  stopped = max(losses(run_dir))
  assert stopped < TOTAL, 'the run ended before SIGTERM arrived'
  assert 'SIGTERM' in err
  saved = sorted(int(p.name) for p in (run_dir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved == [stopped]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Resuming from' in out.stderr
  got = losses(run_dir)
  np.testing.assert_allclose([got[s] for s in range(1, TOTAL + 1)],
                             [ref[s] for s in range(1, TOTAL + 1)], rtol=1e-6)
