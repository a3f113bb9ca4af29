"""A checkpoint that cannot be read gives one line naming the folder and what failed, never a traceback: a truncated
file, a missing item, another model's checkpoint, through ``evaluate --ckpt``, ``train --init-from`` and ``train
--resume``; ``--resume`` on an unreadable newest step names the last readable one. Also the asynchronous saves'
guarantees (one save in flight, restore and close wait).

The checkpoints are real ones of a tiny MS-SL run: ``train(max_steps=0)`` writes ``latest/0`` through the training
loop (no step compiled), and the library's own save copies that state as step 1 into ``latest`` and ``best``, so the
run has ``latest/{0,1}`` and ``best/1``. Each test corrupts a copy of it.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxprvr.checkpoint import Checkpoints, abstract_tree
from jaxprvr.errors import JaxprvrError
from tests.conftest import TINY_OVERRIDES, TINY_VISUAL, tiny_config

RUN_SETS = [f"--set={o}" for o in TINY_OVERRIDES]
DATA_SETS = [f"--set={o}" for o in TINY_OVERRIDES if o.startswith("data.")]


def _abstract(cfg):
    from jaxprvr.models import build_model
    from jaxprvr.train import init_params, make_optimizer

    params = jax.eval_shape(lambda: init_params(build_model(cfg.model), cfg, jax.random.PRNGKey(0)))
    opt = jax.eval_shape(lambda p: make_optimizer(cfg, p, 10).init(p), params)
    return abstract_tree(params), abstract_tree(opt)


@pytest.fixture(scope="module")
def tiny_run(tiny_root, tmp_path_factory):
    from jaxprvr.train import train

    run = tmp_path_factory.mktemp("ckpt_errors") / "run"
    cfg = tiny_config("ms_sl")
    train(cfg, tiny_root, run, progress=False, run_test=False, max_steps=0)
    a_params, a_opt = _abstract(tiny_config("ms_sl", extra=[f"model.visual_feat_dim={TINY_VISUAL}"]))
    ck = Checkpoints(run / "ckpt", keep={"latest": 2})
    params, opt, meta = ck.restore("latest", a_params, a_opt)
    assert meta["global_step"] == 0 and meta["config"]["model"]["name"] == "ms_sl"
    meta = dict(meta, global_step=1)
    ck.save("best", 1, params, opt, meta)
    ck.save("latest", 1, params, opt, meta)
    ck.close()
    assert sorted(p.name for p in (run / "ckpt" / "latest").iterdir()) == ["0", "1"]
    assert sorted(p.name for p in (run / "ckpt" / "best").iterdir()) == ["1"]
    return run


@pytest.fixture
def run(tiny_run, tmp_path):
    """A fresh copy of the tiny run, to corrupt."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def _truncate_data(item_dir):
    """Cuts every array data file of an orbax item to 50 bytes (what a full disk or a bad copy leaves)."""
    files = [f for f in item_dir.rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(50)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[Gloo]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def _cli(module, args, tiny_root):
    r = subprocess.run([sys.executable, "-m", module, "--config", "tvr", "--data-root", str(tiny_root),
                        "--no-progress", *args], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def _main(module, args, tiny_root, capfd, config="tvr"):
    """The CLI's main() in this process: its exit status and its stderr (file descriptor 2, C++ output included)."""
    import importlib

    capfd.readouterr()
    code = importlib.import_module(module).main(["--config", config, "--data-root", str(tiny_root), "--no-progress",
                                                 *args])
    return code, capfd.readouterr().err


def test_truncated_files_give_one_line(run, tiny_root, capfd):
    """Truncated array files in best/1 and latest/1: evaluate and --init-from name best/1/params and the failed
    read; --resume names latest/1 and the last readable step, latest/0, which then restores (the hint holds)."""
    _truncate_data(run / "ckpt" / "best" / "1" / "params")
    _truncate_data(run / "ckpt" / "latest" / "1" / "params")
    # evaluate: a real process, so that what orbax's abandoned reads print at exit would show
    code, out, err = _cli("jaxprvr.evaluate", ["--ckpt", str(run), *DATA_SETS], tiny_root)
    line = _one_error_line(err)
    assert code == 2 and out == ""
    assert line.startswith(f"error: {run}/ckpt/best/1/params: expected parameters matching the model config, found "
                           "ValueError: OUT_OF_RANGE: "), line
    code, err = _main("jaxprvr.train", ["--model", "ms_sl", "--out", str(run.parent / "new"), "--init-from", str(run),
                                        "--max-steps", "0", *RUN_SETS], tiny_root, capfd)
    assert code == 2 and _one_error_line(err).startswith(f"error: {run}/ckpt/best/1/params: expected parameters")

    code, out, err = _cli("jaxprvr.train", ["--model", "ms_sl", "--out", str(run), "--resume", *RUN_SETS], tiny_root)
    line = _one_error_line(err)
    assert code == 2 and out == ""
    assert line.startswith(f"error: {run}/ckpt/latest/1: expected a readable checkpoint (params, opt_state, meta), "
                           "found ValueError: OUT_OF_RANGE"), line
    assert line.endswith(f"(the last readable step is latest/0: move {run}/ckpt/latest/1 out of {run}/ckpt/latest "
                         "to go back to it)"), line
    # The hint holds: with latest/1 moved away, latest/0 restores (the state train(max_steps=0) saved).
    shutil.move(run / "ckpt" / "latest" / "1", run / "latest-1")
    a_params, a_opt = _abstract(tiny_config("ms_sl", extra=[f"model.visual_feat_dim={TINY_VISUAL}"]))
    ck = Checkpoints(run / "ckpt")
    params, _, meta = ck.restore("latest", a_params, a_opt)
    ck.close()
    assert meta["global_step"] == 0
    from jaxprvr.checkpoint import load_params

    same, _ = load_params(run / "ckpt" / "latest" / "0", a_params)  # another reader of the same step
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same)):
        np.testing.assert_array_equal(a, b)


