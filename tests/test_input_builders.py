"""TFDS builders and the prepare CLI on fake downloads written in each official layout."""
import io
import sys

import numpy as np
import pytest
from PIL import Image

import input_pipeline
from input_pipeline import builders, fakes, prepare
from input_pipeline.info import CITYSCAPES_ID_TO_TRAIN_ID, reference_tables

BAD = {  # split folder -> planted bad cases, per dataset layout
    'ade20k': {'training': ['corrupt_image', 'out_of_range'],
               'validation': ['truncated_label', 'size_mismatch']},
    'cityscapes': {'train': ['truncated_label', 'size_mismatch'],
                   'val': ['corrupt_image', 'out_of_range']},
    'coco_stuff10k': {'train': ['corrupt_image', 'size_mismatch'],
                      'test': ['truncated_label', 'out_of_range']},
}
COUNTS = {'ade20k': {'training': 3, 'validation': 2}, 'cityscapes': {'train': 3, 'val': 2},
          'coco_stuff10k': {'train': 3, 'test': 2}}
SPLITS = {'ade20k': ('train', 'validation'), 'cityscapes': ('train', 'validation'),
          'coco_stuff10k': ('train', 'test')}


def expected_train_ids(name, raw):
  """Independent statement of each data set's label mapping."""
  raw = raw.astype(np.int64)
  if name == 'ade20k':
    return np.where(raw == 0, 255, raw - 1)
  if name == 'cityscapes':
    return np.vectorize(lambda v: CITYSCAPES_ID_TO_TRAIN_ID.get(int(v), 255))(raw)
  table = {int(k): v for k, v in reference_tables()['coco_stuff10k']['mat_label_to_train_id'].items()}
  mapped = np.vectorize(table.__getitem__)(raw)
  return np.where(mapped == 0, 255, mapped - 1)


def run_prepare(capsys, *args):
  rc = prepare.main(list(args))
  out = capsys.readouterr()
  return rc, out.out, out.err


@pytest.mark.parametrize('name,zipped', [('ade20k', True), ('cityscapes', True),
                                         ('coco_stuff10k', True), ('ade20k', False),
                                         ('cityscapes', False), ('coco_stuff10k', False)])
def test_prepare_validates_maps_and_reruns(tmp_path, capsys, name, zipped):
  manual, data = tmp_path / 'manual', tmp_path / 'data'
  good = fakes.WRITERS[name](manual, zipped=zipped, counts=COUNTS[name], bad=BAD[name])
  args = ['--dataset', name, '--manual_dir', str(manual), '--data_dir', str(data)]

  # Default: every bad file is named with its reason, non-zero exit, nothing written.
  rc, out, err = run_prepare(capsys, *args)
  assert rc == 2
  assert '4 bad example(s)' in err
  truncated = 'does not load' if name == 'coco_stuff10k' else 'truncated'  # .mat vs PNG
  for why in ('does not decode', 'out of range', truncated, '!= image size'):
    assert why in err, (why, err)
  assert err.count('[train]') == 2 and err.count(f'[{SPLITS[name][1]}]') == 2
  assert 'split=' not in out
  assert not builders.get_builder(name, str(data)).is_prepared()

  # --skip_bad writes the good ones and reports per split.
  rc, out, err = run_prepare(capsys, *args, '--skip_bad')
  assert rc == 0, err
  lines = [l for l in out.splitlines() if l.startswith('split=')]
  assert sorted(lines) == sorted([f'split={SPLITS[name][0]} examples=3 skipped=2',
                                  f'split={SPLITS[name][1]} examples=2 skipped=2'])
  assert err.count('skipped [') == 4

  # Stored: original image bytes, train-id labels, file name and size.
  found = {}
  for split in SPLITS[name]:
    src = builders.tfds_source(name, split, str(data))
    for i in range(len(src)):
      r = src[i]
      fname = r['file_name'].decode()
      image = np.asarray(Image.open(io.BytesIO(r['image'])))
      label = np.asarray(Image.open(io.BytesIO(r['label'])))
      assert image.shape == (int(r['height']), int(r['width']), 3)
      np.testing.assert_array_equal(label, expected_train_ids(name, good[fname]))
      found[fname] = split
  assert set(found) == set(good)

  # Re-running finds the prepared data and prints the same summary.
  rc, out2, _ = run_prepare(capsys, *args, '--skip_bad')
  assert rc == 0 and [l for l in out2.splitlines() if l.startswith('split=')] == lines
  assert 'tensorflow' not in sys.modules


def test_missing_download_is_a_clear_error(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  rc, _, err = run_prepare(capsys, '--dataset', 'cityscapes', '--manual_dir',
                           str(tmp_path / 'empty'), '--data_dir', str(tmp_path / 'd'))
  assert rc == 2 and 'leftImg8bit_trainvaltest.zip' in err


def test_unprepared_data_dir_is_a_clear_error(tmp_path):
  cfg = input_pipeline.default_data_config('ade20k')
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='input_pipeline.prepare --dataset ade20k'):
    input_pipeline.create_train_iterator(cfg, seed=0, global_batch_size=2)


