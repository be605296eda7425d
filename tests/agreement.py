"""Two training runs that should agree up to the order of float32 sums (1 vs 8 devices,
replicated vs fsdp): every parameter element bounded, and the ones that differ explained.

AdamW moves an element by lr * m_hat / (sqrt(v_hat) + eps) per update. Where the gradient
is well above float32 rounding, another summation order changes that by far less than
1e-6; where the gradient is itself at the rounding level (|g| ~ 1e-7 against eps = 1e-8:
unmatched queries, terms that cancel), the step is g / |g| of noise, anywhere in +-lr.
So: every element within 2 x (the sum of the applied learning rates), and an element
beyond 1e-6 only where the gradients Adam was given are below 1e-6. Those gradients are
read from Adam's second moment (the bias-corrected root mean square of every gradient
the optimizer was given, after clipping if any): an element counts as "no gradient" only
where all of them were below the threshold.

Also the 1-vs-8-device train step of the mask-classification heads that test_maskformer,
test_train_mask2former and test_train_fapn share (mask_step_on_one_and_all_devices), and
the coarser element criterion two of them use (assert_params_mostly_agree).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

import input_pipeline
from semask_jax import sharding as sharding_lib
from semask_jax.train import loop as train
from semask_jax.train import optim
from semask_jax.train import state as state_lib

AGREE = 1e-6       # |a - b| allowed anywhere
NO_GRADIENT = 1e-6  # |grad| below which Adam's step is rounding noise
# The mask-classification metrics that two runs' steps must agree on (1e-5 relative).
MASK_LOSS_METRICS = ('loss', 'loss_ce', 'loss_mask', 'loss_dice', 'loss_cate', 'grad_norm')


def adam_state(opt_state: Any) -> optax.ScaleByAdamState:
  """The ScaleByAdamState inside an optax chain / MultiSteps state."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
  assert len(found) == 1, f'{len(found)} Adam states in the optimizer state'
  return found[0]


def gradient_rms(opt_state: Any, b2: float) -> Any:
  """Per element, the root mean square of the gradients Adam was given: sqrt(v_hat)."""
  adam = adam_state(jax.device_get(opt_state))
  count = int(np.asarray(adam.count))
  assert count >= 1, 'no update yet'
  correction = 1.0 - float(b2) ** count
  return jax.tree_util.tree_map(lambda v: np.sqrt(np.asarray(v, np.float64) / correction),
                                adam.nu)


def assert_params_agree(got: Any, want: Any, grad: Any, max_move: float) -> dict[str, Any]:
  """got/want: params trees of the two runs; grad: |gradient| per element (same tree, e.g.
  gradient_rms of the reference run's optimizer state); max_move: 2 x the summed lr.

  Returns counts for the caller's own checks (elements beyond AGREE, and their total)."""
  got, want, grad = jax.device_get((got, want, grad))
  worst, beyond, total, bad = 0.0, 0, 0, []
  flat_want = jax.tree_util.tree_leaves(want)
  flat_grad = jax.tree_util.tree_leaves(grad)
  flat_got, _ = jax.tree_util.tree_flatten_with_path(got)
  assert len(flat_got) == len(flat_want) == len(flat_grad)
  for (path, a), b, g in zip(flat_got, flat_want, flat_grad):
    name = optim.param_name(path)
    a, b, g = np.asarray(a), np.asarray(b), np.abs(np.asarray(g))
    assert a.shape == b.shape == g.shape, name
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    total += d.size
    if d.size == 0:
      continue
    worst = max(worst, float(d.max()))
    if d.max() > max_move:
      bad.append(f'{name}: max |diff| {d.max():.3g} > {max_move:.3g} (2 x lr)')
    off = d > AGREE
    beyond += int(off.sum())
    if (off & (g >= NO_GRADIENT)).any():
      i = np.argmax(np.where(off & (g >= NO_GRADIENT), d, -1.0))
      bad.append(f'{name}: {int((off & (g >= NO_GRADIENT)).sum())} elements differ by more than '
                 f'{AGREE} where |grad| >= {NO_GRADIENT}; worst |diff| {d.flat[i]:.3g} at '
                 f'|grad| {g.flat[i]:.3g}')
  assert not bad, '\n'.join(bad)
  return dict(beyond=beyond, total=total, worst=worst)


