"""Text-video retrieval from raw videos, BackBone_tvr's protocol (shallowdream66/BackBone_tvr
``backbone_tvr/main_retrieval.py``, ``tvr/dataloaders/``).

- Data: (caption, video) pairs of a split (:mod:`jaxprvr.data.t2v`), captions as CLIP BPE ids
  (:func:`jaxprvr.text.clip_bpe.clip_sequences`: ``max_words`` with SOT/EOT, truncation counted), videos as
  ``max_frames`` sampled frames (:mod:`jaxprvr.data.video`: decord's frame semantics, decoded once into a
  :class:`~jaxprvr.data.video.FrameStore`), the clip-consistent RandAugment at train, CLIP preprocessing.
- Training: ``train.batch_size`` pairs per step from a seeded permutation per epoch (``data.shuffle``), the last
  short batch dropped (``drop_last``); the loss is the symmetric InfoNCE over the batch
  (:func:`jaxprvr.models.clip_wti.symmetric_ce`); the recipe is :meth:`T2VTask.optimizer`.
- Evaluation: text features per caption and video features per **unique** video (the official loop encodes a
  video once per caption; the features are identical), WTI in blocks of ``data.sim_block`` (the official blocks of
  32 give the same numbers: each entry depends on its pair only), then :func:`jaxprvr.metrics.t2v.t2v_metrics`
  under ``data.protocol``. Selection: t2v R@1.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr import sharding as shd
from jaxprvr.errors import JaxprvrError
from jaxprvr.tasks.base import Task, TrainPlan

BATCH_KEYS = ("text_ids", "text_mask", "video", "video_mask")
LN_100 = math.log(100.0)


# ---------------------------------------------------------------------------------------------- weights


_CLIP_CACHE: dict = {}


def clip_weights(path: str):
    """``(dims, float32 params, stored dtypes)`` of an OpenAI-format CLIP file or a clip2jax folder (read once per
    process)."""
    from parity.clip import load_clip_weights

    key = os.path.realpath(path)
    if key not in _CLIP_CACHE:
        if not os.path.exists(path):
            raise JaxprvrError(path, "OpenAI-format CLIP weights (model.clip: ViT-B-32.pt, a state dict, or a "
                               "parity.convert clip2jax folder)", "no such file")
        _CLIP_CACHE.clear()
        _CLIP_CACHE[key] = load_clip_weights(path)
    return _CLIP_CACHE[key]


def weights_dims(cfg):
    """``cfg`` with the CLIP sizes of ``model.clip``'s weights (``modeling.py`` L48-60)."""
    from jaxprvr.models.clip_wti import clip_dims, with_clip_dims

    if not cfg.model.clip:
        return cfg
    dims = clip_weights(cfg.model.clip)[0]
    default = type(cfg.model)()
    given = clip_dims(cfg.model)
    for f in ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
              "context_length", "vocab_size", "text_width", "text_layers"):
        mine, theirs = getattr(given, f), getattr(dims, f)
        if mine != theirs and mine != getattr(default, f):
            raise JaxprvrError(f"model.{f}", f"{theirs} (the size of {cfg.model.clip})", f"{mine}")
    import dataclasses

    return dataclasses.replace(cfg, model=with_clip_dims(cfg.model, dims))


# ---------------------------------------------------------------------------------------------- data


