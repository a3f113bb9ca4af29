"""Moment retrieval with MESM (``jaxprvr.models.mesm``): JAX against the PyTorch twin (``torch_ref.mesm``), side by
side in one run on one device. Started through ``benchmarks.vmr``:

    python -m benchmarks.vmr --models mesm                          # CPU: train, eval, memory; size "cpu"
    python -m benchmarks.vmr --models mesm --sections train --size official
    python -m benchmarks.vmr --models mesm --sections profile       # where the time of one step goes
    python -m benchmarks.vmr --models mesm --device gpu --size official --bf16 --out mesm_gpu.json

Config: Charades-STA, the official C+SF_C variant (``load_config("charades", "mesm")``): hidden 256, 8 heads, FFN
1024, enhancer / aligner / encoder / decoder 2 layers each, SS-MESM 4, 10 queries; video features 512 + 2304 (+2
TEF), text 512 (CLIP ``last_hidden_state``), 16 words, at most 194 frames; 12 videos per training batch, 30 per
evaluation batch. The data is a synthetic Charades-STA written in the official layout by
``jaxprvr.data.synthetic_mesm`` at the official widths (1 s clips, 12-45 s videos and one long video per split,
pooled to 194 frames, as the real split's longest; 1-3 moments with 1-2 sentences each: ~3 queries per video, real
train 2.3, test 2.8), read by the task's own reader (``MESMSet``). Both frameworks get the same batches.

Sections (``--sections``, default ``train,eval,memory``):

* ``train``: one optimizer step at the official batch (12 videos and their queries). JAX: the trainer's jitted
  ``jaxprvr.train.make_train_step`` (``TASK.loss``: the negatives and masked words drawn in-graph, the official
  criterion with its matching; torch-AdamW with the trainable mask, ``clip_grad_norm_`` 0.1; the state donated).
  The batch is the task's static one: rows padded to the split's largest batch and frames to the split's longest
  video (194 here, as on real Charades-STA). PyTorch: ``torch_ref.mesm_loss.official_step`` (forward with the
  official samplers: ``sample_outclass_neg``'s ``randperm`` per row and ``np.random.choice`` per row for the MLM;
  the criterion with scipy's Hungarian matcher; backward; ``clip_grad_norm_`` 0.1; AdamW) on the official collate
  dict (padded to the batch's own longest video), eager and with the twin under ``torch.compile`` (Inductor; one
  worker with ``--compile-timeout``, default 600 s on CPU: a compile that runs out is a failure cell; the compiled
  evaluation runs first, and when it fails the compiled train columns are skipped). Two variants:
  ``cached``: the text features given (``words_feat``; the JAX trainer caches the frozen CLIP tower's output per
  sentence, so this is what training costs in jaxprvr); ``clip``: the frozen CLIP text tower (ViT-B/32's: 12
  layers, width 512, random weights, the same in both) inside the step, as the official code runs it in every
  forward. On CPU the tower runs in float32 in both frameworks (the official fp16 tower is a GPU setting). JAX
  runs it on the batch's 16-token rows (``words_id`` as the static batch holds it; exact under the causal mask);
  the official collate gives the twin 77-token rows (``CLIP_encode_text`` truncates the output to 16 words), so the
  twin also gets a row on the same 16-token rows (``torch eager, 16 tokens``) to separate the frameworks from the
  token count. The cached variant has a diagnostic JAX row, ``JAX, per-batch shapes``: each batch padded only to
  its own rows and frames (rounded up to 8; one compiled program per shape), i.e. what the static capacities cost.
* ``eval``: a synthetic test split end to end: JAX ``tasks.vmr_detr.Evaluator`` (the jitted eval forward per batch,
  ``metrics.moments.postprocess`` = ``PostProcessorDETR`` + the submission rows, ``eval_submission``) vs the twin
  in eval mode on the official batches of the same plan (``is_training=False``; the official forward also runs the
  negative branch, which the evaluation never reads; the Flax eval forward skips it) + the same post-processing
  and metrics, eager and compiled. Two passes per column in a fresh process: the first includes the compilations,
  the second is the steady state; the stage times (batches from the reader, forward, post-processing, metrics) are
  a third pass, one stage at a time. An "eval metrics equal" line compares the metric dicts.
* ``memory``: the peak memory of every measured column (process peak RSS on CPU, device peak on GPU).
* ``profile`` (not in the default set): the JAX train step traced with ``jax.profiler`` (XLA op time per model
  component) and one eager twin step under ``torch.profiler`` (aten self time per op group; the rest of the wall
  time is Python and dispatch).

Weights: the twin's official initialisation (``torch.manual_seed(0)``, ``build_mesm``) converted with
``parity.mesm_keys.torch_to_params`` (the parity-checked table); the CLIP tower's (``torch.manual_seed(1)``,
``torch_ref.mesm.CLIPTextEncoder``) with ``parity.clip.state_dict_to_params``.

Sizes: ``--size official`` (default on GPU) is the official model; ``--size cpu`` (default on CPU) is the same
model (every width, layer count and batch size official: one official step takes 5-30 s on 2 loaded cores, so
nothing is narrowed; ``CPU_WIDTHS`` is where to do it) with a smaller synthetic test split (``--eval-videos``,
default 120 on cpu, 1334 = the real test split on official).

Method (as ``benchmarks.vmr``/``benchmarks.prvr``): every measurement in its own subprocess (clean peak memory,
torch.compile's caches in a fresh folder, no JAX persistent cache); identical batches from fixed seeds, 3 batches
rotated; warm-up calls first (torch.compile: 3, one per batch shape: the row counts and frame lengths differ between
batches, as in real data); each timed call synchronised; the median of ``--repeats``; compile time as the
compiler's own count and as first call(s) minus steady; FLOPs from the JAX program's jaxpr (``benchmarks.flops``;
the JAX program works on the padded static batch, so its FLOPs are more than the twin's on the same data); the
1-minute load average at the start and end of each worker (the machine may be shared).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import (EVAL_TARGET, FW_LABEL, NO_JAX_EVAL, _cell, _device_desc, _fmt_s, _jax_peak,
                               _load_weights, _peak_rss, _ratio_val, _rss_now, _save_partial, _say, _speed,
                               _torch_compile_clock, _torch_cpu_setup, _torch_peak, announce, device_defaults,
                               jax_eval_passes, load_twin, memory_row, metric_diffs, parse_sections, precision_desc,
                               run_columns, run_sections, run_worker, section_rows, target_line, time_jax_train_step,
                               time_torch_steps, torch_profiled, worker_main)

MODULE = "benchmarks.vmr_detr"  # the workers: python -m benchmarks.vmr_detr --worker SPEC
SECTIONS = ("train", "eval", "memory", "profile")
DEFAULT_SECTIONS = ("train", "eval", "memory")
VARIANTS = ("cached", "clip")
DATASET = "charades"
TRAIN_VIDEOS = 36  # 3 training batches of 12
TEST_SPLIT = (1334, 3720)  # real Charades-STA test: videos, queries
EVAL_VIDEOS = {"cpu": 120, "official": 1334}
# --size cpu narrows nothing (the official step fits 2 cores); kept as the place to do so
CPU_WIDTHS: dict = {}
CLIP_SEED = 1
FW_LABEL = {**FW_LABEL, "torch_16": "torch eager, 16 tokens", "jax_fitted": "JAX, per-batch shapes (diagnostic)"}


# ================================================================================================ config and data
def _config(spec):
    from jaxprvr.config import load_config

    over = [f"model.{k}={v}" for k, v in (spec.get("widths") or {}).items()]
    over.append("model.clip_dtype=fp32")  # CPU: the tower in float32 in both frameworks (GPU: the same, for parity)
    if spec.get("pos_tagger"):
        over.append(f"data.pos_tagger={spec['pos_tagger']}")
    if spec.get("compute_dtype"):
        over.append(f"model.compute_dtype={spec['compute_dtype']}")
    return load_config(DATASET, "mesm", over)


def _clip_dims(cfg):
    from jaxprvr.models.clip import CLIPDims

    m = cfg.model
    return CLIPDims(embed_dim=m.clip_width, text_width=m.clip_width, text_layers=m.clip_layers,
                    text_heads=m.clip_heads, vocab_size=m.clip_vocab_size,
                    context_length=m.clip_context_length).validate("model.clip_*")


def _torch_clip(cfg, sd=None):
    """The official frozen text tower (float32; ``torch_ref.mesm.CLIPTextEncoder``), ``sd`` loaded when given."""
    import torch

    from torch_ref.mesm import CLIPTextEncoder

    d = _clip_dims(cfg)
    enc = CLIPTextEncoder(d.embed_dim, d.context_length, d.vocab_size, d.text_width, d.t_heads, d.text_layers,
                          fp16=False)
    if sd is not None:
        enc.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    return enc.eval()


def _jax_clip(cfg, sd):
    """``(tower, params)``: the Flax text tower (float32) with the torch tower's weights."""
    import jax.numpy as jnp

    from jaxprvr.models.clip import TextTower
    from parity.clip import state_dict_to_params

    dims, params, _ = state_dict_to_params(sd, "benchmark CLIP tower", visual=False, dims=_clip_dims(cfg))
    return TextTower(dims, jnp.float32), params["text"]


