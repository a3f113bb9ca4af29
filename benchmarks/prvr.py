"""PRVR performance, JAX against the PyTorch twins (``torch_ref``), side by side in one run on one device.

    python -m benchmarks.prvr                                   # CPU: all sections, the "cpu" size preset
    python -m benchmarks.prvr --device gpu --out gpu.json       # GPU: official sizes
    python -m benchmarks.prvr --models gmmformer_v2 --sections train,eval

Sections (``--sections``, default all):

* ``ceiling``: a dense float32 matmul (n x n x n) in each framework, the FLOP/s ceiling the steps are held to.
* ``train``: one optimizer step (forward, the official loss with hard negatives, backward, BertAdam; MTM's EMA
  where the config uses it) of MS-SL, GMMFormer v2 and MTM. JAX: the jitted ``make_train_step`` of the trainer
  (state donated, called through ``jax.jit`` dispatch as the trainer does; the jit cache is checked to hold one
  entry after all timed steps: no per-batch recompilation). PyTorch: the twin in eager mode with
  ``torch_ref.losses.total_loss`` and ``torch_ref.optim.BertAdam``, and the same with ``torch.compile`` on the
  model (Inductor; on CPU it builds C++ kernels with the system compiler; the loss, with its official Python
  loops, stays eager; ``--torch-compile off`` drops these rows). A model that torch.compile cannot compile, or
  not within ``--timeout``, gets a one-line failure cell and the run goes on.
* ``eval``: a TVR-size gallery (2,179 videos, 10,895 queries, synthetic, in memory), JAX
  (``Evaluator``), torch eager and torch.compile (``torch_ref.evaluate.TorchEvaluator``, their real block loops
  and collation) on the SAME weights: the twin's official torch initialisation (``torch_ref.build_model`` after
  ``torch.manual_seed(0)``), converted for JAX with ``parity.convert.torch_to_flax``. Each runs two full passes
  in a fresh process: the first includes every compilation, the second is the steady state. Stage times
  (gallery encoding, query encoding, scoring, R@K with each framework's own metric code) and both end-to-end
  totals. Then the score matrices are compared: the same R@1/5/10/100, the largest score difference, and every
  query whose ground-truth rank differs must be a near-tie (another video within 1e-6 of its score).
* ``scan``: MTM's selective scan, forward + backward, in JAX's three forms, mamba_ssm's PyTorch reference and
  (on a GPU with mamba_ssm built) the official CUDA kernel (``benchmarks.selective_scan``).
* ``input``: the host input pipeline on an official-format synthetic release (memory-mapped ``feature.bin``,
  hdf5 queries): batches/s of ``train_batches`` alone, behind the background ``prefetch``, and with its
  thread pool (``data.workers``, as ``jaxprvr.train`` runs it), at the official batch size and at the
  benchmark's, set against the JAX step time measured in ``train``.

Method: every measurement runs in its own subprocess (clean peak memory, no cross-talk of thread pools or
allocators; torch.compile's on-disk caches in a fresh, empty folder, as JAX runs without its persistent cache),
on identical batches built from a fixed seed (3 batches, rotated so caches do not flatter), with warm-up calls
first; each timed call ends with a device synchronisation (``block_until_ready`` / ``torch.cuda.synchronize``);
the reported time is the median over ``--repeats``. Compile time is reported two ways: the compiler's own
count (JAX: the trace + lowering + XLA compile durations of ``jax.monitoring``; torch.compile: the per-frame
compile seconds, forward and backward graphs, of ``torch._dynamo``'s compilation metrics), and what the user
waits: the warm-up calls (eval: the first pass) minus as many steady-state calls (the second pass). FLOPs are
counted analytically from the JAX program's jaxpr (``benchmarks.flops``: every matmul and convolution of
forward, backward and optimizer; the same math for both frameworks), and "achieved" is FLOPs / median time,
also as a fraction of the framework's own matmul ceiling. Peak memory is the device's peak allocation on GPU
(``memory_stats`` / ``max_memory_allocated``) and the process's peak resident set on CPU (which includes the
framework's own footprint).

Sizes: ``--size official`` (default on GPU) uses each config's hidden size and batch; ``--size cpu`` (default
on CPU) uses hidden 128 and 16 videos per batch. On 2 cores the run takes most of an hour, nearly all of it
torch.compile's compilations (``--torch-compile off``: about 10 minutes).
Input shapes (feature widths, 128 frames, 30 tokens, 32 clips) are the dataset's official ones in both.
Prints markdown tables with JAX / PyTorch ratios and writes everything to ``--out`` as JSON.
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
from pathlib import Path

import numpy as np

from benchmarks.common import (FW_LABEL, JaxCompileClock, _cell, _device_desc, _env, _fmt_b, _fmt_s, _is_gpu, _jax_peak,
                               _load, _load_weights, _median_timed, _peak_rss, _save_partial, _say, _speed,
                               _torch_compile_clock, _torch_compile_setup, _torch_cpu_setup, announce, jax_clocked,
                               pick_device, run_columns, run_worker, warm_up, worker_main)

MODELS = ("ms_sl", "gmmformer_v2", "mtm")
SECTIONS = ("ceiling", "train", "eval", "scan", "input")
SIZES = {"cpu": {"hidden": 128, "batch": 16}, "official": {"hidden": None, "batch": None}}
TVR_GALLERY = (2179, 10895)  # TVR test split: videos, queries
CPU_MSSL_QUERIES = 1000  # MS-SL's eval queries on CPU by default (the full gallery of videos)
POOL_VIDEOS, POOL_QUERIES = 64, 256  # distinct synthetic items the gallery cycles through (memory)


# ================================================================================================ helpers
def _load_config(*args):
    from jaxprvr.config import load_config

    return load_config(*args)


def _dataset_dims(dataset: str) -> tuple[int, int]:
    """(visual feature width, query feature width) of a PRVR dataset, from the config's dataset table."""
    from jaxprvr.config import DATASETS

    row = DATASETS["prvr"][dataset]
    return int(row["visual_feat_dim"]), int(row["q_feat_size"])


