"""Multi-host training through jax.distributed: the train CLI in two CPU processes on localhost (one device
each, each building only its slice of every batch), one of them killed mid-epoch and both resumed, gives the same
losses, parameters, validation and test metrics as one process with two devices over the whole batch in the same
layout; the evaluate CLI in two processes gives the one-process metrics and artefacts. Also: the sliced batch
layout against the plain one, and the checks of the multi-host flags."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxprvr.errors import JaxprvrError

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
TIMEOUT_S = 420  # per run; the processes are killed past it (about 1-2 min on 2 idle cores)
SURVIVOR_S = 90  # a process whose peer was killed must end by then (measured: < 1 s)
HEARTBEAT_S = 30  # --heartbeat-timeout of the runs: the survivor's bound when no collective of it fails first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(n_devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if n_devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={n_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


_STARTED: list = []  # every worker process a test started; the ones still running are killed after the test


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(tmp_path, name, args, n_devices):
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=out, stderr=err,
                            env=_env(n_devices), cwd=REPO)
    out.close()
    err.close()
    _STARTED.append(proc)
    return name, proc


def _wait_all(tmp_path, procs) -> dict:
    """Waits for every process (killing all past TIMEOUT_S); fails with every process's stderr tail."""
    deadline = time.monotonic() + TIMEOUT_S
    codes = {}
    for name, proc in procs:
        try:
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            codes[name] = "timeout"
    for name, proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if any(c != 0 for c in codes.values()):
        report = [f"exit codes {codes}"]
        for name, _ in procs:
            err = (tmp_path / f"{name}.err").read_text()
            err = "\n".join(line for line in err.splitlines() if not line.startswith("[Gloo]"))
            report.append(f"----- {name} stderr (tail) -----\n{err[-4000:]}")
        pytest.fail("\n".join(report), pytrace=False)
    return {name: (tmp_path / f"{name}.out").read_text() for name, _ in procs}


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _restore_latest(run, cfg):
    """The parameters of ``run/ckpt/latest`` on this (one-device) process, and the initial parameters."""
    from jaxprvr.checkpoint import Checkpoints
    from jaxprvr.models import build_model
    from jaxprvr.train import init_params

    model = build_model(cfg.model)
    init = jax.jit(lambda k: init_params(model, cfg, k))(jax.random.PRNGKey(cfg.train.seed))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), init)
    ck = Checkpoints(run / "ckpt")
    params, _, meta = ck.restore("latest", abstract)
    ck.close()
    return jax.device_get(params), jax.device_get(init), meta


def _kill_after_first_checkpoint(tmp_path, procs, latest: Path, victim: int) -> int:
    """Waits for ``latest/<step >= 1>`` (the first mid-epoch checkpoint, finalised) and SIGKILLs process ``victim``;
    returns the other one's exit status, waiting at most SURVIVOR_S for it (a survivor that hangs fails the test)."""
    (_, p0), (_, p1) = procs[:2]
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and p0.poll() is None and p1.poll() is None:
        if latest.is_dir() and any(c.name.isdigit() and int(c.name) >= 1 for c in latest.iterdir()):
            break
        time.sleep(0.05)
    if p0.poll() is not None or p1.poll() is not None or time.monotonic() >= deadline:
        for _, proc in procs:
            proc.kill()
        _wait_all(tmp_path, procs)  # reports every process's stderr
        pytest.fail("no checkpoint to kill after, or a process ended before the kill", pytrace=False)
    (p0, p1)[victim].send_signal(signal.SIGKILL)
    (p0, p1)[victim].wait()
    survivor = (p0, p1)[1 - victim]
    try:
        return survivor.wait(timeout=SURVIVOR_S)
    except subprocess.TimeoutExpired:
        survivor.kill()
        survivor.wait()
        pytest.fail(f"the surviving process still ran {SURVIVOR_S} s after the other was killed", pytrace=False)


