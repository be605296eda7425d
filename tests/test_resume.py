"""A run killed with SIGKILL after a checkpoint and restarted reproduces the uninterrupted losses;
the loop in-process: accumulation, resume mid-accumulation, non-finite abort, kept checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import input_pipeline
from configs import tiny
from semask_jax.train import checkpointing
from semask_jax.train import optim
from semask_jax.train import state as state_lib
from semask_jax import sharding as sharding_lib
from semask_jax.train import loop as train
from semask_jax.sharding import make_mesh
from tests import agreement

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


def records(workdir):
  """The training records of metrics.jsonl (one per logged update), in order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if 'loss' in r]


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
  # Inference reads params and batch_stats alone, and names what differs.
  with pytest.raises(ValueError, match=r"does not match this config's model \(\d+ differences\)"
                     r': params\.backbone\.\S+: stored \([\d, ]+\), expected \([\d, ]*24[\d, ]*\)'):
    state_lib.restore_for_inference(config, str(run_dir), make_mesh(jax.devices()[:1]))
  # Training into that workdir with it: one line that names the difference and the config
  # that wrote the checkpoint, which stays as it was.
  written = (run_dir / 'config.json').read_text()
  out = subprocess.run(main_cmd(run_dir, '--config.model.embed_dim=24'), env=env,
                       capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: checkpoint ') and 'params.backbone.' in last, last
  assert str(run_dir / 'config.json') in last and 'Traceback' not in out.stderr, last
  assert (run_dir / 'config.json').read_text() == written


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


# ----------------------------------------------------------------------------- the loop, in-process
# Accumulation over micro steps, non-finite micro steps, how many checkpoints are kept,
# a checkpoint without the data-iterator item. The runs share one compiled step.

_PROGRAM_FREE_KEYS = ('keep_checkpoints', 'checkpoint_every_steps', 'max_nonfinite_steps',
                      'log_every_steps', 'async_checkpointing')
_COMPILED: dict[str, object] = {}  # program key -> jitted train step
_AHEAD: dict[int, object] = {}      # id(jitted) -> its compiled executable


def loop_config(**overrides):
  c = tiny.get_config()
  c.batch_size = 16
  c.grad_accum_steps = 2  # micro batches of 8 images over the 8 test devices
  c.total_steps = 3
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.keep_checkpoints = 2
  c.async_checkpointing = False
  c.update(overrides)
  return c


@pytest.fixture
def run_loop(monkeypatch):
  """run(config, workdir, nan_micro=(), stop_after=None): train.train_and_evaluate in this
  process, with NaN images at the given micro steps (0-based, counted in this call) and
  a SIGTERM seen at the `stop_after`-th update boundary."""
  real_jit, real_batch = train.jit_train_step, input_pipeline.make_global_batch
  real_ahead = sharding_lib.compile_ahead

  def run(config, workdir, nan_micro=(), stop_after=None):
    program = config.copy_and_resolve_references()
    for k in _PROGRAM_FREE_KEYS:
      del program[k]
    key = program.to_json_best_effort(sort_keys=True)
    calls = {'batch': 0, 'boundary': 0}

    def jit_once(*args, **kwargs):
      if key not in _COMPILED:
        _COMPILED[key] = real_jit(*args, **kwargs)
      return _COMPILED[key]

    def compile_once(jitted, name, *args):
      if name != 'train_step':
        return real_ahead(jitted, name, *args)
      if id(jitted) not in _AHEAD:
        _AHEAD[id(jitted)] = real_ahead(jitted, name, *args)
      return _AHEAD[id(jitted)]

    def batch_fn(local, mesh):
      if calls['batch'] in nan_micro:
        local = dict(local, image=np.full_like(local['image'], np.nan))
      calls['batch'] += 1
      return real_batch(local, mesh)

    def sigterm(self):
      calls['boundary'] += 1
      return calls['boundary'] == stop_after

    monkeypatch.setattr(train, 'jit_train_step', jit_once)
    monkeypatch.setattr(sharding_lib, 'compile_ahead', compile_once)
    monkeypatch.setattr(input_pipeline, 'make_global_batch', batch_fn)
    monkeypatch.setattr(train._SigtermFlag, 'any_process', sigterm)
    return train.train_and_evaluate(config, str(workdir))

  return run


def restore(config, workdir, step):
  mesh = make_mesh()
  state = state_lib.init_train_state(config, state_lib.create_model(config), mesh)[0]
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    return jax.device_get(ckpt.restore(step, checkpointing.abstract_like(state)))
  finally:
    ckpt.close()


def test_loop_accumulation_keep_and_resume_mid_accumulation(tmp_path, run_loop):
  """k=2 micro steps per update; a non-finite micro step is dropped from the accumulation,
  so the next checkpoint holds a half-accumulated gradient, and a run stopped there and
  restarted reproduces the uninterrupted one."""
  config = loop_config(max_nonfinite_steps=1)  # exactly at the limit: no abort
  ref_dir, run_dir = tmp_path / 'ref', tmp_path / 'run'
  run_loop(config, ref_dir, nan_micro={1})
  ref = losses(ref_dir)
  assert sorted(ref) == [1, 2, 3] and ref[1] == 'nan' and np.isfinite([ref[2], ref[3]]).all()
  # keep_checkpoints=2 of the checkpoints 1, 2, 3 (numbered by updates).
  kept = sorted(int(p.name) for p in (ref_dir / 'checkpoints').iterdir() if p.name.isdigit())
  assert kept == [2, 3]
  final = restore(config, ref_dir, 3)
  assert int(final.step) == 6 and int(final.nonfinite) == 1
  # 5 finite micro gradients: 2 updates and one gradient waiting for its partner.
  assert int(optim.optimizer_updates(final.opt_state)) == 2
  assert int(final.opt_state.mini_step) == 1

  # Stopped (SIGTERM) after update 1, whose second micro step was non-finite: the
  # checkpoint is in the middle of an accumulation.
  stop_config = loop_config(max_nonfinite_steps=1, checkpoint_every_steps=100)
  run_loop(stop_config, run_dir, nan_micro={1}, stop_after=1)
  mid = restore(config, run_dir, 1)
  assert int(mid.step) == 2 and int(mid.opt_state.mini_step) == 1
  assert int(optim.optimizer_updates(mid.opt_state)) == 0
  assert np.abs(np.asarray(jax.tree_util.tree_leaves(mid.opt_state.acc_grads)[0])).max() > 0
  run_loop(stop_config, run_dir)  # resumes at micro step 2 with the data stream's position
  steps = [json.loads(line)['step'] for line in open(run_dir / 'metrics.jsonl')]
  assert steps == [1, 2, 3]  # update 1 before the stop, 2 and 3 after the restart
  got = losses(run_dir)
  np.testing.assert_allclose([got[2], got[3]], [ref[2], ref[3]], rtol=1e-6)
  resumed = restore(config, run_dir, 3)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                         (resumed.params, resumed.batch_stats), (final.params, final.batch_stats))
  assert int(resumed.step) == 6 and int(resumed.nonfinite) == 1