def assert_moments_agree(got_opt_state: Any, want_opt_state: Any, b1: float, b2: float) -> None:
  """AdamW's moments of two runs, in gradient units (bias-corrected m and sqrt(v)): within
  1e-5 relative (the loss terms' and grad_norm's criterion) or 1e-6 absolute. Measured on
  the tiny model, replicated vs fsdp after 2 steps: at most 3e-8 apart."""
  got, want = jax.device_get((adam_state(got_opt_state), adam_state(want_opt_state)))
  count = int(np.asarray(want.count))
  assert int(np.asarray(got.count)) == count >= 1
  c1, c2 = 1 - float(b1) ** count, 1 - float(b2) ** count
  for (path, m_got), m_want, v_got, v_want in zip(
      jax.tree_util.tree_flatten_with_path(got.mu)[0], jax.tree_util.tree_leaves(want.mu),
      jax.tree_util.tree_leaves(got.nu), jax.tree_util.tree_leaves(want.nu)):
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    for what, a, b in (('m_hat', f(m_got) / c1, f(m_want) / c1),
                       ('sqrt(v_hat)', np.sqrt(f(v_got) / c2), np.sqrt(f(v_want) / c2))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=AGREE,
                                 err_msg=f'{what} of {optim.param_name(path)}')


def tiny_mask_config(config: Any) -> Any:
  """A demo mask-classification config shrunk for the 1-vs-8-device steps (16-dim Swin,
  8 queries), with a full-lr first step (no warm-up) so that the update shows, and fast
  XLA:CPU compiles."""
  config.model.embed_dim = 16
  config.model.num_heads = (1, 1, 2, 2)
  config.model.num_queries = 8
  config.optimizer.warmup_steps = 0
  config.xla_cpu_fast_compile = True
  return config


def mask_step_on_one_and_all_devices(config: Any, model: Any, check_num_masks: bool = True):
  """One train step of a mask-classification head (MaskFormer, Mask2Former, FaPN) from
  `model` on the same global batch of 8, on one device and on all of them (8): both
  finite, no target dropped, MASK_LOSS_METRICS within 1e-5 relative and, where
  check_num_masks, num_masks the targets of the whole global batch (not of one device's
  share). Returns ((state_1, metrics_1), (state_8, metrics_8)) on the host."""
  batch = next(input_pipeline.create_train_iterator(config.data, seed=0, global_batch_size=8))
  labels = np.asarray(batch['label'])
  want_masks = sum(len(np.setdiff1d(np.unique(l), [255])) for l in labels)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding_lib.make_mesh(devices)
    state, graphdef, rest, tx, schedule = state_lib.init_train_state(config, model, mesh)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    step = train.jit_train_step(train.make_train_step(graphdef, rest, tx, schedule, config),
                                shardings, mesh, sharding_lib.compiler_options(config))
    state, metrics = step(state, input_pipeline.make_global_batch(batch, mesh))
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (_, m1), (_, m8) = results
  for m in (m1, m8):
    if check_num_masks:
      assert m['num_masks'] == want_masks
    assert m['finite'] == 1.0 and m['dropped_targets'] == 0
  for k in MASK_LOSS_METRICS:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, err_msg=k)
  return results


def assert_params_mostly_agree(got: Any, want: Any, lr: float) -> None:
  """The coarser criterion: every element within 2 x lr (Adam's first step moves
  rounding-level gradients by up to lr) and more than 99.5 % of them within 1e-6."""
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(flat_want[p])).ravel()
                          for p, a in jax.tree_util.tree_leaves_with_path(got)])
  assert diffs.max() <= 2 * lr and np.mean(diffs <= 1e-6) > 0.995, np.quantile(
      diffs, [0.5, 0.995, 1.0])


def largest_move(params: Any, model: Any) -> float:
  """max |params - the parameters of `model`| over every element (what the steps did)."""
  before = state_lib.split_model(model)[1]
  return max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(before)))
