"""Training logs without TensorFlow: TensorBoard event files (tensorboardX) and `metrics.jsonl`."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import numpy as np


def _import_tensorboardx() -> Any:
  """tensorboardX, without the torch import it does when torch is installed.

  tensorboardX imports torch only to accept torch tensors (seconds and hundreds
  of MB in a JAX process); a `None` module entry makes that import fail as if
  torch were absent. Nothing changes if torch is already imported.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None  # type: ignore[assignment]
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


class MetricWriter:
  """Scalars and images to TensorBoard (`logdir/events.out.tfevents.*`), scalars to metrics.jsonl.

  metrics.jsonl holds one JSON object per write_scalars call, {'step': n, name: value, ...},
  with non-finite values as strings ('nan', 'inf'); TensorBoard gets the finite ones.
  Only the process given `enabled=True` (process 0) writes anything.
  """

  def __init__(self, logdir: str, enabled: bool = True, jsonl_name: str = 'metrics.jsonl'):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    self._tb = _import_tensorboardx().SummaryWriter(logdir, flush_secs=30)
    self._jsonl = open(os.path.join(logdir, jsonl_name), 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for k, v in values.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    record = {'step': int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """RGB images, uint8 [H, W, 3], one per tag (TensorBoard's Images tab)."""
    if not self.enabled:
      return
    for tag, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'{tag}: expected uint8 [H, W, 3], got {image.dtype} {image.shape}')
      self._tb.add_image(tag, image, int(step), dataformats='HWC')
    self.flush()

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False
