"""Confusion matrix / mIoU against NumPy on known predictions; the TensorBoard event writer."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semask_jax import metrics, summary


def numpy_confusion(pred, label, k, ignore=255):
  cm = np.zeros((k, k), np.int64)
  for p, l in zip(pred.ravel(), label.ravel()):
    if l != ignore:
      cm[l, p] += 1
  return cm


def test_confusion_matrix_matches_numpy_with_ignore_and_padding():
  rng = np.random.default_rng(0)
  k = 5
  label = rng.integers(0, k, (4, 9, 7)).astype(np.int32)
  label[rng.random(label.shape) < 0.2] = 255
  pred = rng.integers(0, k, (4, 9, 7)).astype(np.int32)
  valid = np.array([True, True, False, True])
  got = jax.jit(functools.partial(metrics.confusion_matrix, ignore_index=255),
                static_argnums=(2,))(jnp.asarray(pred), jnp.asarray(label), k,
                                     valid=jnp.asarray(valid))
  want = numpy_confusion(pred[valid], label[valid], k)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert int(got.sum()) == int((label[valid] != 255).sum())


def test_confusion_matrix_sums_over_a_sharded_batch():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  rng = np.random.default_rng(1)
  label = rng.integers(0, 3, (8, 6, 6)).astype(np.int32)
  pred = rng.integers(0, 3, (8, 6, 6)).astype(np.int32)
  got = jax.jit(functools.partial(metrics.confusion_matrix, ignore_index=255),
                static_argnums=(2,))(jax.device_put(pred, sharding),
                                     jax.device_put(label, sharding), 3)
  np.testing.assert_array_equal(np.asarray(got), numpy_confusion(pred, label, 3))


def test_compute_metrics_known_values():
  # rows = label, cols = prediction. Class 3: never labelled, never predicted -> skipped.
  # Class 2: predicted once, never labelled -> IoU 0 counted, Acc NaN skipped.
  cm = np.array([[8, 2, 0, 0],
                 [1, 3, 1, 0],
                 [0, 0, 0, 0],
                 [0, 0, 0, 0]])
  m = metrics.compute_metrics(cm, ['a', 'b', 'c', 'd'])
  iou_a, iou_b = 8 / (10 + 9 - 8), 3 / (5 + 5 - 3)
  assert m['mIoU'] == pytest.approx((iou_a + iou_b + 0.0) / 3)
  assert m['mAcc'] == pytest.approx((8 / 10 + 3 / 5) / 2)
  assert m['aAcc'] == pytest.approx(11 / 15)
  per = {r['class']: r for r in m['per_class']}
  assert per['c']['IoU'] == 0.0 and per['c']['Acc'] is None
  assert per['d']['IoU'] is None
  table = metrics.format_table(m)
  assert 'a ' in table and f'{100 * iou_b:5.2f}' in table and 'mIoU' in table
  json.dumps(m)  # serialisable as written to the workdir
  with pytest.raises(ValueError, match='class names'):
    metrics.compute_metrics(cm, ['a'])


def test_crc32c_and_event_file_round_trip(tmp_path):
  assert summary.crc32c(b'123456789') == 0xE3069283  # the standard CRC-32C check value
  w = summary.MetricWriter(str(tmp_path))
  w.write_scalars(3, {'loss': 0.5, 'lr': np.float32(1e-4)})
  w.write_scalars(4, {'loss': float('nan')})
  w.close()
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents.')]
  assert len(events) == 1
  records = summary.read_events(str(tmp_path / events[0]))
  assert len(records) == 3  # file_version + 2 steps
  assert b'brain.Event:2' in records[0]
  assert b'loss' in records[1] and b'lr' in records[1]
  assert records[1] == summary.encode_event(3, _wall_time(records[1]), {'loss': 0.5, 'lr': np.float32(1e-4)})
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert lines[0] == {'step': 3, 'loss': 0.5, 'lr': pytest.approx(1e-4)}
  assert lines[1]['loss'] == 'nan'


def _wall_time(record: bytes) -> float:
  import struct
  assert record[0] == 0x09
  return struct.unpack('<d', record[1:9])[0]
