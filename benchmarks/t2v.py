"""Text-video retrieval (BackBone_tvr, ``clip_wti``) performance, JAX against the PyTorch twin
(``torch_ref.clip_wti``), side by side in one run on one device.

    python -m benchmarks.t2v                                      # CPU: all sections, size "cpu"
    python -m benchmarks.t2v --sections train,eval --torch-compile off
    python -m benchmarks.t2v --device gpu --size official --bf16 --out gpu.json   # a GPU (benchmarks/gpu_t2v.sh)

Sections (``--sections``, default all):

* ``forward``: the two CLIP towers alone, no gradient: the image tower on the ``B*T`` frames of a batch (the class
  token's embedding of every frame, ``ClipWTI.frame_features``) and the text tower on its ``B`` captions (every
  token projected, ``ClipWTI.text_features``). JAX: one jitted function of both; the twin: ``get_text_feat`` and
  ``clip.encode_image`` in eager mode and under ``torch.compile``. Every torch column's outputs are compared with
  JAX's (max |diff| of the text tokens and of the frame embeddings).
* ``train``: one optimizer step at the config batch (``train.batch_size`` pairs, ``max_frames`` frames each).
  JAX: the trainer's ``jaxprvr.train.make_train_step`` (the t2v task's symmetric InfoNCE over WTI logits,
  ``tasks.t2v.t2v_optimizer``: global clip, BertAdam with the ``clip.`` lr scale, the ``logit_scale`` clamp;
  state donated; one jit cache entry after the timed steps). The twin: ``BackBoneTVR.forward`` (the loss),
  ``backward``, ``official_after_backward`` (global ``clip_grad_norm_``, ``official_optimizer``'s BertAdam step,
  ``zero_grad``, the clamp), eager, and with the model under ``torch.compile`` (the optimizer stays eager).
* ``eval``: a 1k-A-like split held in memory (N captions, N videos, caption i <-> video i, the "pairs" protocol),
  end to end: text and video features, the full N x N WTI similarity, R@K/MdR/MnR both ways. JAX:
  ``tasks.t2v.Evaluator.evaluate`` (features jitted in batches of ``data.eval_batch_size`` = 16, video batches
  loaded on a background thread, the similarity in ``data.sim_block`` blocks, ``metrics.t2v.t2v_metrics``), then
  its pieces one stage at a time for the stage columns. The twin: the official loop (``main_retrieval.py``
  ``eval_epoch``: text and video features per batch of 16, ``_run_on_single_gpu``: ``get_similarity_logits`` on
  blocks of 32 x 32, ``compute_metrics`` on the matrix and its transpose), eager and with ``get_text_feat``,
  ``get_video_feat`` and ``get_similarity_logits`` under ``torch.compile``. Two passes per column in a fresh
  process (the first includes the compilations). "eval metrics equal" lines compare JAX's metrics with each torch
  column's official ``compute_metrics`` (and the two similarity matrices).
* ``input``: the host pipeline on synthetic 320x240 H.264 mp4s (``--input-videos``, 30 fps, 10-20 s, written with
  PyAV): decode + sample (the official 1 frame/s sampling, 12 frames) with our PyAV reader
  (``data.video._sample_and_decode``, what ``load_clip`` and ``FrameStore.put`` run) against decord 0.6.0 as the
  official loader calls it (``VideoReader(path, ctx=cpu(0))``, ``get_batch(indices)``, the same indices; frames
  compared); ``FrameStore.put`` (decode + lossless store: the first epoch); store-to-batch (``FrameStore.load_clip``
  with the training RandAugment + CLIP preprocessing, stacked into a ``[B, T, 3, R, R]`` batch by
  ``tasks.t2v._videos``, serial and with a thread pool of ``--workers``); decode-to-batch (``load_clip``, no
  store). Each row's frames/s is set against what the JAX train step consumes (``B*T`` frame slots per step / its
  step time): the host pipeline's target is >= 3x that need.
* ``memory``: the peak memory of every measured column (from the other sections' workers).

Sizes. ``--size official``: ViT-B/32 (vision width 768, 12 layers, patch 32 at 224; text width 512, 12 layers,
vocabulary 49,408, 32 words), seqTransf 4 blocks, 12 frames, B = 64, N = 1,000 (MSR-VTT 1k-A). ``--size cpu``
(default on CPU): vision width 256, 4 layers, patch 32 at 224; text width 256, 4 layers (embed 256, the full
vocabulary); seqTransf 4 blocks; 12 frames; B = 16; N = 128.

Weights: the twin as ``torch_ref.clip_wti.official_init`` builds it from a random CLIP of those sizes
(``torch.manual_seed(0)``; ``logit_scale`` 1 as BackBone's CLIP starts it), converted for JAX with
``parity.clip_wti.torch_to_params``: every column runs the SAME weights. Inputs: random preprocessed frames
(N(0, 1), zero padding after each video's frame count; one video in eight shorter than 12 frames) and random
caption ids (SOT, 4..30 random tokens, EOT), from a fixed seed; 3 distinct train batches rotated.

Precision: on CPU both frameworks compute float32. On a GPU the run sets JAX
``jax_default_matmul_precision=highest`` and torch ``allow_tf32=False`` (true float32 in both; ``--matmul-precision
tf32`` for tensor cores in both); ``--bf16`` adds JAX rows with ``model.precision=bf16``.

Method (``benchmarks.common``'s runner and clocks): every measurement in its own subprocess (clean peak memory;
torch.compile's caches in a fresh folder; no JAX persistent cache), identical inputs from a fixed seed, warm-up
calls first, each timed call synchronised, the median of ``--repeats``; compile time as the compiler's own count
(jax.monitoring; torch._dynamo's metrics) and as first call(s) minus steady; FLOPs from the JAX program's jaxpr
(``benchmarks.flops``); peak memory = device peak on GPU, process peak RSS on CPU; the 1-minute load average at the
start and end of each worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from benchmarks.common import (EVAL_TARGET, FW_LABEL, _cell, _device_desc, _fmt_b, _fmt_s, _is_gpu,
                               _jax_memory_analysis, _jax_peak, _load, _load_weights, _median_timed, _peak_rss,
                               _ratio_val, _rss_now, _save_partial, _say, _speed, _target, _torch_compile_clock,
                               _torch_cpu_setup, _torch_peak, announce, device_defaults, jax_clocked, jax_eval_passes,
                               load_twin, memory_row, parse_sections, passes_cells, precision_desc, run_columns,
                               run_compiled_last, run_sections, run_worker, section_rows, target_line,
                               time_jax_train_step, time_torch_steps, worker_main)
from torch_ref.t2v_eval import official_compute_metrics

MODULE = "benchmarks.t2v"
SECTIONS = ("forward", "train", "eval", "input", "memory")
CONFIG = "clip_wti/msrvtt"
# --size cpu: a narrow ViT (the official ViT-B/32 step takes minutes on 2 cores); frames, words, resolution,
# patch, vocabulary and the seqTransf depth stay official.
CPU_WIDTHS = {"vision_width": 256, "vision_layers": 4, "text_width": 256, "text_layers": 4, "embed_dim": 256}
SIZES = {"cpu": {"batch": 16, "eval_n": 128}, "official": {"batch": 64, "eval_n": 1000}}
POOL_VIDEOS = 16  # distinct random videos the in-memory split cycles (each copy shifted: every video distinct)
SIM_MINI_BATCH = 32  # _run_on_single_gpu's mini_batch
TIE = 1e-5  # a rank that differs between frameworks counts as a near-tie when another score is this close
TARGETS = {"train": 1.5, "eval": 1.5, "input": 3.0}


# ================================================================================================ config, data
def _config(spec):
    from jaxprvr.config import load_config

    over = [f"model.{k}={v}" for k, v in (spec.get("widths") or {}).items()]
    if spec.get("batch"):
        over.append(f"train.batch_size={spec['batch']}")
    if spec.get("model_precision"):
        over.append(f"model.precision={spec['model_precision']}")
    return load_config(CONFIG, None, over)


def _twin_dims(m) -> dict:
    """The :class:`torch_ref.clip.CLIP` sizes of a ClipWTIConfig (heads as the Flax model resolves them)."""
    from jaxprvr.models.clip_wti import clip_dims

    d = clip_dims(m)
    return dict(embed_dim=d.embed_dim, image_resolution=d.image_resolution, vision_layers=d.vision_layers,
                vision_width=d.vision_width, vision_patch_size=d.vision_patch_size, context_length=d.context_length,
                vocab_size=d.vocab_size, transformer_width=d.text_width, transformer_heads=d.t_heads,
                transformer_layers=d.text_layers, vision_heads=d.v_heads)


def captions(rng, n: int, max_words: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random captions as CLIP ids (SOT, 4..max_words-2 tokens, EOT = the largest id) and masks, int32."""
    from jaxprvr.models.clip import EOT_ID, SOT_ID

    sot, eot = min(SOT_ID, vocab - 2), min(EOT_ID, vocab - 1)
    ids = np.zeros((n, max_words), np.int32)
    mask = np.zeros((n, max_words), np.int32)
    for i, k in enumerate(rng.integers(6, max_words + 1, n)):
        ids[i, 0], ids[i, k - 1] = sot, eot
        ids[i, 1:k - 1] = rng.integers(1, min(sot, 49000), k - 2)
        mask[i, :k] = 1
    return ids, mask


