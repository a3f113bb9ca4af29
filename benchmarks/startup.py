"""Start-up time of a CLI launch with JAX's persistent compilation cache: empty cache, warm cache, cache off.

    python -m benchmarks.startup [--config tvr] [--model gmmformer_v2] [--max-steps 3] [--out FILE.json]

Launches the real command line three times, each in a fresh process, on the same config:

1. ``python -m jaxprvr.train --config C --model M --demo --max-steps N --no-progress`` with ``--compile-cache``
   pointing at a new, empty folder (the first launch: everything is compiled, and written to the cache);
2. the same command again (the second launch: the executables are read back from the cache);
3. the same command with ``--no-compile-cache`` (what every launch cost before the cache was on by default).

The built-in demo dataset is created (once) before the first timed launch. Per launch it reports the wall time
of the whole process (interpreter start, imports, data, model init, the first ``N`` steps, checkpoints) and,
from JAX's own monitoring events (``jax.monitoring``, recorded inside the launched process): the seconds spent
in XLA compilation, or loading the compiled executable from the cache (``/jax/core/compile/backend_compile_
duration``: the part the cache can save), in tracing and lowering to StableHLO (done on every launch, cache or
not), and the number of executables compiled / loaded from the cache; plus the cache folder's size after it.
Prints a markdown table and writes the numbers as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"  # wraps compile_or_get_cached: a cache read counts here
HITS = "/jax/compilation_cache/cache_hits"


def _child(stats_path: str, module: str, argv: list[str]) -> int:
    """Runs ``python -m module argv`` in this process, recording JAX's compile events into ``stats_path``."""
    import runpy

    import jax.monitoring as mon

    secs: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    execs: list = []  # [name, seconds, read from the cache] per executable, in order
    hit = [False]  # the cache-hit event fires inside the compile span that it belongs to

    def on_duration(event, duration, **kw):
        secs[event] += duration
        counts[event] += 1
        if event == COMPILE:
            execs.append([str(kw.get("fun_name", "?")), round(duration, 3), hit[0]])
            hit[0] = False

    def on_event(event, **_):
        counts[event] += 1
        if event == HITS:
            hit[0] = True

    mon.register_event_duration_secs_listener(on_duration)
    mon.register_event_listener(on_event)
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        Path(stats_path).write_text(json.dumps({"secs": secs, "counts": counts, "execs": execs}))
    return code


def _dir_stats(d: Path) -> tuple[int, float]:
    files = [f for f in d.rglob("*") if f.is_file()] if d.is_dir() else []
    return len(files), sum(f.stat().st_size for f in files) / 2**20


def _launch(label: str, slug: str, module: str, argv: list[str], work: Path, env: dict, cache: Path | None) -> dict:
    stats = work / f"{slug}.stats.json"
    cmd = [sys.executable, "-m", "benchmarks.startup", "--child", str(stats), module, *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"benchmarks.startup: `{' '.join(cmd)}` exited with {proc.returncode}:\n{tail}")
    ev = json.loads(stats.read_text())
    secs, counts = ev["secs"], ev["counts"]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    n_files, mib = _dir_stats(cache) if cache is not None else (0, 0.0)
    hits = int(counts.get(HITS, 0))
    return {
        "launch": label, "cache": str(cache) if cache is not None else None, "wall_s": round(wall, 2),
        "compile_s": round(secs.get(COMPILE, 0.0), 2),  # XLA compiles + cache reads
        "trace_s": round(secs.get(TRACE, 0.0), 2), "lower_s": round(secs.get(LOWER, 0.0), 2),
        "executables": int(counts.get(COMPILE, 0)), "from_cache": hits,
        "compiled": int(counts.get(COMPILE, 0)) - hits,
        "train_seconds": summary.get("train_seconds"), "steps": summary.get("steps"),
        "cache_files": n_files, "cache_mib": round(mib, 1),
        # the slowest executables compiled (not read from the cache) in this launch
        "slowest_compiled": sorted(([n, t] for n, t, h in ev["execs"] if not h), key=lambda x: -x[1])[:5],
    }


def format_table(rows: list[dict], title: str) -> str:
    lines = [title, "",
             "| launch | wall s | XLA compile / cache load s | trace + lower s | executables (compiled / from cache) "
             "| train() s | cache after |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        cache = f"{r['cache_files']} files, {r['cache_mib']} MiB" if r["cache"] else "off"
        lines.append(f"| {r['launch']} | {r['wall_s']:.1f} | {r['compile_s']:.1f} | "
                     f"{r['trace_s'] + r['lower_s']:.1f} | {r['executables']} ({r['compiled']} / {r['from_cache']}) "
                     f"| {r['train_seconds']} | {cache} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(argv[1], argv[2], argv[3:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tvr", help="dataset (tvr|act|cha) or <model>/<dataset>")
    p.add_argument("--model", default="gmmformer_v2", help="a model of the registry (python -m jaxprvr.train --list)")
    p.add_argument("--max-steps", type=int, default=3, help="training steps per launch")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed on to jaxprvr.train")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the rows as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (runs and cache); prints it")
    args = p.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAXPRVR_COMPILE_CACHE")}
    work = Path(tempfile.mkdtemp(prefix="jaxprvr-startup-"))
    cache = work / "cache"
    base = ["--config", args.config, "--model", args.model, "--demo", "--max-steps", str(args.max_steps),
            "--no-progress", *[a for s in args.overrides for a in ("--set", s)]]
    try:
        # the demo dataset (created once per machine) and a warm OS file cache for the imports, untimed
        from jaxprvr.config import load_config

        dataset = load_config(args.config, args.model).data.dataset
        subprocess.run([sys.executable, "-c", f"from jaxprvr.data.synthetic import demo_root; demo_root({dataset!r})"],
                       cwd=REPO, env=env, check=True, capture_output=True)
        rows = []
        for i, (label, extra, c) in enumerate((("1st launch, empty cache", ["--compile-cache", str(cache)], cache),
                                               ("2nd launch, warm cache", ["--compile-cache", str(cache)], cache),
                                               ("--no-compile-cache", ["--no-compile-cache"], None))):
            print(f"benchmarks.startup: {label} ...", file=sys.stderr, flush=True)
            rows.append(_launch(label, f"launch{i}", "jaxprvr.train", [*base, "--out", str(work / f"run{i}"), *extra],
                                work, env, c))
            r = rows[-1]
            print(f"benchmarks.startup: {label}: {r['wall_s']:.1f} s wall, {r['compile_s']:.1f} s XLA compile / cache "
                  f"load, {r['compiled']} compiled / {r['from_cache']} from cache", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"benchmarks.startup: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    first, second, off = rows
    import jax

    title = (f"`python -m jaxprvr.train --config {args.config} --model {args.model} --demo --max-steps "
             f"{args.max_steps}` on {jax.devices()[0].device_kind} (jax {jax.__version__}, {os.cpu_count()} CPUs): "
             f"2nd launch {first['wall_s'] - second['wall_s']:.1f} s faster than the 1st "
             f"(compile {first['compile_s']:.1f} -> {second['compile_s']:.1f} s)")
    again = [f"{n} ({t:.1f} s)" for n, t in second["slowest_compiled"] if t >= 0.5]
    if again:  # e.g. a step with a host callback (jax.pure_callback): JAX does not write those to the cache
        title += "; compiled again in the 2nd launch (not cacheable): " + ", ".join(again)
    print(format_table(rows, title))
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "model": args.model,
                                              "max_steps": args.max_steps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
