"""A training run's terminal shows only jaxprvr's lines (third-party logging and warnings go to ``<out>/log.txt``,
jaxprvr.logs), ``--tensorboard`` mirrors metrics.jsonl, and an unwritable or full ``--out`` fails at once, in one
line, before anything is built or compiled."""

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import jaxprvr.train as T
from jaxprvr.logs import third_party_output_to
from tests.conftest import TINY_OVERRIDES, TINY_QUERY, TINY_VISUAL

REPO = Path(__file__).resolve().parents[1]

# The CLI in a child process with four planted third-party messages, emitted once training is about to start.
CHILD = """
import logging, sys, warnings
from absl import logging as absl_logging
import jaxprvr.train as T
_train = T.train
def planted(*a, **k):
    warnings.warn("PLANTED-python-warning")
    absl_logging.warning("PLANTED-absl-warning")
    logging.getLogger("orbax.checkpoint.checkpoint_manager").warning("PLANTED-orbax-warning")
    logging.getLogger("jax._src.xla_bridge").warning("PLANTED-jax-warning")
    return _train(*a, **k)
T.train = planted
sys.exit(T.main(sys.argv[1:]))
"""
PLANTED = {"py.warnings": "PLANTED-python-warning", "absl": "PLANTED-absl-warning",
           "orbax.checkpoint.checkpoint_manager": "PLANTED-orbax-warning", "jax._src.xla_bridge": "PLANTED-jax-warning"}

# What jaxprvr itself writes to stderr during a run: tqdm bars and the per-epoch / test lines.
OWN_LINE = re.compile(r"^(epoch \d+ val .*|test .*|(epoch \d+|gallery|queries|scoring|videos|texts)\b.*\|.*)$")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from jaxprvr.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("terminal_data")
    write_synthetic(root, "tvr", n_train=32, n_val=24, n_test=24, seed=0, visual_dim=TINY_VISUAL, query_dim=TINY_QUERY)
    return root


