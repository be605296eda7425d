"""The in-graph linear assignment against scipy.optimize.linear_sum_assignment."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from semask_jax.losses.matching import assignment_cost, linear_sum_assignment

_batched = jax.jit(jax.vmap(linear_sum_assignment))


def _check(cost: np.ndarray, valid: np.ndarray, result: np.ndarray, exact: bool) -> None:
  """result is a valid matching of the valid targets with scipy's optimal total cost
  (and scipy's very assignment when `exact`: costs with a unique optimum)."""
  q, t = cost.shape
  assert result.shape == (t,) and result.dtype == np.int32
  assert np.all(result[~valid] == -1), result
  mine = result[valid]
  assert np.all((mine >= 0) & (mine < q)), result
  assert len(np.unique(mine)) == len(mine), result
  rows, cols = scipy.optimize.linear_sum_assignment(cost[:, valid].astype(np.float64))
  best = cost[:, valid][rows, cols].astype(np.float64).sum()
  total = cost[mine, np.flatnonzero(valid)].astype(np.float64).sum()
  if exact:
    np.testing.assert_array_equal(mine[cols], rows)
    np.testing.assert_allclose(total, best, rtol=1e-6, atol=1e-6)
  else:
    assert total == best, (total, best)  # integer costs: exact sums


@pytest.mark.parametrize("q,t", [(7, 7), (20, 6), (30, 12)])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_random_vs_scipy_vmap(q, t, kind):
  rng = np.random.default_rng(q * 100 + t + (kind == "ties"))
  n = 24
  if kind == "ties":  # few distinct integer values: many optimal assignments
    cost = rng.integers(0, 4, (n, q, t)).astype(np.float32)
  else:
    cost = rng.normal(size=(n, q, t)).astype(np.float32)
  valid = rng.random((n, t)) < 0.7
  valid[0] = True     # all valid
  valid[1] = False    # nothing to match
  valid[2, 1:] = False
  result = np.asarray(_batched(jnp.asarray(cost), jnp.asarray(valid)))
  for i in range(n):
    _check(cost[i], valid[i], result[i], exact=kind == "normal")


def test_jit_single_and_cost():
  rng = np.random.default_rng(3)
  cost = (rng.random((100, 32)) * 10).astype(np.float32)
  valid = np.arange(32) < 25
  result = np.asarray(jax.jit(linear_sum_assignment)(jnp.asarray(cost), jnp.asarray(valid)))
  _check(cost, valid, result, exact=True)
  rows, cols = scipy.optimize.linear_sum_assignment(cost[:, :25])
  np.testing.assert_allclose(float(assignment_cost(jnp.asarray(cost), jnp.asarray(result))),
                             cost[rows, cols].sum(), rtol=1e-6)


def test_large_offsets_and_scales():
  """Costs far from zero (potentials grow) still give scipy's assignment."""
  rng = np.random.default_rng(5)
  cost = (1000.0 + rng.normal(size=(16, 40, 10)) * 5).astype(np.float32)
  valid = np.ones((16, 10), bool)
  result = np.asarray(_batched(jnp.asarray(cost), jnp.asarray(valid)))
  for i in range(16):
    _check(cost[i], valid[i], result[i], exact=True)


def test_forbidden_and_nan_costs_terminate():
  """inf is a forbidden pair (as scipy); NaN and -inf are forbidden too, an
  unmatchable target gets -1, and nothing hangs."""
  rng = np.random.default_rng(7)
  cost = rng.normal(size=(6, 4)).astype(np.float32)
  cost[0, :] = np.inf
  cost[1, 2] = np.inf
  valid = np.ones(4, bool)
  fn = jax.jit(linear_sum_assignment)
  result = np.asarray(fn(jnp.asarray(cost), jnp.asarray(valid)))
  _check(cost, valid, result, exact=True)
  assert 0 not in result
  # Target 3 can only use query 5; target 0 only query 5 as well -> one of them fails.
  only = np.full((6, 4), np.inf, np.float32)
  only[5, 0] = only[5, 3] = 1.0
  only[1, 1] = only[2, 2] = 1.0
  result = np.asarray(fn(jnp.asarray(only), jnp.asarray(valid)))
  assert result[1] == 1 and result[2] == 2 and sorted(result[[0, 3]].tolist()) == [-1, 5]
  nan = np.full((6, 4), np.nan, np.float32)
  assert np.all(np.asarray(fn(jnp.asarray(nan), jnp.asarray(valid))) == -1)
  mixed = cost.copy()
  mixed[3, :] = np.nan
  mixed[4, 1] = -np.inf
  result = np.asarray(fn(jnp.asarray(mixed), jnp.asarray(valid)))
  finite = np.where(np.isfinite(mixed), mixed, np.inf)
  _check(finite, valid, result, exact=True)


def test_more_valid_targets_than_queries():
  cost = np.arange(12, dtype=np.float32).reshape(3, 4)
  result = np.asarray(jax.jit(linear_sum_assignment)(jnp.asarray(cost)))
  assert (result >= 0).sum() == 3 and (result == -1).sum() == 1
  assert len(set(result[result >= 0].tolist())) == 3
