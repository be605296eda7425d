"""The benchmarks' host-side helpers: the process's peak resident memory (Linux) and
synthetic labels.

Kept free of jax imports: benchmarks/torch_reference.py measures the PyTorch reference
with them, and importing jax there would add its runtime (~200 MiB) to its memory.
"""
from __future__ import annotations

import ctypes
import resource
import sys

import numpy as np


def reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark of this process (Linux: clear_refs 5).

  Called after compilation so that the peak RSS read afterwards is that of the
  timed steps, not of XLA's compiler. False where the kernel does not allow it.
  Freed heap pages are first handed back to the kernel (glibc malloc_trim):
  otherwise what the compiler freed but malloc kept would count as the step's.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _vm_hwm() -> int | None:
  """Peak RSS since the last reset_peak_rss() (VmHWM), in bytes; None off Linux."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def process_peak_rss() -> int:
  """The whole process's peak RSS in bytes (getrusage: not affected by the reset)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss * (1 if sys.platform == "darwin" else 1024))


def peak_rss_since_reset(rss_was_reset: bool) -> tuple[int, str]:
  """(bytes, what they are): the peak RSS since reset_peak_rss() where it worked, else
  the whole process's."""
  hwm = _vm_hwm() if rss_was_reset else None
  if hwm:
    return hwm, "process peak RSS during the steps (mark reset before them)"
  return process_peak_rss(), "process peak RSS (the whole process's: the mark could not be reset)"


LABEL_CLASSES = 16  # classes an image's label holds (ADE20K crops: typically 10-30)


def synthetic_labels(rng: np.random.Generator, batch: int, size: int, num_classes: int
                     ) -> np.ndarray:
  """[B, size, size] int32 labels shaped like a segmentation's: an 8x8 grid of regions
  over LABEL_CLASSES random classes per image, the top eighth ignored (255). The FPN
  loss costs the same for any label; the Mask2Former criterion's matching and mask
  losses scale with the classes present, which uniform noise would set to all of them."""
  labels = np.empty((batch, size, size), np.int32)
  cell = -(-size // 8)
  for b in range(batch):
    classes = rng.choice(num_classes, min(LABEL_CLASSES, num_classes), replace=False)
    grid = classes[rng.integers(0, len(classes), (8, 8))]
    labels[b] = np.kron(grid, np.ones((cell, cell), np.int32))[:size, :size]
  labels[:, : size // 8] = 255  # some ignored pixels
  return labels
