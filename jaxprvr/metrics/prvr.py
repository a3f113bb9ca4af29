"""Text-to-video retrieval metrics of the PRVR papers (official ``eval_q2m``).

Official code: ms-sl ``method/eval.py:53-78`` (numpy) and GMMFormer ``src/Validations/validations.py:40-64``
(torch, on GPU). Both rank ``errors = -score`` with an ascending argsort per query; the rank of a query
is 1 + the position of its ground-truth video; ``R@K = 100 #{rank <= K} / Nq`` for K in 1, 5, 10, 100;
``SumR = R@1 + R@5 + R@10 + R@100`` (unrounded); MS-SL also reports the median and mean rank and a
t2v mAP (``t2v_map``, ``:80-93``), which with one relevant video per query is ``mean(1 / rank)``.

Tie rule (documented deviation). The official argsorts are not stable (numpy quicksort, torch GPU sort),
so tied scores are ordered arbitrarily. Here ties are broken deterministically, by default as a stable
sort of ``-score`` would (``ties="stable"``): ``rank = 1 + #(score > gt) + #(score == gt, index < gt)``.
``"optimistic"`` gives ``1 + #(score > gt)``, ``"pessimistic"`` ``#(score >= gt)``. With float scores ties
practically never occur; with degenerate scores (all equal) ``stable`` is neither optimistic (R@1 = 100)
nor pessimistic.
"""

from __future__ import annotations

import numpy as np

from jaxprvr.errors import JaxprvrError

__all__ = ["KS", "gt_ranks", "eval_q2m", "q2m_from_ranks", "chance_sumr"]

KS = (1, 5, 10, 100)
_TIES = ("stable", "optimistic", "pessimistic")


def gt_ranks(scores, gt, *, ties: str = "stable", chunk_rows: int = 2048) -> np.ndarray:
    """1-based rank of each query's ground-truth video: ``scores (Nq, Nv)`` higher = better, ``gt (Nq,)``.

    Vectorised comparisons, ``chunk_rows`` queries at a time (memory ``chunk_rows x Nv`` booleans).
    """
    if ties not in _TIES:
        raise JaxprvrError("eval_q2m ties", f"one of {list(_TIES)}", repr(ties))
    scores = np.asarray(scores)
    gt = np.asarray(gt).astype(np.int64).reshape(-1)
    if scores.ndim != 2:
        raise JaxprvrError("eval_q2m scores", "a 2-D (n_queries, n_videos) matrix", f"shape {scores.shape}")
    n_q, n_v = scores.shape
    if gt.shape[0] != n_q:
        raise JaxprvrError("eval_q2m gt", f"{n_q} ground-truth indices (one per query)", f"{gt.shape[0]}")
    if n_q and (gt.min() < 0 or gt.max() >= n_v):
        raise JaxprvrError("eval_q2m gt", f"video indices in [0, {n_v})", f"range [{gt.min()}, {gt.max()}]")
    if not np.all(np.isfinite(scores)):
        raise JaxprvrError("eval_q2m scores", "finite scores", f"{int(np.sum(~np.isfinite(scores)))} NaN/inf")
    ranks = np.empty(n_q, np.int64)
    cols = np.arange(n_v)
    for start in range(0, n_q, max(int(chunk_rows), 1)):
        s = scores[start:start + chunk_rows]
        g = gt[start:start + chunk_rows]
        gs = s[np.arange(s.shape[0]), g][:, None]
        greater = np.sum(s > gs, axis=1)
        if ties == "optimistic":
            ranks[start:start + s.shape[0]] = 1 + greater
        elif ties == "pessimistic":
            ranks[start:start + s.shape[0]] = np.sum(s >= gs, axis=1)
        else:
            before = np.sum((s == gs) & (cols[None, :] < g[:, None]), axis=1)
            ranks[start:start + s.shape[0]] = 1 + greater + before
    return ranks


def eval_q2m(scores, gt, *, ties: str = "stable", chunk_rows: int = 2048) -> dict[str, float]:
    """Official ``eval_q2m`` -> ``{"r1", "r5", "r10", "r100", "sumr", "medr", "meanr", "map"}``.

    Recalls in percent; ``sumr`` is the unrounded sum of the four; ``medr``/``meanr`` as ``np.median`` /
    ``mean`` of the ranks; ``map`` (MS-SL's ``t2v_map``, in [0, 1]) is ``mean(1/rank)``.
    ``scores`` may be numpy or jax, any float dtype; ``gt[i]`` is the column of query i's video.
    """
    return q2m_from_ranks(gt_ranks(scores, gt, ties=ties, chunk_rows=chunk_rows))


def q2m_from_ranks(ranks) -> dict[str, float]:
    """:func:`eval_q2m`'s metrics from the 1-based ranks :func:`gt_ranks` gives (one per query)."""
    ranks = np.asarray(ranks)
    n_q = ranks.shape[0]
    if n_q == 0:
        raise JaxprvrError("eval_q2m scores", "at least one query", "0 queries")
    out = {f"r{k}": 100.0 * float(np.sum(ranks <= k)) / n_q for k in KS}
    out["sumr"] = sum(out[f"r{k}"] for k in KS)
    out["medr"] = float(np.median(ranks))
    out["meanr"] = float(ranks.mean())
    out["map"] = float(np.mean(1.0 / ranks))
    return out


def chance_sumr(n_videos: int) -> float:
    """Expected SumR of random scores over a gallery of ``n_videos`` (rank uniform on 1..Nv):
    ``100 * sum_K min(K, Nv) / Nv``."""
    if n_videos < 1:
        raise JaxprvrError("chance_sumr n_videos", "a gallery of >= 1 video", repr(n_videos))
    return sum(100.0 * min(k, n_videos) / n_videos for k in KS)
