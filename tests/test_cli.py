"""Every command line turns a user's mistake into one `error:` line and exit status 2, no traceback.

Each case runs the real entry point in a subprocess and fails before any model is
compiled. Where the run has started logging (absl INFO lines on stderr), the error
is the last line.
"""
import os
import subprocess
import sys

import pytest

from semask_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')


def run(*args: str, cwd: str = ROOT) -> tuple[int, list[str], str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env,
                     timeout=300, check=False)
  return p.returncode, p.stderr.splitlines(), p.stdout


def assert_user_error(rc: int, err: list[str], *, one_line: bool = True) -> str:
  """The error line; exactly one stderr line when `one_line`, else the last one."""
  text = '\n'.join(err)
  assert rc == 2, text
  assert 'Traceback' not in text, text
  if one_line:
    assert len(err) == 1, text
  assert err[-1].startswith('error: '), text
  return err[-1]


@pytest.fixture(scope='module')
def bad_image(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp('inputs') / 'photo.png'
  path.write_text('not an image')
  return str(path)


def test_main_config_file_missing(tmp_path):
  rc, err, _ = run('main.py', '--config=nope/missing.py', f'--workdir={tmp_path}')
  assert assert_user_error(rc, err) == "error: config file 'nope/missing.py' not found"


@pytest.mark.parametrize('config', [[], [f'--config={TINY}']], ids=['default_config', 'tiny'])
def test_main_unknown_config_key_suggests_the_closest(tmp_path, config):
  # Without --config, ml_collections applies the overrides when the flag is defined.
  rc, err, _ = run('main.py', *config, '--config.total_stepz=3', f'--workdir={tmp_path}')
  line = assert_user_error(rc, err)
  assert line == "error: --config.total_stepz: no such config key; did you mean 'total_steps'?"


def test_main_bad_values_and_flags(tmp_path):
  rc, err, _ = run('main.py', f'--config={TINY}', '--config.total_steps=abc', f'--workdir={tmp_path}')
  assert assert_user_error(rc, err) == (
      "error: flag --config.total_steps=abc: invalid literal for int() with base 10: 'abc'")
  rc, err, _ = run('main.py', f'--config={TINY}', '--mode=predict', f'--workdir={tmp_path}')
  assert assert_user_error(rc, err) == (
      'error: --mode=predict needs --input (an image or a folder)')
  ade = os.path.join(ROOT, 'configs', 'ade20k_semask_fpn.py')
  rc, err, _ = run('main.py', f'--config={ade}:X', f'--workdir={tmp_path}')
  assert assert_user_error(rc, err) == (
      f"error: --config={ade}:X: config argument must be one of T, S, B, L; got 'X'")


@pytest.mark.parametrize('flag, message', [
    ('--config.xla_gpu_fast_compile=fast',
     "error: config.xla_gpu_fast_compile must be one of ('train', 'all', 'none'), got 'fast'"),
    ('--config.xla_cpu_ynn_fusions=lean',
     "error: config.xla_cpu_ynn_fusions must be one of ('tuned', 'xla'), got 'lean'"),
    ('--config.loss.group_size=-1',
     "error: config.loss.group_size must be an integer >= 0 (0: the whole batch), got -1"),
    ('--config.loss.ce_backward=checkpoint',
     "error: config.loss.ce_backward must be one of ('auto', 'remat', 'custom_vjp', 'pallas'), "
     "got "
     "'checkpoint'"),
])
def test_main_bad_compile_and_loss_choices_fail_before_any_work(tmp_path, flag, message):
  rc, err, _ = run('main.py', f'--config={TINY}', flag, f'--workdir={tmp_path}')
  assert assert_user_error(rc, err, one_line=False) == message
  assert not any('Compiling' in line or 'Parameters' in line for line in err), err


def test_main_predict_input_missing_or_unreadable(tmp_path, bad_image):
  rc, err, _ = run('main.py', f'--config={TINY}', '--mode=predict', f'--input={tmp_path}/nope',
                   f'--workdir={tmp_path}')
  assert assert_user_error(rc, err) == (
      f"error: prediction input '{tmp_path}/nope' is neither a file nor a folder")
  rc, err, _ = run('main.py', f'--config={TINY}', '--mode=predict', f'--input={bad_image}',
                   f'--workdir={tmp_path}')
  assert assert_user_error(rc, err).startswith(f"error: cannot read image '{bad_image}'")


def test_main_eval_without_checkpoint(tmp_path):
  rc, err, _ = run('main.py', f'--config={TINY}', '--mode=eval', f'--workdir={tmp_path}')
  line = assert_user_error(rc, err, one_line=False)
  assert line == (f'error: no checkpoint in {tmp_path}/checkpoints and no config.init_from: '
                  'nothing to evaluate or predict with')


def test_main_train_without_prepared_data(tmp_path):
  rc, err, _ = run('main.py', f'--config={os.path.join(ROOT, "configs", "ade20k_semask_fpn.py")}:T',
                   f'--config.data.data_dir={tmp_path}/tfds', f'--workdir={tmp_path}/w')
  line = assert_user_error(rc, err, one_line=False)
  assert line.startswith(f"error: ade20k is not prepared in data_dir='{tmp_path}/tfds'")
  assert 'python -m input_pipeline.prepare --dataset ade20k' in line


def test_convert_weights_missing_pth(tmp_path):
  rc, err, _ = run('-m', 'convert_weights', 'semask', '--pth', f'{tmp_path}/nope.pth',
                   '--out', f'{tmp_path}/out')
  assert assert_user_error(rc, err) == f'error: checkpoint not found: {tmp_path}/nope.pth'


def test_prepare_missing_download_folder(tmp_path):
  rc, err, _ = run('-m', 'input_pipeline.prepare', '--dataset', 'ade20k', '--manual_dir',
                   f'{tmp_path}/downloads', '--data_dir', f'{tmp_path}/tfds')
  line = assert_user_error(rc, err)
  assert line.startswith(f'error: prepare ade20k: manual_dir {tmp_path}/downloads is missing')
  assert 'ADEChallengeData2016.zip' in line


def test_bench_bad_config_and_variant(tmp_path):
  rc, err, _ = run('-m', 'semask_jax.bench', '--config', f'{tmp_path}/nope.py')
  assert assert_user_error(rc, err) == f"error: config file '{tmp_path}/nope.py' not found"
  rc, err, _ = run('-m', 'semask_jax.bench', '--variant', 'Q')
  assert 'Q' in assert_user_error(rc, err)


# ----------------------------------------------------------------------------- the helper


def test_run_turns_user_errors_into_one_line_and_keeps_bugs(capsys):
  def user_mistake():
    raise cli.ConfigError('bad value\nsecond line')

  with pytest.raises(SystemExit) as e:
    cli.run(user_mistake)
  assert e.value.code == 2
  assert capsys.readouterr().err == 'error: bad value second line\n'
  # A path the user gave is one line; a FileNotFoundError from deep inside is a bug.
  def missing_user_path():
    raise cli.PathNotFoundError("prediction input 'x.jpg' is neither a file nor a folder")

  with pytest.raises(SystemExit) as e:
    cli.run(missing_user_path)
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      "error: prediction input 'x.jpg' is neither a file nor a folder\n")
  with pytest.raises(FileNotFoundError):
    cli.run(lambda: open('/nonexistent/file'))
  assert capsys.readouterr().err == ''
  assert issubclass(cli.PathNotFoundError, FileNotFoundError)

  def bug():
    raise KeyError('a bug')

  with pytest.raises(KeyError):
    cli.run(bug)
  assert cli.run(lambda x: x + 1, 1) == 2
  assert issubclass(cli.InputError, ValueError) and issubclass(cli.ConfigError, ValueError)


def test_suggestions_over_nested_keys():
  config = {'total_steps': 1, 'optimizer': {'learning_rate': 1.0, 'warmup_steps': 2},
            'eval': {'flip': False}}
  assert cli.flat_keys(config) == ['total_steps', 'optimizer', 'optimizer.learning_rate',
                                   'optimizer.warmup_steps', 'eval', 'eval.flip']
  assert cli.unknown_key_error(config, ['total_steps', 'eval.flip']) is None
  msg = str(cli.unknown_key_error(config, ['eval.flip', 'optimizer.warmup_step']))
  assert msg == "--config.optimizer.warmup_step: no such config key; did you mean 'optimizer.warmup_steps'?"
  assert str(cli.unknown_key_error(config, ['warmup_steps'])).endswith(
      "did you mean 'optimizer.warmup_steps'?")
  assert str(cli.unknown_key_error(config, ['zzz'])) == '--config.zzz: no such config key'
  assert cli.format_error(ValueError('a\n  b\n  c'), details=True) == 'error: a\n    b\n    c'
