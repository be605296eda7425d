r"""SeMask-JAX entry point: train (default), eval or predict.

  python main.py                      # the CPU demo: configs/demo.py into ./workdir/demo
  python main.py --config=configs/ade20k_semask_fpn.py:T --workdir=runs/ade_t
  python main.py --config=configs/ade20k_semask_fpn.py:T --workdir=runs/ade_t --mode=eval
  python main.py --config=... --workdir=runs/ade_t --mode=predict --input=photos/

Multi-process (GPU/CPU hosts): pass --coordinator_address, --num_processes and
--process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
TPU pods and SLURM/Open MPI jobs are detected by jax.distributed.initialize().

A mistake (a missing config file, an unknown --config key, a bad flag value, no
checkpoint to evaluate, an unreadable input, a data set not prepared) ends with
one `error: ...` line on stderr and exit status 2; a traceback means a bug.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from typing import Iterator

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from semask_jax import cli

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, 'configs', 'demo.py')

# --config is defined in _define_config_flag (it parses the config file when defined).
flags.DEFINE_string('workdir', 'workdir/demo', 'Checkpoints, logs, eval results, predictions.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'What to run.')
flags.DEFINE_string('input', None, '--mode=predict: an image file or a folder of images.')
flags.DEFINE_string('output', None, '--mode=predict: output folder (default workdir/predictions).')
flags.DEFINE_bool('distributed', None, 'Call jax.distributed.initialize() (default: when '
                  'coordinator flags/env vars are set or on a TPU pod / SLURM / MPI job).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process).')
FLAGS = flags.FLAGS


def _maybe_initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  explicit = FLAGS.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  auto = any(k in os.environ for k in ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE'))
  wanted = FLAGS.distributed if FLAGS.distributed is not None else bool(explicit or auto)
  if not wanted:
    return
  kwargs = {}
  if FLAGS.coordinator_address:
    kwargs['coordinator_address'] = FLAGS.coordinator_address
  if FLAGS.num_processes is not None:
    kwargs['num_processes'] = FLAGS.num_processes
  if FLAGS.process_id is not None:
    kwargs['process_id'] = FLAGS.process_id
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


class _QuietLibraries:
  """absl-handler filter: drops INFO chatter of orbax/grain (one line per file written), and
  TFDS's warning on a data set that is not prepared (the error that follows says what to do)."""

  def filter(self, record) -> bool:
    if 'has no dataset_info.json' in record.getMessage():
      return False
    noisy = any(p in record.pathname for p in ('/orbax/', '/grain/'))
    return record.levelno >= 30 or not noisy


def _config_argument(argv: list[str]) -> str:
  """The value of the last --config in argv (absl's rule), else the default config."""
  value = _DEFAULT_CONFIG
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    if arg in ('--config', '-config') and i + 1 < len(argv):
      value = argv[i + 1]
    elif m := re.match(r'^--?config=(.*)$', arg):
      value = m.group(1)
  return value


def _load_config(spec: str) -> ml_collections.ConfigDict:
  """get_config(arg) of 'file.py[:arg]', as config_flags loads it (for error messages)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_main_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*([arg] if arg else []))


@contextlib.contextmanager
def _unknown_config_keys(argv: list[str]) -> Iterator[None]:
  """ml_collections raises KeyError/AttributeError for an unknown --config.<key>: a UserError
  naming the key and the closest existing one; any other such error stays a bug."""
  try:
    yield
  except (KeyError, AttributeError) as e:
    names = [m.group(2) for a in argv if (m := re.match(r'^--?(no)?config\.([^=]+)', a))]
    error = cli.unknown_key_error(_load_config(_config_argument(argv)), names)
    if error is None:
      raise
    raise error from e


def _define_config_flag(argv: list[str]) -> None:
  """Defines --config. Without --config on the command line this loads the default
  config and applies the --config.x=y overrides now."""
  path = _config_argument(argv).split(':', 1)[0]
  if not os.path.isfile(path):
    raise cli.UserError(f'config file {path!r} not found')
  with _unknown_config_keys(argv):
    config_flags.DEFINE_config_file(
        'config', _DEFAULT_CONFIG,
        'Config file (optionally file.py:arg); override fields with --config.x=y.',
        lock_config=True)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with its errors (unknown flag, bad value) as UserErrors."""
  with _unknown_config_keys(argv):
    try:
      args = FLAGS(argv)
    except flags.Error as e:
      message = str(e)
      if 'Error whilst parsing config file' in message:  # get_config(arg) raised: its message
        last = re.sub(r'^\w+: ', '', message.strip().splitlines()[-1])
        message = f'--config={_config_argument(argv)}: {last}'
      raise cli.UserError(message) from e
  try:  # config_flags defers a file it could not load (e.g. named in a --flagfile) to here
    FLAGS.config.keys()
  except OSError as e:
    raise cli.UserError(f'--config: {e}') from e
  return args


def _run(argv: list[str]) -> None:
  _define_config_flag(argv)
  app.run(main, argv, flags_parser=_parse_flags)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.mode == 'predict' and not FLAGS.input:
    raise cli.UserError('--mode=predict needs --input (an image or a folder)')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _maybe_initialize_distributed()
  # pylint: disable=g-import-not-at-top  (after distributed init)
  from semask_jax import compile_cache
  from semask_jax.train import modes
  from semask_jax.evaluation import predict
  from semask_jax import train
  config, workdir = FLAGS.config, FLAGS.workdir
  if FLAGS.mode == 'predict':
    predict.check_readable(predict.list_images(FLAGS.input))  # before anything is built
  cache = config.compilation_cache_dir
  if cache != 'off':  # a restarted or repeated run loads its compiled programs from disk
    logging.info('Persistent compilation cache: %s', compile_cache.enable(cache or None))
  if FLAGS.mode == 'train':
    results = train.train_and_evaluate(config, workdir)
    if config.demo_predictions:
      modes.demo_predictions(config, workdir)
    if results:
      print(f'Final eval: mIoU {results["mIoU"]:.4f}  aAcc {results["aAcc"]:.4f}  '
            f'mAcc {results["mAcc"]:.4f}  (workdir {os.path.abspath(workdir)})', flush=True)
  elif FLAGS.mode == 'eval':
    results = modes.evaluate_only(config, workdir)
    print(f'Eval: mIoU {results["mIoU"]:.4f}  aAcc {results["aAcc"]:.4f}', flush=True)
  else:
    written = modes.predict_only(config, workdir, FLAGS.input, FLAGS.output)
    print(f'Wrote {len(written)} images', flush=True)


if __name__ == '__main__':
  sys.path.insert(0, _HERE)
  cli.run(_run, sys.argv)
