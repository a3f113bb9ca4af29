"""Moment-retrieval evaluation of MRNet/MMN: score maps -> candidate moments -> greedy NMS -> R@k,IoU@theta, mIoU.

Official code: xian-sh/MRNet @ 53432f5 ``ret/data/datasets/evaluation.py`` (``nms`` L9-19, ``evaluate``
L22-135) and ``ret/data/datasets/utils.py`` (``iou`` L11-17, ``score2d_to_moments_scores`` L34-39).

Per query (evaluation.py L54-80): ``score = ((c + 1) / 2)^pow * iou`` (float32); the candidates are the
non-zero cells in row-major order, spans ``[i dur / N, (j + 1) dur / N]`` (float32); the list is sorted by score
descending and greedily suppressed (a later moment is dropped when its IoU with a kept one is STRICTLY greater
than the threshold); R@k at theta counts a hit when one of the first k survivors has float32 IoU >= float32
theta with the GT; mIoU is the mean IoU of the first survivor.

Deterministic choices (documented deviations, none changes a metric on untied maps):
  * ties: the official ``scores.sort(descending=True)`` is not stable; here the sort is stable (equal scores
    keep the row-major cell order). Only the first ``topk`` survivors are computed: they are exactly the first
    ``topk`` of the official full-list NMS (a survivor depends only on the survivors before it).
  * the score: the official torch float32 ``pow`` (and ``sqrt``) on CPU is not correctly rounded; numpy's is,
    so a score may differ from torch's by an ulp (which only reorders scores tied to within an ulp).
  * candidates: the cells of ``mask`` whose score is non-zero (the official ``score2d.nonzero()`` on maps that
    are zero outside mask2d: the same set).
  * short lists: R@k with fewer than k predictions counts a hit if any available prediction hits (the official
    code reuses a single moment for R@5 by broadcasting, L77, and crashes on 2-4 moments); a query with no
    prediction at all (every score 0, an IndexError at L72 there) is a miss with IoU 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.ops.proposals import iou_1d, moment_to_iou2d

__all__ = ["nms_topk", "predict_moments", "predict_moments_padded", "vmr_metrics", "chance_recall",
           "official_key", "metric_key"]

F32 = np.float32


def metric_key(r: int, thr: float) -> str:
    """Our key, ``"R1@0.5"``."""
    return f"R{int(r)}@{float(thr):g}"


def official_key(r: int, thr: float) -> str:
    """evaluation.py L129: ``'R@{},IoU@{:.01f}'.format(r, torch.round(theta * 100) / 100)`` (float32)."""
    v = F32(np.round(F32(thr) * F32(100)) / F32(100))
    return "R@{},IoU@{:.01f}".format(int(r), float(v))


def _greedy(spans, alive, thresh: float, topk: int):
    """Batched greedy NMS over lists already sorted by score: ``spans`` (Q, M, 2) float32, ``alive`` (Q, M)
    bool (the candidates). Returns (Q, topk) positions into M, -1 past the survivors."""
    q, m = alive.shape
    alive = alive.copy()
    picks = np.full((q, topk), -1, np.int64)
    rows = np.arange(q)
    thr = F32(thresh)
    for t in range(topk):
        if m == 0:
            break
        first = np.argmax(alive, axis=1)
        has = alive[rows, first]
        if not has.any():
            break
        picks[has, t] = first[has]
        sel = rows[has]
        ref = spans[sel, first[has]]  # (q', 2)
        sup = iou_1d(spans[sel], ref[:, None, :]) > thr  # evaluation.py L17: strict
        alive[sel] &= ~sup
        alive[sel, first[has]] = False
    return picks


def _stable_desc(scores, valid):
    """Stable descending order of ``scores`` (Q, M) with the invalid entries last."""
    key = np.where(valid, -scores.astype(np.float64), np.inf)
    return np.argsort(key, axis=1, kind="stable")


def nms_topk(spans, scores, thresh: float, topk: int) -> np.ndarray:
    """Indices (into ``spans``/``scores``) of the first ``topk`` survivors of the greedy NMS of evaluation.py
    L9-19 (stable descending sort, then a moment is dropped when its float32 IoU with a kept one is > thresh).
    ``spans`` (M, 2), ``scores`` (M,); returns at most ``topk`` indices in survival order."""
    spans = np.asarray(spans, F32).reshape(-1, 2)
    scores = np.asarray(scores).reshape(-1)
    if spans.shape[0] != scores.shape[0]:
        raise JaxprvrError("metrics.vmr.nms_topk", "as many scores as spans", f"{scores.shape[0]} vs {spans.shape[0]}")
    valid = np.ones((1, scores.shape[0]), bool)
    order = _stable_desc(scores[None], valid)[0]
    picks = _greedy(spans[order][None], valid, thresh, int(topk))[0]
    return order[picks[picks >= 0]]


def _scores(contrastive, iou, score_pow: float):
    """evaluation.py L54: ``pow(c * 0.5 + 0.5, POW) * iou`` in float32."""
    c = np.asarray(contrastive, F32)
    base = c * F32(0.5) + F32(0.5)
    p = F32(score_pow)
    powed = np.sqrt(base) if p == F32(0.5) else np.power(base, p)
    return (powed * np.asarray(iou, F32)).astype(F32)


def predict_moments_padded(contrastive, iou, mask, duration, score_pow: float, nms_thresh: float, topk: int):
    """Batched :func:`predict_moments`: maps (Q, N, N) of one video (or any leading shape with a broadcastable
    ``duration``), returns ``(preds (Q, topk, 3) float32 [start, end, score] with NaN rows past the survivors,
    counts (Q,))``."""
    c = np.asarray(contrastive, F32)
    n = c.shape[-1]
    lead = c.shape[:-2]
    c = c.reshape(-1, n, n)
    i_map = np.asarray(iou, F32).reshape(-1, n, n)
    q = c.shape[0]
    mask = np.asarray(mask, bool)
    cells = np.flatnonzero(mask)  # row-major, as nonzero()
    score = _scores(c, i_map, score_pow).reshape(q, n * n)[:, cells]  # (Q, M)
    valid = score != 0
    dur = np.broadcast_to(np.asarray(duration, F32), lead).reshape(-1)
    pos = (np.arange(n + 1, dtype=F32)[None, :] * dur[:, None]) / F32(n)  # candidate_spans' arithmetic
    ci, cj = cells // n, cells % n
    spans = np.stack([pos[:, ci], pos[:, cj + 1]], axis=-1)  # (Q, M, 2)
    order = _stable_desc(score, valid)
    rows = np.arange(q)[:, None]
    s_sorted, v_sorted, sp_sorted = score[rows, order], valid[rows, order], spans[rows, order]
    picks = _greedy(sp_sorted, v_sorted, nms_thresh, int(topk))
    ok = picks >= 0
    pk = np.where(ok, picks, 0)
    out = np.concatenate([sp_sorted[rows, pk], s_sorted[rows, pk][..., None]], axis=-1)
    out[~ok] = np.nan
    return out.reshape(lead + (int(topk), 3)), ok.sum(1).reshape(lead)


def predict_moments(contrastive, iou, mask, duration, score_pow: float, nms_thresh: float, topk: int):
    """The top ``topk`` moments after NMS, ``(k, 3)`` float32 ``[start, end, score]`` (seconds), ``k <= topk``.

    ``contrastive``, ``iou``: one query's (N, N) score maps (``cos * mask``, ``sigmoid(10 cos) * mask``);
    ``score = ((c + 1) / 2)^score_pow * iou`` (evaluation.py L54) over the mask's non-zero-score cells, spans
    ``[i dur / N, (j + 1) dur / N]``. Maps of shape (Q, N, N) give a list of Q such arrays."""
    c = np.asarray(contrastive)
    preds, counts = predict_moments_padded(c, iou, mask, duration, score_pow, nms_thresh, topk)
    if c.ndim == 2:
        return preds[: int(counts)]
    flat = preds.reshape(-1, int(topk), 3)
    return [flat[k, : int(cnt)] for k, cnt in enumerate(np.asarray(counts).reshape(-1))]


def _pad_predictions(predictions, n_q: int):
    if isinstance(predictions, np.ndarray) and predictions.ndim == 3:
        p = np.asarray(predictions[..., :2], F32)
        return p
    if len(predictions) != n_q:
        raise JaxprvrError("metrics.vmr.vmr_metrics", "one prediction list per GT moment",
                           f"{len(predictions)} lists for {n_q} moments")
    arrs = [np.asarray(p, F32).reshape(-1, np.shape(p)[-1] if np.size(p) else 2)[:, :2] for p in predictions]
    k = max([a.shape[0] for a in arrs] + [1])
    out = np.full((n_q, k, 2), np.nan, F32)
    for i, a in enumerate(arrs):
        out[i, : a.shape[0]] = a
    return out


def vmr_metrics(predictions, gts, thresholds: Sequence[float], recalls: Sequence[int] = (1, 5)) -> dict:
    """R@k,IoU@theta and mIoU of ranked predictions (evaluation.py L68-80, L115-135 arithmetic).

    ``predictions``: a list of (k_i, >= 2) arrays ``[start, end, ...]`` in rank order, one per query, or an
    array (Q, K, >= 2) whose padding rows are NaN; ``gts`` (Q, 2) seconds. Hits: float32 IoU >= float32 theta
    among the first k (fewer if the list is shorter); recall = float32 count / Q; mIoU: the float32 top-1 IoUs
    summed in float64 in query order (``recall_m_iou += mious.item()``), / Q.

    Returns ``{"R1@0.5": ..., "R5@0.5": ..., "mIoU": ..., "n_queries": Q, "official": {"R@1,IoU@0.5": ...,
    "R@{1},mIoU": ..., "Best_R1": ..., "Best_R5": ...}}`` (fractions; the official values are the float32
    numbers of L126-135 as python floats; Best_R1/Best_R5 are the means over the thresholds of rows 0 and 1).
    """
    gts = np.asarray(gts, F32).reshape(-1, 2)
    n_q = gts.shape[0]
    if n_q == 0:
        raise JaxprvrError("metrics.vmr.vmr_metrics", "at least one query", "none")
    thr = np.asarray(list(thresholds), F32)
    p = _pad_predictions(predictions, n_q)
    ious = iou_1d(p, gts[:, None, :])  # (Q, K); NaN padding compares False
    hit = ious[..., None] >= thr  # (Q, K, T)
    k_idx = np.arange(p.shape[1])
    out, official = {}, {}
    rows = []
    for r in recalls:
        h = (hit & (k_idx < int(r))[None, :, None]).any(axis=1)  # (Q, T)
        rec = h.sum(axis=0).astype(F32) / F32(n_q)
        rows.append(rec)
        for t, v in zip(thresholds, rec):
            out[metric_key(r, t)] = float(v)
            official[official_key(r, t)] = float(v)
    top1 = np.nan_to_num(ious[:, 0], nan=0.0).astype(np.float64) if p.shape[1] else np.zeros(n_q)
    miou = float(np.cumsum(top1)[-1]) / n_q  # sequential, as the python loop
    out["mIoU"] = miou
    out["n_queries"] = int(n_q)
    official["R@{1},mIoU"] = miou
    for name, idx in (("Best_R1", 0), ("Best_R5", 1)):
        if idx < len(rows):
            acc = F32(0)
            for v in rows[idx]:
                acc = F32(acc + v)
            official[name] = float(F32(acc / F32(len(thr))))
    out["official"] = official
    return out


def chance_recall(mask, duration, gts, thresholds: Sequence[float]) -> dict:
    """Expected R@1 of a proposal drawn uniformly from ``mask``'s cells: per query the fraction of valid cells
    whose span has float32 IoU >= theta with the GT, averaged over queries. ``duration`` scalar or (Q,),
    ``gts`` (Q, 2). Returns ``{"chance_R1@0.5": ...}``."""
    mask = np.asarray(mask, bool)
    n = mask.shape[-1]
    gts = np.asarray(gts, F32).reshape(-1, 2)
    dur = np.broadcast_to(np.asarray(duration, F32), (gts.shape[0],))
    iou = moment_to_iou2d(gts, dur, n)[:, mask]  # (Q, M)
    out = {}
    for t in thresholds:
        out["chance_" + metric_key(1, t)] = float(np.mean((iou >= F32(t)).mean(axis=1, dtype=np.float64)))
    return out