class T2VSet:
    """A split as the task uses it: the pairs (:func:`jaxprvr.data.t2v.open_t2v`), the tokenised captions, and the
    videos through a frame store. ``video(i, rng)`` gives video ``video_ids[i]`` as ``(float32 [T, 3, R, R], mask
    [T])``; bad videos (``data.on_bad_video=zeros``) are zeros, counted in :attr:`bad_videos`."""

    def __init__(self, cfg, root, split: str):
        from jaxprvr.data.t2v import open_t2v
        from jaxprvr.data.video import FrameStore
        from jaxprvr.text.clip_bpe import clip_sequences

        d, m = cfg.data, cfg.model
        self.dataset, self.split, self.root = d.dataset, split, Path(root)
        kw = {}
        if d.anno_path:
            kw["anno_path"] = d.anno_path
        if d.video_path:
            kw["video_path"] = d.video_path
        self.data = open_t2v(d.dataset, root, split, train_split=d.train_split, **kw)
        if len(self.data) == 0:
            raise JaxprvrError(f"{d.dataset} {split}", "at least one (caption, video) pair", "none")
        captions = [c for c, _ in self.data.pairs]
        self.captions = captions
        self.text_ids, self.text_mask, self.n_truncated = clip_sequences(captions, m.max_words)
        self.video_ids = list(self.data.video_ids)
        self.caption_video = np.asarray(self.data.caption_video, np.int64)
        cache = Path(d.frame_cache) if d.frame_cache else self.root / ".jaxprvr_frames"
        if not cache.is_absolute():
            cache = self.root / cache
        self.store = FrameStore(cache / f"{d.dataset}-f{m.max_frames}-r{d.video_framerate}", m.max_frames,
                                d.video_framerate)
        self.size, self.max_frames, self.on_bad = m.image_resolution, m.max_frames, d.on_bad_video
        self.augment = split == "train" and d.augment != "none"
        if self.augment and d.augment != "rand-m7-n4-mstd0.5-inc1":
            raise JaxprvrError("data.augment", "'rand-m7-n4-mstd0.5-inc1' (the official) or 'none'", repr(d.augment))
        self.bad_videos: set[str] = set()

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def n_videos(self) -> int:
        return len(self.video_ids)

    def video(self, i: int, rng=None):
        vid = self.video_ids[i]
        if vid not in self.store:  # decoded once; later reads go to the store (ensure() would read it twice)
            self.store.put(vid, self.data.video_path(vid), self.on_bad)
        clip = self.store.load_clip(vid, augment=rng if self.augment else None, on_bad_video=self.on_bad,
                                    size=self.size)
        if clip.error is not None:
            self.bad_videos.add(vid)
        return clip.video, clip.mask

    def report(self) -> dict:
        return {"pairs": len(self), "videos": self.n_videos, "truncated_captions": int(self.n_truncated),
                "bad_videos": len(self.bad_videos), "skipped": dict(getattr(self.data, "skipped", {}) or {})}


def _pool(cfg):
    n = cfg.data.workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    return concurrent.futures.ThreadPoolExecutor(n) if n > 1 else None


def _videos(ds: T2VSet, idx, rngs, pool):
    """Stacked ``(video [n, T, 3, R, R], mask [n, T])`` of videos ``idx`` (in parallel threads)."""
    rngs = rngs if rngs is not None else [None] * len(idx)
    items = list(pool.map(ds.video, idx, rngs)) if pool is not None else [ds.video(i, r) for i, r in zip(idx, rngs)]
    return np.stack([v for v, _ in items]), np.stack([mk for _, mk in items]).astype(np.int32)


