"""Per-image evaluation and prediction of real (tiny, random-weight) models against
tests/oracle.py, the reference's test-time computation written independently of
semask_jax.evaluation: SeMask-Mask2Former single scale and multi-scale + flip (its scores
are probabilities, averaged as they are), SeMask-FPN slide (Mask2Former has no slide
mode in the reference).

Each compares make_per_image_inference's probabilities (1e-5) and class map and the
confusion-matrix path of the evaluation; multi-scale + flip and slide also predict_paths'
written masks (a second compile of every program, so not for the single scale).
"""
import jax
import numpy as np
import pytest
from PIL import Image

import input_pipeline
from configs import demo_mask2former, tiny
from semask_jax.evaluation import inference as inference_lib
from semask_jax.evaluation import predict
from semask_jax.models.functional import merge_model, split_model
from semask_jax.train import state as state_lib
from tests import oracle


def m2f_config():
  """The Mask2Former demo shrunk as tests/test_train_mask2former.py's."""
  c = demo_mask2former.get_config()
  c.model.embed_dim = 16
  c.model.num_heads = (1, 1, 2, 2)
  c.model.num_queries = 8
  c.model.dec_layers = 1
  c.data.test_scale = (48, 40)  # a 37x53 image -> 34x48 (x1.0), 25x36 (x0.75)
  c.xla_cpu_fast_compile = True
  return c


IMAGE_HW = (37, 53)  # odd sizes: the 32-pad and the crop back both matter


class Model:
  """A config's tiny model, its split state and its own jitted forward (the oracle's)."""

  def __init__(self, config):
    self.config = config
    self.graphdef, self.params, self.batch_stats, self.rest = split_model(
        state_lib.create_model(config))
    self.forward = jax.jit(lambda x: merge_model(
        self.graphdef, self.params, self.batch_stats, self.rest).segment(x))
    self.image = np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)

  def with_eval(self, **eval_fields):
    c = self.config.copy_and_resolve_references()
    c.eval.update(eval_fields)
    return c

  def test_images(self, config):
    d = config.data
    return oracle.mmseg_test_images(self.image, d.test_scale, config.eval.scales, d.mean, d.std)

  def oracle_probs(self, config, probabilities, pad):
    e = config.eval
    return oracle.probabilities(self.forward, self.test_images(config), IMAGE_HW, flip=e.flip,
                                scores_are_probabilities=probabilities, pad=pad, mode=e.mode,
                                crop=e.crop_size, stride=e.stride)

  def check(self, config, tmp_path, *, probabilities, pad, with_predict=True):
    """make_per_image_inference (and predict_paths) against the oracle."""
    want = self.oracle_probs(config, probabilities, pad)
    inf = inference_lib.make_per_image_inference(config, self.graphdef, self.rest, self.params,
                                                 self.batch_stats)
    assert inf.probabilities == probabilities and inf.pad_multiple == pad
    # The scaled images of the oracle (cv2, NumPy normalisation) into the inference.
    images = self.test_images(config)
    acc, n = inf.scores(images, IMAGE_HW)
    got = np.asarray(acc)[:IMAGE_HW[0], :IMAGE_HW[1]] / n
    assert n == len(images) * (2 if config.eval.flip else 1)
    if n == 1 and not probabilities:
      got = oracle.softmax(got)  # one term: logits, whose argmax is the class map
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    pred = inf.predict(images, IMAGE_HW)
    oracle.assert_same_class_map(pred, want)
    # The evaluation's confusion-matrix path: a label of the oracle's class map scores 100 %
    # (pixels near a tie left out, as ignored).
    top2 = np.sort(want, -1)[..., -2:]
    label = np.where(top2[..., 1] - top2[..., 0] < 1e-5, 255, want.argmax(-1)).astype(np.uint8)
    cm = np.asarray(inf.update_confusion(inf.zeros_cm(), images, label))
    assert cm.sum() == (label != 255).sum() and np.trace(cm) == cm.sum()
    if not with_predict:
      return
    # predict_paths: its own decode and scaling of a PNG of the image, the written mask.
    (tmp_path / 'in').mkdir()
    Image.fromarray(self.image).save(tmp_path / 'in' / 'x.png')
    predict.predict_paths(config, self.graphdef, self.rest, self.params, self.batch_stats,
                          str(tmp_path / 'in'), str(tmp_path / 'out'))
    mask = np.asarray(Image.open(tmp_path / 'out' / 'x_mask.png'))
    palette = np.asarray(input_pipeline.dataset_info(config.data.name).palette, np.uint8)
    written = (mask[:, :, None, :] == palette[None, None]).all(-1)
    assert (written.sum(-1) == 1).all()  # every pixel one palette colour
    oracle.assert_same_class_map(written.argmax(-1), want)


@pytest.fixture(scope='module')
def m2f():
  return Model(m2f_config())


def test_mask2former_single_scale(m2f, tmp_path):
  config = m2f.with_eval(scales=(1.0,), flip=False)
  assert inference_lib.test_size_divisibility(config) == 32
  m2f.check(config, tmp_path, probabilities=True, pad=32, with_predict=False)


def test_mask2former_multiscale_flip(m2f, tmp_path):
  config = m2f.with_eval(scales=(0.75, 1.0), flip=True)
  m2f.check(config, tmp_path, probabilities=True, pad=32)


def test_the_oracle_sees_the_pad_and_the_flip(m2f):
  """The checks above would catch another pad (e.g. a canvas) or a missing flip: both
  change the probabilities far beyond their 1e-5. (A random SeMask-Mask2Former's class
  map is one class nearly everywhere, every query preferring the same class: its
  probabilities are what discriminates; the FPN test's class map varies.)"""
  config = m2f.with_eval(scales=(1.0,), flip=False)
  padded = m2f.oracle_probs(config, True, 32)
  other_pad = m2f.oracle_probs(config, True, 96)  # 34x48 -> 96x96 (not 64x64)
  flipped = m2f.oracle_probs(m2f.with_eval(scales=(1.0,), flip=True), True, 32)
  assert np.abs(padded - other_pad).max() > 1e-2
  assert np.abs(padded - flipped).max() > 1e-2


def test_fpn_slide_multiscale_flip(tmp_path):
  config = tiny.get_config()
  config.eval.update(mode='slide', crop_size=(24, 24), stride=(16, 16), scales=(0.75, 1.0),
                     flip=True)  # 34x48: 2x3 windows; 25x36: 1x2
  model = Model(config)
  model.check(config, tmp_path, probabilities=False, pad=0)
  want = model.oracle_probs(config, False, 0)
  assert len(np.unique(want.argmax(-1))) > 1  # the class maps compared vary
