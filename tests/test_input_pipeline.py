"""grain loaders on the synthetic data set: shapes, determinism, resume, sharding, eval."""
import gc

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import input_pipeline
from input_pipeline import pipeline, synthetic
from input_pipeline.config import DATASETS, default_data_config


def small_cfg(num_train=20, num_eval=7, **kw):
  cfg = default_data_config('synthetic')
  cfg.synthetic.num_train = num_train
  cfg.synthetic.num_eval = num_eval
  cfg.synthetic.height, cfg.synthetic.width = 40, 48
  cfg.img_scale = cfg.test_scale = (48, 40)
  cfg.eval_pad_hw = cfg.eval_label_pad_hw = (40, 48)
  cfg.crop_size = (32, 32)
  cfg.worker_count = 0
  cfg.update(kw)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_default_configs_carry_the_recipe():
  for name in DATASETS:
    cfg = default_data_config(name)
    assert cfg.name == name and cfg.ignore_index == 255
  ade, city, coco = (default_data_config(n) for n in ('ade20k', 'cityscapes', 'coco_stuff10k'))
  assert (ade.num_classes, city.num_classes, coco.num_classes) == (150, 19, 171)
  assert ade.ratio_list == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and ade.ratio_range is None
  assert city.ratio_list is None and city.ratio_range == (0.5, 2.0)
  assert city.crop_size == (768, 768) and city.img_scale == (2048, 1024)
  assert ade.cat_max_ratio == 0.75 and coco.cat_max_ratio == 1.0
  assert coco.eval_split == 'test' and ade.test_scale == (2048, 512)
  # Configs override fields in place (including None -> tuple).
  ade.eval_pad_hw = (512, 2048)
  ade.crop_size = (640, 640)
  with pytest.raises(ValueError):
    default_data_config('imagenet')


def test_dataset_info():
  info = input_pipeline.dataset_info('cityscapes')
  assert info.num_classes == 19 and info.class_names[0] == 'road'
  assert info.palette.shape == (19, 3) and info.palette.dtype == np.uint8
  assert input_pipeline.dataset_info('ade20k').num_classes == 150
  assert input_pipeline.dataset_info('coco_stuff10k').num_classes == 171
  syn = input_pipeline.dataset_info('synthetic')
  assert syn.num_classes == len(syn.class_names) == default_data_config('synthetic').num_classes


def test_synthetic_scenes_deterministic_disjoint_and_conjunctive():
  a = synthetic.generate_scene(0, 'train', 3)
  b = synthetic.generate_scene(0, 'train', 3)
  np.testing.assert_array_equal(a[0], b[0])
  train = [synthetic.generate_scene(0, 'train', i)[0] for i in range(30)]
  evals = [synthetic.generate_scene(0, 'validation', i)[0] for i in range(30)]
  assert not any(np.array_equal(t, e) for t in train for e in evals)
  src = synthetic.SyntheticSource('train', 30, num_classes=6)
  counts = np.zeros(6, int)
  for i in range(30):
    lab = src[i]['label']
    assert lab.max() < 6
    counts += np.bincount(lab.ravel(), minlength=6)
  assert (counts > 0).all()  # every class occurs
  # Neither shape nor colour alone decides the class (distractors are background).
  classes = synthetic.PAIRS[:5]
  for shape in ('circle', 'square', 'triangle'):
    assert sum(s == shape for s, _ in synthetic.PAIRS) > sum(s == shape for s, _ in classes) >= 1
  for colour in synthetic.COLOURS:
    assert sum(c == colour for _, c in synthetic.PAIRS) > sum(c == colour for _, c in classes) >= 1


def test_train_batches_shapes_and_values():
  cfg = small_cfg()
  it = input_pipeline.create_train_iterator(cfg, seed=0, global_batch_size=4)
  batch = next(it)
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 32, 32) and batch['label'].dtype == np.int32
  vals = np.unique(batch['label'])
  assert set(vals.tolist()) <= set(range(cfg.num_classes)) | {255}
  assert np.abs(batch['image']).max() < 3.0  # normalised


def test_train_determinism_for_a_seed():
  cfg = small_cfg()
  a = take(input_pipeline.create_train_iterator(cfg, seed=3, global_batch_size=4), 3)
  b = take(input_pipeline.create_train_iterator(cfg, seed=3, global_batch_size=4), 3)
  c = take(input_pipeline.create_train_iterator(cfg, seed=4, global_batch_size=4), 3)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_worker_processes_transform_records_alike():
  """With workers, each worker batches its own records (grain's design), so the
  grouping into batches depends on worker_count; each record's data does not."""
  cfg = small_cfg(keep_index=True)
  ref = take(input_pipeline.create_train_iterator(cfg, seed=1, global_batch_size=4), 3)
  cfg.worker_count = 2
  it = input_pipeline.create_train_iterator(cfg, seed=1, global_batch_size=4)
  runs = [take(it, 3)]
  del it
  gc.collect()  # stop the worker processes now
  for b in runs[0]:  # each batch comes from one worker: its records, in order
    assert len(set(b['index'].tolist())) == 4

  def by_index(batches):
    return {int(i): (b['image'][j], b['label'][j])
            for b in batches for j, i in enumerate(b['index'])}
  ref_ex, mp_ex = by_index(ref), by_index(runs[0])
  common = ref_ex.keys() & mp_ex.keys()
  assert len(common) >= 4
  for i in common:
    np.testing.assert_array_equal(ref_ex[i][0], mp_ex[i][0])
    np.testing.assert_array_equal(ref_ex[i][1], mp_ex[i][1])


