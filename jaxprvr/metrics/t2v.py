"""Text-video retrieval metrics of CLIP4Clip / DRL / BackBone_tvr (R@1/5/10/50, median and mean rank).

Official code: shallowdream66/BackBone_tvr @5bb74ad ``backbone_tvr/tvr/utils/metrics.py`` L10-26
(``compute_metrics``) and L41-78 (``tensor_text_to_video_metrics`` / ``tensor_video_to_text_sim``, from
CLIP4Clip, originally Deferf/Experiments), called from ``main_retrieval.py`` L470-482; the multi-sentence protocol
as CLIP4Clip runs it (ArrowLuo/CLIP4Clip ``main_task_retrieval.py`` L321-445).

Two protocols (:func:`t2v_metrics`):

``pairs`` -- the official default (MSR-VTT 1k-A, and BackBone_tvr's MSVD / LSMDC as they are actually run): a
square ``[N, N]`` text x video matrix whose diagonal holds the positives. t2v = :func:`compute_metrics` ``(sim)``,
v2t = :func:`compute_metrics` ``(sim.T)``. :func:`compute_metrics` keeps the official arithmetic exactly:

* a row's rank is the 0-based position of its diagonal score in the row sorted in descending order, and
  ``np.where(sorted - diag == 0)`` finds **every** tied position: a row whose diagonal ties with ``t`` other
  scores adds ``t + 1`` ranks (the optimistic one and the ``t`` after it) and the denominator is the number of
  ranks found, not N. (Computed here without the sort: the tied positions are ``#(x > d) ... #(x > d) +
  #(x == d) - 1``, the same numbers.)
* ``R@K = 100 #{rank < K} / #ranks`` (K = 1, 5, 10, 50), ``MdR = np.median(rank) + 1``, ``MnR = np.mean(rank) +
  1``.
* a row whose diagonal is NaN (or +-inf: ``inf - inf`` is NaN) has no rank. Officially it is dropped silently;
  here it is dropped the same way **and counted**: ``n_nan`` (NaN diagonals), ``n_dropped`` (all rows without a
  rank), ``n_ranks`` (the denominator). Off-diagonal NaNs sort last (``np.sort``): they never outrank anything.
* the MSVD quirk of the pairs protocol: with k captions per video the matrix has k identical columns per video,
  all tied with the diagonal, so every row adds >= k ranks of which at most one is 0: R@1 <= 100 / k.

``grouped`` -- CLIP4Clip's multi-sentence protocol (MSVD, VATEX...): an ``[N_caption, N_video]`` matrix, caption
c's video ``caption_video[c]``. Officially the rows are stacked as ``[N_video, max_caps, N_video]`` with ``-inf``
padding rows (captions contiguous per video), then

* t2v (``tensor_text_to_video_metrics``): a double ``torch.argsort`` over the videos puts each caption's rank at
  its own video; ranks whose positive score is +-inf or NaN (the padding, and any such real caption) are
  dropped. Here: ``rank = #(s > d) + #(s is NaN) + #(s == d, j < own video)`` -- the position in a **stable**
  descending sort, NaN first as torch sorts it. torch's CPU argsort is stable only up to 16 columns (it is a
  quicksort beyond), so officially ties between a caption's own video and others are broken arbitrarily; the
  stable rule is the documented, deterministic choice (ties to the lower video index). R@K = ``100 #{rank < K} /
  #ranks``, ``MdR = torch.median(rank + 1)`` -- torch's median is the **lower** middle value for an even count,
  kept -- and ``MnR = mean(rank + 1)``. The official R@K are rounded to float32 (torch's default dtype for the
  true division); here float64 (they differ by < 1e-5 %). Dropped captions are counted as above.
* v2t (``tensor_video_to_text_sim``): NaN -> -inf, the max over each video's captions, transposed, then
  :func:`compute_metrics`: ``vsim[j, k] = max_{c: caption_video[c] = k} sim[c, j]``. A video whose own captions
  all score NaN gets -inf and is dropped (counted in ``v2t/n_nan``).

Captions may come in any order here (the official code needs them contiguous per video, in video order; the
metrics do not depend on the order). Every video needs at least one caption in ``grouped``.
"""

from __future__ import annotations

