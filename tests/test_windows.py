"""Window partition/reverse, relative index and shift mask against plain NumPy references."""
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semask_jax.models.windows import (pad_to_multiple, relative_position_index, shift_mask,
                                       window_partition, window_reverse)


def _np_partition(x, m):
  """Loop reference: windows in row-major window order, tokens row-major inside."""
  b, h, w, c = x.shape
  out = []
  for bi in range(b):
    wins = []
    for wy in range(h // m):
      for wx in range(w // m):
        wins.append(x[bi, wy * m:(wy + 1) * m, wx * m:(wx + 1) * m].reshape(m * m, c))
    out.append(np.stack(wins))
  return np.stack(out)


@pytest.mark.parametrize("h,w,m", [(13, 22, 7), (9, 5, 4), (7, 7, 7), (1, 30, 12)])
def test_partition_reverse_after_padding(h, w, m):
  x = np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)
  xp = np.asarray(pad_to_multiple(jnp.asarray(x), m))
  hp, wp = -(-h // m) * m, -(-w // m) * m
  assert xp.shape == (2, hp, wp, 3)
  np.testing.assert_array_equal(xp[:, :h, :w], x)
  assert not xp[:, h:].any() and not xp[:, :, w:].any()
  wins = np.asarray(window_partition(jnp.asarray(xp), m))
  np.testing.assert_array_equal(wins, _np_partition(xp, m))
  np.testing.assert_array_equal(np.asarray(window_reverse(jnp.asarray(wins), m, hp, wp)), xp)


def test_relative_position_index_against_loops():
  m = 5
  idx = relative_position_index(m)
  for (i, (y1, x1)), (j, (y2, x2)) in itertools.product(
      enumerate(itertools.product(range(m), range(m))), repeat=2):
    assert idx[i, j] == (y1 - y2 + m - 1) * (2 * m - 1) + (x1 - x2 + m - 1)
  assert idx.min() == 0 and idx.max() == (2 * m - 1) ** 2 - 1


def _np_region(hp, wp, m, s):
  """Region id per pixel of the padded map from the three slices per axis."""
  def axis(n):
    r = np.zeros(n, int)
    r[n - m:n - s] = 1
    r[n - s:] = 2
    return r
  return axis(hp)[:, None] * 3 + axis(wp)[None, :]


@pytest.mark.parametrize("hp,wp,m,s", [(14, 21, 7, 3), (8, 12, 4, 2), (12, 12, 12, 6)])
def test_shift_mask_against_regions(hp, wp, m, s):
  mask = shift_mask(hp, wp, m, s)
  region = _np_region(hp, wp, m, s)
  nwx = wp // m
  assert mask.shape == ((hp // m) * nwx, m * m, m * m)
  for win in range(mask.shape[0]):
    wy, wx = divmod(win, nwx)
    reg = region[wy * m:(wy + 1) * m, wx * m:(wx + 1) * m].reshape(-1)
    expected = np.where(reg[:, None] != reg[None, :], -100.0, 0.0)
    np.testing.assert_array_equal(mask[win], expected)
  # The last window always straddles region borders; the first one only when it is the
  # only window along an axis.
  assert mask[-1].min() == -100.0
  assert bool(mask[0].any()) == (hp == m or wp == m)


def test_shift_mask_is_built_in_the_graph_from_small_constants():
  """No [nW, N, N] constant in the program (XLA:TPU compiles constants into its code: 10 MB
  for SeMask-T's first stage), only the two axes' region ids."""
  text = jax.jit(lambda: shift_mask(133, 133, 7, 3)).lower().as_text()
  sizes = [int(np.prod([int(d) for d in dims.split("x")]))
           for dims in re.findall(r"constant dense<[^>]*> : tensor<([0-9x]+)x\w+>", text)]
  assert sizes and max(sizes) <= 133, sizes