def _config(spec, batch=None):
    visual, query = _dataset_dims(spec["dataset"])
    over = [f"model.visual_feat_dim={visual}", f"model.q_feat_size={query}"]
    if spec.get("hidden"):
        over.append(f"model.hidden_size={spec['hidden']}")
    batch = batch or spec.get("batch")
    if batch:
        over.append(f"train.batch_size={batch}")
    if spec.get("compute_dtype"):
        over.append(f"model.compute_dtype={spec['compute_dtype']}")
    if spec.get("branch_impl"):
        over.append(f"model.branch_impl={spec['branch_impl']}")
    if spec.get("hard_from_start"):
        over.append("loss.hard_negative_start_epoch=0")
    return _load_config(f"{spec['model']}/{spec['dataset']}", None, over)


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
    return out


def gallery_ground_truth(n_videos: int, n_queries: int) -> np.ndarray:
    """The ground-truth video of each query of :class:`MemoryGallery` (queries spread evenly over the videos)."""
    return (np.arange(n_queries) * n_videos // n_queries).astype(np.int32)


class MemoryGallery:
    """A TVR-size evaluation split held in memory, with the interface both evaluators read
    (``video_item``/``query_item`` and the id lists of :class:`jaxprvr.data.PRVRDataset`). Video ``i`` is
    ``POOL_VIDEOS`` synthetic videos cycled (frame counts from the dataset's profile), its feature axis rotated by
    ``i // POOL_VIDEOS`` (queries alike): every video and query is a distinct input, so no two videos score the
    same, and each item is returned as a fresh copy, as the real readers return one. The gallery has the real
    size and the real per-video work without holding 2,179 feature matrices."""

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
        self.query_video_index = gallery_ground_truth(n_videos, n_queries)
        self.cap_ids = [f"v{v}#enc#{j}" for j, v in enumerate(self.query_video_index)]

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_queries(self) -> int:
        return len(self.cap_ids)

    def video_item(self, i: int):
        clip, frames = self._videos[i % POOL_VIDEOS]
        k = i // POOL_VIDEOS  # a distinct input for every video: its pool video with the feature axis rotated
        return np.roll(clip, k, axis=-1), np.roll(frames, k, axis=-1)

    def query_item(self, j: int):
        return np.roll(self._queries[j % POOL_QUERIES], j // POOL_QUERIES, axis=-1)


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


# ================================================================================================ train workers
def w_train_jax(spec) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.flops import count_flops
    from jaxprvr import sharding as shd
    from jaxprvr.models import build_model

    from jaxprvr.train import init_params, make_optimizer, make_train_step, train_keys

    # Hard negatives from loss.hard_negative_start_epoch = 0: the timed steps use them, as the torch rows do.
    cfg = _config({**spec, "hard_from_start": True})
    batches = [train_batch(cfg, spec["dataset"], cfg.train.batch_size, s) for s in range(3)]
    dev = jax.devices()[0]
    mesh = shd.make_mesh([dev])
    model = build_model(cfg.model)
    params = jax.jit(lambda k: init_params(model, cfg, k))(jax.random.PRNGKey(0))
    tx = make_optimizer(cfg, params, 1000)
    state = shd.replicate({"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}, mesh)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    step = make_train_step(model, cfg, tx, mesh, 1000)
    dev_batches = [shd.shard_batch(b, mesh) for b in batches]
    extra = (train_keys(0),)
    _say(f"jax {spec['model']}: {n_params} params, batches ready; tracing for the FLOP count")
    fc = count_flops(step, state, dev_batches[0], *extra)
    _say(f"{fc.flops / 1e9:.1f} GFLOP per step; first call (compiles)")
    rss0 = _peak_rss()
    box = {"state": state}

    def call(i):
        box["state"], metrics = step(box["state"], dev_batches[i % 3], *extra)
        return metrics["loss"], box["state"]["step"]

    _, first, own, n_exec = jax_clocked(lambda: call(0))
    _say(f"first call {first:.1f} s (JAX compile events {own:.1f} s, {n_exec} executables)")
    jax.block_until_ready(call(1))
    med, times = _median_timed(lambda i: call(i + 2), spec["repeats"], jax.block_until_ready)
    loss = float(call(0)[0])
    return {"seconds": med, "times": times, "compile_s": own, "compile_what": "jax.monitoring trace+lower+XLA",
            "compiled_executables": n_exec, "first_calls_s": [first], "first_minus_steady_s": max(first - med, 0.0),
            "flops": fc.flops, "jit_cache_entries": step._cache_size(), "params": n_params, "loss": loss,
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
    compiled = spec["framework"] == "torch_compile"
    fwd = twin
    if compiled:
        _torch_compile_setup()
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

    # Compiled: one warm-up call per batch, so that a recompilation for a new batch shape (query counts vary on
    # ActivityNet and Charades; TVR has 5 per video) falls before the timed calls, which must compile nothing.
    warm = 3 if compiled else 1
    _say(f"torch {spec['model']} ({spec['framework']}): {n_params} params; {warm} warm-up call(s)")
    firsts = warm_up(call, sync, warm)
    own, frames = _torch_compile_clock() if compiled else (None, None)
    rss0 = _peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med, times = _median_timed(lambda i: call(i + warm), spec["repeats"], sync)
    recompiled = (_torch_compile_clock()[1] - frames) if compiled else None
    from torch_ref.mamba import load as load_mamba

    scan = None
    if cfg.model.name == "mtm":
        scan = "official CUDA kernel" if load_mamba().cuda_kernels else "selective_scan_ref (PyTorch loop)"
    return {"seconds": med, "times": times, "compile_s": own,
            "compile_what": "torch._dynamo compilation metrics" if compiled else None,
            "compiled_frames": frames, "recompiles_during_timing": recompiled,
            "first_calls_s": firsts, "first_minus_steady_s": max(sum(firsts) - warm * med, 0.0),
            "params": int(n_params),
            "peak_device_bytes": int(torch.cuda.max_memory_allocated()) if dev.type == "cuda" else None,
            "peak_rss_bytes": _peak_rss(), "rss_before_steps": rss0, "mamba_scan": scan,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "flush_denormal": not _is_gpu(spec)}


def _sync_tree_torch(x):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


# ================================================================================================ eval workers
def w_weights(spec) -> dict:
    """The twin with the official torch initialisation (``torch.manual_seed(seed)``, ``torch_ref.build_model``),
    its ``state_dict`` written as numpy arrays: the one set of weights every eval worker loads."""
    import torch

    from torch_ref import build_model

    cfg = _config(spec)
    torch.manual_seed(spec.get("seed", 0))
    twin = build_model(cfg.model)
    sd = {k: v.detach().cpu().numpy() for k, v in twin.state_dict().items()}
    np.savez(spec["path"], **sd)
    return {"tensors": len(sd), "numbers": int(sum(v.size for v in sd.values())), "seed": spec.get("seed", 0)}


def w_eval(spec) -> dict:
    """Two full passes over the TVR-size gallery in one fresh process, on the weights of ``spec["weights"]``:
    the first includes every compilation (what one evaluation costs from a cold start), the second is the steady
    state. Stage times of both; the second pass's fused score matrix goes to ``spec["scores_out"]``."""
    cfg = _config(spec)
    ds = MemoryGallery(cfg, spec["dataset"], *spec["gallery"])
    gt = np.asarray(ds.query_video_index)
    sd = _load_weights(spec["weights"])
    fw = spec["framework"]
    out: dict = {"framework": fw}
    if fw.startswith("jax"):
        import jax

        from benchmarks.flops import count_flops
        from jaxprvr import sharding as shd
        from jaxprvr.metrics.prvr import eval_q2m
        from jaxprvr.models import build_model
        from parity.convert import model_table, torch_to_flax

        model = build_model(cfg.model)
        from jaxprvr.tasks.prvr import Evaluator

        ev = Evaluator(model, cfg, shd.make_mesh(jax.devices()[:1]))
        params = shd.replicate(jax.tree.map(np.asarray, torch_to_flax(model_table(cfg.model), sd)), ev.mesh)
        clock = JaxCompileClock()

        def one_pass():
            t = {}
            t0 = time.perf_counter()
            gallery = jax.block_until_ready(ev.encode_gallery(params, ds))
            t["gallery_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            query = jax.block_until_ready(ev.encode_queries(params, ds))
            t["queries_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fused = np.asarray(ev.score_matrix(params, query, gallery)["fused"])  # on the host: synchronised
            t["score_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = eval_q2m(fused, gt)
            t["metrics_s"] = time.perf_counter() - t0
            return t, fused, res, (gallery, query)

        metric_code = "jaxprvr.metrics.prvr.eval_q2m (ties: stable)"
        own0 = clock.read()
        first, fused0, _, _ = one_pass()
        own1 = clock.read()
        _say(f"jax first pass {sum(first.values()):.1f} s (compile events {own1[0] - own0[0]:.1f} s)")
        steady, fused, res, (gallery, query) = one_pass()
        own2 = clock.read()
        out.update(compile_s=own1[0] - own0[0], compile_what="jax.monitoring trace+lower+XLA",
                   compiled_executables=own1[1] - own0[1], recompiles_in_steady_pass=own2[1] - own1[1])
        # FLOPs: one traced call of each function times the number of calls the pass made.
        vb = {k: np.asarray(v)[: cfg.data.eval_context_bsz] for k, v in
              next(iter(_video_blocks(ds, cfg.data.eval_context_bsz))).items()}
        qb = cfg.data.eval_query_bsz
        qblk = {k: v for k, v in next(iter(_query_blocks(ds, qb))).items()}
        rows = ev.score_rows(gallery) if hasattr(ev, "score_rows") else qb
        enc_v = count_flops(ev._encode_video, params, vb).flops * -(-ds.num_videos // cfg.data.eval_context_bsz)
        enc_q = count_flops(ev._encode_query, params, qblk).flops * -(-ds.num_queries // qb)
        gal = {**gallery, "video_valid": np.ones((ds.num_videos,), np.float32)}
        sc = count_flops(ev._score, params, np.zeros((rows,) + query.shape[1:], query.dtype),
                         shd.replicate(gal, ev.mesh)).flops
        out["flops"] = {"gallery": enc_v, "queries": enc_q, "score": sc * -(-ds.num_queries // rows)}
        out["device_kind"] = jax.devices()[0].device_kind
        out["peak_device_bytes"] = _jax_peak(jax.devices()[0])
    else:
        import torch

        from torch_ref import build_model
        from torch_ref.evaluate import TorchEvaluator, eval_q2m as torch_eval_q2m

        torch.manual_seed(0)
        _torch_cpu_setup(spec)
        dev = "cuda" if _is_gpu(spec) else "cpu"
        twin = build_model(cfg.model)
        twin.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
        compiled = fw == "torch_compile"
        if compiled:
            _torch_compile_setup()
            for name in ("encode_video", "encode_query", "score"):  # the three calls TorchEvaluator makes
                setattr(twin, name, torch.compile(getattr(twin, name)))
        ev = TorchEvaluator(twin, cfg, device=dev)

        def one_pass():
            t = {}
            t0 = time.perf_counter()
            gallery = _sync_tree_torch(ev.encode_gallery(ds))
            t["gallery_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            query = _sync_tree_torch(ev.encode_queries(ds))
            t["queries_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fused = _sync_tree_torch(ev.score_matrix(query, gallery)["fused"])
            t["score_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = torch_eval_q2m(fused, gt, sort=ev.sort)
            t["metrics_s"] = time.perf_counter() - t0
            return t, fused.cpu().numpy(), res, None

        metric_code = f"torch_ref.evaluate.eval_q2m (official loop, sort={ev.sort})"
        own0 = _torch_compile_clock() if compiled else (0.0, 0)
        first, fused0, _, _ = one_pass()
        own1 = _torch_compile_clock() if compiled else (0.0, 0)
        _say(f"{fw} first pass {sum(first.values()):.1f} s")
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steady, fused, res, _ = one_pass()
        own2 = _torch_compile_clock() if compiled else (0.0, 0)
        if compiled:
            out.update(compile_s=own1[0] - own0[0], compile_what="torch._dynamo compilation metrics",
                       compiled_frames=own1[1] - own0[1], recompiles_in_steady_pass=own2[1] - own1[1])
        out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated()) if dev == "cuda" else None
        out["threads"] = torch.get_num_threads()
    for k, v in steady.items():
        out[k] = v
    out["end_to_end_s"] = sum(steady.values())
    out["first_pass"] = first
    out["first_end_to_end_s"] = sum(first.values())
    out["first_minus_steady_s"] = out["first_end_to_end_s"] - out["end_to_end_s"]
    out["metric_code"] = metric_code
    out["metrics"] = {k: float(res[k]) for k in ("r1", "r5", "r10", "r100", "sumr", "medr", "meanr")}
    out["sumr"] = float(res["sumr"])
    out["passes_max_abs_diff"] = float(np.abs(fused0.astype(np.float64) - fused).max())
    out["peak_rss_bytes"] = _peak_rss()
    if spec.get("scores_out"):
        np.save(spec["scores_out"], np.asarray(fused, np.float32))
    return out


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
            from jaxprvr.data.pipeline import batch_workers

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


WORKERS = {"ceiling": w_ceiling, "train_jax": w_train_jax, "train_torch": w_train_torch, "weights": w_weights,
           "eval": w_eval, "input": w_input}


# ================================================================================================ driver
def _row_stats(fw, r, fws, ceil, time_key, flops):
    """(JAX speed-up, achieved FLOP/s, the framework's ceiling, peak memory) of one table row."""
    sec = r[time_key]
    ach = flops / sec if flops else None
    c = ceil.get("jax" if fw.startswith("jax") else "torch", {}).get("flops_per_s")
    return _speed(fw, fws, time_key), ach, c, r.get("peak_device_bytes") or r.get("peak_rss_bytes")


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
                  "JAX ÷ PyTorch speed | GFLOP/step | achieved TFLOP/s | % of ceiling | compile (compiler's own) | "
                  "first call(s) − steady | peak memory | load |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for model, fws in train.items():
            j = fws.get("jax", {})
            flops = j.get("flops")
            for fw, r in fws.items():
                if not r.get("ok"):
                    lines.append(f"| {model} | {FW_LABEL.get(fw, fw)} | | failed: {_cell(r.get('error', '?'))} "
                                 f"| | | | | | | | | {_load(r)} |")
                    continue
                v, q = j.get("videos"), j.get("queries")
                sec = r["seconds"]
                speed, ach, c, mem = _row_stats(fw, r, fws, ceil, "seconds", flops)
                rate = (f"{v / sec:.1f} | {q / sec:.1f}" if v and q else "- | -")
                fl = (f"{flops / 1e9:.1f} | {ach / 1e12:.3f} | {100 * ach / c if c else 0:.1f}%" if flops
                      else "- | - | -")
                lines.append(f"| {model} | {FW_LABEL.get(fw, fw)} | {v}/{q} | {_fmt_s(sec)} | {rate} | {speed} | "
                             f"{fl} | {_fmt_s(r.get('compile_s'))} | {_fmt_s(r.get('first_minus_steady_s'))} | "
                             f"{_fmt_b(mem)} | {_load(r)} |")
        lines += ["", "JAX ÷ PyTorch speed: on JAX rows, torch eager's step time / JAX's (in brackets torch.compile's "
                  "/ JAX's); on PyTorch rows, this row's time / JAX's (> 1: JAX faster). Compile (compiler's own): JAX, "
                  "the tracing + lowering + XLA compile seconds of the step that jax.monitoring reports; torch.compile, "
                  "the Dynamo compile seconds (graph capture, AOTAutograd, Inductor with its C++ builds; forward and "
                  "backward graphs) from torch._dynamo's compilation metrics. First call(s) − steady: the warm-up "
                  "calls' total minus as many median steps (JAX and torch eager: 1 call; torch.compile: 3, one per "
                  "batch, so that a recompilation for a new batch shape would fall before the timed steps, which "
                  "are checked to compile nothing). "
                  "Memory: device peak on GPU, process peak RSS on CPU. Load: the machine's 1-minute load average "
                  "at the start and the end of the measurement.", ""]
    ev = results.get("eval", {})
    if ev:
        sizes = results.get("eval_gallery") or {m: results["gallery"] for m in ev}
        lines += ["## Evaluation over a TVR-size gallery, all columns on the same weights", "",
                  "| model | videos / queries | framework | gallery | queries | scoring | R@K | end to end, steady | "
                  "JAX ÷ PyTorch | end to end, first run | JAX ÷ PyTorch, first run | compile (compiler's own) | "
                  "SumR | GFLOP | achieved TFLOP/s | % of ceiling | peak memory | load |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for model, fws in ev.items():
            nv, nq = sizes.get(model, results["gallery"])
            j = fws.get("jax", {})
            fl = sum(j.get("flops", {}).values()) if j.get("ok") else None
            for fw, r in fws.items():
                if not r.get("ok"):
                    lines.append(f"| {model} | {nv:,} / {nq:,} | {FW_LABEL.get(fw, fw)} | failed: "
                                 f"{_cell(r.get('error', '?'))} | | | | | | | | | | | | | {_load(r)} |")
                    continue
                e2e = r["end_to_end_s"]
                speed, ach, c, mem = _row_stats(fw, r, fws, ceil, "end_to_end_s", fl)
                lines.append(f"| {model} | {nv:,} / {nq:,} | {FW_LABEL.get(fw, fw)} | {_fmt_s(r['gallery_s'])} | "
                             f"{_fmt_s(r['queries_s'])} | {_fmt_s(r['score_s'])} | {_fmt_s(r['metrics_s'])} | "
                             f"{_fmt_s(e2e)} | {speed} | {_fmt_s(r.get('first_end_to_end_s'))} | "
                             f"{_speed(fw, fws, 'first_end_to_end_s')} | {_fmt_s(r.get('compile_s'))} | "
                             f"{r['sumr']:.4f} | {fl / 1e9 if fl else 0:.0f} | {ach / 1e12 if ach else 0:.3f} | "
                             f"{100 * ach / c if (ach and c) else 0:.1f}% | {_fmt_b(mem)} | {_load(r)} |")
        lines += ["", "Each framework runs in a fresh process two full passes over the gallery: the first includes "
                  "every compilation (JAX's jit of the encoders and the scorer; torch.compile's graphs, with their "
                  "recompilations for the varying block shapes of the official collation), the second is the steady "
                  "state, whose stage times fill the columns. R@K: each framework's own metric code (JAX: "
                  "jaxprvr.metrics.prvr.eval_q2m; torch: the official loop of torch_ref.evaluate.eval_q2m). The "
                  "weights are the twin's official torch initialisation (seed 0), converted to Flax with "
                  "parity.convert.torch_to_flax for the JAX rows.", ""]
        for model, cmp in results.get("eval_equal", {}).items():
            lines += eval_equal_lines(model, cmp)
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
    p.add_argument("--gallery", action="append", default=None, metavar="[MODEL=]NV,NQ",
                   help=f"evaluation gallery size, for every model or (MODEL=NV,NQ; repeatable) for one (default: "
                        f"TVR test, {TVR_GALLERY[0]},{TVR_GALLERY[1]}; on CPU MS-SL gets {CPU_MSSL_QUERIES:,} of the "
                        "queries: its scoring, a key-clip attention per query and video, takes ~70 ms per query "
                        "against the 2,179 videos on 2 cores, ~13 min per pass for all 10,895)")
    p.add_argument("--eval-models", default=None,
                   help="models of the eval section (default: --models on GPU; on CPU, where one TVR-size "
                        "evaluation takes minutes per framework, gmmformer_v2 and ms_sl of --models)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per measurement (default 3 CPU, 20 GPU)")
    p.add_argument("--torch-compile", choices=("on", "off"), default="on",
                   help="also time the torch.compile'd twin (Inductor; on CPU it builds C++ kernels with the "
                        "system compiler) in the train and eval sections")
    p.add_argument("--matmul-precision", choices=("tf32", "highest", "default"), default=None,
                   help="float32 matmul precision, the same in both frameworks (default: tf32 on GPU; on CPU "
                        "there is only float32); 'default' keeps each framework's own default")
    p.add_argument("--frameworks", default=None,
                   help="comma list of train- and eval-section rows to run: jax, torch, torch_compile, jax_bf16 "
                        "(the eval section always runs jax, the reference of its equality check) (default: all "
                        "that the other flags enable)")
    p.add_argument("--bf16", action="store_true",
                   help="add JAX rows with model.compute_dtype=bfloat16 (bf16 activations and matmuls, float32 "
                        "parameters, optimizer and losses) to the train and eval sections")
    p.add_argument("--branch-impl", choices=("auto", "batched", "loop"), default="auto",
                   help="model.branch_impl of the JAX models: how the Gaussian attention branches run (auto: loop on "
                        "CPU, batched on GPU)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement subprocess")
    p.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds per torch.compile measurement subprocess (default: --timeout); one that runs out "
                        "is reported as a failure cell")
    p.add_argument("--out", default=None, help="write all results as JSON")
    p.add_argument("--log", default=None, help="the workers' stderr (default: a temp file)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker, WORKERS)

    device = pick_device(args.device)
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
    torch_compile = args.torch_compile == "on"
    compile_timeout = args.compile_timeout or args.timeout
    precision = args.matmul_precision or ("tf32" if device == "gpu" else "default")
    base = {"device": device, "dataset": args.dataset, **SIZES[size],
            "precision": None if precision == "default" else precision}
    if args.hidden:
        base["hidden"] = args.hidden
    if args.branch_impl != "auto":
        base["branch_impl"] = args.branch_impl
    if args.batch:
        base["batch"] = args.batch
    gallery, galleries = TVR_GALLERY, {}
    for g in args.gallery or []:
        name, _, size = g.rpartition("=")
        size = tuple(int(x) for x in size.split(","))
        if name:
            galleries[name] = size
        else:
            gallery = size
    if device == "cpu" and not any("=" not in g for g in args.gallery or []):
        galleries.setdefault("ms_sl", (gallery[0], min(gallery[1], CPU_MSSL_QUERIES)))
    eval_models = (args.eval_models.split(",") if args.eval_models else
                   (models if device == "gpu" else [m for m in ("gmmformer_v2", "ms_sl") if m in models] or models[:1]))
    log_path = args.log or tempfile.mkstemp(prefix="benchmarks-prvr-", suffix=".log")[1]
    results = {"device": device, "device_desc": _device_desc(device), "size": size, "dataset": args.dataset,
               "matmul_precision": precision, "branch_impl": args.branch_impl,
               "repeats": repeats, "date": time.strftime("%Y-%m-%d %H:%M"), "gallery": gallery,
               "eval_gallery": {m: galleries.get(m, gallery) for m in eval_models} if "eval" in sections else {},
               "models": models, "log": log_path}
    t_start = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="benchmarks-prvr-eval-")  # eval weights and score matrices (~100 MB each)
    try:
        _run_sections(args, sections, models, eval_models, base, repeats, torch_compile, compile_timeout, gallery,
                      galleries, device, results, log_path, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t_start
    text = report(results)
    print(text)
    print(f"total {results['total_s'] / 60:.1f} min; worker logs: {log_path}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    return 0


NEAR_TIE = 1e-6  # two scores of one query closer than this may be ordered differently by the two frameworks
RANK_KS = (1, 5, 10, 100)
OUTLIER = 1e-5  # score differences above this are counted (float32 rounding of these scores stays near 1e-6)


def _row_chunks(n: int, size: int = 1024):
    for a in range(0, n, size):
        yield slice(a, min(a + size, n))


def near_tie_pairs(scores: np.ndarray, tol: float = NEAR_TIE) -> int:
    """Adjacent pairs of each row's sorted scores that lie within ``tol``: every near-tie of the matrix."""
    return int(sum((np.diff(np.sort(scores[c], axis=1), axis=1) <= tol).sum()
                   for c in _row_chunks(len(scores))))


def compare_scores(ref: np.ndarray, other: np.ndarray, gt: np.ndarray, ref_metrics: dict, other_metrics: dict,
                   tol: float = NEAR_TIE) -> dict:
    """Two frameworks' fused score matrices on the same weights and gallery: the largest score difference,
    whether R@1/5/10/100 (each framework's own metric code) are identical, and which queries rank their ground
    truth differently. A rank may only differ where another video's score lies within ``tol`` of the ground
    truth's (in either matrix): a near-tie, where float rounding decides the order."""
    n = len(gt)
    diff, beyond, near, differ = 0.0, 0, np.zeros(n, bool), np.zeros(n, bool)
    for c in _row_chunks(n):
        a, b = ref[c].astype(np.float64), other[c].astype(np.float64)
        diff = max(diff, float(np.abs(a - b).max()))
        beyond += int((np.abs(a - b) > OUTLIER).sum())
        g = gt[c]
        ga, gb = a[np.arange(len(a)), g][:, None], b[np.arange(len(b)), g][:, None]
        near[c] = ((np.abs(a - ga) <= tol).sum(1) > 1) | ((np.abs(b - gb) <= tol).sum(1) > 1)  # > 1: not gt itself
        differ[c] = (a > ga).sum(1) != (b > gb).sum(1)
    identical = all(ref_metrics[f"r{k}"] == other_metrics[f"r{k}"] for k in RANK_KS)
    return {"max_abs_score_diff": diff, "scores_beyond_1e-5": beyond, "scores": int(ref.size), "sumr": [ref_metrics["sumr"], other_metrics["sumr"]],
            "r_at_k": {f"r{k}": [ref_metrics[f"r{k}"], other_metrics[f"r{k}"]] for k in RANK_KS},
            "r_at_k_identical": identical, "near_tie_queries": int(near.sum()),
            "rank_differs_queries": int(differ.sum()), "rank_differs_not_near_tie": int((differ & ~near).sum()),
            "near_tie_pairs": near_tie_pairs(other, tol),
            "equal": bool(identical or not (differ & ~near).any())}


def compare_eval(rows: dict, paths: dict, gallery, tol: float = NEAR_TIE) -> dict:
    """The eval section's equality check: JAX's scores and metrics against each torch column's."""
    ref_row = rows.get("jax", {})
    if not ref_row.get("ok") or not os.path.exists(paths.get("jax", "")):
        return {"error": "no JAX scores to compare with"}
    gt = gallery_ground_truth(*gallery)
    ref = np.load(paths["jax"])
    out = {"reference": "jax", "tolerance": tol, "near_tie_pairs_jax": near_tie_pairs(ref, tol), "against": {}}
    for fw in ("torch", "torch_compile"):
        r = rows.get(fw, {})
        if r.get("ok") and os.path.exists(paths.get(fw, "")):
            out["against"][fw] = compare_scores(ref, np.load(paths[fw]), gt, ref_row["metrics"], r["metrics"], tol)
    return out


def eval_equal_lines(model: str, cmp: dict) -> list[str]:
    if cmp.get("error"):
        return [f"eval metrics equal ({model}): not checked, {cmp['error']}"]
    lines = []
    for fw, c in cmp["against"].items():
        name = "torch compiled" if fw == "torch_compile" else "torch eager"
        a, b = c["sumr"]
        lines.append(
            f"eval metrics equal ({model}): JAX SumR {a:.4f} vs {name} SumR {b:.4f} (R@1/5/10/100 identical: "
            f"{'yes' if c['r_at_k_identical'] else 'no'}; max |score diff| {c['max_abs_score_diff']:.2e}, "
            f"{c['scores_beyond_1e-5']:,} of {c['scores']:,} scores differ by more than {OUTLIER:g}); "
            f"near-ties within {cmp['tolerance']:g}: {c['near_tie_queries']} queries with another video that close "
            f"to the ground truth's score ({c['near_tie_pairs']} near-tie pairs in all rows); ground-truth rank "
            f"differs on {c['rank_differs_queries']} queries, {c['rank_differs_not_near_tie']} of them not near-ties "
            f"-> {'EQUAL' if c['equal'] else 'NOT EQUAL'}")
    return lines


def _run_sections(args, sections, models, eval_models, base, repeats, torch_compile, compile_timeout, gallery,
                  galleries, device, results, log_path, scratch) -> None:
    """Runs the measurements of the chosen sections into ``results`` (saved after each one with ``--out``)."""
    with open(log_path, "w") as log:
        if "ceiling" in sections:
            n = 8192 if device == "gpu" else 2048
            results["ceiling"] = {fw: run_worker({**base, "task": "ceiling", "framework": fw, "n": n,
                                                  "repeats": repeats}, args.timeout, log) for fw in ("jax", "torch")}
        deferred = []
        if "train" in sections:
            results["train"] = {}
            for model in models:
                fws = ["jax", "torch"] + (["torch_compile"] if torch_compile else []) + (["jax_bf16"] if args.bf16 else [])
                if args.frameworks:
                    fws = [f for f in fws if f in args.frameworks.split(",")]
                results["train"][model] = {}

                def train_spec(fw, model=model):
                    task = "train_jax" if fw.startswith("jax") else "train_torch"
                    spec = {**base, "task": task, "framework": fw, "model": model, "repeats": repeats}
                    if fw == "jax_bf16":
                        spec["compute_dtype"] = "bfloat16"
                    return spec

                run_columns(results["train"][model], fws, train_spec, deferred, ("train", model), args.timeout, log,
                            args.out, results)
        scores = {}  # model -> framework -> its fused score matrix (.npy in scratch)

        def check_eval(model):
            results["eval_equal"][model] = compare_eval(results["eval"][model], scores[model],
                                                        galleries.get(model, gallery))
            announce("benchmarks.prvr", eval_equal_lines(model, results["eval_equal"][model]))
            _save_partial(args.out, results)

        if "eval" in sections:
            results["eval"], results["eval_equal"] = {}, {}
            for model in eval_models:
                results["eval"][model], scores[model] = {}, {}
                weights = os.path.join(scratch, f"{model}-weights.npz")
                made = run_worker({**base, "task": "weights", "model": model, "path": weights, "seed": 0},
                                  args.timeout, log)
                if not made.get("ok"):
                    results["eval"][model]["jax"] = {"ok": False, "error": f"weights: {made.get('error')}"}
                    continue
                fws = ("jax", "torch") + (("torch_compile",) if torch_compile else ()) + (
                    ("jax_bf16",) if args.bf16 else ())
                if args.frameworks:
                    fws = tuple(f for f in fws if f == "jax" or f in args.frameworks.split(","))

                def eval_spec(fw, model=model, weights=weights):
                    scores[model][fw] = os.path.join(scratch, f"{model}-{fw}-scores.npy")
                    spec = {**base, "task": "eval", "framework": fw, "model": model,
                            "gallery": galleries.get(model, gallery), "weights": weights,
                            "scores_out": scores[model][fw]}
                    if fw == "jax_bf16":
                        spec["compute_dtype"] = "bfloat16"
                    return spec

                run_columns(results["eval"][model], fws, eval_spec, deferred, ("eval", model), args.timeout, log,
                            args.out, results)
                check_eval(model)
        if "scan" in sections:
            results["scan"] = _run_scan(device, repeats, log)
        if "input" in sections:
            official = _load_config(f"{models[0]}/{args.dataset}").train.batch_size
            sizes = sorted({official, *(r["videos"] for fws in results.get("train", {}).values()
                                        for r in [fws.get("jax", {})] if r.get("ok"))})
            results["input"] = run_worker({**base, "task": "input", "model": models[0], "batch_sizes": sizes,
                                           "batches": 4}, args.timeout, log)
        # torch.compile last (Inductor's C++ builds take minutes to most of an hour on 2 cores): the eval columns
        # first, each completing its model's equality check, then the training steps.
        for (section, model), spec in sorted(deferred, key=lambda d: d[0][0] != "eval"):
            results[section][model]["torch_compile"] = run_worker(spec, compile_timeout, log)
            _save_partial(args.out, results)
            if section == "eval":
                check_eval(model)


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
