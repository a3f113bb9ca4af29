"""Selective-scan forms, forward + backward, at MTM's shapes: JAX associative / sequential / chunked side by
side with mamba_ssm's ``selective_scan_ref`` (PyTorch) and, on a CUDA machine with mamba_ssm built, the
official CUDA kernel.

    python -m benchmarks.selective_scan [--batch 32] [--lengths 32,128] [--repeats 5] [--out FILE.json]

Method: one compile + warm-up call per form (compile time reported separately); then the median of
``--repeats`` timed calls, each on a fresh input set (rotated among 3) and synchronised
(``block_until_ready`` / ``torch.cuda.synchronize``). Memory: XLA's compiled ``temp_size_in_bytes`` +
argument/output bytes for JAX (the buffers the step itself needs); ``torch.cuda.max_memory_allocated`` on GPU;
on CPU the torch column reports no memory. The loss is ``sum(out * w)``; gradients of all 8 inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

D_INNER, D_STATE = 768, 16  # MTM: d_model 384, expand 2, d_state 16


def make_inputs(batch, length, seed):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return dict(u=f(batch, D_INNER, length), delta=0.5 * f(batch, D_INNER, length),
                A=-np.exp(f(D_INNER, D_STATE)), B=f(batch, D_STATE, length), C=f(batch, D_STATE, length),
                D=f(D_INNER), z=f(batch, D_INNER, length), delta_bias=f(D_INNER)), f(batch, D_INNER, length)


def bench_jax(method, inputs, w, repeats, chunk_size):
    import jax
    import jax.numpy as jnp

    from jaxprvr.ops.selective_scan import selective_scan

    names = list(inputs[0])

    def loss(*xs):
        return jnp.sum(selective_scan(**dict(zip(names, xs)), delta_softplus=True, method=method,
                                      chunk_size=chunk_size) * w)

    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names)))))
    args = [[jnp.asarray(inp[k]) for k in names] for inp in inputs]
    t0 = time.perf_counter()
    compiled = fn.lower(*args[0]).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    jax.block_until_ready(compiled(*args[0]))
    times = []
    for i in range(repeats):
        a = args[(i + 1) % len(args)]
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*a))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s, peak


def bench_torch(fn, inputs, w, repeats, device):
    import torch

    def run(inp):
        ts = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in inp.items()}
        out = fn(**ts, delta_softplus=True)
        (out * torch.as_tensor(w, device=device)).sum().backward()
        if device != "cpu":
            torch.cuda.synchronize()

    run(inputs[0])
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        run(inputs[(i + 1) % len(inputs)])
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device != "cpu" else None
    return statistics.median(times), None, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.selective_scan", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lengths", default="32,128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--skip-torch-ref", action="store_true", help="skip the slow PyTorch reference loop")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import jax
    import torch

    from torch_ref.mamba import load

    ref = load()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        data = [make_inputs(args.batch, length, s) for s in range(3)]
        inputs, w = [d[0] for d in data], data[0][1]
        forms = [(f"jax {m}", lambda m=m: bench_jax(m, inputs, w, args.repeats, args.chunk_size))
                 for m in ("associative", "sequential", "chunked")]
        if not args.skip_torch_ref:
            forms.append(("torch selective_scan_ref", lambda: bench_torch(ref.selective_scan_ref, inputs, w,
                                                                          args.repeats, device)))
        if ref.cuda_kernels:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            forms.append(("torch CUDA selective_scan_fn", lambda: bench_torch(selective_scan_fn, inputs, w,
                                                                              args.repeats, device)))
        for name, run in forms:
            print(f"L={length} {name} ...", file=sys.stderr, flush=True)
            med, comp, peak = run()
            rows.append(dict(L=length, form=name, fwd_bwd_s=med, compile_s=comp,
                             peak_bytes=peak))
    dev = f"JAX {jax.devices()[0].device_kind}, torch {device} {torch.__version__}"
    print(f"selective scan fwd+bwd, batch {args.batch}, d_inner {D_INNER}, d_state {D_STATE}; {dev}\n")
    print("| L | form | fwd+bwd (median) | compile | peak memory |\n|---:|---|---:|---:|---:|")
    for r in rows:
        comp = f"{r['compile_s']:.1f} s" if r["compile_s"] is not None else "-"
        mem = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "-"
        print(f"| {r['L']} | {r['form']} | {r['fwd_bwd_s'] * 1e3:.0f} ms | {comp} | {mem} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": dev, "batch": args.batch, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