def frame_counts(rng, n: int, T: int) -> np.ndarray:
    """Frames per video: ``T`` for most (MSR-VTT clips are 10-30 s: 12 frames at 1 frame/s), 1..T-1 for one in
    eight."""
    c = np.full(n, T, np.int64)
    short = rng.random(n) < 0.125
    c[short] = rng.integers(1, T, int(short.sum()))
    return c


def videos(rng, n: int, T: int, R: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random preprocessed videos float32 ``[n, T, 3, R, R]`` (N(0, 1), zeros after the frame count) and
    their int32 masks."""
    v = rng.standard_normal((n, T, 3, R, R), dtype=np.float32)
    counts = frame_counts(rng, n, T)
    mask = (np.arange(T)[None] < counts[:, None]).astype(np.int32)
    v *= mask[:, :, None, None, None]
    return v, mask


def train_batches(cfg, n: int = 3, seed: int = 1) -> list[dict]:
    m = cfg.model
    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, k, 41])
        ids, tm = captions(rng, cfg.train.batch_size, m.max_words, m.vocab_size)
        v, vm = videos(rng, cfg.train.batch_size, m.max_frames, m.image_resolution)
        out.append({"text_ids": ids, "text_mask": tm, "video": v, "video_mask": vm})
    return out


class MemorySplit:
    """A 1k-A-like split in memory with what ``tasks.t2v.Evaluator`` reads (``text_ids``, ``text_mask``,
    ``caption_video``, ``video(i)``, ``n_videos``, ``report()``): N captions, N videos, caption i <-> video i.
    Video i is pool video ``i % POOL_VIDEOS`` plus a per-video constant per channel (a fresh array, as a reader
    returns one), zero after its own frame count: every video a distinct input without holding N of them."""

    def __init__(self, cfg, n: int, seed: int = 3):
        m = cfg.model
        rng = np.random.default_rng([seed, 29])
        self.text_ids, self.text_mask = captions(rng, n, m.max_words, m.vocab_size)
        self._pool = rng.standard_normal((POOL_VIDEOS, m.max_frames, 3, m.image_resolution, m.image_resolution),
                                         dtype=np.float32)
        self._shift = (0.25 * rng.standard_normal((n, 1, 3, 1, 1))).astype(np.float32)
        self._counts = frame_counts(rng, n, m.max_frames)
        self.video_ids = [f"video{i}" for i in range(n)]
        self.caption_video = np.arange(n, dtype=np.int64)
        self.max_frames = m.max_frames

    def __len__(self) -> int:
        return len(self.text_ids)

    @property
    def n_videos(self) -> int:
        return len(self.video_ids)

    def video(self, i: int, rng=None):
        v = self._pool[i % POOL_VIDEOS] + self._shift[i]
        c = int(self._counts[i])
        v[c:] = 0
        return v, (np.arange(self.max_frames) < c).astype(np.int32)

    def report(self) -> dict:
        return {"pairs": len(self), "videos": self.n_videos}


# ================================================================================================ weights
def w_weights(spec) -> dict:
    """The twin as ``official_init`` builds it from a random CLIP (``torch.manual_seed(0)``): its state_dict."""
    import torch

    from torch_ref.clip import CLIP
    from torch_ref.clip_wti import official_init

    cfg = _config(spec)
    m = cfg.model
    dims = _twin_dims(m)
    torch.manual_seed(spec.get("seed", 0))
    clip = CLIP(**dims)
    twin = official_init(clip.state_dict(), m.agg_module, m.num_hidden_layers, seed=42, dims=dims)
    sd = {k: v.detach().cpu().numpy() for k, v in twin.state_dict().items()}
    np.savez(spec["path"], **sd)
    return {"tensors": len(sd), "params": int(sum(p.numel() for p in twin.parameters())),
            "clip_params": int(sum(p.numel() for p in twin.clip.parameters()))}


# ================================================================================================ JAX workers
def _jax_setup(spec):
    import dataclasses

    import jax

    from jaxprvr import sharding as shd
    from jaxprvr.models import build_model
    from parity.clip_wti import torch_to_params

    cfg = _config(spec)
    mcfg, params, _ = torch_to_params(cfg.model, _load_weights(spec["weights"]), "benchmark weights")
    cfg = dataclasses.replace(cfg, model=mcfg)
    model = build_model(cfg.model)
    mesh = shd.make_mesh(jax.devices()[:1])
    return cfg, model, mesh, shd.replicate(params, mesh)


def w_forward_jax(spec) -> dict:
    import jax

    from benchmarks.flops import count_flops

    cfg, model, mesh, params = _jax_setup(spec)
    batches = train_batches(cfg, seed=2)

    def towers(p, ids, video):
        text = model.apply({"params": p}, ids, method="text_features")
        frames = model.apply({"params": p}, video, method="frame_features")
        return text, frames

    fwd = jax.jit(towers)
    dev = [jax.device_put((b["text_ids"], b["video"])) for b in batches]
    fc = count_flops(fwd, params, *dev[0])
    rss0 = _rss_now()
    out0, first, own, _ = jax_clocked(lambda: fwd(params, *dev[0]))
    _say(f"jax forward first call {first:.1f} s (compile events {own:.1f} s)")
    med, times = _median_timed(lambda i: fwd(params, *dev[(i + 1) % 3]), spec["repeats"], jax.block_until_ready)
    if spec.get("out_path"):
        np.savez(spec["out_path"], text=np.asarray(out0[0], np.float32), frames=np.asarray(out0[1], np.float32))
    b = cfg.train.batch_size
    return {"seconds": med, "times": times, "compile_s": own, "first_minus_steady_s": max(first - med, 0.0),
            "flops": fc.flops, "pairs": b, "frames": b * cfg.model.max_frames,
            "peak_device_bytes": _jax_peak(jax.devices()[0]), "peak_rss_bytes": _peak_rss(), "rss_before": rss0,
            "xla_memory": _jax_memory_analysis(fwd, params, *dev[0]), "device_kind": jax.devices()[0].device_kind}


def w_train_jax(spec) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxprvr import sharding as shd
    from jaxprvr.tasks.t2v import BATCH_KEYS, t2v_optimizer
    from jaxprvr.train import make_train_step

    cfg, model, mesh, params = _jax_setup(spec)
    steps_per_epoch = spec["steps_per_epoch"]
    tx = t2v_optimizer(cfg, steps_per_epoch)
    state = shd.replicate({"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}, mesh)
    batches = [shd.shard_batch({k: b[k] for k in BATCH_KEYS}, mesh) for b in train_batches(cfg)]
    timing, memory = time_jax_train_step(make_train_step(model, cfg, tx, mesh, steps_per_epoch), state, params,
                                         batches, spec["repeats"])
    b = cfg.train.batch_size
    return {**timing, **memory, "pairs": b, "frames": b * cfg.model.max_frames,
            "device_kind": jax.devices()[0].device_kind}


def w_eval_jax(spec) -> dict:
    import jax

    from benchmarks.flops import count_flops
    from jaxprvr import sharding as shd
    from jaxprvr.metrics.t2v import t2v_metrics
    from jaxprvr.tasks.t2v import Evaluator

    cfg, model, mesh, params = _jax_setup(spec)
    split = MemorySplit(cfg, spec["n"])
    ev = Evaluator(model, cfg, mesh)
    rss0 = _rss_now()
    res, timing, n_exec, recompiled = jax_eval_passes(lambda: ev.evaluate(params, split),
                                                      lambda: ev.evaluate(params, split, keep_outputs=True))
    # The same work one stage at a time (no background loading): text features, video features, similarity, metrics.
    bs = cfg.data.eval_batch_size
    n = len(split)
    t0 = time.perf_counter()
    tf = [np.asarray(ev._text(params, shd.shard_batch({"x": _pad_rows(split.text_ids[s:s + bs], bs)}, mesh)["x"]))[
        :min(bs, n - s)] for s in range(0, n, bs)]
    text_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vf, vms = [], []
    for s in range(0, n, bs):
        items = [split.video(i) for i in range(s, min(n, s + bs))]
        v, vm = np.stack([x for x, _ in items]), np.stack([y for _, y in items])
        d = shd.shard_batch({"v": _pad_rows(v, bs), "m": _pad_rows(vm, bs)}, mesh)
        vf.append(np.asarray(ev._video(params, d["v"], d["m"]))[:len(items)])
        vms.append(vm)
    video_s = time.perf_counter() - t0
    text_feat, video_feat, video_mask = np.concatenate(tf), np.concatenate(vf), np.concatenate(vms)
    t0 = time.perf_counter()
    sim = ev.similarity(params, text_feat, split.text_mask, video_feat, video_mask)
    sim_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res2 = t2v_metrics(sim, "pairs")
    metrics_s = time.perf_counter() - t0
    if spec.get("sim_out"):
        np.save(spec["sim_out"], res["_sim"])
    metrics = _jax_metrics(res)
    vb = shd.shard_batch({"v": _pad_rows(np.stack([split.video(i)[0] for i in range(min(bs, n))]), bs),
                          "m": _pad_rows(video_mask[:bs], bs)}, mesh)
    blk = cfg.data.sim_block
    fl = (count_flops(ev._text, params, _pad_rows(split.text_ids[:bs], bs)).flops * -(-n // bs)
          + count_flops(ev._video, params, vb["v"], vb["m"]).flops * -(-n // bs)
          + count_flops(ev._sim, params, text_feat[:1].repeat(blk, 0), split.text_mask[:1].repeat(blk, 0),
                        video_feat[:1].repeat(blk, 0), video_mask[:1].repeat(blk, 0)).flops * (-(-n // blk)) ** 2)
    return {**timing, "compiled_executables": n_exec, "recompiles_in_steady_pass": recompiled,
            "text_s": text_s, "video_s": video_s, "sim_s": sim_s, "metrics_s": metrics_s,
            "stages_sum_s": text_s + video_s + sim_s + metrics_s, "flops": fl, "metrics": metrics,
            "stages_metrics_equal": _jax_metrics(res2) == metrics,
            "stages_sim_max_abs_diff": float(np.abs(sim - res["_sim"]).max()), "n": n, "batch": bs,
            "sim_block": blk, "peak_device_bytes": _jax_peak(jax.devices()[0]), "peak_rss_bytes": _peak_rss(),
            "rss_before": rss0}


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    from jaxprvr.tasks.t2v import _pad

    return _pad(a, size, fill=1 if a.dtype.kind == "i" else 0)


METRIC_KEYS = ("R1", "R5", "R10", "R50", "MR", "MeanR")


def _jax_metrics(res: dict) -> dict:
    """The Evaluator's metrics under the official keys (t2v and v2t)."""
    names = {"R1": "R1", "R5": "R5", "R10": "R10", "R50": "R50", "MR": "MdR", "MeanR": "MnR"}
    return {f"{d}/{k}": float(res[f"{d}/{names[k]}"]) for d in ("t2v", "v2t") for k in METRIC_KEYS}


# ================================================================================================ torch workers
def _torch_setup(spec):
    import torch

    from torch_ref.clip_wti import BackBoneTVR

    torch.manual_seed(0)
    _torch_cpu_setup(spec)
    cfg = _config(spec)
    m = cfg.model
    dev = torch.device("cuda" if _is_gpu(spec) else "cpu")
    twin = BackBoneTVR(_twin_dims(m), m.agg_module, m.num_hidden_layers)
    compiled, sync = load_twin(twin, spec["weights"], dev, spec["framework"])
    return cfg, twin, dev, compiled, sync


def _tensors(b: dict, dev) -> tuple:
    """``(ids int64, text_mask float32, video float32, video_mask float32)`` on ``dev`` (the official collate gives
    long ids; the masks enter einsums with float features)."""
    import torch

    return (torch.from_numpy(b["text_ids"].astype(np.int64)).to(dev),
            torch.from_numpy(b["text_mask"].astype(np.float32)).to(dev),
            torch.from_numpy(b["video"]).to(dev), torch.from_numpy(b["video_mask"].astype(np.float32)).to(dev))


def w_forward_torch(spec) -> dict:
    import torch

    cfg, twin, dev, compiled, sync = _torch_setup(spec)
    twin.eval()
    batches = [_tensors(b, dev) for b in train_batches(cfg, seed=2)]

    def towers(ids, tm, video):
        text, _ = twin.get_text_feat(ids, tm)
        b, t = video.shape[:2]
        frames = twin.clip.encode_image(video.reshape((b * t,) + tuple(video.shape[2:]))).float()
        return text, frames.view(b, t, -1)

    run = torch.compile(towers) if compiled else towers

    def call(i):
        ids, tm, video, _ = batches[i % 3]
        with torch.no_grad(), torch.device(dev):
            return run(ids, tm, video)

    rss0 = _rss_now()
    warm = 1  # fixed shapes: one compilation
    t0 = time.perf_counter()
    outs = [call(i) for i in range(warm)]
    sync(None)
    first = time.perf_counter() - t0
    own, frames = _torch_compile_clock() if compiled else (None, None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med, times = _median_timed(lambda i: call(i + warm), spec["repeats"], sync)
    if spec.get("out_path"):
        np.savez(spec["out_path"], text=outs[0][0].cpu().numpy(), frames=outs[0][1].cpu().numpy())
    return {"seconds": med, "times": times, "compile_s": own, "compiled_frames": frames,
            "first_minus_steady_s": max(first - warm * med, 0.0), "peak_device_bytes": _torch_peak(dev),
            "peak_rss_bytes": _peak_rss(), "rss_before": rss0, "threads": torch.get_num_threads()}


def w_train_torch(spec) -> dict:
    import torch

    from torch_ref.clip_wti import official_after_backward, official_optimizer

    cfg, twin, dev, compiled, sync = _torch_setup(spec)
    t = cfg.train
    twin.train()
    batches = [_tensors(b, dev) for b in train_batches(cfg)]
    opt = official_optimizer(twin, lr=t.lr, coef_lr=t.coef_lr, weight_decay=t.wd, warmup=t.lr_warmup_proportion,
                             t_total=spec["steps_per_epoch"] * t.n_epoch)
    run = torch.compile(twin) if compiled else twin
    n_params = sum(p.numel() for p in twin.parameters())
    losses = []

    def call(i):
        with torch.device(dev):
            loss = run(*batches[i % 3])
            loss.backward()
            official_after_backward(twin, opt)
        losses.append(loss.detach())
        return loss

    warm = 1  # the batch shapes never change: torch.compile compiles once (checked: recompiles_during_timing)
    _say(f"torch train ({spec['framework']}): {n_params} params; {warm} warm-up call(s)")
    timing, memory = time_torch_steps(call, sync, dev, compiled, warm, spec["repeats"])
    return {**timing, "params": int(n_params), "loss": float(losses[-1]), **memory}


def w_eval_torch(spec) -> dict:
    """The official evaluation loop (``main_retrieval.py`` ``eval_epoch`` + ``_run_on_single_gpu`` +
    ``compute_metrics``) on the in-memory split."""
    import torch

    cfg, twin, dev, compiled, sync = _torch_setup(spec)
    twin.eval()
    if compiled:
        for name in ("get_text_feat", "get_video_feat", "get_similarity_logits"):
            setattr(twin, name, torch.compile(getattr(twin, name)))
    split = MemorySplit(cfg, spec["n"])
    bs, n = cfg.data.eval_batch_size, len(split)

    def one_pass():
        t = {}
        t0 = time.perf_counter()
        t_feats, t_masks, v_feats, v_masks = [], [], [], []
        text_s = 0.0
        with torch.no_grad(), torch.device(dev):
            for s in range(0, n, bs):  # eval_epoch: one batch of (caption, video) pairs at a time
                idx = range(s, min(n, s + bs))
                items = [split.video(i) for i in idx]
                b = {"text_ids": split.text_ids[s:s + bs], "text_mask": split.text_mask[s:s + bs],
                     "video": np.stack([v for v, _ in items]), "video_mask": np.stack([m for _, m in items])}
                ids, tm, video, vm = _tensors(b, dev)
                t1 = time.perf_counter()
                tf, _ = twin.get_text_feat(ids, tm)
                sync(None)
                text_s += time.perf_counter() - t1
                vf = twin.get_video_feat(video, vm)
                t_feats.append(tf)
                t_masks.append(tm)
                v_feats.append(vf)
                v_masks.append(vm)
            sync(None)
            t["features_s"] = time.perf_counter() - t0
            t["text_s"] = text_s
            t["video_s"] = t["features_s"] - text_s
            t0 = time.perf_counter()
            sim = _run_on_single_gpu(twin, torch.cat(t_masks), torch.cat(v_masks), torch.cat(t_feats),
                                     torch.cat(v_feats), SIM_MINI_BATCH)
            sim = np.concatenate(tuple(sim), axis=0)
            t["sim_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tv = official_compute_metrics(sim)
        vt = official_compute_metrics(sim.T)
        t["metrics_s"] = time.perf_counter() - t0
        return t, sim, tv, vt

    rss0 = _rss_now()
    first, _, _, _ = one_pass()
    own, frames = _torch_compile_clock() if compiled else (None, None)
    _say(f"torch eval ({spec['framework']}) first pass "
         f"{first['features_s'] + first['sim_s'] + first['metrics_s']:.1f} s")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steady, sim, tv, vt = one_pass()
    recompiled = (_torch_compile_clock()[1] - frames) if compiled else None
    if spec.get("sim_out"):
        np.save(spec["sim_out"], sim.astype(np.float32))

    def e2e(t):
        return t["features_s"] + t["sim_s"] + t["metrics_s"]

    metrics = {f"{d}/{k}": float(m[k]) for d, m in (("t2v", tv), ("v2t", vt)) for k in METRIC_KEYS}
    return {"end_to_end_s": e2e(steady), "first_end_to_end_s": e2e(first),
            "first_minus_steady_s": max(e2e(first) - e2e(steady), 0.0), "compile_s": own, "compiled_frames": frames,
            "recompiles_in_steady_pass": recompiled, "text_s": steady["text_s"], "video_s": steady["video_s"],
            "sim_s": steady["sim_s"], "metrics_s": steady["metrics_s"], "metrics": metrics,
            "ranks_t2v": tv["cols"], "n": n, "batch": bs, "sim_block": SIM_MINI_BATCH,
            "peak_device_bytes": _torch_peak(dev), "peak_rss_bytes": _peak_rss(), "rss_before": rss0,
            "threads": torch.get_num_threads()}


def _run_on_single_gpu(model, t_mask_list, v_mask_list, t_feat_list, v_feat_list, mini_batch=32):
    """``main_retrieval.py`` ``_run_on_single_gpu``: the similarity in ``mini_batch`` x ``mini_batch`` blocks, each
    block's logits to numpy, rows concatenated."""
    import torch

    sim_matrix = []
    batch_t_mask = torch.split(t_mask_list, mini_batch)
    batch_v_mask = torch.split(v_mask_list, mini_batch)
    batch_t_feat = torch.split(t_feat_list, mini_batch)
    batch_v_feat = torch.split(v_feat_list, mini_batch)
    with torch.no_grad():
        for t_mask, t_feat in zip(batch_t_mask, batch_t_feat):
            each_row = []
            for v_mask, v_feat in zip(batch_v_mask, batch_v_feat):
                logits, *_ = model.get_similarity_logits(t_feat, t_mask, v_feat, v_mask)
                each_row.append(logits.cpu().detach().numpy())
            sim_matrix.append(np.concatenate(tuple(each_row), axis=-1))
    return sim_matrix


# ================================================================================================ input pipeline
def write_videos(root: Path, n: int, seed: int = 0, width: int = 320, height: int = 240, fps: int = 30,
                 seconds=(10.0, 20.0)) -> list[Path]:
    """``n`` synthetic H.264 mp4s (a moving shape on a plain or noisy background, ``jaxprvr.data.synthetic_t2v``'s
    renderer and PyAV writer) at ``width`` x ``height``, ``fps``, durations uniform in ``seconds``."""
    from jaxprvr.data.synthetic_t2v import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, VideoSpec, encode_video, \
        render_frames

    rng = np.random.default_rng([seed, 77])
    paths = []
    for i in range(n):
        spec = VideoSpec(video_id=f"bench{i:03d}", split="test", shape=SHAPES[i % 4],
                         colour=list(COLOURS)[(i // 4) % 4], direction=list(DIRECTIONS)[(i + 1) % 4],
                         background=BACKGROUNDS[i % 2], width=width, height=height, fps=Fraction(fps),
                         n_frames=int(round(rng.uniform(*seconds) * fps)), codec="libx264", seed=(seed, 77, i))
        paths.append(encode_video(root / f"{spec.video_id}.mp4", render_frames(spec), spec.fps, "libx264"))
    return paths


def _decord_frames(path, max_frames: int, framerate: int):
    """The official ``_get_rawvideo_dec`` read: ``VideoReader(path, ctx=cpu(0))``, fps, the sampled indices,
    ``get_batch(indices).asnumpy()``."""
    import decord

    from jaxprvr.data.video import frame_indices

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
    idx = frame_indices(len(vr), vr.get_avg_fps(), max_frames, framerate, where=path)
    return vr.get_batch(list(idx)).asnumpy(), idx


def w_input(spec) -> dict:
    import concurrent.futures

    from jaxprvr.data.video import FrameStore, _sample_and_decode, load_clip
    from jaxprvr.tasks.t2v import _videos

    T, R, fr, B = spec["max_frames"], spec["resolution"], 1, spec["batch"]
    workers = spec["workers"]
    out = {"rows": [], "videos": spec["videos"], "batch": B, "workers": workers}
    with tempfile.TemporaryDirectory(prefix="benchmarks-t2v-input-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = write_videos(root / "videos", spec["videos"])
        out["write_s"] = time.perf_counter() - t0
        out["video_bytes"] = int(sum(p.stat().st_size for p in paths))
        _say(f"wrote {len(paths)} videos in {out['write_s']:.1f} s")

        def row(stage, impl, frames, seconds, n_workers=1, **kw):
            r = {"stage": stage, "impl": impl, "workers": n_workers, "frames": int(frames), "seconds": seconds,
                 "frames_per_s": frames / seconds, **kw}
            out["rows"].append(r)
            _say(f"{stage} / {impl} / {n_workers} worker(s): {r['frames_per_s']:.0f} frames/s")
            return r

        # -- decode + sample, one video at a time: PyAV (ours) against decord (official), the same indices
        ours = {}
        for p in paths:  # warm the page cache and both decoders' libraries
            ours[p] = _sample_and_decode(p, T, fr)
        frames_total = sum(len(v[1]) for v in ours.values())
        out["sampled_frames_per_video"] = [int(len(v[1])) for v in ours.values()]
        out["decoded_frames_per_video"] = [int(v[0].n_frames) for v in ours.values()]
        secs = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            for p in paths:
                _sample_and_decode(p, T, fr)
            secs.append(time.perf_counter() - t0)
        row("decode + sample", "PyAV (jaxprvr.data.video)", frames_total, float(np.median(secs)))
        try:
            import decord  # noqa: F401

            same, worst = True, 0
            for p in paths:
                f, idx = _decord_frames(p, T, fr)
                same = same and np.array_equal(idx, ours[p][1]) and np.array_equal(f, ours[p][2])
                if f.shape == ours[p][2].shape:
                    worst = max(worst, int(np.abs(f.astype(np.int16) - ours[p][2].astype(np.int16)).max()))
            secs = []
            for _ in range(spec["repeats"]):
                t0 = time.perf_counter()
                for p in paths:
                    _decord_frames(p, T, fr)
                secs.append(time.perf_counter() - t0)
            row("decode + sample", "decord 0.6.0 VideoReader.get_batch (official)", frames_total,
                float(np.median(secs)), frames_identical=bool(same), max_abs_diff=worst)
        except ImportError as e:
            out["decord_error"] = f"decord not importable: {e}"
        # -- FrameStore.put: decode + sample + lossless store (what the first epoch does per video)
        store = FrameStore(root / "store", T, fr)
        t0 = time.perf_counter()
        for i, p in enumerate(paths):
            store.put(f"v{i}", p)
        row("FrameStore.put (decode + sample + store)", "PyAV + np.savez_compressed", frames_total,
            time.perf_counter() - t0)
        out["store_bytes"] = int(sum(f.stat().st_size for f in (root / "store").glob("*.npz")))

        # -- to a batch: B videos (cycling the written ones), RandAugment + preprocess, stacked
        class Source:
            """``tasks.t2v.T2VSet.video``'s shape: video i from the store (or the file), augmented."""

            def __init__(self, from_store: bool):
                self.from_store = from_store

            def video(self, i, rng=None):
                k = i % len(paths)
                if self.from_store:
                    c = store.load_clip(f"v{k}", augment=rng, size=R)
                else:
                    c = load_clip(paths[k], T, fr, augment=rng, size=R)
                return c.video, c.mask

        n_batches = spec["batches"]
        for from_store, stage in ((True, "store-to-batch (FrameStore read + RandAugment + preprocess)"),
                                  (False, "decode-to-batch (load_clip: decode + RandAugment + preprocess)")):
            src = Source(from_store)
            for n_workers in sorted({1, workers}):
                pool = concurrent.futures.ThreadPoolExecutor(n_workers) if n_workers > 1 else None
                try:
                    if from_store:  # warm-up batch (the decode rows follow the decode + sample rows: warm already)
                        idx0 = np.arange(B)
                        _videos(src, idx0, [np.random.default_rng([0, int(i)]) for i in idx0], pool)
                    t0 = time.perf_counter()
                    real = 0
                    for k in range(n_batches):
                        idx = np.arange(k * B, (k + 1) * B)
                        v, m = _videos(src, idx, [np.random.default_rng([1, int(i)]) for i in idx], pool)
                        real += int(m.sum())
                    dt = time.perf_counter() - t0
                finally:
                    if pool is not None:
                        pool.shutdown()
                row(stage, "jaxprvr (tasks.t2v._videos)", n_batches * B * T, dt, n_workers,
                    batch_s=dt / n_batches, real_frames=real, batch_shape=list(v.shape))
    out["peak_rss_bytes"] = _peak_rss()
    out["cpu_count"] = os.cpu_count()
    return out


WORKERS = {"weights": w_weights, "forward_jax": w_forward_jax, "forward_torch": w_forward_torch,
           "train_jax": w_train_jax, "train_torch": w_train_torch, "eval_jax": w_eval_jax,
           "eval_torch": w_eval_torch, "input": w_input}


# ================================================================================================ comparisons
def forward_diffs(paths: dict) -> dict:
    """Max |diff| of every torch column's text tokens and frame embeddings against JAX's."""
    out = {}
    ref = paths.get("jax")
    if not ref or not os.path.exists(ref):
        return out
    j = np.load(ref)
    for fw, p in paths.items():
        if fw == "jax" or not os.path.exists(p):
            continue
        o = np.load(p)
        out[fw] = {k: float(np.abs(j[k].astype(np.float64) - o[k]).max()) for k in ("text", "frames")}
    return out


def eval_equal(ev: dict, sims: dict) -> dict:
    """JAX's metrics against each torch column's official ``compute_metrics``; the two matrices; the rows whose
    rank differs and whether each is a near-tie (another score within ``TIE`` of the diagonal)."""
    j = ev.get("jax", {})
    out = {}
    if not j.get("ok") or not os.path.exists(sims.get("jax", "")):
        return out
    sj = np.load(sims["jax"])
    for fw, r in ev.items():
        if fw == "jax" or not r.get("ok") or not os.path.exists(sims.get(fw, "")):
            continue
        st = np.load(sims[fw])
        a, b = j["metrics"], r["metrics"]
        differ = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        c = {"equal": not differ, "differ": differ, "n_values": len(a),
             "sim_max_abs_diff": float(np.abs(sj.astype(np.float64) - st).max())}
        if fw.startswith("torch"):
            rj = official_compute_metrics(sj)["cols"]
            rt = r.get("ranks_t2v")
            if rt is not None and len(rj) == len(rt):
                rows = np.flatnonzero(np.asarray(rj) != np.asarray(rt))
                d = np.diagonal(st)[:, None]
                close = np.abs(st - d) <= TIE
                np.fill_diagonal(close, False)
                c["rank_rows_differ"] = int(len(rows))
                c["rank_rows_differ_near_tie"] = int(close.any(axis=1)[rows].sum())
        out[fw] = c
    return out


def eval_equal_lines(cmp: dict) -> list[str]:
    lines = []
    for fw, c in cmp.items():
        label = FW_LABEL.get(fw, fw)
        sim = f"similarity max |diff| {c['sim_max_abs_diff']:.2e}"
        if fw == "jax_bf16":
            worst = max((abs(x - (y or 0)) for x, y in c["differ"].values()), default=0.0)
            lines.append(f"eval metrics, JAX bf16 vs JAX float32 (not expected equal): {len(c['differ'])} of "
                         f"{c['n_values']} values differ, largest by {worst:.3g}; {sim}")
        elif c["equal"]:
            lines.append(f"eval metrics equal (JAX Evaluator vs {label} official loop + compute_metrics): EQUAL, all "
                         f"{c['n_values']} values (t2v and v2t R1/R5/R10/R50/MdR/MnR) identical; {sim}")
        else:
            ties = ""
            if "rank_rows_differ" in c:
                ties = (f"; {c['rank_rows_differ']} t2v rank rows differ, {c['rank_rows_differ_near_tie']} of them "
                        f"near-ties (another score within {TIE:g} of the positive)")
            lines.append(f"eval metrics equal (JAX Evaluator vs {label}): NO, {len(c['differ'])} of {c['n_values']} "
                         f"values differ {c['differ']}; {sim}{ties}")
    return lines


# ================================================================================================ report
def _gf(x) -> str:
    return f"{x / 1e9:.1f}" if x else "-"


def report(results: dict) -> str:
    widths = ", ".join(f"{k} {v}" for k, v in (results.get("widths") or {}).items()) or "official widths (ViT-B/32)"
    lines = [f"# benchmarks.t2v — {results['device_desc']}",
             f"clip_wti (BackBone_tvr: CLIP + seqTransf + WTI), size `{results['size']}` ({widths}; "
             f"{results['frames']} frames at {results['resolution']}², {results['max_words']} words), batch "
             f"{results['batch']}, eval N = {results['eval_n']}, precision: {results['precision_desc']}, "
             f"{results['date']}, load average at start {results['loadavg_start'][0]:.2f}, repeats "
             f"{results['repeats']}", ""]
    w = results.get("weights", {})
    if w.get("ok"):
        lines += [f"Weights: {w['params'] / 1e6:.2f}M parameters ({w['clip_params'] / 1e6:.2f}M CLIP), the twin's "
                  "official_init from a random CLIP (seed 0), the same in every column.", ""]
    fwd = results.get("forward")
    if fwd:
        j = fwd.get("jax", {})
        lines += [f"## CLIP towers, forward only ({j.get('frames', '?')} frames through the image tower, "
                  f"{j.get('pairs', '?')} captions through the text tower; no gradient)", "",
                  "| framework | forward (median) | frames/s | JAX ÷ PyTorch speed | GFLOP | achieved GFLOP/s | "
                  "compile (compiler's own) | first call(s) − steady | max abs diff vs JAX (text / frames) | "
                  "peak memory | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

        def forward_cells(fw, r):
            fl, s, d = j.get("flops"), r["seconds"], r.get("max_abs_diff_vs_jax")
            dd = f"{d['text']:.1e} / {d['frames']:.1e}" if d else "-"
            return (f"{_fmt_s(s)} | {j.get('frames', 0) / s:.0f} | {_speed(fw, fwd, 'seconds')} | {_gf(fl)} | "
                    f"{fl / s / 1e9 if fl else 0:.1f} | {_fmt_s(r.get('compile_s'))} | "
                    f"{_fmt_s(r.get('first_minus_steady_s'))} | {dd}")

        lines += section_rows(fwd, 11, forward_cells)
        lines.append("")
    train = results.get("train")
    if train:
        j = train.get("jax", {})
        lines += [f"## Training step ({j.get('pairs', '?')} pairs, {j.get('frames', '?')} frames; loss, backward, "
                  f"clip + BertAdam + clamp; {(j.get('params') or 0) / 1e6:.2f}M parameters)", "",
                  "| framework | step (median) | pairs/s | frames/s | JAX ÷ PyTorch speed | GFLOP/step | "
                  "achieved GFLOP/s | compile (compiler's own) | first call(s) − steady | loss (last step) | "
                  "peak memory | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

        def train_cells(fw, r):
            s, fl = r["seconds"], j.get("flops")
            return (f"{_fmt_s(s)} | {j.get('pairs', 0) / s:.2f} | {j.get('frames', 0) / s:.1f} | "
                    f"{_speed(fw, train, 'seconds')} | {_gf(fl)} | {fl / s / 1e9 if fl else 0:.1f} | "
                    f"{_fmt_s(r.get('compile_s'))} | {_fmt_s(r.get('first_minus_steady_s'))} | "
                    f"{r.get('loss', float('nan')):.4f}")

        lines += section_rows(train, 12, train_cells)
        lines += ["", target_line(results, "train", _ratio_val(train, "seconds"), "Train target",
                                  "JAX ÷ torch eager step time")]
        c = train.get("torch_compile", {})
        if c.get("ok") and j.get("ok"):
            lines.append(f"JAX ÷ torch.compile: {c['seconds'] / j['seconds']:.2f}× (torch.compile recompiled "
                         f"{c.get('recompiles_during_timing')} time(s) during the timed steps)")
        if j.get("ok"):
            lines.append(f"JAX jit cache entries after the timed steps: {j.get('jit_cache_entries')}")
        lines.append("")
    ev = results.get("eval")
    if ev:
        j = ev.get("jax", {})
        lines += [f"## Evaluation end to end ({results['eval_n']} captions × {results['eval_n']} videos, "
                  "1k-A-like, in memory: features + full WTI similarity + R@K/MdR/MnR both ways)", "",
                  "| framework | text features | video features | similarity | metrics | end to end, steady | "
                  "JAX ÷ PyTorch | end to end, first pass | JAX ÷ PyTorch, first pass | compile (compiler's own) | "
                  "t2v R@1 | peak memory | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        lines += section_rows(ev, 13, lambda fw, r: f"{_fmt_s(r['text_s'])} | {_fmt_s(r['video_s'])} | "
                                                    f"{_fmt_s(r['sim_s'])} | {_fmt_s(r['metrics_s'])} | "
                                                    f"{passes_cells(fw, ev, r)} | {r['metrics']['t2v/R1']:.2f}")
        lines += ["", "JAX: the Evaluator end to end (video batches loaded on a background thread while the device "
                  "runs the previous one; similarity in blocks of " + str(j.get("sim_block", "?")) + "), then the "
                  "same work one stage at a time for the stage columns. Torch: the official loop, text and video "
                  f"features per batch of {j.get('batch', 16)} pairs, _run_on_single_gpu blocks of "
                  f"{SIM_MINI_BATCH}×{SIM_MINI_BATCH} through get_similarity_logits, compute_metrics on the matrix "
                  "and its transpose; its stage columns are the steady pass's.", "",
                  target_line(results, "eval", _ratio_val(ev, "end_to_end_s"), *EVAL_TARGET)]
        lines += eval_equal_lines(results.get("eval_equal", {})) + [""]
    inp = results.get("input")
    if inp:
        lines += _input_lines(results, inp)
    if "memory" in results.get("sections", []):
        lines += ["## Peak memory", "", "| section | framework | peak (process RSS on CPU, device on GPU) | "
                  "above the worker's RSS before its first call | XLA plan (args + out + temp) |",
                  "|---|---|---:|---:|---:|"]
        for section in ("forward", "train", "eval"):
            lines += [memory_row(section, fw, r) for fw, r in (results.get(section) or {}).items() if r.get("ok")]
        if inp and inp.get("ok"):
            lines.append(f"| input | host pipeline | {_fmt_b(inp.get('peak_rss_bytes'))} | - | - |")
        lines.append("")
    return "\n".join(lines)


def _input_lines(results, inp) -> list[str]:
    if not inp.get("ok"):
        return ["## Input pipeline (host)", "", f"failed: {_cell(inp.get('error', '?'))} ({_load(inp)})", ""]
    j = (results.get("train") or {}).get("jax", {})
    need = j["frames"] / j["seconds"] if j.get("ok") else None
    spf = inp.get("sampled_frames_per_video") or []
    lines = [f"## Input pipeline (host) against the JAX train step ({inp['videos']} synthetic 320×240 H.264 mp4s, "
             f"30 fps, 10–20 s, {sum(inp.get('decoded_frames_per_video') or [0]):,} frames in all; "
             f"{int(np.mean(spf)) if spf else '?'} sampled frames per video on average at 1 frame/s; batch "
             f"{inp['batch']} × {results['frames']} frame slots; load {_load(inp)})", "",
             "| stage | implementation | threads | frames/s | per batch | ÷ the JAX step's need |",
             "|---|---|---:|---:|---:|---:|"]
    for r in inp["rows"]:
        extra = ""
        if "frames_identical" in r:
            extra = " (frames identical to PyAV's)" if r["frames_identical"] else \
                f" (frames differ from PyAV's, max {r['max_abs_diff']})"
        ratio = f"{r['frames_per_s'] / need:.1f}×" if need else "-"
        lines.append(f"| {r['stage']} | {r['impl']}{extra} | {r['workers']} | {r['frames_per_s']:.0f} | "
                     f"{_fmt_s(r.get('batch_s'))} | {ratio} |")
    lines.append("")
    if need:
        lines.append(f"The JAX train step consumes {j['frames']} frame slots per {_fmt_s(j['seconds'])}: "
                     f"{need:.1f} frames/s. Decode rows count the sampled frames they return; batch rows count "
                     "B × T slots (padding included), as the step does.")
        best = max((r for r in inp["rows"] if r["stage"].startswith("store-to-batch")),
                   key=lambda r: r["frames_per_s"], default=None)
        if best:
            v = best["frames_per_s"] / need
            lines.append(f"Input target (store-to-batch, {best['workers']} thread(s), ÷ the step's need): {v:.1f}× → "
                         f"{_target(results, 'input', v)}")
    if inp.get("decord_error"):
        lines.append(f"decord: {inp['decord_error']}")
    lines += [f"Writing the videos took {inp.get('write_s', 0):.1f} s ({(inp.get('video_bytes') or 0) / 2**20:.1f} "
              f"MiB); the frame store holds {(inp.get('store_bytes') or 0) / 2**20:.1f} MiB.", ""]
    return lines


# ================================================================================================ driver
def _run(args, sections, base, results, log, scratch) -> None:
    fws_torch = ["torch"] + (["torch_compile"] if args.torch_compile == "on" else [])
    jax_fws = ["jax"] + (["jax_bf16"] if args.bf16 else [])
    weights = os.path.join(scratch, "weights.npz")
    model_sections = [s for s in ("forward", "train", "eval") if s in sections]
    if model_sections:
        made = run_worker({**base, "task": "weights", "path": weights}, args.timeout, log, module=MODULE)
        results["weights"] = made
        if not made.get("ok"):
            for s in model_sections:
                results[s] = {"jax": {"ok": False, "error": f"weights: {made.get('error')}"}}
            model_sections = []
    outs = {"forward": {}, "eval": {}}
    deferred = []

    def spec(section, fw):
        s = {**base, "task": f"{section}_{'jax' if fw.startswith('jax') else 'torch'}", "framework": fw,
             "weights": weights, "steps_per_epoch": 1000}
        if fw == "jax_bf16":
            s["model_precision"] = "bf16"
        if section == "eval":
            s["n"] = args.eval_n
            outs["eval"][fw] = s["sim_out"] = os.path.join(scratch, f"sim-{fw}.npy")
        if section == "forward":
            outs["forward"][fw] = s["out_path"] = os.path.join(scratch, f"forward-{fw}.npz")
        return s

    def after(section):
        if section == "forward":
            for fw, d in forward_diffs(outs["forward"]).items():
                results["forward"][fw]["max_abs_diff_vs_jax"] = d
        if section == "eval":
            results["eval_equal"] = eval_equal(results["eval"], outs["eval"])
            announce(MODULE, eval_equal_lines(results["eval_equal"]))
        _save_partial(args.out, results)

    for section in model_sections:
        results[section] = {}
        run_columns(results[section], jax_fws + fws_torch, lambda fw, section=section: spec(section, fw), deferred,
                    section, args.timeout, log, args.out, results, module=MODULE)
        after(section)
    if "input" in sections:
        results["input"] = run_worker({"device": base["device"], "task": "input", "videos": args.input_videos,
                                       "batch": base["batch"], "batches": args.input_batches,
                                       "workers": args.workers, "max_frames": results["frames"],
                                       "resolution": results["resolution"], "repeats": min(base["repeats"], 2)},
                                      args.timeout, log, module=MODULE)
        _save_partial(args.out, results)
    # torch.compile last, the forward first (the eval column compiles the same towers, the train column the towers
    # and their backward): if the forward does not compile in time, the others are skipped.
    run_compiled_last(deferred, results, args.compile_timeout or args.timeout, log, MODULE, after)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.t2v",
                                description="Text-video retrieval (clip_wti, BackBone_tvr): JAX vs the PyTorch twin "
                                            "side by side on one device (CLIP forward, train step, 1k-A-like "
                                            "evaluation end to end, the host video pipeline against decord, peak "
                                            "memory); prints markdown tables, writes JSON.")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)} (default all)")
    p.add_argument("--device", choices=("cpu", "gpu"), default=None, help="default: gpu if JAX sees one, else cpu")
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="official: ViT-B/32, B 64, N 1000; cpu (default on CPU): "
                        + ", ".join(f"{k} {v}" for k, v in CPU_WIDTHS.items()) + ", B 16, N 128")
    p.add_argument("--batch", type=int, default=None, help="pairs per training step and forward batch")
    p.add_argument("--widths", default=None, metavar="K=V,...",
                   help="model fields over the size's (e.g. vision_layers=2,image_resolution=64: a quick check)")
    p.add_argument("--eval-n", type=int, default=None, help="captions = videos of the in-memory split")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3 CPU, 10 GPU)")
    p.add_argument("--torch-compile", choices=("on", "off"), default="on",
                   help="also time the twin under torch.compile (Inductor; C++ builds on CPU)")
    p.add_argument("--bf16", action="store_true", help="add JAX rows with model.precision=bf16")
    p.add_argument("--matmul-precision", dest="precision", choices=("highest", "tf32", "default"), default=None,
                   help="float32 matmul precision in both frameworks (default: highest on GPU = true float32; CPU: "
                        "float32)")
    p.add_argument("--input-videos", type=int, default=16, help="synthetic mp4s of the input section")
    p.add_argument("--input-batches", type=int, default=None, help="batches timed per input row (default 2 CPU, 4 GPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads of the input section's pool rows (default: os.cpu_count(), what a host of that many "
                        "cores can give the loader)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement subprocess")
    p.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds per torch.compile subprocess (default 300 on CPU, --timeout on GPU)")
    p.add_argument("--out", default=None, help="write all results as JSON")
    p.add_argument("--log", default=None, help="the workers' stderr (default: a temp file)")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the tables of a saved --out JSON (a partial one, from a run cut short, too) and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker, WORKERS)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0

    device, size = device_defaults(args, 10, 300)
    args.eval_n = args.eval_n or SIZES[size]["eval_n"]
    args.workers = args.workers or os.cpu_count() or 1
    args.input_batches = args.input_batches or (4 if device == "gpu" else 2)
    sections = parse_sections(args.sections, SECTIONS)
    if sections is None:
        return 2
    base = {"device": device, "repeats": args.repeats, "batch": args.batch or SIZES[size]["batch"],
            "precision": None if args.precision == "default" else args.precision}
    if size == "cpu":
        base["widths"] = dict(CPU_WIDTHS)
    for kv in (args.widths or "").split(","):
        if kv:
            k, _, v = kv.partition("=")
            base.setdefault("widths", {})[k.strip()] = v.strip()
    desc = precision_desc(device, args.precision, "true float32 in both (JAX jax_default_matmul_precision=highest, "
                          "torch allow_tf32=False)" + ("; JAX bf16 rows: model.precision=bf16" if args.bf16 else ""))
    cfg = _config(base)
    log_path = args.log or tempfile.mkstemp(prefix="benchmarks-t2v-", suffix=".log")[1]
    results = {"device": device, "device_desc": _device_desc(device), "size": size, "widths": base.get("widths"),
               "batch": base["batch"], "eval_n": args.eval_n, "frames": cfg.model.max_frames,
               "resolution": cfg.model.image_resolution, "max_words": cfg.model.max_words,
               "precision": args.precision, "precision_desc": desc, "repeats": args.repeats,
               "sections": sections, "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": os.getloadavg(),
               "log": log_path, "targets": dict(TARGETS), "workers": args.workers}
    return run_sections(results, log_path, "benchmarks-t2v-",
                        lambda log, scratch: _run(args, sections, base, results, log, scratch), report,
                        args.out)


if __name__ == "__main__":
    sys.exit(main())