class CachedText:
    """The text features of every token row of the benchmark's splits, computed once by the ``data`` worker with
    the Flax tower (what ``tasks.vmr_detr.TextFeatures`` caches per row); looked up per row."""

    kind = "CLIP"

    def __init__(self, path):
        z = _load_weights(path)
        self.cache = {r.tobytes(): f for r, f in zip(z["ids"].astype(np.int32), z["feats"])}

    def __call__(self, ids):
        ids = np.asarray(ids, np.int32)
        return np.stack([self.cache[r.tobytes()] for r in ids])


def open_split(spec, split: str, text=True):
    """``(cfg, ds)``: the task's ``MESMSet`` of the synthetic data (``cfg`` with ``model.ss_slots`` from the
    training split, as the trainer sets it), the text features from the data worker's cache."""
    from unittest import mock

    from jaxprvr.tasks import vmr_detr as V

    cfg = _config(spec)
    path = spec["text_cache"] if text else None

    def make(cfg_, root_, tok=None):
        return CachedText(path) if path else None

    with mock.patch.object(V, "TextFeatures", make):
        ds = V.MESMSet(cfg, spec["data_root"], split)
        train = ds if split == "train" else V.MESMSet(cfg, spec["data_root"], "train")
    return V.TASK.with_data_dims(cfg, train), ds


def train_batches(ds, n: int = 3) -> list:
    """The first ``n`` batches of a shuffled training epoch (seed 0): ``(MESMBatch, static dict)`` (the static
    dict keeps ``words_id``, the batch's 16-token rows, beside ``words_feat``)."""
    out = []
    for b in ds.ds.batches(np.random.default_rng(0), True):
        s = dict(b.static)
        ids = s["words_id"]
        s = ds.static(type("B", (), {"static": s})())
        s["words_id"] = ids
        out.append((b, s))
        if len(out) == n:
            break
    return out


