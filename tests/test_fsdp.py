"""config.state_sharding='fsdp': the train state split over the devices, the same training.

Run on the 8 fake CPU devices of tests/conftest.py with the tiny SeMask, whose arrays are
small: fsdp_min_size=0 splits every array that has an axis the devices divide.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import input_pipeline
from configs import tiny
from semask_jax import sharding as sharding_lib
from semask_jax.train import state as state_lib
from semask_jax.train import loop as train
from semask_jax.cli import ConfigError
from semask_jax.evaluation.evaluator import make_eval_fn
from tests import agreement


def test_fsdp_spec_splits_the_first_axis_the_devices_divide():
  assert sharding_lib.fsdp_spec((96, 384), 8, 0) == P('data')  # a kernel's input axis
  assert sharding_lib.fsdp_spec((384, 96), 8, 0) == P('data')
  assert sharding_lib.fsdp_spec((3, 3, 96, 192), 8, 0) == P(None, None, 'data')
  assert sharding_lib.fsdp_spec((169, 6), 8, 0) == P()  # no axis divisible by 8
  assert sharding_lib.fsdp_spec((169, 6), 2, 0) == P(None, 'data')
  assert sharding_lib.fsdp_spec((), 8, 0) == P()  # scalars: the step, counters
  assert sharding_lib.fsdp_spec((96, 384), 8, 96 * 384 + 1) == P()  # under the minimum size
  assert sharding_lib.fsdp_spec((96, 384), 1, 0) == P()  # one device


def test_state_sharding_config_errors_name_the_key():
  config = tiny.get_config()
  assert sharding_lib.check_state_sharding(config) == ('replicated', 2 ** 16)
  config.state_sharding = 'zero3'
  with pytest.raises(ConfigError, match=r"config.state_sharding must be one of \('replicated', "
                     r"'fsdp'\), got 'zero3'"):
    sharding_lib.check_state_sharding(config)
  config.state_sharding = 'fsdp'
  config.fsdp_min_size = -1
  with pytest.raises(ConfigError, match='config.fsdp_min_size must be an integer >= 0'):
    sharding_lib.check_state_sharding(config)


@pytest.fixture(scope='module')
def runs():
  """Two training steps of the tiny SeMask on 8 devices, per state_sharding: (config,
  initial state, graphdef, rest, compiled step HLO, final state, metrics)."""
  base = tiny.get_config()
  model = state_lib.create_model(base)
  batch = next(input_pipeline.create_train_iterator(base.data, seed=0, global_batch_size=8))
  mesh = sharding_lib.make_mesh()
  assert mesh.size == 8
  out = {}
  for mode in sharding_lib.STATE_SHARDINGS:
    config = tiny.get_config()
    config.state_sharding, config.fsdp_min_size = mode, 0
    state, graphdef, rest, tx, schedule = state_lib.init_train_state(config, model, mesh)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    step = train.jit_train_step(
        train.make_train_step(graphdef, rest, tx, schedule, config, shardings.params),
        shardings, mesh, sharding_lib.compiler_options(config))
    global_batch = input_pipeline.make_global_batch(batch, mesh)
    hlo = step.lower(state, global_batch).compile().as_text()
    # The step donates the state: what the tests need of the initial one, kept apart.
    initial = dict(host=jax.device_get(state), shardings=shardings,
                   first_device_bytes=_bytes_on_first_device(state))
    metrics = []
    for _ in range(2):
      state, m = step(state, global_batch)
      metrics.append(jax.device_get(m))
    out[mode] = dict(config=config, initial=initial, graphdef=graphdef, rest=rest, hlo=hlo,
                     state=state, metrics=metrics, mesh=mesh)
  return out


def _bytes_on_first_device(tree) -> int:
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(tree))


def test_fsdp_state_holds_an_eighth_per_device_and_stays_split(runs):
  rep, fsdp = runs['replicated'], runs['fsdp']
  total = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(rep['initial']['host']))
  assert rep['initial']['first_device_bytes'] == total
  # Every array of the tiny model but a few bias tables ([49, heads]) and scalars has an
  # axis of a multiple of 8: each device holds little more than an eighth.
  assert fsdp['initial']['first_device_bytes'] < 0.14 * total
  params = fsdp['initial']['shardings'].params
  assert any(not s.is_fully_replicated for s in jax.tree_util.tree_leaves(params))
  # AdamW's moments (and the accumulators, if any) split as the parameters they follow.
  want = jax.tree_util.tree_map(lambda s: s.spec, params)
  for moments in (fsdp['initial']['shardings'].opt_state,
                  jax.tree_util.tree_map(lambda x: x.sharding, fsdp['state'].opt_state)):
    found = [t for t in jax.tree_util.tree_leaves(
        moments, is_leaf=lambda x: isinstance(x, dict) and x.keys() == params.keys())
             if isinstance(t, dict)]
    assert len(found) >= 2  # mu and nu
    for tree in found:
      assert jax.tree_util.tree_map(lambda s: s.spec, tree) == want
  # The step returns the state split as it came: no gather of the whole state.
  assert _bytes_on_first_device(fsdp['state']) == fsdp['initial']['first_device_bytes']
  # The parameters are gathered for the forward and backward passes.
  assert 'all-gather(' in fsdp['hlo'] and 'all-gather(' not in rep['hlo']


def test_fsdp_trains_as_the_replicated_state(runs):
  """The same training up to the order of float32 sums: GSPMD computes the split state's
  weight gradients in other partial sums than the replicated state's all-reduce. The
  criteria of test_train.py's 1-vs-8-devices test."""
  rep, fsdp = runs['replicated'], runs['fsdp']
  for a, b in zip(rep['metrics'], fsdp['metrics']):
    for k in ('loss', 'loss_ce', 'loss_cate', 'grad_norm'):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6),
                         jax.device_get(rep['state'].batch_stats),
                         jax.device_get(fsdp['state'].batch_stats))
  # Parameters: every element within 2 x the applied lr, beyond 1e-6 only where Adam had
  # no gradient (tests/agreement.py).
  agreement.assert_params_agree(
      fsdp['state'].params, rep['state'].params,
      agreement.gradient_rms(rep['state'].opt_state, rep['config'].optimizer.b2),
      2 * sum(float(m['lr']) for m in rep['metrics']))
  # AdamW's moments, in gradient units: the gradients' own summation-order differences.
  agreement.assert_moments_agree(fsdp['state'].opt_state, rep['state'].opt_state,
                                 rep['config'].optimizer.b1, rep['config'].optimizer.b2)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree_util.tree_leaves(rep['state'].params),
      jax.tree_util.tree_leaves(rep['initial']['host'].params)))
  assert moved > 1e-5  # the updates did something


