"""Where a JAX train step spends its time: the XLA ops of the trainer's jitted step, grouped by kind.

    python -m benchmarks.profile_step --model gmmformer_v2 [--hidden 128] [--batch 16] [--steps 3] [--top 20]

It builds the step exactly as ``benchmarks.prvr`` does (same batches, same jitted ``make_train_step``), traces
``--steps`` steps with ``jax.profiler.trace(create_perfetto_trace=True)``, and sums the duration of every XLA op
event of the trace. Each op is named back to the model code through the ``op_name`` metadata of the compiled
HLO (``jit(step)/jvp(GMMFormerV2)/.../frame_input_proj/net_1/dot_general``), and put in one group:

* ``matmul``: dot / YNNPACK fusions (``ynn_fusion``), convolutions;
* ``dropout bits``: random-bit generation and uniform/bernoulli sampling;
* ``transpose/copy``: layout changes;
* ``elementwise/reduce fusions``: everything else XLA fused (LayerNorm, softmax, masks, selects, losses).

On CPU, XLA runs independent ops concurrently on its thread pool, so the op times add up to thread time:
more than the step's wall time on 2 cores. The shares are what matter. Prints markdown; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

import numpy as np

GROUPS = ("matmul", "dropout bits", "transpose/copy", "elementwise/reduce fusions")
_CONTAINERS = ("call", "while", "conditional")  # their events enclose the events of their bodies


def hlo_op_names(hlo_text: str) -> dict:
    """``{instruction name: op_name metadata}`` of a compiled HLO module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def group_of(event: str, op_name: str) -> str | None:
    """The group of one XLA op event (None: not an op, or a container of other op events)."""
    if event.startswith(_CONTAINERS) or event.startswith(("$", "ThunkExecutor", "PjitFunction", "SlinkyThreadPool",
                                                        "CommonPjRt", "TfrtCpu")):
        return None
    if any(s in op_name for s in ("rng_bit_generator", "_bernoulli", "_uniform", "random_bits", "threefry")):
        return "dropout bits"
    if event.startswith(("ynn_fusion", "dot", "convolution")) or op_name.endswith(("dot_general", "conv_general_dilated")):
        return "matmul"
    if event.startswith(("transpose", "copy")) or op_name.endswith("transpose"):
        return "transpose/copy"
    if op_name or "fusion" in event or "." in event:
        return "elementwise/reduce fusions"
    return None


def traced(run) -> tuple[list, object, float]:
    """``run()`` (synchronised) under ``jax.profiler.trace`` (a Perfetto trace in a temporary folder): the trace's
    events, what ``run`` returned, and its wall seconds."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            out = jax.block_until_ready(run())
            wall = time.perf_counter() - t0
        trace = json.load(gzip.open(glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]))
    return (trace["traceEvents"] if isinstance(trace, dict) else trace), out, wall


def op_seconds(events, names: dict, component_of, width: int):
    """XLA op time of a trace's op events (seconds, summed over threads) by model component
    (``component_of(op_name)``), by kind (:func:`group_of`) and by op (``event | op_name's last width chars``)."""
    comp, kinds, ops = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        op = names.get(e["name"], "")
        g = group_of(e["name"], op)
        if g is None:
            continue
        comp[component_of(op)] += e.get("dur", 0) / 1e6
        kinds[g] += e.get("dur", 0) / 1e6
        ops[f"{e['name']} | {op[-width:]}"] += e.get("dur", 0) / 1e6
    return comp, kinds, ops


def profile(model: str, hidden: int, batch: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.prvr import _config, train_batch
    from jaxprvr import sharding as shd
    from jaxprvr.models import build_model
    from jaxprvr.config import apply_overrides
    from jaxprvr.train import init_params, make_optimizer, make_train_step, train_keys

    spec = {"model": model, "dataset": "tvr", "device": "cpu", "hidden": hidden, "batch": batch}
    cfg = apply_overrides(_config(spec), {"loss.hard_negative_start_epoch": 0})  # hard negatives, as the benchmark
    mesh = shd.make_mesh(jax.devices()[:1])
    net = build_model(cfg.model)
    params = jax.jit(lambda k: init_params(net, cfg, k))(jax.random.PRNGKey(0))
    tx = make_optimizer(cfg, params, 1000)
    state = shd.replicate({"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}, mesh)
    batches = [shd.shard_batch(train_batch(cfg, "tvr", batch, s), mesh) for s in range(3)]
    keys = train_keys(0)
    step = make_train_step(net, cfg, tx, mesh, steps_per_epoch=1000)
    names = hlo_op_names(step.lower(state, batches[0], keys).compile().as_text())
    for i in range(3):  # compile and warm up
        state, m = step(state, batches[i], keys)
    jax.block_until_ready(m)
    wall = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batches[i % 3], keys)
        jax.block_until_ready(m)
        wall.append(time.perf_counter() - t0)

    def traced_steps(state=state):
        for i in range(steps):
            state, m = step(state, batches[i % 3], keys)
            jax.block_until_ready(m)
        return state

    events, _, _ = traced(traced_steps)
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            per_op[e["name"]] += e.get("dur", 0) / 1e3 / steps  # ms per step
    groups = collections.Counter()
    ops = []
    for name, ms in per_op.items():
        g = group_of(name, names.get(name, ""))
        if g is not None:
            groups[g] += ms
            ops.append({"op": name, "ms": ms, "group": g, "op_name": names.get(name, "")})
    ops.sort(key=lambda o: -o["ms"])
    return {"model": model, "hidden": hidden, "batch": batch, "step_wall_ms": 1e3 * float(np.median(wall)),
            "groups_ms": {g: groups.get(g, 0.0) for g in GROUPS}, "ops": ops, "n_ops": len(ops),
            "jax": jax.__version__, "device": jax.devices()[0].device_kind}


def report(r: dict, top: int) -> str:
    total = sum(r["groups_ms"].values()) or 1.0
    lines = [f"# {r['model']} train step, hidden {r['hidden']}, batch {r['batch']} ({r['device']}, jax {r['jax']})",
             f"step wall time (median, untraced): {r['step_wall_ms']:.1f} ms; {r['n_ops']} XLA ops; "
             f"op time summed over threads: {total:.1f} ms", "",
             "| group | ms per step (thread time) | share |", "|---|---:|---:|"]
    lines += [f"| {g} | {ms:.1f} | {100 * ms / total:.1f}% |" for g, ms in r["groups_ms"].items()]
    lines += ["", "| op | ms per step | group | model code (op_name) |", "|---|---:|---|---|"]
    for o in r["ops"][:top]:
        where = o["op_name"].replace("jit(step)/", "")[-110:]
        lines.append(f"| {o['op']} | {o['ms']:.2f} | {o['group']} | `{where}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from jaxprvr import registry

    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gmmformer_v2", choices=registry.names())
    ap.add_argument("--hidden", type=int, default=128, help="hidden size (default 128, the CPU preset)")
    ap.add_argument("--batch", type=int, default=16, help="videos per batch (default 16, the CPU preset)")
    ap.add_argument("--steps", type=int, default=3, help="traced steps (default 3)")
    ap.add_argument("--top", type=int, default=15, help="slowest ops listed (default 15)")
    ap.add_argument("--out", help="write the JSON here")
    a = ap.parse_args(argv)
    r = profile(a.model, a.hidden, a.batch, a.steps)
    print(report(r, a.top))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
