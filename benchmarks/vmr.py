"""Moment retrieval (MRNet) performance, JAX against the PyTorch twin (``torch_ref.mrnet``), side by side in one run
on one device.

    python -m benchmarks.vmr                                        # CPU: all sections, ActivityNet, size "cpu"
    python -m benchmarks.vmr --config tacos --sections train,eval
    python -m benchmarks.vmr --device gpu --size official --bf16 --out gpu.json   # a GPU (benchmarks/gpu_vmr.sh)
    python -m benchmarks.vmr --models mesm                          # MESM (Charades-STA): benchmarks/vmr_detr.py

Sections (``--sections``, default all):

* ``train``: one optimizer step at the config's batch (ActivityNet 12 videos, TACoS 2, Charades 48) with all
  their queries. JAX: the trainer's jitted ``jaxprvr.train.make_train_step`` (the vmr task's loss with
  ``batch_stats``, torch-AdamW with the trainable mask, clipping; state donated; one jit cache entry after the
  timed steps). PyTorch: ``torch_ref.mrnet.official_train_step`` (the official per-video loop, losses,
  ``clip_grad_norm_``, AdamW) on the twin in eager mode, and the same with the twin under ``torch.compile``
  (Inductor; on CPU it builds C++ kernels with the system compiler). One warm-up call per batch shape for
  torch.compile (3 batches: the query counts differ, as in real data), then the timed calls.
* ``eval``: a test split held in memory (synthetic videos and queries at the official widths and query counts),
  end to end: forward, decoding (score maps -> greedy NMS -> top-10) and R@{1,5}/mIoU. JAX: ``tasks.vmr.Evaluator``
  (jitted forward per batch, batched top-k NMS on the host overlapped with the device). PyTorch:
  ``torch_ref.vmr_eval.official_inference`` + ``official_evaluate`` (the official Python NMS loop per query), eager
  and with the twin under torch.compile. All columns on the SAME weights (the twin's official initialisation,
  ``torch.manual_seed(0)``, converted to Flax with ``jaxprvr.models.mrnet.official_key_table``). Two passes per
  column in a fresh process: the first includes the compilations, the second is the steady state. Stage times
  (forward, NMS, metrics) of the steady state are measured in the same process. An "eval metrics equal" line
  compares the official metric dicts of JAX and each torch column.
* ``forward``: the model alone on one evaluation batch (eval mode, no gradient): JAX jitted forward, twin eager
  and compiled; the first batch's score maps of every column are compared with JAX's (max |diff|).
* ``retention``: the attention of RetLayer alone in JAX, ``ops.retention.masked_attention`` (parallel: the
  (L, L) logits per head) against ``chunked_attention`` (key blocks with an online softmax), forward and
  forward + backward, at d = 256 (8 heads), one sequence, L up to 4096: time and memory (XLA's compiled
  temporary buffers and the process's / device's peak).
* ``memory``: the peak memory of every measured column in one table (from the other sections' workers).
* ``conv``: ProposalConv's layers 0 (padded) and 1 alone, forward and forward + backward, JAX (as ``nn.Conv``
  writes it, and with the padding outside the convolution / as row-shifted matmuls) and torch ``F.conv2d``.
* ``profile`` (not in the default set): the JAX train step and forward traced with ``jax.profiler``, XLA op time
  per model component; the eager twin under ``torch.profiler``, self time per aten op group.

Sizes: ``--size official`` uses the released config; ``--size cpu`` (default on CPU) narrows the widths
(``CPU_WIDTHS``: joint space and featpool 64, predictor 32, FFN 128; the official ActivityNet model, 77.5M
parameters with a 9x9 conv stack of 512 channels on 64x64 maps, takes minutes per step on 2 cores) and evaluates
a subset of the test split (``--eval-videos``). Batch sizes, clip counts, input widths, kernel
sizes, layer counts and query counts per video are the official ones in both.

Precision: on CPU both frameworks compute float32 convolutions and matmuls. On a GPU the run sets JAX
``jax_default_matmul_precision=highest`` and torch ``allow_tf32=False`` (matmul and cuDNN): true float32 in both
(``--matmul-precision tf32`` for tensor cores in both); the header prints it. ``--bf16`` adds JAX rows with
``model.compute_dtype=bfloat16``.

Method (as ``benchmarks.prvr``): every measurement in its own subprocess (clean peak memory; torch.compile's caches
in a fresh folder; no JAX persistent cache), identical batches from a fixed seed, 3 distinct batches rotated,
warm-up calls first, each timed call synchronised, the median of ``--repeats``; compile time as the compiler's own
count (jax.monitoring; torch._dynamo's metrics) and as what the user waits (first call(s) minus steady); FLOPs from
the JAX program's jaxpr (``benchmarks.flops``); peak memory = device peak on GPU, process peak RSS on CPU; the
1-minute load average at the start and end of each worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import (EVAL_TARGET, FW_LABEL, NO_JAX_EVAL, _cell, _device_desc, _fmt_b, _fmt_s, _is_gpu,
                               _jax_memory_analysis, _jax_peak, _load, _load_weights, _median_timed, _mem, _peak_rss,
                               _ratio, _ratio_val, _rss_now, _save_partial, _say, _speed, _torch_compile_clock,
                               _torch_cpu_setup, _torch_peak, announce, device_defaults, jax_clocked, jax_eval_passes,
                               load_twin, memory_row, metric_diffs, parse_sections, passes_cells, precision_desc,
                               run_columns, run_compiled_last, run_sections, run_worker, section_rows, target_line,
                               time_jax_train_step, time_torch_steps, torch_profiled, worker_main)

CONFIGS = ("activitynet", "tacos", "charades")
SECTIONS = ("train", "eval", "forward", "retention", "memory", "conv", "profile")
DEFAULT_SECTIONS = ("train", "eval", "forward", "retention", "memory", "conv")
# The --demo widths of tasks.vmr with the predictor halved (the 2-D conv stack is ~96% of the official compute and
# XLA:CPU's 9x9 convolutions are slow: at predictor 64 one JAX step takes ~100 s on 2 busy cores).
CPU_WIDTHS = {"joint_space": 64, "featpool_hidden": 64, "predictor_hidden": 32, "ffn_dim": 128}
# Official test splits (videos, queries) and the query-count profile of the synthetic videos: mean queries per
# video of the real split, and a largest count (assumed, not read from the files; it fixes the query slots,
# rounded up to data.query_capacity_multiple).
TEST_SPLITS = {"activitynet": (4917, 17031), "tacos": (25, 4083), "charades": (1334, 3720)}
QUERY_PROFILE = {"activitynet": (3.46, 24), "tacos": (163.0, 240), "charades": (2.79, 12)}
DURATIONS = {"activitynet": (30.0, 200.0), "tacos": (120.0, 360.0), "charades": (15.0, 45.0)}
CPU_EVAL_VIDEOS = {"activitynet": 48, "tacos": 4, "charades": 96}
RETENTION_LENGTHS = (1024, 2048, 4096)
MODULE = "benchmarks.vmr"


# ================================================================================================ data
def _config(spec):
    from jaxprvr.config import apply_overrides, load_config

    over = [f"model.{k}={v}" for k, v in (spec.get("widths") or {}).items()]
    if spec.get("batch"):
        over.append(f"train.batch_size={spec['batch']}")
        over.append(f"data.eval_batch_size={spec['batch']}")
    if spec.get("compute_dtype"):
        over.append(f"model.compute_dtype={spec['compute_dtype']}")
    return apply_overrides(load_config(spec["config"]), over)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _query_counts(rng, config: str, n: int) -> np.ndarray:
    mean, cap = QUERY_PROFILE[config]
    if config == "tacos":
        c = np.rint(rng.normal(mean, 0.25 * mean, n))
    else:
        c = 1 + rng.poisson(mean - 1, n)
    return np.clip(c, 1, cap).astype(np.int64)


class MemorySplit:
    """A moment-retrieval split in memory with the interface ``jaxprvr.data.mmn_format.eval_batches`` reads
    (``len``, ``max_queries``, ``record(i)``): random unit-norm clip rows at the official widths, query counts from
    the split's profile (ActivityNet 3.46 per video, TACoS 163, Charades 2.79), durations and GT spans drawn
    uniformly (queries in rank order). The first video holds the profile's largest query count,
    so the query slots are the real split's."""

    def __init__(self, cfg, config: str, n_videos: int, seed: int = 0):
        from jaxprvr.data.mmn_format import VMRRecord

        m = cfg.model
        rng = np.random.default_rng([seed, 31])
        counts = _query_counts(rng, config, n_videos)
        counts[0] = QUERY_PROFILE[config][1]
        lo, hi = DURATIONS[config]
        self.records = []
        for i, nq in enumerate(counts):
            dur = float(np.round(rng.uniform(lo, hi), 2))
            length = rng.uniform(0.05, 0.6, nq) * dur
            start = rng.uniform(0, 1, nq) * (dur - length)
            mom = np.stack([start, start + length], 1).astype(np.float32)
            mom = mom[np.argsort(mom[:, 0], kind="stable")]
            self.records.append(VMRRecord(
                index=i, vid=f"v{i:05d}", feats=_unit_rows(rng.standard_normal((m.num_pre_clips, m.input_size))),
                queries=_unit_rows(rng.standard_normal((int(nq), m.text_dim))), moments=mom, duration=dur,
                query_ids=tuple(f"v{i:05d}_{k}" for k in range(nq))))
        self.max_queries = int(counts.max())
        self.n_queries = int(counts.sum())

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int):
        return self.records[i]