def test_resume_with_orbax(tmp_path):
  cfg = small_cfg()
  it = input_pipeline.create_train_iterator(cfg, seed=0, global_batch_size=4)
  take(it, 2)
  mngr = ocp.CheckpointManager(tmp_path / 'ckpt')
  mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = take(it, 7)  # crosses the 20-example epoch boundary (5 batches/epoch)

  fresh = input_pipeline.create_train_iterator(cfg, seed=0, global_batch_size=4)
  mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(expected, take(fresh, 7))
  # get_state/set_state directly too.
  state = fresh.get_state()
  nxt = next(fresh)
  again = input_pipeline.create_train_iterator(cfg, seed=0, global_batch_size=4)
  again.set_state(state)
  assert_batches_equal([nxt], [next(again)])


def test_two_process_shards_are_disjoint_and_complete():
  cfg = small_cfg(num_train=20, keep_index=True)
  seen = []
  for p in range(2):
    it = input_pipeline.create_train_iterator(cfg, seed=0, global_batch_size=4,
                                              process_index=p, process_count=2)
    idx = np.concatenate([b['index'] for b in take(it, 5)])  # one epoch: 10 per process
    assert len(set(idx.tolist())) == 10
    seen.append(set(idx.tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(20))


@pytest.mark.parametrize('n,global_batch,procs', [(7, 4, 2), (7, 3, 1), (4, 4, 1), (5, 6, 3)])
def test_eval_visits_each_image_once(n, global_batch, procs):
  cfg = small_cfg(num_eval=n)
  batches_per_proc, seen = [], []
  for p in range(procs):
    loader = input_pipeline.create_eval_iterator(cfg, global_batch_size=global_batch,
                                                 process_index=p, process_count=procs)
    batches = list(loader)
    assert_batches_equal(batches, list(loader))  # re-iterable, deterministic
    batches_per_proc.append(len(batches))
    for b in batches:
      assert b['image'].shape == (global_batch // procs, 40, 48, 3)
      assert b['label'].shape == (global_batch // procs, 40, 48)
      assert b['valid'].dtype == np.bool_ and b['image_hw'].dtype == np.int32
      seen += b['index'][b['valid']].tolist()
      assert (b['index'][~b['valid']] == -1).all()
      assert (b['label'][~b['valid']] == 255).all()
  assert len(set(batches_per_proc)) == 1  # every host runs the same number of steps
  assert sorted(seen) == list(range(n))


def test_eval_keeps_original_labels_and_computes_pads():
  cfg = small_cfg(num_eval=3)
  cfg.test_scale = (96, 80)  # 2x upscale of the 40x48 scenes
  cfg.eval_pad_hw = cfg.eval_label_pad_hw = None  # computed from the split
  batch = next(iter(input_pipeline.create_eval_iterator(cfg, global_batch_size=4)))
  assert batch['image'].shape == (4, 96, 96, 3)  # 80x96 rounded up to multiples of 32
  assert batch['label'].shape == (4, 40, 48)
  np.testing.assert_array_equal(batch['image_hw'][:3], [[80, 96]] * 3)
  np.testing.assert_array_equal(batch['label_hw'][:3], [[40, 48]] * 3)
  src = synthetic.SyntheticSource('validation', 3, height=40, width=48)
  for i in range(3):
    np.testing.assert_array_equal(batch['label'][i], src[i]['label'])
  assert batch['valid'].tolist() == [True, True, True, False]


def test_eval_shard_arithmetic():
  assert pipeline.eval_shard(7, 2, 0, 2) == (0, 4, 4)
  assert pipeline.eval_shard(7, 2, 1, 2) == (4, 7, 4)
  assert pipeline.eval_shard(2, 4, 2, 3) == (2, 2, 4)  # a host with nothing still steps


def test_make_global_batch():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  n = jax.device_count()
  local = {'image': np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3),
           'label': np.arange(n, dtype=np.int32)}
  g = input_pipeline.make_global_batch(local, mesh)
  assert isinstance(g['image'], jax.Array) and g['image'].shape == (n, 2, 3)
  assert g['image'].sharding.spec == jax.sharding.PartitionSpec('data')
  assert len(g['label'].addressable_shards) == n
  np.testing.assert_array_equal(np.asarray(g['label']), local['label'])


def test_input_bench_cli_writes_the_json_keys(tmp_path):
  """python -m input_pipeline.bench --json: numbers exist and are sane (no timed assertion)."""
  import json  # pylint: disable=import-outside-toplevel
  from input_pipeline import bench  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'bench.json'
  bench.main(['--num_images', '2', '--steps', '4', '--batch', '2', '--workers', '',
              '--json', str(out)])
  res = json.loads(out.read_text())
  assert res['examples_per_s_per_worker'] > 0 and res['examples_per_cpu_s_per_worker'] > 0
  assert res['loader']['0']['examples_per_s'] == res['examples_per_s_per_worker']
  stages = ('decode', 'resize', 'crop', 'flip', 'photometric', 'normalize_pad')
  assert set(res['stage_ms']) == set(res['stage_cpu_ms']) == set(stages)
  assert all(res['stage_ms'][s] > 0 for s in stages)
  assert res['stage_total_ms'] == pytest.approx(sum(res['stage_ms'].values()))
  assert res['baseline_a14ab92']['examples_per_s_per_worker'] > 0