def test_two_processes_killed_and_resumed_match_one_process(tiny_root, tmp_path, capsys):
    """Two CPU processes train (one device each, each building only its slice of every batch), one checkpoint per
    step. Process 1 is killed (SIGKILL) as soon as the first mid-epoch checkpoint is finalised; process 0 stops at
    once by itself (its next collective fails: one error line, exit 75; or JAX's heartbeat abort), never hangs.
    Both restarted with ``--resume`` finish the run: its parameters equal, bit for bit, those of one process with
    two devices over the same global batches (the same 2-way partitioned program, whose all-reduce of 2 operands is
    a + b in either order; an uninterrupted two-process run gives these bits too), and so do its losses, validation
    and test metrics. Then the evaluate CLI in two processes gives the metrics and artefacts of one process."""
    from tests.conftest import TINY_VISUAL, tiny_config
    from tests.multihost_worker import MODEL, RUN_SETS, evaluate_args

    mp, ref = tmp_path / "two_processes", tmp_path / "one_process"
    extra = ["--set=train.ckpt_every_steps=1", "--heartbeat-timeout", str(HEARTBEAT_S)]
    port = _free_port()
    procs = [_start(tmp_path, f"process{i}", ["process", tiny_root, mp, port, 2, i, *extra], 1) for i in range(2)]
    reference = _start(tmp_path, "reference", ["reference", tiny_root, ref, 2], 2)
    code = _kill_after_first_checkpoint(tmp_path, procs + [reference], mp / "ckpt" / "latest", victim=1)
    err = [line for line in (tmp_path / "process0.err").read_text().splitlines() if not line.startswith("[Gloo]")]
    assert code in (75, -signal.SIGABRT), (code, err[-20:])
    if code == 75:  # the usual case: a collective failed (SIGABRT: JAX's heartbeat check came first)
        errors = [line for line in err if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith("error: process 0 of 2: expected every process of the run "
                                                         "to answer") and "--resume" in errors[0], err[-5:]
        assert not any("Traceback" in line for line in err), err
    killed_at = max(int(c.name) for c in (mp / "ckpt" / "latest").iterdir() if c.name.isdigit())
    assert 1 <= killed_at < 3, killed_at  # mid-epoch: the epoch has 3 steps
    cfg = tiny_config(MODEL, extra=RUN_SETS + [f"model.visual_feat_dim={TINY_VISUAL}"])
    p_killed, init, _ = _restore_latest(mp, cfg)

    port = _free_port()  # (a new coordinator: the old port may still be held by the dead one's sockets)
    procs = [_start(tmp_path, f"resumed{i}", ["process", tiny_root, mp, port, 2, i, "--resume", *extra], 1)
             for i in range(2)]
    outs = _wait_all(tmp_path, procs + [reference])

    # Both processes finished the same run and computed the same test metrics (gathered to every host).
    s0, s1 = (json.loads(outs[f"resumed{i}"].strip().splitlines()[-1]) for i in range(2))
    assert s0["steps"] == s1["steps"] == 3 and s0["epochs_done"] == 1
    assert s0["test"] == {**s1["test"], "seconds": s0["test"]["seconds"]}
    assert s0["best_val_sumr"] == s1["best_val_sumr"]

    # Process 0 alone wrote metrics.jsonl, before and after the kill: every step record (a step run again after the
    # resume is logged twice) equals the one-process run's, and so do the validation and the test.
    rec_mp, rec_ref = _records(mp), _records(ref)
    steps_ref = {r["step"]: r for r in rec_ref if "loss" in r}
    steps_mp = [r for r in rec_mp if "loss" in r]
    assert sorted(steps_ref) == [1, 2, 3] and {r["step"] for r in steps_mp} == {1, 2, 3}
    assert len(steps_mp) <= 3 + 2 and len(rec_ref) == 5
    for a in steps_mp:
        b = steps_ref[a["step"]]
        assert a["hard"] is True and a["videos_per_s"] > 0
        assert a.keys() == b.keys() and {"loss", "clip_nce", "frame_trip"} <= a.keys()
        for k in a.keys() - {"videos_per_s", "queries_per_s"}:  # the loss and each of its terms, lr, step
            assert a[k] == b[k], (k, a, b)
    val_ref = next(r for r in rec_ref if r.get("split") == "val")
    vals_mp = [r for r in rec_mp if r.get("split") == "val"]
    assert vals_mp and all(v["sumr"] == val_ref["sumr"] for v in vals_mp)
    test_ref = json.loads((ref / "test_results.json").read_text())
    test_mp = json.loads((mp / "test_results.json").read_text())
    for k in ("r1", "r5", "r10", "r100", "sumr", "medr", "meanr"):
        assert test_mp[k] == test_ref[k], k

    # The checkpoint the two processes wrote restores on one device, equal to the one-process run's to the bit.
    p_mp, _, meta = _restore_latest(mp, cfg)
    p_ref, _, _ = _restore_latest(ref, cfg)
    assert meta["global_step"] == 3
    # finite first: assert_array_equal takes NaNs at the same positions as equal
    assert all(np.isfinite(a).all() for a in jax.tree.leaves((p_mp, p_ref))), "a NaN or inf in the parameters"
    for a, b in zip(jax.tree.leaves(p_mp), jax.tree.leaves(p_ref)):
        np.testing.assert_array_equal(a, b)
    # the largest change over all leaves; np.max propagates a NaN (Python's max over floats would depend on order)
    moved = float(np.max([np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(p_mp), jax.tree.leaves(init))]))
    assert moved > 1e-3, moved  # the 3 steps really changed the parameters
    # mutant: the parameters at the kill (a resume that skipped the remaining steps) are not those bits
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p_killed), jax.tree.leaves(p_ref)))

    # The evaluate CLI in two processes: every process prints the one-process metrics, process 0 writes the
    # one-process artefacts (the scores to float32 rounding: each device scores its half of the gallery, in
    # programs of other shapes).
    from jaxprvr.evaluate import main as evaluate_main

    port = _free_port()
    two = tmp_path / "eval_two"
    procs = [_start(tmp_path, f"evaluate{i}", ["evaluate", tiny_root, mp, two, port, 2, i], 1) for i in range(2)]
    one = tmp_path / "eval_one"
    capsys.readouterr()
    assert evaluate_main(evaluate_args(tiny_root, mp, one)) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    outs = _wait_all(tmp_path, procs)
    for i in range(2):
        got = json.loads(outs[f"evaluate{i}"].strip().splitlines()[-1])
        assert {**got, "seconds": 0} == {**want, "seconds": 0}
    for name in ("query_ids.txt", "video_ids.txt"):
        assert (two / name).read_text() == (one / name).read_text()
    s_two, s_one = np.load(two / "scores.npy"), np.load(one / "scores.npy")
    np.testing.assert_allclose(s_two, s_one, rtol=1e-5, atol=1e-6)
    # mutant: the gallery halves of the two processes gathered in the wrong order
    swapped = np.concatenate([s_one[:, 60:], s_one[:, :60]], 1)
    assert not np.allclose(s_two, swapped, rtol=1e-5, atol=1e-6)