def train_batches(cfg, config: str, n: int = 3) -> list[dict]:
    """``n`` training batches of ``train.batch_size`` videos in the layout of ``tasks.vmr`` (query slots fixed
    by the split's largest count; query counts per video differ between batches)."""
    from jaxprvr.data.mmn_format import collate, q_slots

    bs = cfg.train.batch_size
    split = MemorySplit(cfg, config, n * bs, seed=1)
    slots = q_slots(split, cfg)
    return [collate(split.records[k * bs:(k + 1) * bs], bs, slots, cfg.model.num_clips) for k in range(n)]


# ================================================================================================ weights
def torch_to_flax(cfg, sd: dict) -> tuple[dict, dict]:
    """An official ``state_dict`` (numpy arrays) -> ``(params, batch_stats)`` through
    ``jaxprvr.models.mrnet.official_key_table`` (the parity converter's table; ``parity/mrnet.py`` is the
    checked one)."""
    from jaxprvr.models.mrnet import official_key_table

    trees = {"params": {}, "batch_stats": {}}
    for key, coll, path, kind in official_key_table(cfg.model):
        if not coll:
            continue
        x = np.asarray(sd[key])
        if kind == "linear":
            x = x.T
        elif kind == "conv1d":
            x = x.transpose(2, 1, 0)
        elif kind == "conv2d":
            x = x.transpose(2, 3, 1, 0)
        elif kind == "bn_count":
            x = x.astype(np.int32)
        node = trees[coll]
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(x)
    return trees["params"], trees["batch_stats"]