def test_a_run_shows_only_its_own_lines_and_mirrors_its_metrics_to_tensorboard(tiny_data, tmp_path):
    """One tiny MS-SL run through the CLI (one test: the run is the cost): its stderr holds only progress bars and
    jaxprvr's lines, the planted absl / orbax / jax / warnings messages are in <out>/log.txt under their logger
    names, and every number of metrics.jsonl is in <out>/tensorboard at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", CHILD, "--config", "tvr", "--model", "ms_sl", "--data-root",
                        str(tiny_data), "--out", str(out), "--tensorboard",
                        *[f"--set={o}" for o in TINY_OVERRIDES], "--set=train.n_epoch=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = [x.strip() for x in re.split(r"[\r\n]", r.stderr) if x.strip()]
    strangers = [x for x in lines if not OWN_LINE.match(x)]
    assert not strangers, strangers
    assert any(x.startswith("epoch 0 val ") for x in lines) and lines[-1].startswith("test SumR")
    assert "PLANTED" not in r.stderr + r.stdout and json.loads(r.stdout)["epochs_done"] == 1
    log = (out / "log.txt").read_text()
    for name, msg in PLANTED.items():
        assert re.search(rf"WARNING {re.escape(name)}: .*{msg}", log), (name, log)

    # TensorBoard: every number of every metrics.jsonl record, at the record's step (an evaluation: the last step)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    got = {(tag, s.step): s.value for tag in acc.Tags()["scalars"] for s in acc.Scalars(tag)}
    expected, step = {}, 0
    for rec in recs:
        step = rec.get("step", step)
        prefix = rec.get("split", "train") + (f"/{rec['eval_split']}" if "eval_split" in rec else "")
        for k, v in rec.items():
            if k != "step" and type(v) in (int, float):
                expected[(f"{prefix}/{k}", step)] = np.float32(v)
    assert {"train/loss", "val/sumr", "test/sumr"} <= {t for t, _ in expected}
    assert all(np.isfinite(v) for v in expected.values()), expected  # (== below: a NaN would never match)
    assert got == expected
    # a few entries read off metrics.jsonl by hand (not through the tag rule above): the last train step's loss at
    # its step; the validation's SumR and the test's at that step (the run's last: evaluations have no step)
    train = [r for r in recs if "split" not in r]
    (val,) = [r for r in recs if r.get("split") == "val"]
    (test,) = [r for r in recs if r.get("split") == "test"]
    last = train[-1]["step"]
    assert got[("train/loss", last)] == np.float32(train[-1]["loss"])
    assert got[("train/lr", last)] == np.float32(train[-1]["lr"])
    assert got[("val/sumr", last)] == np.float32(val["sumr"]) and got[("val/r1", last)] == np.float32(val["r1"])
    assert got[("test/sumr", last)] == np.float32(test["sumr"])
    assert ("val/improved", last) not in got and not any(t.startswith(("train/step", "test/split")) for t, _ in got)


def test_third_party_output_goes_to_the_file_inside_the_block_only(tmp_path, capsys):
    """In-process: a terminal handler on the root logger, absl and warnings: inside the block the file gets them and
    stderr nothing; after it (the mutant: no routing) they reach stderr again. jaxprvr's own loggers (a bad video,
    NaN queries dropped) keep the terminal inside the block."""
    from absl import logging as absl_logging

    term = logging.StreamHandler(sys.stderr)  # the test's stderr (capsys)
    root = logging.getLogger()
    root.addHandler(term)
    own = logging.getLogger("jaxprvr.data.video")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with third_party_output_to(tmp_path / "log.txt", header="hdr") as path:
                absl_logging.warning("inside-absl")
                logging.getLogger("orbax").warning("inside-orbax")
                warnings.warn("inside-warning")
                own.warning("bad video, using zeros: inside-own")
                assert term not in root.handlers
            assert capsys.readouterr().err == "bad video, using zeros: inside-own\n"
            assert term in root.handlers and term not in logging.getLogger("jaxprvr").handlers
            absl_logging.warning("outside-absl")
            with pytest.warns(UserWarning, match="outside-warning"):  # the plain warnings path again
                warnings.warn("outside-warning")
    finally:
        root.removeHandler(term)
    text = path.read_text()
    assert text.splitlines()[0].endswith(" hdr")
    assert "WARNING absl: inside-absl" in text and "WARNING orbax: inside-orbax" in text
    assert re.search(r"WARNING py\.warnings: .*UserWarning: inside-warning", text)
    assert "WARNING jaxprvr.data.video: bad video, using zeros: inside-own" in text  # the file has it too
    assert "outside-absl" in capsys.readouterr().err and "outside" not in path.read_text()


def test_own_warnings_reach_the_terminal_when_the_root_has_no_handler(tmp_path, capsys):
    """The usual CLI case (no handler on the root logger: Python's last resort prints a warning to stderr): a
    jaxprvr logger's warning inside the block still reaches stderr once, as before the block; a third-party one
    does not."""
    root = logging.getLogger()
    saved = root.handlers[:]
    for h in saved:  # (pytest's own capture handlers)
        root.removeHandler(h)
    try:
        with third_party_output_to(tmp_path / "log.txt") as path:
            logging.getLogger("jaxprvr.metrics.t2v").warning("grouped t2v: 2 of 9 captions have a NaN positive score")
            logging.getLogger("jaxprvr.metrics.t2v").info("an info line stays below the level")
            logging.getLogger("orbax.checkpoint").warning("orbax-inside")
        assert capsys.readouterr().err == "grouped t2v: 2 of 9 captions have a NaN positive score\n"
        logging.getLogger("jaxprvr.metrics.t2v").warning("after")  # the last resort alone again: printed once
        assert capsys.readouterr().err == "after\n"
        assert logging.getLogger("jaxprvr").handlers == []
    finally:
        for h in saved:
            root.addHandler(h)
    text = path.read_text()
    assert "WARNING jaxprvr.metrics.t2v: grouped t2v: 2 of 9" in text and "WARNING orbax.checkpoint: orbax-inside" in text
    assert "info line" not in text


def test_log_file_names_per_process(tmp_path):
    """log.txt for one process and process 0, log.<i>.txt for process i > 0 (docs/usage.md); evaluate's the same with
    the evaluate.log stem, beside --save-outputs."""
    from jaxprvr import evaluate
    from jaxprvr.logs import log_file

    assert [log_file(tmp_path, "log", i) for i in (None, 0, 1, 12)] == \
        [tmp_path / "log.txt", tmp_path / "log.txt", tmp_path / "log.1.txt", tmp_path / "log.12.txt"]
    base = ["--config", "tvr", "--demo", "--ckpt", str(tmp_path / "ckpt"), "--save-outputs", str(tmp_path / "eval")]
    for flags, name in [([], "evaluate.log.txt"), (["--process-id", "0"], "evaluate.log.txt"),
                        (["--process-id", "3"], "evaluate.log.3.txt")]:
        assert evaluate._log_path(evaluate.build_parser().parse_args(base + flags)) == tmp_path / "eval" / name


# ---------------------------------------------------------------------------------------------- --out checks

@pytest.fixture
def no_run(monkeypatch):
    """Training must not start: building the run (data, model, compile) fails the test."""
    def _boom(*a, **k):
        raise AssertionError("the run was built: the --out check came too late")

    monkeypatch.setattr(T, "_Run", _boom)


def _cli_error(capsys, out, extra=()) -> str:
    code = T.main(["--config", "tvr", "--model", "ms_sl", "--data-root", "/nonexistent-data", "--out", str(out),
                   "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: expected a writable folder with at least ") \
        and "Traceback" not in err, err
    return lines[0]


def test_an_out_under_a_file_fails_in_one_line(tmp_path, capsys, no_run):
    (tmp_path / "file").write_text("x")
    line = _cli_error(capsys, tmp_path / "file" / "run")
    assert line.endswith(f"at least 100 MB free, found a path under the file {tmp_path / 'file'} (pass --out DIR)")


def test_a_read_only_out_fails_in_one_line(tmp_path, capsys, no_run, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes into a 0o555 folder: os.access says yes, so make it say no
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == ro else real_access(p, m, **k))
        line = _cli_error(capsys, ro / "run")  # a folder to create inside: the nearest existing one is checked
        assert line.endswith(f"found a folder without write permission ({ro}) (pass --out DIR)")
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_a_failing_probe_write_fails_in_one_line(tmp_path, capsys, no_run, monkeypatch):
    """A folder that os.access accepts but that refuses a write (e.g. a read-only mount, as root)."""
    def refuse(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(T, "open", refuse, raising=False)
    (tmp_path / "run").mkdir()
    line = _cli_error(capsys, tmp_path / "run")
    assert line.endswith("found a folder where a write fails: Read-only file system (pass --out DIR)")
    assert list((tmp_path / "run").iterdir()) == []  # no probe left behind


def test_a_full_disk_fails_in_one_line(tmp_path, capsys, no_run, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=50 * 2**20))
    line = _cli_error(capsys, tmp_path / "run")
    assert line.endswith(f"at least 100 MB free, found 50 MB free ({tmp_path}) (free some space or pass --out DIR)")
    assert not (tmp_path / "run").exists()  # the check creates nothing
    # mutant: with 100 MB free the check passes and the run is built (no_run raises)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100 * 2**20))
    with pytest.raises(AssertionError, match="the run was built"):
        T.main(["--config", "tvr", "--model", "ms_sl", "--data-root", "/nonexistent-data", "--out",
                str(tmp_path / "run"), "--no-progress"])


def test_room_for_the_checkpoints_is_checked_before_the_first_save(tiny_data, tmp_path, monkeypatch):
    """Once the state exists, the run wants room for the steps it keeps (latest's two + best) and the one being
    written (orbax deletes the old step after the new one is finalised) before writing; on --resume, less the bytes
    its step folders already hold."""
    from jaxprvr.errors import JaxprvrError
    from tests.conftest import tiny_config

    real = shutil.disk_usage
    monkeypatch.setattr(T, "MIN_FREE_BYTES", 0)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(JaxprvrError, match=r"expected a writable folder with at least \d+\.\d MB free \(4 "
                                           r"checkpoints of \d+\.\d MB: 3 kept, 1 being written\), found 0\.0 MB "
                                           r"free") as e:
        T.train(tiny_config("ms_sl"), tiny_data, tmp_path / "run", progress=False)
    assert str(tmp_path / "run") in str(e.value)
    assert not (tmp_path / "run" / "ckpt" / "latest").exists() or not any((tmp_path / "run" / "ckpt" / "latest").iterdir())

    # What is asked for, fresh and on --resume (latest/0 on disk, written by train(max_steps=0): nothing compiles)
    monkeypatch.setattr(shutil, "disk_usage", real)
    asked = []
    real_check = T.check_out_dir
    monkeypatch.setattr(T, "check_out_dir", lambda out, need=0, why="": (asked.append((need, why)),
                                                                        real_check(out, need, why))[1])
    run = tmp_path / "run2"
    T.train(tiny_config("ms_sl"), tiny_data, run, progress=False, max_steps=0)
    state_bytes = asked[-1][0] // 4
    assert asked[-1][0] == 4 * state_bytes > 0 and "already saved" not in asked[-1][1]
    on_disk = sum(f.stat().st_size for f in (run / "ckpt" / "latest" / "0").rglob("*") if f.is_file())
    assert [p.name for p in (run / "ckpt").rglob("*") if p.parent.parent == run / "ckpt"] == ["0"]
    assert 0 < on_disk < 4 * state_bytes  # one saved state (orbax compresses: less than its bytes in memory)
    T.train(tiny_config("ms_sl"), tiny_data, run, progress=False, max_steps=0, resume=True)
    need, why = asked[-1]
    assert need == 4 * state_bytes - on_disk, (need, state_bytes, on_disk)
    assert why.endswith(f"3 kept, 1 being written; less {T._mb(on_disk)} already saved")