def test_missing_items(run, tiny_root, capfd):
    """A deleted item folder: --resume names it and the step before; with every latest step unreadable it says there
    is none and names the best slot; evaluate on a best step without params/ says so (it never falls back, silently,
    to latest)."""
    shutil.rmtree(run / "ckpt" / "latest" / "1" / "opt_state")
    args = ["--model", "ms_sl", "--out", str(run), "--resume", *RUN_SETS]
    code, err = _main("jaxprvr.train", args, tiny_root, capfd)
    assert code == 2
    assert _one_error_line(err) == (
        f"error: {run}/ckpt/latest/1: expected a readable checkpoint (params, opt_state, meta), found no opt_state/ "
        f"item (the last readable step is latest/0: move {run}/ckpt/latest/1 out of {run}/ckpt/latest to go back "
        "to it)")
    (run / "ckpt" / "latest" / "0" / "meta" / "metadata").write_text('{"config": ')  # latest/0 unreadable too
    code, err = _main("jaxprvr.train", args, tiny_root, capfd)
    assert code == 2
    assert _one_error_line(err) == (
        f"error: {run}/ckpt/latest/1: expected a readable checkpoint (params, opt_state, meta), found no opt_state/ "
        "item (no earlier readable step in latest; the run also has best/1)")

    shutil.rmtree(run / "ckpt" / "best" / "1" / "params")
    code, err = _main("jaxprvr.evaluate", ["--ckpt", str(run), *DATA_SETS], tiny_root, capfd)
    assert code == 2
    assert _one_error_line(err) == (f"error: {run}/ckpt/best/1: expected a params/ item in the newest checkpoint, "
                                    "found none (the step folder is incomplete)")


def test_truncated_meta(run, tiny_root, capfd):
    meta = run / "ckpt" / "best" / "1" / "meta" / "metadata"
    text = meta.read_text()
    assert json.loads(text)["global_step"] == 1
    meta.write_text(text[:40])
    code, err = _main("jaxprvr.evaluate", ["--ckpt", str(run), *DATA_SETS], tiny_root, capfd)
    assert code == 2
    assert _one_error_line(err).startswith(f"error: {meta}: expected the checkpoint's JSON meta (config, epoch, ...), "
                                           "found JSONDecodeError: ")
    # --resume on a truncated latest meta: the model check leaves it to the restore, which names the step before
    latest = run / "ckpt" / "latest" / "1" / "meta" / "metadata"
    latest.write_text(latest.read_text()[:40])
    code, err = _main("jaxprvr.train", ["--model", "ms_sl", "--out", str(run), "--resume", *RUN_SETS], tiny_root, capfd)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith(f"error: {run}/ckpt/latest/1: expected a readable checkpoint (params, opt_state, meta), "
                           "found "), line
    assert line.endswith(f"(the last readable step is latest/0: move {run}/ckpt/latest/1 out of {run}/ckpt/latest "
                         "to go back to it)"), line