def w_weights(spec) -> dict:
    """The twin with the official initialisation (``torch.manual_seed(0)``), its ``state_dict`` as numpy."""
    import torch

    from torch_ref.mrnet import MRNet as TorchMRNet

    from torch_ref.mrnet import official_batch

    cfg = _config(spec)
    torch.manual_seed(spec.get("seed", 0))
    twin = TorchMRNet(cfg)
    # BatchNorm running statistics from data (cumulative averages over two train-mode forwards, no update of any
    # parameter): with the initial (0, 1) buffers the eval-mode maps collapse (a handful of distinct scores per
    # query, ~1,100 candidates tied), and NMS on ties compares sort orders, not pipelines.
    bns = [m for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    split = MemorySplit(cfg, spec["config"], 2 * min(4, cfg.train.batch_size), seed=9)
    from jaxprvr.data.mmn_format import eval_batches

    dev = torch.device("cuda" if _is_gpu(spec) else "cpu")
    twin.to(dev).train()
    with torch.no_grad(), torch.device(dev):
        for b in list(eval_batches(split, cfg))[:2]:
            twin(_to_dev(official_batch(b), dev))
    for m in bns:
        m.momentum = 0.1
        m.num_batches_tracked.zero_()
    sd = {k: v.detach().cpu().numpy() for k, v in twin.state_dict().items()}
    np.savez(spec["path"], **sd)
    return {"tensors": len(sd), "params": int(sum(p.numel() for p in twin.parameters()))}


# ================================================================================================ JAX workers
def _jax_setup(spec):
    import jax

    from jaxprvr import sharding as shd
    from jaxprvr.models import build_model

    cfg = _config(spec)
    model = build_model(cfg.model)
    mesh = shd.make_mesh(jax.devices()[:1])
    params, stats = torch_to_flax(cfg, _load_weights(spec["weights"]))
    return cfg, model, mesh, shd.replicate(params, mesh), shd.replicate(stats, mesh)


def w_train_jax(spec) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxprvr import sharding as shd
    from jaxprvr.tasks.vmr import BATCH_KEYS
    from jaxprvr.train import make_optimizer, make_train_step

    cfg, model, mesh, params, stats = _jax_setup(spec)
    batches = train_batches(cfg, spec["config"])
    steps_per_epoch = 1000  # epoch 1 throughout: the full loss (before ONLY_IOU), as the torch rows
    tx = make_optimizer(cfg, params, steps_per_epoch)
    state = shd.replicate({"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                           "model_state": {"batch_stats": stats}}, mesh)
    timing, memory = time_jax_train_step(make_train_step(model, cfg, tx, mesh, steps_per_epoch), state, params,
                                         [shd.shard_batch({k: b[k] for k in BATCH_KEYS}, mesh) for b in batches],
                                         spec["repeats"])
    return {**timing, **memory,
            "videos": cfg.train.batch_size,
            "queries": int(np.mean([b["n_queries"].sum() for b in batches])),
            "query_slots": int(batches[0]["queries"].shape[1]), "device_kind": jax.devices()[0].device_kind}


def _jax_forward(model):
    import jax

    def forward(params, model_state, batch):
        outputs, _ = model.apply({"params": params, **model_state}, batch, train=False)
        return {k: outputs[k] for k in ("contrastive_scores", "iou_scores")}

    return jax.jit(forward)


def w_forward_jax(spec) -> dict:
    import jax

    from benchmarks.flops import count_flops
    from jaxprvr import sharding as shd
    from jaxprvr.tasks.vmr import BATCH_KEYS

    cfg, model, mesh, params, stats = _jax_setup(spec)
    split = MemorySplit(cfg, spec["config"], 3 * cfg.data.eval_batch_size, seed=2)
    from jaxprvr.data.mmn_format import eval_batches

    batches = [shd.shard_batch({k: b[k] for k in BATCH_KEYS}, mesh) for b in eval_batches(split, cfg)]
    fwd = _jax_forward(model)
    ms = {"batch_stats": stats}
    fc = count_flops(fwd, params, ms, batches[0])
    rss0 = _rss_now()
    out0, first, own, _ = jax_clocked(lambda: fwd(params, ms, batches[0]))
    med, times = _median_timed(lambda i: fwd(params, ms, batches[(i + 1) % 3]), spec["repeats"],
                               jax.block_until_ready)
    if spec.get("maps_out"):
        np.savez(spec["maps_out"], **{k: np.asarray(v) for k, v in out0.items()})
    return {"seconds": med, "times": times, "compile_s": own, "first_minus_steady_s": max(first - med, 0.0),
            "flops": fc.flops, "videos": cfg.data.eval_batch_size,
            "queries": int(np.mean([int(np.asarray(b["n_queries"]).sum()) for b in batches])),
            "peak_device_bytes": _jax_peak(jax.devices()[0]), "peak_rss_bytes": _peak_rss(), "rss_before": rss0,
            "xla_memory": _jax_memory_analysis(fwd, params, ms, batches[0])}


def w_eval_jax(spec) -> dict:
    import jax

    from benchmarks.flops import count_flops
    from jaxprvr.data.mmn_format import eval_batches
    from jaxprvr.metrics.vmr import predict_moments_padded, vmr_metrics
    from jaxprvr import sharding as shd
    from jaxprvr.tasks.vmr import BATCH_KEYS, Evaluator

    cfg, model, mesh, params, stats = _jax_setup(spec)
    split = MemorySplit(cfg, spec["config"], spec["videos"], seed=3)
    ev = Evaluator(model, cfg, mesh)
    ms = {"batch_stats": stats}
    rss0 = _rss_now()
    res, timing, _, _ = jax_eval_passes(lambda: ev.evaluate(params, split, model_state=ms),
                                        lambda: ev.evaluate(params, split, model_state=ms))
    # Stage times of the same work, run one stage at a time (no overlap): forward, decoding (NMS), metrics.
    d = cfg.data
    host = [dict(b) for b in eval_batches(split, cfg)]
    dev = [shd.shard_batch({k: b[k] for k in BATCH_KEYS}, mesh) for b in host]
    t0 = time.perf_counter()
    outs = [jax.block_until_ready(ev._forward(params, ms, b)) for b in dev]
    fwd_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds, gts = [], []
    for o, b in zip(outs, host):
        p, _ = predict_moments_padded(np.asarray(o["contrastive_scores"]), np.asarray(o["iou_scores"]), ev.mask,
                                      np.asarray(b["duration"], np.float32)[:, None], d.contrastive_score_pow,
                                      d.nms_thresh, d.topk)
        for i in np.flatnonzero(b["video_valid"] > 0):
            nq = int(b["n_queries"][i])
            preds.append(p[i, :nq])
            gts.append(np.asarray(b["moments"][i, :nq], np.float32))
    nms_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res2 = vmr_metrics(np.concatenate(preds, 0), np.concatenate(gts, 0), d.iou_thresholds)
    metrics_s = time.perf_counter() - t0
    fl = count_flops(ev._forward, params, ms, dev[0]).flops * len(dev)
    return {**timing, "forward_s": fwd_s, "nms_s": nms_s, "metrics_s": metrics_s, "flops": fl,
            "official": res["official"], "stages_official_equal": res2["official"] == res["official"],
            "videos": len(split), "queries": split.n_queries, "query_slots": int(host[0]["queries"].shape[1]),
            "R1@0.5": res.get("R1@0.5"), "peak_device_bytes": _jax_peak(jax.devices()[0]),
            "peak_rss_bytes": _peak_rss(), "rss_before": rss0}


def w_retention(spec) -> dict:
    """One (L, impl) cell: forward and forward + backward of the attention alone."""
    import jax
    import jax.numpy as jnp

    from benchmarks.flops import count_flops
    from jaxprvr.ops import retention as R

    L, d, heads, chunk, n_txt = spec["L"], spec["d"], spec["heads"], spec["chunk"], spec["n_txt"]
    rng = np.random.default_rng([L, 5])
    dt = jnp.bfloat16 if spec.get("compute_dtype") == "bfloat16" else jnp.float32
    q, k, v = (jnp.asarray(rng.standard_normal((1, L, d)) / np.sqrt(d), dt) for _ in range(3))
    n = L - n_txt
    decay = R.decay_mask(n, spec["gamma"])
    sparse, _ = R.sparse_mask(jnp.asarray(rng.standard_normal((n * n, 1)), jnp.float32))
    mult = jax.block_until_ready(R.multiplicative_mask(n_txt, decay, sparse, "all", "both"))
    key_valid = jnp.asarray(np.r_[np.ones(n_txt - 3), np.zeros(3), np.ones(n)][None], jnp.float32)
    if spec["impl"] == "parallel":
        def attn(q, k, v):
            return R.masked_attention(q, k, v, mult, key_valid, heads)
    else:
        def attn(q, k, v):
            return R.chunked_attention(q, k, v, mult, key_valid, heads, chunk)
    fwd = jax.jit(attn)
    fb = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2),
                                    argnums=(0, 1, 2)))
    out = {"L": L, "impl": spec["impl"], "chunk": chunk if spec["impl"] == "chunkwise" else None}
    rss0 = _rss_now()
    for name, f in (("fwd", fwd), ("fwd_bwd", fb)):
        jax.block_until_ready(f(q, k, v))
        med, _ = _median_timed(lambda i: f(q, k, v), spec["repeats"], jax.block_until_ready)
        out[f"{name}_s"] = med
        out[f"{name}_xla"] = _jax_memory_analysis(f, q, k, v)
        out[f"{name}_flops"] = count_flops(f, q, k, v).flops
    out["peak_device_bytes"] = _jax_peak(jax.devices()[0])
    out["peak_rss_bytes"] = _peak_rss()
    out["rss_before"] = rss0
    return out


# ================================================================================================ torch workers
def _torch_setup(spec):
    import torch

    from torch_ref.mrnet import MRNet as TorchMRNet

    torch.manual_seed(0)
    _torch_cpu_setup(spec)
    cfg = _config(spec)
    dev = torch.device("cuda" if _is_gpu(spec) else "cpu")
    with torch.device(dev):  # the twin builds some masks without a device argument
        twin = TorchMRNet(cfg)
    compiled, sync = load_twin(twin, spec["weights"], dev, spec["framework"])
    return cfg, twin, torch.compile(twin) if compiled else twin, dev, compiled, sync


