"""Checkpoints of a run: train state (params, optimizer, BN statistics, step, RNG) + data iterator.

One orbax CheckpointManager in `workdir/checkpoints`, asynchronous, keeping the
last `keep` steps. The grain iterator state is saved next to the arrays (one
JSON file a process), so a restarted run continues with the very batches an
uninterrupted run would have drawn.

Arrays are written by one replica each in a single-process run. Orbax's default
(replica-parallel saving, on wherever JAX_PLATFORMS does not name a GPU) splits every
replicated array into one slice per device, each cut by its own jitted slice: on 8
devices SeMask-B's state took 33.7 s to save the first time and ~11.5 s later, against
4.3-4.9 s written whole (docs/performance.md), for nothing when one process writes everything. With several processes the hosts share the
writing of arrays of at least `_REPLICA_PARALLEL_MIN_BYTES` a slice.
"""
from __future__ import annotations

import collections
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from semask_jax import cli
from semask_jax.train import optim

STATE = 'state'
DATA = 'data_iter'
_REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The train state's handler: the default one with replica-parallel saving set
  explicitly (module docstring). The state's leaves are all jax.Arrays, none a typed
  PRNG key (the rng is raw uint32), so no array-metadata store is needed."""
  arrays = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=jax.process_count() > 1,
      min_slice_bytes_for_replica_parallel=_REPLICA_PARALLEL_MIN_BYTES)
  return ocp.PyTreeCheckpointHandler(
      type_handler_registry=ocp.type_handlers.create_type_handler_registry((jax.Array, arrays)))


class CheckpointMismatchError(cli.UserError, ValueError):
  """A checkpoint written for another model or optimizer than the config's."""


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs by step."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: _state_handler(),
                       DATA: grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any | None = None, *, force: bool = False) -> bool:
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info('Saving checkpoint of step %d to %s', step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
    """Restores the train state into the shapes/shardings of `abstract_state`; the iterator in place."""
    items = {STATE: ocp.args.PyTreeRestore(
        abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if data_iter is not None:
      if not self._has_item(step, DATA):
        raise cli.PathNotFoundError(
            f'checkpoint {self.directory}/{step} has no {DATA!r} item: cannot resume the data stream')
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    self._check_matches(step, self._manager.item_metadata(step)[STATE], abstract_state,
                        'model or optimizer')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      # The tree and the shapes agreed (_check_matches), so this is no mismatch with the
      # config but orbax's own failure (a damaged file, a bug): its error and traceback stay.
      e.add_note(f'while restoring checkpoint {self.directory}/{step}')
      raise
    return restored[STATE]

  def restore_fields(self, step: int, abstract_fields: dict[str, Any]) -> dict[str, Any]:
    """Restores only some top-level fields of a saved train state (inference: params and
    batch_stats, without the optimizer state, twice the model's size, or the iterator).

    abstract_fields: {field: tree of ShapeDtypeStructs with shardings}. The stored
    fields must have exactly these leaves and shapes (a checkpoint of another model
    is refused, as `restore` does).
    """
    # The iterator's handler is registered (orbax warns about items without one) but
    # its item is not read.
    reader = ocp.CheckpointManager(self.directory,
                                   item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                                                  DATA: grain.checkpoint.CheckpointHandler()})
    try:
      stored = reader.item_metadata(step)[STATE]
      self._check_matches(step, {f: stored.get(f, {}) if hasattr(stored, 'get') else {}
                                 for f in abstract_fields}, abstract_fields, 'model')
      restore_args = jax.tree_util.tree_map(
          lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract_fields)
      restored = reader.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
          abstract_fields, restore_args=restore_args, partial_restore=True)}))
    finally:
      reader.close()
    return dict(restored[STATE])

  def _check_matches(self, step: int, stored: Any, target: Any, what: str) -> None:
    """Raises CheckpointMismatchError naming the leaves whose shapes differ (or that one
    side lacks) between a stored state and the restore target: a checkpoint of another
    model, variant, head or optimizer, in a few lines rather than orbax's tree dump."""
    have, want = _shapes(stored), _shapes(target)
    shapes = sorted((k for k in set(have) & set(want) if have[k] != want[k]),
                    key=lambda k: (not k.startswith('params.'), k))  # the model's own first
    stored_only, target_only = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    count = len(shapes) + len(stored_only) + len(target_only)
    if not count:
      return
    problems = [f'{k}: stored {have[k]}, expected {want[k]}' for k in shapes[:6]]
    if len(shapes) > 6:
      problems.append(f'{len(shapes) - 6} more shapes differ')
    if stored_only:
      problems.append(f'only in the checkpoint: {_by_part(stored_only)}')
    if target_only:
      problems.append(f'not in the checkpoint: {_by_part(target_only)}')
    written_by = os.path.join(os.path.dirname(self.directory), 'config.json')
    source = (f'it was written with {written_by}' if os.path.exists(written_by)
              else 'it was written with another config')
    hint = f' ({source}; use that config, or another --workdir)'
    raise CheckpointMismatchError(
        f'checkpoint {self.directory}/{step} does not match this config\'s {what} '
        f'({count} differences): ' + '; '.join(problems) + hint)

  def _has_item(self, step: int, name: str) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), name))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


# Path components of optimizer states that name no part of the model.
_OPTIMIZER_WORDS = frozenset({'mu', 'nu', 'count', 'inner_state', 'inner_states'})


def _by_part(names: list[str], most: int = 6) -> str:
  """'params.decode_head.* (120), opt_state.decode_head.* (240)': leaf names counted by
  their field and first model part (optimizer-state indices and words skipped)."""
  def part(name: str) -> str:
    field, *rest = name.split('.')
    top = next((p for p in rest if not p.isdigit() and p not in _OPTIMIZER_WORDS), None)
    return f'{field}.{top}.*' if top else field
  counts = collections.Counter(part(n) for n in names)
  text = ', '.join(f'{p} ({n})' for p, n in counts.most_common(most))
  return text + (f' and {len(counts) - most} more' if len(counts) > most else '')


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a.b.c': shape} of a tree of arrays, ShapeDtypeStructs or orbax array metadata."""
  return {optim.param_name(path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of `tree` (the restore target)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
