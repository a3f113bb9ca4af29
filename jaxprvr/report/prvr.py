"""PRVR figures from ``--save-scores DIR`` (:func:`jaxprvr.tasks.prvr.save_scores`): ``scores.npy`` (queries x
videos, fused), ``query_ids.txt``, ``video_ids.txt``. The ground truth of a query is its video, ``cap_id``'s part
before ``#`` (the official ``getVideoId``); ranks are :func:`jaxprvr.metrics.prvr.gt_ranks` (the evaluation's own
rule, ties included), computed once: the metrics (:func:`jaxprvr.metrics.prvr.q2m_from_ranks`, as ``eval_q2m``),
the R@K curve for K = 1..100 and the histogram of the ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.metrics.prvr import KS
from jaxprvr.report.figures import grid, save


def load(path: Path) -> dict:
    from jaxprvr.data.msl_format import video_id_of

    try:
        scores = np.load(path / "scores.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise JaxprvrError(path / "scores.npy", "a (queries, videos) float array (.npy)", f"unreadable: {e}") from None
    qids = [x for x in (path / "query_ids.txt").read_text(encoding="utf-8").splitlines() if x]
    vids = [x for x in (path / "video_ids.txt").read_text(encoding="utf-8").splitlines() if x]
    if scores.ndim != 2 or scores.shape != (len(qids), len(vids)):
        raise JaxprvrError(path / "scores.npy", f"a ({len(qids)}, {len(vids)}) matrix (query_ids.txt x video_ids.txt)",
                           f"shape {scores.shape}")
    col = {v: i for i, v in enumerate(vids)}
    missing = [q for q in qids if video_id_of(q) not in col]
    if missing:
        raise JaxprvrError(path / "query_ids.txt", "queries whose video (the id before '#') is in video_ids.txt",
                           f"{len(missing)} without, e.g. {missing[0]!r}")
    gt = np.asarray([col[video_id_of(q)] for q in qids], np.int64)
    return {"scores": scores, "query_ids": qids, "video_ids": vids, "gt": gt}


def ranks(data: dict) -> np.ndarray:
    from jaxprvr.metrics.prvr import gt_ranks

    return gt_ranks(data["scores"], data["gt"])


def recall_curve(r: np.ndarray, n_videos: int, k_max: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``(K, R@K in %)`` for K = 1..min(k_max, n_videos)."""
    ks = np.arange(1, min(k_max, n_videos) + 1)
    return ks, 100.0 * (r[None, :] <= ks[:, None]).sum(axis=1) / len(r)  # eval_q2m's arithmetic


def metrics(data: dict, r: np.ndarray) -> dict:
    """``eval_q2m``'s metrics of the ranks ``r`` (:func:`ranks`), the counts and the chance SumR."""
    from jaxprvr.metrics.prvr import chance_sumr, q2m_from_ranks

    out = q2m_from_ranks(r)
    out.update(n_queries=len(data["query_ids"]), n_videos=len(data["video_ids"]),
               chance_sumr=chance_sumr(len(data["video_ids"])))
    return out


def recall_figure(r: np.ndarray, nv: int):
    """R@K for K = 1..min(100, nv) (log K), R@1/5/10/100 marked, the chance curve ``100 K / nv`` dotted."""
    ks, rk = recall_curve(r, nv)
    fig, (ax,) = grid(1, 1, 6.4, 3.6)
    ax.plot(ks, rk, color="C0", linewidth=1.5, label="R@K")
    ax.plot(ks, 100.0 * np.minimum(ks, nv) / nv, color="0.5", linestyle=":", label="chance (100 K / videos)")
    for k in KS:
        if k <= nv:
            ax.plot([k], [rk[k - 1]], "o", color="C3", markersize=4)
            ax.annotate(f"R@{k} {rk[k - 1]:.1f}", (k, rk[k - 1]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
    ax.set_xscale("log")
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100) if t <= ks[-1]]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter("")
    ax.set_xlabel("K")
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def histogram_figure(r: np.ndarray, nv: int):
    """The ranks' histogram: one bin per rank up to 100 videos, about 40 log-spaced bins (log x axis) above."""
    fig, (ax,) = grid(1, 1, 6.4, 3.6)
    if nv <= 100:
        bins = np.arange(1, nv + 2) - 0.5
    else:
        bins = np.unique(np.geomspace(1, nv + 1, 40).astype(int)) - 0.5
        ax.set_xscale("log")
        ticks = [t for t in (1, 10, 100, 1000, 10000, 100000) if t <= nv]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter("")
    ax.hist(r, bins=bins, color="C0")
    ax.set_xlabel("rank of the ground-truth video")
    ax.set_ylabel("queries")
    ax.grid(alpha=0.3)
    return fig


def render(ev, out_dir: Path, prefix: str, **_) -> dict:
    data = load(ev.path)
    r = ranks(data)
    nv = len(data["video_ids"])
    shown = [save(recall_figure(r, nv), out_dir, f"{prefix}_recall_at_k.png", "R@K, K = 1..100",
                  f"{len(r)} queries over {nv} videos"),
             save(histogram_figure(r, nv), out_dir, f"{prefix}_rank_histogram.png", "Rank histogram",
                  f"median rank {np.median(r):g}, mean rank {r.mean():.2f}")]
    return {"figures": shown, "metrics": metrics(data, r), "notes": []}
