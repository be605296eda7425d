"""JAX's persistent compilation cache, on for every program this project compiles.

A resumed (or repeated) run loads its compiled steps from disk instead of
running XLA again: the SeMask-B training step takes minutes to compile on a GPU.

  from semask_jax import compile_cache
  compile_cache.enable(os.path.join(workdir, "jax_cache"))   # or enable(None): user cache dir

Multi-process safety. Entries are keyed by a hash of the program, the compile
options, the backend and the JAX/XLA versions, so processes that share one
directory never read an entry compiled for something else. Several processes
may use the same directory at once:
  * jax.distributed jobs: only process 0 writes entries (JAX's rule); the others
    read them.
  * independent processes (two runs, a run and an evaluation): JAX writes an
    entry in place, not atomically, so a reader could see a half-written file.
    `enable` therefore sets a size limit, which turns on JAX's LRU eviction and
    with it a `filelock` lock file (`.lockfile`) held around every read and
    write. A reader that times out on the lock or reads a bad entry gets a
    warning and compiles instead: never a wrong program.
  * a non-local path (gs://...) needs etils[epath]; there the lock is a soft
    lock file.
The cache is trusted: whoever can write to the directory can run code in the
processes that read it, so do not point it at a directory others may write.
"""
from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache as _cc

# LRU bound on the cache directory. Also what enables the cross-process lock (see above).
DEFAULT_MAX_BYTES = 8 * 2 ** 30

ENV_DIR = "SEMASK_JAX_COMPILATION_CACHE"


def default_cache_dir() -> str:
  """$SEMASK_JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME (~/.cache)/semask_jax/xla."""
  if os.environ.get(ENV_DIR):
    return os.path.expanduser(os.environ[ENV_DIR])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "semask_jax", "xla")


def enable(cache_dir: str | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
           min_compile_time_s: float = 0.0) -> str:
  """Turns on the persistent compilation cache in `cache_dir` and returns the directory.

  cache_dir: None for `default_cache_dir()`; a workdir-relative choice is the
    caller's (e.g. f"{workdir}/jax_cache").
  max_bytes: LRU bound on the directory (-1: unbounded, and then no lock file:
    only safe with a single writer process).
  min_compile_time_s: programs that compile faster are not written. 0 caches all,
    which on CPU saves the many sub-second compiles of small programs too; JAX's
    default (1 s) would skip them.

  Call it before the first compilation that should be cached. Calling it again
  with another directory moves the cache there.
  """
  path = cache_dir if cache_dir else default_cache_dir()
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path or not jax.config.jax_enable_compilation_cache:
    # JAX opens its cache, and decides whether it is used at all, once per process (at the
    # first compile): re-open it, or a compile made while it was off keeps it off.
    _cc.reset_cache()
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
  # -1: no minimum entry size, and no backend-chosen override of it.
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return path


def disable() -> None:
  """Turns the persistent cache off again (in-memory caches are unaffected)."""
  jax.config.update("jax_enable_compilation_cache", False)
  if jax.config.jax_compilation_cache_dir is not None:
    _cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", None)
