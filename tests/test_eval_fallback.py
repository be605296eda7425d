"""Every head has a valid-size forward, so none falls back to one image at a time: the
evaluation during training, --mode=eval and prediction of MaskFormer and
FaPN-Mask2Former run batched per bucket canvas and give the per-image oracle's numbers;
config.eval.per_image=True is the one way left to run --mode=eval one image at a time."""
import jax
import numpy as np
import pytest
from PIL import Image

import input_pipeline
from configs import demo_mask2former, demo_maskformer
from semask_jax import sharding as sharding_lib
from semask_jax.evaluation import evaluator, predict
from semask_jax.evaluation import inference as inference_lib
from semask_jax.train import modes
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


def _recorded(monkeypatch, module, name: str, calls: list[str]) -> None:
  """module.name still runs, and appends its name to `calls` when it does."""
  fn = getattr(module, name)

  def wrapper(*args, **kwargs):
    calls.append(name)
    return fn(*args, **kwargs)

  monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize('make', [_maskformer, _fapn], ids=['maskformer', 'fapn'])
def test_eval_and_predict_batch_per_canvas_unless_per_image(make, tmp_path, monkeypatch):
  config = make()
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  model = state_lib.create_model(config)
  state, graphdef, rest, _, _ = state_lib.init_train_state(config, model, mesh)
  monkeypatch.setattr(modes, 'restore_for_inference', lambda *a: (state, graphdef, rest, 0))
  calls: list[str] = []
  _recorded(monkeypatch, modes, 'evaluate_per_image', calls)
  _recorded(monkeypatch, modes, 'evaluate_exact', calls)
  _recorded(monkeypatch, evaluator, 'evaluate_per_image', calls)
  config.eval.per_image = True
  want = modes.evaluate_only(config, str(tmp_path / 'per_image'))
  assert calls == ['evaluate_per_image']
  config.eval.per_image = False
  got = modes.evaluate_only(config, str(tmp_path / 'exact'))
  assert calls[1:] == ['evaluate_exact']
  during_training = evaluator.make_eval_fn(config, graphdef, rest, mesh)(state)
  assert calls[2:] == []  # bucketed as well
  for res in (got, during_training):
    assert res['mIoU'] == pytest.approx(want['mIoU'], abs=1e-4)
    assert res['aAcc'] == pytest.approx(want['aAcc'], abs=1e-4)
  # Prediction (bucketed): the per-image inference's class map, at the original size.
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
