"""Sine position embedding of Mask2Former (pixel decoder and transformer decoder).

A function of the (static) map size only, so it is a NumPy constant built at
trace time, not a parameter and not work in the step.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def position_embedding_sine(height: int, width: int, num_pos_feats: int,
                            temperature: float = 10000.0) -> np.ndarray:
  """Mask2Former's PositionEmbeddingSine(num_pos_feats, normalize=True) of an
  unpadded map: [height, width, 2 * num_pos_feats] float32, y-part then x-part,
  sin/cos interleaved per pair.

  Normalised as in Mask2Former's transformer_decoder/position_encoding.py (used
  by both the pixel decoder and the transformer decoder): cumsum / (last + 1e-6)
  * 2 pi, i.e. positions 1..n, not pixel centres (no - 0.5 as in Deformable
  DETR); the golden decoder outputs confirm it.
  """
  f32 = np.float32
  scale, eps = f32(2 * np.pi), f32(1e-6)
  y = np.arange(1, height + 1, dtype=f32)
  x = np.arange(1, width + 1, dtype=f32)
  y = y / (f32(height) + eps) * scale                            # [H]
  x = x / (f32(width) + eps) * scale                             # [W]
  d = np.arange(num_pos_feats, dtype=f32)
  dim_t = (f32(temperature) ** (f32(2) * (d // 2) / f32(num_pos_feats))).astype(f32)

  def embed(v: np.ndarray) -> np.ndarray:                        # [N] -> [N, F]
    p = v[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], axis=-1).reshape(len(v), -1)

  pos_y = np.broadcast_to(embed(y)[:, None, :], (height, width, num_pos_feats))
  pos_x = np.broadcast_to(embed(x)[None, :, :], (height, width, num_pos_feats))
  out = np.concatenate([pos_y, pos_x], axis=-1).astype(f32)
  out.setflags(write=False)
  return out