def _to_dev(batch: dict, dev) -> dict:
    import torch

    return {k: ([x.to(dev) for x in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else
                v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}


def w_train_torch(spec) -> dict:
    import torch

    from torch_ref.mrnet import official_batch, official_optimizer, official_train_step

    cfg, twin, run, dev, compiled, sync = _torch_setup(spec)
    batches = [_to_dev(official_batch(b), dev) for b in train_batches(cfg, spec["config"])]
    opt, _ = official_optimizer(twin, cfg)
    n_params = sum(p.numel() for p in twin.parameters())

    losses = []

    def call(i):
        with torch.device(dev):
            losses.append(official_train_step(run, opt, batches[i % 3], 1, cfg)["loss"])
            return losses[-1]

    warm = 3 if compiled else 1
    _say(f"torch train ({spec['framework']}): {n_params} params; {warm} warm-up call(s)")
    timing, memory = time_torch_steps(call, sync, dev, compiled, warm, spec["repeats"])
    return {**timing, "params": int(n_params), "loss": losses[-1], **memory}


def w_forward_torch(spec) -> dict:
    import torch

    from jaxprvr.data.mmn_format import eval_batches
    from torch_ref.mrnet import official_batch

    cfg, twin, run, dev, compiled, sync = _torch_setup(spec)
    split = MemorySplit(cfg, spec["config"], 3 * cfg.data.eval_batch_size, seed=2)
    batches = [_to_dev(official_batch(b), dev) for b in eval_batches(split, cfg)]
    twin.eval()

    def call(i):
        with torch.no_grad(), torch.device(dev):
            return run(batches[i % 3])

    rss0 = _rss_now()
    warm = 3 if compiled else 1
    t0 = time.perf_counter()
    outs = [call(i) for i in range(warm)]
    sync(None)
    first = time.perf_counter() - t0
    own, frames = _torch_compile_clock() if compiled else (None, None)
    med, times = _median_timed(lambda i: call(i + warm), spec["repeats"], sync)
    if spec.get("maps_out"):
        _, _, con, iou = outs[0]
        _save_ragged(spec["maps_out"], con, iou)
    return {"seconds": med, "times": times, "compile_s": own, "compiled_frames": frames,
            "first_minus_steady_s": max(first - warm * med, 0.0), "peak_device_bytes": _torch_peak(dev),
            "peak_rss_bytes": _peak_rss(), "rss_before": rss0}


def _save_ragged(path, con, iou) -> None:
    arrays = {}
    for i, (c, u) in enumerate(zip(con, iou)):
        arrays[f"c{i}"] = c.detach().cpu().numpy()
        arrays[f"u{i}"] = u.detach().cpu().numpy()
    np.savez(path, **arrays)


def w_eval_torch(spec) -> dict:
    import torch

    import torch_ref.vmr_eval as VE
    from jaxprvr.data.mmn_format import eval_batches
    from torch_ref.mrnet import official_batch

    cfg, twin, run, dev, compiled, sync = _torch_setup(spec)
    split = MemorySplit(cfg, spec["config"], spec["videos"], seed=3)
    d = cfg.data
    records = [{"duration": r.duration, "moments": r.moments} for r in split.records]
    nms_clock = {"s": 0.0}
    official_nms = VE.nms

    def timed_nms(*a, **k):  # the official loop, timed (official_evaluate looks nms up in its module)
        t0 = time.perf_counter()
        out = official_nms(*a, **k)
        nms_clock["s"] += time.perf_counter() - t0
        return out

    VE.nms = timed_nms

    def one_pass():
        nms_clock["s"] = 0.0
        t0 = time.perf_counter()
        with torch.device(dev):
            preds = VE.official_inference(run, (_to_dev(official_batch(b), dev) for b in eval_batches(split, cfg)))
        sync(None)
        t1 = time.perf_counter()
        res = VE.official_evaluate(records, preds, d.nms_thresh, d.iou_thresholds, d.contrastive_score_pow)
        t2 = time.perf_counter()
        return res, t1 - t0, t2 - t1

    rss0 = _rss_now()
    _, f_fwd, f_ev = one_pass()
    own, frames = _torch_compile_clock() if compiled else (None, None)
    _say(f"torch eval first pass {f_fwd + f_ev:.1f} s")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res, fwd_s, ev_s = one_pass()
    nms_s = nms_clock["s"]
    return {"end_to_end_s": fwd_s + ev_s, "first_end_to_end_s": f_fwd + f_ev,
            "first_minus_steady_s": max(f_fwd + f_ev - fwd_s - ev_s, 0.0), "compile_s": own,
            "compiled_frames": frames, "forward_s": fwd_s, "nms_s": nms_s, "metrics_s": ev_s - nms_s,
            "official": res, "videos": len(split), "queries": split.n_queries, "peak_device_bytes": _torch_peak(dev),
            "peak_rss_bytes": _peak_rss(), "rss_before": rss0, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ one conv layer
def conv_layers(cfg, batch: int) -> list[dict]:
    """ProposalConv's first two layers at ``cfg``'s widths (proposal_conv.py L25-32): layer 0, k x k,
    joint_space -> predictor_hidden with padding (k-1)L/2 on the N x N map; layer 1, predictor_hidden ->
    predictor_hidden without padding on layer 0's output (layers 2.. are the same on smaller maps)."""
    m = cfg.model
    k, pad = m.predictor_kernel, (m.predictor_kernel - 1) * m.predictor_layers // 2
    h1 = m.num_clips + 2 * pad - (k - 1)
    return [{"layer": 0, "B": batch, "H": m.num_clips, "Cin": m.joint_space, "Cout": m.predictor_hidden, "K": k,
             "pad": pad},
            {"layer": 1, "B": batch, "H": h1, "Cin": m.predictor_hidden, "Cout": m.predictor_hidden, "K": k, "pad": 0}]


def _conv_rows(x, w):
    """A k x k VALID conv (NHWC, HWIO) as k matmuls over a row-shifted im2col of width k*C: the same sum as
    ``lax.conv_general_dilated`` (float32 rounding apart), written with dot_general only."""
    import jax.numpy as jnp

    k = w.shape[0]
    ho, wo = x.shape[1] - k + 1, x.shape[2] - k + 1
    xs = jnp.concatenate([x[:, :, dx:dx + wo, :] for dx in range(k)], -1)  # (B, H, Wo, k*C)
    y = None
    for dy in range(k):
        t = jnp.einsum("bhwc,co->bhwo", xs[:, dy:dy + ho], w[dy].reshape(k * x.shape[-1], w.shape[-1]))
        y = t if y is None else y + t
    return y


def w_conv(spec) -> dict:
    """ProposalConv's layers 0 and 1 alone, forward and forward + backward (d/dx and d/dw of sum(y^2)). JAX: the
    convolution as the model writes it (``nn.Conv``: ``lax.conv_general_dilated`` with the padding inside),
    layer 0 also as ``jnp.pad`` + an unpadded convolution, layer 1 also as k row-shifted matmuls; torch:
    ``F.conv2d`` (oneDNN on CPU, cuDNN on GPU)."""
    out = {"layers": []}
    for L in spec["layers"]:
        B, H, ci, co, K, pad = L["B"], L["H"], L["Cin"], L["Cout"], L["K"], L["pad"]
        rng = np.random.default_rng(7)
        x = rng.standard_normal((B, H, H, ci)).astype(np.float32)
        w = (rng.standard_normal((K, K, ci, co)) / np.sqrt(K * K * ci)).astype(np.float32)
        ho = H + 2 * pad - K + 1
        res = {**L, "flops_fwd": 2.0 * B * ho * ho * K * K * ci * co, "rows": []}
        if spec["framework"] == "jax":
            import jax
            import jax.numpy as jnp

            def xla(x, w, pad=pad):
                return jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)],
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

            def padded_first(x, w, pad=pad):
                return xla(jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), w, 0)

            forms = [("XLA conv, padding inside (as nn.Conv)", xla)]
            forms.append(("jnp.pad + unpadded XLA conv", padded_first) if pad else
                         ("k row-shifted matmuls (dot_general)", _conv_rows))
            xj, wj = jnp.asarray(x), jnp.asarray(w)
            ref = np.asarray(jax.jit(xla)(xj, wj))
            for form, fn in forms:
                f = jax.jit(fn)
                g = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w) ** 2), (0, 1)))
                row = {"form": form, "max_abs_diff": float(np.abs(np.asarray(f(xj, wj)) - ref).max())}
                for name, h in (("fwd", f), ("fwd_bwd", g)):
                    jax.block_until_ready(h(xj, wj))
                    row[f"{name}_s"], _ = _median_timed(lambda i, h=h: h(xj, wj), spec["repeats"],
                                                        jax.block_until_ready)
                res["rows"].append(row)
        else:
            import torch

            _torch_cpu_setup(spec)
            dev = "cuda" if _is_gpu(spec) else "cpu"
            xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev).requires_grad_(True)
            wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().to(dev).requires_grad_(True)
            sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)

            def fwd(i):
                with torch.no_grad():
                    return torch.nn.functional.conv2d(xt, wt, padding=pad)

            def fb(i):
                return torch.autograd.grad((torch.nn.functional.conv2d(xt, wt, padding=pad) ** 2).sum(), (xt, wt))

            row = {"form": "F.conv2d (oneDNN on CPU, cuDNN on GPU)"}
            for name, h in (("fwd", fwd), ("fwd_bwd", fb)):
                h(0)
                sync(None)
                row[f"{name}_s"], _ = _median_timed(h, spec["repeats"], sync)
            res["rows"].append(row)
        out["layers"].append(res)
    return out


