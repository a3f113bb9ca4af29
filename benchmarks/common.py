"""The harness of the side-by-side benchmarks, JAX against the PyTorch twins: PRVR (``benchmarks.prvr``), moment
retrieval (``benchmarks.vmr``, ``benchmarks.vmr_detr``) and text-video retrieval (``benchmarks.t2v``). Each task script
imports it from here (none from another):

* the runner: one subprocess per measurement, ``python -m <module> --worker <spec>`` (:func:`run_worker`; that
  module's ``main`` hands the spec to :func:`worker_main` with its own table of workers), the framework columns of
  a section (:func:`run_columns`), the common end of a ``main`` (:func:`run_sections`), partial saves
  (:func:`_save_partial`), the device picked (:func:`pick_device`) and described (:func:`_device_desc`);
* the clocks: median of synchronised calls (:func:`_median_timed`), warm-up calls (:func:`warm_up`), JAX's and
  torch.compile's own compile seconds (:func:`jax_clocked`, :func:`_torch_compile_clock`), peak memory
  (:func:`_jax_peak`, :func:`_peak_rss`), stage lines on the worker's stderr (:func:`_say`);
* in the workers: the JAX train step timed (:func:`time_jax_train_step`), two JAX evaluation passes
  (:func:`jax_eval_passes`), the torch twin loaded (:func:`load_twin`) and its step timed
  (:func:`time_torch_steps`), one call under ``torch.profiler`` (:func:`torch_profiled`), memory readings;
* in the driver: the torch.compile columns run last, the forward first (:func:`run_compiled_last`);
* in the report: the cells (:func:`_fmt_s`, :func:`_fmt_b`, :func:`_speed`, :func:`_cell`, :func:`_load`), failure
  rows, the JAX ÷ torch ratio of a section, its target, memory rows, and the metric dicts compared column by
  column (:func:`metric_diffs`).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# ================================================================================================ clocks
_T0 = time.perf_counter()


def _say(msg: str) -> None:
    """A timestamped stage line on the worker's stderr (the driver's --log; shows where a timed-out worker was)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _median_timed(call, repeats: int, sync) -> tuple[float, list[float]]:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        sync(call(i))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def warm_up(call, sync, n: int) -> list[float]:
    """``n`` synchronised warm-up calls ``call(0..n-1)`` (compilation falls here); their seconds."""
    firsts = []
    for i in range(n):
        t0 = time.perf_counter()
        sync(call(i))
        firsts.append(time.perf_counter() - t0)
        _say(f"warm-up call {i}: {firsts[-1]:.1f} s")
    return firsts


JAX_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",  # tracing to a jaxpr
                      "/jax/core/compile/jaxpr_to_mlir_module_duration",  # lowering to StableHLO
                      "/jax/core/compile/backend_compile_duration")  # XLA compilation (no persistent cache here)


class JaxCompileClock:
    """Seconds JAX itself reports spending in tracing, lowering and XLA compilation (``jax.monitoring`` events),
    and the number of executables compiled, summed from the moment it is created."""

    def __init__(self):
        import jax.monitoring as mon

        self.seconds = 0.0
        self.executables = 0

        def on_duration(event, duration, **_):
            if event in JAX_COMPILE_EVENTS:
                self.seconds += duration
                self.executables += event == JAX_COMPILE_EVENTS[-1]

        mon.register_event_duration_secs_listener(on_duration)

    def read(self) -> tuple[float, int]:
        return self.seconds, self.executables


def jax_clocked(call, sync=None) -> tuple[object, float, float, int]:
    """``call()`` once, synchronised by ``sync`` (default ``jax.block_until_ready``; a first call compiles): its
    result, its seconds, and the compile seconds and executables JAX reports meanwhile (:class:`JaxCompileClock`)."""
    import jax

    clock = JaxCompileClock()
    t0 = time.perf_counter()
    out = (sync or jax.block_until_ready)(call())
    seconds = time.perf_counter() - t0
    return (out, seconds) + clock.read()


def _torch_compile_clock() -> tuple[float, int]:
    """(seconds, frames compiled) that torch.compile reports for this process so far: Dynamo's per-frame
    ``entire_frame_compile_time_s`` (capture + AOTAutograd + Inductor, C++ build included) plus the backward
    graphs AOTAutograd compiles at the first backward (``backward_cumulative_compile_time_us``)."""
    from torch._dynamo import utils

    secs, frames = 0.0, 0
    for m in utils.get_compilation_metrics():
        secs += (m.entire_frame_compile_time_s or 0.0) + (m.backward_cumulative_compile_time_us or 0) / 1e6
        frames += 1
    return secs, frames


