"""How the Checkpointer writes arrays: one replica each in a single-process run."""
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from semask_jax.train import checkpointing
from semask_jax import sharding as sharding_lib


def test_single_process_saves_replicated_arrays_whole(tmp_path, monkeypatch):
  """Orbax's replica-parallel saving cuts every replicated array into one slice per
  device, each by a jitted lax.slice_in_dim (a compile per shape and device: 13x slower
  first saves on 8 devices). One process writes everything anyway: no slices."""
  mesh = sharding_lib.make_mesh()
  assert mesh.size == 8
  rng = np.random.default_rng(0)
  host = {'big': rng.normal(size=(1024, 640)).astype(np.float32),  # 2.5 MiB: over the slice floor
          'small': rng.normal(size=(16, 8)).astype(np.float32),
          'step': np.int32(7)}
  state = sharding_lib.replicate(host, mesh)
  slices = []
  real = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, 'slice_in_dim', lambda *a, **k: slices.append(a) or real(*a, **k))
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  try:
    ckpt.save(1, state)
    assert not slices
    restored = ckpt.restore(1, checkpointing.abstract_like(state))
  finally:
    ckpt.close()
  for k, v in host.items():
    np.testing.assert_array_equal(np.asarray(restored[k]), v)
    assert restored[k].sharding == state[k].sharding
  # The check sees slices where orbax would make them (the default handler's behaviour).
  default = ocp.type_handlers.ArrayHandler(use_replica_parallel=True)
  item = ocp.CheckpointManager(
      str(tmp_path / 'default'), item_handlers=ocp.PyTreeCheckpointHandler(
          type_handler_registry=ocp.type_handlers.create_type_handler_registry(
              (jax.Array, default))))
  item.save(1, args=ocp.args.PyTreeSave({'big': state['big']}))
  item.wait_until_finished()
  item.close()
  assert len(slices) == mesh.size


def test_reading_the_state_alone_does_not_warn_about_the_data_iterator(tmp_path, caplog):
  """Evaluation and prediction restore params and batch_stats without the data iterator's
  item, on purpose: orbax's two warnings that the item 'could not be restored' are not
  given (its handler is registered), while other warnings still reach the log."""
  import grain
  from absl import logging as absl_logging
  state = {'params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}, 'step': np.int32(3)}
  data_iter = iter(grain.MapDataset.range(8).to_iter_dataset())
  next(data_iter)
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  try:
    ckpt.save(3, jax.device_put(state), data_iter)
  finally:
    ckpt.close()
  target = {'params': checkpointing.abstract_like(jax.device_put(state['params']))}
  with caplog.at_level('WARNING'):
    got = checkpointing.Checkpointer(str(tmp_path), async_save=False).restore_fields(3, target)
    absl_logging.warning('Item "other" was found in the checkpoint, but could not be restored.')
  np.testing.assert_array_equal(np.asarray(got['params']['w']), state['params']['w'])
  messages = [r.getMessage() for r in caplog.records]
  assert not [m for m in messages if checkpointing.DATA in m], messages
  assert any(m.startswith('Item "other"') for m in messages), messages


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
  """Shapes that differ are named (the model's parameters first); leaves on one side only
  are counted by model part; the config that wrote the checkpoint is pointed to."""
  from semask_jax import cli
  (tmp_path / 'config.json').write_text('{}')
  stored = {'params': {'a': np.zeros((2, 3), np.float32), 'head': {'w': np.zeros(4, np.float32)}},
            'opt_state': {'mu': {'a': np.zeros((2, 3), np.float32)}}, 'step': np.int32(1)}
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  try:
    ckpt.save(1, jax.device_put(stored))
    target = {'params': {'a': np.zeros((2, 4), np.float32), 'other': {'w': np.zeros(4, np.float32)}},
              'opt_state': {'mu': {'a': np.zeros((2, 4), np.float32)}}, 'step': np.int32(1)}
    with pytest.raises(checkpointing.CheckpointMismatchError) as e:
      ckpt.restore(1, checkpointing.abstract_like(jax.device_put(target)))
  finally:
    ckpt.close()
  assert isinstance(e.value, cli.UserError) and isinstance(e.value, ValueError)
  msg = str(e.value)
  assert "does not match this config's model or optimizer (4 differences): " in msg, msg
  assert msg.index('params.a: stored (2, 3), expected (2, 4)') < msg.index('opt_state.mu.a'), msg
  assert 'only in the checkpoint: params.head.* (1)' in msg, msg
  assert 'not in the checkpoint: params.other.* (1)' in msg, msg
  assert str(tmp_path / 'config.json') in msg and '\n' not in msg, msg


def test_a_restore_failure_that_is_no_mismatch_keeps_its_cause(tmp_path, monkeypatch):
  """Tree and shapes agree, and orbax still fails (a damaged file, a bug): its own error
  comes out, with its traceback and the checkpoint's path, not as a config mismatch."""
  state = {'params': {'a': np.zeros((2, 3), np.float32)}, 'step': np.int32(1)}
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  try:
    ckpt.save(1, jax.device_put(state))

    def broken(*args, **kwargs):
      raise KeyError('a damaged leaf')

    monkeypatch.setattr(ckpt._manager, 'restore', broken)  # pylint: disable=protected-access
    with pytest.raises(KeyError, match='a damaged leaf') as e:
      ckpt.restore(1, checkpointing.abstract_like(jax.device_put(state)))
  finally:
    ckpt.close()
  assert not isinstance(e.value, checkpointing.CheckpointMismatchError)
  assert any(f'checkpoint {tmp_path}/1' in note for note in e.value.__notes__)