def test_sliced_batches_are_the_plain_batch_in_slices(tiny_root):
    """The slices of all processes, concatenated, hold exactly the plain batch's videos and queries (the same
    sorted video order), with query labels pointing at the right global rows; one slice = the plain batch."""
    from jaxprvr.data import PRVRDataset, train_batches
    from tests.conftest import tiny_config

    ds = PRVRDataset(tiny_root, tiny_config(), "train")
    bsz, cap = 56, ds.query_capacity(56, 8)
    plain = list(train_batches(ds, bsz, 1, 0, cap))
    one = list(train_batches(ds, bsz, 1, 0, cap, slice_size=bsz, slices=(0,)))
    for a, b in zip(plain, one):
        assert {k: v for k, v in b.items() if k not in ("n_videos", "n_queries")}.keys() == a.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    q_slice = ds.query_capacity(28, 8)
    parts = [list(train_batches(ds, bsz, 1, 0, q_slice, slice_size=28, slices=(s,))) for s in range(2)]
    both = list(train_batches(ds, bsz, 1, 0, q_slice, slice_size=28, slices=(0, 1)))
    assert len(both) == len(plain) == 3
    for a, p0, p1, g in zip(plain, *parts, both):
        for k in g:
            if k not in ("n_videos", "n_queries"):
                np.testing.assert_array_equal(g[k], np.concatenate([p0[k], p1[k]]))
        assert g["video_index"].shape == (56,) and g["query_index"].shape == (2 * q_slice,)
        np.testing.assert_array_equal(g["video_index"][g["video_valid"] > 0], a["video_index"][a["video_valid"] > 0])
        qv = g["query_valid"] > 0
        np.testing.assert_array_equal(g["query_index"][qv], a["query_index"][a["query_valid"] > 0])
        # every valid query's label is the global row of its video
        np.testing.assert_array_equal(g["video_index"][g["query_labels"][qv]],
                                      ds.query_video_index[g["query_index"][qv]])
        np.testing.assert_array_equal(g["query_valid"], g["query_index"] >= 0)
        assert g["n_videos"] == a["video_valid"].sum() and g["n_queries"] == a["query_valid"].sum()
        assert p0["n_videos"] == g["n_videos"]  # every process knows the global counts


