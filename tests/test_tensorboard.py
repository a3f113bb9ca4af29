"""jaxprvr.tensorboard (event files written by hand) read back by the ``tensorboard`` package's own readers: its
record reader (with its CRC checks), its ``EventFileLoader`` and the ``EventAccumulator`` TensorBoard's UI uses.
The end-to-end check (a training run's metrics.jsonl against its event file) is in tests/test_terminal.py."""

import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader, LegacyEventFileLoader
from tensorboard.compat.tensorflow_stub import errors as tb_errors
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_stub
from tensorboard.util import tensor_util

from jaxprvr import tensorboard as jtb
from jaxprvr.train import MetricWriter


def test_crc32c_known_answers_and_tensorboards_own():
    assert jtb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert jtb.crc32c(b"") == 0
    assert jtb.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 300):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert jtb.crc32c(data) == tb_stub.crc32c(data)
        assert jtb.masked_crc32c(data) == tb_stub.masked_crc32c(data)


def _records(path) -> list[bytes]:
    """Every record of the file through tensorboard's record reader (it checks both CRCs of each record)."""
    reader, out = tb_stub.PyRecordReader_New(str(path)), []
    while True:
        try:
            reader.GetNext()
        except tb_errors.OutOfRangeError:
            return out
        out.append(reader.record())


def _written(tmp_path):
    w = jtb.SummaryWriter(tmp_path / "tb")
    w.scalars(10, {"train/loss": 0.25, "train/lr": 3e-4}, wall_time=100.5)
    w.scalars(20, {"train/loss": 0.125, "val/sumr": 372.67}, wall_time=101.0)
    w.scalars(2**40, {"big/x": 1e40, "neg/x": -1.5}, wall_time=102.0)  # int64 step; past float32: inf
    w.close()
    return w.path


def test_events_read_back_by_tensorboard(tmp_path):
    path = _written(tmp_path)
    assert path.name.startswith("events.out.tfevents.")
    assert len(_records(path)) == 4
    events = list(LegacyEventFileLoader(str(path)).Load())
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, e.wall_time, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
    assert got == [(10, 100.5, {"train/loss": 0.25, "train/lr": np.float32(3e-4)}),
                   (20, 101.0, {"train/loss": 0.125, "val/sumr": np.float32(372.67)}),
                   (2**40, 102.0, {"big/x": np.inf, "neg/x": -1.5})]
    # the loader TensorBoard itself uses turns simple values into scalar tensors
    migrated = [e for e in EventFileLoader(str(path)).Load() if e.summary.value]
    assert tensor_util.make_ndarray(migrated[1].summary.value[1].tensor) == np.float32(372.67)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["big/x", "neg/x", "train/loss", "train/lr", "val/sumr"]
    assert [(s.step, s.value) for s in acc.Scalars("train/loss")] == [(10, 0.25), (20, 0.125)]


@pytest.mark.parametrize("where", ["length", "data"])
def test_a_corrupted_byte_fails_the_crc(tmp_path, where):
    path = _written(tmp_path)
    raw = bytearray(path.read_bytes())
    first = 8 + 4 + int.from_bytes(raw[:8], "little") + 4  # the second record starts here
    raw[first + (2 if where == "length" else 8 + 4 + 5)] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(tb_errors.DataLossError, match="header crc" if where == "length" else "event crc"):
        _records(path)
    # TensorBoard's loader stops at the bad record: only the file_version event comes through
    assert len(list(LegacyEventFileLoader(str(path)).Load())) == 1


def test_varint_of_negative_and_large_steps(tmp_path):
    """Steps of the int64 range round-trip through protobuf's own decoder (two's complement varints)."""
    from tensorboard.compat.proto import event_pb2

    for step in (0, 1, 127, 128, 2**31, -1, -(2**63), 2**63 - 1):
        ev = event_pb2.Event.FromString(jtb.encode_event(1.0, step, scalars={"a": 1.0}))
        assert ev.step == step


def test_metric_writer_sends_every_number_of_metrics_jsonl(tmp_path):
    """The hook in jaxprvr.train: the records a run writes (a step, a validation with an eval_split, a test)
    reach the event file under ``<split>/<name>``; booleans, strings and lists stay out; an evaluation record is
    logged at the current step."""
    step = {"now": 30}
    w = MetricWriter(tmp_path / "metrics.jsonl", tmp_path / "tb", current_step=lambda: step["now"])
    recs = [{"step": 30, "epoch": 2, "lr": np.float32(1e-4), "loss": np.float32(0.5), "grad_norm": 1.25},
            {"epoch": 2, "split": "val", "eval_split": "novel_word", "improved": True, "sumr": 100.5, "r1": 3},
            {"split": "test", "checkpoint": "best", "sumr": 99.0, "per_branch": [1.0, 2.0]}]
    for r in recs:
        w.write(r)
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 30, "epoch": 2, "lr": np.float32(1e-4), "loss": 0.5, "grad_norm": 1.25}
    # written out by hand from the records above: (step, float32 value) per tag
    expected = {"train/epoch": (30, 2.0), "train/lr": (30, np.float32(1e-4)), "train/loss": (30, 0.5),
                "train/grad_norm": (30, 1.25),
                "val/novel_word/epoch": (30, 2.0), "val/novel_word/sumr": (30, 100.5), "val/novel_word/r1": (30, 3.0),
                "test/sumr": (30, 99.0)}
    (f,) = os.listdir(tmp_path / "tb")
    got = {v.tag: (e.step, v.simple_value) for e in LegacyEventFileLoader(str(tmp_path / "tb" / f)).Load()
           for v in e.summary.value}
    assert got == expected
