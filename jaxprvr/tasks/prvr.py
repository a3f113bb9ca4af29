"""Partially relevant video retrieval (MS-SL, GMMFormer, GMMFormer v2, MTM): the official recipe as a task.

* data: the MS-SL feature release (:class:`jaxprvr.data.PRVRDataset`; docs/data.md), video-centric batches
  (all queries of each video) padded to static shapes, sliced per process on several hosts;
* loss: each family's official loss (:data:`jaxprvr.losses.prvr.LOSSES`) with negatives drawn from the
  ``"sample"`` stream, hard negatives from ``loss.hard_negative_start_epoch`` (the epoch of a step is
  ``step // steps_per_epoch``: every epoch has that many steps);
* optimizer: BertAdam with warmup-linear over ``n_epoch x steps_per_epoch`` and the official weight-decay
  groups (+ the EMA with ``train.use_ema``, MTM);
* evaluation: the official ``eval_q2m`` protocol (:class:`Evaluator`): the gallery (every video with a query
  in the split, caption-file order) in blocks of ``eval_context_bsz`` videos, queries in blocks of
  ``eval_query_bsz``, each block scored against the whole gallery with the per-branch cosine scores fused
  with the model's ``branch_weights()``; R@1/5/10/100, SumR (the selection metric), median and mean rank.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprvr import sharding as shd
from jaxprvr.metrics.prvr import eval_q2m
from jaxprvr.tasks.base import Task, TrainPlan

VIDEO_KEYS = ("clip_feats", "frame_feats", "frame_mask", "frame_len", "video_valid")
QUERY_KEYS = ("query_feats", "query_mask", "query_valid")

# One scoring call's (queries x videos-per-device x rows-per-video) similarity tensor: about 256 MiB of float32.
SCORE_ELEMENTS = 1 << 26
MAX_SCORE_ROWS = 1024


class PRVRTask(Task):
    name = "prvr"
    api_class = "jaxprvr.api_tasks:PRVRModel"
    batch_keys = VIDEO_KEYS + QUERY_KEYS + ("query_labels",)
    selection_metric = "sumr"
    selection_mode = "max"
    # --demo: a run of a few minutes on 2 CPU cores: a 128-wide model (official: 384; at 384 one step of 32
    # TVR-size videos takes ~10 s there), 32 videos per batch, 4 epochs, hard negatives from epoch 2.
    demo_overrides = {
        "model.hidden_size": "128",
        "train.batch_size": "32",
        "train.n_epoch": "4",
        "train.lr_warmup_proportion": "0.05",
        "loss.hard_negative_start_epoch": "2",
    }

    # -- data
    def demo_root(self, cfg) -> Path:
        from jaxprvr.data.synthetic import demo_root

        return Path(demo_root(cfg.data.dataset))

    def open_split(self, cfg, root, split):
        from jaxprvr.data import PRVRDataset

        return PRVRDataset(root, cfg, split)

    def with_data_dims(self, cfg, ds):
        """The visual dim is read from the release's shape.txt at run time, as the official builders do."""
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, visual_feat_dim=int(ds.visual_dim)))

    def dummy_batch(self, cfg, n_videos: int = 2, n_queries: int = 2) -> dict:
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

    def train_plan(self, cfg, ds, *, mesh, n_slices: int) -> TrainPlan:
        """Batches of ``train.batch_size`` videos (rounded up to the device count) and a query capacity rounded
        to ``data.query_capacity_multiple``; with ``n_slices > 1`` (multi-host) each process builds only its
        slices of every batch (:func:`jaxprvr.data.train_batches`)."""
        from jaxprvr.data import prefetch, train_batches
        from jaxprvr.data.pipeline import batch_workers

        tc, n_shards = cfg.train, shd.n_data_shards(mesh)
        bsz = shd.round_up(tc.batch_size, n_shards)
        q_cap = shd.round_up(ds.query_capacity(tc.batch_size, cfg.data.query_capacity_multiple), n_shards)
        slicing = {}
        if n_slices > 1:
            from jaxprvr.distributed import local_slices

            slices = local_slices(n_slices, mesh)  # checks that n_slices divides the devices
            slice_size = bsz // n_slices
            q_cap = shd.round_up(ds.query_capacity(slice_size, cfg.data.query_capacity_multiple),
                                 n_shards // n_slices)
            slicing = {"slice_size": slice_size, "slices": slices}

        def batches(epoch, skip):
            it = train_batches(ds, tc.batch_size, epoch, tc.seed, q_cap, skip=skip,
                               workers=batch_workers(cfg.data.workers), **slicing)
            return prefetch((b if slicing else _pad_videos(b, bsz) for b in it), cfg.data.prefetch)

        def counts(batch):
            if slicing:  # the global counts of a sliced batch
                return {"videos": int(batch["n_videos"]), "queries": int(batch["n_queries"])}
            return {"videos": int(batch["video_valid"].sum()), "queries": int(batch["query_valid"].sum())}

        return TrainPlan(-(-len(ds.video_ids) // tc.batch_size), batches, counts)

    # -- optimisation
    def loss(self, model, cfg, steps_per_epoch: int):
        from jaxprvr.losses.prvr import total_loss

        name, start = cfg.model.name, cfg.loss.hard_negative_start_epoch

        def loss_fn(params, batch, rngs, step, model_state):
            # ``hard`` is traced: the switch to hard negatives does not recompile the step.
            hard = step // steps_per_epoch >= start
            scores, aux = model.apply({"params": params}, batch, train=True, rngs={"dropout": rngs["dropout"]})
            loss, terms = total_loss(name, scores, aux, batch, cfg.loss, rngs["sample"], hard=hard)
            return loss, (terms, model_state)  # no BatchNorm: the (empty) model state passes through

        return loss_fn

    def optimizer(self, cfg, params, steps_per_epoch: int):
        """BertAdam over ``n_epoch x steps_per_epoch``; with ``train.use_ema`` (MTM) it also keeps the EMA weights."""
        from jaxprvr.optim import bert_adam, official_weight_decay_mask, with_ema

        t = cfg.train
        tx = bert_adam(lr=t.lr, warmup=t.lr_warmup_proportion, t_total=steps_per_epoch * t.n_epoch,
                       weight_decay=t.wd, weight_decay_mask=official_weight_decay_mask(params),
                       max_grad_norm=t.max_grad_norm)
        return with_ema(tx, t.ema_decay) if t.use_ema else tx

    def lr_at(self, cfg, steps_per_epoch: int):
        from jaxprvr.optim import warmup_linear

        t_total = steps_per_epoch * cfg.train.n_epoch
        return lambda step: float(cfg.train.lr * warmup_linear(step, cfg.train.lr_warmup_proportion, t_total))

    def log_fields(self, cfg, epoch: int) -> dict:
        return {"hard": epoch >= cfg.loss.hard_negative_start_epoch}

    # -- evaluation
    def evaluator(self, model, cfg, mesh=None):
        return Evaluator(model, cfg, mesh)

    def test_fields(self, ds) -> dict:
        from jaxprvr.metrics.prvr import chance_sumr

        return {"chance_sumr": chance_sumr(len(ds.video_ids))}

    def format_metrics(self, m: dict) -> str:
        return format_metrics(m)

    def test_line(self, t: dict) -> str:
        return (f"test SumR {t['sumr']:.2f} (chance {t['chance_sumr']:.2f}) "
                f"R@1 {t['r1']:.2f} R@5 {t['r5']:.2f} R@10 {t['r10']:.2f} R@100 {t['r100']:.2f}")

    def save_outputs(self, directory, metrics: dict, ds) -> None:
        """``scores.npy`` (the fused (queries, videos) matrix) with ``query_ids.txt`` and ``video_ids.txt``."""
        save_scores(directory, metrics["_scores"], ds)


TASK = PRVRTask()


def _pad_videos(batch: dict, size: int) -> dict:
    """Pads the video axis to a multiple of the device count (only when B is not already one)."""
    b = batch["video_valid"].shape[0]
    if b == size:
        return batch
    out = dict(batch)
    for k in VIDEO_KEYS + ("video_index",):
        v = batch[k]
        pad = np.zeros((size - b,) + v.shape[1:], v.dtype)
        if k == "video_index":
            pad -= 1
        out[k] = np.concatenate([v, pad], 0)
    return out


# ---------------------------------------------------------------------------------------------- evaluator


class Evaluator:
    """Holds the jitted encode/score functions of one model so repeated evaluations never recompile.

    Blocks are padded to static shapes (one compilation per split) and split over the ``data`` mesh."""

    def __init__(self, model, cfg, mesh=None):
        self.model = model
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self.weights = model.branch_weights()
        self._n = shd.n_data_shards(self.mesh)

        def encode_video(params, b):
            return model.apply({"params": params}, b["clip_feats"], b["frame_feats"], b["frame_mask"],
                               b["frame_len"], train=False, method=model.encode_video)

        def encode_query(params, b):
            return model.apply({"params": params}, b["query_feats"], b["query_mask"], train=False,
                               method=model.encode_query)

        def score(params, query, gallery):
            return model.apply({"params": params}, query, gallery, method=model.score)

        data, rep = shd.data_sharding(self.mesh), shd.replicated(self.mesh)
        self._encode_video = jax.jit(encode_video, out_shardings=data)
        self._encode_query = jax.jit(encode_query, out_shardings=data)
        # Scoring: the gallery is split over the devices along its video axis (each device scores every query
        # block against its share of the videos; the (queries, videos) result stays split the same way).
        self._score = jax.jit(score, in_shardings=(rep, rep, data),
                              out_shardings=NamedSharding(self.mesh, P(None, shd.DATA_AXIS)))

    def _encode_blocks(self, fn, params, batches, n_items, block, valid_key, keys, progress, desc):
        """Runs ``fn`` on each block padded to a static, device-divisible size; keeps the valid rows."""
        from jaxprvr.data import prefetch

        size = shd.round_up(block, self._n)
        outs = []
        # The host builds the next blocks on a background thread while the device encodes; outputs stay on the
        # device until every block is dispatched, then come back in one pass (no per-block synchronisation).
        with prefetch(({k: b[k] for k in keys} for b in batches), 2) as blocks:
            for b in _bar(blocks, progress, desc, -(-n_items // block)):
                b = _pad_rows(b, size)
                outs.append((fn(params, shd.shard_batch(b, self.mesh)), np.asarray(b[valid_key]) > 0))
        host = [jax.tree.map(lambda x, v=valid: shd.to_host(x)[v], out) for out, valid in outs]  # to every host
        return jax.tree.map(lambda *xs: np.concatenate(xs, 0), *host)

    def encode_gallery(self, params, ds, progress=False) -> dict:
        """Every gallery video in blocks of ``eval_context_bsz``, caption-file order (as the official loader)."""
        from jaxprvr.data import video_batches

        bsz = self.cfg.data.eval_context_bsz
        return self._encode_blocks(self._encode_video, params, video_batches(ds, bsz), len(ds.video_ids), bsz,
                                   "video_valid", VIDEO_KEYS, progress, "gallery")

    def encode_queries(self, params, ds, progress=False) -> np.ndarray:
        from jaxprvr.data import query_batches

        bsz = self.cfg.data.eval_query_bsz
        return self._encode_blocks(self._encode_query, params, query_batches(ds, bsz), len(ds.cap_ids), bsz,
                                   "query_valid", QUERY_KEYS, progress, "queries")

    def score_rows(self, gallery: dict) -> int:
        """Queries scored per call: a multiple of ``eval_query_bsz`` (at least one block) sized so that one call's
        ``(queries, videos per device, rows per video)`` similarity tensor stays near ``SCORE_ELEMENTS`` floats.
        Rows are independent, so the block size changes only the speed, never a score."""
        q = self.cfg.data.eval_query_bsz
        nv = shd.round_up(len(next(iter(gallery.values()))), self._n) // self._n
        per_video = sum(int(np.prod(v.shape[1:-1])) for v in gallery.values() if np.ndim(v) >= 3) or 1
        rows = (SCORE_ELEMENTS // (nv * per_video)) // q * q
        return shd.round_up(int(min(max(rows, q), MAX_SCORE_ROWS)), self._n)

    def score_matrix(self, params, query: np.ndarray, gallery: dict, progress=False) -> dict:
        """Per-branch cosine score matrices (Nq, Nv) and their fused sum under key ``"fused"``.

        The gallery is padded to a multiple of the device count with videos marked invalid
        (``video_valid``: MTM's refiner attends over the gallery and skips them; their columns are dropped)."""
        nv = len(next(iter(gallery.values())))
        padded = shd.round_up(nv, self._n)
        gallery = {**{k: np.asarray(v) for k, v in gallery.items()}, "video_valid": np.ones((nv,), np.float32)}
        gallery = _pad_rows(gallery, padded)
        gallery_dev = {k: shd.put_global(v, shd.data_sharding(self.mesh)) for k, v in gallery.items()}
        size = self.score_rows(gallery)
        query_sharding = shd.replicated(self.mesh)
        outs = []
        n = len(query)
        for start in _bar(range(0, n, size), progress, "scoring", -(-n // size)):
            blk = query[start:start + size]
            m = len(blk)
            blk = np.concatenate([blk, np.zeros((size - m,) + blk.shape[1:], blk.dtype)]) if m < size else blk
            outs.append((self._score(params, shd.put_global(blk, query_sharding), gallery_dev), m))
        mats = {k: np.concatenate([shd.to_host(out[k])[:m, :nv] for out, m in outs], 0) for k in outs[0][0]}
        mats["fused"] = sum(self.weights[k] * mats[k] for k in self.weights)
        return mats

    def evaluate(self, params, ds, progress=False, keep_scores=False, keep_outputs=False) -> dict:
        """The metrics of the fused score (and per branch under ``"branches"``); with ``keep_scores`` /
        ``keep_outputs`` the fused matrix too, under ``"_scores"``."""
        t0 = time.perf_counter()
        gallery = self.encode_gallery(params, ds, progress)
        query = self.encode_queries(params, ds, progress)
        mats = self.score_matrix(params, query, gallery, progress)
        gt = np.asarray(ds.query_video_index)
        result = {k: eval_q2m(v, gt) for k, v in mats.items()}
        out = dict(result["fused"])
        out["branches"] = {k: v for k, v in result.items() if k != "fused"}
        out["n_queries"], out["n_videos"] = int(len(ds.cap_ids)), int(len(ds.video_ids))
        out["seconds"] = round(time.perf_counter() - t0, 3)
        if keep_scores or keep_outputs:
            out["_scores"] = mats["fused"]
        return out


def _pad_rows(b: dict, size: int) -> dict:
    """Pads every array of a block along axis 0 to ``size`` rows of zeros (marked invalid)."""
    out = {}
    for k, v in b.items():
        v = np.asarray(v)
        n = v.shape[0]
        if n < size:
            v = np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)], 0)
        out[k] = v
    return out


def _bar(it, progress, desc, total=None):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


def format_metrics(m: dict) -> str:
    return " ".join(f"{k}={m[k]:.2f}" for k in ("r1", "r5", "r10", "r100", "sumr") if k in m)


def save_scores(directory: str | Path, scores: np.ndarray, ds) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "scores.npy", scores.astype(np.float32))
    (d / "query_ids.txt").write_text("\n".join(ds.cap_ids) + "\n")
    (d / "video_ids.txt").write_text("\n".join(ds.video_ids) + "\n")
