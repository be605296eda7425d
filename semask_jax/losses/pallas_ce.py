"""The loss's up-sampled cross-entropy as two Pallas (Triton) kernels: no full-resolution
logits in memory, forward or backward.

Why: the SeMask-FPN loss up-samples [B, h, w, K] logits x4 (bilinear, align_corners=False)
and takes a per-pixel CE at full resolution, twice a step (the FPN logits and the
semantic decoder's). XLA's best form (`losses._chunked_upsampled_ce`, row blocks, the
height phases apart, a hand-written backward) still writes and reads every row block's
[B, r, W, K] float32 phases: on an H200's deviceless floor 8.9 of the SeMask-B step's
50.2 ms (docs/performance.md). Here one program reads 3 x 3 [TJ, Kt] tiles of the low-resolution
logits and computes the CE of the F x F output pixels each low-resolution pixel spans in
registers; the backward recomputes them per low-resolution pixel and sums their weighted
softmax - onehot in registers (a gather over the up-sampling's taps: no atomics).

The arithmetic is `losses._chunked_upsampled_ce`'s: each output pixel is the height blend
of two width blends of edge-clamped logits (resize.phase_taps' weights, exact for
power-of-two factors), then CE = logsumexp(z) - z[label]; the backward is
d CE / dz = exp(z - lse) - onehot from the kept logsumexp. Only the float32 reductions'
order differs.

Layouts (F the factor, TJ the column tile, Kp the classes padded to a multiple of the
class chunk Kt with a large negative logit, which adds exp(.) = 0 to every sum):
  A  [B, h + 6, nt_b * TJ + 4, Kp]  the logits Z, edge-padded: Z(r, c) at A[r + 3, c + 3]
  per-pixel maps [B, h, F, F, w']  output pixel (F i + p, F j + q) at [i, p, q, j]; the
                                   backward's zero-padded by 3 in i and j
Both kernels read A (and the backward its maps) at computed offsets, never the outermost
row or column (_PAD); the forward's labels and both kernels' outputs are blocks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from semask_jax.models.resize import phase_taps

_NEG = -1e30  # a padded class's logit: exp(_NEG - max) == 0, finite in bfloat16 too
# Rows / columns before the map's first: of A (the backward reads Z from row / column -2)
# and of the backward's per-pixel maps (pixels from row / column -2); each one more than
# any load reaches, and as many more at the far end: a spare border.
_PAD = 3
# What the spare border holds: None for ordinary padding. Tests set NaN, so that a load
# that leaves the interior poisons the result in Pallas' interpreter, which clamps
# out-of-range offsets into the border where a GPU would read outside the array.
_SPARE: float | None = None


def _spare_border(x: jax.Array, axes: tuple[int, int]) -> jax.Array:
  """x with its first and last index along both axes set to _SPARE (if set)."""
  if _SPARE is None:
    return x
  for axis in axes:
    idx = [slice(None)] * x.ndim
    for end in (0, -1):
      idx[axis] = end
      x = x.at[tuple(idx)].set(_SPARE)
  return x


def fits(logits_shape: tuple[int, ...], labels_shape: tuple[int, ...]) -> bool:
  """Whether upsampled_ce computes this pair: labels F times the logits' height and width
  for one power-of-two F > 1, and a map of at least 3 x 3."""
  _, h, w, _ = logits_shape
  big_h, big_w = labels_shape[1:3]
  f = big_h // h
  return (h > 2 and w > 2 and f > 1 and f & (f - 1) == 0 and f * h == big_h
          and f * w == big_w)


def _triton_params(num_warps: int):
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  return plt.CompilerParams(num_warps=num_warps, num_stages=1)


def _to_phase_layout(x: jax.Array, factor: int) -> jax.Array:
  """[B, F h, F w] -> [B, h, F, F, w] (pixel (F i + p, F j + q) at [i, p, q, j])."""
  b, big_h, big_w = x.shape
  x = x.reshape(b, big_h // factor, factor, big_w // factor, factor)
  return x.transpose(0, 1, 2, 4, 3)


def _from_phase_layout(x: jax.Array) -> jax.Array:
  """[B, h, F, F, w] -> [B, F h, F w]."""
  b, h, f, _, w = x.shape
  return x.transpose(0, 1, 2, 4, 3).reshape(b, h * f, w * f)


def _padded_logits(logits: jax.Array, width: int, kp: int) -> jax.Array:
  """A: logits edge-padded by _PAD rows above and below and columns to `width`, classes
  to kp (a multiple of the class chunk) with _NEG; in the logits' dtype (bfloat16 logits
  are read at half the bytes)."""
  _, h, w, k = logits.shape
  a = jnp.pad(logits, ((0, 0), (_PAD, _PAD), (_PAD, width - w - _PAD), (0, 0)), mode="edge")
  return _spare_border(
      jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, kp - k)), constant_values=_NEG), (1, 2))


def _tiles(a_ref, b, row0, col0, tj: int, classes) -> list[list[jax.Array]]:
  """The 3 x 3 float32 tiles [TJ, Kt] of A at rows row0 + r, columns col0 + c + t (t < TJ):
  every logit a program's blends read, loaded once."""
  return [[a_ref[b, row0 + r, pl.ds(col0 + c, tj), classes].astype(jnp.float32)
           for c in range(3)] for r in range(3)]