def test_another_models_checkpoint(run, tiny_root, capfd):
    """An MS-SL checkpoint read as MESM or GMMFormer: by evaluate, --init-from and --resume, one line that names both
    models; without its meta (nothing says which model wrote it), the parameter tree that does not match."""
    code, err = _main("jaxprvr.evaluate", ["--model", "mesm", "--ckpt", str(run)], tiny_root, capfd,
                      config="charades")
    assert code == 2
    assert _one_error_line(err) == f"error: {run}: expected a checkpoint of --model mesm, found one of ms_sl"
    code, err = _main("jaxprvr.train", ["--model", "gmmformer", "--out", str(run.parent / "new"), "--init-from",
                                        str(run), "--max-steps", "0", *RUN_SETS], tiny_root, capfd)
    assert code == 2
    assert _one_error_line(err) == (f"error: {run}: expected a checkpoint of model gmmformer, found one of ms_sl "
                                    "(pass the matching --model)")
    code, err = _main("jaxprvr.train", ["--model", "gmmformer", "--out", str(run), "--resume", *RUN_SETS],
                      tiny_root, capfd)
    assert code == 2
    assert _one_error_line(err) == (f"error: {run}/ckpt/latest/1: expected a checkpoint of model gmmformer to "
                                    "--resume, found one of ms_sl (pass --model ms_sl to continue that run, or --out "
                                    "for a new run)")
    # parity.convert / parity.check read a step folder through parity.base.checkpoint_config: the same check
    from parity.base import checkpoint_config

    with pytest.raises(JaxprvrError) as e:
        checkpoint_config(run / "ckpt" / "best" / "1", tiny_config("gmmformer"), [])
    assert str(e.value) == f"{run}/ckpt/best/1: expected a checkpoint of --model gmmformer, found one of ms_sl"
    assert checkpoint_config(run / "ckpt" / "best" / "1", tiny_config("ms_sl"), []).model.name == "ms_sl"
    shutil.rmtree(run / "ckpt" / "best" / "1" / "meta")
    code, err = _main("jaxprvr.evaluate", ["--model", "gmmformer", "--ckpt", str(run), *RUN_SETS], tiny_root, capfd)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith(f"error: {run}/ckpt/best/1/params: expected parameters matching the model config, found "
                           "ValueError: "), line
    assert "Structure mismatch" in line or "not found" in line, line


def test_async_saves(tmp_path):
    """save returns before the write is finalised; one save is in flight at a time (a save first waits for the
    other slot's), so best/<s> is finalised before latest/<s> starts; restore and close wait."""
    ck = Checkpoints(tmp_path / "ckpt", keep={"latest": 2})
    rng = np.random.default_rng(0)
    big = {"w": rng.normal(size=(1500, 1500)).astype(np.float32)}  # 9 MB: its write outlasts the save call
    ck.save("best", 5, big, None, {"s": 5})
    assert ck.latest_step("best") == 5  # counted while being written (train's "already saved" check)
    ck.save("latest", 5, big, None, {"s": 5})
    assert (tmp_path / "ckpt" / "best" / "5").is_dir()  # finalised before latest/5 started
    ck.save("latest", 6, {"w": big["w"] + 1}, None, {"s": 6})
    params, _, meta = ck.restore("latest", abstract_tree(big))  # waits for latest/6
    assert meta == {"s": 6}
    np.testing.assert_array_equal(params["w"], big["w"] + 1)
    ck.save("latest", 7, {"w": big["w"] + 2}, None, {"s": 7})
    ck.close()  # waits: step 7 is on disk, and latest keeps two steps
    assert sorted(int(p.name) for p in (tmp_path / "ckpt" / "latest").iterdir() if p.name.isdigit()) == [6, 7]
    assert not [p for p in (tmp_path / "ckpt").rglob("*") if "tmp" in p.name]


