"""Exact linear assignment (Hungarian matching) inside the jitted graph.

The Mask2Former criterion matches each image's targets to queries with
scipy.optimize.linear_sum_assignment. Calling scipy from a jitted training step
needs a host callback (a device -> host -> device round trip per step, and no
TPU support inside some programs); this module solves the same problem with
lax loops instead, on every backend, under jit and vmap.

Algorithm: the shortest augmenting path method with dual potentials
(Jonker-Volgenant as described by Crouse, "On implementing 2D rectangular
assignment algorithms", 2016) -- the one scipy implements. Targets are the rows
(T <= Q), queries the columns; each valid target adds one augmenting path found
by a Dijkstra search over the columns with reduced costs, so the result is an
optimal assignment (exact up to float32 rounding of the potentials). Work is
O(T^2 Q) in O(T^2) sequential steps of O(Q) vector work.

Non-finite costs: +inf, -inf and NaN entries are all treated as forbidden
pairs (scipy rejects NaN and -inf and raises on infeasible matrices). A target
that cannot be matched (every remaining query forbidden, or more valid targets
than queries) gets -1 and leaves the potentials unchanged; no loop depends on
the cost values for its termination.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def linear_sum_assignment(cost: jax.Array, valid_targets: jax.Array | None = None
                          ) -> jax.Array:
  """Minimum-cost matching of every valid target to a distinct query.

  Args:
    cost: [Q, T] float cost of giving query q to target t (detectron2's layout:
      queries are rows). Needs Q >= the number of valid targets.
    valid_targets: [T] bool; padded targets (False) never match and never take
      a query. None = all valid.

  Returns:
    [T] int32: the query of each target, -1 for invalid (or unmatchable) targets.
    `query_per_target[t] = q` is scipy's pair (row q, col t) of
    linear_sum_assignment(cost[:, valid]).
  """
  num_q, num_t = cost.shape
  if valid_targets is None:
    valid_targets = jnp.ones((num_t,), bool)
  c = cost.T.astype(jnp.float32)  # [T, Q] rows = targets
  c = jnp.where(jnp.isfinite(c), c, jnp.inf)
  inf = jnp.float32(jnp.inf)
  cols = jnp.arange(num_q, dtype=jnp.int32)
  rows = jnp.arange(num_t, dtype=jnp.int32)

  def augment(cur_row, state):
    u, v, col4row, row4col = state  # [T], [Q], [T] int, [Q] int

    # Dijkstra over the columns from cur_row: each step settles one column (SC).
    def search_cond(s):
      _, _, _, _, _, _, sink, failed, it = s
      return (sink < 0) & ~failed & (it < num_q)

    def search_body(s):
      sr, sc, spc, path, i, min_val, sink, failed, it = s
      sr = sr.at[i].set(True)
      r = min_val + c[i] - u[i] - v  # [Q] reduced path costs through row i
      better = ~sc & (r < spc)
      path = jnp.where(better, i, path)
      spc = jnp.where(better, r, spc)
      masked = jnp.where(sc, inf, spc)
      lowest = jnp.min(masked)
      # Among equally short columns prefer a free one (ends the path; as scipy).
      tied = ~sc & (masked == lowest)
      free_tied = tied & (row4col < 0)
      j = jnp.where(jnp.any(free_tied), jnp.argmax(free_tied), jnp.argmax(tied)).astype(jnp.int32)
      failed = ~(lowest < inf)
      sc = jnp.where(failed, sc, sc.at[j].set(True))
      sink = jnp.where(~failed & (row4col[j] < 0), j, -1)
      i = jnp.where(failed | (row4col[j] < 0), i, row4col[j])
      return sr, sc, spc, path, i, jnp.where(failed, min_val, lowest), sink, failed, it + 1

    skip = ~valid_targets[cur_row]
    init = (jnp.zeros((num_t,), bool), jnp.zeros((num_q,), bool), jnp.full((num_q,), inf),
            jnp.full((num_q,), -1, jnp.int32), cur_row, jnp.float32(0.0), jnp.int32(-1),
            skip, jnp.int32(0))
    sr, sc, spc, path, _, min_val, sink, failed, _ = jax.lax.while_loop(
        search_cond, search_body, init)
    ok = (sink >= 0) & ~failed

    # Dual update (only when a path was found).
    spc_of_row = spc[jnp.clip(col4row, 0)]  # [T]
    du = jnp.where(sr & (rows != cur_row), min_val - spc_of_row, 0.0)
    du = du.at[cur_row].add(min_val)
    dv = jnp.where(sc, min_val - spc, 0.0)
    u = jnp.where(ok, u + du, u)
    v = jnp.where(ok, v - dv, v)

    # Flip the path back from the sink to cur_row (at most T steps).
    def flip_cond(s):
      _, _, _, done, it = s
      return ~done & (it < num_t)

    def flip_body(s):
      col4row, row4col, j, _, it = s
      i = path[j]
      row4col = row4col.at[j].set(i)
      nxt = col4row[i]
      col4row = col4row.at[i].set(j)
      return col4row, row4col, nxt, i == cur_row, it + 1

    col4row, row4col, _, _, _ = jax.lax.while_loop(
        flip_cond, flip_body, (col4row, row4col, jnp.maximum(sink, 0), ~ok, jnp.int32(0)))
    return u, v, col4row, row4col

  state = (jnp.zeros((num_t,), jnp.float32), jnp.zeros((num_q,), jnp.float32),
           jnp.full((num_t,), -1, jnp.int32), jnp.full((num_q,), -1, jnp.int32))
  _, _, col4row, _ = jax.lax.fori_loop(0, num_t, augment, state)
  return jnp.where(valid_targets, col4row, -1)


def assignment_cost(cost: jax.Array, query_per_target: jax.Array) -> jax.Array:
  """Total cost of a matching [T] (-1 = unmatched) on cost [Q, T]."""
  picked = jnp.take_along_axis(cost, jnp.clip(query_per_target, 0)[None], axis=0)[0]
  return jnp.sum(jnp.where(query_per_target >= 0, picked, 0.0))
