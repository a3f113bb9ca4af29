"""The official MRNet evaluation (``ret/data/datasets/evaluation.py``, ``ret/engine/inference.py``), in PyTorch.

* :func:`official_inference`: ``compute_on_dataset`` + ``_accumulate_predictions_from_multiple_gpus``
  (inference.py L10-50): the model in eval mode under ``no_grad``, per video ``{"contrastive", "iou"}`` (n_q, N, N)
  maps, keyed by dataset index and returned as a list in index order (so the loader's shuffling, data/__init__.py
  L78, does not matter).
* :func:`official_evaluate`: ``evaluate`` (evaluation.py L22-135) without the table/JSON side effects:
  ``score = ((c * 0.5 + 0.5) ** pow) * iou`` (L54); candidates are the NON-ZERO cells (``score2d.nonzero()``,
  utils.py L34-39: row-major, a valid cell scoring exactly 0 is no candidate) with spans
  ``[i, j + 1] * duration / N`` in float32; :func:`nms` (L9-19): ``scores.sort(descending=True)`` (unstable on
  ties), strict ``IoU > thresh``, a Python loop over the whole sorted list; hits ``float32 IoU >= float32 θ``;
  recall counts in float32 divided by the query count; mIoU sums the Python floats ``mious.item()`` of the top-1.
  Returns the official dict ``{"R@1,IoU@0.3": ..., "R@{1},mIoU": ..., "Best_R1": ..., "Best_R5": ...}`` (values
  as Python floats of the official float32 tensors; the mIoU a Python float as officially).

  An NMS list with fewer than r (but more than 1) moments makes ``expand(r, ...)`` raise officially (L77); here it
  raises :class:`JaxprvrError`; a single moment is broadcast to R@5 as officially.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from jaxprvr.errors import JaxprvrError

__all__ = ["iou", "score2d_to_moments_scores", "nms", "official_evaluate", "official_inference", "official_keys"]


def iou(candidates, gt):
    """utils.py L11-17: IoU of (n, 2) candidates with one [s, e] span."""
    start, end = candidates[:, 0], candidates[:, 1]
    s, e = gt[0].float(), gt[1].float()
    inter = end.min(e) - start.max(s)
    union = end.max(e) - start.min(s)
    return inter.clamp(min=0) / union


def score2d_to_moments_scores(score2d, num_clips, duration):
    """utils.py L34-39: the non-zero cells, spans ``[i, j + 1] * duration / num_clips`` (float32)."""
    grids = score2d.nonzero()
    scores = score2d[grids[:, 0], grids[:, 1]]
    grids[:, 1] += 1
    return grids * duration / num_clips, scores


def nms(moments, scores, thresh):
    """evaluation.py L9-19: greedy NMS over the whole list sorted by score (descending), strict ``>``."""
    scores, ranks = scores.sort(descending=True)
    moments = moments[ranks]
    suppressed = torch.zeros_like(ranks).bool()
    for i in range(suppressed.numel() - 1):
        if suppressed[i]:
            continue
        mask = iou(moments[i + 1:], moments[i]) > thresh
        suppressed[i + 1:][mask] = True
    return moments[~suppressed]


def official_keys(iou_thresholds: Sequence[float], recall_metrics=(1, 5)) -> list[str]:
    """The keys of the returned dict, formatted as L129 formats them."""
    ious = torch.tensor(tuple(iou_thresholds))
    keys = ["R@{},IoU@{:.01f}".format(int(r), float(torch.round(t * 100) / 100)) for r in recall_metrics for t in ious]
    return keys + ["R@{1},mIoU", "Best_R1", "Best_R5"]


def official_evaluate(dataset_records: Sequence[dict], predictions: Sequence[dict], nms_thresh: float,
                      iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7), score_pow: float = 0.5,
                      recall_metrics: Sequence[int] = (1, 5), top1: Optional[list] = None) -> dict:
    """``evaluate`` (evaluation.py L22-135). ``dataset_records[idx]``: ``{"duration": float, "moments": (n_q, 2)
    GT seconds in query (rank) order}``; ``predictions[idx]``: ``{"contrastive": (n_q, N, N), "iou": (n_q, N,
    N)}`` (:func:`official_inference`'s list). ``top1`` (a list), when given, receives each query's top-1 moment
    ``[s, e]`` (what ``results{epoch}.json`` keeps, L72)."""
    if len(dataset_records) != len(predictions):
        raise JaxprvrError("official_evaluate", f"{len(dataset_records)} predictions (one per video)",
                           str(len(predictions)))
    n_r, n_t = len(recall_metrics), len(iou_thresholds)
    recall_t = torch.tensor(tuple(recall_metrics))
    iou_t = torch.tensor(tuple(iou_thresholds))
    num_clips = torch.as_tensor(predictions[0]["iou"]).shape[-1]
    recall_x_iou = torch.zeros(n_r, n_t)
    recall_m_iou, num_instance = 0., 0
    for idx, result2d in enumerate(predictions):
        c = torch.as_tensor(np.asarray(result2d["contrastive"]))
        u = torch.as_tensor(np.asarray(result2d["iou"]))
        score2d = torch.pow(c * 0.5 + 0.5, score_pow) * u
        duration = dataset_records[idx]["duration"]
        duration = float(duration) if not isinstance(duration, (int, float)) else duration
        gts = torch.as_tensor(np.asarray(dataset_records[idx]["moments"]))
        if gts.shape[0] != score2d.shape[0]:
            raise JaxprvrError(f"official_evaluate video {idx}", f"{gts.shape[0]} score maps (one per query)",
                               str(score2d.shape[0]))
        for gt_moment, pred_score2d in zip(gts, score2d):
            num_instance += 1
            candidates, scores = score2d_to_moments_scores(pred_score2d, num_clips, duration)
            moments = nms(candidates, scores, nms_thresh)
            if top1 is not None:
                top1.append(moments[0].tolist())
            for i, r in enumerate(recall_t):
                mious = iou(moments[:r], gt_moment)
                if 1 < mious.shape[0] < int(r):
                    raise JaxprvrError(f"official_evaluate video {idx}", f"at least {int(r)} moments after NMS "
                                       "(the official expand() fails otherwise)", str(mious.shape[0]))
                bools = mious[:, None].expand(int(r), n_t) >= iou_t
                recall_x_iou[i] += bools.any(dim=0)
                if i == 0:
                    recall_m_iou += mious.item()
    recall_m_iou /= num_instance
    recall_x_iou /= num_instance
    out = {}
    for i in range(n_r):
        for j in range(n_t):
            key = "R@{},IoU@{:.01f}".format(int(recall_t[i]), float(torch.round(iou_t[j] * 100) / 100))
            out[key] = float(recall_x_iou[i][j])
    out["R@{1},mIoU"] = recall_m_iou
    out["Best_R1"] = float(sum(recall_x_iou[0]) / n_t)
    if n_r > 1:
        out["Best_R5"] = float(sum(recall_x_iou[1]) / n_t)
    return out


def official_inference(model: torch.nn.Module, batches: Iterable) -> list[dict]:
    """inference.py L10-50: ``model.eval()``, per batch ``_, _, contrastive, iou = model(batch)`` under no_grad,
    stored by dataset index (``batch["idxs"]``; the running count when absent) and returned in index order as
    ``[{"contrastive": (n_q, N, N), "iou": (n_q, N, N)}, ...]`` (float32 CPU tensors)."""
    model.eval()
    results, running = {}, 0
    for batch in batches:
        with torch.no_grad():
            _, _, contrastive, ious = model(batch)
        idxs = batch.get("idxs") if isinstance(batch, dict) else getattr(batch, "idxs", None)
        if idxs is None:
            idxs = list(range(running, running + len(contrastive)))
        running += len(contrastive)
        for vid_idx, c, u in zip(idxs, contrastive, ious):
            results[int(vid_idx)] = {"contrastive": c.detach().cpu(), "iou": u.detach().cpu()}
    order = sorted(results)
    return [results[i] for i in order]
