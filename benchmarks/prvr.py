"""PRVR performance, JAX against the PyTorch twins (``torch_ref``), side by side in one run on one device.

    python -m benchmarks.prvr                                   # CPU: all sections, the "cpu" size preset
    python -m benchmarks.prvr --device gpu --out gpu.json       # GPU: official sizes
    python -m benchmarks.prvr --models gmmformer_v2 --sections train,eval

Sections (``--sections``, default all):

* ``ceiling``: a dense float32 matmul (n x n x n) in each framework, the FLOP/s ceiling the steps are held to.
* ``train``: one optimizer step (forward, the official loss with hard negatives, backward, BertAdam; MTM's EMA
  where the config uses it) of MS-SL, GMMFormer v2 and MTM. JAX: the jitted ``jaxprvr.train.make_train_step``
  (state donated, called through ``jax.jit`` dispatch as the trainer does; the jit cache is checked to hold one
  entry after all timed steps: no per-batch recompilation). PyTorch: the twin in eager mode with
  ``torch_ref.losses.total_loss`` and ``torch_ref.optim.BertAdam``, and the same with ``torch.compile`` on the
  model (the loss, with its official Python loops, stays eager) where it works.
* ``eval``: a TVR-size gallery (2,179 videos, 10,895 queries, synthetic, in memory): gallery encoding, query
  encoding, scoring (``jaxprvr.evaluate.Evaluator`` / ``torch_ref.evaluate.TorchEvaluator``, their real block
  loops and collation), R@K, and the end-to-end sum.
* ``scan``: MTM's selective scan, forward + backward, in JAX's three forms, mamba_ssm's PyTorch reference and
  (on a GPU with mamba_ssm built) the official CUDA kernel (``benchmarks.selective_scan``).
* ``input``: the host input pipeline on an official-format synthetic release (memory-mapped ``feature.bin``,
  hdf5 queries): batches/s of ``train_batches`` alone, behind the background ``prefetch``, and with its
  thread pool (``data.workers``, as ``jaxprvr.train`` runs it), at the official batch size and at the
  benchmark's, set against the JAX step time measured in ``train``.

Method: every measurement runs in its own subprocess (clean peak memory, no cross-talk of thread pools or
allocators), on identical batches built from a fixed seed (3 batches, rotated so caches do not flatter),
with warm-up calls first; each timed call ends with a device synchronisation (``block_until_ready`` /
``torch.cuda.synchronize``); the reported time is the median over ``--repeats``. Compile time is the first
call minus the median. FLOPs are counted analytically from the JAX program's jaxpr (``benchmarks.flops``:
every matmul and convolution of forward, backward and optimizer; the same math for both frameworks), and
"achieved" is FLOPs / median time, also as a fraction of the framework's own matmul ceiling. Peak memory is
the device's peak allocation on GPU (``memory_stats`` / ``max_memory_allocated``) and the process's peak
resident set on CPU (which includes the framework's own footprint).

Sizes: ``--size official`` (default on GPU) uses each config's hidden size and batch; ``--size cpu`` (default
on CPU) uses hidden 128 and 16 videos per batch so that the whole run fits in about 15 minutes on 2 cores.
Input shapes (feature widths, 128 frames, 30 tokens, 32 clips) are the dataset's official ones in both.
Prints markdown tables with JAX / PyTorch ratios and writes everything to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("ms_sl", "gmmformer_v2", "mtm")
SECTIONS = ("ceiling", "train", "eval", "scan", "input")
SIZES = {"cpu": {"hidden": 128, "batch": 16}, "official": {"hidden": None, "batch": None}}
TVR_GALLERY = (2179, 10895)  # TVR test split: videos, queries
POOL_VIDEOS, POOL_QUERIES = 64, 256  # distinct synthetic items the gallery cycles through (memory)


# ================================================================================================ helpers
def _is_gpu(spec) -> bool:
    return spec["device"] == "gpu"


def _config(spec, batch=None):
    from configs import load_config
    from configs.base import DATASETS

    over = [f"model.visual_feat_dim={DATASETS[spec['dataset']]['visual_feat_dim']}",
            f"model.q_feat_size={DATASETS[spec['dataset']]['q_feat_size']}"]
    if spec.get("hidden"):
        over.append(f"model.hidden_size={spec['hidden']}")
    batch = batch or spec.get("batch")
    if batch:
        over.append(f"train.batch_size={batch}")
    if spec.get("compute_dtype"):
        over.append(f"model.compute_dtype={spec['compute_dtype']}")
    if spec.get("branch_impl"):
        over.append(f"model.branch_impl={spec['branch_impl']}")
    return load_config(f"{spec['model']}/{spec['dataset']}", None, over)


def _frame_lengths(rng, dataset: str, n: int, max_ctx_l: int) -> np.ndarray:
    from jaxprvr.data.synthetic import _PROFILES  # the per-dataset statistics of the synthetic releases

    f = np.rint(_PROFILES[dataset].frames_median * np.exp(0.7 * rng.standard_normal(n)))
    return np.clip(f, 1, max_ctx_l).astype(np.int64)


def _query_counts(rng, dataset: str, n: int) -> np.ndarray:
    from jaxprvr.data.synthetic import _PROFILES

    low, k, p = _PROFILES[dataset].queries
    return low + rng.binomial(k, p, size=n)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-5)).astype(np.float32)


def train_batch(cfg, dataset: str, batch: int, seed: int) -> dict:
    """A training batch in the layout of ``jaxprvr.data.train_batches`` (videos sorted by frame count,
    descending; each with all its queries), with random unit-norm features of the official widths."""
    from jaxprvr.train import MODEL_BATCH_KEYS

    m = cfg.model
    rng = np.random.default_rng([seed, 17])
    lens = np.sort(_frame_lengths(rng, dataset, batch, m.max_ctx_l))[::-1]
    counts = _query_counts(rng, dataset, batch)
    nq = int(counts.sum())
    cap = -(-nq // 8) * 8
    frames = np.zeros((batch, m.max_ctx_l, m.visual_feat_dim), np.float32)
    mask = np.zeros((batch, m.max_ctx_l), np.float32)
    for b, n in enumerate(lens):
        frames[b, :n] = _unit_rows(rng.standard_normal((n, m.visual_feat_dim)))
        mask[b, :n] = 1
    q = np.zeros((cap, m.max_desc_l, m.q_feat_size), np.float32)
    qmask = np.zeros((cap, m.max_desc_l), np.float32)
    for j, t in enumerate(rng.integers(6, m.max_desc_l + 1, nq)):
        q[j, :t] = _unit_rows(rng.standard_normal((t, m.q_feat_size)))
        qmask[j, :t] = 1
    labels = np.zeros((cap,), np.int32)
    labels[:nq] = np.repeat(np.arange(batch, dtype=np.int32), counts)
    out = dict(clip_feats=_unit_rows(rng.standard_normal((batch, m.map_size, m.visual_feat_dim))),
               frame_feats=frames, frame_mask=mask, frame_len=lens.astype(np.int32),
               video_valid=np.ones((batch,), np.float32), query_feats=q, query_mask=qmask,
               query_valid=(np.arange(cap) < nq).astype(np.float32), query_labels=labels)
    assert set(out) == set(MODEL_BATCH_KEYS)
    return out


class MemoryGallery:
    """A TVR-size evaluation split held in memory, with the interface both evaluators read
    (``video_item``/``query_item`` and the id lists of :class:`jaxprvr.data.PRVRDataset`). Video ``i`` is
    ``POOL_VIDEOS`` distinct synthetic videos cycled (frame counts from the dataset's profile), so the gallery has
    the real size and the real per-video work without holding 2,179 feature matrices."""

    def __init__(self, cfg, dataset: str, n_videos: int, n_queries: int, seed: int = 0):
        m = cfg.model
        rng = np.random.default_rng([seed, 23])
        self.map_size, self.max_ctx_l, self.max_desc_l = m.map_size, m.max_ctx_l, m.max_desc_l
        self.visual_dim, self.query_dim = m.visual_feat_dim, m.q_feat_size
        self._videos = []
        for n in _frame_lengths(rng, dataset, POOL_VIDEOS, m.max_ctx_l):
            self._videos.append((_unit_rows(rng.standard_normal((m.map_size, m.visual_feat_dim))),
                                 _unit_rows(rng.standard_normal((n, m.visual_feat_dim)))))
        self._queries = [_unit_rows(rng.standard_normal((t, m.q_feat_size)))
                         for t in rng.integers(6, m.max_desc_l + 1, POOL_QUERIES)]
        self.video_ids = [f"v{i}" for i in range(n_videos)]
        self.query_video_index = (np.arange(n_queries) * n_videos // n_queries).astype(np.int32)
        self.cap_ids = [f"v{v}#enc#{j}" for j, v in enumerate(self.query_video_index)]

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_queries(self) -> int:
        return len(self.cap_ids)

    def video_item(self, i: int):
        return self._videos[i % POOL_VIDEOS]

    def query_item(self, j: int):
        return self._queries[j % POOL_QUERIES]


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


# ================================================================================================ workers
def w_ceiling(spec) -> dict:
    n = spec["n"]
    a = np.random.default_rng(0).standard_normal((3, n, n)).astype(np.float32)
    flops = 2.0 * n ** 3
    if spec["framework"] == "jax":
        import jax
        import jax.numpy as jnp

        xs = [jnp.asarray(x) for x in a]
        f = jax.jit(lambda x, y: x @ y)
        jax.block_until_ready(f(xs[0], xs[1]))
        med, _ = _median_timed(lambda i: f(xs[i % 3], xs[(i + 1) % 3]), spec["repeats"], jax.block_until_ready)
        kind = jax.devices()[0].device_kind
        precision = str(jax.config.jax_default_matmul_precision or "default")
    else:
        import torch

        dev = "cuda" if _is_gpu(spec) else "cpu"
        xs = [torch.from_numpy(x).to(dev) for x in a]
        sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
        xs[0] @ xs[1]
        sync(None)
        med, _ = _median_timed(lambda i: xs[i % 3] @ xs[(i + 1) % 3], spec["repeats"], sync)
        kind = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
        precision = f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}" if dev == "cuda" else "float32"
    return {"n": n, "seconds": med, "flops_per_s": flops / med, "device_kind": kind, "precision": precision}


def _jax_peak(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def w_train_jax(spec) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.flops import count_flops
    from jaxprvr import sharding as shd
    from jaxprvr.models import build_model
    from jaxprvr.train import init_params, make_optimizer, make_train_step, train_keys

    cfg = _config(spec)
    batches = [train_batch(cfg, spec["dataset"], cfg.train.batch_size, s) for s in range(3)]
    dev = jax.devices()[0]
    mesh = shd.make_mesh([dev])
    model = build_model(cfg.model)
    params = jax.jit(lambda k: init_params(model, cfg, k))(jax.random.PRNGKey(0))
    tx = make_optimizer(cfg, params, 1000)
    state = shd.replicate({"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}, mesh)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    step = make_train_step(model, cfg, tx, mesh)
    dev_batches = [shd.shard_batch(b, mesh) for b in batches]
    keys, hard = train_keys(0), np.bool_(True)
    _say(f"jax {spec['model']}: {n_params} params, batches ready; tracing for the FLOP count")
    fc = count_flops(step, state, dev_batches[0], keys, hard)
    _say(f"{fc.flops / 1e9:.1f} GFLOP per step; first call (compiles)")
    rss0 = _peak_rss()
    box = {"state": state}

    def call(i):
        box["state"], metrics = step(box["state"], dev_batches[i % 3], keys, hard)
        return metrics["loss"], box["state"]["step"]

    t0 = time.perf_counter()
    jax.block_until_ready(call(0))
    first = time.perf_counter() - t0
    _say(f"first call {first:.1f} s")
    jax.block_until_ready(call(1))
    med, times = _median_timed(lambda i: call(i + 2), spec["repeats"], jax.block_until_ready)
    loss = float(call(0)[0])
    return {"seconds": med, "times": times, "compile_s": max(first - med, 0.0), "flops": fc.flops,
            "jit_cache_entries": step._cache_size(), "params": n_params, "loss": loss,
            "peak_device_bytes": _jax_peak(dev), "peak_rss_bytes": _peak_rss(), "rss_before_steps": rss0,
            "videos": cfg.train.batch_size, "queries": int(sum(b["query_valid"].sum() for b in batches) / 3),
            "device_kind": dev.device_kind}


def w_train_torch(spec) -> dict:
    import torch

    from torch_ref import build_model
    from torch_ref.losses import total_loss
    from torch_ref.optim import EMA, BertAdam, official_param_groups

    torch.manual_seed(0)
    _torch_cpu_setup(spec)
    cfg = _config(spec)
    tc = cfg.train
    dev = torch.device("cuda" if _is_gpu(spec) else "cpu")
    batches = [train_batch(cfg, spec["dataset"], tc.batch_size, s) for s in range(3)]
    # The official collate has no padded queries (the twins' losses read labels as contiguous runs): the
    # torch batches hold the valid queries only; the JAX batches pad them to a multiple of 8 (static shapes).
    tb = [{k: torch.from_numpy(v[: int(b["query_valid"].sum())] if k.startswith("query") else v).to(dev)
           for k, v in b.items()} for b in batches]
    twin = build_model(cfg.model).to(dev)
    n_params = sum(p.numel() for p in twin.parameters())
    opt = BertAdam(official_param_groups(twin, 0.01), lr=tc.lr, warmup=tc.lr_warmup_proportion, t_total=1000,
                   max_grad_norm=tc.max_grad_norm)
    ema = EMA.from_model(twin, tc.ema_decay) if tc.use_ema else None
    fwd = twin
    if spec["framework"] == "torch_compile":
        fwd = torch.compile(twin)
    sync = (lambda _: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda _: None)

    def call(i):
        opt.zero_grad(set_to_none=True)
        scores, aux = fwd(tb[i % 3], train=True)
        loss, _ = total_loss(cfg.model.name, scores, aux, tb[i % 3], cfg.loss, hard=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema(twin, i)
        return loss

    _say(f"torch {spec['model']} ({spec['framework']}): {n_params} params; first call")
    t0 = time.perf_counter()
    sync(call(0))
    first = time.perf_counter() - t0
    _say(f"first call {first:.1f} s")
    rss0 = _peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med, times = _median_timed(lambda i: call(i + 2), spec["repeats"], sync)
    from torch_ref.mamba import load as load_mamba

    scan = None
    if cfg.model.name == "mtm":
        scan = "official CUDA kernel" if load_mamba().cuda_kernels else "selective_scan_ref (PyTorch loop)"
    return {"seconds": med, "times": times, "compile_s": max(first - med, 0.0), "params": int(n_params),
            "peak_device_bytes": int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None,
            "peak_rss_bytes": _peak_rss(), "rss_before_steps": rss0, "mamba_scan": scan,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "flush_denormal": not _is_gpu(spec)}


def _torch_cpu_setup(spec) -> None:
    """On CPU, denormal floats flushed to zero, as XLA:CPU does by default. Without it the twins' backward
    passes run several times slower on this CPU (the Gaussian masks' exp(-x^2) tails and softmax gradients
    produce denormals), which would flatter JAX."""
    import torch

    if not _is_gpu(spec):
        torch.set_flush_denormal(True)


def _sync_tree_torch(x):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


def w_eval(spec) -> dict:
    """Stage times over the TVR-size gallery: warm-up (compiles; first blocks), then one timed pass."""
    cfg = _config(spec)
    ds = MemoryGallery(cfg, spec["dataset"], *spec["gallery"])
    from jaxprvr.metrics.prvr import eval_q2m

    gt = np.asarray(ds.query_video_index)
    warm = MemoryGallery(cfg, spec["dataset"], cfg.data.eval_context_bsz, cfg.data.eval_query_bsz)
    t = {}
    if spec["framework"].startswith("jax"):
        import jax

        from benchmarks.flops import count_flops
        from jaxprvr import sharding as shd
        from jaxprvr.evaluate import Evaluator
        from jaxprvr.models import build_model
        from jaxprvr.train import init_params

        model = build_model(cfg.model)
        params = jax.jit(lambda k: init_params(model, cfg, k))(jax.random.PRNGKey(0))
        ev = Evaluator(model, cfg, shd.make_mesh(jax.devices()[:1]))
        t0 = time.perf_counter()
        ev.encode_gallery(params, warm)  # compiles encode_video / encode_query on their static block shapes
        ev.encode_queries(params, warm)
        t["warmup_encode_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gallery = jax.block_until_ready(ev.encode_gallery(params, ds))
        t["gallery_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        query = jax.block_until_ready(ev.encode_queries(params, ds))
        t["queries_s"] = time.perf_counter() - t0
        qb = cfg.data.eval_query_bsz
        t0 = time.perf_counter()
        ev.score_matrix(params, query[:qb], gallery)  # compiles the score function (full gallery shape)
        t["warmup_score_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mats = ev.score_matrix(params, query, gallery)
        t["score_s"] = time.perf_counter() - t0
        fused = mats["fused"]
        # FLOPs: one traced call of each function times the number of calls the pass made.
        vb = {k: np.asarray(v)[: cfg.data.eval_context_bsz] for k, v in
              next(iter(_video_blocks(ds, cfg.data.eval_context_bsz))).items()}
        qblk = {k: v for k, v in next(iter(_query_blocks(ds, qb))).items()}
        enc_v = count_flops(ev._encode_video, params, vb).flops * -(-ds.num_videos // cfg.data.eval_context_bsz)
        enc_q = count_flops(ev._encode_query, params, qblk).flops * -(-ds.num_queries // qb)
        sc = count_flops(ev._score, params, query[:qb], shd.replicate(gallery, ev.mesh)).flops
        t["flops"] = {"gallery": enc_v, "queries": enc_q, "score": sc * -(-ds.num_queries // qb)}
        t["device_kind"] = jax.devices()[0].device_kind
        t["peak_device_bytes"] = _jax_peak(jax.devices()[0])
    else:
        import torch

        from torch_ref import build_model
        from torch_ref.evaluate import TorchEvaluator

        torch.manual_seed(0)
        _torch_cpu_setup(spec)
        dev = "cuda" if _is_gpu(spec) else "cpu"
        ev = TorchEvaluator(build_model(cfg.model), cfg, device=dev)
        t0 = time.perf_counter()
        ev.encode_gallery(warm)
        ev.encode_queries(warm)
        _sync_tree_torch(None)
        t["warmup_encode_s"] = time.perf_counter() - t0
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        gallery = _sync_tree_torch(ev.encode_gallery(ds))
        t["gallery_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        query = _sync_tree_torch(ev.encode_queries(ds))
        t["queries_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mats = _sync_tree_torch(ev.score_matrix(query, gallery))
        t["score_s"] = time.perf_counter() - t0
        fused = mats["fused"].cpu().numpy()
        t["peak_device_bytes"] = int(torch.cuda.max_memory_allocated()) if dev == "cuda" else None
        t["threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    res = eval_q2m(np.asarray(fused), gt)
    t["metrics_s"] = time.perf_counter() - t0
    t["end_to_end_s"] = t["gallery_s"] + t["queries_s"] + t["score_s"] + t["metrics_s"]
    t["sumr"] = float(res["sumr"])
    t["peak_rss_bytes"] = _peak_rss()
    t["fused_checksum"] = float(np.abs(np.asarray(fused, np.float64)).sum())
    return t


def _video_blocks(ds, bsz):
    from jaxprvr.data import video_batches

    keys = ("clip_feats", "frame_feats", "frame_mask", "frame_len", "video_valid")
    for b in video_batches(ds, bsz):
        yield {k: b[k] for k in keys}


def _query_blocks(ds, bsz):
    from jaxprvr.data import query_batches

    for b in query_batches(ds, bsz):
        yield {k: b[k] for k in ("query_feats", "query_mask", "query_valid")}


def w_input(spec) -> dict:
    """Host batches/s of the real input pipeline on an official-format synthetic release."""
    from jaxprvr.data import PRVRDataset, prefetch, train_batches
    from jaxprvr.data.synthetic import write_synthetic

    cfg = _config(spec)
    sizes = sorted(set(spec["batch_sizes"]))
    n_train = max(sizes) * spec["batches"]
    with tempfile.TemporaryDirectory(prefix="jaxprvr-input-") as tmp:
        t0 = time.perf_counter()
        root = write_synthetic(tmp, spec["dataset"], n_train=n_train, n_val=8, n_test=8, progress=False)
        write_s = time.perf_counter() - t0
        ds = PRVRDataset(root, cfg, "train")
        out = {"write_s": write_s, "n_train_videos": n_train, "rows": []}
        for bsz in sizes:
            cap = ds.query_capacity(bsz, cfg.data.query_capacity_multiple)
            from jaxprvr.data.dataset import batch_workers

            workers = max(2, batch_workers(cfg.data.workers))  # the pool as jaxprvr.train sizes it (at least 2)
            for mode in ("serial", "prefetch", f"prefetch + {workers} workers"):
                for epoch in range(2):  # epoch 0 warms the page cache and the readers; epoch 1 is timed
                    it = train_batches(ds, bsz, epoch, 0, cap, workers=workers if "workers" in mode else 1)
                    if mode != "serial":
                        it = prefetch(it, cfg.data.prefetch)
                    t0 = time.perf_counter()
                    n = sum(1 for _ in it)
                    dt = time.perf_counter() - t0
                out["rows"].append({"batch": bsz, "mode": mode, "batches": n, "seconds": dt,
                                    "batches_per_s": n / dt, "videos_per_s": n * bsz / dt})
        return out


WORKERS = {"ceiling": w_ceiling, "train_jax": w_train_jax, "train_torch": w_train_torch, "eval": w_eval,
           "input": w_input}


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


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    set_matmul_precision(spec.get("precision"))
    try:
        result = {"ok": True, **WORKERS[spec["task"]](spec)}
    except Exception as e:  # reported in the table, the run goes on
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print("@@RESULT " + json.dumps(result))
    return 0


# ================================================================================================ driver
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


def run_worker(spec: dict, timeout: float, log) -> dict:
    label = " ".join(str(spec[k]) for k in ("task", "framework", "model") if spec.get(k))
    print(f"[benchmarks.prvr] {label} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.prvr", "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=_env(spec["device"]))
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        log.write(f"==== {label} (timed out after {timeout:.0f} s)\n{err[-20000:]}\n")
        log.flush()
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    log.write(f"==== {label}\n{proc.stderr[-20000:]}\n")
    log.flush()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT ")]
    if not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:300]}", "wall_s": time.perf_counter() - t0}
    res = json.loads(lines[-1][len("@@RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    status = "ok" if res.get("ok") else f"FAILED ({res.get('error')})"
    print(f"[benchmarks.prvr]   {status} in {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return res


def _fmt_s(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_b(b):
    return "-" if not b else f"{b / 2**30:.2f} GiB"


def _ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "-"


def _row_stats(fw, r, fws, ceil, time_key, flops):
    """(JAX speed-up, achieved FLOP/s, the framework's ceiling, peak memory) of one table row. On JAX rows the
    speed-up is PyTorch eager's time / this row's; on PyTorch rows it is this row's time / float32 JAX's."""
    sec = r[time_key]
    torch_row, jax_row = fws.get("torch", {}), fws.get("jax", {})
    if fw.startswith("jax"):
        speed = _ratio(torch_row.get(time_key) if torch_row.get("ok") else None, sec)
    else:
        speed = _ratio(sec, jax_row.get(time_key))
    ach = flops / sec if flops else None
    c = ceil.get("jax" if fw.startswith("jax") else "torch", {}).get("flops_per_s")
    return speed, ach, c, r.get("peak_device_bytes") or r.get("peak_rss_bytes")


def report(results: dict) -> str:
    lines = [f"# benchmarks.prvr — {results['device_desc']}",
             f"size preset `{results['size']}`, dataset `{results['dataset']}`, float32 matmul precision "
             f"`{results.get('matmul_precision')}`, {results['date']}", ""]
    ceil = results.get("ceiling", {})
    if ceil:
        lines += ["## Dense matmul ceiling (float32)", "", "| framework | n | time | TFLOP/s | precision |",
                  "|---|---:|---:|---:|---|"]
        for fw, r in ceil.items():
            if r.get("ok"):
                lines.append(f"| {fw} | {r['n']} | {_fmt_s(r['seconds'])} | {r['flops_per_s'] / 1e12:.3f} | "
                             f"{r['precision']} |")
        lines.append("")
    train = results.get("train", {})
    if train:
        lines += ["## Training step (forward + official loss + backward + BertAdam)", "",
                  "| model | framework | batch (videos/queries) | step (median) | videos/s | queries/s | "
                  "JAX ÷ PyTorch speed | GFLOP/step | achieved TFLOP/s | % of ceiling | compile | peak memory |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for model, fws in train.items():
            j = fws.get("jax", {})
            flops = j.get("flops")
            for fw, r in fws.items():
                if not r.get("ok"):
                    lines.append(f"| {model} | {fw} | | failed: {r.get('error', '?')[:120]} | | | | | | | | |")
                    continue
                v, q = j.get("videos"), j.get("queries")
                sec = r["seconds"]
                speed, ach, c, mem = _row_stats(fw, r, fws, ceil, "seconds", flops)
                lines.append(f"| {model} | {fw} | {v}/{q} | {_fmt_s(sec)} | {v / sec:.1f} | {q / sec:.1f} | "
                             f"{speed} | {flops / 1e9:.1f} | {ach / 1e12:.3f} | "
                             f"{100 * ach / c if c else 0:.1f}% | {_fmt_s(r.get('compile_s'))} | {_fmt_b(mem)} |")
        lines += ["", "JAX ÷ PyTorch speed: on JAX rows, PyTorch eager step time / this row's step time (> 1: JAX faster); on "
                  "PyTorch rows, this row's time / the float32 JAX time (the slowdown against JAX). "
                  "Memory: device peak on GPU, process peak RSS on CPU.", ""]
    ev = results.get("eval", {})
    if ev:
        nv, nq = results["gallery"]
        lines += [f"## Evaluation over a TVR-size gallery ({nv} videos, {nq} queries)", "",
                  "| model | framework | gallery | queries | scoring | R@K | end to end | JAX ÷ PyTorch | "
                  "GFLOP | achieved TFLOP/s | % of ceiling | peak memory |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for model, fws in ev.items():
            j = fws.get("jax", {})
            fl = sum(j.get("flops", {}).values()) if j.get("ok") else None
            for fw, r in fws.items():
                if not r.get("ok"):
                    lines.append(f"| {model} | {fw} | failed: {r.get('error', '?')[:120]} | | | | | | | | | |")
                    continue
                e2e = r["end_to_end_s"]
                speed, ach, c, mem = _row_stats(fw, r, fws, ceil, "end_to_end_s", fl)
                lines.append(f"| {model} | {fw} | {_fmt_s(r['gallery_s'])} | {_fmt_s(r['queries_s'])} | "
                             f"{_fmt_s(r['score_s'])} | {_fmt_s(r['metrics_s'])} | {_fmt_s(e2e)} | {speed} | "
                             f"{fl / 1e9 if fl else 0:.0f} | {ach / 1e12 if ach else 0:.3f} | "
                             f"{100 * ach / c if (ach and c) else 0:.1f}% | {_fmt_b(mem)} |")
        lines.append("")
    scan = results.get("scan")
    if scan:
        lines += [f"## MTM selective scan, forward + backward (batch {scan.get('batch')}, d_inner 768, d_state 16)",
                  "", "| L | form | time (median) | compile | peak memory |", "|---:|---|---:|---:|---:|"]
        for r in scan.get("rows", []):
            lines.append(f"| {r['L']} | {r['form']} | {_fmt_s(r['fwd_bwd_s'])} | {_fmt_s(r['compile_s'])} | "
                         f"{_fmt_b(r['peak_bytes'])} |")
        if scan.get("error"):
            lines.append(f"\nscan benchmark: {scan['error']}")
        lines.append("")
    inp = results.get("input")
    if inp:
        lines += ["## Input pipeline (host) against the JAX training step", "",
                  "| batch | mode | batches/s | videos/s | batch time | JAX step (same batch, model) | "
                  "host ÷ step rate |", "|---:|---|---:|---:|---:|---|---:|"]
        steps = {}
        for model, fws in train.items():
            j = fws.get("jax", {})
            if j.get("ok"):
                steps.setdefault(j["videos"], []).append((model, j["seconds"]))
        for r in inp.get("rows", []):
            per = 1.0 / r["batches_per_s"]
            st = steps.get(r["batch"], [])
            cells = ", ".join(f"{m} {_fmt_s(s)} → {s / per:.1f}×" for m, s in st) or "-"
            worst = f"{min(s for _, s in st) / per:.1f}×" if st else "-"
            lines.append(f"| {r['batch']} | {r['mode']} | {r['batches_per_s']:.2f} | {r['videos_per_s']:.0f} | "
                         f"{_fmt_s(per)} | {cells} | {worst} |")
        if inp.get("error"):
            lines.append(f"\ninput benchmark: {inp['error']}")
        lines.append("")
    return "\n".join(lines)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prvr",
                                description="PRVR training/evaluation throughput, JAX vs the PyTorch twins, "
                                            "side by side on one device; prints markdown tables, writes JSON.")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None, help="default: gpu if JAX sees one, else cpu")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--dataset", default="tvr", choices=("tvr", "act", "cha"))
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="default: official on GPU, cpu on CPU")
    p.add_argument("--hidden", type=int, default=None, help="override the preset's hidden size")
    p.add_argument("--batch", type=int, default=None, help="override the preset's videos per training batch")
    p.add_argument("--gallery", default=None, metavar="NV,NQ",
                   help=f"evaluation gallery size (default: TVR test, {TVR_GALLERY[0]},{TVR_GALLERY[1]})")
    p.add_argument("--eval-models", default=None,
                   help="models of the eval section (default: --models on GPU; gmmformer_v2 on CPU, where one "
                        "TVR-size evaluation takes minutes per framework)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per measurement (default 3 CPU, 20 GPU)")
    p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                   help="also time the torch.compile'd twin (auto: on GPU only; on CPU Inductor compiles for minutes)")
    p.add_argument("--matmul-precision", choices=("tf32", "highest", "default"), default=None,
                   help="float32 matmul precision, the same in both frameworks (default: tf32 on GPU; on CPU "
                        "there is only float32); 'default' keeps each framework's own default")
    p.add_argument("--frameworks", default=None,
                   help="comma list of train-section rows to run: jax, torch, torch_compile, jax_bf16 (default: all "
                        "that the other flags enable)")
    p.add_argument("--bf16", action="store_true",
                   help="add JAX rows with model.compute_dtype=bfloat16 (bf16 activations and matmuls, float32 "
                        "parameters, optimizer and losses) to the train and eval sections")
    p.add_argument("--branch-impl", choices=("auto", "batched", "loop"), default="auto",
                   help="model.branch_impl of the JAX models: how the Gaussian attention branches run (auto: loop on "
                        "CPU, batched on GPU)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement subprocess")
    p.add_argument("--out", default=None, help="write all results as JSON")
    p.add_argument("--log", default=None, help="the workers' stderr (default: a temp file)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)

    device = args.device
    if device is None:
        probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                               capture_output=True, text=True, timeout=300)
        device = "gpu" if probe.stdout.strip() in ("gpu", "cuda", "rocm") else "cpu"
    size = args.size or ("official" if device == "gpu" else "cpu")
    repeats = args.repeats or (20 if device == "gpu" else 3)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    sections = [s for s in args.sections.split(",") if s]
    bad += [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: --models/--sections: unknown {bad}; expected models {list(MODELS)}, sections {list(SECTIONS)}",
              file=sys.stderr)
        return 2
    torch_compile = args.torch_compile == "on" or (args.torch_compile == "auto" and device == "gpu")
    precision = args.matmul_precision or ("tf32" if device == "gpu" else "default")
    base = {"device": device, "dataset": args.dataset, **SIZES[size],
            "precision": None if precision == "default" else precision}
    if args.hidden:
        base["hidden"] = args.hidden
    if args.branch_impl != "auto":
        base["branch_impl"] = args.branch_impl
    if args.batch:
        base["batch"] = args.batch
    gallery = tuple(int(x) for x in args.gallery.split(",")) if args.gallery else TVR_GALLERY
    eval_models = (args.eval_models.split(",") if args.eval_models else
                   (models if device == "gpu" else [m for m in models if m == "gmmformer_v2"] or models[:1]))
    log_path = args.log or tempfile.mkstemp(prefix="benchmarks-prvr-", suffix=".log")[1]
    results = {"device": device, "device_desc": _device_desc(device), "size": size, "dataset": args.dataset,
               "matmul_precision": precision, "branch_impl": args.branch_impl,
               "repeats": repeats, "date": time.strftime("%Y-%m-%d %H:%M"), "gallery": gallery,
               "models": models, "log": log_path}
    t_start = time.perf_counter()
    with open(log_path, "w") as log:
        if "ceiling" in sections:
            n = 8192 if device == "gpu" else 2048
            results["ceiling"] = {fw: run_worker({**base, "task": "ceiling", "framework": fw, "n": n,
                                                  "repeats": repeats}, args.timeout, log) for fw in ("jax", "torch")}
        if "train" in sections:
            results["train"] = {}
            for model in models:
                fws = ["jax", "torch"] + (["torch_compile"] if torch_compile else []) + (["jax_bf16"] if args.bf16 else [])
                if args.frameworks:
                    fws = [f for f in fws if f in args.frameworks.split(",")]
                results["train"][model] = {}
                for fw in fws:
                    task = "train_jax" if fw.startswith("jax") else "train_torch"
                    spec = {**base, "task": task, "framework": fw, "model": model, "repeats": repeats}
                    if fw == "jax_bf16":
                        spec["compute_dtype"] = "bfloat16"
                    results["train"][model][fw] = run_worker(spec, args.timeout, log)
                    _save_partial(args.out, results)
        if "eval" in sections:
            results["eval"] = {}
            for model in eval_models:
                results["eval"][model] = {}
                for fw in ("jax", "torch") + (("jax_bf16",) if args.bf16 else ()):
                    spec = {**base, "task": "eval", "framework": fw, "model": model, "gallery": gallery}
                    if fw == "jax_bf16":
                        spec["compute_dtype"] = "bfloat16"
                    results["eval"][model][fw] = run_worker(spec, args.timeout, log)
                    _save_partial(args.out, results)
        if "scan" in sections:
            results["scan"] = _run_scan(device, repeats, log)
        if "input" in sections:
            from configs import load_config

            official = load_config(f"{models[0]}/{args.dataset}").train.batch_size
            sizes = sorted({official, *(r["videos"] for fws in results.get("train", {}).values()
                                        for r in [fws.get("jax", {})] if r.get("ok"))})
            results["input"] = run_worker({**base, "task": "input", "model": models[0], "batch_sizes": sizes,
                                           "batches": 4}, args.timeout, log)
    results["total_s"] = time.perf_counter() - t_start
    text = report(results)
    print(text)
    print(f"total {results['total_s'] / 60:.1f} min; worker logs: {log_path}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    return 0


def _save_partial(out, results) -> None:
    """Writes what has been measured so far (a run cut short by a time limit keeps its rows)."""
    if out:
        Path(out).write_text(json.dumps({**results, "partial": True}, indent=2, default=float))


def _run_scan(device, repeats, log) -> dict:
    """``benchmarks.selective_scan`` at MTM's training batch (GPU: 32, its official TVR batch; CPU: 8)."""
    batch = 32 if device == "gpu" else 8
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, "-m", "benchmarks.selective_scan", "--batch", str(batch), "--lengths", "32,128",
           "--repeats", str(min(repeats, 10)), "--out", out]
    print("[benchmarks.prvr] scan ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(device), timeout=1800)
    log.write(f"==== scan\n{proc.stderr[-20000:]}\n")
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(Path(out).read_text())


if __name__ == "__main__":
    sys.exit(main())