def _blend(tiles, r0: int, c0: int, wr: float, wc: float) -> jax.Array:
  """The up-sampled logits whose first row / column taps are tiles[r0][c0]: the height
  blend (weight wr on the second row) of the width blends (weight wc on the second
  column), in resize_bilinear's order."""
  def width(r):
    return tiles[r][c0] * (1.0 - wc) + tiles[r][c0 + 1] * wc
  return width(r0) * (1.0 - wr) + width(r0 + 1) * wr


def _fwd_kernel(a_ref, lab_ref, ce_ref, lse_ref, *, taps, tj: int, kt: int, nk: int,
                ignore_index: int):
  """Program (b, i, jt): the CE and logsumexp of output pixels (F i + p, F j + q) for the
  TJ columns j of tile jt, all phases p, q; the classes in nk chunks of kt (an online
  logsumexp per pixel: running max, sum of exp(z - max), the label's logit).

  Phase (p, q) blends Z rows i + ro_p + {0, 1} and columns j + co_q + {0, 1}: with
  offsets in {-1, 0}, all of them lie in the 3 x 3 tiles from Z(i - 1, j0 - 1).
  """
  b, i, jt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  nf = len(taps)
  chunk_iota = jax.lax.broadcasted_iota(jnp.int32, (tj, kt), 1)
  labs = [[lab_ref[0, 0, p, q, :] for q in range(nf)] for p in range(nf)]  # [TJ] each

  def chunk(c, carry):
    tiles = _tiles(a_ref, b, i - 1 + _PAD, jt * tj - 1 + _PAD, tj, pl.ds(c * kt, kt))
    out = []
    for p, (ro, wr) in enumerate(taps):
      for q, (co, wc) in enumerate(taps):
        m, total, picked = carry[p * nf + q]
        z = _blend(tiles, ro + 1, co + 1, wr, wc)  # [TJ, Kt]
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        total = total * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        hit = chunk_iota + c * kt == labs[p][q][:, None]
        out.append((m_new, total, picked + jnp.sum(jnp.where(hit, z, 0.0), axis=1)))
    return tuple(out)

  zero = jnp.zeros((tj,), jnp.float32)
  state = jax.lax.fori_loop(0, nk, chunk, ((zero + _NEG, zero, zero),) * (nf * nf))
  for p in range(nf):
    for q in range(nf):
      m, total, picked = state[p * nf + q]
      lse = m + jnp.log(total)
      ce_ref[0, 0, p, q, :] = jnp.where(labs[p][q] != ignore_index, lse - picked, 0.0)
      lse_ref[0, 0, p, q, :] = lse