def test_flag_checks():
    from jaxprvr.distributed import check_flags, parse_device_ids

    assert check_flags(None, None, None) is False
    assert check_flags(None, 1, 0) is False  # one process: nothing to initialize
    assert check_flags("localhost:1234", 2, 1) is True
    assert parse_device_ids("0,1") == [0, 1] and parse_device_ids(None) is None
    for args, where in [((None, 2, 0), "--coordinator-address"), (("localhost:1234", 2, None), "--process-id"),
                        (("localhost:1234", None, 0), "--num-processes"), (("localhost:1234", 2, 2), "--process-id"),
                        (("localhost:1234", 0, 0), "--num-processes"), (("localhost", 2, 0), "--coordinator-address"),
                        (("localhost:1234", 2, -1), "--process-id")]:
        with pytest.raises(JaxprvrError, match=where):
            check_flags(*args)
    with pytest.raises(JaxprvrError, match="--local-device-ids"):
        parse_device_ids("0,a")


# What a process sees when its peer is gone (the first from the kill test above, the others from jaxlib's and NCCL's
# own messages) and local errors that must stay what they are.
LOST_PEER = [
    "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:29071: "
    "Connection reset by peer",
    "UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer "
    "[127.0.0.1]:41234",
    "UNKNOWN: Gloo ReduceScatter failed: [external/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
    "30000ms for recv operation to complete",
    "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n/job:jax_worker/replica:0/task:1",
    "DEADLINE_EXCEEDED: Barrier timed out. Id: orbax_save_7. This usually happens because a task triggered the "
    "barrier too early or too slowly.",
    "INTERNAL: NCCL operation ncclAllReduce(...) failed: remote process exited or there was a network error. "
    "Last NCCL warning(error) log entry (may be unrelated) 'socketProgress: Connection closed by remote peer'.",
]
LOCAL = [
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.",
    "INTERNAL: Failed to execute XLA Runtime executable: run time error in custom call 'xla.gpu.gemm'.",
    "INVALID_ARGUMENT: Executable expected parameter 0 of size 4096 but got buffer with incompatible size 2048",
    "UNKNOWN: CUDA error: an illegal memory access was encountered",
]


def test_only_a_transport_failure_counts_as_a_lost_peer(monkeypatch, capsys):
    """A runtime error that says a peer is gone ends a multi-process run with exit 75 and the --resume line; a
    local one (out of memory, a failed XLA computation) is raised as it is, as in a one-process run."""
    from jaxprvr import distributed as D

    assert [D.is_lost_peer(m) for m in LOST_PEER] == [True] * len(LOST_PEER)
    assert [D.is_lost_peer(m) for m in LOCAL] == [False] * len(LOCAL)

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(D.os, "_exit", fake_exit)
    monkeypatch.setattr(D.jax, "process_count", lambda: 2)
    for msg in LOCAL:
        with pytest.raises(jax.errors.JaxRuntimeError, match=msg.split(":")[0]):
            with D.exit_on_lost_peer():
                raise jax.errors.JaxRuntimeError(msg)
    assert capsys.readouterr().err == ""
    with pytest.raises(Exited) as e:
        with D.exit_on_lost_peer():
            raise jax.errors.JaxRuntimeError(LOST_PEER[0])
    assert e.value.args == (D.EXIT_PEER_LOST,) == (75,)
    err = capsys.readouterr().err
    assert err.startswith("error: process 0 of 2: expected every process of the run to answer, found "
                          "JaxRuntimeError: UNKNOWN: Gloo AllGather failed") and "--resume" in err
    monkeypatch.setattr(D.jax, "process_count", lambda: 1)  # one process: even a transport error is raised
    with pytest.raises(jax.errors.JaxRuntimeError):
        with D.exit_on_lost_peer():
            raise jax.errors.JaxRuntimeError(LOST_PEER[0])


