"""Scalar logging without TensorFlow: TensorBoard event files and `metrics.jsonl`.

The event file is a TFRecord stream of hand-encoded `tensorflow.Event`
protos (wall_time = 1, step = 2, file_version = 3, summary = 5; Summary.value = 1;
Value.tag = 1, Value.simple_value = 2), each record framed by a length and
masked CRC32C checksums, which is all TensorBoard needs to plot scalars.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Any, Mapping

import numpy as np


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """Serialised `Event` proto with either a file_version or a Summary of simple values."""
  msg = b'\x09' + struct.pack('<d', wall_time) + b'\x10' + _varint(int(step))
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if scalars:
    summary = b''.join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + b'\x15' + struct.pack('<f', float(v)))
        for tag, v in scalars.items())
    msg += _field_bytes(5, summary)
  return msg


def frame_record(data: bytes) -> bytes:
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


class MetricWriter:
  """Writes scalars to TensorBoard event files and one JSON object a step to metrics.jsonl.

  Only the process given `enabled=True` (process 0) writes anything.
  """

  def __init__(self, logdir: str, enabled: bool = True, jsonl_name: str = 'metrics.jsonl'):
    self.enabled = enabled
    self._events = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self._events = open(os.path.join(logdir, name), 'ab')
    self._events.write(frame_record(encode_event(0, time.time(), file_version='brain.Event:2')))
    self._jsonl = open(os.path.join(logdir, jsonl_name), 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    self._events.write(frame_record(encode_event(step, time.time(), finite)))
    record = {'step': int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self.flush()

  def flush(self) -> None:
    if self.enabled:
      self._events.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._events.close()
      self._jsonl.close()
      self.enabled = False


def read_events(path: str) -> list[bytes]:
  """Record payloads of an event file, checking both checksums of each (for tests and tools)."""
  out = []
  with open(path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (n,) = struct.unpack('<Q', header)
    if struct.unpack('<I', data[pos + 8:pos + 12])[0] != masked_crc32c(header):
      raise ValueError(f'{path}: bad length checksum at byte {pos}')
    payload = data[pos + 12:pos + 12 + n]
    if struct.unpack('<I', data[pos + 12 + n:pos + 16 + n])[0] != masked_crc32c(payload):
      raise ValueError(f'{path}: bad data checksum at byte {pos}')
    out.append(payload)
    pos += 16 + n
  return out