def _bwd_kernel(a_ref, g_ref, lse_ref, lab_ref, d_ref, *, taps, tj: int, kt: int):
  """Program (b, I + 1, jt, kc): d loss / d Z(I, J) for the edge-clamped logits Z at row
  I in [-1, h], columns J = jt * TJ - 1 + t, t < TJ (D's column J + 1), classes of
  chunk kc.

  Output pixel (i, p, j, q) reads Z at rows i + ro_p + s and columns j + co_q + u
  (s, u in {0, 1}); so Z(I, J) gets, for each (p, s, q, u), the pixel at
  i = I - ro_p - s, j = J - co_q - u with weight wr(p, s) * wc(q, u); that pixel's
  logits blend Z rows I - s + {0, 1}, columns J - u + {0, 1}: the 3 x 3 tiles from
  Z(I - 1, J0 - 1). Pixels outside the map have g = 0 and a logsumexp of 1e30 (the
  per-pixel maps are padded): exp(z - lse) = 0 there, no overflow, no select. Each
  output pixel's softmax is recomputed for each of its four taps: registers cannot shift
  a tile by a column, memory loads can.
  """
  b, row, jt, kc = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  big_i, j0 = row - 1, jt * tj - 1
  tiles = _tiles(a_ref, b, big_i - 1 + _PAD, j0 - 1 + _PAD, tj, pl.ds(kc * kt, kt))
  class_ids = jax.lax.broadcasted_iota(jnp.int32, (tj, kt), 1) + kc * kt
  acc = jnp.zeros((tj, kt), jnp.float32)
  for p, (ro, wr) in enumerate(taps):
    for s, ws in ((0, 1.0 - wr), (1, wr)):
      i = big_i - ro - s  # in [-2, h + 1]: row i + _PAD of the padded maps
      for q, (co, wc) in enumerate(taps):
        for u, wu in ((0, 1.0 - wc), (1, wc)):
          cols = pl.ds(j0 - co - u + _PAD, tj)  # the pixels' columns j >= -2
          g = g_ref[b, i + _PAD, p, q, cols]  # [TJ]
          lse = lse_ref[b, i + _PAD, p, q, cols]
          lab = lab_ref[b, i + _PAD, p, q, cols]
          z = _blend(tiles, 1 - s, 1 - u, wr, wc)
          onehot = (class_ids == lab[:, None]).astype(jnp.float32)
          acc = acc + (ws * wu) * g[:, None] * (jnp.exp(z - lse[:, None]) - onehot)
  d_ref[0, 0, :, :] = acc


def _geometry(h: int, w: int, k: int, factor: int, tj: int, kt: int):
  """(taps, forward column tiles, backward column tiles, padded classes, A's width)."""
  taps = phase_taps(h, factor)  # the same for the columns: only interior offsets/weights
  assert taps == phase_taps(w, factor), (h, w, factor)
  nt_f, nt_b = pl.cdiv(w, tj), pl.cdiv(w + 2, tj)
  return taps, nt_f, nt_b, pl.cdiv(k, kt) * kt, nt_b * tj + 4


def _fwd(logits, labels, factor, ignore_index, tj, kt, num_warps, interpret):
  b, h, w, k = logits.shape
  taps, nt_f, _, kp, width = _geometry(h, w, k, factor, tj, kt)
  a = _padded_logits(logits, width, kp)
  lab = _to_phase_layout(labels.astype(jnp.int32), factor)
  lab = jnp.pad(lab, ((0, 0),) * 4 + ((0, nt_f * tj - w),), constant_values=ignore_index)
  block = pl.BlockSpec((1, 1, factor, factor, tj), lambda bi, i, jt: (bi, i, 0, 0, jt))
  out = jax.ShapeDtypeStruct((b, h, factor, factor, nt_f * tj), jnp.float32)
  ce, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, taps=taps, tj=tj, kt=kt, nk=kp // kt,
                        ignore_index=ignore_index),
      grid=(b, h, nt_f),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY), block],
      out_specs=[block, block], out_shape=[out, out],
      interpret=interpret, name="upsampled_ce_fwd",
      compiler_params=None if interpret else _triton_params(num_warps),
  )(a, lab)
  return ce[..., :w], lse[..., :w], a