def test_loop_stops_after_max_nonfinite_steps(tmp_path, run_loop):
  config = loop_config(max_nonfinite_steps=2)
  with pytest.raises(train.NonFiniteLossError, match=r'max_nonfinite_steps=2\); stopped at step 2'):
    run_loop(config, tmp_path, nan_micro={1, 2, 3})
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['step'], r['nonfinite_total']) for r in records] == [(1, 1), (2, 3)]
  # The update that crossed the limit is not checkpointed.
  kept = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert kept == [1]


def test_checkpoint_without_data_iterator_state(tmp_path):
  """A state-only checkpoint serves evaluation, but training refuses to resume from it
  (the data stream's position is unknown)."""
  config = tiny.get_config()
  mesh = make_mesh()
  state = state_lib.init_train_state(config, state_lib.create_model(config), mesh)[0]
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(2, state)
  ckpt.close()
  assert not (tmp_path / 'checkpoints' / '2' / checkpointing.DATA).exists()
  restored, _, _, step = state_lib.restore_for_inference(config, str(tmp_path), mesh)
  assert step == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored.params),
                         jax.device_get(state.params))
  with pytest.raises(FileNotFoundError, match='no .data_iter. item'):
    train.train_and_evaluate(config, str(tmp_path))


def test_fsdp_run_stopped_and_resumed_matches_the_replicated_run(tmp_path, run_loop):
  """config.state_sharding='fsdp': a run stopped after update 1 and restarted (its state
  restored split over the devices) gives the uninterrupted run's losses and weights, and
  the replicated run's up to float32 summation order; its checkpoints restore under
  either setting, and the training loop's evaluation takes the split state."""
  rep_config = loop_config(eval_every_steps=3)
  fsdp_config = loop_config(eval_every_steps=3, checkpoint_every_steps=100,
                            state_sharding='fsdp', fsdp_min_size=0)
  rep_dir, fsdp_dir, whole_run_dir = tmp_path / 'replicated', tmp_path / 'fsdp', tmp_path / 'once'
  want_eval = run_loop(rep_config, rep_dir)
  run_loop(fsdp_config, whole_run_dir)  # uninterrupted
  run_loop(fsdp_config, fsdp_dir, stop_after=1)
  assert sorted(losses(fsdp_dir)) == [1]
  got_eval = run_loop(fsdp_config, fsdp_dir)
  # Resumed exactly: the uninterrupted split run's losses and state.
  np.testing.assert_allclose([losses(fsdp_dir)[s] for s in (1, 2, 3)],
                             [losses(whole_run_dir)[s] for s in (1, 2, 3)], rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                         restore(fsdp_config, fsdp_dir, 3), restore(fsdp_config, whole_run_dir, 3))
  # The replicated run's, up to the order of float32 sums (tests/test_fsdp.py).
  np.testing.assert_allclose([losses(fsdp_dir)[s] for s in (1, 2, 3)],
                             [losses(rep_dir)[s] for s in (1, 2, 3)], rtol=1e-5)
  assert got_eval['mIoU'] == pytest.approx(want_eval['mIoU'], abs=1e-9)
  want = restore(rep_config, rep_dir, 3)
  split = restore(fsdp_config, fsdp_dir, 3)
  whole = restore(rep_config, fsdp_dir, 3)  # the split checkpoint restored whole: the same
  jax.tree_util.tree_map(np.testing.assert_array_equal, whole, split)
  # Every parameter within 2 x the applied lr (3 updates), beyond 1e-6 only where Adam had
  # no gradient; the moments within the gradients' summation-order noise (tests/agreement.py).
  lr_sum = sum(r['lr'] for r in records(rep_dir))
  agreement.assert_params_agree(split.params, want.params,
                                agreement.gradient_rms(want.opt_state, rep_config.optimizer.b2),
                                2 * lr_sum)
  agreement.assert_moments_agree(split.opt_state, want.opt_state, rep_config.optimizer.b1,
                                 rep_config.optimizer.b2)
