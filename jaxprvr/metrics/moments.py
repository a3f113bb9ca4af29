"""Moment retrieval (MESM / Moment-DETR) and QVHighlights highlight detection evaluation, in numpy.

Official code: lntzm/MESM @ 8501bdea ``eval.py`` (prediction post-processing L64-116, ``eval_submission`` L164-230,
``eval_moment_retrieval`` L233-262, ``compute_mr_ap`` L265-315, ``compute_average_precision_detection`` L326-409,
``compute_mr_r1`` L412-440, ``get_data_by_range`` L443-473), ``utils/post_processing.py`` (``PostProcessorDETR``
L5-47) and jayleicn/moment_detr ``standalone_eval/eval.py`` (highlight detection, ``compute_hl_hit1`` L155-167,
``compute_hl_ap`` L170-194, ``compute_ap_from_tuple`` L197-209, ``mk_gt_scores`` L212-219, ``eval_highlight``
L222-246), ``standalone_eval/utils.py`` (IoUs L15-61, ``interpolated_precision_recall`` L64-80, ``get_ap``
L169-209 on sklearn's ``precision_recall_curve``).

Moment retrieval, per length bucket (``(min, max]`` seconds on GT window lengths ``ed - st``; only the windows in
the range are kept, a query without one leaves the bucket, an empty bucket has no entry and ``None`` in the brief;
"full" is [0, 150] (TACoS: [0, 600]) and is never filtered, eval.py L233-262, L443-473):

* ``MR-R1``: the FIRST window of each prediction list (list order, eval.py L415) against the GT window of highest
  IoU (first maximum); R1@t = mean(IoU >= t) with t rounded to 2 decimals (0.7, not 0.7000000000000001), the
  IoU of the paired formula (intersection / hull, 0 when the hull is 0; L435); ``miou`` = mean over the GT rows
  of that best IoU (cross formula, inter / (a1 + a2 - inter)). Thresholds: 0.3, 0.5:0.05:0.95 (TACoS: 0.1, 0.3,
  0.5, 0.7).
* ``MR-mAP``: per query the first 10 predictions (list order), stable-sorted by descending (rounded) score, greedy
  matching per IoU threshold 0.5:0.05:0.95 (a prediction takes the first unlocked GT window in the order of
  ``iou.argsort()[::-1]``; it stops at the first window below the threshold), VOC interpolated AP; mean over
  queries (submission order), then over thresholds (``average``).
* every value ``float(f"{100 * v:.2f}")``.

The arithmetic is the official one operation for operation (the same IoU formulas, the same float64 sums in the
same order: the per-query AP is summed sequentially as ``np.sum`` does below 8 terms, and with ``np.sum`` itself on
the rare longer lists), so equal inputs give the official numbers digit for digit. Deviations (documented, named):

* bad input raises :class:`JaxprvrError` where the official code crashes or silently computes something: NaN/inf
  numbers, an empty prediction or GT window list, windows with end < start, duplicate qids, and qid sets that
  differ (the official assert is commented out, eval.py L192-201, but any mismatch then raises ``KeyError`` in
  ``compute_mr_r1`` L425/L434 or gives a NaN AP; ``match_number=False`` evaluates the intersection, as Moment-DETR's
  option does, and reports the dropped counts under ``"qid_mismatch"``).
* ties among GT windows of equal IoU (multi-window GT, QVHighlights) are matched in the order of the official
  ``tiou_arr.argsort()[::-1]``, whose default sort kind is not stable and whose tie order depends on the numpy build
  and the CPU (SIMD sorts); the same call is made here on arrays of the same length and values, so the result is
  the official one on the same machine. ``mp.Pool.imap_unordered`` (L301) makes the official query order of the
  AP mean random (an ulp before rounding); here it is the submission order (the official ``num_workers=1`` path).
* a zero-length prediction against a zero-length GT window has IoU 0/0 = NaN officially: it then counts as a
  match in the AP (``nan < t`` is False) and makes ``miou`` NaN. Kept by default; ``zero_degenerate_iou=True``
  makes such an IoU 0.

Highlight detection (Moment-DETR, QVHighlights; MESM's eval.py has none): per query the GT saliency of the
``int(duration / 2)`` 2-s clips (0 outside ``relevant_clip_ids``), 3 annotators, binarised at >= 2 / 3 / 4
(Fair / Good / VeryGood). ``HL-Hit1``: the clip with the highest predicted score (first maximum) is a hit when ANY
annotator's label is 1 there (the max over annotators, L166). ``HL-mAP``: ``get_ap`` per (query, annotator) on the
predictions truncated or zero-padded to the clip count, averaged over all of them: 0 if no positive clip, 1 if all
clips are positive, else the mean over the distinct score thresholds that add a positive (sklearn's tie groups) of
the precision interpolated towards higher recall (see :func:`hl_average_precision`). An empty
``relevant_clip_ids`` means no relevant clip (officially an IndexError: ``np.array([])`` is a float index); a clip
id outside ``[0, int(duration / 2))`` raises (officially an IndexError, or a silent wrap for a negative id).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import numpy as np

from jaxprvr.errors import JaxprvrError

__all__ = ["DATASETS", "official_dataset_name", "foreground_scores", "postprocess", "eval_submission",
           "eval_moment_retrieval", "eval_highlight", "hl_average_precision", "chance_mr", "load_jsonl",
           "save_jsonl", "main"]

F32 = np.float32
# our dataset names -> the official ``dataset_name`` (utils/config.py L33-34)
DATASETS = {"charades": "charades", "charades_cg": "charades-cg", "charades_cd": "charades-cd",
            "qvhighlights": "qvhighlights", "tacos": "tacos"}
MAP_IOU_THDS = tuple(float(f"{e:.2f}") for e in np.linspace(0.5, 0.95, 10))  # eval.py L265-267
MAX_PRED_WINDOWS = 10  # compute_mr_ap's max_pred_windows
HL_CLIP_LEN = 2  # mk_gt_scores' clip_length (QVHighlights)
HL_LEVELS = ((2, "Fair"), (3, "Good"), (4, "VeryGood"))


def official_dataset_name(name: str) -> str:
    """``charades_cg`` (ours) or ``charades-cg`` (official) -> ``charades-cg``."""
    if name in DATASETS:
        return DATASETS[name]
    if name in DATASETS.values():
        return name
    raise JaxprvrError("dataset", f"one of {sorted(DATASETS)}", repr(name))


def _length_ranges(dataset: str):
    """eval.py L234-241: (name, (min, max)) buckets and the global max length."""
    if dataset == "tacos":
        return [("short", (0, 10)), ("middle", (10, 30)), ("long", (30, 150)), ("superlong", (150, 600)),
                ("full", (0, 600))], 600
    return [("short", (0, 10)), ("middle", (10, 30)), ("long", (30, 150)), ("full", (0, 150))], 150


def _r1_thds(dataset: str):
    """eval.py L254-257, rounded as compute_mr_r1 L414."""
    raw = [0.1, 0.3, 0.5, 0.7] if dataset == "tacos" else np.concatenate([[0.3], np.linspace(0.5, 0.95, 10)])
    return tuple(float(f"{e:.2f}") for e in raw)


# ----------------------------------------------------------------------------------------------- post-processing
def foreground_scores(pred_logits) -> np.ndarray:
    """``softmax(pred_logits, -1)[..., 0]`` (eval.py L64-66: the foreground class is index 0) as float32.

    Computed in float64 and rounded once to float32 (the correctly rounded value); torch's float32 kernels give
    it to within a relative 2e-6 (CPU, logits of spread ~10; the error grows with ``|l0 - l1|``), which can only
    reorder scores tied to that precision or move a 4-decimal rounding at its boundary."""
    x = np.asarray(pred_logits, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e[..., 0] / e.sum(axis=-1)).astype(F32)


def _r4(v: float) -> float:
    return float(f"{v:.4f}")


def postprocess(pred_logits, pred_spans, saliency, duration, *, clip_len: float, max_ts_val: float,
                qid=None, query=None, vid=None, video_mask=None, sort_results: bool = True) -> list[dict]:
    """Model outputs -> submission rows, the official chain (eval.py L64-116, post_processing.py L22-47).

    ``pred_logits`` (B, Nq, 2) or (Nq, 2); ``pred_spans`` (B, Nq, 2) normalised (cx, w); ``saliency`` (B, L) or
    (L,) or None; ``duration`` (B,) or a scalar (seconds); ``video_mask`` (B, L) (the saliency kept per row is
    ``video_mask.sum()`` long, L66-72; default all of it); ``qid``/``query``/``vid`` one per row (default None).

    Chain, in float32 like the official tensors: score = :func:`foreground_scores`; ``st, ed = cx -/+ 0.5 w``,
    times ``float32(duration)``; rows ``[st, ed, score]`` stable-sorted by the unrounded score (descending; ties
    keep the query order, ``sorted(reverse=True)``) when ``sort_results``; every field ``float(f"{x:.4f}")``;
    back to float32, windows clamped to ``[0, max_ts_val]`` (not to the duration) and, unless ``clip_len == -1``,
    ``round(w / clip_len) * clip_len`` in float32 (half to even; VGG's 0.17 gives 12.170000076293945); scores
    ``float(f"{float32(score):.4f}")`` again (the rounding follows the clamp, so an end can pass ``max_ts_val`` by
    up to clip_len / 2). ``pred_saliency_scores`` = float32 -> float16 -> python floats.
    Returns one dict per row ``{qid, query, vid, pred_relevant_windows: [[st, ed, score]] * Nq,
    pred_saliency_scores}``."""
    logits = np.asarray(pred_logits, F32)
    spans = np.asarray(pred_spans, F32)
    single = logits.ndim == 2
    if single:
        logits, spans = logits[None], spans[None]
    where = "metrics.moments.postprocess"
    if logits.ndim != 3 or logits.shape[-1] < 2 or spans.shape != logits.shape[:2] + (2,):
        raise JaxprvrError(where, "pred_logits (B, Nq, 2) and pred_spans (B, Nq, 2)",
                           f"{np.shape(pred_logits)} and {np.shape(pred_spans)}")
    b, nq = spans.shape[:2]
    dur = np.broadcast_to(np.asarray(duration, F32).reshape(-1), (b,)) if np.size(duration) in (1, b) else None
    if dur is None:
        raise JaxprvrError(where, f"{b} durations", f"{np.size(duration)}")
    for name, arr in (("pred_logits", logits), ("pred_spans", spans), ("duration", dur)):
        if not np.all(np.isfinite(arr)):
            raise JaxprvrError(where, f"finite {name}", "NaN or inf")
    sal = None
    if saliency is not None:
        sal = np.asarray(saliency, F32)
        sal = sal[None] if single and sal.ndim == 1 else sal
        if sal.ndim != 2 or sal.shape[0] != b:
            raise JaxprvrError(where, f"saliency ({b}, L)", str(np.shape(saliency)))
        lens = (np.full(b, sal.shape[1]) if video_mask is None
                else np.asarray(video_mask).reshape(b, -1).sum(axis=1).astype(int))
        sal16 = sal.astype(np.float16)  # eval.py L68: .half()
    meta = {}
    for name, v in (("qid", qid), ("query", query), ("vid", vid)):
        vals = [None] * b if v is None else (list(np.asarray(v, dtype=object).reshape(-1)))
        if len(vals) != b:
            raise JaxprvrError(where, f"{b} values of {name}", f"{len(vals)}")
        meta[name] = [x.item() if isinstance(x, np.generic) else x for x in vals]

    score = foreground_scores(logits)  # (B, Nq) f32
    half = F32(0.5)
    st = (spans[..., 0] - half * spans[..., 1]) * dur[:, None]  # span_cxw_to_xx, then * duration (f32)
    ed = (spans[..., 0] + half * spans[..., 1]) * dur[:, None]
    cl = float(clip_len)
    out = []
    for i in range(b):
        order = np.argsort(-score[i], kind="stable") if sort_results else np.arange(nq)
        rows = [[_r4(float(st[i, k])), _r4(float(ed[i, k])), _r4(float(score[i, k]))] for k in order]
        arr = np.asarray(rows, F32)  # torch.tensor(list of floats): float32
        win = np.minimum(np.maximum(arr[:, :2], F32(0)), F32(max_ts_val))  # clip_ts
        if cl != -1:
            win = (np.round(win / F32(cl)) * F32(cl)).astype(F32)  # round_multiple
        windows = [[float(w[0]), float(w[1]), _r4(float(s))] for w, s in zip(win, arr[:, 2])]
        row = {"qid": meta["qid"][i], "query": meta["query"][i], "vid": meta["vid"][i],
               "pred_relevant_windows": windows,
               "pred_saliency_scores": None if sal is None else sal16[i, : int(lens[i])].astype(float).tolist()}
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------- validation
def _is_num(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _finite(x) -> bool:
    return _is_num(x) and math.isfinite(x)


def _check_qid(row, where):
    q = row.get("qid")
    if q is None or isinstance(q, (bool, float, list, dict)):
        raise JaxprvrError(where, "an int or str 'qid'", repr(q))


def _check_windows(ws, where, key, ncol):
    if not isinstance(ws, list) or not ws:
        raise JaxprvrError(where, f"a non-empty list '{key}'", repr(ws)[:80])
    for k, w in enumerate(ws):
        if not isinstance(w, (list, tuple)) or len(w) != ncol or not all(_is_num(v) for v in w):
            raise JaxprvrError(where, f"'{key}'[{k}] = {ncol} numbers", repr(w)[:80])
        if not all(math.isfinite(v) for v in w):
            raise JaxprvrError(where, f"finite numbers in '{key}'[{k}]", repr(w))
        if w[1] < w[0]:
            raise JaxprvrError(where, f"end >= start in '{key}'[{k}]", repr(w))


def _check_sub_row(row, where):
    if not isinstance(row, dict):
        raise JaxprvrError(where, "a JSON object", type(row).__name__)
    _check_qid(row, where)
    _check_windows(row.get("pred_relevant_windows"), where, "pred_relevant_windows", 3)
    sal = row.get("pred_saliency_scores")
    if sal is not None and (not isinstance(sal, list) or not all(_finite(v) for v in sal)):
        raise JaxprvrError(where, "'pred_saliency_scores' a list of finite numbers", repr(sal)[:80])


def _check_gt_row(row, where):
    if not isinstance(row, dict):
        raise JaxprvrError(where, "a JSON object", type(row).__name__)
    _check_qid(row, where)
    _check_windows(row.get("relevant_windows"), where, "relevant_windows", 2)
    if "duration" in row and not (_finite(row["duration"]) and row["duration"] > 0):
        raise JaxprvrError(where, "a positive finite 'duration'", repr(row["duration"]))


def _check_hl_gt(row, where):
    d = row.get("duration")
    ids, scores = row.get("relevant_clip_ids"), row.get("saliency_scores")
    if not _finite(d) or d <= 0:
        raise JaxprvrError(where, "a positive 'duration' (highlight detection)", repr(d))
    n = int(d / HL_CLIP_LEN)
    if n < 1:
        raise JaxprvrError(where, f"a duration of at least {HL_CLIP_LEN} s (one clip)", repr(d))
    if not isinstance(ids, list) or not isinstance(scores, list) or len(ids) != len(scores):
        raise JaxprvrError(where, "'relevant_clip_ids' and 'saliency_scores' lists of equal length",
                           f"{type(ids).__name__} and {type(scores).__name__}")
    for c, s in zip(ids, scores):
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < n:
            raise JaxprvrError(where, f"relevant clip ids in [0, {n})", repr(c))
        if not isinstance(s, list) or len(s) != 3 or not all(_finite(v) for v in s):
            raise JaxprvrError(where, "3 finite saliency scores per relevant clip", repr(s))


def _match(submission, ground_truth, match_number: bool):
    """Validates both lists; returns them restricted to the shared qids (with ``match_number`` they must be equal)
    and the counts of dropped rows."""
    if not isinstance(submission, list) or not submission:
        raise JaxprvrError("submission", "a non-empty list of rows", repr(type(submission).__name__))
    if not isinstance(ground_truth, list) or not ground_truth:
        raise JaxprvrError("ground_truth", "a non-empty list of rows", repr(type(ground_truth).__name__))
    for name, rows, check in (("submission", submission, _check_sub_row), ("ground_truth", ground_truth,
                                                                          _check_gt_row)):
        seen = set()
        for i, r in enumerate(rows):
            check(r, f"{name}[{i}]")
            if r["qid"] in seen:
                raise JaxprvrError(f"{name}[{i}]", "unique qids", f"qid {r['qid']!r} again")
            seen.add(r["qid"])
    sq, gq = {r["qid"] for r in submission}, {r["qid"] for r in ground_truth}
    mismatch = {"submission_only": len(sq - gq), "gt_only": len(gq - sq)}
    if sq != gq:
        if match_number:
            ex = sorted(map(str, (sq - gq) | (gq - sq)))[:3]
            raise JaxprvrError("submission vs ground truth", "the same qids",
                               f"{mismatch['submission_only']} only in the submission, {mismatch['gt_only']} only in "
                               f"the ground truth (e.g. {', '.join(ex)})", "match_number=False evaluates the "
                                                                           "intersection")
        shared = sq & gq
        if not shared:
            raise JaxprvrError("submission vs ground truth", "at least one shared qid", "none")
        submission = [r for r in submission if r["qid"] in shared]
        ground_truth = [r for r in ground_truth if r["qid"] in shared]
    return submission, ground_truth, mismatch


# ----------------------------------------------------------------------------------------------- IoU (official)
def _iou_cross(a, b, zero_degenerate: bool):
    """standalone_eval/utils.py L34-61 broadcast: inter / (area_a + area_b - inter); 0/0 -> NaN officially."""
    inter = np.clip(np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    union = (a[..., 1] - a[..., 0]) + (b[..., 1] - b[..., 0]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return np.where(union == 0, 0.0, iou) if zero_degenerate else iou


def _iou_paired(a, b):
    """utils.py L15-31: intersection / hull, 0 where the hull is 0."""
    inter = np.maximum(0, np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]))
    hull = np.maximum(a[:, 1], b[:, 1]) - np.minimum(a[:, 0], b[:, 0])
    return np.divide(inter, hull, out=np.zeros_like(inter), where=hull != 0)


def _pad(lists, ncol):
    k = max(len(x) for x in lists)
    arr = np.zeros((len(lists), k, ncol))
    valid = np.zeros((len(lists), k), bool)
    for i, x in enumerate(lists):
        arr[i, : len(x)] = np.asarray(x, np.float64)[:, :ncol]
        valid[i, : len(x)] = True
    return arr, valid


# ----------------------------------------------------------------------------------------------- moment retrieval
def _gt_order(iou, gvalid):
    """``tiou_arr.argsort()[::-1]`` (eval.py L384) for every (query, prediction): numpy's default sort on the
    query's own GT windows (compacted, in their order), so that tied IoUs come out in the same order as the
    official call on the same numpy build (the default kind is not stable; its tie order depends on the array
    length and on the CPU's SIMD sort). Padding positions go last. ``iou`` (Q, P, M), ``gvalid`` (Q, M)."""
    q, p, m = iou.shape
    out = np.empty((q, p, m), np.int64)
    counts = gvalid.sum(axis=1)
    for c in np.unique(counts):
        rows = np.nonzero(counts == c)[0]
        pos = np.argsort(~gvalid[rows], axis=1, kind="stable")  # valid positions first, in order
        compact = np.take_along_axis(iou[rows], np.broadcast_to(pos[:, None, :c], (rows.size, p, c)), axis=2)
        o = np.argsort(compact, axis=2)[..., ::-1]  # the default kind, on arrays of the official length
        full = np.take_along_axis(np.broadcast_to(pos[:, None, :], (rows.size, p, m)), o, axis=2)
        out[rows] = np.concatenate([full, np.broadcast_to(pos[:, None, c:], (rows.size, p, m - c))], axis=2)
    return out


def _ap_detection(preds, pvalid, gts, gvalid, thds, zero_degenerate):
    """compute_average_precision_detection (eval.py L326-409) for Q queries at once: ``preds`` (Q, P, 3) in list
    order, ``gts`` (Q, M, 2); returns (Q, T) float64."""
    q, p, _ = preds.shape
    thds = np.asarray(thds, np.float64)
    t = thds.size
    order = np.argsort(np.where(pvalid, -preds[..., 2], np.inf), axis=1, kind="stable")  # L359: stable, by -score
    ps = np.take_along_axis(preds, order[..., None], axis=1)
    pv = np.take_along_axis(pvalid, order, axis=1)
    iou = _iou_cross(ps[:, :, None, :2], gts[:, None, :, :], zero_degenerate)  # (Q, P, M)
    iou = np.where(gvalid[:, None, :], iou, -np.inf)
    gorder = _gt_order(iou, gvalid)
    iou_s = np.take_along_axis(iou, gorder, axis=2)
    gv_s = np.take_along_axis(np.broadcast_to(gvalid[:, None, :], iou.shape), gorder, axis=2)
    with np.errstate(invalid="ignore"):
        eligible = gv_s[:, :, None, :] & ~(iou_s[:, :, None, :] < thds[None, None, :, None])  # (Q, P, T, M)
    locked = np.zeros((q, t, gts.shape[1]), bool)
    tp = np.zeros((q, t, p), bool)
    qi = np.arange(q)[:, None]
    ti = np.arange(t)[None, :]
    for k in range(p):
        go = np.broadcast_to(gorder[:, k][:, None, :], locked.shape)
        avail = eligible[:, k] & ~np.take_along_axis(locked, go, axis=2) & pv[:, k, None, None]
        has = avail.any(axis=-1)
        gi = np.take_along_axis(go, avail.argmax(axis=-1)[..., None], axis=2)[..., 0]
        tp[:, :, k] = has
        locked[np.broadcast_to(qi, has.shape)[has], np.broadcast_to(ti, has.shape)[has], gi[has]] = True
    fp = pv[:, None, :] & ~tp
    tpc = np.cumsum(tp, axis=2).astype(float)
    fpc = np.cumsum(fp, axis=2).astype(float)
    npos = gvalid.sum(axis=1).astype(float)[:, None, None]
    rec = tpc / npos
    with np.errstate(invalid="ignore"):
        prec = np.where(pv[:, None, :], tpc / (tpc + fpc), 0.0)
    mprec = np.maximum.accumulate(prec[..., ::-1], axis=2)[..., ::-1]  # interpolated_precision_recall L76-77
    prev = np.concatenate([np.zeros((q, t, 1)), rec[..., :-1]], axis=2)
    term = (rec - prev) * mprec
    ap = np.zeros((q, t))
    for k in range(p):  # np.sum below 8 terms is sequential; zeros (non-TP positions) change nothing
        ap = ap + np.where(tp[:, :, k], term[:, :, k], 0.0)
    n_valid = pv.sum(axis=1)
    rec_last = np.take_along_axis(rec, np.broadcast_to((n_valid - 1)[:, None, None], (q, t, 1)), axis=2)[..., 0]
    tail = rec_last != 1  # the appended recall 1 adds a (1 - r) * 0 term
    n_terms = tp.sum(axis=2) + tail
    for a, b in zip(*np.nonzero(n_terms >= 8)):  # np.sum's pairwise order: use np.sum itself
        terms = list(term[a, b][tp[a, b]]) + ([0.0] if tail[a, b] else [])
        ap[a, b] = np.sum(np.asarray(terms))
    return ap


def _fmt(v) -> float:
    return float(f"{v:.2f}")


def _mr_bucket(sub_idx, g_rows, top1, preds, pvalid, gts, gvalid, r1_thds, zero_degenerate):
    """compute_mr_ap + compute_mr_r1 on the submission rows ``sub_idx`` (submission order) and ``g_rows`` (the
    same rows in GT order) with the GT windows ``gvalid``; every array is indexed by submission row."""
    ap = _ap_detection(preds[sub_idx], pvalid[sub_idx], gts[sub_idx], gvalid[sub_idx], MAP_IOU_THDS,
                       zero_degenerate)
    ap_thds = ap.mean(0)
    mr_map = dict(zip([str(e) for e in MAP_IOU_THDS], ap_thds))
    mr_map["average"] = np.mean(ap_thds)
    mr_map = {k: _fmt(100 * v) for k, v in mr_map.items()}
    # R1: best GT window per GT row (first maximum of the cross IoU), then the paired IoU in submission order.
    cross = _iou_cross(top1[g_rows][:, None, :], gts[g_rows], zero_degenerate)
    cross = np.where(gvalid[g_rows], cross, -np.inf)
    best = np.argmax(cross, axis=1)
    miou = np.max(cross, axis=1).mean()
    best_of_sub = np.empty(len(top1), int)
    best_of_sub[g_rows] = best
    sel = gts[sub_idx, best_of_sub[sub_idx]]
    iou = _iou_paired(top1[sub_idx], sel)
    r1 = {str(thd): _fmt(np.mean(iou >= thd) * 100) for thd in r1_thds}
    r1["miou"] = _fmt(miou * 100)
    return {"MR-mAP": mr_map, "MR-R1": r1}


def _mr_arrays(submission, ground_truth):
    """Padded arrays in submission order (the GT of each submission row alongside) and the GT-order index."""
    gt_by = {r["qid"]: r for r in ground_truth}
    preds, pvalid = _pad([r["pred_relevant_windows"][:MAX_PRED_WINDOWS] for r in submission], 3)
    top1 = np.asarray([r["pred_relevant_windows"][0][:2] for r in submission], np.float64)
    gts, gvalid = _pad([gt_by[r["qid"]]["relevant_windows"] for r in submission], 2)
    pos = {r["qid"]: i for i, r in enumerate(submission)}
    g2s_order = np.asarray([pos[r["qid"]] for r in ground_truth])  # GT row j -> submission row
    return preds, pvalid, top1, gts, gvalid, g2s_order


def eval_moment_retrieval(submission, ground_truth, dataset_name: str = "charades", *, match_number: bool = True,
                          zero_degenerate_iou: bool = False) -> dict:
    """eval.py L233-262: ``{bucket: {"MR-mAP": {"0.5": .., .., "0.95": .., "average": ..}, "MR-R1": {"0.3": ..,
    .., "miou": ..}}}`` for the non-empty buckets (percentages, 2 decimals)."""
    ds = official_dataset_name(dataset_name)
    submission, ground_truth, _ = _match(submission, ground_truth, match_number)
    preds, pvalid, top1, gts, gvalid, g2s_order = _mr_arrays(submission, ground_truth)
    lengths = gts[..., 1] - gts[..., 0]  # get_window_len
    ranges, max_len = _length_ranges(ds)
    r1_thds = _r1_thds(ds)
    out = {}
    for name, (lo, hi) in ranges:
        if lo == 0 and hi == max_len:  # the "full" range is not filtered (L451-452)
            gv = gvalid
        else:
            gv = gvalid & (lengths > lo) & (lengths <= hi)
        keep = gv.any(axis=1)
        if not keep.any():
            continue
        sub_idx = np.nonzero(keep)[0]
        gt_rows = g2s_order[keep[g2s_order]]  # GT order, as submission-row indices
        out[name] = _mr_bucket(sub_idx, gt_rows, top1, preds, pvalid, gts, gv, r1_thds,
                               zero_degenerate_iou)
    return out


# ----------------------------------------------------------------------------------------------- highlights
def hl_average_precision(y_true, y_score) -> float:
    """Moment-DETR's ``get_ap`` (standalone_eval/utils.py L169-209) without sklearn.

    0 if ``y_true`` has no positive, 1 if all are positive. Else sklearn's ``precision_recall_curve``: one point
    per distinct score (ties form one group; precision = TP / (TP + FP) and recall = TP / P counted down to that
    score), recall cast to float32; the precision is interpolated as the max over the points of lower-or-equal
    score (higher recall); the AP is the MEAN of that precision over the points whose recall differs from the next
    higher score's (the groups holding a positive), not a recall-weighted sum. NaN/inf raise."""
    y_true = np.asarray(y_true, np.float64).reshape(-1)
    y_score = np.asarray(y_score, np.float64).reshape(-1)
    if y_true.shape != y_score.shape:
        raise JaxprvrError("metrics.moments.hl_average_precision", "y_true and y_score of the same length",
                           f"{y_true.size} and {y_score.size}")
    if not np.all(np.isfinite(y_score)):
        raise JaxprvrError("metrics.moments.hl_average_precision", "finite scores", "NaN or inf")
    labels = set(y_true.tolist())
    if len(labels) == 1:
        return 0.0 if y_true[0] == 0 else 1.0
    if sorted(labels) != [0, 1]:
        raise JaxprvrError("metrics.moments.hl_average_precision", "labels in {0, 1}", str(sorted(labels)))
    order = np.argsort(y_score, kind="stable")[::-1]  # descending; the order inside a tie group is irrelevant
    s, y = y_score[order], y_true[order]
    ends = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last index of each tie group
    tps = np.cumsum(y)[ends]
    fps = 1 + ends - tps
    precision = np.r_[(tps / (tps + fps))[::-1], 1.0]  # lowest score first, as sklearn returns it
    recall = np.r_[(tps / tps[-1])[::-1], 0.0].astype(np.float32)
    precision = np.maximum.accumulate(precision)
    return float(np.mean(precision[np.nonzero(np.diff(recall))]))


def _hl_gt_scores(row) -> np.ndarray:
    """mk_gt_scores (L212-219): (int(duration / 2), 3) scores, 0 outside the relevant clips."""
    full = np.zeros((int(row["duration"] / HL_CLIP_LEN), 3))
    if row["relevant_clip_ids"]:
        full[np.asarray(row["relevant_clip_ids"])] = np.asarray(row["saliency_scores"], np.float64)
    return full


def eval_highlight(submission, ground_truth, *, match_number: bool = True) -> dict:
    """Moment-DETR eval_highlight (L222-246): ``{"HL-min-Fair": {"HL-mAP": .., "HL-Hit1": ..}, "HL-min-Good": ..,
    "HL-min-VeryGood": ..}`` (percentages, 2 decimals). Needs ``pred_saliency_scores`` and the GT's
    ``duration``, ``relevant_clip_ids``, ``saliency_scores``."""
    submission, ground_truth, _ = _match(submission, ground_truth, match_number)
    for i, r in enumerate(submission):
        if not r.get("pred_saliency_scores"):
            raise JaxprvrError(f"submission[{i}]", "a non-empty 'pred_saliency_scores' (highlight detection)",
                               repr(r.get("pred_saliency_scores")))
    for i, r in enumerate(ground_truth):
        _check_hl_gt(r, f"ground_truth[{i}]")
    gt_by = {r["qid"]: _hl_gt_scores(r) for r in ground_truth}
    preds = [np.asarray(r["pred_saliency_scores"], np.float64) for r in submission]  # qid2preds: submission order
    out = {}
    for level, name in HL_LEVELS:
        hits = np.zeros((len(submission), 3))
        aps = np.zeros((len(submission), 3))
        for i, (r, pred) in enumerate(zip(submission, preds)):
            binary = (gt_by[r["qid"]] >= level).astype(float)
            top = np.argmax(pred)  # first maximum
            if top < len(binary):
                hits[i] = binary[top]
            n = len(binary)
            y_pred = pred[:n] if len(pred) >= n else np.r_[pred, np.zeros(n - len(pred))]  # L199-206
            for w in range(3):
                aps[i, w] = hl_average_precision(binary[:, w], y_pred)
        out[f"HL-min-{name}"] = {"HL-mAP": _fmt(100 * np.mean(aps)),
                                 "HL-Hit1": _fmt(100 * np.mean(np.max(hits, 1)))}
    return out


# ----------------------------------------------------------------------------------------------- submission
def eval_submission(submission, ground_truth, dataset_name: str = "charades", *, match_number: bool = True,
                    highlight: bool | None = None, zero_degenerate_iou: bool = False) -> OrderedDict:
    """MESM's eval_submission (eval.py L164-230), plus Moment-DETR's highlight metrics for QVHighlights.

    Returns ``{"brief": {MR-full-R1@0.3/0.5/0.7, MR-full-mAP, MR-full-mAP@0.5, MR-full-mAP@0.75, MR-full-miou,
    MR-{long,middle,short,superlong}-mAP (None for an absent bucket)} (sorted) [+ HL-min-{Fair,Good,VeryGood}-
    {mAP,Hit1}], then the buckets and the HL-min-* dicts (sorted keys)}``. ``highlight``: None = only for
    qvhighlights. ``match_number=False`` evaluates the shared qids and adds ``"qid_mismatch"`` counts."""
    ds = official_dataset_name(dataset_name)
    submission, ground_truth, mismatch = _match(submission, ground_truth, match_number)
    mr = eval_moment_retrieval(submission, ground_truth, ds, zero_degenerate_iou=zero_degenerate_iou)
    full = mr["full"]
    brief = {
        "MR-full-R1@0.3": full["MR-R1"]["0.3"], "MR-full-R1@0.5": full["MR-R1"]["0.5"],
        "MR-full-R1@0.7": full["MR-R1"]["0.7"], "MR-full-miou": full["MR-R1"]["miou"],
        "MR-full-mAP": full["MR-mAP"]["average"], "MR-full-mAP@0.5": full["MR-mAP"]["0.5"],
        "MR-full-mAP@0.75": full["MR-mAP"]["0.75"],
    }
    for b in ("short", "middle", "long", "superlong"):
        brief[f"MR-{b}-mAP"] = mr[b]["MR-mAP"]["average"] if b in mr else None
    eval_brief = OrderedDict(sorted(brief.items(), key=lambda x: x[0]))
    metrics = dict(mr)
    if highlight or (highlight is None and ds == "qvhighlights"):
        hl = eval_highlight(submission, ground_truth)
        metrics.update(hl)
        for k, v in hl.items():
            for sub_k, val in v.items():
                eval_brief[f"{k}-{sub_k.split('-')[1]}"] = val
    final = OrderedDict()
    final["brief"] = eval_brief
    final.update(sorted(metrics.items(), key=lambda x: x[0]))
    if not match_number:
        final["qid_mismatch"] = mismatch
    return final


# ----------------------------------------------------------------------------------------------- chance level
def chance_mr(ground_truth, n_draws: int = 1000, seed: int = 0, thresholds: Sequence[float] = (0.3, 0.5, 0.7),
              *, max_length: float | None = None) -> dict:
    """Monte-Carlo chance level of R1@t and mIoU (percentages, unrounded) for a random top-1 window.

    Definition: the length pool is every GT window length ``ed - st`` of ``ground_truth`` (all windows of all
    rows). For each GT row (duration D, ``n_draws`` independent draws): a length L is drawn uniformly from the pool
    and clipped to ``min(L, D)``; the start is uniform in ``[0, D - L]``; the window ``[s, s + L]`` is scored
    against the GT window of highest IoU (true IoU inter / (a1 + a2 - inter), 0/0 counted as 0), as R1 does.
    ``R1@t`` = 100 * the mean over rows and draws of ``IoU >= t``; ``miou`` = 100 * the mean IoU. Draws come from
    ``np.random.default_rng(seed)`` (lengths, then starts, each (rows, n_draws)). With ``max_length`` only the
    windows of length <= max_length enter the pool (no filtering by default).
    Returns ``{"R1@0.3": .., .., "miou": .., "n_draws": n_draws, "n_queries": rows}``."""
    if not isinstance(ground_truth, list) or not ground_truth:
        raise JaxprvrError("ground_truth", "a non-empty list of rows", repr(type(ground_truth).__name__))
    for i, r in enumerate(ground_truth):
        _check_gt_row(r, f"ground_truth[{i}]")
        if "duration" not in r:
            raise JaxprvrError(f"ground_truth[{i}]", "a 'duration' (chance level)", "none")
    if int(n_draws) < 1:
        raise JaxprvrError("n_draws", "at least 1", repr(n_draws))
    gts, gvalid = _pad([r["relevant_windows"] for r in ground_truth], 2)
    pool = (gts[..., 1] - gts[..., 0])[gvalid]
    if max_length is not None:
        pool = pool[pool <= max_length]
    if pool.size == 0:
        raise JaxprvrError("ground_truth", "at least one window length in the pool", "none")
    dur = np.asarray([float(r["duration"]) for r in ground_truth])
    rng = np.random.default_rng(seed)
    q, n = len(ground_truth), int(n_draws)
    length = np.minimum(pool[rng.integers(0, pool.size, size=(q, n))], dur[:, None])
    start = rng.random((q, n)) * (dur[:, None] - length)
    win = np.stack([start, start + length], axis=-1)  # (Q, n, 2)
    iou = _iou_cross(win[:, :, None, :], gts[:, None, :, :], True)  # (Q, n, M)
    best = np.where(gvalid[:, None, :], iou, -np.inf).max(axis=2)
    out = {f"R1@{float(t):g}": float(np.mean(best >= t) * 100) for t in thresholds}
    out["miou"] = float(np.mean(best) * 100)
    out["n_draws"] = n
    out["n_queries"] = q
    return out


# ----------------------------------------------------------------------------------------------- files
def load_jsonl(path, kind: str | None = None, *, allow_empty: bool = False) -> list:
    """One JSON value per line (a final empty line is allowed). ``kind`` = "submission" or "gt" checks each row
    (qid, windows, finite numbers); a bad line raises :class:`JaxprvrError` naming ``path:line``. A file without a
    row is an error unless ``allow_empty`` (then ``[]``: e.g. a run's ``metrics.jsonl`` before its first record)."""
    checks = {"submission": _check_sub_row, "gt": _check_gt_row, None: None}
    if kind not in checks:
        raise JaxprvrError("load_jsonl kind", "'submission', 'gt' or None", repr(kind))
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise JaxprvrError(path, "a readable jsonl file", e.strerror or str(e)) from None
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for i, line in enumerate(lines, 1):
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxprvrError(where, "one JSON object per line", f"{e.msg} ({line[:40]!r})") from None
        if checks[kind] is not None:
            checks[kind](row, where)
        rows.append(row)
    if not rows and not allow_empty:
        raise JaxprvrError(path, "at least one row", "an empty file")
    return rows


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_jsonl(rows: Iterable[dict], path) -> None:
    """utils/func_utils.py L30-33: ``"\\n".join(json.dumps(row))`` (no final newline)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(_plain(r)) for r in rows))


# ----------------------------------------------------------------------------------------------- CLI
def build_parser():
    p = argparse.ArgumentParser(prog="python -m jaxprvr.metrics.moments",
                                description="MESM / Moment-DETR moment retrieval (and QVHighlights highlight) "
                                            "metrics of a submission jsonl; writes the metrics JSON, prints the "
                                            "brief dict as one JSON line.")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--submission", required=True, help="predictions jsonl (qid, pred_relevant_windows, ...)")
    p.add_argument("--gt", required=True, help="ground truth jsonl (qid, relevant_windows, ...)")
    p.add_argument("--out", required=True, help="metrics JSON to write (the official nested dict)")
    p.add_argument("--no-match-number", action="store_true",
                   help="evaluate the qids shared by submission and GT (default: they must be equal)")
    p.add_argument("--no-highlight", action="store_true", help="skip the QVHighlights highlight metrics")
    p.add_argument("--zero-degenerate-iou", action="store_true",
                   help="count a 0/0 IoU (zero-length prediction and GT) as 0 (official: NaN)")
    return p


def run(args) -> dict:
    sub = load_jsonl(args.submission, "submission")
    gt = load_jsonl(args.gt, "gt")
    metrics = eval_submission(sub, gt, args.dataset, match_number=not args.no_match_number,
                              highlight=False if args.no_highlight else None,
                              zero_degenerate_iou=args.zero_degenerate_iou)
    try:
        d = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(d, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(metrics, indent=4))
    except OSError as e:
        raise JaxprvrError(args.out, "a writable metrics file", e.strerror or str(e)) from None
    return metrics["brief"]


def main(argv=None) -> int:
    from jaxprvr.cli import run_cli

    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
