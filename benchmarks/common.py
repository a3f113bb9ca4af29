"""What the side-by-side benchmarks of moment retrieval (``benchmarks.vmr``, ``benchmarks.vmr_detr``) and
text-video retrieval (``benchmarks.t2v``) share, on top of the runner in ``benchmarks.prvr`` (one subprocess per
measurement: ``run_worker``, ``run_columns``, ``run_sections``):

* in the workers: the JAX train step timed (:func:`time_jax_train_step`), two JAX evaluation passes
  (:func:`jax_eval_passes`), the torch twin loaded (:func:`load_twin`) and its step timed
  (:func:`time_torch_steps`), one call under ``torch.profiler`` (:func:`torch_profiled`), memory readings;
* in the driver: the torch.compile columns run last, the forward first (:func:`run_compiled_last`);
* in the report: failure rows, the JAX ÷ torch ratio of a section, its target, memory rows, and the metric
  dicts compared column by column (:func:`metric_diffs`).
"""

from __future__ import annotations

import os
import sys
import time

from benchmarks.prvr import (FW_LABEL, _cell, _fmt_b, _fmt_s, _jax_peak, _load, _load_weights, _median_timed, _peak_rss,
                             _say, _speed, _torch_compile_clock, _torch_compile_setup, jax_clocked, pick_device,
                             run_worker, warm_up)


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
