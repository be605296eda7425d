"""Heads without a valid-size forward (FaPN / MSFaPN-Mask2Former, MaskFormer) are evaluated
and predicted exactly, one image at a time, by the same entry points that batch the others
per bucket canvas."""
import jax
import numpy as np
import pytest
from PIL import Image

import input_pipeline
from configs import demo_mask2former, demo_maskformer, tiny
from semask_jax import sharding as sharding_lib
from semask_jax.evaluation import evaluator, predict
from semask_jax.evaluation import inference as inference_lib
from semask_jax.models import has_valid_size_forward
from semask_jax.train import state as state_lib


def _small(config):
  config.data.synthetic.num_eval = 2
  config.data.synthetic.height, config.data.synthetic.width = 40, 56
  config.eval.batch_size = 1
  return config


def _maskformer():
  return _small(demo_maskformer.get_config())


def _fapn():
  c = _small(demo_mask2former.get_config())
  c.model.pixel_decoder = 'fapn'
  c.model.deformable_groups = 2
  return c


def test_which_heads_have_a_valid_size_forward():
  assert has_valid_size_forward(tiny.get_config().model)
  assert has_valid_size_forward(demo_mask2former.get_config().model)
  assert not has_valid_size_forward(_maskformer().model)
  assert not has_valid_size_forward(_fapn().model)


@pytest.mark.parametrize('make', [_maskformer, _fapn], ids=['maskformer', 'fapn'])
def test_eval_and_predict_run_one_image_at_a_time(make, tmp_path):
  config = make()
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  model = state_lib.create_model(config)
  state, graphdef, rest, _, _ = state_lib.init_train_state(config, model, mesh)
  got = evaluator.make_eval_fn(config, graphdef, rest, mesh)(state)
  want = evaluator.evaluate_per_image(config, graphdef, rest, state)
  assert got['mIoU'] == want['mIoU'] and got['aAcc'] == want['aAcc']
  # Prediction: the per-image inference's class map, written at the original size.
  image = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'a.png')
  written = predict.predict_paths(config, graphdef, rest, state.params, state.batch_stats,
                                  str(tmp_path / 'a.png'), str(tmp_path / 'out'))
  assert len(written) == 2
  mask = np.asarray(Image.open(tmp_path / 'out' / 'a_mask.png'))
  one = inference_lib.make_per_image_inference(config, graphdef, rest, state.params,
                                               state.batch_stats)
  pred = one.predict(predict.scale_images(image, config), image.shape[:2])
  palette = np.asarray(input_pipeline.dataset_info(config.data.name).palette)
  np.testing.assert_array_equal(mask, predict.colorize(pred, palette))