# ------------------------------------------------------------------------------------------------ where time goes
COMPONENTS = ("conv stack (kxk convs)", "BatchNorm", "conv masks/ReLU + 1x1 heads", "proposal map + scores",
              "TransRet", "featpool + input/text projections", "loss", "optimizer + other")


def component_of(op_name: str) -> str:
    """The model component of one XLA op, from its ``op_name`` metadata (``jit(step)/jvp(MRNet)/proposal_conv/
    convs_0/conv_general_dilated``; the backward pass under ``transpose(jvp(MRNet))``)."""
    if "proposal_conv" in op_name:
        if "/convs_" in op_name:
            return COMPONENTS[0]
        if "/bn_" in op_name:
            return COMPONENTS[1]
        return COMPONENTS[2]
    if "trans_ret" in op_name:
        return COMPONENTS[4]
    if any(m in op_name for m in ("featpool", "input_vid_proj", "text_encoder", "text_out")):
        return COMPONENTS[5]
    if "MRNet" in op_name:
        return COMPONENTS[3]
    if "loss_fn" in op_name or "mrnet_loss" in op_name or "jvp(" in op_name:
        return COMPONENTS[6]
    return COMPONENTS[7]


def w_profile_jax(spec) -> dict:
    """The JAX train step and eval forward traced (``jax.profiler``), XLA op time summed per model component
    (thread time: on CPU XLA runs independent ops concurrently, so shares are what matter)."""
    import jax
    import jax.numpy as jnp

    from benchmarks.profile_step import hlo_op_names, op_seconds, traced
    from jaxprvr import sharding as shd
    from jaxprvr.tasks.vmr import BATCH_KEYS
    from jaxprvr.train import make_optimizer, make_train_step, train_keys

    cfg, model, mesh, params, stats = _jax_setup(spec)
    batches = [shd.shard_batch({k: b[k] for k in BATCH_KEYS}, mesh) for b in train_batches(cfg, spec["config"])]
    tx = make_optimizer(cfg, params, 1000)
    state = shd.replicate({"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                           "model_state": {"batch_stats": stats}}, mesh)
    step = make_train_step(model, cfg, tx, mesh, 1000)
    keys = train_keys(0)
    fwd = _jax_forward(model)
    ms = {"batch_stats": stats}
    # The forward first: the train step donates its state (whose arrays the forward's params share).
    programs = {"forward": (fwd, lambda st, i: (st, fwd(params, ms, batches[i % 3]))),
                "train step": (step, lambda st, i: step(st, batches[i % 3], keys))}
    out = {}
    for name, (fn, call) in programs.items():
        args = (state, batches[0], keys) if name == "train step" else (params, ms, batches[0])
        names = hlo_op_names(fn.lower(*args).compile().as_text())
        st = state
        for i in range(2):
            st, _ = call(st, i)
        jax.block_until_ready(st)
        events, (st, _), wall = traced(lambda st=st: call(st, 0))
        state = st if name == "train step" else state
        comp, kinds, ops = op_seconds(events, names, component_of, 140)
        out[name] = {"traced_wall_s": wall, "components_s": dict(comp), "kinds_s": dict(kinds),
                     "top_ops_s": dict(ops.most_common(12))}
    return out


def w_profile_torch(spec) -> dict:
    """One eager official_train_step and one eval forward under ``torch.profiler``: self CPU time per aten op,
    grouped (convolution forward/backward, BatchNorm, everything else)."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity

    from jaxprvr.data.mmn_format import eval_batches
    from torch_ref.mrnet import official_batch, official_optimizer, official_train_step

    cfg, twin, run, dev, compiled, sync = _torch_setup(spec)
    tb = [_to_dev(official_batch(b), dev) for b in train_batches(cfg, spec["config"])]
    opt, _ = official_optimizer(twin, cfg)
    split = MemorySplit(cfg, spec["config"], cfg.data.eval_batch_size, seed=2)
    eb = [_to_dev(official_batch(b), dev) for b in eval_batches(split, cfg)]

    def step(i):
        return official_train_step(run, opt, tb[i % 3], 1, cfg)

    def forward(i):
        twin.eval()
        with torch.no_grad():
            return run(eb[0])

    out = {}
    for name, call in (("train step", step), ("forward", forward)):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        prof, wall = torch_profiled(call, sync, acts)
        groups, per_op = collections.Counter(), collections.Counter()
        for ev in prof.key_averages():
            t = (ev.self_device_time_total if dev.type == "cuda" else ev.self_cpu_time_total) / 1e6
            key = ev.key
            if key.startswith("aten::"):
                per_op[key] += t
            if "convolution_backward" in key:
                groups["convolution backward"] += t
            elif "conv" in key:
                groups["convolution forward"] += t
            elif "batch_norm" in key:
                groups["BatchNorm"] += t
            elif key.startswith("aten::"):
                groups["other aten ops"] += t
        # aten self times are wall time on the calling thread: the rest of the wall time is Python and dispatch.
        groups["Python + dispatch (wall - aten self time)"] = max(wall - sum(groups.values()), 0.0)
        out[name] = {"traced_wall_s": wall, "groups_s": dict(groups), "top_ops_s": dict(per_op.most_common(12))}
    return out


WORKERS = {"weights": w_weights, "conv": w_conv, "profile_jax": w_profile_jax, "profile_torch": w_profile_torch,
           "train_jax": w_train_jax, "train_torch": w_train_torch,
           "forward_jax": w_forward_jax, "forward_torch": w_forward_torch, "eval_jax": w_eval_jax,
           "eval_torch": w_eval_torch, "retention": w_retention}


# ================================================================================================ report
def report(results: dict) -> str:
    size = results["size"]
    widths = ", ".join(f"{k} {v}" for k, v in (results.get("widths") or {}).items()) or "official widths"
    lines = [f"# benchmarks.vmr — {results['device_desc']}",
             f"config `{results['config']}`, size `{size}` ({widths}), conv/matmul precision: "
             f"{results['precision_desc']}, {results['date']}, load average at start "
             f"{results['loadavg_start'][0]:.2f}", ""]
    train = results.get("train")
    if train:
        j = train.get("jax", {})
        lines += [f"## Training step ({j.get('videos', '?')} videos, {j.get('queries', '?')} queries per batch, "
                  f"{j.get('query_slots', '?')} query slots; {_n(j.get('params'))} parameters)", "",
                  "| framework | step (median) | videos/s | JAX ÷ PyTorch speed | GFLOP/step | achieved GFLOP/s | "
                  "compile (compiler's own) | first call(s) − steady | peak memory | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

        def train_cells(fw, r):
            s, fl = r["seconds"], j.get("flops")
            return (f"{_fmt_s(s)} | {j.get('videos', 0) / s:.2f} | {_speed(fw, train, 'seconds')} | "
                    f"{fl / 1e9 if fl else 0:.1f} | {fl / s / 1e9 if fl else 0:.1f} | {_fmt_s(r.get('compile_s'))} | "
                    f"{_fmt_s(r.get('first_minus_steady_s'))}")

        lines += section_rows(train, 10, train_cells)
        lines += ["", target_line(results, "train", _ratio_val(train, "seconds"), "Train target", "JAX ÷ torch eager"),
                  ""]
    ev = results.get("eval")
    if ev:
        j = ev.get("jax", {})
        lines += [f"## Test evaluation end to end ({j.get('videos', '?')} videos, {j.get('queries', '?')} queries; "
                  "forward + NMS + R@k/mIoU, same weights)", "",
                  "| framework | forward | NMS / decoding | metrics | end to end, steady | JAX ÷ PyTorch | "
                  "end to end, first pass | JAX ÷ PyTorch, first pass | compile (compiler's own) | peak memory | "
                  "load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        lines += section_rows(ev, 11, lambda fw, r: f"{_fmt_s(r['forward_s'])} | {_fmt_s(r['nms_s'])} | "
                                                    f"{_fmt_s(r['metrics_s'])} | {passes_cells(fw, ev, r)}")
        lines += ["", "JAX stages are the same work run one stage at a time after the two passes (forward of every "
                  "batch; predict_moments_padded = scores + top-k NMS; vmr_metrics); the end-to-end Evaluator "
                  "overlaps the host decoding with the device. Torch: official_inference; the official nms() loop "
                  "(timed inside official_evaluate); the rest of official_evaluate (scores, candidates, recall).",
                  "", target_line(results, "eval", _ratio_val(ev, "end_to_end_s"), *EVAL_TARGET), ""]
        for line in results.get("eval_equal", []):
            lines.append(line)
        lines.append("")
    fwd = results.get("forward")
    if fwd:
        j = fwd.get("jax", {})
        lines += [f"## Model forward only ({j.get('videos', '?')} videos, ~{j.get('queries', '?')} queries, eval "
                  "mode, no gradient)", "",
                  "| framework | forward (median) | JAX ÷ PyTorch speed | GFLOP | achieved GFLOP/s | compile | "
                  "max abs score diff vs JAX | peak memory | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]

        def forward_cells(fw, r):
            fl, diff = j.get("flops"), r.get("max_abs_diff_vs_jax")
            return (f"{_fmt_s(r['seconds'])} | {_speed(fw, fwd, 'seconds')} | {fl / 1e9 if fl else 0:.1f} | "
                    f"{fl / r['seconds'] / 1e9 if fl else 0:.1f} | {_fmt_s(r.get('compile_s'))} | "
                    f"{'-' if diff is None else f'{diff:.2e}'}")

        lines += section_rows(fwd, 9, forward_cells)
        lines.append("")
    ret = results.get("retention")
    if ret:
        cfgr = ret.get("setup", {})
        lines += [f"## Retention attention alone, JAX: parallel vs chunkwise (d {cfgr.get('d')}, {cfgr.get('heads')} "
                  f"heads, one sequence of L tokens ({cfgr.get('n_txt')} text), chunk {cfgr.get('chunk')}, "
                  f"{cfgr.get('dtype', 'float32')})", "",
                  "| L | form | forward | fwd + bwd | chunkwise ÷ parallel time (fwd+bwd) | XLA temp, fwd | "
                  "XLA temp, fwd + bwd | peak memory (process/device) | load |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        by_l = {}
        for r in ret.get("rows", []):
            by_l.setdefault(r.get("L"), {})[r.get("impl")] = r
        for L, impls in by_l.items():
            for impl, r in impls.items():
                if not r.get("ok"):
                    lines.append(f"| {L} | {impl} | failed: {_cell(r.get('error', '?'))} | | | | | | {_load(r)} |")
                    continue
                par = impls.get("parallel", {})
                rel = _ratio(r["fwd_bwd_s"], par.get("fwd_bwd_s")) if impl == "chunkwise" and par.get("ok") else "-"
                lines.append(f"| {L} | {impl} | {_fmt_s(r['fwd_s'])} | {_fmt_s(r['fwd_bwd_s'])} | {rel} | "
                             f"{_fmt_b((r.get('fwd_xla') or {}).get('temp'))} | "
                             f"{_fmt_b((r.get('fwd_bwd_xla') or {}).get('temp'))} | {_fmt_b(_mem(r))} | {_load(r)} |")
        lines.append("")
    conv = results.get("conv")
    if conv:
        lines += ["## ProposalConv layers alone (forward; forward + backward = d/dx and d/dw)", "",
                  "| layer | framework | form | forward | GFLOP/s | fwd + bwd | GFLOP/s | load |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for fw in ("jax", "torch"):
            r = conv.get(fw, {})
            if not r.get("ok"):
                lines.append(f"| | {fw} | failed: {_cell(r.get('error', '?'))} | | | | | {_load(r)} |")
                continue
            for lay in r["layers"]:
                desc = (f"{lay['layer']}: {lay['K']}×{lay['K']}, {lay['Cin']}→{lay['Cout']}, {lay['B']} maps "
                        f"{lay['H']}×{lay['H']}, padding {lay['pad']}")
                fl = lay["flops_fwd"]
                for row in lay["rows"]:
                    lines.append(f"| {desc} | {FW_LABEL.get(fw, fw)} | {row['form']} | {_fmt_s(row['fwd_s'])} | "
                                 f"{fl / row['fwd_s'] / 1e9:.1f} | {_fmt_s(row['fwd_bwd_s'])} | "
                                 f"{3 * fl / row['fwd_bwd_s'] / 1e9:.1f} | {_load(r)} |")
        lines += ["", "fwd + bwd GFLOP/s counts 3× the forward FLOPs (forward, d/dx, d/dw).", ""]
    prof = results.get("profile")
    if prof:
        lines += ["## Where time goes (one traced call)", ""]
        pj, pt = prof.get("jax", {}), prof.get("torch", {})
        if pj.get("ok"):
            lines += ["JAX (XLA op time per model component, summed over threads; shares):", "",
                      "| component | train step | forward |", "|---|---:|---:|"]
            tot = {k: sum(pj[k]["components_s"].values()) or 1.0 for k in ("train step", "forward")}
            for c in COMPONENTS:
                vals = [pj[k]["components_s"].get(c, 0.0) for k in ("train step", "forward")]
                cells = [f"{v:.2f} s ({100 * v / tot[k]:.0f}%)" for v, k in zip(vals, ("train step", "forward"))]
                lines.append(f"| {c} | {cells[0]} | {cells[1]} |")
            lines.append(f"| traced wall time | {_fmt_s(pj['train step']['traced_wall_s'])} | "
                         f"{_fmt_s(pj['forward']['traced_wall_s'])} |")
            lines.append("")
        elif pj:
            lines += [f"JAX profile failed: {_cell(pj.get('error', '?'))}", ""]
        if pt.get("ok"):
            lines += ["torch eager (aten self time on the calling thread; the rest of the wall time is Python and "
                      "dispatch):", "", "| group | train step | forward |", "|---|---:|---:|"]
            keys = sorted(set(pt["train step"]["groups_s"]) | set(pt["forward"]["groups_s"]))
            for g in keys:
                cells = []
                for k in ("train step", "forward"):
                    v = pt[k]["groups_s"].get(g, 0.0)
                    cells.append(f"{v:.2f} s ({100 * v / (pt[k]['traced_wall_s'] or 1):.0f}%)")
                lines.append(f"| {g} | {cells[0]} | {cells[1]} |")
            lines.append(f"| traced wall time | {_fmt_s(pt['train step']['traced_wall_s'])} | "
                         f"{_fmt_s(pt['forward']['traced_wall_s'])} |")
            lines.append("")
        elif pt:
            lines += [f"torch profile failed: {_cell(pt.get('error', '?'))}", ""]
    if "memory" in results.get("sections", []):
        lines += ["## Peak memory", "", "| section | framework | peak (process RSS on CPU, device on GPU) | "
                  "above the worker's baseline before the first call | XLA plan (args + out + temp) |",
                  "|---|---|---:|---:|---:|"]
        for section in ("train", "forward", "eval"):
            lines += [memory_row(section, fw, r) for fw, r in (results.get(section) or {}).items() if r.get("ok")]
        if not any(results.get(s) for s in ("train", "forward", "eval")):
            lines.append("| (no train/forward/eval section in this run) | | | | |")
        lines.append("")
    return "\n".join(lines)


def _n(x) -> str:
    return "?" if not x else f"{x / 1e6:.2f}M"


def eval_equal_lines(ev: dict) -> list[str]:
    diffs = metric_diffs(ev, "official")
    if diffs is None:
        return [NO_JAX_EVAL]
    lines = []
    for fw, a, differ in diffs:
        r1 = a.get("R@1,IoU@0.5") if "R@1,IoU@0.5" in a else next(iter(a.values()))
        if fw == "jax_bf16":
            worst = max((abs((x or 0) - (y or 0)) for x, y in differ.values()), default=0.0)
            lines.append(f"eval metrics, JAX bf16 vs JAX float32 (not expected equal): {len(differ)} of {len(a)} "
                         f"official values differ, largest by {worst:.2e}")
        elif differ:
            worst = max(abs((x or 0) - (y or 0)) for x, y in differ.values())
            lines.append(f"eval metrics equal (JAX vs {FW_LABEL.get(fw, fw)}): NO: {len(differ)} of {len(a)} official "
                         f"values differ (largest {worst:.2e}): {differ}")
        else:
            lines.append(f"eval metrics equal (JAX vs {FW_LABEL.get(fw, fw)}): EQUAL: all {len(a)} official values "
                         f"identical (R@1,IoU@0.5 = {r1:.6f}, Best_R1 {a.get('Best_R1', float('nan')):.6f})")
    if not ev["jax"].get("stages_official_equal", True):
        lines.append("note: the JAX stage-by-stage rerun did not reproduce the Evaluator's metrics")
    return lines


# ================================================================================================ driver
def _spec_base(args, device, size, cfg_name) -> dict:
    base = {"device": device, "config": cfg_name, "repeats": args.repeats,
            "precision": None if args.precision == "default" else args.precision}
    if size == "cpu":
        base["widths"] = dict(CPU_WIDTHS)
    if args.batch:
        base["batch"] = args.batch
    return base


def _maps_diff(ref_path, other_path) -> float | None:
    """Largest |difference| between JAX's score maps of the first forward batch and a torch column's."""
    if not (os.path.exists(ref_path) and os.path.exists(other_path)):
        return None
    ref = np.load(ref_path)
    other = np.load(other_path)
    n = len([k for k in other.files if k.startswith("c")])
    worst = 0.0
    for i in range(n):
        c, u = other[f"c{i}"], other[f"u{i}"]
        nq = c.shape[0]
        worst = max(worst, float(np.abs(ref["contrastive_scores"][i, :nq] - c).max()),
                    float(np.abs(ref["iou_scores"][i, :nq] - u).max()))
    return worst


def _run(args, sections, base, device, results, log, scratch) -> None:
    fws_torch = ["torch"] + (["torch_compile"] if args.torch_compile == "on" else [])
    jax_fws = ["jax"] + (["jax_bf16"] if args.bf16 else [])
    need_weights = any(s in sections for s in ("train", "eval", "forward", "profile"))
    weights = os.path.join(scratch, "weights.npz")
    deferred = []
    if need_weights:
        made = run_worker({**base, "task": "weights", "path": weights}, args.timeout, log, module=MODULE)
        results["weights"] = made
        if not made.get("ok"):
            for s in ("train", "eval", "forward"):
                if s in sections:
                    results[s] = {"jax": {"ok": False, "error": f"weights: {made.get('error')}"}}
            sections = [s for s in sections if s not in ("train", "eval", "forward")]

    def spec(section, fw, **kw):
        s = {**base, "task": f"{section}_{'jax' if fw.startswith('jax') else 'torch'}", "framework": fw,
             "weights": weights, **kw}
        if fw == "jax_bf16":
            s["compute_dtype"] = "bfloat16"
        return s

    maps = {}

    def section_spec(section, fw):
        kw = {}
        if section == "eval":
            kw["videos"] = args.eval_videos
        if section == "forward":
            maps[fw] = kw["maps_out"] = os.path.join(scratch, f"maps-{fw}.npz")
        return spec(section, fw, **kw)

    def after(section):  # the section's comparisons with JAX
        if section == "forward":
            _forward_diffs(results, maps)
        if section == "eval":
            _eval_equal(results)

    for section in ("train", "forward", "eval"):
        if section not in sections:
            continue
        results[section] = {}
        run_columns(results[section], jax_fws + fws_torch, lambda fw, section=section: section_spec(section, fw),
                    deferred, section, args.timeout, log, args.out, results, module=MODULE)
        after(section)
    if "conv" in sections:
        layers = conv_layers(_config(base), args.conv_batch or _config(base).train.batch_size)
        results["conv"] = {fw: run_worker({**base, "task": "conv", "framework": fw, "layers": layers},
                                          args.timeout, log, module=MODULE) for fw in ("jax", "torch")}
        _save_partial(args.out, results)
    if "profile" in sections and results.get("weights", {}).get("ok"):
        results["profile"] = {fw: run_worker({**base, "task": f"profile_{fw}", "framework": fw, "weights": weights},
                                             args.timeout, log, module=MODULE) for fw in ("jax", "torch")}
        _save_partial(args.out, results)
    if "retention" in sections:
        results["retention"] = _run_retention(args, base, log)
        _save_partial(args.out, results)

    def after_compiled(section):
        after(section)
        _save_partial(args.out, results)

    run_compiled_last(deferred, results, args.compile_timeout or args.timeout, log, MODULE, after_compiled)


def _forward_diffs(results, maps) -> None:
    for fw, r in results["forward"].items():
        if r.get("ok") and fw.startswith("torch"):
            r["max_abs_diff_vs_jax"] = _maps_diff(maps.get("jax", ""), maps.get(fw, ""))


def _eval_equal(results) -> None:
    results["eval_equal"] = eval_equal_lines(results["eval"])
    announce(MODULE, results["eval_equal"])


def _run_retention(args, base, log) -> dict:
    from jaxprvr.config import load_config

    m = load_config(base["config"]).model
    n_txt = 8  # the query slots of an ActivityNet video (3.46 queries on average, rounded up to 8)
    setup = {"d": 256, "heads": 8, "chunk": args.chunk or m.attention_chunk, "n_txt": n_txt, "gamma": m.gamma,
             "dtype": "bfloat16" if args.bf16_retention else "float32"}
    rows = []
    lengths = [m.num_clips + n_txt] + [int(x) for x in args.lengths.split(",") if x]
    for L in lengths:
        for impl in ("parallel", "chunkwise"):
            sp = {"device": base["device"], "precision": base.get("precision"), "task": "retention", "L": L,
                  "impl": impl, "repeats": base["repeats"], **setup}
            if args.bf16_retention:
                sp["compute_dtype"] = "bfloat16"
            rows.append(run_worker(sp, args.timeout, log, module=MODULE))
            rows[-1].setdefault("L", L)
            rows[-1].setdefault("impl", impl)
    return {"setup": setup, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vmr",
                                description="MRNet moment retrieval: JAX vs the PyTorch twin side by side on one "
                                            "device (train step, end-to-end test evaluation, forward, retention "
                                            "parallel vs chunkwise, peak memory); prints markdown tables, writes "
                                            "JSON.")
    p.add_argument("--models", choices=("mrnet", "mesm"), default="mrnet",
                   help="mrnet (this module), or mesm: MESM on Charades-STA vs its twin (benchmarks.vmr_detr; its "
                        "sections train, eval, memory, profile; --config ignored)")
    p.add_argument("--variants", default="cached,clip",
                   help="--models mesm, train section: cached (text features given) and/or clip (the CLIP text "
                        "tower in the step)")
    p.add_argument("--config", choices=CONFIGS, default="activitynet")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma list of {', '.join(SECTIONS)} (default: all but profile)")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None, help="default: gpu if JAX sees one, else cpu")
    p.add_argument("--size", choices=("official", "cpu"), default=None,
                   help="official: the released config; cpu (default on CPU): widths "
                        + ", ".join(f"{k}={v}" for k, v in CPU_WIDTHS.items()) + " and a subset of the test split")
    p.add_argument("--batch", type=int, default=None,
                   help="videos per training and evaluation batch (default: the config's, ANet 12, TACoS 2/4)")
    p.add_argument("--eval-videos", type=int, default=None,
                   help="videos of the in-memory test split (default: the official test split's count on "
                        f"--size official, {CPU_EVAL_VIDEOS} on cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3 CPU, 20 GPU)")
    p.add_argument("--torch-compile", choices=("on", "off"), default="on",
                   help="also time the twin under torch.compile (Inductor; C++ builds on CPU)")
    p.add_argument("--bf16", action="store_true", help="add JAX rows with model.compute_dtype=bfloat16")
    p.add_argument("--bf16-retention", action="store_true", help="the retention section in bfloat16")
    p.add_argument("--matmul-precision", dest="precision", choices=("highest", "tf32", "default"), default=None,
                   help="float32 matmul/conv precision in both frameworks (default: highest on GPU = true float32, "
                        "JAX jax_default_matmul_precision=highest, torch allow_tf32=False; CPU: float32)")
    p.add_argument("--lengths", default=",".join(map(str, RETENTION_LENGTHS)),
                   help="retention section: sequence lengths (the model's own L = N + 8 is added)")
    p.add_argument("--conv-batch", type=int, default=None,
                   help="conv section: maps per layer (default: the training batch)")
    p.add_argument("--chunk", type=int, default=None, help="chunkwise block (default: model.attention_chunk)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement subprocess")
    p.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds per torch.compile subprocess (default: 300 on CPU, --timeout on GPU); one that "
                        "runs out is a failure cell (the forward compiles first; if it fails, the eval and train "
                        "columns are skipped)")
    p.add_argument("--out", default=None, help="write all results as JSON")
    p.add_argument("--log", default=None, help="the workers' stderr (default: a temp file)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker, WORKERS)
    if args.models == "mesm":
        from benchmarks import vmr_detr

        return vmr_detr.main(args)

    device, size = device_defaults(args, 20, 300)
    if args.eval_videos is None:
        args.eval_videos = TEST_SPLITS[args.config][0] if size == "official" else CPU_EVAL_VIDEOS[args.config]
    sections = parse_sections(args.sections, SECTIONS)
    if sections is None:
        return 2
    base = _spec_base(args, device, size, args.config)
    desc = precision_desc(device, args.precision, "true float32 in both: JAX jax_default_matmul_precision=highest, "
                          "torch backends.cuda.matmul.allow_tf32=False, backends.cudnn.allow_tf32=False")
    from jaxprvr.config import load_config

    cfg = load_config(args.config)
    log_path = args.log or tempfile.mkstemp(prefix="benchmarks-vmr-", suffix=".log")[1]
    results = {"device": device, "device_desc": _device_desc(device), "config": args.config, "size": size,
               "widths": base.get("widths"), "precision": args.precision, "precision_desc": desc,
               "batch": args.batch or cfg.train.batch_size, "eval_videos": args.eval_videos,
               "repeats": args.repeats, "sections": sections, "date": time.strftime("%Y-%m-%d %H:%M"),
               "loadavg_start": os.getloadavg(), "log": log_path,
               "targets": {"train": 1.5, "eval": 3.0} if device == "cpu" else {"train": 1.2, "eval": 5.0}}
    return run_sections(results, log_path, "benchmarks-vmr-",
                        lambda log, scratch: _run(args, sections, base, device, results, log, scratch), report,
                        args.out)


if __name__ == "__main__":
    sys.exit(main())