def w_weights(spec) -> dict:
    """The twin's official initialisation and the CLIP tower's, as numpy state dicts."""
    import torch

    from torch_ref.mesm import build_mesm

    cfg = _config(spec)
    torch.manual_seed(0)
    twin = build_mesm(cfg.model, cfg.loss)
    np.savez(spec["path"], **{k: v.detach().numpy() for k, v in twin.state_dict().items()})
    torch.manual_seed(CLIP_SEED)
    clip = _torch_clip(cfg)
    np.savez(spec["clip_path"], **{k: v.detach().numpy() for k, v in clip.state_dict().items()})
    return {"tensors": len(twin.state_dict()), "params": int(sum(p.numel() for p in twin.parameters())),
            "clip_params": int(sum(p.numel() for p in clip.parameters()))}


def w_data(spec) -> dict:
    """The synthetic Charades-STA (official layout and widths) and the text features of its token rows."""
    import jax
    import jax.numpy as jnp

    from jaxprvr.data import synthetic_mesm

    synthetic_mesm.write(DATASET, "C+SF_C", spec["data_root"], sizes={"train": spec["train_videos"],
                                                                       "test": spec["videos"]}, seed=0)
    cfg = _config(spec)
    tower, cp = _jax_clip(cfg, _load_weights(spec["clip_weights"]))
    run = jax.jit(lambda p, ids: tower.apply({"params": p}, ids)["hidden"].astype(jnp.float32))
    rows = {}
    info = {}
    for split in ("train", "test"):
        _, ds = open_split(spec, split, text=False)
        n_items = len(ds)
        for b in ds.ds.batches(None, split == "train"):
            for r in np.asarray(b.static["words_id"], np.int32):
                rows.setdefault(r.tobytes(), r)
        caps = ds.ds.capacities(split == "train")
        info[split] = {"videos": n_items, "queries": ds.n_queries, "rows_capacity": caps.rows,
                       "frames_capacity": caps.video}
    ids = np.stack(list(rows.values()))
    n, chunk = len(ids), 64
    pad = np.concatenate([ids, np.zeros((-(-n // chunk) * chunk - n, ids.shape[1]), np.int32)])
    feats = np.concatenate([np.asarray(run(cp, pad[i:i + chunk])) for i in range(0, len(pad), chunk)])[:n]
    np.savez(spec["text_cache"], ids=ids, feats=feats)
    return {"splits": info, "distinct_rows": n}


# ================================================================================================ JAX workers
def _jax_setup(spec, split):
    import jax

    from jaxprvr import sharding as shd
    from jaxprvr.models import build_model
    from parity.mesm_keys import torch_to_params

    cfg, ds = open_split(spec, split)
    model = build_model(cfg.model)
    mesh = shd.make_mesh(jax.devices()[:1])
    params = torch_to_params(_load_weights(spec["weights"]), cfg.model)
    return cfg, ds, model, mesh, shd.replicate(params, mesh)


def _jax_train(spec):
    """The trainer's step (and, for the ``clip`` variant, the step with the text tower in front, one program)."""
    import jax
    import jax.numpy as jnp

    from jaxprvr import sharding as shd
    from jaxprvr.tasks.vmr_detr import BATCH_KEYS
    from jaxprvr.train import make_optimizer, make_train_step

    cfg, ds, model, mesh, params = _jax_setup(spec, "train")
    spe = 1000  # epoch 1 throughout (StepLR drops at lr_drop = 400 epochs)
    tx = make_optimizer(cfg, params, spe)
    state = shd.replicate({"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}, mesh)
    step = make_train_step(model, cfg, tx, mesh, spe)
    raw = train_batches(ds)
    if spec.get("bucket"):  # diagnostic: each batch padded only to its own rows and frames (rounded up to 8)
        raw = [(b, _fitted_static(ds, b)) for b, _ in raw]
    keys = ["words_id"] if spec["variant"] == "clip" else []
    batches = [shd.shard_batch({k: s[k] for k in BATCH_KEYS + tuple(keys) if k in s and not
                                (spec["variant"] == "clip" and k == "words_feat")}, mesh) for _, s in raw]
    extra = ()
    if spec["variant"] == "clip":
        tower, cp = _jax_clip(cfg, _load_weights(spec["clip_weights"]))
        cp = shd.replicate(cp, mesh)
        inner = step

        def step_clip(state, batch, keys, clip_params):
            batch = dict(batch)
            ids = batch.pop("words_id")
            feat = jax.lax.stop_gradient(tower.apply({"params": clip_params}, ids)["hidden"].astype(jnp.float32))
            batch["words_feat"] = jnp.where((batch["row_group"] >= 0)[:, None, None], feat, 0.0)
            return inner(state, batch, keys)

        step = jax.jit(step_clip, donate_argnums=(0,))
        extra = (cp,)
    info = {"videos": cfg.train.batch_size, "rows": float(np.mean([int(s["num_rows"]) for _, s in raw])),
            "row_slots": int(raw[0][1]["video_feat"].shape[0]), "frames": int(raw[0][1]["video_feat"].shape[1]),
            "shapes": [list(s["video_feat"].shape[:2]) for _, s in raw],
            "twin_frames": [int(np.shape(b.official["video_feat"])[1]) for b, _ in raw]}
    return cfg, step, state, params, batches, extra, info


def _fitted_static(ds, b) -> dict:
    """The static dict of one batch with its own shapes: rows and frames of the batch, rounded up to 8."""
    import dataclasses

    from jaxprvr.data.mesm import to_static

    o = b.official
    caps = dataclasses.replace(ds.ds.capacities(True), rows=-(-len(o["qid"]) // 8) * 8,
                               video=-(-int(np.shape(o["video_feat"])[1]) // 8) * 8)
    s = to_static(o, caps)
    ids = s["words_id"]
    s = ds.static(type("B", (), {"static": s})())
    s["words_id"] = ids
    return s


def w_train_jax(spec) -> dict:
    import jax

    cfg, step, state, params, batches, extra, info = _jax_train(spec)
    # bucket: one program per batch shape, all three compiled before the timed calls
    timing, memory = time_jax_train_step(step, state, params, batches, spec["repeats"], extra,
                                         2 if spec.get("bucket") else 1, f"jax train ({spec['variant']})")
    return {**info, **timing, "tokens": int(batches[0]["words_mask"].shape[1]) if spec["variant"] == "clip" else None,
            **memory, "device_kind": jax.devices()[0].device_kind}


def _submission(d, b, s, logits, spans, sal, qs):
    from jaxprvr.metrics.moments import postprocess

    n = len(qs)
    return postprocess(logits[:n], spans[:n], sal[:n], np.asarray([q.duration for q in qs]), clip_len=d.clip_len,
                       max_ts_val=d.max_ts_val, qid=[q.qid for q in qs], query=[q.sentence for q in qs],
                       vid=[q.video_id for q in qs], video_mask=np.asarray(s["video_mask"])[:n])


def w_eval_jax(spec) -> dict:
    import jax

    from benchmarks.flops import count_flops
    from jaxprvr.metrics.moments import eval_submission, official_dataset_name
    from jaxprvr.tasks.vmr_detr import BATCH_KEYS, Evaluator

    cfg, ds, model, mesh, params = _jax_setup(spec, "test")
    ev = Evaluator(model, cfg, mesh)
    rss0 = _rss_now()
    res, timing, _, _ = jax_eval_passes(lambda: ev.evaluate(params, ds), lambda: ev.evaluate(params, ds))
    # the same work one stage at a time: batches (reader + collate + static + cached text), forward, post, metrics
    d = cfg.data
    fwd = ev._fwd(ds.max_item_rows)
    t0 = time.perf_counter()
    host = list(ds.batches(None, False))
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = [jax.device_get(fwd(params, {k: s[k] for k in BATCH_KEYS if k in s})) for _, s in host]
    fwd_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sub = []
    for (b, s), (lg, sp, sal) in zip(host, outs):
        sub += _submission(d, b, s, lg, sp, sal, [ds.ds.queries[r] for item in b.items for r in item])
    post_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res2 = eval_submission(sub, ds.ds.gt_rows(), official_dataset_name(d.dataset))
    metrics_s = time.perf_counter() - t0
    s0 = host[0][1]
    fl = count_flops(fwd, params, {k: s0[k] for k in BATCH_KEYS if k in s0}).flops * len(host)
    brief = {k: v for k, v in res.items() if k != "n_queries"}
    return {**timing, "data_s": data_s, "forward_s": fwd_s, "post_s": post_s, "metrics_s": metrics_s,
            "flops": fl, "metrics": brief, "stages_equal": dict(res2["brief"]) == brief, "videos": len(ds),
            "queries": res["n_queries"], "batches": len(host), "row_slots": int(s0["video_feat"].shape[0]),
            "frames": int(s0["video_feat"].shape[1]), "peak_device_bytes": _jax_peak(jax.devices()[0]),
            "peak_rss_bytes": _peak_rss(), "rss_before": rss0}


# ================================================================================================ torch workers
def _torch_setup(spec, split, clip=False):
    import torch

    from torch_ref.mesm import build_mesm

    torch.manual_seed(0)
    np.random.seed(0)
    _torch_cpu_setup(spec)
    cfg, ds = open_split(spec, split)
    dev = torch.device("cuda" if spec["device"] == "gpu" else "cpu")
    enc = _torch_clip(cfg, _load_weights(spec["clip_weights"])).to(dev) if clip else None
    twin = build_mesm(cfg.model, cfg.loss, text_encoder=enc)
    compiled, sync = load_twin(twin, spec["weights"], dev, spec["framework"])
    return cfg, ds, twin, torch.compile(twin) if compiled else twin, dev, compiled, sync


def _official(b, dev, tokens=None) -> dict:
    """The official collate dict as tensors on ``dev`` (``prepare_batch``: the official ``prepare_batch_input``,
    which the official loops run before the model; ``tokens``: the CLIP rows cut to that many ids)."""
    from torch_ref.mesm import prepare_batch

    o = dict(b.official)
    if tokens:
        o["words_id"] = np.ascontiguousarray(np.asarray(o["words_id"])[:, :tokens])
    return prepare_batch(o, device=dev, multi_clip=False)


def w_train_torch(spec) -> dict:
    import torch

    from torch_ref.mesm_loss import build_criterion, official_optimizer, official_step

    clip = spec["variant"] == "clip"
    cfg, ds, twin, run, dev, compiled, sync = _torch_setup(spec, "train", clip)
    raw = train_batches(ds)
    tokens = spec.get("tokens")
    batches = [(_official(b, dev, tokens), None if clip else torch.from_numpy(
        np.ascontiguousarray(s["words_feat"][:int(s["num_rows"])])).to(dev)) for b, s in raw]
    t = cfg.train
    crit = build_criterion(twin, dataset_name=DATASET)
    opt, _ = official_optimizer(twin, t.lr, t.wd, t.lr_drop, t.lr_gamma)
    n_params = sum(p.numel() for p in twin.parameters())
    losses = []

    def call(i):
        o, words = batches[i % len(batches)]
        _, loss = official_step(run, crit, o, opt, t.max_grad_norm, dataset_name=DATASET, words_feat=words)
        losses.append(float(loss.detach()))
        return losses[-1]

    warm = 3 if compiled else 1
    _say(f"torch train ({spec['framework']}, {spec['variant']}): {n_params} params; {warm} warm-up call(s)")
    timing, memory = time_torch_steps(call, sync, dev, compiled, warm, spec["repeats"])
    return {**timing, "params": int(n_params), "loss": losses[-1],
            "tokens": (tokens or int(np.shape(raw[0][0].official["words_id"])[1])) if clip else None,
            "frames": [int(np.shape(b.official["video_feat"])[1]) for b, _ in raw], **memory}


def w_eval_torch(spec) -> dict:
    import torch

    from jaxprvr.metrics.moments import eval_submission, official_dataset_name

    cfg, ds, twin, run, dev, compiled, sync = _torch_setup(spec, "test")
    twin.eval()
    d = cfg.data
    clock = {}

    def one_pass():
        clock.update(data=0.0, forward=0.0, post=0.0)
        sub = []
        t0 = time.perf_counter()
        it = ds.batches(None, False)
        while True:
            ta = time.perf_counter()
            try:
                b, s = next(it)
            except StopIteration:
                break
            n = int(s["num_rows"])
            o = _official(b, dev)
            words = torch.from_numpy(np.ascontiguousarray(s["words_feat"][:n])).to(dev)
            tb = time.perf_counter()
            with torch.no_grad():
                out = run(o, words_feat=words, dataset_name=DATASET, is_training=False)
                lg, sp, sal = (out[k].float().cpu().numpy() for k in ("pred_logits", "pred_spans", "saliency_scores"))
            tc = time.perf_counter()
            sub += _submission(d, b, s, lg, sp, sal, [ds.ds.queries[r] for item in b.items for r in item])
            td = time.perf_counter()
            clock["data"] += tb - ta
            clock["forward"] += tc - tb
            clock["post"] += td - tc
        t1 = time.perf_counter()
        res = eval_submission(sub, ds.ds.gt_rows(), official_dataset_name(d.dataset))
        t2 = time.perf_counter()
        return dict(res["brief"]), t2 - t0, t2 - t1, len(sub)

    rss0 = _rss_now()
    _, first, _, _ = one_pass()
    own, frames = _torch_compile_clock() if compiled else (None, None)
    _say(f"torch eval first pass {first:.1f} s")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    brief, e2e, metrics_s, n_q = one_pass()
    return {"end_to_end_s": e2e, "first_end_to_end_s": first, "first_minus_steady_s": max(first - e2e, 0.0),
            "compile_s": own, "compiled_frames": frames, "data_s": clock["data"], "forward_s": clock["forward"],
            "post_s": clock["post"], "metrics_s": metrics_s, "metrics": brief, "videos": len(ds), "queries": n_q,
            "peak_device_bytes": _torch_peak(dev), "peak_rss_bytes": _peak_rss(), "rss_before": rss0,
            "threads": torch.get_num_threads()}


# ================================================================================================ profile
COMPONENTS = ("CLIP text tower", "input projections", "FW-MESM enhancer (+ MLM pass)", "aligner (T2V)",
              "SS-MESM", "encoder", "decoder", "heads + saliency + rest of the model", "loss (matching, criterion)",
              "optimizer + other")


def component_of(op_name: str) -> str:
    """The MESM component of one XLA op from its ``op_name`` (``jit(step)/.../jvp(MESM)/enhance_encoder/...``;
    the backward under ``transpose(jvp(MESM))``)."""
    if "TextTower" in op_name or "/transformer/resblocks" in op_name or "token_embedding" in op_name:
        return COMPONENTS[0]
    if "MESM" in op_name:
        for key, comp in (("input_vid_proj", 1), ("input_txt_proj", 1), ("enhance_encoder", 2),
                          ("t2v_encoder", 3), ("ss_reconstructor", 4), ("/encoder", 5), ("/decoder", 6)):
            if key in op_name:
                return COMPONENTS[comp]
        return COMPONENTS[7]
    if "loss" in op_name or "match" in op_name or "jvp(" in op_name:
        return COMPONENTS[8]
    return COMPONENTS[9]


def w_profile_jax(spec) -> dict:
    import jax

    from benchmarks.profile_step import hlo_op_names, op_seconds, traced
    from jaxprvr.train import train_keys

    cfg, step, state, params, batches, extra, info = _jax_train(spec)
    keys = train_keys(0)
    names = hlo_op_names(step.lower(state, batches[0], keys, *extra).compile().as_text())
    st = state
    for i in range(2):
        st, _ = step(st, batches[i % 3], keys, *extra)
    jax.block_until_ready(st)
    events, _, wall = traced(lambda: step(st, batches[0], keys, *extra))
    comp, kinds, ops = op_seconds(events, names, component_of, 120)
    return {"traced_wall_s": wall, "components_s": dict(comp), "kinds_s": dict(kinds),
            "top_ops_s": dict(ops.most_common(10))}


def w_profile_torch(spec) -> dict:
    import collections

    from torch.profiler import ProfilerActivity

    from torch_ref.mesm_loss import build_criterion, official_optimizer, official_step

    clip = spec["variant"] == "clip"
    cfg, ds, twin, run, dev, compiled, sync = _torch_setup(spec, "train", clip)
    raw = train_batches(ds)
    import torch

    t = cfg.train
    crit = build_criterion(twin, dataset_name=DATASET)
    opt, _ = official_optimizer(twin, t.lr, t.wd, t.lr_drop, t.lr_gamma)

    def call(i):
        b, s = raw[i % 3]
        words = None if clip else torch.from_numpy(np.ascontiguousarray(s["words_feat"][:int(s["num_rows"])]))
        return official_step(run, crit, _official(b, dev), opt, t.max_grad_norm, dataset_name=DATASET,
                             words_feat=words)

    prof, wall = torch_profiled(call, sync, [ProfilerActivity.CPU])
    groups, per_op = collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        k, v = ev.key, ev.self_cpu_time_total / 1e6
        if not k.startswith("aten::"):
            continue
        per_op[k] += v
        if any(x in k for x in ("mm", "matmul", "linear", "addmm", "bmm", "baddbmm")):
            groups["matmuls (mm/addmm/bmm)"] += v
        elif any(x in k for x in ("softmax", "layer_norm", "native_layer_norm")):
            groups["softmax + LayerNorm (fwd + bwd)"] += v
        elif any(x in k for x in ("copy_", "cat", "index", "masked", "where", "nonzero", "item", "_local_scalar",
                                  "to", "clone", "zeros", "empty", "fill_")):
            groups["copies, indexing, masks, host syncs"] += v
        else:
            groups["other aten ops (elementwise, optimizer)"] += v
    groups["Python + dispatch (wall - aten self time)"] = max(wall - sum(groups.values()), 0.0)
    return {"traced_wall_s": wall, "groups_s": dict(groups), "top_ops_s": dict(per_op.most_common(10))}


WORKERS = {"weights": w_weights, "data": w_data, "train_jax": w_train_jax, "train_torch": w_train_torch,
           "eval_jax": w_eval_jax, "eval_torch": w_eval_torch, "profile_jax": w_profile_jax,
           "profile_torch": w_profile_torch}


def worker(spec_json: str) -> int:
    return worker_main(spec_json, WORKERS)


# ================================================================================================ report
def eval_equal_lines(ev: dict) -> list[str]:
    diffs = metric_diffs(ev, "metrics")
    if diffs is None:
        return [NO_JAX_EVAL]
    lines = []
    for fw, a, differ in diffs:
        if fw == "jax_bf16":
            lines.append(f"eval metrics, JAX bf16 vs JAX float32 (not expected equal): {len(differ)} of {len(a)} "
                         f"values differ")
        elif differ:
            lines.append(f"eval metrics equal (JAX vs {FW_LABEL.get(fw, fw)}): NO: {len(differ)} of {len(a)} values "
                         f"differ: {differ}")
        else:
            lines.append(f"eval metrics equal (JAX vs {FW_LABEL.get(fw, fw)}): EQUAL: all {len(a)} values identical "
                         f"(MR-full-R1@0.5 {a.get('MR-full-R1@0.5')}, MR-full-mAP {a.get('MR-full-mAP')}, "
                         f"MR-full-miou {a.get('MR-full-miou')})")
    if not ev["jax"].get("stages_equal", True):
        lines.append("note: the JAX stage-by-stage rerun did not reproduce the Evaluator's metrics")
    return lines


def report(results: dict) -> str:
    lines = [f"# benchmarks.vmr --models mesm — {results['device_desc']}",
             f"Charades-STA C+SF_C (official MESM config), size `{results['size']}`, precision: "
             f"{results['precision_desc']}, {results['date']}, load average at start "
             f"{results['loadavg_start'][0]:.2f}", ""]
    data = results.get("data", {})
    if data.get("ok"):
        sp = data["splits"]
        lines += [f"Synthetic data: train {sp['train']['videos']} videos / {sp['train']['queries']} queries (static "
                  f"batch {sp['train']['rows_capacity']} row slots × {sp['train']['frames_capacity']} frames), test "
                  f"{sp['test']['videos']} videos / {sp['test']['queries']} queries (static batch "
                  f"{sp['test']['rows_capacity']} row slots × {sp['test']['frames_capacity']} frames).", ""]
    for variant in VARIANTS:
        train = (results.get("train") or {}).get(variant)
        if not train:
            continue
        j = train.get("jax", {})
        what = ("text features cached (words_feat given; the jaxprvr trainer's setting)" if variant == "cached" else
                "CLIP text tower in the step (float32; official: every forward)")
        lines += [f"## Training step, {what}: {j.get('videos', '?')} videos, {j.get('rows', 0):.1f} queries per batch "
                  f"on average; JAX static batch {j.get('row_slots', '?')} row slots × {j.get('frames', '?')} frames, "
                  f"twin batches {j.get('twin_frames', '?')} frames", "",
                  "| framework | CLIP tokens/row | step (median) | videos/s | JAX ÷ PyTorch speed | GFLOP/step (JAX) | "
                  "compile (compiler's own) | first call(s) − steady | peak memory | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

        def train_cells(fw, r, train=train, j=j):
            s, fl = r["seconds"], r.get("flops")
            return (f"{r.get('tokens') or '-'} | {_fmt_s(s)} | {j.get('videos', 12) / s:.2f} | "
                    f"{_speed(fw, train, 'seconds')} | {f'{fl / 1e9:.1f}' if fl else '-'} | "
                    f"{_fmt_s(r.get('compile_s'))} | {_fmt_s(r.get('first_minus_steady_s'))}")

        lines += section_rows(train, 10, train_cells, FW_LABEL)
        lines += ["", target_line(results, "train", _ratio_val(train, "seconds"), "Train target",
                                  f"{variant}; JAX ÷ torch eager", f"Train target ({variant})")]
        sp16 = _ratio_val(train, "seconds", "torch_16")
        if sp16:
            lines.append(f"JAX ÷ torch eager on the same 16-token rows: {sp16:.2f}×")
        fit = train.get("jax_fitted", {})
        if fit.get("ok") and train.get("torch", {}).get("ok"):
            lines.append(f"JAX with per-batch shapes {fit.get('shapes')} (rows × frames; one program per shape) ÷ "
                         f"torch eager: {train['torch']['seconds'] / fit['seconds']:.2f}× (diagnostic: the trainer "
                         f"pads every batch to the split's capacities)")
        lines.append("")
    ev = results.get("eval")
    if ev:
        j = ev.get("jax", {})
        lines += [f"## Test evaluation end to end ({j.get('videos', '?')} videos, {j.get('queries', '?')} queries, "
                  f"{j.get('batches', '?')} batches of 30 videos; JAX static batch {j.get('row_slots', '?')} row "
                  f"slots × {j.get('frames', '?')} frames)", "",
                  "| framework | batches (reader) | forward | post-processing | metrics | end to end, steady | "
                  "queries/s | JAX ÷ PyTorch | end to end, first pass | compile (compiler's own) | peak memory | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        lines += section_rows(ev, 12, lambda fw, r: f"{_fmt_s(r['data_s'])} | {_fmt_s(r['forward_s'])} | "
                                                    f"{_fmt_s(r['post_s'])} | {_fmt_s(r['metrics_s'])} | "
                                                    f"{_fmt_s(r['end_to_end_s'])} | "
                                                    f"{r['queries'] / r['end_to_end_s']:.0f} | "
                                                    f"{_speed(fw, ev, 'end_to_end_s')} | "
                                                    f"{_fmt_s(r['first_end_to_end_s'])} | {_fmt_s(r.get('compile_s'))}",
                              FW_LABEL)
        lines += ["", "JAX stages: the same work one stage at a time after the two passes (the Evaluator's own "
                  "loop interleaves them); torch stages: timed inside the steady pass.", "",
                  target_line(results, "eval", _ratio_val(ev, "end_to_end_s"), *EVAL_TARGET), ""]
        lines += results.get("eval_equal", []) + [""]
    prof = results.get("profile")
    if prof:
        lines += ["## Where the time of one training step goes (cached variant, one traced call)", ""]
        pj, pt = prof.get("jax", {}), prof.get("torch", {})
        if pj.get("ok"):
            tot = sum(pj["components_s"].values()) or 1.0
            lines += ["JAX: XLA op time per model component (summed over threads; shares):", "",
                      "| component | time | share |", "|---|---:|---:|"]
            for c in COMPONENTS:
                v = pj["components_s"].get(c, 0.0)
                if v:
                    lines.append(f"| {c} | {v:.3f} s | {100 * v / tot:.0f}% |")
            kinds = ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in sorted(pj["kinds_s"].items(),
                                                                              key=lambda x: -x[1]))
            lines += [f"| traced wall time | {_fmt_s(pj['traced_wall_s'])} | |", "", f"By op kind: {kinds}", ""]
        elif pj:
            lines += [f"JAX profile failed: {_cell(pj.get('error', '?'))}", ""]
        if pt.get("ok"):
            lines += ["torch eager: aten self time per group (the rest of the wall time is Python and dispatch):", "",
                      "| group | time | share of wall |", "|---|---:|---:|"]
            for g, v in sorted(pt["groups_s"].items(), key=lambda x: -x[1]):
                lines.append(f"| {g} | {v:.3f} s | {100 * v / (pt['traced_wall_s'] or 1):.0f}% |")
            lines += [f"| traced wall time | {_fmt_s(pt['traced_wall_s'])} | |", ""]
        elif pt:
            lines += [f"torch profile failed: {_cell(pt.get('error', '?'))}", ""]
    if "memory" in results.get("sections", []):
        lines += ["## Peak memory", "", "| section | framework | peak (process RSS on CPU, device on GPU) | "
                  "above the worker's baseline before the first call |", "|---|---|---:|---:|"]
        rows = []
        for variant in VARIANTS:
            for fw, r in ((results.get("train") or {}).get(variant) or {}).items():
                rows.append((f"train ({variant})", fw, r))
        rows += [("eval", fw, r) for fw, r in (results.get("eval") or {}).items()]
        lines += [memory_row(section, fw, r, xla=False, labels=FW_LABEL) for section, fw, r in rows if r.get("ok")]
        if not rows:
            lines.append("| (no train/eval section in this run) | | | |")
        lines.append("")
    return "\n".join(lines)


# ================================================================================================ driver
def _run(args, sections, base, results, log, scratch) -> None:
    fws_torch = ["torch"] + (["torch_compile"] if args.torch_compile == "on" else [])
    jax_fws = ["jax"] + (["jax_bf16"] if args.bf16 else [])
    base = {**base, "weights": os.path.join(scratch, "weights.npz"), "clip_weights": os.path.join(scratch, "clip.npz"),
            "data_root": os.path.join(scratch, "data"), "text_cache": os.path.join(scratch, "text.npz")}
    made = run_worker({**base, "task": "weights", "path": base["weights"], "clip_path": base["clip_weights"]},
                      args.timeout, log, module=MODULE)
    results["weights"] = made
    if made.get("ok"):
        made = run_worker({**base, "task": "data", "train_videos": TRAIN_VIDEOS, "videos": args.eval_videos},
                          args.timeout, log, module=MODULE)
        results["data"] = made
    if not made.get("ok"):
        for s in ("train", "eval"):
            if s in sections:
                results[s] = {"jax": {"ok": False, "error": f"setup: {made.get('error')}"}}
        return
    _save_partial(args.out, results)

    def spec(section, fw, **kw):
        s = {**base, "task": f"{section}_{'jax' if fw.startswith('jax') else 'torch'}", "framework": fw, **kw}
        if fw == "jax_bf16":
            s["compute_dtype"] = "bfloat16"
        if fw == "torch_16":
            s["framework"], s["tokens"] = "torch", base.get("max_words_l", 16)
        if fw == "jax_fitted":
            s["framework"], s["bucket"] = "jax", True
        return s

    deferred = []
    pending = "pending (runs after the other rows)"
    if "train" in sections:
        results["train"] = {}
        for variant in args.variants:
            results["train"][variant] = {}
            # cached: a diagnostic JAX row with each batch at its own shapes (what the static padding costs)
            extra = ["torch_16"] if variant == "clip" else ["jax_fitted"]
            run_columns(results["train"][variant], jax_fws + fws_torch + extra,
                        lambda fw, variant=variant: spec("train", fw, variant=variant), deferred, ("train", variant),
                        args.timeout, log, args.out, results, module=MODULE, pending=pending)
    if "eval" in sections:
        results["eval"] = {}
        run_columns(results["eval"], jax_fws + fws_torch, lambda fw: spec("eval", fw), deferred, ("eval",),
                    args.timeout, log, args.out, results, module=MODULE, pending=pending)
        _eval_equal(results)
    if "profile" in sections:
        results["profile"] = {fw: run_worker({**base, "task": f"profile_{fw}", "framework": fw, "variant": "cached"},
                                             args.timeout, log, module=MODULE) for fw in ("jax", "torch")}
        _save_partial(args.out, results)
    # torch.compile last, the compiled evaluation (the forward only) first: the train columns compile a superset of
    # its graph (the MLM pass, the losses, the backward); if the forward does not compile in time, neither would they
    fwd_failed = None
    for where, sp in sorted(deferred, key=lambda d: d[0][0] != "eval"):
        if fwd_failed:
            r = {"ok": False, "error": f"skipped: the compiled evaluation forward failed ({fwd_failed})"}
        else:
            r = run_worker(sp, args.compile_timeout or args.timeout, log, module=MODULE)
            if where[0] == "eval" and not r.get("ok"):
                fwd_failed = r.get("error")
        if where[0] == "eval":
            results["eval"]["torch_compile"] = r
            _eval_equal(results)
        else:
            results["train"][where[1]]["torch_compile"] = r
        _save_partial(args.out, results)


def _eval_equal(results) -> None:
    results["eval_equal"] = eval_equal_lines(results["eval"])
    announce(MODULE, results["eval_equal"])


def main(args) -> int:
    """``python -m benchmarks.vmr --models mesm ...`` (``args``: benchmarks.vmr's parsed arguments)."""
    device, size = device_defaults(args, 20, 600)
    if args.eval_videos is None:
        args.eval_videos = EVAL_VIDEOS[size]
    from benchmarks import vmr

    # benchmarks.vmr's --sections default is MRNet's list: not given means MESM's default sections
    raw = ",".join(DEFAULT_SECTIONS) if args.sections == ",".join(vmr.DEFAULT_SECTIONS) else args.sections
    sections = parse_sections(raw, SECTIONS, "--sections (mesm)")
    if sections is None:
        return 2
    args.variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in args.variants):
        print(f"error: --variants: expected a comma list of {list(VARIANTS)}", file=sys.stderr)
        return 2
    from parity.mesm import _nltk_tagger

    base = {"device": device, "size": size, "repeats": args.repeats,
            "precision": None if args.precision == "default" else args.precision,
            "pos_tagger": None if _nltk_tagger() else "rule", "max_words_l": 16}
    if size == "cpu" and CPU_WIDTHS:
        base["widths"] = dict(CPU_WIDTHS)
    desc = precision_desc(device, args.precision, "true float32 in both: JAX jax_default_matmul_precision=highest, "
                          "torch allow_tf32=False; the CLIP tower in float32",
                          "float32 in both (CPU; the CLIP tower in float32 too)")
    log_path = args.log or tempfile.mkstemp(prefix="benchmarks-vmr-mesm-", suffix=".log")[1]
    results = {"model": "mesm", "device": device, "device_desc": _device_desc(device), "config": DATASET,
               "size": size, "widths": base.get("widths"), "precision": args.precision,
               "precision_desc": desc, "eval_videos": args.eval_videos, "repeats": args.repeats,
               "sections": sections, "variants": args.variants, "pos_tagger": base["pos_tagger"] or "nltk",
               "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": os.getloadavg(), "log": log_path,
               "targets": {"train": 1.5, "eval": 2.0}}
    return run_sections(results, log_path, "benchmarks-vmr-mesm-",
                        lambda log, scratch: _run(args, sections, base, results, log, scratch), report,
                        args.out)


if __name__ == "__main__":
    import argparse

    _p = argparse.ArgumentParser(prog="python -m benchmarks.vmr_detr",
                                 description="MESM's measurement workers; run the benchmark as python -m "
                                             "benchmarks.vmr --models mesm")
    _p.add_argument("--worker", required=True, help="a worker's JSON spec")
    sys.exit(worker(_p.parse_args().worker))