def _bwd(a, g, lse, labels, k, factor, ignore_index, tj, kt, num_warps, interpret):
  """d loss / d logits [B, h, w, K] float32 from the per-pixel cotangent g [B, H, W]."""
  b, big_h, big_w = labels.shape
  h, w = big_h // factor, big_w // factor
  taps, _, nt_b, kp, _ = _geometry(h, w, k, factor, tj, kt)
  lab = _to_phase_layout(labels.astype(jnp.int32), factor)
  g = jnp.where(lab != ignore_index, _to_phase_layout(g.astype(jnp.float32), factor), 0.0)
  pad = ((0, 0), (_PAD, _PAD), (0, 0), (0, 0), (_PAD, nt_b * tj + 1 - w))
  g, lab = _spare_border(jnp.pad(g, pad), (1, 4)), jnp.pad(lab, pad)
  lse = jnp.pad(lse, pad, constant_values=-_NEG)
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  d = pl.pallas_call(
      functools.partial(_bwd_kernel, taps=taps, tj=tj, kt=kt),
      grid=(b, h + 2, nt_b, kp // kt),
      in_specs=[any_spec] * 4,
      out_specs=pl.BlockSpec((1, 1, tj, kt), lambda bi, r, jt, kc: (bi, r, jt, kc)),
      out_shape=jax.ShapeDtypeStruct((b, h + 2, nt_b * tj, kp), jnp.float32),
      interpret=interpret, name="upsampled_ce_bwd",
      compiler_params=None if interpret else _triton_params(num_warps),
  )(a, g, lse, lab)
  # Fold the clamped edges (Z rows / columns -1 and h / w are copies of 0 and h-1 / w-1).
  rows = d[:, 1:h + 1].at[:, 0].add(d[:, 0]).at[:, h - 1].add(d[:, h + 1])
  cols = rows[:, :, 1:w + 1].at[:, :, 0].add(rows[:, :, 0]).at[:, :, w - 1].add(
      rows[:, :, w + 1])
  return cols[..., :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def upsampled_ce(logits: jax.Array, labels: jax.Array, factor: int, ignore_index: int,
                 block_cols: int = 32, block_classes: int = 32, num_warps: int = 4,
                 interpret: bool = False) -> jax.Array:
  """Per-pixel CE [B, F h, F w] float32 of resize_bilinear(logits, labels' size) at the
  integer labels [B, F h, F w] (ignored pixels -> 0), for logits [B, h, w, K] (any float
  dtype; read as is, computed in float32) and a power-of-two factor F, h, w >= 3.

  block_cols: TJ, the low-resolution columns of one program (a power of two).
  block_classes: Kt, the classes of one chunk (a power of two; the classes are padded to
  a multiple of it).
  interpret: Pallas' interpreter instead of Triton (any backend; slow: for tests).
  """
  ce, _, _ = _fwd(logits, labels, factor, ignore_index, block_cols, block_classes,
                  num_warps, interpret)
  return _from_phase_layout(ce)


def _upsampled_ce_fwd(logits, labels, factor, ignore_index, block_cols, block_classes,
                      num_warps, interpret):
  ce, lse, a = _fwd(logits, labels, factor, ignore_index, block_cols, block_classes,
                    num_warps, interpret)
  # The class count and dtype of the cotangent ride as an empty [0, K] array (residuals
  # are arrays); the logits themselves are not kept: A has them.
  like = jnp.zeros((0, logits.shape[-1]), logits.dtype)
  return _from_phase_layout(ce), (a, lse, labels, like)


def _upsampled_ce_bwd(factor, ignore_index, block_cols, block_classes, num_warps,
                      interpret, res, g):
  a, lse, labels, like = res
  d = _bwd(a, g, lse, labels, like.shape[1], factor, ignore_index, block_cols,
           block_classes, num_warps, interpret)
  return d.astype(like.dtype), None


upsampled_ce.defvjp(_upsampled_ce_fwd, _upsampled_ce_bwd)
