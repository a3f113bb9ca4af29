"""TensorBoard event files of scalars, written without TensorFlow, torch or protobuf.

``python -m jaxprvr.train ... --tensorboard [DIR]`` writes every number of ``metrics.jsonl`` here too
(:func:`scalars_of` says which, under which tag and step); ``tensorboard --logdir DIR`` shows them.

The file format (TensorFlow's ``TFRecord`` of ``Event`` protocol buffers, ``tensorflow/core/util/event.proto``):
each record is ``uint64 length`` (little-endian), ``uint32 masked_crc32c(length bytes)``, the data,
``uint32 masked_crc32c(data)``. The first record is an ``Event`` with ``file_version = "brain.Event:2"``; each
further one an ``Event`` with ``wall_time``, ``step`` and a ``Summary`` of ``Value(tag, simple_value)``. The
few protobuf fields are encoded by hand (:func:`encode_event`).
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------- CRC-32C

# CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, initial and final XOR 0xFFFFFFFF.
_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)
del _i, _c

_MASK_DELTA = 0xA282EAD8


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: the CRC rotated right by 15 bits plus a constant (so CRCs of CRCs stay useful)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ---------------------------------------------------------------------------------------------- protobuf

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative varints
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """An ``Event`` message: ``wall_time`` (1, double), ``step`` (2, int64), ``file_version`` (3, string) or
    ``summary`` (5, Summary: repeated ``value`` (1, Value: ``tag`` (1, string), ``simple_value`` (2, float)))."""
    msg = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
                           for tag, v in scalars.items())
        msg += _bytes_field(5, summary)
    return msg


# ---------------------------------------------------------------------------------------------- writer

def _float32(v: float) -> float:
    """``v`` as a float32 ``simple_value`` holds it (out of range: +-inf, as numpy casts)."""
    if math.isfinite(v) and abs(v) > 3.4028234663852886e38:
        return math.copysign(math.inf, v)
    return v


class SummaryWriter:
    """Appends scalar events to one new ``events.out.tfevents.<time>.<host>.<pid>`` file in ``logdir`` (a resumed
    run adds a file beside the earlier ones; TensorBoard reads them all as one run). Each event is flushed at once."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._write(encode_event(now, 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(tfrecord(event))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float], wall_time: float | None = None) -> None:
        if values:
            values = {k: _float32(float(v)) for k, v in values.items()}
            self._write(encode_event(time.time() if wall_time is None else wall_time, step, scalars=values))

    def close(self) -> None:
        self._file.close()


def scalars_of(record: dict) -> dict[str, float]:
    """The scalars of a ``metrics.jsonl`` record as ``{tag: value}``: its numbers (booleans, strings and lists are not
    scalars; ``step`` is the event's step, not a scalar). Tags are ``<prefix>/<name>``: ``train`` for a training
    step's record (no ``split``), else its ``split`` (``val``, ``test``), followed by its ``eval_split`` when it
    names one (``val/novel_word/r1``)."""
    prefix = record.get("split", "train")
    if record.get("eval_split"):
        prefix += f"/{record['eval_split']}"
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