def test_evaluation_of_a_split_state_equals_the_replicated_one(runs):
  results = {}
  for mode, run in runs.items():
    evaluate = make_eval_fn(run['config'], run['graphdef'], run['rest'], run['mesh'])
    results[mode] = evaluate(run['state'])
  assert results['fsdp']['num_batches'] == results['replicated']['num_batches'] > 0
  for k in ('mIoU', 'aAcc', 'mAcc'):
    assert results['fsdp'][k] == pytest.approx(results['replicated'][k], abs=1e-9), k


def test_weights_are_gathered_after_their_cast_only_within_the_context():
  """layers.weight: the cast alone outside gathered_weights (the replicated state's step,
  evaluation), the cast then a sharding constraint to the given sharding within."""
  from semask_jax.models import layers
  mesh = sharding_lib.make_mesh()
  kernel = jax.ShapeDtypeStruct((16, 32), np.float32)

  def ops(fn):
    return [str(e.primitive) for e in jax.make_jaxpr(fn)(kernel).eqns]

  assert ops(lambda k: layers.weight(k, jnp.bfloat16)) == ['convert_element_type']

  def gathered(k):
    with layers.gathered_weights(sharding_lib.replicated(mesh)):
      return layers.weight(k, jnp.bfloat16)

  assert ops(gathered) == ['convert_element_type', 'sharding_constraint']
  assert ops(lambda k: layers.weight(k, jnp.bfloat16)) == ['convert_element_type']  # reset