def test_cli_rejects_inconsistent_flags(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jaxprvr.train", "--config", "tvr", "--demo", "--out", str(tmp_path),
                        "--num-processes", "2", "--process-id", "2", "--coordinator-address", "localhost:1"],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=_env(1))
    assert r.returncode == 2 and r.stderr.startswith("error: --process-id") and "Traceback" not in r.stderr, r.stderr


def test_evaluate_takes_the_train_flags(tmp_path, capsys):
    """jaxprvr.evaluate has train's multi-host group (one function builds both) and checks the flags the same way,
    before anything is read."""
    from jaxprvr import evaluate, train

    def group(parser):
        g = next(g for g in parser._action_groups if g.title == "multi-host (jax.distributed)")
        return [a.option_strings for a in g._group_actions]

    assert group(evaluate.build_parser()) == group(train.build_parser())
    assert ["--heartbeat-timeout"] in group(train.build_parser())
    base = ["--config", "tvr", "--demo", "--ckpt", str(tmp_path), "--coordinator-address", "localhost:1"]
    for flags, line in [(["--num-processes", "2", "--process-id", "2"], "error: --process-id: expected an integer in "
                         "[0, 2) for --num-processes 2, found 2"),
                        (["--num-processes", "2", "--process-id", "0", "--heartbeat-timeout", "0"],
                         "error: --heartbeat-timeout: expected a number of seconds >= 1, found 0")]:
        capsys.readouterr()
        assert evaluate.main(base + flags) == 2
        assert capsys.readouterr().err.strip() == line


def test_mtm_loss_ignores_padding_between_the_slices():
    """In the sliced layout the padded query slots of a process's block lie between the query groups of
    two processes. The other models' losses are checked with such padding in tests/test_losses_prvr.py;
    MTM's (whose test pads at the end) equals its official numpy value with it too, with zero gradient
    on the padded rows."""
    from tests.test_losses_mtm import CFG, _mtm_case, _pad_mtm, ref_total
    from tests.test_losses_prvr import ATOL, RTOL
    from jaxprvr.losses import prvr as L

    scores, aux, labels, batch, negs = _mtm_case(3)
    ps, pa, pb, pn, _, _ = _pad_mtm(scores, aux, batch, negs)  # 12 queries in groups [3, 1, 2, 4, 2], 3 pads
    perm = np.array([0, 1, 2, 3, 4, 5, 12, 13, 6, 7, 8, 9, 10, 11, 14])  # slice 0, 2 pads, slice 1, 1 pad
    inv = np.argsort(perm)
    ps = {k: v[perm] for k, v in ps.items()}
    pa = {k: v[perm] if k in ("query2", "recon_text") else v for k, v in pa.items()}
    pb = {k: v[perm] if k.startswith("query") else v for k, v in pb.items()}
    pn = {k: (v[perm] if k.endswith("t2v") else np.where(v >= 0, inv[np.maximum(v, 0)], -1).astype(np.int32))
          for k, v in pn.items()}
    assert pb["query_valid"].tolist() == [1] * 6 + [0, 0] + [1] * 6 + [0]

    @jax.jit
    def value_and_grads(s, a):
        return jax.value_and_grad(lambda s_, a_: L.total_loss("mtm", s_, a_, pb, CFG, None, hard=True, negatives=pn),
                                  argnums=(0, 1), has_aux=True)(s, a)

    (loss, terms), (gs, ga) = value_and_grads(ps, pa)
    want = ref_total(scores, aux, labels, batch, negs, CFG)
    for k, v in want.items():
        np.testing.assert_allclose(terms[k], v, rtol=RTOL, atol=ATOL, err_msg=k)
    np.testing.assert_allclose(loss, sum(want.values()), rtol=RTOL, atol=ATOL)
    pads = pb["query_valid"] == 0
    for k, g in list(gs.items()) + [("query2", ga["query2"]), ("recon_text", ga["recon_text"])]:
        assert np.all(np.asarray(g)[pads] == 0), k
