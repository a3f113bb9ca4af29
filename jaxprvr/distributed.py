"""Multi-host (multi-process) training through ``jax.distributed``.

    # on every host (here: two processes on one machine), the same command but for --process-id:
    python -m jaxprvr.train --config tvr --data-root $ROOT --out $OUT \\
        --coordinator-address host0:12345 --num-processes 2 --process-id 0   # 1 on the other host

Every process opens the same dataset and draws the same shuffled, frame-length-sorted video order.
The global batch of ``B`` video slots is cut into ``S`` consecutive *slices* of ``B / S`` videos (``S`` =
the number of processes): process ``p`` reads only the features of its slice(s), with their queries in a
per-slice query block of static capacity, and :func:`jaxprvr.sharding.shard_local_batch` assembles the
global arrays from each process's rows (``jax.make_array_from_process_local_data``). The global batch is
the concatenation of the slices, so one process with ``batch_slices=S`` (see :func:`jaxprvr.train.train`)
reproduces an ``S``-process run exactly. With one process nothing here is called: no initialization, the
batches and placements of a single-process run.

Evaluation: every process reads the whole val/test gallery; blocks are placed with the global shardings
and the encodings and scores are gathered to every host (:func:`jaxprvr.sharding.to_host`), so every
process computes the same metrics. Checkpoints: every process calls the orbax save/restore on the same
folder (a shared filesystem across hosts); orbax writes each replicated array once and synchronises the
processes. ``metrics.jsonl``, ``config.json`` and ``test_results.json`` are written by process 0 only.
On CPU the cross-process collectives are gloo's (JAX's default, ``jax_cpu_collectives_implementation``).

``python -m jaxprvr.evaluate`` takes the same flags (:func:`add_args`): every process evaluates, process 0 writes.

A process that dies: the others fail in their next collective (gloo: connection reset), print one line and exit
with :data:`EXIT_PEER_LOST` at once (:func:`exit_on_lost_peer`; any other runtime error, e.g. a local out-of-memory,
stays the error it is), without waiting for their pending checkpoint
saves (they cannot finalise without the dead process; the previous checkpoint stays intact); restart every
process with ``--resume``. A process that hangs instead of dying is declared dead by the coordination service
after ``--heartbeat-timeout`` seconds, and when process 0 (which runs that service) dies, JAX aborts the others
(SIGABRT, "Terminating process because the JAX distributed service detected fatal errors").
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Sequence

import jax

from jaxprvr.errors import JaxprvrError


def parse_device_ids(text: str | None) -> list[int] | None:
    """``"0,1"`` -> ``[0, 1]`` (the ``--local-device-ids`` flag); ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise JaxprvrError("--local-device-ids", "a comma-separated list of device ids, e.g. 0,1", repr(text))
    return ids


# sysexits' EX_TEMPFAIL: another process of the run died; restarting every process with --resume continues it.
EXIT_PEER_LOST = 75
HEARTBEAT_TIMEOUT_S = 100  # jax.distributed's default


def add_args(parser, description: str):
    """The multi-host flags of ``jaxprvr.train`` and ``jaxprvr.evaluate`` (one argument group)."""
    g = parser.add_argument_group("multi-host (jax.distributed)", description)
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="address of process 0, which serves the coordination service there")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes of the run")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 .. N-1")
    g.add_argument("--local-device-ids", default=None, metavar="IDS",
                   help="comma-separated local devices this process uses (default: all of them)")
    g.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_S, metavar="S",
                   help="seconds without a heartbeat after which a process counts as dead and the others stop "
                        f"(default {HEARTBEAT_TIMEOUT_S})")
    return parser


def initialize_from_args(args) -> bool:
    """:func:`initialize` from the flags of :func:`add_args` (the parsed arguments of a parser it built)."""
    if args.heartbeat_timeout < 1:
        raise JaxprvrError("--heartbeat-timeout", "a number of seconds >= 1", str(args.heartbeat_timeout))
    return initialize(args.coordinator_address, args.num_processes, args.process_id,
                      parse_device_ids(args.local_device_ids), heartbeat_timeout_s=args.heartbeat_timeout)