def train_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The pair order of ``epoch``: a permutation drawn from ``(seed, epoch)`` (the official DistributedSampler's
    ``set_epoch`` role), or the file order."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(ds: T2VSet, cfg, epoch: int, skip: int = 0, pool=None):
    """The batches of ``epoch`` from batch ``skip`` on: ``batch_size`` pairs each, ``drop_last``."""
    b = cfg.train.batch_size
    order = train_order(len(ds), cfg.train.seed, epoch, cfg.data.shuffle)
    for k in range(skip, len(ds) // b):
        pos = order[k * b:(k + 1) * b]
        rngs = [np.random.default_rng([cfg.train.seed, epoch, int(p), 1]) for p in pos] if ds.augment else None
        video, vmask = _videos(ds, ds.caption_video[pos], rngs, pool)
        yield {"text_ids": ds.text_ids[pos].astype(np.int32), "text_mask": ds.text_mask[pos].astype(np.int32),
               "video": video, "video_mask": vmask, "pairs": pos}


# ---------------------------------------------------------------------------------------------- the task


class T2VTask(Task):
    name = "t2v"
    api_class = "jaxprvr.api_tasks:T2VModel"
    splits = ("train", "val", "test")
    batch_keys = BATCH_KEYS
    selection_metric = "t2v/R1"
    selection_mode = "max"
    # --demo: a small CLIP from scratch (no weights), every tensor at the head's rate (coef_lr 1), short schedule.
    demo_overrides = {
        "train.n_epoch": "20",
        "train.batch_size": "16",
        "train.lr": "5e-4",
        "train.coef_lr": "1.0",
        "train.wd": "0.01",
        "train.log_every": "10",
        "data.eval_batch_size": "32",
    }

    def demo_root(self, cfg) -> Path:
        from jaxprvr.data.synthetic_t2v import demo_root

        return Path(demo_root(cfg.data.dataset))

    def validation_split(self, cfg) -> str:
        return cfg.train.eval_split

    def open_split(self, cfg, root, split):
        if split not in self.splits:
            raise JaxprvrError(f"split {split!r}", f"one of {list(self.splits)}", repr(split))
        return T2VSet(cfg, root, split)

    def with_data_dims(self, cfg, ds):
        return weights_dims(cfg)

    def dummy_batch(self, cfg, n: int = 2) -> dict:
        m = cfg.model
        r = m.image_resolution
        return {"text_ids": np.zeros((n, m.max_words), np.int32), "text_mask": np.ones((n, m.max_words), np.int32),
                "video": np.zeros((n, m.max_frames, 3, r, r), np.float32),
                "video_mask": np.ones((n, m.max_frames), np.int32)}

    def initial_params(self, cfg, params):
        """The official construction on top of the random init: CLIP from ``model.clip`` (when set), then the
        initialisation trick (seqTransf and frame positions from the CLIP text tower)."""
        from jaxprvr.models.clip_wti import init_from_clip

        params = dict(params)
        if cfg.model.clip:
            _, clip_params, _ = clip_weights(cfg.model.clip)
            params["clip"] = jax.tree.map(lambda a, ref: jnp.asarray(a, ref.dtype), clip_params, params["clip"])
        return init_from_clip(params, cfg.model.num_hidden_layers)

    def train_plan(self, cfg, ds, *, mesh, n_slices: int) -> TrainPlan:
        from jaxprvr.data import prefetch

        b = cfg.train.batch_size
        if shd.n_data_shards(mesh) > 1 and b % shd.n_data_shards(mesh):
            raise JaxprvrError("train.batch_size", f"a multiple of the {shd.n_data_shards(mesh)} data shards", str(b))
        steps = len(ds) // b
        if steps == 0:
            raise JaxprvrError(f"{ds.dataset} train", f"at least train.batch_size = {b} pairs (drop_last)",
                               f"{len(ds)} pairs")
        rows = None
        if n_slices > 1:
            from jaxprvr.distributed import local_slices

            per = b // n_slices
            rows = np.concatenate([np.arange(s * per, (s + 1) * per) for s in local_slices(n_slices, mesh)])
        pool = _pool(cfg)

        def batches(epoch, skip):
            it = train_batches(ds, cfg, epoch, skip, pool)
            if rows is not None:
                it = ({k: (v[rows] if isinstance(v, np.ndarray) and v.ndim and v.shape[0] == b else v)
                       for k, v in bt.items()} for bt in it)
            return prefetch(it, cfg.data.prefetch)

        return TrainPlan(steps, batches, lambda batch: {"pairs": b})

    # -- optimisation
    def loss(self, model, cfg, steps_per_epoch: int):
        from jaxprvr.models.clip_wti import symmetric_ce

        def loss_fn(params, batch, rngs, step, model_state):
            outputs, _ = model.apply({"params": params}, batch, train=True)
            loss = symmetric_ce(outputs["logits"], outputs["logit_scale"])
            return loss, ({"logit_scale": jnp.exp(outputs["logit_scale"])}, model_state)

        return loss_fn

    def optimizer(self, cfg, params, steps_per_epoch: int):
        return t2v_optimizer(cfg, steps_per_epoch)

    def lr_at(self, cfg, steps_per_epoch: int):
        from jaxprvr.optim import warmup_cosine

        t = cfg.train
        total = steps_per_epoch * t.n_epoch
        return lambda step: float(t.lr * warmup_cosine(int(step), t.lr_warmup_proportion, total))

    def lr_group_scales(self, cfg) -> dict:
        return {"lr_clip": cfg.train.coef_lr, "lr_head": 1.0}

    # -- evaluation
    def evaluator(self, model, cfg, mesh=None):
        return Evaluator(model, cfg, mesh)

    def test_fields(self, ds) -> dict:
        return {"chance_t2v/R1": 100.0 / max(ds.n_videos, 1), **{f"data_{k}": v for k, v in ds.report().items()
                                                                   if k != "skipped"}}

    def format_metrics(self, m: dict) -> str:
        keys = [f"{d}/{k}" for d in ("t2v", "v2t") for k in ("R1", "R5", "R10", "MdR", "MnR")]
        return " ".join(f"{k}={m[k]:.1f}" for k in keys if k in m)

    def test_line(self, t: dict) -> str:
        chance = t.get("chance_t2v/R1")
        extra = f" (chance {chance:.2f})" if chance is not None else ""
        return f"test t2v R@1 {t['t2v/R1']:.2f}{extra} " + self.format_metrics(t)

    def save_outputs(self, directory, metrics: dict, ds) -> None:
        save_scores(directory, metrics, ds)


TASK = T2VTask()


def _named(params, fn):
    """A pytree like ``params`` of ``fn(torch-style dotted name)``."""
    from jaxprvr.optim import torch_style_name

    return jax.tree_util.tree_map_with_path(lambda path, _: fn(torch_style_name(path)), params)


def t2v_optimizer(cfg, steps_per_epoch: int):
    """``main_retrieval.py`` L167-203, L254-268: torch's global ``clip_grad_norm_(1.0)``, BertAdam (b1 0.9, b2
    0.98, eps 1e-6, per-tensor clip 1.0 -- a no-op after the global one), ``warmup_cosine`` over ``t_total =
    steps_per_epoch * n_epoch`` with the proportion ``lr_warmup_proportion``, weight decay on every tensor whose
    torch name lacks ``"bias"`` (the no-decay list also names ``LayerNorm.*``, which no tensor here is called),
    ``lr * coef_lr`` on the names containing ``"clip."`` (case-sensitive: ``transformerClip.`` is not), and
    ``logit_scale`` clamped at ln 100 after the update."""
    import optax

    from jaxprvr.optim import bert_adam, clamp_max, clip_grad_norm_torch

    t = cfg.train
    inner = bert_adam(t.lr, t.lr_warmup_proportion, steps_per_epoch * t.n_epoch, weight_decay=t.wd,
                      max_grad_norm=1.0, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, schedule="warmup_cosine",
                      lr_scale=lambda p: _named(p, lambda n: t.coef_lr if "clip." in n else 1.0))
    clamp = clamp_max(lambda p: _named(p, lambda n: n == "clip.logit_scale"), LN_100)
    parts = ([clip_grad_norm_torch(t.max_grad_norm)] if t.max_grad_norm > 0 else []) + [inner, clamp]
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------- evaluation


class Evaluator:
    """Text features of every caption, video features of every unique video, WTI in blocks, metrics."""

    def __init__(self, model, cfg, mesh=None):
        self.model, self.cfg = model, cfg
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self._n = shd.n_data_shards(self.mesh)
        out = shd.data_sharding(self.mesh)
        self._text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method="text_features"),
                             out_shardings=out)
        self._video = jax.jit(lambda p, v, m: model.apply({"params": p}, v, m, method="video_features"),
                              out_shardings=out)
        self._frames = jax.jit(lambda p, v: model.apply({"params": p}, v, method="frame_features"),
                               out_shardings=out)
        self._sim = jax.jit(lambda p, tf, tm, vf, vm: model.apply({"params": p}, tf, tm, vf, vm,
                                                                  method="similarity"))

    def _batches(self, n: int, size: int):
        for s in range(0, n, size):
            yield np.arange(s, min(n, s + size))

    def evaluate(self, params, ds: T2VSet, progress=False, keep_outputs=False, model_state=None) -> dict:
        from jaxprvr.data import prefetch
        from jaxprvr.metrics.t2v import t2v_metrics

        t0 = time.perf_counter()
        d = self.cfg.data
        size = shd.round_up(d.eval_batch_size, self._n)
        # captions
        tf = []
        for idx in _bar(self._batches(len(ds), size), progress, "text", -(-len(ds) // size)):
            ids = _pad(ds.text_ids[idx].astype(np.int32), size)
            tf.append(np.asarray(shd.to_host(self._text(params, shd.shard_batch({"x": ids}, self.mesh)["x"])))[
                :len(idx)])
        text_feat = np.concatenate(tf, 0)
        # videos (decoded and preprocessed on a background thread while the device runs the previous batch)
        pool = _pool(self.cfg)
        vf, vm_all, frame_feat, inputs = [], [], [], []

        def load(idx):
            v, m = _videos(ds, idx, None, pool)
            return idx, _pad(v, size), _pad(m, size)

        n_vb = -(-ds.n_videos // size)
        with prefetch((load(idx) for idx in self._batches(ds.n_videos, size)), 2) as it:
            for idx, v, m in _bar(it, progress, "video", n_vb):
                dev = shd.shard_batch({"v": v, "m": m}, self.mesh)
                vf.append(np.asarray(shd.to_host(self._video(params, dev["v"], dev["m"])))[:len(idx)])
                vm_all.append(m[:len(idx)])
                if keep_outputs and d.save_inputs:
                    inputs.append(v[:len(idx)])
                if keep_outputs and d.save_features:
                    frame_feat.append(np.asarray(shd.to_host(self._frames(params, dev["v"])))[:len(idx)])
        if pool is not None:
            pool.shutdown()
        video_feat, video_mask = np.concatenate(vf, 0), np.concatenate(vm_all, 0)
        sim_u = self.similarity(params, text_feat, ds.text_mask.astype(np.int32), video_feat, video_mask, progress)
        protocol = resolve_protocol(d.protocol, ds)
        if protocol == "pairs":  # texts x texts (each pair's video), diagonal positives: the official matrix
            sim = sim_u[:, ds.caption_video]
        else:
            sim = sim_u
        res = t2v_metrics(sim, protocol, ds.caption_video if protocol != "pairs" else None)
        res = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in res.items()}
        res.update(n_text=len(ds), n_video=ds.n_videos, protocol=protocol,
                   seconds=round(time.perf_counter() - t0, 3), **{f"data_{k}": v for k, v in ds.report().items()
                                                                  if k != "skipped"})
        if keep_outputs:
            res["_sim"] = sim.astype(np.float32)
            if d.save_features:
                res["_features"] = {"text": text_feat, "text_mask": ds.text_mask.astype(np.int32),
                                    "video": video_feat, "video_mask": video_mask,
                                    "frames": np.concatenate(frame_feat, 0) if frame_feat else None}
            if d.save_inputs:
                res["_inputs"] = {"text_ids": ds.text_ids.astype(np.int32), "text_mask": ds.text_mask.astype(np.int32),
                                  "video": np.concatenate(inputs, 0), "video_mask": video_mask}
                res["_frames"] = {vid: _frame_record(ds, vid) for vid in ds.video_ids}
        return res

    def similarity(self, params, text_feat, text_mask, video_feat, video_mask, progress=False) -> np.ndarray:
        """``[N_text, N_video]`` WTI logits in ``data.sim_block`` x ``data.sim_block`` blocks (padded: one
        compilation)."""
        blk = self.cfg.data.sim_block
        nt, nv = len(text_feat), len(video_feat)
        out = np.zeros((nt, nv), np.float32)
        pairs = [(a, b) for a in range(0, nt, blk) for b in range(0, nv, blk)]
        for a, b in _bar(pairs, progress, "similarity", len(pairs)):
            tf, tm = _pad(text_feat[a:a + blk], blk), _pad(text_mask[a:a + blk], blk, fill=1)
            vf, vm = _pad(video_feat[b:b + blk], blk), _pad(video_mask[b:b + blk], blk, fill=1)
            s = np.asarray(self._sim(params, tf, tm, vf, vm))
            out[a:a + blk, b:b + blk] = s[:min(blk, nt - a), :min(blk, nv - b)]
        return out


def resolve_protocol(protocol: str, ds: T2VSet) -> str:
    """``auto``: ``pairs`` when every video has exactly one caption, else ``grouped`` (docs/quirks.md)."""
    if protocol not in ("auto", "pairs", "grouped"):
        raise JaxprvrError("data.protocol", "auto | pairs | grouped", repr(protocol))
    if protocol != "auto":
        return protocol
    counts = np.bincount(ds.caption_video, minlength=ds.n_videos)
    return "pairs" if (counts == 1).all() else "grouped"


def _pad(a: np.ndarray, size: int, fill=0) -> np.ndarray:
    """``a`` padded along axis 0 to ``size`` rows (copies of ``fill``; masks are padded with 1 so that padded rows
    never divide by a zero norm or softmax over nothing -- they are cut away after)."""
    if len(a) == size:
        return a
    pad = np.full((size - len(a),) + a.shape[1:], fill, a.dtype)
    if fill == 0 and a.dtype.kind == "f" and len(a):
        pad = np.repeat(a[-1:], size - len(a), axis=0)  # a real row: finite norms in the padded block
    return np.concatenate([a, pad], 0)


def save_scores(directory, metrics: dict, ds: T2VSet) -> None:
    """``metrics.json``; ``sim.npy`` (float32 ``[N_text, N_video or N_text]``); ``ids.json`` (``text_ids``,
    ``captions``, ``video_ids`` (the columns), ``gt`` (each text's column)); ``features.npz`` with
    ``data.save_features``; ``inputs.npz`` and ``frames.json`` with ``data.save_inputs``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    flat = {k: v for k, v in metrics.items() if not k.startswith("_")}
    (d / "metrics.json").write_text(json.dumps(flat, indent=2))
    if "_sim" in metrics:
        np.save(d / "sim.npy", metrics["_sim"])
    pairs = metrics.get("protocol") == "pairs"
    cols = [ds.video_ids[i] for i in ds.caption_video] if pairs else list(ds.video_ids)
    gt = list(range(len(ds))) if pairs else [int(i) for i in ds.caption_video]
    (d / "ids.json").write_text(json.dumps({"text_ids": list(range(len(ds))), "captions": ds.captions,
                                            "video_ids": cols, "gt": gt}))
    f = metrics.get("_features")
    if f:
        arrays = {"text": f["text"], "text_mask": f["text_mask"], "video": f["video"], "video_mask": f["video_mask"]}
        if f.get("frames") is not None:
            arrays["frames"] = f["frames"]
        np.savez(d / "features.npz", **arrays)
    if metrics.get("_inputs"):
        np.savez(d / "inputs.npz", **metrics["_inputs"])
        (d / "frames.json").write_text(json.dumps(metrics["_frames"], indent=1))


def _frame_record(ds: T2VSet, vid: str) -> dict:
    rec = ds.store.get(vid)
    return {"path": rec.source, "n_frames": int(rec.n_frames), "fps": None if not math.isfinite(rec.fps) else
            float(rec.fps), "indices": [int(i) for i in rec.indices], "error": rec.error or None}


def _bar(it, progress, desc, total=None):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)
