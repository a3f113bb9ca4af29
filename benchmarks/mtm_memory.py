"""Does a TVR-dimension MTM train on this machine? Peak memory of one jitted training step.

    python -m benchmarks.mtm_memory [--config tvr] [--batch 32] [--queries-per-video 5] [--steps 2] [--out F.json]

Builds MTM at the config's official dims (TVR: hidden 384, visual 3072, query 768; the video reconstructor alone
is 1536 x 393,216 = 604 M parameters), the BertAdam state (plus the EMA shadow when ``train.use_ema``), a batch of
``--batch`` videos with ``--queries-per-video`` full-length queries each (TVR has 5 per video), then compiles the
training step of :mod:`jaxprvr.train` and runs ``--steps`` steps. Prints JSON with: parameter count and bytes,
XLA's compiled memory analysis (arguments, outputs, temporaries; the state is donated), the process's peak
resident memory (``ru_maxrss``) after compiling and after the steps, compile seconds and seconds per step.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mtm_memory", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tvr", help="dataset (tvr|act|cha)")
    p.add_argument("--batch", type=int, default=None, help="videos per batch (default: the official batch size)")
    p.add_argument("--queries-per-video", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxprvr.config import load_config
    from jaxprvr import sharding as shd
    from jaxprvr.models import build_model
    from jaxprvr.tasks.prvr import TASK
    from jaxprvr.train import init_params, make_optimizer, make_train_step, train_keys

    cfg = load_config(args.config, "mtm", args.overrides)
    bsz = args.batch or cfg.train.batch_size
    nq = bsz * args.queries_per_video
    model = build_model(cfg.model)
    mesh = shd.make_mesh()
    params = jax.jit(lambda k: init_params(model, cfg, k))(jax.random.PRNGKey(0))
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    recon = params["video_reconstructor"]
    n_recon = int(sum(x.size for x in jax.tree.leaves(recon)))
    tx = make_optimizer(cfg, params, steps_per_epoch=100)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    state_bytes = int(sum(x.nbytes for x in jax.tree.leaves(state)))
    rng = np.random.default_rng(0)
    batch = TASK.dummy_batch(cfg, bsz, nq)
    for k in ("clip_feats", "frame_feats", "query_feats"):
        batch[k] = rng.standard_normal(batch[k].shape).astype(np.float32)
    batch["query_labels"] = np.repeat(np.arange(bsz), args.queries_per_video).astype(np.int32)
    step = make_train_step(model, cfg, tx, mesh, steps_per_epoch=100)  # step 0: epoch 0, easy negatives
    keys = train_keys(0)
    rss_before = _rss_gib()
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, keys).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    rss_compiled = _rss_gib()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, keys)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    out = {
        "config": args.config, "device": str(jax.devices()[0]), "batch_videos": bsz, "batch_queries": nq,
        "hidden_size": cfg.model.hidden_size, "visual_feat_dim": cfg.model.visual_feat_dim,
        "use_ema": cfg.train.use_ema, "params": n_params, "video_reconstructor_params": n_recon,
        "train_state_gib": round(state_bytes / 2**30, 2),
        "xla_argument_gib": round(mem.argument_size_in_bytes / 2**30, 2) if mem else None,
        "xla_output_gib": round(mem.output_size_in_bytes / 2**30, 2) if mem else None,
        "xla_temp_gib": round(mem.temp_size_in_bytes / 2**30, 2) if mem else None,
        "xla_alias_gib": round(mem.alias_size_in_bytes / 2**30, 2) if mem else None,
        "peak_rss_gib_before_compile": round(rss_before, 2), "peak_rss_gib_after_compile": round(rss_compiled, 2),
        "peak_rss_gib": round(_rss_gib(), 2), "compile_s": round(compile_s, 1),
        "step_s": [round(t, 2) for t in times], "loss": float(metrics["loss"]),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