def _torch_compile_setup() -> None:
    from torch._dynamo import utils

    if hasattr(utils, "set_compilation_metrics_limit"):
        utils.set_compilation_metrics_limit(100_000)  # default 64 records: all of them are summed


def _jax_peak(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


# ================================================================================================ worker process
def _is_gpu(spec) -> bool:
    return spec["device"] == "gpu"


def _torch_cpu_setup(spec) -> None:
    """On CPU, denormal floats flushed to zero, as XLA:CPU does by default. Without it the twins' backward
    passes run several times slower on this CPU (the Gaussian masks' exp(-x^2) tails and softmax gradients
    produce denormals), which would flatter JAX."""
    import torch

    if not _is_gpu(spec):
        torch.set_flush_denormal(True)


def _load_weights(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def set_matmul_precision(precision: str | None) -> None:
    """The same float32 matmul precision in both frameworks: ``tf32`` (tensor cores: JAX ``tensorfloat32``,
    torch ``allow_tf32``) or ``highest`` (true float32). ``None`` leaves each framework's default (JAX's GPU
    default already uses TF32-class tensor-core passes, PyTorch's does not: not a like-for-like comparison)."""
    if not precision:
        return
    import jax

    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if precision == "tf32" else "highest")
    try:
        import torch
    except ImportError:
        return
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"


def short_error(e: BaseException) -> str:
    """One line naming what failed: for a torch.compile backend failure (Dynamo wraps Inductor's exception,
    whose own first line is only "backend='inductor' raised:") the innermost exception's type and first line."""
    inner = e
    seen = set()
    while id(inner) not in seen:
        seen.add(id(inner))
        nxt = getattr(inner, "inner_exception", None) or inner.__cause__
        if nxt is None:
            break
        inner = nxt
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip() and not ln.strip().endswith("raised:")]
    where = f"{type(e).__name__} <- " if inner is not e else ""
    return f"{where}{type(inner).__name__}: {lines[0][:300] if lines else ''}"


def worker_main(spec_json: str, workers: dict) -> int:
    """Runs one measurement (``workers``: task name -> function, the calling script's ``WORKERS``) and prints its
    result as one ``@@RESULT`` JSON line."""
    spec = json.loads(spec_json)
    set_matmul_precision(spec.get("precision"))
    load0 = os.getloadavg()  # other processes on the machine: a measurement taken under load is marked so
    try:
        result = {"ok": True, **workers[spec["task"]](spec)}
    except Exception as e:  # reported in the table, the run goes on
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": short_error(e)}
    result["loadavg"] = {"start": load0, "end": os.getloadavg()}
    print("@@RESULT " + json.dumps(result))
    return 0


# ================================================================================================ runner
def _env(device: str) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["JAX_COMPILATION_CACHE_DIR"] = ""  # real compile times: no persistent cache in the benchmark
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # peak memory is then what the step uses
    return env


