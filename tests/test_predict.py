"""Prediction writes colour masks (data set palette) and overlays at each image's original size."""
import jax
import numpy as np
import pytest
from PIL import Image

import input_pipeline
from configs import tiny
from semask_jax.evaluation import inference as evaluate_lib
from semask_jax.evaluation import predict
from semask_jax import sharding as sharding_lib
from semask_jax.train import state as state_lib


def test_colorize_and_overlay():
  palette = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
  mask = np.array([[0, 1], [2, 255]])
  color = predict.colorize(mask, palette)
  np.testing.assert_array_equal(color[0, 1], [255, 0, 0])
  np.testing.assert_array_equal(color[1, 0], [0, 0, 255])
  np.testing.assert_array_equal(color[1, 1], [0, 0, 0])  # ignore / out of range
  image = np.full((2, 2, 3), 100, np.uint8)
  out = predict.overlay(image, color, 0.5)
  np.testing.assert_array_equal(out[0, 1], [178, 50, 50])


def test_output_names_are_unique():
  assert predict.output_names(['d/a.jpg', 'd/b.png', 'd/a.png', 'd/c.d.JPG']) == [
      'a_jpg', 'b', 'a_png', 'c.d']
  assert predict.output_names(['x/photo.jpg']) == ['photo']


def test_predict_folder_writes_images_of_the_original_size(tmp_path):
  config = tiny.get_config()
  sizes = [(40, 48), (29, 53)]
  rng = np.random.default_rng(0)
  inputs = tmp_path / 'in'
  inputs.mkdir()
  for i, (h, w) in enumerate(sizes):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(inputs / f'im{i}.png')
  (inputs / 'notes.txt').write_text('not an image')
  # The same stem twice: each keeps its own outputs (predict.output_names).
  Image.fromarray(rng.integers(0, 255, sizes[1] + (3,), dtype=np.uint8)).save(inputs / 'im1.jpg')
  model = state_lib.create_model(config)
  state, graphdef, rest, _, _ = state_lib.init_train_state(
      config, model, sharding_lib.make_mesh(jax.devices()[:1]))
  written = predict.predict_paths(config, graphdef, rest, state.params, state.batch_stats,
                                  str(inputs), str(tmp_path / 'out'))
  assert sorted(p.rsplit('/', 1)[1] for p in written) == [
      'im0_mask.png', 'im0_overlay.png', 'im1_jpg_mask.png', 'im1_jpg_overlay.png',
      'im1_png_mask.png', 'im1_png_overlay.png']
  palette = input_pipeline.dataset_info(config.data.name).palette
  for name, (h, w) in (('im0', sizes[0]), ('im1_png', sizes[1]), ('im1_jpg', sizes[1])):
    mask = np.asarray(Image.open(tmp_path / 'out' / f'{name}_mask.png'))
    over = np.asarray(Image.open(tmp_path / 'out' / f'{name}_overlay.png'))
    assert mask.shape == over.shape == (h, w, 3)
    colours = {tuple(c) for c in mask.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in palette}
  with pytest.raises(FileNotFoundError, match='no image files'):
    predict.list_images(str(tmp_path / 'out' / '..' / 'in' / '..'))  # folder with no images
  with pytest.raises(FileNotFoundError, match='neither a file nor a folder'):
    predict.list_images(str(tmp_path / 'missing.png'))


def test_predict_computes_the_class_map_of_the_evaluation(tmp_path):
  """The written mask is the reference's class map, computed by tests/oracle.py (cv2
  resize, NumPy normalisation, the model's forward, torch resizes, softmax averaged over
  the flip, argmax; none of the evaluation or input pipeline code), and the evaluation's
  own: a label made from the mask scores 100 % in its confusion-matrix path."""
  from semask_jax.models.functional import merge_model  # pylint: disable=g-import-not-at-top
  from tests import oracle  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.eval.flip = True
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, (31, 45, 3), dtype=np.uint8)
  (tmp_path / 'in').mkdir()
  Image.fromarray(image).save(tmp_path / 'in' / 'x.png')
  model = state_lib.create_model(config)
  state, graphdef, rest, _, _ = state_lib.init_train_state(
      config, model, sharding_lib.make_mesh(jax.devices()[:1]))
  predict.predict_paths(config, graphdef, rest, state.params, state.batch_stats,
                        str(tmp_path / 'in'), str(tmp_path / 'out'))
  mask = np.asarray(Image.open(tmp_path / 'out' / 'x_mask.png'))
  palette = np.asarray(input_pipeline.dataset_info(config.data.name).palette, np.uint8)
  label = (mask[:, :, None, :] == palette[None, None]).all(-1).argmax(-1).astype(np.uint8)
  assert (palette[label] == mask).all()
  forward = jax.jit(lambda x: merge_model(graphdef, state.params, state.batch_stats,
                                          rest).segment(x))
  images = oracle.mmseg_test_images(image, config.data.test_scale, config.eval.scales,
                                    config.data.mean, config.data.std)
  want = oracle.probabilities(forward, images, image.shape[:2], flip=True,
                              scores_are_probabilities=False)
  oracle.assert_same_class_map(label, want)
  assert len(np.unique(want.argmax(-1))) > 1  # a class map, not one colour
  inference = evaluate_lib.make_per_image_inference(config, graphdef, rest, state.params,
                                                        state.batch_stats)
  cm = np.asarray(inference.update_confusion(inference.zeros_cm(),
                                             predict.scale_images(image, config), label))
  assert cm.sum() == 31 * 45 and np.trace(cm) == cm.sum()