def check_flags(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                local_device_ids: Sequence[int] | None = None) -> bool:
    """Validates the multi-host flags; returns whether ``jax.distributed`` must be initialized.

    None given, or ``--num-processes 1``: a single-process run (False). Otherwise all three of the
    coordinator address (``HOST:PORT``), the number of processes (>= 1) and the process id
    (``0 <= id < num_processes``) are required."""
    given = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()) and local_device_ids is None:
        return False
    if num_processes is None:
        raise JaxprvrError("--num-processes", "the number of processes of the run (with --coordinator-address "
                           "and --process-id)", "no --num-processes")
    if num_processes < 1:
        raise JaxprvrError("--num-processes", "an integer >= 1", str(num_processes))
    if process_id is not None and not 0 <= process_id < num_processes:
        raise JaxprvrError("--process-id", f"an integer in [0, {num_processes}) for --num-processes {num_processes}",
                           str(process_id))
    if num_processes == 1:
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise JaxprvrError(" ".join(missing), f"all of {', '.join(given)} for a run of {num_processes} processes",
                           "none given" if len(missing) > 1 else "it missing")
    host, sep, port = coordinator_address.rpartition(":")
    if not (host and sep and port.isdigit() and 0 < int(port) < 65536):
        raise JaxprvrError("--coordinator-address", "HOST:PORT of process 0 (e.g. 10.0.0.1:12345)",
                           repr(coordinator_address))
    return True


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
               local_device_ids: Sequence[int] | None = None, *, timeout_s: int = 300,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> bool:
    """``jax.distributed.initialize`` from the train CLI flags (see :func:`check_flags`); must run before any
    JAX computation. Returns whether it initialized (False: a single-process run, nothing done).

    Process 0 also runs the coordinator service at ``coordinator_address``; every process waits up to
    ``timeout_s`` for the others to connect; one silent for ``heartbeat_timeout_s`` counts as dead."""
    if not check_flags(coordinator_address, num_processes, process_id, local_device_ids):
        return False
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise JaxprvrError("jax.distributed", f"process {process_id} of {num_processes}",
                               f"already initialized as process {jax.process_index()} of {jax.process_count()}")
        return True
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    except RuntimeError as e:  # e.g. JAX already ran a computation, or the coordinator never answered
        raise JaxprvrError("jax.distributed.initialize", f"process {process_id} of {num_processes} connected to "
                           f"{coordinator_address}", f"{type(e).__name__}: {e}".splitlines()[0],
                           hint="start every process with the same --coordinator-address and --num-processes "
                                "and a distinct --process-id") from None
    if jax.default_backend() == "cpu":
        # jax 0.10.2 on CPU: a multi-device train step read back from the persistent compilation cache
        # deadlocks in its first collective (a second launch of the same run hangs, SIGTERM included), while
        # the same step compiled afresh runs; so multi-process CPU runs always compile.
        jax.config.update("jax_enable_compilation_cache", False)
    return True


def shutdown() -> None:
    """Leaves the distributed run (a barrier with the other processes); nothing on a single-process run."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


# What a JAX runtime error says when another process of the run is gone (:func:`is_lost_peer`). The status codes
# are the coordination service's (gRPC): a task that stopped answering, a barrier (orbax's, the shutdown's) that
# timed out. The phrases are the transports': gloo (CPU collectives; what tests/test_multihost.py's killed peer
# gives: "UNKNOWN: Gloo AllGather failed: [.../pair.cc:538] Read error [127.0.0.1]:29071: Connection reset by
# peer"), NCCL ("remote process exited or there was a network error") and the coordination service's heartbeat.
LOST_PEER_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
LOST_PEER_PHRASES = ("connection reset by peer", "connection closed by peer", "connection refused", "broken pipe",
                     "socket closed", "heartbeat timeout", "stopped sending heartbeats",
                     "coordination service has stopped", "barrier timed out", "remote process exited",
                     "network error", "ncclremoteerror")
GLOO_TRANSPORT_PHRASES = ("read error", "write error", "timed out")  # in a gloo collective's error


def is_lost_peer(message: str) -> bool:
    """Whether a JAX runtime error's message is a transport failure between the processes (another process died or
    stopped answering), not a local error (out of memory, a failed XLA computation, ...)."""
    code = message.lstrip().split(":", 1)[0].strip()
    low = message.lower()
    return code in LOST_PEER_CODES or any(p in low for p in LOST_PEER_PHRASES) or \
        ("gloo" in low and any(p in low for p in GLOO_TRANSPORT_PHRASES))


@contextlib.contextmanager
def exit_on_lost_peer():
    """In a multi-process run, a JAX runtime error that says another process is gone (:func:`is_lost_peer`: a
    collective whose peer died, a barrier that timed out) ends the process at once: one ``error:`` line and exit
    status :data:`EXIT_PEER_LOST`, skipping the waits at exit (pending checkpoint saves and jax.distributed's
    shutdown barrier, which would wait for the dead process). Any other error (a local out-of-memory, ...) is
    raised as it is."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1 or not is_lost_peer(str(e)):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"error: process {jax.process_index()} of {jax.process_count()}: expected every process of the run to "
              f"answer, found {type(e).__name__}: {first} (if another process stopped, start every process again "
              "with --resume: the latest checkpoint is intact)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)


def local_slices(n_slices: int, mesh) -> list[int]:
    """The batch slices this process builds: ``n_slices / process_count`` consecutive ones.

    Requires the mesh to list each process's devices contiguously, in process order, the same number
    per process (what ``jax.make_array_from_process_local_data`` assembles), and ``n_slices`` to be a
    multiple of the process count dividing the device count."""
    n_proc, me = jax.process_count(), jax.process_index()
    devices = list(mesh.devices.flat)
    owners = [d.process_index for d in devices]
    if n_slices < 1 or n_slices % n_proc or len(devices) % n_slices:
        raise JaxprvrError("batch slices", f"a multiple of the {n_proc} processes dividing the {len(devices)} "
                           "devices of the mesh", str(n_slices))
    per = len(devices) // n_proc
    if owners != sorted(owners) or any(owners.count(p) != per for p in range(n_proc)):
        raise JaxprvrError("the device mesh", "each process's devices contiguous and in process order, as many "
                           "per process", f"device owners {owners}")
    k = n_slices // n_proc
    return list(range(me * k, (me + 1) * k))
