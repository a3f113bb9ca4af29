"""Video moment retrieval (MRNet; MESM will join): the official recipe as a task.

* data: MMN-format annotations and features (:class:`jaxprvr.data.mmn_format.MMNDataset`; docs/data.md),
  batches of videos with all their queries (padded query slots, ``drop_last=False`` with the short last batch
  padded by invalid videos, which BatchNorm statistics, losses and the sparsity term ignore);
* loss: the family's official loss (:data:`jaxprvr.losses.vmr.LOSSES`), a function of the 1-based epoch
  ``step // steps_per_epoch + 1``;
* optimizer: ``clip_grad_norm_`` + torch AdamW under ``MultiStepLR`` stepped per epoch; parameters the official
  model never gives a gradient are neither updated nor decayed (the model's ``trainable_mask``);
* evaluation: per video, the model's outputs are decoded into ranked moments per query (MRNet: score maps ->
  greedy NMS, :func:`jaxprvr.metrics.vmr.predict_moments`), then R@{1,5} at the dataset's IoU thresholds and
  the mIoU of the top-1 (:func:`jaxprvr.metrics.vmr.vmr_metrics`); R1@0.5 selects the ``best`` checkpoint.
  ``train.eval_split`` is the split evaluated during training (val; the official code evaluates on test and
  selects nothing: docs/quirks.md).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxprvr import sharding as shd
from jaxprvr.errors import JaxprvrError
from jaxprvr.tasks.base import Task, TrainPlan

BATCH_KEYS = ("feats", "video_valid", "queries", "query_mask", "n_queries", "moments", "duration", "iou2d")


class VMRTask(Task):
    name = "vmr"
    api_class = "jaxprvr.api_tasks:MRNetModel"
    splits = ("train", "val", "test")
    batch_keys = BATCH_KEYS
    selection_metric = "R1@0.5"
    selection_mode = "max"
    # --demo: a short schedule with the lr milestone and the ONLY_IOU switch inside it; evaluation on the config's
    # eval split from the first epoch (the family's registry row narrows the model).
    demo_overrides = {
        "train.n_epoch": "6",
        "train.milestones": "(4,)",
        "train.skip_test": "0",
        "train.log_every": "5",
    }

    # -- data
    def demo_root(self, cfg) -> Path:
        from jaxprvr.data.synthetic_vmr import demo_root

        return Path(demo_root(cfg.data.dataset))

    def validation_split(self, cfg) -> str:
        return cfg.train.eval_split

    def validates_after(self, cfg, epoch: int) -> bool:
        """Every ``train.test_period`` epochs from ``train.skip_test`` (1-based, ``trainer.py`` L145), and after the
        last epoch (so that a run always ends with an evaluation to select from)."""
        e, t = epoch + 1, cfg.train
        return (t.test_period > 0 and e % t.test_period == 0 and e >= t.skip_test) or e == t.n_epoch

    def open_split(self, cfg, root, split):
        from jaxprvr.data.mmn_format import MMNDataset

        if split not in cfg.data.splits:
            raise JaxprvrError(f"split {split!r}", f"one of the splits of {cfg.data.dataset}: {list(cfg.data.splits)}",
                               repr(split), hint="set train.eval_split to one of them")
        return MMNDataset(root, cfg, split)

    def dummy_batch(self, cfg, n_videos: int = 2, n_queries: int = 4) -> dict:
        m = cfg.model
        f32, n = np.float32, m.num_clips
        return {
            "feats": np.zeros((n_videos, m.num_pre_clips, m.input_size), f32),
            "video_valid": np.ones((n_videos,), f32),
            "queries": np.zeros((n_videos, n_queries, m.text_dim), f32),
            "query_mask": np.ones((n_videos, n_queries), f32),
            "n_queries": np.full((n_videos,), n_queries, np.int32),
            "moments": np.tile(np.asarray([0.0, 1.0], f32), (n_videos, n_queries, 1)),
            "duration": np.ones((n_videos,), f32),
            "iou2d": np.zeros((n_videos, n_queries, n, n), f32),
        }

    def train_plan(self, cfg, ds, *, mesh, n_slices: int) -> TrainPlan:
        """``train.batch_size`` videos per batch (rounded up to the device count with invalid videos), shuffled
        per epoch from (seed, epoch), the last batch short and padded (official ``drop_last=False``). With
        ``n_slices > 1`` every process builds the whole batch and keeps its slices' videos."""
        from jaxprvr.data import prefetch
        from jaxprvr.data.mmn_format import train_batches

        bsz = shd.round_up(cfg.train.batch_size, shd.n_data_shards(mesh))
        rows = None
        if n_slices > 1:
            from jaxprvr.distributed import local_slices

            slices = local_slices(n_slices, mesh)
            per = bsz // n_slices
            rows = np.concatenate([np.arange(s * per, (s + 1) * per) for s in slices])

        def take(b):  # this process's videos of a global batch, with the global counts for the logs
            out = {k: (v[rows] if isinstance(v, np.ndarray) and v.ndim and v.shape[0] == bsz else
                       [v[i] for i in rows] if isinstance(v, list) and len(v) == bsz else v) for k, v in b.items()}
            out["global_counts"] = _counts(b)
            return out

        def batches(epoch, skip):
            it = (_pad_videos(b, bsz) for b in train_batches(ds, cfg, epoch, skip=skip))
            return prefetch(it if rows is None else (take(b) for b in it), cfg.data.prefetch)

        def counts(batch):
            return batch.get("global_counts") or _counts(batch)

        return TrainPlan(-(-len(ds) // cfg.train.batch_size), batches, counts)

    # -- optimisation
    def loss(self, model, cfg, steps_per_epoch: int):
        from jaxprvr.losses.vmr import LOSSES

        family_loss = LOSSES[cfg.model.name]

        def loss_fn(params, batch, rngs, step, model_state):
            epoch = step // steps_per_epoch + 1  # 1-based, traced: the ONLY_IOU switch does not recompile
            (outputs, aux), new_state = model.apply({"params": params, **model_state}, batch, train=True,
                                                    rngs={"dropout": rngs["dropout"]}, mutable=["batch_stats"])
            loss, terms = family_loss(outputs, aux, batch, cfg.loss, epoch, cfg.train.batch_size)
            return loss, (terms, {k: new_state[k] for k in model_state})

        return loss_fn

    def optimizer(self, cfg, params, steps_per_epoch: int):
        from jaxprvr.models import build_model
        from jaxprvr.optim import multistep_lr, torch_adamw

        t = cfg.train
        model = build_model(cfg.model)
        trainable = model.trainable_mask(params) if hasattr(model, "trainable_mask") else None
        return torch_adamw(multistep_lr(t.lr, t.milestones, t.lr_gamma, steps_per_epoch), t.adam_b1, t.adam_b2,
                           t.wd, t.max_grad_norm, trainable)

    def lr_at(self, cfg, steps_per_epoch: int):
        from jaxprvr.optim import multistep_lr

        sched = multistep_lr(cfg.train.lr, cfg.train.milestones, cfg.train.lr_gamma, steps_per_epoch)
        return lambda step: float(sched(step))

    def log_fields(self, cfg, epoch: int) -> dict:
        only_iou = getattr(cfg.loss, "only_iou_epoch", None)
        return {} if only_iou is None else {"full_loss": epoch + 1 <= only_iou}

    # -- evaluation
    def evaluator(self, model, cfg, mesh=None):
        return Evaluator(model, cfg, mesh)

    def format_metrics(self, m: dict) -> str:
        keys = [k for k in m if k.startswith("R1@") or k.startswith("R5@")] + ["mIoU"]
        return " ".join(f"{k}={100 * m[k]:.2f}" for k in keys if k in m)

    def test_line(self, t: dict) -> str:
        chance = t.get("chance_R1@0.5")
        extra = f" (chance {100 * chance:.2f})" if chance is not None else ""
        return f"test R1@0.5 {100 * t['R1@0.5']:.2f}{extra} " + self.format_metrics(t)

    def save_outputs(self, directory, metrics: dict, ds) -> None:
        save_predictions(directory, metrics, ds)


TASK = VMRTask()


def _counts(batch) -> dict:
    return {"videos": int(np.sum(batch["video_valid"])), "queries": int(np.sum(batch["n_queries"]))}


def _pad_videos(batch: dict, size: int) -> dict:
    """Pads the video axis of a batch to ``size`` with invalid videos (zeros, ``index`` -1)."""
    b = batch["video_valid"].shape[0]
    if b == size:
        return batch
    out = dict(batch)
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == b:
            pad = np.zeros((size - b,) + v.shape[1:], v.dtype)
            if k == "index":
                pad -= 1
            out[k] = np.concatenate([v, pad], 0)
        elif isinstance(v, list) and len(v) == b:
            out[k] = v + [None] * (size - b)
    return out


# ---------------------------------------------------------------------------------------------- evaluation

# How each family's evaluation outputs become ranked moments: "proposal_maps" (a contrastive and an IoU map
# per query over the N x N grid -> score, NMS). A family that predicts spans directly adds its decoder here.
DECODERS = {"mrnet": "proposal_maps"}


class Evaluator:
    """Runs the model in eval mode over a split in ``data.eval_batch_size`` batches (static shapes: one
    compilation per split's query capacity), decodes each query's moments on the host and scores them."""

    def __init__(self, model, cfg, mesh=None):
        from jaxprvr.ops.proposals import mask2d

        self.model, self.cfg = model, cfg
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self._n = shd.n_data_shards(self.mesh)
        self.decoder = DECODERS[cfg.model.name]
        self.mask = np.asarray(mask2d(cfg.model.num_clips, cfg.model.pooling_counts), bool)

        def forward(params, model_state, batch):
            outputs, _ = model.apply({"params": params, **model_state}, batch, train=False)
            return {k: outputs[k] for k in ("contrastive_scores", "iou_scores")}

        self._forward = jax.jit(forward, out_shardings=shd.data_sharding(self.mesh))

    def evaluate(self, params, ds, progress=False, keep_outputs=False, model_state=None) -> dict:
        from jaxprvr.data import prefetch
        from jaxprvr.data.mmn_format import eval_batches
        from jaxprvr.metrics.vmr import chance_recall, predict_moments_padded, vmr_metrics

        t0 = time.perf_counter()
        d = self.cfg.data
        model_state = model_state or {}
        size = shd.round_up(d.eval_batch_size, self._n)
        preds, gts, durs, records, maps, pending = [], [], [], [], {}, []

        def drain(item):  # the host half of one batch: NMS and the per-query records, in file order
            out, b = item
            c, u = shd.to_host(out["contrastive_scores"]), shd.to_host(out["iou_scores"])
            dur = np.asarray(b["duration"], np.float32)
            p, _ = predict_moments_padded(c, u, self.mask, dur[:, None], d.contrastive_score_pow, d.nms_thresh,
                                          d.topk)  # (B, Q, topk, 3), NaN past the survivors
            for i in np.flatnonzero(np.asarray(b["video_valid"]) > 0):
                nq, vid = int(b["n_queries"][i]), b["vid"][i]
                gt = np.asarray(b["moments"][i, :nq], np.float32)
                preds.append(p[i, :nq])
                gts.append(gt)
                durs.append(np.full((nq,), dur[i], np.float32))
                if keep_outputs:
                    for q in range(nq):
                        kept = p[i, q][~np.isnan(p[i, q, :, 0])]
                        records.append({"vid": vid, "query_id": b["query_ids"][i][q], "query_rank": q,
                                        "duration": float(dur[i]), "gt": [float(gt[q, 0]), float(gt[q, 1])],
                                        "pred": kept.astype(float).tolist()})
                    maps[f"{vid}/contrastive"] = np.asarray(c[i, :nq], np.float32)
                    maps[f"{vid}/iou"] = np.asarray(u[i, :nq], np.float32)

        with prefetch(eval_batches(ds, self.cfg), 2) as batches:
            for b in _bar(batches, progress, "eval", -(-len(ds) // d.eval_batch_size)):
                b = _pad_videos(b, size)
                dev = shd.shard_batch({k: b[k] for k in BATCH_KEYS}, self.mesh)
                pending.append((self._forward(params, model_state, dev), b))
                if len(pending) > 1:  # decode batch k-1 on the host while the device runs batch k
                    drain(pending.pop(0))
            while pending:
                drain(pending.pop(0))
        gt_all, dur_all = np.concatenate(gts, 0), np.concatenate(durs, 0)
        res = vmr_metrics(np.concatenate(preds, 0), gt_all, d.iou_thresholds)
        res.update(chance_recall(self.mask, dur_all, gt_all, d.iou_thresholds))
        res.update(n_videos=len(gts), topk=int(d.topk), seconds=round(time.perf_counter() - t0, 3))
        if keep_outputs:
            res["_predictions"] = records
            res["_score_maps"] = maps
        return res


def save_predictions(directory, metrics: dict, ds) -> None:
    """``metrics.json`` (the metrics with the official dict), ``predictions.json`` (every query's ranked
    moments in seconds, file order, queries by rank) and ``score_maps.npz`` (per video, masked, rank order)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    flat = {k: v for k, v in metrics.items() if not k.startswith("_")}
    (d / "metrics.json").write_text(json.dumps(flat, indent=2))
    preds = {"dataset": ds.dataset, "split": ds.split, "topk": metrics.get("topk"),
             "queries": metrics.get("_predictions", [])}
    (d / "predictions.json").write_text(json.dumps(preds))
    if metrics.get("_score_maps"):
        np.savez(d / "score_maps.npz", **metrics["_score_maps"])


def _bar(it, progress, desc, total=None):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)