import logging

import numpy as np

from jaxprvr.errors import JaxprvrError

log = logging.getLogger(__name__)

__all__ = ["KS", "PROTOCOLS", "compute_metrics", "grouped_t2v_ranks", "grouped_v2t_sim", "grouped_t2v_metrics",
           "t2v_metrics", "chance_t2v_r1"]

KS = (1, 5, 10, 50)
PROTOCOLS = ("pairs", "grouped", "auto")


def _matrix(sim, where: str) -> np.ndarray:
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise JaxprvrError(where, "a 2-D similarity matrix", f"shape {sim.shape}")
    if not (np.issubdtype(sim.dtype, np.floating) or np.issubdtype(sim.dtype, np.integer)):
        raise JaxprvrError(where, "a real-valued similarity matrix", f"dtype {sim.dtype}")
    return sim


def _summary(ranks: np.ndarray, n_queries: int, n_nan: int, where: str, median: str = "numpy") -> dict:
    n = len(ranks)
    if n == 0:
        raise JaxprvrError(where, "at least one query with a finite positive score",
                           f"{n_queries} queries, {n_nan} with a NaN positive, none ranked")
    out = {f"R{k}": float(np.sum(ranks < k)) * 100 / n for k in KS}  # metrics.py L18-21
    if median == "torch":  # torch.median: the lower of the two middle values
        out["MR"] = float(np.sort(ranks)[(n - 1) // 2] + 1)
    else:
        out["MR"] = float(np.median(ranks) + 1)
    out["MedianR"] = out["MR"]
    out["MeanR"] = float(np.mean(ranks) + 1)
    out.update(n_queries=int(n_queries), n_ranks=int(n), n_nan=int(n_nan))
    return out


def compute_metrics(x, *, chunk_rows: int = 1024) -> dict:
    """``metrics.py`` ``compute_metrics`` (L10-26): the positive of row i is column i.

    Returns the official keys ``R1, R5, R10, R50, MR, MedianR (= MR), MeanR`` and ``ranks`` (the official
    ``cols``: every rank found, row-major, int64), plus ``n_queries`` (rows), ``n_ranks`` (the denominator; more
    than the rows found when diagonals tie), ``n_nan`` (rows with a NaN diagonal: dropped, as officially) and
    ``n_dropped`` (rows without any rank: NaN or +-inf diagonal). ``x`` may be numpy, jax or torch (CPU), any
    real dtype. Rows <= columns (officially more rows than columns fail to broadcast: an error here).
    """
    x = _matrix(x, "compute_metrics x")
    n_rows = x.shape[0]
    if n_rows > x.shape[1]:
        raise JaxprvrError("compute_metrics x", "at most as many rows (queries) as columns, positive i at column i",
                           f"shape {x.shape}")
    diag = np.diagonal(x)
    finite = np.isfinite(diag)
    n_nan = int(np.sum(np.isnan(diag)))
    parts = []
    for start in range(0, n_rows, max(int(chunk_rows), 1)):
        s = x[start:start + chunk_rows]
        d = diag[start:start + chunk_rows][:, None]
        greater = np.sum(s > d, axis=1)  # positions of -x sorted ascending before -d (NaN sorts last)
        equal = np.sum(s == d, axis=1)
        equal[~finite[start:start + chunk_rows]] = 0  # inf - inf and NaN - NaN are NaN: no match
        parts += [np.arange(g, g + e, dtype=np.int64) for g, e in zip(greater.tolist(), equal.tolist())]
    ranks = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    n_dropped = int(np.sum(~finite))
    if n_nan:
        log.warning("compute_metrics: %d of %d queries have a NaN positive score (dropped, as officially)", n_nan,
                    n_rows)
    out = _summary(ranks, n_rows, n_nan, "compute_metrics x")
    out["n_dropped"] = n_dropped
    out["ranks"] = ranks
    return out


def _check_groups(sim, caption_video, where: str) -> tuple[np.ndarray, np.ndarray]:
    sim = _matrix(sim, where)
    if caption_video is None:
        raise JaxprvrError(where, "caption_video (the video index of every caption) for the grouped protocol",
                           "None")
    cv = np.asarray(caption_video).reshape(-1)
    n_cap, n_video = sim.shape
    if not np.issubdtype(cv.dtype, np.integer):
        raise JaxprvrError("caption_video", "integer video indices", f"dtype {cv.dtype}")
    if cv.shape[0] != n_cap:
        raise JaxprvrError("caption_video", f"{n_cap} video indices (one per similarity row)", f"{cv.shape[0]}")
    if n_cap and (cv.min() < 0 or cv.max() >= n_video):
        raise JaxprvrError("caption_video", f"video indices in [0, {n_video})", f"range [{cv.min()}, {cv.max()}]")
    return sim, cv.astype(np.int64)


def grouped_t2v_ranks(sim, caption_video, *, chunk_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """``(ranks, valid)``: every caption's 0-based rank of its own video (``tensor_text_to_video_metrics``' double
    argsort with the stable, NaN-first tie rule of the module docstring) and whether it counts (finite positive)."""
    sim, cv = _check_groups(sim, caption_video, "grouped sim")
    n_cap = sim.shape[0]
    ranks = np.zeros(n_cap, np.int64)
    cols = np.arange(sim.shape[1])
    for start in range(0, n_cap, max(int(chunk_rows), 1)):
        s = sim[start:start + chunk_rows]
        g = cv[start:start + chunk_rows]
        d = s[np.arange(s.shape[0]), g][:, None]
        before = (s > d) | np.isnan(s) | ((s == d) & (cols[None, :] < g[:, None]))
        ranks[start:start + s.shape[0]] = np.sum(before, axis=1)
    valid = np.isfinite(sim[np.arange(n_cap), cv])
    return ranks, valid


def grouped_v2t_sim(sim, caption_video) -> np.ndarray:
    """``tensor_video_to_text_sim``: ``vsim[j, k] = max_{c: caption_video[c] = k} sim[c, j]`` with NaN as -inf;
    ``[N_video, N_video]``, row j the video query j, its positive at column j."""
    sim, cv = _check_groups(sim, caption_video, "grouped sim")
    n_video = sim.shape[1]
    counts = np.bincount(cv, minlength=n_video)
    if np.any(counts == 0):
        missing = np.flatnonzero(counts == 0)
        raise JaxprvrError("caption_video", "at least one caption for every video of the grouped protocol",
                           f"{len(missing)} video(s) without a caption (first: column {int(missing[0])})")
    s = np.where(np.isnan(sim), -np.inf, sim)
    order = np.argsort(cv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    per_video = np.maximum.reduceat(s[order], starts, axis=0)  # [k, j]
    return per_video.T


def _all_nan_videos(sim, caption_video) -> int:
    """Videos whose captions all score NaN against it: their v2t positive is -inf after the official NaN -> -inf
    (dropped), counted as NaN positives."""
    sim = np.asarray(sim)
    cv = np.asarray(caption_video).reshape(-1).astype(np.int64)
    nan_pos = np.isnan(sim[np.arange(sim.shape[0]), cv])
    n_caps = np.bincount(cv, minlength=sim.shape[1])
    n_nan = np.bincount(cv, weights=nan_pos, minlength=sim.shape[1])
    bad = int(np.sum((n_caps > 0) & (n_nan == n_caps)))
    if bad:
        log.warning("grouped v2t: %d of %d videos have only NaN scores from their captions (dropped, as "
                    "officially)", bad, sim.shape[1])
    return bad


def grouped_t2v_metrics(sim, caption_video, *, chunk_rows: int = 1024) -> dict:
    """``tensor_text_to_video_metrics`` on the grouped matrix: ``R1, R5, R10, R50, MR, MedianR, MeanR, ranks``
    and the counts of :func:`compute_metrics` (``n_queries`` = captions)."""
    ranks, valid = grouped_t2v_ranks(sim, caption_video, chunk_rows=chunk_rows)
    sim = np.asarray(sim)
    cv = np.asarray(caption_video).reshape(-1).astype(np.int64)
    pos = sim[np.arange(sim.shape[0]), cv]
    n_nan = int(np.sum(np.isnan(pos)))
    if n_nan:
        log.warning("grouped t2v: %d of %d captions have a NaN positive score (dropped, as officially)", n_nan,
                    len(pos))
    out = _summary(ranks[valid], len(ranks), n_nan, "grouped sim", median="torch")
    out["n_dropped"] = int(np.sum(~valid))
    out["ranks"] = ranks[valid]
    return out


def _pairs(sim, caption_video, where: str) -> np.ndarray:
    sim = _matrix(sim, where)
    if sim.shape[0] != sim.shape[1]:
        raise JaxprvrError(where, "a square [N, N] matrix with the positives on the diagonal (protocol 'pairs')",
                           f"shape {sim.shape}", hint="use protocol 'grouped' with caption_video for several "
                                                      "captions per video")
    if caption_video is None:
        return sim
    cv = np.asarray(caption_video).reshape(-1)
    if cv.shape[0] != sim.shape[0] or not np.array_equal(np.sort(cv), np.arange(sim.shape[0])):
        raise JaxprvrError("caption_video", "exactly one caption per video for protocol 'pairs'",
                           f"{cv.shape[0]} indices covering {len(np.unique(cv))} of {sim.shape[1]} videos")
    return sim[:, cv]  # column i = the video of caption i: the positives on the diagonal


def t2v_metrics(sim, protocol: str = "auto", caption_video=None, *, chunk_rows: int = 1024) -> dict:
    """Text->video and video->text retrieval metrics of a ``[N_text, N_video]`` similarity matrix (higher =
    better) as one flat dict: ``t2v/R1, t2v/R5, t2v/R10, t2v/R50, t2v/MdR, t2v/MnR`` (recalls in %, ranks
    1-based), ``t2v/n_ranks, t2v/n_nan, t2v/n_dropped``, the same under ``v2t/``, and ``protocol``, ``n_text``,
    ``n_video``.

    ``protocol``: ``pairs`` (square, the positives on the diagonal; with ``caption_video`` -- a permutation --
    caption i's positive is video ``caption_video[i]``), ``grouped`` (CLIP4Clip's multi-sentence protocol, needs
    ``caption_video``), ``auto`` (``pairs`` when every video has exactly one caption -- or ``caption_video`` is
    None -- else ``grouped``). See the module docstring for the official arithmetic and its quirks.
    """
    if protocol not in PROTOCOLS:
        raise JaxprvrError("t2v_metrics protocol", f"one of {list(PROTOCOLS)}", repr(protocol))
    sim = _matrix(sim, "t2v_metrics sim")
    if protocol == "auto":
        protocol = "pairs"
        if caption_video is not None:
            cv = np.asarray(caption_video).reshape(-1)
            one_each = (sim.shape[0] == sim.shape[1] and cv.shape[0] == sim.shape[0]
                        and np.array_equal(np.sort(cv), np.arange(sim.shape[1])))
            protocol = "pairs" if one_each else "grouped"
    if protocol == "pairs":
        sq = _pairs(sim, caption_video, "t2v_metrics sim")
        t2v = compute_metrics(sq, chunk_rows=chunk_rows)
        v2t = compute_metrics(sq.T, chunk_rows=chunk_rows)
        n_text, n_video = sq.shape
    else:
        t2v = grouped_t2v_metrics(sim, caption_video, chunk_rows=chunk_rows)
        v2t = compute_metrics(grouped_v2t_sim(sim, caption_video), chunk_rows=chunk_rows)
        v2t["n_nan"] = _all_nan_videos(sim, caption_video)
        n_text, n_video = sim.shape
    out = {}
    for name, m in (("t2v", t2v), ("v2t", v2t)):
        for k in KS:
            out[f"{name}/R{k}"] = m[f"R{k}"]
        out[f"{name}/MdR"] = m["MR"]
        out[f"{name}/MnR"] = m["MeanR"]
        for k in ("n_ranks", "n_nan", "n_dropped"):
            out[f"{name}/{k}"] = m[k]
    out.update(protocol=protocol, n_text=int(n_text), n_video=int(n_video))
    return out


def chance_t2v_r1(n_video: int) -> float:
    """R@1 (%) of a uniformly random ranking of ``n_video`` videos: ``100 / n_video``."""
    if int(n_video) < 1:
        raise JaxprvrError("chance_t2v_r1 n_video", "at least one video", repr(n_video))
    return 100.0 / int(n_video)
