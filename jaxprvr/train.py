"""Train a PRVR model with the official recipe (prvr.md §7), then evaluate the best checkpoint on test.

    python -m jaxprvr.train --config tvr --demo                 # built-in synthetic data, a short run
    python -m jaxprvr.train --config tvr --data-root $ROOT      # the official TVR recipe (MTM)
    python -m jaxprvr.train --config act --model ms_sl --data-root $ROOT --set train.n_epoch=50

Per epoch: video-centric batches (all queries of each video), BertAdam with warmup-linear over
``n_epoch × steps_per_epoch``, hard negatives from the configured epoch, validation SumR on ``val``,
best/latest orbax checkpoints, early stopping after ``max_es_cnt`` non-improving epochs.
Outputs in ``--out``: ``config.json``, ``metrics.jsonl`` (one JSON object per log step and per
evaluation), ``ckpt/{latest,best}``, ``test_results.json``. ``--resume`` continues exactly where the
latest checkpoint stopped (same data order, same dropout and negative-sampling keys).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprvr import sharding as shd
from jaxprvr.cli import add_compile_cache_args, enable_compile_cache, jsonable, run_cli
from jaxprvr.errors import JaxprvrError

# What `--demo` changes on top of the chosen config, so that the run takes a few minutes on 2 CPU cores: a
# 128-wide model (official: 384; at 384 one step of 32 TVR-size videos takes ~10 s there), 32 videos per
# batch, 4 epochs, hard negatives from epoch 2. Everything else is the official recipe.
DEMO_OVERRIDES = {
    "model.hidden_size": "128",
    "train.batch_size": "32",
    "train.n_epoch": "4",
    "train.lr_warmup_proportion": "0.05",
    "loss.hard_negative_start_epoch": "2",
}
# MTM is about 4x the work of GMMFormer v2 per step at equal width (three 11-branch DyGMM blocks, the Mamba
# stacks, and a video reconstructor of 4*hidden x 128*3072 weights): its demo runs 64 wide.
DEMO_MODEL_OVERRIDES = {"mtm": {"model.hidden_size": "64"}}


def demo_overrides(model_name: str) -> list[str]:
    """The ``--set`` list ``--demo`` applies for ``model_name``."""
    merged = {**DEMO_OVERRIDES, **DEMO_MODEL_OVERRIDES.get(model_name, {})}
    return [f"{k}={v}" for k, v in merged.items()]


MODEL_BATCH_KEYS = ("clip_feats", "frame_feats", "frame_mask", "frame_len", "video_valid",
                    "query_feats", "query_mask", "query_valid", "query_labels")


# ----------------------------------------------------------------------------------------------
# Setup helpers (shared with evaluate and the tests)
# ----------------------------------------------------------------------------------------------

def resolve_data_root(cfg, data_root, demo: bool) -> Path:
    if demo:
        from jaxprvr.data.synthetic import demo_root

        return Path(demo_root(cfg.data.dataset))
    if data_root is None:
        raise JaxprvrError("--data-root", "a folder holding <collection>/TextData and FeatureData (or --demo)",
                           "no --data-root given")
    return Path(data_root)


def config_with_data_dims(cfg, ds):
    """The visual dim is read from shape.txt at run time, as the official builders do (prvr.md §1.1)."""
    model = dataclasses.replace(cfg.model, visual_feat_dim=int(ds.visual_dim))
    return dataclasses.replace(cfg, model=model)


def dummy_batch(cfg, n_videos: int = 2, n_queries: int = 2) -> dict:
    m = cfg.model
    f32 = np.float32
    return {
        "clip_feats": np.zeros((n_videos, m.map_size, m.visual_feat_dim), f32),
        "frame_feats": np.zeros((n_videos, m.max_ctx_l, m.visual_feat_dim), f32),
        "frame_mask": np.ones((n_videos, m.max_ctx_l), f32),
        "frame_len": np.full((n_videos,), m.max_ctx_l, np.int32),
        "video_valid": np.ones((n_videos,), f32),
        "query_feats": np.zeros((n_queries, m.max_desc_l, m.q_feat_size), f32),
        "query_mask": np.ones((n_queries, m.max_desc_l), f32),
        "query_valid": np.ones((n_queries,), f32),
        "query_labels": (np.arange(n_queries) % n_videos).astype(np.int32),
    }


def init_params(model, cfg, key):
    return model.init({"params": key}, dummy_batch(cfg), train=False)["params"]


def make_optimizer(cfg, params, steps_per_epoch: int):
    """BertAdam over ``n_epoch × steps_per_epoch``; with ``train.use_ema`` (MTM) it also keeps the EMA weights."""
    from jaxprvr.optim import bert_adam, official_weight_decay_mask, with_ema

    t = cfg.train
    tx = bert_adam(lr=t.lr, warmup=t.lr_warmup_proportion, t_total=steps_per_epoch * t.n_epoch,
                   weight_decay=t.wd, weight_decay_mask=official_weight_decay_mask(params),
                   max_grad_norm=t.max_grad_norm)
    return with_ema(tx, t.ema_decay) if t.use_ema else tx


def make_train_step(model, cfg, tx, mesh):
    """One jitted BertAdam step on a sharded batch; the state is donated and stays replicated."""
    from jaxprvr.losses.prvr import total_loss

    name = cfg.model.name

    def step(state, batch, keys, hard):
        # Keys are functions of (seed, global step) only, so a resumed run draws the same dropout masks
        # and negatives. Dropout masks are counter hashes of the dropout key (jaxprvr.ops.dropout); the key is
        # an "rbg" one, whose per-layer fold-ins compile faster than threefry's.
        k_drop, k_neg = (jax.random.fold_in(k, state["step"]) for k in keys)

        def loss_fn(params):
            scores, aux = model.apply({"params": params}, batch, train=True, rngs={"dropout": k_drop})
            return total_loss(name, scores, aux, batch, cfg.loss, k_neg, hard=hard)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, {"loss": loss, **terms}

    rep = shd.replicated(mesh)
    # `hard` is traced (a bool scalar): the switch to hard negatives does not recompile the step.
    return jax.jit(step, donate_argnums=(0,), out_shardings=(rep, rep))


def train_keys(seed: int):
    """The root keys of the train step: (dropout key, negative-sampling key)."""
    return jax.random.key(seed, impl="rbg"), jax.random.fold_in(jax.random.key(seed), 1)


class MetricWriter:
    """JSON lines on process 0."""

    def __init__(self, path: Path):
        self.path = path
        self.enabled = jax.process_index() == 0

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(jsonable(record)) + "\n")


# ----------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------

def train(cfg, data_root, out_dir, *, resume: bool = False, progress: bool = True, max_steps: int | None = None,
          mesh=None, run_test: bool = True, init_from: str | None = None, batch_slices: int | None = None) -> dict:
    """Trains and returns a summary dict. ``max_steps`` stops early (saving ``latest``), as a kill would.
    ``init_from`` (any checkpoint path :func:`jaxprvr.checkpoint.load_params` accepts, e.g. the output of
    ``python -m parity.convert torch2jax``) starts from those parameters with a fresh optimizer (fine-tuning).
    ``batch_slices`` (default: the process count) cuts every batch into that many slices, each process
    building its own (:mod:`jaxprvr.distributed`); one process with ``batch_slices=S`` reproduces the batches
    of an ``S``-process run. With 1 (one process), the batches are the plain :func:`train_batches` ones."""
    from jaxprvr.checkpoint import Checkpoints, abstract_tree
    from jaxprvr.data import PRVRDataset, prefetch, train_batches
    from jaxprvr.data.dataset import batch_workers
    from jaxprvr.evaluate import Evaluator, format_metrics
    from jaxprvr.models import build_model
    from jaxprvr.optim import eval_params

    out = Path(out_dir)
    mesh = mesh if mesh is not None else shd.make_mesh()
    n_shards = shd.n_data_shards(mesh)
    n_slices = jax.process_count() if batch_slices is None else batch_slices
    progress = progress and jax.process_index() == 0
    t_start = time.perf_counter()

    train_ds = PRVRDataset(data_root, cfg, "train")
    val_ds = PRVRDataset(data_root, cfg, "val")
    cfg = config_with_data_dims(cfg, train_ds)
    tc = cfg.train
    bsz = shd.round_up(tc.batch_size, n_shards)
    q_cap = shd.round_up(train_ds.query_capacity(tc.batch_size, cfg.data.query_capacity_multiple), n_shards)
    slicing = {}
    if n_slices > 1:  # multi-host layout: per-slice query blocks, each process builds its own slices
        from jaxprvr.distributed import local_slices

        slices = local_slices(n_slices, mesh)  # checks that n_slices divides the devices
        slice_size = bsz // n_slices
        q_cap = shd.round_up(train_ds.query_capacity(slice_size, cfg.data.query_capacity_multiple),
                             n_shards // n_slices)
        slicing = {"slice_size": slice_size, "slices": slices}
    steps_per_epoch = -(-len(train_ds.video_ids) // tc.batch_size)

    ckpts = Checkpoints(out / "ckpt")
    has_ckpt = ckpts.latest_step("latest") is not None
    if has_ckpt and not resume:
        raise JaxprvrError(out, "an output folder without checkpoints (or --resume)", "an existing run",
                           hint="pass --resume to continue it, or --out for a new run")
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    writer = MetricWriter(out / "metrics.jsonl")

    model = build_model(cfg.model)
    key = jax.random.PRNGKey(tc.seed)
    params = jax.jit(lambda k: init_params(model, cfg, k), out_shardings=shd.replicated(mesh))(key)
    if init_from is not None and not (resume and has_ckpt):
        params = _init_from(init_from, cfg, abstract_tree(params), mesh)
    tx = make_optimizer(cfg, params, steps_per_epoch)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    state = shd.replicate(state, mesh)
    progress_meta = {"next_epoch": 0, "step_in_epoch": 0, "es_cnt": 0, "best_sumr": -1.0, "best_epoch": -1,
                     "stopped": False}
    if resume and has_ckpt:
        p, o, meta = ckpts.restore("latest", abstract_tree(state["params"]), abstract_tree(state["opt_state"]))
        state = shd.replicate({"params": p, "opt_state": o, "step": jnp.asarray(meta["global_step"], jnp.int32)}, mesh)
        progress_meta.update({k: meta[k] for k in progress_meta})

    train_step = make_train_step(model, cfg, tx, mesh)
    evaluator = Evaluator(model, cfg, mesh)
    step_keys = train_keys(tc.seed)
    lr_at = _lr_schedule(cfg, steps_per_epoch)

    def save(slot, meta_extra):
        if ckpts.latest_step(slot) == int(state["step"]):
            return  # nothing trained since this slot was written (e.g. --max-steps reached at once)
        meta = dict(progress_meta, global_step=int(state["step"]), config=cfg.to_dict(), **meta_extra)
        ckpts.save(slot, int(state["step"]), state["params"], state["opt_state"], meta)

    if not (resume and has_ckpt):
        save("latest", {})  # from here on, a kill at any moment leaves a checkpoint to --resume from
    stopped_by_max_steps = False
    m = progress_meta
    while not m["stopped"] and m["next_epoch"] < tc.n_epoch:
        epoch = m["next_epoch"]
        hard = epoch >= cfg.loss.hard_negative_start_epoch
        first = m["step_in_epoch"]  # > 0 when resuming inside an epoch
        batches = train_batches(train_ds, tc.batch_size, epoch, tc.seed, q_cap, skip=first,
                                workers=batch_workers(cfg.data.workers), **slicing)
        batches = prefetch((b if slicing else _pad_batch(b, bsz) for b in batches), cfg.data.prefetch)
        bar = _progress(progress, steps_per_epoch, f"epoch {epoch}", initial=m["step_in_epoch"])
        losses = []
        t_last, seen_v, seen_q = time.perf_counter(), 0, 0
        for i, batch in enumerate(batches, start=first):
            if max_steps is not None and int(state["step"]) >= max_steps:
                stopped_by_max_steps = True
                break
            dev_batch = shd.shard_local_batch({k: batch[k] for k in MODEL_BATCH_KEYS}, mesh)
            state, metrics = train_step(state, dev_batch, step_keys, np.bool_(hard))
            m["step_in_epoch"] = i + 1
            seen_v += int(batch["n_videos"] if slicing else batch["video_valid"].sum())  # global counts
            seen_q += int(batch["n_queries"] if slicing else batch["query_valid"].sum())
            gstep = int(state["step"])
            if gstep % tc.log_every == 0 or i + 1 == steps_per_epoch:
                metrics = jax.device_get(metrics)
                losses.append(float(metrics["loss"]))
                dt = time.perf_counter() - t_last
                rec = {"step": gstep, "epoch": epoch, "lr": lr_at(gstep - 1), "hard": hard,
                       "videos_per_s": seen_v / dt, "queries_per_s": seen_q / dt, **metrics}
                writer.write(rec)
                if not np.isfinite(rec["loss"]):
                    raise JaxprvrError(f"step {gstep}", "a finite loss", str(rec["loss"]),
                                       hint="the latest checkpoint is the last good state")
                t_last, seen_v, seen_q = time.perf_counter(), 0, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", vid_s=f"{rec['videos_per_s']:.1f}")
            if bar is not None:
                bar.update(1)
            if tc.ckpt_every_steps and gstep % tc.ckpt_every_steps == 0 and m["step_in_epoch"] < steps_per_epoch:
                save("latest", {})
        if bar is not None:
            bar.close()
        if stopped_by_max_steps:
            save("latest", {})
            break
        # -- validation, best checkpoint, early stopping (official main.py: es_cnt > max_es_cnt stops)
        val = evaluator.evaluate(eval_params(state["params"], state["opt_state"], tc.use_ema), val_ds,
                                 progress=progress)
        improved = val["sumr"] > m["best_sumr"]
        if improved:
            m.update(best_sumr=val["sumr"], best_epoch=epoch, es_cnt=0)
        else:
            m["es_cnt"] += 1
            if tc.max_es_cnt != -1 and m["es_cnt"] > tc.max_es_cnt:
                m["stopped"] = True
        m.update(next_epoch=epoch + 1, step_in_epoch=0)
        writer.write({"epoch": epoch, "split": "val", "improved": improved, **_flat(val)})
        _log(progress, f"epoch {epoch} val {format_metrics(val)}" + (" (best)" if improved else ""))
        if improved:
            save("best", {"val": _flat(val)})
        save("latest", {})

    summary = {"out": str(out), "model": cfg.model.name, "dataset": cfg.data.dataset,
               "steps": int(state["step"]), "epochs_done": m["next_epoch"], "best_epoch": m["best_epoch"],
               "best_val_sumr": m["best_sumr"], "train_seconds": round(time.perf_counter() - t_start, 1)}
    if stopped_by_max_steps or not run_test:
        ckpts.close()
        return summary
    # -- final test evaluation on the best checkpoint
    test_ds = PRVRDataset(data_root, cfg, "test")
    slot = "best" if ckpts.latest_step("best") is not None else "latest"
    if tc.use_ema:  # the EMA weights live in the optimizer state
        best_params, best_opt, _ = ckpts.restore(slot, abstract_tree(state["params"]),
                                                 abstract_tree(state["opt_state"]))
        best_params = eval_params(best_params, best_opt, True)
    else:
        best_params, _, _ = ckpts.restore(slot, abstract_tree(state["params"]))
    test = evaluator.evaluate(shd.replicate(best_params, mesh), test_ds, progress=progress)
    ckpts.close()
    from jaxprvr.metrics.prvr import chance_sumr

    test.update(split="test", checkpoint=slot, chance_sumr=chance_sumr(len(test_ds.video_ids)))
    if jax.process_index() == 0:
        (out / "test_results.json").write_text(json.dumps(jsonable(test), indent=2))
    writer.write({"split": "test", **_flat(test)})
    summary["test"] = test
    return summary


def _init_from(path, cfg, abstract, mesh):
    from jaxprvr.checkpoint import load_params, read_meta

    saved = read_meta(path).get("config", {}).get("model", {})
    if saved and saved.get("name") != cfg.model.name:
        raise JaxprvrError(path, f"a checkpoint of model {cfg.model.name}", f"one of {saved.get('name')}",
                           hint="pass the matching --model")
    params, _ = load_params(path, abstract)
    return shd.replicate(params, mesh)


def _pad_batch(batch: dict, size: int) -> dict:
    """Pads the video axis to a multiple of the device count (only when B is not already one)."""
    b = batch["video_valid"].shape[0]
    if b == size:
        return batch
    out = dict(batch)
    for k in ("clip_feats", "frame_feats", "frame_mask", "frame_len", "video_valid", "video_index"):
        v = batch[k]
        pad = np.zeros((size - b,) + v.shape[1:], v.dtype)
        if k == "video_index":
            pad -= 1
        out[k] = np.concatenate([v, pad], 0)
    return out


def _flat(res: dict) -> dict:
    return {k: v for k, v in res.items() if not k.startswith("_")}


def _lr_schedule(cfg, steps_per_epoch):
    from jaxprvr.optim import warmup_linear

    t_total = steps_per_epoch * cfg.train.n_epoch
    return lambda step: float(cfg.train.lr * warmup_linear(step, cfg.train.lr_warmup_proportion, t_total))


def _progress(enabled, total, desc, initial=0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr,
                leave=False)


def _log(enabled, text):
    if enabled:
        print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxprvr.train",
        description="Train a PRVR model (MS-SL, GMMFormer, GMMFormer v2, MTM) with the official recipe; "
                    "prints a JSON summary with the test metrics of the best checkpoint.")
    p.add_argument("--config", required=True, help="dataset (tvr|act|cha: the best model on it) or <model>/<dataset>")
    p.add_argument("--model", default=None, help="ms_sl | gmmformer | gmmformer_v2 | mtm (default: mtm)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-root", default=None,
                     help="folder holding <collection>/TextData and <collection>/FeatureData (MS-SL release layout)")
    src.add_argument("--demo", action="store_true",
                     help="create (once) and use a synthetic dataset with a planted signal; a short run")
    p.add_argument("--out", default=None, help="output folder (default: runs/<model>-<dataset>[-demo-<time>])")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt/latest")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from the parameters of this checkpoint (e.g. one made by parity.convert), "
                        "with a fresh optimizer: fine-tuning")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.n_epoch=1 (repeatable)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many global steps (saves latest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines on stderr")
    mh = p.add_argument_group(
        "multi-host (jax.distributed)",
        "run the same command in every process, with the same coordinator and process count and a distinct "
        "--process-id; each process reads only its slice of every batch, all share --out (process 0 writes "
        "the metrics and results). Unset: a single-process run.")
    mh.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                    help="address of process 0, which serves the coordination service there")
    mh.add_argument("--num-processes", type=int, default=None, metavar="N", help="number of processes of the run")
    mh.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 .. N-1")
    mh.add_argument("--local-device-ids", default=None, metavar="IDS",
                    help="comma-separated local devices this process uses (default: all of them)")
    add_compile_cache_args(p)
    return p


def run(args) -> dict:
    from configs import load_config
    from jaxprvr import distributed

    enable_compile_cache(args)
    # Before any JAX computation. A no-op for a single-process run.
    multi = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                   distributed.parse_device_ids(args.local_device_ids))
    overrides = list(args.overrides)
    if args.demo:
        name = load_config(args.config, args.model).model.name
        overrides = demo_overrides(name) + overrides
    cfg = load_config(args.config, args.model, overrides)
    root = resolve_data_root(cfg, args.data_root, args.demo)
    out = args.out
    if out is None:
        out = f"runs/{cfg.model.name}-{cfg.data.dataset}"
        if args.demo and not args.resume and not multi:  # (processes would not agree on the time)
            out += "-demo-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    summary = train(cfg, root, out, resume=args.resume, progress=not args.no_progress, max_steps=args.max_steps,
                    init_from=args.init_from)
    distributed.shutdown()  # waits for the other processes (after a failure, the process just exits)
    return summary


def _report(summary: dict) -> None:
    test = summary.get("test")
    if test is not None:
        print(f"test SumR {test['sumr']:.2f} (chance {test['chance_sumr']:.2f}) "
              f"R@1 {test['r1']:.2f} R@5 {test['r5']:.2f} R@10 {test['r10']:.2f} R@100 {test['r100']:.2f}",
              file=sys.stderr)


def main(argv=None) -> int:
    return run_cli(build_parser(), run, argv, report=_report,
                   interrupted="interrupted: the latest checkpoint is intact; continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