def test_abandoned_read_reports_are_dropped_only_from_orbax_and_tensorstore(monkeypatch, caplog):
    """The filters of a failed read (checkpoint._quiet_abandoned_reads) drop "Event loop is closed" raised by a
    callback tensorstore scheduled (what a truncated checkpoint gives, test_truncated_files_give_one_line) and
    "Task exception was never retrieved" of an orbax task; the same reports from any other code still come through."""
    import asyncio
    import gc
    import logging
    import types

    import tensorstore as ts

    from jaxprvr import checkpoint as C

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    C._quiet_abandoned_reads()
    assert sys.unraisablehook is not seen.append

    def closed_loop_error(*args):
        loop = asyncio.new_event_loop()
        loop.close()
        try:
            loop.call_soon_threadsafe(print, *args)
        except RuntimeError as e:
            return types.SimpleNamespace(exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__,
                                         err_msg=None, object=None)
        raise AssertionError("a closed loop took a callback")

    _, ts_future = ts.Promise.new()
    ours = closed_loop_error(ts_future)
    theirs = closed_loop_error("a plain argument")
    assert str(ours.exc_value) == str(theirs.exc_value) == "Event loop is closed"
    sys.unraisablehook(ours)
    sys.unraisablehook(theirs)
    assert seen == [theirs]

    async def boom():
        raise ValueError("not orbax's")

    caplog.set_level(logging.ERROR, logger="asyncio")
    loop = asyncio.new_event_loop()
    task = loop.create_task(boom())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()  # the task's exception was never retrieved: asyncio logs it
    got = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(got) == 1 and "Task exception was never retrieved" in got[0] and "boom()" in got[0], got
    # an abandoned tensorstore read that orbax awaited through asyncio.gather (a task of asyncio's _wrap_awaitable:
    # neither its coroutine nor its frames are orbax's; the tensorstore future it awaited is in its frame)
    promise, ts_future = ts.Promise.new()
    loop = asyncio.new_event_loop()
    task = asyncio.ensure_future(ts_future, loop=loop)
    promise.set_exception(ValueError("OUT_OF_RANGE: a truncated file"))
    loop.run_until_complete(asyncio.sleep(0.05))
    loop.close()
    assert task.done() and "_wrap_awaitable" in repr(task)
    del task
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == got
    orbax_task = ("Task exception was never retrieved\nfuture: <Task finished name='Task-7' coro=<_read() done, "
                  f"defined at {os.sep}venv{os.sep}site-packages{os.sep}orbax{os.sep}checkpoint{os.sep}x.py:12> "
                  "exception=ValueError('OUT_OF_RANGE')>")
    assert not C._abandoned_task_record(logging.LogRecord("asyncio", logging.ERROR, "", 0, orbax_task, None, None))
    assert C._abandoned_task_record(logging.LogRecord("asyncio", logging.ERROR, "", 0, got[0], None, None))
    assert logging.getLogger("asyncio").filters.count(C._abandoned_task_record) == 1
    C._quiet_abandoned_reads()  # installed once
    assert logging.getLogger("asyncio").filters.count(C._abandoned_task_record) == 1


def test_a_checkpoint_of_other_sizes_is_refused_not_loaded(tiny_run):
    """Orbax restores the saved arrays whatever the target's shapes; the library compares them with the configured
    model's: another width gives one error naming the first array and both shapes (load_params, restore for
    --resume), never the checkpoint's arrays under the wrong config. The same sizes load (the check's control)."""
    from jaxprvr.checkpoint import load_params

    a_params, a_opt = _abstract(tiny_config("ms_sl", extra=[f"model.visual_feat_dim={TINY_VISUAL}"]))
    params, _ = load_params(tiny_run / "ckpt" / "latest", a_params)
    assert all(np.shape(x) == y.shape for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(a_params)))
    w_params, w_opt = _abstract(tiny_config("ms_sl", extra=[f"model.visual_feat_dim={TINY_VISUAL}",
                                                            "model.hidden_size=16"]))
    with pytest.raises(JaxprvrError, match=r"parameters matching the model config: .* of shape \(.*16.*\), found "
                                           r"shape \(.*32.*\)") as e:
        load_params(tiny_run / "ckpt" / "latest", w_params)
    assert "params" in e.value.where and "--set" in str(e.value)
    ck = Checkpoints(tiny_run / "ckpt", keep={"latest": 2})
    try:
        with pytest.raises(JaxprvrError, match="of shape") as e:
            ck.restore("latest", w_params, w_opt)
        assert "last readable" not in str(e.value)  # read whole: not reported as a damaged step
    finally:
        ck.close()