def run_worker(spec: dict, timeout: float, log, module: str = "benchmarks.prvr") -> dict:
    """Runs ``python -m <module> --worker <spec>`` (that module's ``worker_main``) in a fresh process and returns
    its result (or a failure row), appending its stderr to ``log``."""
    label = " ".join(str(spec[k]) for k in ("task", "framework", "model", "impl", "L") if spec.get(k))
    print(f"[{module}] {label} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    env = _env(spec["device"])
    # torch.compile's on-disk caches (FX graphs, AOTAutograd, compiled C++ kernels) in a new, empty folder per
    # worker: real compile times, as JAX runs without its persistent cache here; nothing shared with other users.
    inductor_dir = tempfile.mkdtemp(prefix="benchmarks-prvr-inductor-")
    env["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
    try:
        proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        shutil.rmtree(inductor_dir, ignore_errors=True)
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        log.write(f"==== {label} (timed out after {timeout:.0f} s)\n{err[-20000:]}\n")
        log.flush()
        print(f"[{module}]   FAILED (timed out after {timeout:.0f} s)", file=sys.stderr, flush=True)
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    shutil.rmtree(inductor_dir, ignore_errors=True)
    log.write(f"==== {label}\n{proc.stderr[-20000:]}\n")
    log.flush()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")]
    if not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        print(f"[{module}]   FAILED (exit {proc.returncode})", file=sys.stderr, flush=True)
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:300]}", "wall_s": time.perf_counter() - t0}
    res = json.loads(lines[-1][len("@@RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    status = "ok" if res.get("ok") else f"FAILED ({res.get('error')})"
    print(f"[{module}]   {status} in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return res


def run_columns(rows: dict, fws, spec_of, deferred: list, where, timeout: float, log, out, results: dict,
                module: str = "benchmarks.prvr", pending: str = "pending (runs after the other sections)") -> None:
    """Fills ``rows`` (framework -> result) with one measurement subprocess per framework column, ``spec_of(fw)``
    its spec, saving ``results`` to ``out`` (``--out``) after each. A torch.compile column (Inductor's C++ builds:
    the longest runs) is marked ``pending`` and queued on ``deferred`` as ``(where, spec)``, to run last."""
    for fw in fws:
        spec = spec_of(fw)
        if fw == "torch_compile":
            rows[fw] = {"ok": False, "error": pending}
            deferred.append((where, spec))
            continue
        rows[fw] = run_worker(spec, timeout, log, module=module)
        _save_partial(out, results)


def _save_partial(out, results) -> None:
    """Writes what has been measured so far (a run cut short by a time limit keeps its rows)."""
    if out:
        Path(out).write_text(json.dumps({**results, "partial": True}, indent=2, default=float))


def run_sections(results: dict, log_path, scratch_prefix: str, run, report, out=None) -> int:
    """The common end of a side-by-side benchmark's ``main``: ``run(log, scratch)`` fills ``results`` (the worker
    logs to ``log_path``, scratch files in a temporary folder removed afterwards), then the total time and the
    end load average are recorded, ``report(results)`` is printed, and ``out`` (if any) gets the JSON."""
    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix=scratch_prefix)
    try:
        with open(log_path, "w") as log:
            run(log, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t0
    results["loadavg_end"] = os.getloadavg()
    print(report(results))
    print(f"total {results['total_s'] / 60:.1f} min; load average at the end {results['loadavg_end'][0]:.2f}; "
          f"worker logs: {log_path}", file=sys.stderr)
    if out:
        Path(out).write_text(json.dumps(results, indent=2, default=float))
    return 0


def announce(module: str, lines: list[str]) -> None:
    """The driver's progress lines (an equality check's verdict) on stderr, as ``[module] line``."""
    for line in lines:
        print(f"[{module}] {line}", file=sys.stderr, flush=True)


def pick_device(device: str | None) -> str:
    """``--device`` as given, or gpu when JAX (asked in a fresh process: the driver starts no backend) sees one,
    else cpu."""
    if device is None:
        probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                               capture_output=True, text=True, timeout=300)
        device = "gpu" if probe.stdout.strip() in ("gpu", "cuda", "rocm") else "cpu"
    return device


def _device_desc(device: str) -> str:
    import platform

    if device == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            for ln in open("/proc/cpuinfo"):
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"CPU: {cpu}, {os.cpu_count()} cores"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = "unknown GPU"
    return f"GPU: {out}; host {os.cpu_count()} cores"


# ================================================================================================ cells
def _fmt_s(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_b(b):
    return "-" if not b else f"{b / 2**30:.2f} GiB"


def _ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "-"


def _speed(fw, fws, time_key) -> str:
    """On JAX rows: PyTorch eager's time / this row's (and torch.compile's / this row's); on PyTorch rows: this
    row's time / float32 JAX's. Above 1: JAX is faster."""
    r, jax_row = fws[fw], fws.get("jax", {})
    sec = r.get(time_key)
    if not fw.startswith("jax"):
        return _ratio(sec, jax_row.get(time_key) if jax_row.get("ok") else None)
    out = _ratio(fws.get("torch", {}).get(time_key) if fws.get("torch", {}).get("ok") else None, sec)
    comp = fws.get("torch_compile", {})
    if comp.get("ok"):
        out += f" ({_ratio(comp.get(time_key), sec)} vs compiled)"
    return out


FW_LABEL = {"jax": "JAX", "jax_bf16": "JAX bf16", "torch": "torch eager", "torch_compile": "torch.compile"}


def _load(r: dict) -> str:
    """The machine's 1-minute load average when the measurement started and when it ended (2 cores: above ~2.5,
    other processes were competing for them)."""
    la = r.get("loadavg")
    return f"{la['start'][0]:.1f}→{la['end'][0]:.1f}" if la else "-"


def _cell(msg: str, n: int = 90) -> str:
    """A failure reason for one table cell: one line, no pipes, at most ``n`` characters."""
    msg = " ".join(str(msg).split()).replace("|", "/")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


# ================================================================================================ workers
def _rss_now() -> int:
    """The process's resident set now (bytes): the baseline a worker's peak is measured above."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _torch_peak(dev):
    import torch

    return int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None


def _jax_memory_analysis(fn, *args) -> dict | None:
    """XLA's own plan for the compiled program: argument, output and temporary bytes (no execution)."""
    try:
        m = fn.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend/version reports it
        return None
    if m is None:
        return None
    return {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp")}


def time_jax_train_step(step, state, params, dev_batches, repeats: int, extra: tuple = (), warm_calls: int = 1,
                        what: str = "jax train") -> tuple[dict, dict]:
    """The JAX half of a ``train`` section: FLOPs of one step, the first call (compiles; the compile clock's own
    count), ``warm_calls`` more warm-up calls, then the median of ``repeats`` synchronised calls rotating
    ``dev_batches`` from the third (the state donated and carried, as in training) and the jit cache size after
    them. ``extra``: arguments the step takes after its keys. Returns the timing fields of a result row and,
    apart, its memory fields (peak memory, the RSS before the first call)."""
    import jax

    from benchmarks.flops import count_flops
    from jaxprvr.train import train_keys

    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    keys = train_keys(0)
    fc = count_flops(step, state, dev_batches[0], keys, *extra)
    _say(f"{what}: {n_params} params, {fc.flops / 1e9:.1f} GFLOP per step; first call (compiles)")
    rss0 = _rss_now()
    box = {"state": state}

    def call(i):
        box["state"], metrics = step(box["state"], dev_batches[i % len(dev_batches)], keys, *extra)
        return metrics["loss"], box["state"]["step"]

    _, first, own, n_exec = jax_clocked(lambda: call(0))
    _say(f"first call {first:.1f} s (compile events {own:.1f} s)")
    for i in range(1, 1 + warm_calls):
        jax.block_until_ready(call(i))
    last = {}

    def timed(i):
        last["out"] = call(i + 2)
        return last["out"]

    med, times = _median_timed(timed, repeats, jax.block_until_ready)
    timing = {"seconds": med, "times": times, "compile_s": own, "compiled_executables": n_exec,
              "first_calls_s": [first], "first_minus_steady_s": max(first - med, 0.0), "flops": fc.flops,
              "jit_cache_entries": step._cache_size(), "params": n_params, "loss": float(last["out"][0])}
    return timing, {"peak_device_bytes": _jax_peak(jax.devices()[0]), "peak_rss_bytes": _peak_rss(), "rss_before": rss0}


def jax_eval_passes(first_pass, steady_pass) -> tuple[object, dict, int, int]:
    """Two end-to-end evaluation passes: the first compiles, the second is the steady state. Returns the second
    pass's result, the timing fields of a result row (``end_to_end_s``, ``first_end_to_end_s``,
    ``first_minus_steady_s``, ``compile_s``: JAX's own count during the first pass), the executables compiled in
    the first pass and those compiled in the second."""
    _, first, own, n_exec = jax_clocked(first_pass, sync=lambda out: out)
    _say(f"jax eval first pass {first:.1f} s (compile events {own:.1f} s)")
    res, e2e, _, n_steady = jax_clocked(steady_pass, sync=lambda out: out)
    timing = {"end_to_end_s": e2e, "first_end_to_end_s": first, "first_minus_steady_s": max(first - e2e, 0.0),
              "compile_s": own}
    return res, timing, n_exec, n_steady


def load_twin(twin, weights: str, dev, framework: str):
    """The twin with the weights file's state dict (strict) on ``dev``. Returns whether ``framework`` is
    torch.compile (its compilation metrics then kept in full) and the synchronisation of a timed call."""
    import torch

    twin.load_state_dict({k: torch.from_numpy(v) for k, v in _load_weights(weights).items()}, strict=True)
    twin.to(dev)
    compiled = framework == "torch_compile"
    if compiled:
        _torch_compile_setup()
    sync = (lambda _: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda _: None)
    return compiled, sync


def time_torch_steps(call, sync, dev, compiled: bool, warm: int, repeats: int) -> tuple[dict, dict]:
    """The torch half of a ``train`` section: ``warm`` synchronised warm-up calls (torch.compile compiles there),
    then the median of ``repeats`` calls ``call(warm + i)``, and the recompilations among them. Returns the
    timing fields of a result row and, apart, its memory and version fields (peak memory, the RSS before the
    first call, torch's version and threads)."""
    import torch

    rss0 = _rss_now()
    firsts = warm_up(call, sync, warm)
    own, frames = _torch_compile_clock() if compiled else (None, None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med, times = _median_timed(lambda i: call(i + warm), repeats, sync)
    recompiled = (_torch_compile_clock()[1] - frames) if compiled else None
    timing = {"seconds": med, "times": times, "compile_s": own, "compiled_frames": frames,
              "recompiles_during_timing": recompiled, "first_calls_s": firsts,
              "first_minus_steady_s": max(sum(firsts) - warm * med, 0.0)}
    return timing, {"peak_device_bytes": _torch_peak(dev), "peak_rss_bytes": _peak_rss(), "rss_before": rss0,
                    "torch": torch.__version__, "threads": torch.get_num_threads()}


def torch_profiled(call, sync, activities):
    """``call(1)`` as a warm-up, then ``call(0)`` under ``torch.profiler``: the profile and the call's seconds."""
    from torch.profiler import profile

    call(1)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        call(0)
        sync(None)
        wall = time.perf_counter() - t0
    return prof, wall


# ================================================================================================ driver
def device_defaults(args, gpu_repeats: int, cpu_compile_timeout: float) -> tuple[str, str]:
    """The defaults that follow the device, set on ``args``: ``--repeats`` (``gpu_repeats`` on GPU, 3 on CPU),
    ``--matmul-precision`` (highest on GPU, each framework's own float32 on CPU), ``--compile-timeout`` on CPU.
    Returns the device (``--device``, else probed) and the size (``--size``, else official on GPU, cpu on CPU)."""
    device = pick_device(args.device)
    size = args.size or ("official" if device == "gpu" else "cpu")
    args.repeats = args.repeats or (gpu_repeats if device == "gpu" else 3)
    if args.precision is None:
        args.precision = "highest" if device == "gpu" else "default"
    if args.compile_timeout is None and device == "cpu":
        args.compile_timeout = cpu_compile_timeout
    return device, size


def parse_sections(raw: str, allowed, flag: str = "--sections") -> list[str] | None:
    """The comma list of sections; None, after a one-line error on stderr, when one is not in ``allowed``."""
    sections = [s for s in raw.split(",") if s]
    bad = [s for s in sections if s not in allowed]
    if bad:
        print(f"error: {flag}: unknown {bad}; expected {list(allowed)}", file=sys.stderr)
        return None
    return sections


def precision_desc(device: str, precision: str, highest: str, cpu: str = "float32 in both (CPU)") -> str:
    """The report header's words for the run's float32 matmul precision (``highest``: what true float32 means
    in this benchmark's frameworks)."""
    if device == "cpu":
        return cpu
    if precision == "highest":
        return highest
    if precision == "tf32":
        return "TF32 in both (JAX tensorfloat32, torch allow_tf32=True)"
    return "each framework's default"


def run_compiled_last(deferred: list, results: dict, timeout: float, log, module: str, after) -> None:
    """The torch.compile columns that ``run_columns`` queued as ``(section, spec)``, the forward's first: the
    eval column compiles the same forward graph and the train column a superset of it (losses, backward); if
    the forward does not compile in time, neither would they, and they are marked skipped. ``after(section)``
    follows each column that ran (the section's comparisons, the partial save)."""
    fwd_failed = None
    for section, sp in sorted(deferred, key=lambda d: ("forward", "eval", "train").index(d[0])):
        if fwd_failed and section != "forward":
            results[section]["torch_compile"] = {"ok": False, "error": f"skipped: the compiled forward failed "
                                                                      f"({fwd_failed})"}
            continue
        results[section]["torch_compile"] = run_worker(sp, timeout, log, module=module)
        if section == "forward" and not results[section]["torch_compile"].get("ok"):
            fwd_failed = results[section]["torch_compile"].get("error")
        after(section)


# ================================================================================================ report
def _mem(r) -> int | None:
    """A column's peak memory: the device's on GPU, the process's peak RSS on CPU."""
    return r.get("peak_device_bytes") or r.get("peak_rss_bytes")


def _fail_row(fw, r, cols, labels=FW_LABEL) -> str:
    """The table row of a column that failed: its label, the reason, empty cells up to ``cols``, its load."""
    return f"| {labels.get(fw, fw)} | failed: {_cell(r.get('error', '?'))} |" + " |" * (cols - 2) + f" {_load(r)} |"


def _ratio_val(fws, key, ref="torch"):
    """``ref``'s ``key`` ÷ JAX's (> 1: JAX faster), when both ran; else None."""
    j, t = fws.get("jax", {}), fws.get(ref, {})
    if j.get("ok") and t.get("ok") and j.get(key):
        return t[key] / j[key]
    return None


def _target(results, section, value) -> str:
    t = results.get("targets", {}).get(section)
    if not t or value is None:
        return "-"
    return f"{'met' if value >= t else 'NOT met'} (target ≥ {t}×)"


def section_rows(fws: dict, cols: int, cells, labels=FW_LABEL) -> list[str]:
    """A section table's rows, one per framework column: ``| label | cells(fw, r) | peak memory | load |`` for a
    column that ran, a failure row of ``cols`` cells for one that failed."""
    return [f"| {labels.get(fw, fw)} | {cells(fw, r)} | {_fmt_b(_mem(r))} | {_load(r)} |" if r.get("ok")
            else _fail_row(fw, r, cols, labels) for fw, r in fws.items()]


def passes_cells(fw: str, fws: dict, r: dict) -> str:
    """The cells of an evaluation's two passes: ``end to end, steady | JAX ÷ PyTorch | end to end, first pass |
    JAX ÷ PyTorch, first pass | compile (compiler's own)``."""
    return (f"{_fmt_s(r['end_to_end_s'])} | {_speed(fw, fws, 'end_to_end_s')} | {_fmt_s(r['first_end_to_end_s'])} | "
            f"{_speed(fw, fws, 'first_end_to_end_s')} | {_fmt_s(r.get('compile_s'))}")


def target_line(results: dict, section: str, value, label: str, how: str, unmeasured: str | None = None) -> str:
    """``<label> (<how>): 1.23× → met (target ≥ 1.5×)`` for a measured ratio, else ``<unmeasured or label>: not
    measured``."""
    if value:
        return f"{label} ({how}): {value:.2f}× → {_target(results, section, value)}"
    return f"{unmeasured or label}: not measured"


EVAL_TARGET = ("Eval target", "JAX ÷ torch eager, end to end, steady")


def memory_row(section: str, fw: str, r: dict, xla: bool = True, labels=FW_LABEL) -> str:
    """One row of a "Peak memory" table: the peak, what lies above the worker's RSS before its first call (CPU
    only: on GPU the peak is the device's), and (``xla``) XLA's own plan of the program where it was read."""
    above = (r["peak_rss_bytes"] - r["rss_before"]) if not r.get("peak_device_bytes") and \
        r.get("rss_before") else None
    row = f"| {section} | {labels.get(fw, fw)} | {_fmt_b(_mem(r))} | {_fmt_b(above)} |"
    if not xla:
        return row
    x = r.get("xla_memory")
    xs = _fmt_b(sum(x.values())) + f" (temp {_fmt_b(x['temp'])})" if x else "-"
    return f"{row} {xs} |"


NO_JAX_EVAL = "eval metrics equal: not checked (no JAX evaluation)"


def metric_diffs(ev: dict, key: str) -> list | None:
    """The eval section's metric dicts (``key`` of each row) against JAX's, for torch eager, torch.compile and JAX
    bf16 where they ran: ``(framework, JAX's metrics, {name: (JAX's value, the column's)} where they differ)``;
    None when the JAX evaluation did not run."""
    j = ev.get("jax", {})
    if not j.get("ok"):
        return None
    out = []
    for fw in ("torch", "torch_compile", "jax_bf16"):
        r = ev.get(fw, {})
        if not r.get("ok"):
            continue
        a, b = j[key], r[key]
        out.append((fw, a, {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}))
    return out
