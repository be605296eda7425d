"""Segmentation metrics: a data-set-wide confusion matrix and mIoU / aAcc / per-class IoU, Acc (SPEC 6).

The confusion matrix is accumulated on device in int32 (rows = label, columns =
prediction); under jit with a batch sharded over all processes the sum is over
the global batch, so no explicit cross-process reduction is needed.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     *, ignore_index: int, valid: jax.Array | None = None) -> jax.Array:
  """[K, K] int32 counts of (label, pred) pairs over the non-ignored pixels.

  pred, label: int [B, H, W]; valid: optional bool [B] (padded batch entries are False).
  """
  mask = (label != ignore_index) & (label >= 0) & (label < num_classes)
  if valid is not None:
    mask &= valid.reshape((-1,) + (1,) * (label.ndim - 1))
  idx = jnp.where(mask, label * num_classes + pred, 0).astype(jnp.int32)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[idx.reshape(-1)].add(
      mask.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def compute_metrics(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """mIoU, mAcc, aAcc and per-class IoU / Acc from a confusion matrix.

  As in mmseg: a class absent from both labels and predictions has NaN IoU and
  is left out of mIoU; a class only predicted counts with IoU 0. Acc is NaN
  (and left out of mAcc) for classes without label pixels.
  """
  cm = np.asarray(cm, np.float64)
  k = cm.shape[0]
  tp = np.diag(cm)
  label_area = cm.sum(axis=1)
  pred_area = cm.sum(axis=0)
  union = label_area + pred_area - tp
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = np.where(union > 0, tp / union, np.nan)
    acc = np.where(label_area > 0, tp / label_area, np.nan)
  total = cm.sum()
  names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f'{len(names)} class names for a {k}-class confusion matrix')
  return {
      'mIoU': _nanmean(iou),
      'mAcc': _nanmean(acc),
      'aAcc': float(tp.sum() / total) if total > 0 else float('nan'),
      'num_pixels': int(total),
      'per_class': [
          {'class': names[i], 'IoU': _num(iou[i]), 'Acc': _num(acc[i])} for i in range(k)],
  }


def _nanmean(x: np.ndarray) -> float:
  return float(np.mean(x[~np.isnan(x)])) if (~np.isnan(x)).any() else float('nan')


def _num(x: float) -> float | None:
  return None if np.isnan(x) else float(x)


def format_table(metrics: dict[str, Any]) -> str:
  """Per-class IoU / Acc table (percent, like mmseg's log) followed by the summary line."""
  rows = metrics['per_class']
  width = max([5] + [len(r['class']) for r in rows])
  fmt = lambda v: '  nan' if v is None else f'{100 * v:5.2f}'  # noqa: E731
  lines = [f'{"Class":<{width}} |   IoU |   Acc', '-' * (width + 16)]
  lines += [f'{r["class"]:<{width}} | {fmt(r["IoU"])} | {fmt(r["Acc"])}' for r in rows]
  lines.append(f'aAcc {100 * metrics["aAcc"]:.2f}  mIoU {100 * metrics["mIoU"]:.2f}  '
               f'mAcc {100 * metrics["mAcc"]:.2f}')
  return '\n'.join(lines)
