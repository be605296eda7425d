"""Command-line errors: a user's mistake ends in one line on stderr and exit status 2.

Every entry point (main.py, convert_weights, input_pipeline.prepare,
semask_jax.bench) runs its main function through `run`. A mistake in what the
user typed or named (a config file or key, a flag value, a missing checkpoint,
data set or input file, an unreadable image) raises `UserError` (`PathNotFoundError`
where a path the user gave does not exist); `run` prints `error: <message>` and exits
with status 2. Any other exception, a FileNotFoundError from deep inside a library
included, is a bug and keeps its traceback. Kept free of jax imports: it runs before them.
"""
from __future__ import annotations

import difflib
import sys
from typing import Any, Callable, Iterable, Mapping, NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A mistake in the command line, the config or the files it names (not a bug)."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (a ValueError for callers that catch those)."""


class InputError(UserError, ValueError):
  """An input file that cannot be read (a ValueError for callers that catch those)."""


class PathNotFoundError(UserError, FileNotFoundError):
  """A path the user gave (a checkpoint, a data or input folder) that does not exist (a
  FileNotFoundError for callers that catch those). A plain FileNotFoundError is a bug."""


# The exception types that are the user's mistakes at the command line.
EXPECTED = (UserError,)


def format_error(error: BaseException | str, details: bool = False) -> str:
  """`error: <message>` on one line (a multi-line message joined with spaces), or with
  `details`, its first line followed by the others indented (a report, e.g. of keys)."""
  text = error if isinstance(error, str) else str(error)
  lines = [line.rstrip() for line in text.splitlines() if line.strip()]
  if not lines:
    return f'error: {type(error).__name__}'
  if details:
    return '\n'.join([f'error: {lines[0].strip()}'] + ['  ' + line for line in lines[1:]])
  return 'error: ' + ' '.join(line.strip() for line in lines)


def report(error: BaseException | str, details: bool = False) -> int:
  """Prints format_error(error) on stderr; returns the exit status (for mains that return it)."""
  sys.stdout.flush()
  print(format_error(error, details), file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


def fail(error: BaseException | str, details: bool = False) -> NoReturn:
  """Prints format_error(error) on stderr and exits with status 2."""
  sys.exit(report(error, details))


def run(main_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """main_fn(*args, **kwargs), with the user's mistakes (EXPECTED) turned into `fail`."""
  try:
    return main_fn(*args, **kwargs)
  except EXPECTED as e:
    fail(e)


# ----------------------------------------------------------------------------- config keys


def flat_keys(config: Mapping[str, Any], prefix: str = '') -> list[str]:
  """Dotted paths of every field of a (nested) ConfigDict, inner nodes included."""
  keys = []
  for k, v in config.items():
    path = f'{prefix}{k}'
    keys.append(path)
    if hasattr(v, 'items'):
      keys.extend(flat_keys(v, path + '.'))
  return keys


def suggest(name: str, candidates: Iterable[str]) -> str | None:
  """The closest candidate to `name` (difflib), or None."""
  candidates = list(candidates)
  match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
  if not match:  # a right field name at the wrong level: --config.learning_rate
    leaf = name.rsplit('.', 1)[-1]
    by_leaf = {c.rsplit('.', 1)[-1]: c for c in reversed(candidates)}
    match = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)]
  return match[0] if match else None


def unknown_key_error(config: Mapping[str, Any], names: Iterable[str],
                      flag: str = 'config') -> ConfigError | None:
  """A ConfigError for the first of `names` (dotted override paths) that `config` lacks."""
  keys = flat_keys(config)
  known = set(keys)
  for name in names:
    if name not in known:
      hint = suggest(name, keys)
      message = f'--{flag}.{name}: no such config key'
      if hint:
        message += f'; did you mean {hint!r}?'
      return ConfigError(message)
  return None
