"""Confusion matrix / mIoU against NumPy on known predictions; the TensorBoard / jsonl writer."""
import functools
import io
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from semask_jax.evaluation import metrics
from semask_jax.train import summary


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


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), bit by bit: independent of the writer's implementation."""
  c = 0xFFFFFFFF
  for b in data:
    c ^= b
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
  return c ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
  c = _crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_event_file(path) -> list:
  """TensorBoard's record framing (length, masked CRC32C of it, payload, masked CRC32C of it)
  parsed by hand, payloads as tensorboardX's Event protos."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  data = open(path, 'rb').read()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (n,) = struct.unpack('<Q', header)
    assert struct.unpack('<I', data[pos + 8:pos + 12])[0] == _masked_crc32c(header)
    payload = data[pos + 12:pos + 12 + n]
    assert struct.unpack('<I', data[pos + 12 + n:pos + 16 + n])[0] == _masked_crc32c(payload)
    events.append(event_pb2.Event.FromString(payload))
    pos += 16 + n
  return events


def test_event_file_scalars_images_and_jsonl(tmp_path):
  assert _crc32c(b'123456789') == 0xE3069283  # the standard CRC-32C check value
  image = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
  w = summary.MetricWriter(str(tmp_path))
  w.write_scalars(3, {'loss': 0.5, 'lr': np.float32(1e-4)})
  w.write_scalars(4, {'loss': float('nan'), 'eval/mIoU': jnp.float32(0.25)})
  w.write_images(5, {'eval/example_0': image})
  with pytest.raises(ValueError, match='uint8'):
    w.write_images(5, {'bad': image.astype(np.float32)})
  w.close()
  w.write_scalars(6, {'loss': 1.0})  # closed: ignored
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents.')]
  assert len(events) == 1
  records = read_event_file(tmp_path / events[0])
  assert records[0].file_version == 'brain.Event:2'
  scalars = [(e.step, v.tag, v.simple_value) for e in records for v in e.summary.value
             if v.HasField('simple_value')]
  assert scalars == [(3, 'loss', 0.5), (3, 'lr', pytest.approx(1e-4)), (4, 'eval/mIoU', 0.25)]
  images = [(e.step, v.tag, v.image) for e in records for v in e.summary.value if v.HasField('image')]
  assert [(s, t) for s, t, _ in images] == [(5, 'eval/example_0')]
  im = images[0][2]
  assert (im.height, im.width, im.colorspace) == (6, 9, 3)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(im.encoded_image_string))), image)
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert lines[0] == {'step': 3, 'loss': 0.5, 'lr': pytest.approx(1e-4)}
  assert lines[1] == {'step': 4, 'loss': 'nan', 'eval/mIoU': 0.25}
  assert len(lines) == 2


def test_metric_writer_imports_neither_torch_nor_tensorflow(tmp_path):
  code = ('import sys; from semask_jax.train import summary; w = summary.MetricWriter(sys.argv[1]); '
          'w.write_scalars(1, {"a": 1.0}); w.close(); '
          'print(sorted(m for m in ("torch", "tensorflow") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == '[]'
  import tensorboardX  # pylint: disable=import-outside-toplevel
  assert tensorboardX.__version__  # still importable normally afterwards


def test_summary_images_show_input_label_and_the_evaluated_prediction():
  from configs import tiny  # pylint: disable=import-outside-toplevel
  import input_pipeline  # pylint: disable=import-outside-toplevel
  from input_pipeline import synthetic  # pylint: disable=import-outside-toplevel
  from semask_jax.evaluation import evaluator as eval_and_predict
  from semask_jax.evaluation import predict  # pylint: disable=import-outside-toplevel
  from semask_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from semask_jax.train.state import create_model, init_train_state  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.data.synthetic.num_eval = 2  # the images show the whole eval split
  config.eval.num_summary_images = 3
  mesh = sharding_lib.make_mesh()
  state, graphdef, rest, _, _ = init_train_state(config, create_model(config), mesh)
  images = eval_and_predict.make_summary_images_fn(config, graphdef, rest, mesh)(state)
  assert sorted(images) == ['eval/example_0', 'eval/example_1']
  palette = input_pipeline.dataset_info(config.data.name).palette
  assert len({tuple(c) for c in palette}) == len(palette)
  colour_to_id = {tuple(c): k for k, c in enumerate(palette)}
  s, k = config.data.synthetic, config.model.num_classes
  cm = np.zeros((k, k), np.int64)
  for i in range(2):
    raw, label = synthetic.generate_scene(s.seed, config.data.eval_split, i, height=s.height,
                                          width=s.width, num_classes=config.data.num_classes,
                                          max_objects=s.max_objects)
    got = images[f'eval/example_{i}']
    assert got.dtype == np.uint8 and got.shape == (s.height, 3 * s.width, 3)
    # Input: normalised, resized to test_scale and back: within the round trip's error.
    assert np.abs(got[:, :s.width].astype(int) - raw.astype(int)).mean() < 8
    np.testing.assert_array_equal(got[:, s.width:2 * s.width], predict.colorize(label, palette))
    pred = np.asarray([[colour_to_id[tuple(c)] for c in row] for row in got[:, 2 * s.width:]])
    cm += numpy_confusion(pred, label.astype(np.int64), k)
  # The predictions are the evaluated ones: the same metrics as the evaluation of the split.
  want = eval_and_predict.make_eval_fn(config, graphdef, rest, mesh)(state)
  got_metrics = metrics.compute_metrics(
      cm, list(input_pipeline.dataset_info(config.data.name).class_names))
  assert got_metrics['aAcc'] == want['aAcc'] and got_metrics['mIoU'] == want['mIoU']
  config.eval.num_summary_images = 0
  assert eval_and_predict.make_summary_images_fn(config, graphdef, rest, mesh) is None
