"""A minimal TensorBoard scalar writer (no TensorFlow, no tensorboardX).

Neither TensorFlow nor tensorboardX is a dependency of big_attn, and flax's writer needs
TensorFlow, so scalars are written directly in TensorBoard's on-disk format: a TFRecord file
`events.out.tfevents.<time>.<host>` of `Event` protocol buffers. Each record is

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

and the two messages used are encoded by hand (protobuf wire format):

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None,
                 session_start: bool = False) -> bytes:
  """The wire bytes of one `Event` message (`session_start`: a `SessionLog` of status START)."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if session_start:
    out += _length_delimited(7, _varint(1 << 3) + _varint(1))
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode())
                          + _varint(2 << 3 | 5) + struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    out += _length_delimited(5, values)
  return out


class SummaryWriter:
  """Appends scalar summaries to an event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")  # pylint: disable=consider-using-with
    self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data
                     + struct.pack("<I", masked_crc32c(data)))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._write(encode_event(time.time(), step, scalars=values))
    self._file.flush()

  def session_start(self, step: int) -> None:
    """Marks a restart at `step`: TensorBoard discards the events of steps >= `step` that
    earlier files hold."""
    self._write(encode_event(time.time(), step, session_start=True))
    self._file.flush()

  def close(self) -> None:
    self._file.close()