def test_coco_mat_without_s_key_is_reported(tmp_path, capsys):
  import scipy.io  # pylint: disable=import-outside-toplevel
  manual = tmp_path / 'm'
  fakes.write_coco_stuff10k(manual, zipped=False, counts={'train': 1, 'test': 1})
  mat = next((manual / 'annotations').glob('*train2014*.mat'))
  scipy.io.savemat(mat, {'L': np.zeros((2, 2), np.uint8)})
  rc, _, err = run_prepare(capsys, '--dataset', 'coco_stuff10k', '--manual_dir', str(manual),
                           '--data_dir', str(tmp_path / 'd'))
  assert rc == 2 and "no key 'S'" in err and mat.name in err


def test_train_and_eval_over_prepared_files(tmp_path, capsys):
  manual, data = tmp_path / 'manual', tmp_path / 'data'
  good = fakes.write_ade20k(manual, zipped=True, counts={'training': 4, 'validation': 3},
                            hw=(40, 56))
  assert prepare.main(['--dataset', 'ade20k', '--manual_dir', str(manual),
                       '--data_dir', str(data)]) == 0
  capsys.readouterr()
  cfg = input_pipeline.default_data_config('ade20k')
  cfg.update(data_dir=str(data), worker_count=0, img_scale=(64, 48), crop_size=(32, 32),
             test_scale=(64, 48))
  batch = next(input_pipeline.create_train_iterator(cfg, seed=0, global_batch_size=2))
  assert batch['image'].shape == (2, 32, 32, 3) and batch['label'].shape == (2, 32, 32)
  assert batch['label'].max() <= 255 and batch['label'].min() >= 0
  batches = list(input_pipeline.create_eval_iterator(cfg, global_batch_size=2))
  assert len(batches) == 2
  # Both orientations: pads are the max over the split (resized, rounded to 32).
  # 40x56 -> min(64/56, 48/40) = 1.143 -> 46x64; 56x40 -> 64x46.
  b = batches[0]
  assert b['image'].shape == (2, 64, 64, 3) and b['label'].shape == (2, 56, 56)
  hws = {tuple(x) for bb in batches for x, v in zip(bb['image_hw'], bb['valid']) if v}
  assert hws == {(46, 64), (64, 46)}
  assert sum(int(bb['valid'].sum()) for bb in batches) == 3 == len(
      [k for k in good if '/validation/' in k])


def test_builder_stores_original_bytes_of_grey_and_rotated_jpegs(tmp_path):
  """No re-encoding: the stored image is the file; its size is the size the
  loader decodes (cv2 IMREAD_COLOR: 3 channels, EXIF orientation applied)."""
  import cv2  # pylint: disable=import-outside-toplevel
  from input_pipeline import transforms  # pylint: disable=import-outside-toplevel
  from input_pipeline.builders import common  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  grey = fakes.realistic_image(rng, 19, 27)[..., 0]
  rgb = fakes.realistic_image(rng, 19, 27)
  exif = Image.Exif()
  exif[0x0112] = 6  # shown rotated by 90 degrees: 27 high, 19 wide
  files = {'grey': (grey, {}), 'rotated': (rgb, {'exif': exif.tobytes()})}
  stored = {}
  for stem, (arr, kw) in files.items():
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='JPEG', quality=90, **kw)
    stored[stem] = buf.getvalue()
    (tmp_path / 'images' / 'training').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'images' / 'training' / f'{stem}.jpg').write_bytes(stored[stem])
  (tmp_path / 'annotations' / 'training').mkdir(parents=True)
  label = lambda h, w: np.full((h, w), 3, np.uint8)  # pylint: disable=unnecessary-lambda-assignment
  Image.fromarray(label(19, 27)).save(tmp_path / 'annotations/training/grey.png')
  Image.fromarray(label(27, 19)).save(tmp_path / 'annotations/training/rotated.png')
  Image.fromarray(label(19, 27)).save(tmp_path / 'annotations/training/rotated_raw.png')

  builder = builders.get_builder('ade20k', str(tmp_path / 'data'))
  tree = common.Tree([tmp_path])
  for stem, hw in (('grey', (19, 27)), ('rotated', (27, 19))):
    ex = builder._example(tree, common.Pair(stem, f'images/training/{stem}.jpg',
                                             f'annotations/training/{stem}.png'))
    assert ex['image'] == stored[stem]
    assert (ex['height'], ex['width']) == hw
    decoded = transforms.decode_image(ex['image'])
    ref = cv2.imdecode(np.frombuffer(stored[stem], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded, ref[..., ::-1])
    assert decoded.shape == (*hw, 3)
  assert (decoded[..., 0] != decoded[..., 1]).any()
  grey_decoded = transforms.decode_image(stored['grey'])
  assert (grey_decoded == grey_decoded[..., :1]).all()
  # A label in the file's stored (unrotated) orientation does not fit what is decoded.
  with pytest.raises(ValueError, match='!= image size'):
    builder._example(tree, common.Pair('rotated', 'images/training/rotated.jpg',
                                       'annotations/training/rotated_raw.png'))
