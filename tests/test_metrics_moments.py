"""jaxprvr.metrics.moments against a brute-force transcription, written here in plain python loops, of MESM's
eval.py (lntzm/MESM @ 8501bdea L64-116, L164-473, utils/post_processing.py L22-47) and of Moment-DETR's
standalone_eval (eval.py L155-246, utils.py L15-80 and get_ap L169-209, whose sklearn precision_recall_curve is
spelled out as one point per distinct score). Each comparison has a planted-mutant twin that must fail, and NaN
never passes."""

import copy
import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from jaxprvr.errors import JaxprvrError
from jaxprvr.metrics import moments as mm

# ---------------------------------------------------------------------------------------------- reference
MAP_THDS = [float(f"{e:.2f}") for e in np.linspace(0.5, 0.95, 10)]


def r_iou(a, b):
    """Cross IoU (utils.py L51-60): inter / (area_a + area_b - inter); 0/0 -> NaN (numpy division)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.float64(inter) / np.float64(union))


def r_iou_paired(a, b):
    """utils.py L26-31: inter / hull, 0 when the hull is 0."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    hull = max(a[1], b[1]) - min(a[0], b[0])
    return inter / hull if hull != 0 else 0.0


def r_ap(gt_windows, preds, thds, mutant=None):
    """compute_average_precision_detection (eval.py L326-409), literally."""
    preds = list(preds)
    if mutant == "unstable_sort":  # ties in reverse order
        preds = [preds[i] for i in sorted(range(len(preds)), key=lambda i: (-preds[i][2], -i))]
    else:
        preds = sorted(preds, key=lambda x: -x[2])
    n_gt = len(gt_windows)
    lock = [[-1] * n_gt for _ in thds]
    tp = [[0] * len(preds) for _ in thds]
    fp = [[0] * len(preds) for _ in thds]
    for idx, p in enumerate(preds):
        ious = np.array([r_iou(p, g) for g in gt_windows])
        order = ious.argsort()[::-1]
        for t, thr in enumerate(thds):
            for j in order:
                if ious[j] < thr:
                    fp[t][idx] = 1
                    break
                if lock[t][j] >= 0:
                    continue
                tp[t][idx] = 1
                lock[t][j] = idx
                break
            if fp[t][idx] == 0 and tp[t][idx] == 0:
                fp[t][idx] = 1
    out = []
    for t in range(len(thds)):
        rec, prec, ct, cf = [], [], 0, 0
        for a, b in zip(tp[t], fp[t]):
            ct, cf = ct + a, cf + b
            rec.append(ct / float(n_gt))
            prec.append(ct / (ct + cf))
        mprec, mrec = [0.0] + prec + [0.0], [0.0] + rec + [1.0]
        for i in range(len(mprec) - 2, -1, -1):
            mprec[i] = max(mprec[i], mprec[i + 1])
        terms = [(mrec[i] - mrec[i - 1]) * mprec[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1]]
        out.append(float(np.sum(np.array(terms))))
    return out


def r_in_range(w, lo, hi, mutant):
    length = w[1] - w[0]
    if mutant == "bucket_inclusive":
        return lo <= length < hi
    return lo < length <= hi


def r_eval(sub, gt, dataset, mutant=None):
    """MESM eval_submission / eval_moment_retrieval / get_data_by_range / compute_mr_ap / compute_mr_r1."""
    if dataset == "tacos":
        ranges = [("short", 0, 10), ("middle", 10, 30), ("long", 30, 150), ("superlong", 150, 600), ("full", 0, 600)]
        max_len, r1_thds = 600, [0.1, 0.3, 0.5, 0.7]
    else:
        ranges = [("short", 0, 10), ("middle", 10, 30), ("long", 30, 150), ("full", 0, 150)]
        max_len, r1_thds = 150, [0.3] + MAP_THDS
    if mutant == "unrounded_thds":
        r1_thds = [0.3] + list(np.linspace(0.5, 0.95, 10))
    res = {}
    for name, lo, hi in ranges:
        if lo == 0 and hi == max_len:
            s, g = sub, gt
        else:
            g = []
            for d in gt:
                ws = [w for w in d["relevant_windows"] if r_in_range(w, lo, hi, mutant)]
                if ws:
                    d = copy.deepcopy(d)
                    d["relevant_windows"] = ws
                    g.append(d)
            keep = {d["qid"] for d in g}
            s = [d for d in sub if d["qid"] in keep]
        if not g:
            continue
        gt_by = {d["qid"]: d["relevant_windows"] for d in g}
        aps = [r_ap(gt_by[d["qid"]], d["pred_relevant_windows"][:10], MAP_THDS, mutant) for d in s]
        ap_thds = np.array(aps).mean(0)
        m = {str(t): float(f"{100 * v:.2f}") for t, v in zip(MAP_THDS, ap_thds)}
        m["average"] = float(f"{100 * np.mean(ap_thds):.2f}")
        top = {d["qid"]: d["pred_relevant_windows"][0][:2] for d in s}
        sel, ious = {}, []
        for d in g:
            c = [r_iou(top[d["qid"]], w) for w in d["relevant_windows"]]
            ious.append(np.max(c))
            sel[d["qid"]] = d["relevant_windows"][0 if mutant == "r1_first_gt" else int(np.argmax(c))]
        pair = [r_iou_paired(top[q], sel[q]) for q in top]
        r1 = {str(t): float(f"{sum(1 for v in pair if v >= t) / len(pair) * 100:.2f}") for t in r1_thds}
        r1["miou"] = float(f"{np.array(ious).mean() * 100:.2f}")
        res[name] = {"MR-mAP": m, "MR-R1": r1}
    full = res["full"]
    brief = {"MR-full-R1@0.3": full["MR-R1"]["0.3"], "MR-full-R1@0.5": full["MR-R1"]["0.5"],
             "MR-full-R1@0.7": full["MR-R1"]["0.7"], "MR-full-miou": full["MR-R1"]["miou"],
             "MR-full-mAP": full["MR-mAP"]["average"], "MR-full-mAP@0.5": full["MR-mAP"]["0.5"],
             "MR-full-mAP@0.75": full["MR-mAP"]["0.75"]}
    for b in ("short", "middle", "long", "superlong"):
        brief[f"MR-{b}-mAP"] = res[b]["MR-mAP"]["average"] if b in res else None
    out = OrderedDict(brief=OrderedDict(sorted(brief.items())))
    out.update(sorted(res.items()))
    return out


def r_get_ap(y_true, y_score, mutant=None):
    """get_ap (utils.py L169-209) with precision_recall_curve spelled out: a point per distinct score."""
    if len(set(y_true)) == 1:
        return 0.0 if y_true[0] == 0 else 1.0
    n_pos = float(sum(y_true))
    points = []
    for thr in sorted(set(y_score), reverse=True):
        tp = sum(1.0 for y, s in zip(y_true, y_score) if s >= thr and y == 1)
        fp = sum(1.0 for y, s in zip(y_true, y_score) if s >= thr and y == 0)
        points.append((tp / (tp + fp), np.float32(tp / n_pos)))
    points = points[::-1] + [(1.0, np.float32(0.0))]
    prec = [p for p, _ in points]
    rec = [r for _, r in points]
    for i in range(1, len(prec)):
        prec[i] = max(prec[i - 1], prec[i])
    if mutant == "weighted_ap":  # average_precision_score-like: sum of recall steps x precision
        return float(sum((float(rec[i]) - float(rec[i + 1])) * prec[i] for i in range(len(rec) - 1)))
    return float(np.mean(np.array([prec[i] for i in range(len(rec) - 1) if rec[i + 1] != rec[i]])))


def r_hl(sub, gt, mutant=None):
    """eval_highlight / compute_hl_hit1 / compute_hl_ap / mk_gt_scores (Moment-DETR eval.py L155-246)."""
    gt_by = {}
    for d in gt:
        full = [[0.0] * 3 for _ in range(int(d["duration"] / 2))]
        for c, s in zip(d["relevant_clip_ids"], d["saliency_scores"]):
            full[c] = [float(v) for v in s]
        gt_by[d["qid"]] = full
    out = {}
    for level, name in ((2, "Fair"), (3, "Good"), (4, "VeryGood")):
        hits, aps = [], []
        for d in sub:
            binary = [[1.0 if v >= level else 0.0 for v in row] for row in gt_by[d["qid"]]]
            pred = d["pred_saliency_scores"]
            top = max(range(len(pred)), key=lambda i: (pred[i], -i))
            row = binary[top] if top < len(binary) else [0.0] * 3
            hits.append(sum(row) / 3 if mutant == "hit_mean" else max(row))
            y_pred = (list(pred[: len(binary)]) + [0.0] * max(0, len(binary) - len(pred)))
            aps.append([r_get_ap([r[w] for r in binary], y_pred, mutant) for w in range(3)])
        out[f"HL-min-{name}"] = {"HL-mAP": float(f"{100 * np.mean(np.array(aps)):.2f}"),
                                 "HL-Hit1": float(f"{100 * sum(hits) / len(hits):.2f}")}
    return out


def assert_same(a, b, allow_nan=False):
    """Identical JSON (values and key order); a NaN anywhere fails unless allowed."""
    ja, jb = json.dumps(a), json.dumps(b)
    if not allow_nan:
        assert "NaN" not in ja and "NaN" not in jb, "NaN in a compared value"
    assert ja == jb, f"\n{ja}\n{jb}"


def differs(a, b):
    return json.dumps(a) != json.dumps(b)


# ---------------------------------------------------------------------------------------------- random data
def random_data(rng, n, dataset, multi, grid, dur=None):
    """Integer grids give IoU ties and exact edge lengths; scores on a 0.1 grid give score ties."""
    dur = dur or (600 if dataset == "tacos" else 150)
    sub, gt = [], []
    for q in range(n):
        ws = []
        for _ in range(int(rng.integers(1, 5)) if multi else 1):
            if grid:
                a = int(rng.integers(0, dur - 1))
                ws.append([a, min(dur, a + int(rng.choice([2, 4, 10, 12, 30, 40, 150, 200])))])
            else:
                a, b = sorted(rng.random(2) * dur)
                ws.append([float(a), float(b)])
        if multi and rng.random() < 0.3:
            ws.append(list(ws[0]))  # a duplicated GT window: IoU ties among GT windows
        gt.append({"qid": 7 * q + 3, "vid": f"v{q}", "duration": dur, "relevant_windows": ws})
        preds = []
        for _ in range(int(rng.integers(1, 13))):
            w = ws[int(rng.integers(len(ws)))]
            if rng.random() < 0.5:  # near a GT window
                a = max(0.0, w[0] + float(rng.integers(-3, 4)))
                b = max(a, w[1] + float(rng.integers(-3, 4)))
            else:
                a, b = sorted((rng.integers(0, dur, 2) if grid else rng.random(2) * dur).tolist())
            preds.append([float(a), float(b), float(np.round(rng.random(), 1))])
        sub.append({"qid": 7 * q + 3, "query": "q", "vid": f"v{q}", "pred_relevant_windows": preds})
    gt = [gt[i] for i in rng.permutation(n)]  # GT order differs from the submission order
    return sub, gt


@pytest.mark.parametrize("dataset", ["charades", "tacos", "qvhighlights", "charades_cg"])
def test_mr_matches_bruteforce(dataset):
    rng = np.random.default_rng(len(dataset))
    official = mm.official_dataset_name(dataset)
    seen_none = False
    for trial in range(8):
        sub, gt = random_data(rng, int(rng.integers(1, 25)), dataset, multi=dataset == "qvhighlights" or trial % 2,
                              grid=trial % 4 < 2)
        got = mm.eval_submission(sub, gt, dataset, highlight=False)  # QVH's HL: test_qvh_highlight_...
        assert_same(got, r_eval(sub, gt, official))
        seen_none |= any(v is None for v in got["brief"].values())
    assert seen_none or dataset == "tacos"  # small random sets leave some bucket empty


def qvh_random(rng, n):
    sub, gt = random_data(rng, n, "qvhighlights", multi=True, grid=True)
    by = {d["qid"]: d for d in sub}
    for d in gt:
        dur = int(rng.choice([10, 13, 31, 150]))
        d["duration"] = dur
        nc = int(dur / 2)
        ids = sorted(rng.choice(nc, int(rng.integers(1, nc + 1)), replace=False).tolist())
        d["relevant_clip_ids"] = ids
        d["saliency_scores"] = rng.integers(0, 5, (len(ids), 3)).tolist()
        length = max(1, nc + int(rng.integers(-3, 4)))  # shorter or longer than the clip count
        sal = np.round(rng.normal(size=length), 1).astype(np.float16).astype(float)  # ties
        by[d["qid"]]["pred_saliency_scores"] = sal.tolist()
    return sub, gt


def test_qvh_highlight_matches_bruteforce():
    rng = np.random.default_rng(11)
    for trial in range(6):
        sub, gt = qvh_random(rng, int(rng.integers(1, 15)))
        got = mm.eval_submission(sub, gt, "qvhighlights")
        ref = r_eval(sub, gt, "qvhighlights")
        hl = r_hl(sub, gt)
        ref.update(hl)
        for k, v in hl.items():
            for sk, val in v.items():
                ref["brief"][f"{k}-{sk.split('-')[1]}"] = val
        ref = OrderedDict([("brief", ref["brief"])] + sorted((k, v) for k, v in ref.items() if k != "brief"))
        assert_same(got, ref)
        assert list(got["brief"])[-6:] == ["HL-min-Fair-mAP", "HL-min-Fair-Hit1", "HL-min-Good-mAP",
                                           "HL-min-Good-Hit1", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"]
    assert not mm.eval_submission(sub, gt, "charades").get("HL-min-Fair")  # HL only for QVH (MESM has none)


def test_hl_hit1_any_annotator():
    """Hit@1 counts the top clip when ANY annotator's binarised label is 1 (max over the 3, eval.py L164-166);
    the top clip is the first maximum; a top clip past the GT clips is a miss; predictions shorter than the video
    are padded with 0 for the AP (L202-206)."""
    gt = [{"qid": 0, "duration": 8, "relevant_windows": [[0, 8]], "relevant_clip_ids": [1, 2],
           "saliency_scores": [[4, 0, 0], [1, 1, 1]]},
          {"qid": 1, "duration": 4, "relevant_windows": [[0, 4]], "relevant_clip_ids": [0],
           "saliency_scores": [[4, 4, 4]]}]
    sub = [{"qid": 0, "pred_relevant_windows": [[0, 2, 0.5]], "pred_saliency_scores": [0.1, 0.9, 0.9]},
           {"qid": 1, "pred_relevant_windows": [[0, 2, 0.5]], "pred_saliency_scores": [-1.0, -2.0, 5.0]}]
    got = mm.eval_highlight(sub, gt)
    assert got["HL-min-VeryGood"]["HL-Hit1"] == 50.0  # query 0: clip 1 (first of the tied 0.9), annotator 1 has 4
    assert_same(got, r_hl(sub, gt))
    assert differs(got, r_hl(sub, gt, "hit_mean"))
    # query 1, annotator k, Fair: y = [1, 0], scores [-1, -2] -> AP 1; query 0 annotator 0: y = [0, 1, 0, 0],
    # scores [.1, .9, .9, 0 (padding)] -> tie group .9 holds the positive: precision 1/2 -> AP 1/2.
    assert mm.hl_average_precision([0, 1, 0, 0], [0.1, 0.9, 0.9, 0.0]) == 0.5


def test_hl_ap_against_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    for _ in range(80):
        n = int(rng.integers(2, 30))
        y = (rng.random(n) < rng.random()).astype(float)
        s = np.round(rng.normal(size=n), int(rng.integers(0, 2)))
        if len(set(y.tolist())) == 1:
            continue
        precision, recall, _ = metrics.precision_recall_curve(y, s)  # get_ap L197-209, verbatim steps
        recall = recall.astype(np.float32)
        for i in range(1, len(precision)):
            precision[i] = max(precision[i - 1], precision[i])
        expected = np.mean(precision[np.where(np.diff(recall))])
        assert mm.hl_average_precision(y, s) == expected
        assert mm.hl_average_precision(y, s) == r_get_ap(y.tolist(), s.tolist())


def test_hl_ap_hand_cases():
    ap = mm.hl_average_precision
    # y = [1, 0, 1, 0], distinct scores: points (P, R) by descending score: (1, .5), (.5, .5), (2/3, 1), (.5, 1);
    # interpolated towards higher recall: R=1 -> 2/3, R=.5 -> 1; AP = mean(2/3, 1) = 5/6.
    assert ap([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]) == pytest.approx(5 / 6, abs=1e-15)
    # a tie of two positives: y = [1, 0, 1, 1], scores [.9, .8, .7, .7]. Points: .9 -> (1, 1/3), .8 -> (.5, 1/3),
    # .7 (both positives at once) -> (3/4, 1). Recall levels 1/3 and 1: interpolated 1 and 3/4; AP = 7/8.
    # (Breaking the tie into two points would add the level 2/3 (precision 2/3 -> 3/4): AP = 5/6; sklearn's
    # average_precision_score, a recall-weighted sum, gives 1/3 * 1 + 2/3 * 3/4 = 5/6 as well.)
    assert ap([1, 0, 1, 1], [0.9, 0.8, 0.7, 0.7]) == pytest.approx(7 / 8, abs=1e-15)
    assert r_get_ap([1, 0, 1, 1], [0.9, 0.8, 0.7, 0.7], "weighted_ap") == pytest.approx(5 / 6)  # the mutant differs
    # a positive tied with a negative at the top: y = [1, 0, 0], scores [.5, .5, .1]: .5 -> (.5, 1); .1 -> (1/3, 1).
    # One recall level (1), interpolated precision .5; AP = 1/2 (a positive-first tie break would give 1).
    assert ap([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.5, abs=1e-15)
    assert ap([0, 0, 0], [0.3, 0.2, 0.1]) == 0.0  # no positive: 0 (L187-189)
    assert ap([1, 1], [0.3, 0.2]) == 1.0  # all positive: 1
    with pytest.raises(JaxprvrError):
        ap([1, 0], [0.5, float("nan")])  # sklearn raises on NaN; never a number
    with pytest.raises(JaxprvrError):
        ap([1, 2], [0.5, 0.4])


# ---------------------------------------------------------------------------------------------- mutants
def test_mutants_fail():
    # unstable sort: two predictions tied at 0.5, the first misses, the second hits -> AP = 1/2 (stable)
    sub = [{"qid": 1, "pred_relevant_windows": [[0.0, 1.0, 0.5], [0.0, 10.0, 0.5]]}]
    gt = [{"qid": 1, "relevant_windows": [[0, 10]]}]
    got = mm.eval_submission(sub, gt, "charades")
    assert got["full"]["MR-mAP"]["0.5"] == 50.0
    assert_same(got, r_eval(sub, gt, "charades"))
    assert differs(got, r_eval(sub, gt, "charades", "unstable_sort"))
    # bucket edges (min, max]: lengths exactly 10 and 30 belong to short and middle
    sub = [{"qid": q, "pred_relevant_windows": [[0.0, float(L), 0.9]]} for q, L in enumerate((10, 30, 5))]
    gt = [{"qid": q, "relevant_windows": [[0, L]]} for q, L in enumerate((10, 30, 5))]
    got = mm.eval_submission(sub, gt, "charades")
    assert_same(got, r_eval(sub, gt, "charades"))
    assert differs(got, r_eval(sub, gt, "charades", "bucket_inclusive"))
    assert got["brief"]["MR-long-mAP"] is None and got["brief"]["MR-superlong-mAP"] is None
    # R1 against the best GT window, not the first
    sub = [{"qid": 0, "pred_relevant_windows": [[20.0, 30.0, 0.9]]}]
    gt = [{"qid": 0, "relevant_windows": [[0, 10], [20, 30]]}]
    got = mm.eval_submission(sub, gt, "qvhighlights", highlight=False)
    assert got["brief"]["MR-full-R1@0.7"] == 100.0
    assert differs(got, r_eval(sub, gt, "qvhighlights", "r1_first_gt"))
    # thresholds rounded to 2 decimals: IoU exactly 0.7 (7/10) passes 0.7, not 0.7000000000000001
    sub = [{"qid": 0, "pred_relevant_windows": [[0.0, 7.0, 0.9]]}]
    gt = [{"qid": 0, "relevant_windows": [[0, 10]]}]
    got = mm.eval_submission(sub, gt, "charades")
    assert got["full"]["MR-R1"]["0.7"] == 100.0
    assert_same(got, r_eval(sub, gt, "charades"))
    assert differs(got, r_eval(sub, gt, "charades", "unrounded_thds"))


def test_gt_ties_follow_numpy_argsort():
    """Several GT windows of equal IoU: the one matched first is the official ``argsort()[::-1]`` choice; with 10
    tied windows and 10 hits the AP has > 8 terms (np.sum's pairwise order)."""
    gt_w = [[0, 4], [2, 6]] * 3 + [[10, 12], [10, 12], [11, 13], [30, 40]]
    preds = [[1.0, 5.0, 0.9], [2.0, 4.0, 0.8], [0.0, 4.0, 0.8], [10.0, 12.0, 0.7], [10.0, 12.0, 0.6],
             [11.0, 13.0, 0.5], [30.0, 40.0, 0.4], [2.0, 6.0, 0.3], [0.0, 4.0, 0.2], [2.0, 6.0, 0.1]]
    got = mm._ap_detection(*mm._pad([preds], 3), *mm._pad([gt_w], 2), MAP_THDS, False)[0]
    assert got.tolist() == r_ap(gt_w, preds, MAP_THDS)
    sub = [{"qid": 0, "pred_relevant_windows": preds}]
    gt = [{"qid": 0, "relevant_windows": gt_w}]
    assert_same(mm.eval_submission(sub, gt, "qvhighlights", highlight=False), r_eval(sub, gt, "qvhighlights"))


def test_degenerate_iou_official_nan_and_flag():
    """A zero-length prediction on a zero-length GT window: IoU 0/0 = NaN officially (a match in the AP, miou
    NaN); zero_degenerate_iou=True counts it as 0."""
    sub = [{"qid": 0, "pred_relevant_windows": [[5.0, 5.0, 0.9]]}, {"qid": 1, "pred_relevant_windows": [[0, 4, .5]]}]
    gt = [{"qid": 0, "relevant_windows": [[5, 5]]}, {"qid": 1, "relevant_windows": [[0, 4]]}]
    got = mm.eval_submission(sub, gt, "charades")
    assert_same(got, r_eval(sub, gt, "charades"), allow_nan=True)
    assert math.isnan(got["brief"]["MR-full-miou"]) and got["brief"]["MR-full-mAP"] == 100.0
    with pytest.raises(AssertionError):
        assert_same(got, got)  # NaN never passes a plain comparison
    fixed = mm.eval_submission(sub, gt, "charades", zero_degenerate_iou=True)
    assert fixed["brief"]["MR-full-miou"] == 50.0 and fixed["brief"]["MR-full-mAP"] == 50.0


def test_bad_input_and_qids():
    sub = [{"qid": 1, "pred_relevant_windows": [[0.0, 4.0, 0.5]]}, {"qid": 2, "pred_relevant_windows": [[1, 3, .2]]}]
    gt = [{"qid": 1, "relevant_windows": [[0, 4]]}, {"qid": 3, "relevant_windows": [[0, 2]]}]
    with pytest.raises(JaxprvrError, match="1 only in the submission, 1 only in the ground truth"):
        mm.eval_submission(sub, gt)  # the official code raises KeyError in compute_mr_r1 here
    got = mm.eval_submission(sub, gt, match_number=False)
    assert got["qid_mismatch"] == {"submission_only": 1, "gt_only": 1}
    assert_same({k: v for k, v in got.items() if k != "qid_mismatch"}, r_eval(sub[:1], gt[:1], "charades"))
    nan_sub = [dict(sub[0], pred_relevant_windows=[[0.0, 4.0, float("nan")]])]
    for bad_sub, bad_gt in ((nan_sub, gt[:1]),
                            (sub[:1], [{"qid": 1, "relevant_windows": [[0, float("nan")]]}]),
                            (sub[:1], [{"qid": 1, "relevant_windows": [[4, 0]]}]),
                            (sub[:1], [{"qid": 1, "relevant_windows": []}]),
                            ([sub[0], sub[0]], gt[:1]),
                            ([dict(sub[0], pred_relevant_windows=[[0.0, 4.0]])], gt[:1])):
        with pytest.raises(JaxprvrError):
            mm.eval_submission(bad_sub, bad_gt)
    with pytest.raises(JaxprvrError):
        mm.eval_highlight([dict(sub[0], pred_saliency_scores=[0.1, float("nan")])],
                          [dict(gt[0], duration=4, relevant_clip_ids=[0], saliency_scores=[[1, 2, 3]])])
    with pytest.raises(JaxprvrError, match="relevant clip ids"):
        mm.eval_highlight([dict(sub[0], pred_saliency_scores=[0.1])],
                          [dict(gt[0], duration=4, relevant_clip_ids=[2], saliency_scores=[[1, 2, 3]])])
    with pytest.raises(JaxprvrError):
        mm.official_dataset_name("anet")
    assert [mm.official_dataset_name(d) for d in ("charades_cg", "charades_cd", "charades-cg")] == \
        ["charades-cg", "charades-cd", "charades-cg"]


# ---------------------------------------------------------------------------------------------- post-processing
def t_postprocess(logits, spans, sal, dur, vm, clip_len, max_ts, mutant=None):
    """eval.py L64-116 and PostProcessorDETR L22-47 in torch, literally (the float32 probability taken as the
    float64 softmax rounded to float32, the spec of foreground_scores, checked against torch's below)."""
    prob = torch.softmax(torch.from_numpy(logits).double(), -1).float()
    scores = prob[..., 1 if mutant == "fg1" else 0]
    pred_spans = torch.from_numpy(spans)
    _sal = torch.from_numpy(sal).half()
    lens = torch.from_numpy(vm).sum(1).tolist()
    duration = torch.Tensor(dur.tolist())
    res = []
    for idx, (sp, sc) in enumerate(zip(pred_spans, scores)):
        x1 = sp[..., 0] - 0.5 * sp[..., 1]
        x2 = sp[..., 0] + 0.5 * sp[..., 1]
        sp = torch.stack([x1, x2], dim=-1) * duration[idx]
        cur = torch.cat([sp, sc[:, None]], dim=1).tolist()
        if mutant == "sort_rounded":
            cur = [[float(f"{e:.4f}") for e in row] for row in cur]
        cur = sorted(cur, key=lambda x: x[2], reverse=True)
        cur = [[float(f"{e:.4f}") for e in row] for row in cur]
        t = torch.tensor(cur)
        w = torch.clamp(t[:, :2], min=0, max=max_ts)
        if clip_len != -1:
            w = torch.round(w / clip_len) * clip_len
        rows = torch.cat([w, t[:, 2:3]], dim=1).tolist()
        rows = [e[:2] + [float(f"{e[2]:.4f}")] for e in rows]
        res.append({"qid": idx, "query": f"s{idx}", "vid": f"v{idx}", "pred_relevant_windows": rows,
                    "pred_saliency_scores": _sal[idx, : int(lens[idx])].tolist()})
    return res


@pytest.mark.parametrize("clip_len,max_ts", [(0.17, 150), (1, 150), (-1, 1000)])
def test_postprocess_chain(clip_len, max_ts):
    rng = np.random.default_rng(3)
    b, n, length = 5, 10, 20
    logits = (rng.normal(size=(b, n, 2)) * 2).astype(np.float32)
    logits[0, 4] = logits[0, 1]  # an exact score tie: the query order is kept
    p = np.array([0.12341, 0.12344])  # round to the same 0.1234; the unrounded order decides
    logits[1, :2, 0], logits[1, :2, 1] = np.log(p / (1 - p)), 0.0
    spans = rng.random((b, n, 2)).astype(np.float32)
    spans[2, 0] = [0.9, 0.4]  # ends past the duration: kept (clamped to max_ts_val only)
    dur = np.array([30.72, 25.0, 200.0, 12.5, 150.0], np.float32)
    spans[2, 1] = [0.95, 0.2]  # 200 s video: the end 210 s is clamped to max_ts_val
    sal = rng.normal(size=(b, length)).astype(np.float32)
    vm = (np.arange(length)[None] < rng.integers(3, length, b)[:, None]).astype(np.float32)
    got = mm.postprocess(logits, spans, sal, dur, clip_len=clip_len, max_ts_val=max_ts, qid=np.arange(b),
                         query=[f"s{i}" for i in range(b)], vid=[f"v{i}" for i in range(b)], video_mask=vm)
    ref = t_postprocess(logits, spans, sal, dur, vm, clip_len, max_ts)
    assert_same(got, ref)
    assert differs(got, t_postprocess(logits, spans, sal, dur, vm, clip_len, max_ts, "fg1"))
    assert differs(got, t_postprocess(logits, spans, sal, dur, vm, clip_len, max_ts, "sort_rounded"))
    if clip_len == 0.17:  # multiples of clip_len in float32: k * float32(0.17), e.g. 12.239999771118164
        c = np.float32(0.17)
        for w in (v for row in got for win in row["pred_relevant_windows"] for v in win[:2]):
            k = np.round(np.float32(w) / c)
            assert w == float(np.float32(k * c))
        assert any(w != round(w, 4) for row in got for win in row["pred_relevant_windows"] for w in win[:2])
    end2 = max(w[1] for w in got[2]["pred_relevant_windows"])  # 220 s predicted in a 200 s video
    if max_ts == 150:  # clamped to max_ts_val, then rounded: 0.17 gives 882 * 0.17 = 149.94 (float32)
        c = np.float32(clip_len)
        assert end2 == float(np.float32(np.round(np.float32(150) / c) * c))
    else:
        assert end2 > 200.0  # never clamped to the duration
    assert all(len(r["pred_saliency_scores"]) == int(m.sum()) for r, m in zip(got, vm))
    single = mm.postprocess(logits[0], spans[0], sal[0], dur[0], clip_len=clip_len, max_ts_val=max_ts)
    assert single[0]["pred_relevant_windows"] == got[0]["pred_relevant_windows"]
    # a postprocessed batch is a valid submission
    gt = [{"qid": i, "relevant_windows": [[0.0, 5.0]]} for i in range(b)]
    assert mm.eval_submission(got, gt)["brief"]["MR-full-mAP"] is not None


def test_postprocess_end_past_duration_kept():
    out = mm.postprocess(np.zeros((1, 2), np.float32), np.array([[0.9, 0.4]], np.float32), None, 30.0,
                         clip_len=-1, max_ts_val=150)
    assert out[0]["pred_relevant_windows"][0][:2] == [21.0, 33.0]  # 33 > duration 30: not clamped to it


def test_foreground_scores_vs_torch_and_nan():
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(2000, 2)) * 3).astype(np.float32)
    ours = mm.foreground_scores(logits)
    f32 = torch.softmax(torch.from_numpy(logits), -1)[:, 0].numpy()
    assert np.all(np.abs(ours - f32) <= 2e-6 * ours)  # torch's float32 exp/sum: ~16 ulps at worst
    assert np.array_equal(ours, torch.softmax(torch.from_numpy(logits).double(), -1)[:, 0].float().numpy())
    assert not np.array_equal(ours, torch.softmax(torch.from_numpy(logits).double(), -1)[:, 1].float().numpy())
    bad = logits[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(JaxprvrError):
        mm.postprocess(bad[None], np.full((1, 3, 2), 0.5, np.float32), None, 10.0, clip_len=1, max_ts_val=150)


# ---------------------------------------------------------------------------------------------- chance level
def test_chance_mr_analytic():
    # GT [0, D/2], every pooled length D/2: start u * D/2 with u ~ U[0, 1], IoU = (1 - u) / (1 + u);
    # P(IoU >= t) = (1 - t) / (1 + t), E[IoU] = 2 ln 2 - 1.
    gt = [{"qid": i, "duration": 20.0, "relevant_windows": [[0.0, 10.0]]} for i in range(4)]
    n = 20000
    got = mm.chance_mr(gt, n_draws=n, seed=1, thresholds=(0.3, 0.5, 0.7))
    for t in (0.3, 0.5, 0.7):
        p = (1 - t) / (1 + t)
        assert abs(got[f"R1@{t:g}"] / 100 - p) < 4 * math.sqrt(p * (1 - p) / (4 * n))
    assert abs(got["miou"] / 100 - (2 * math.log(2) - 1)) < 0.01
    assert got == mm.chance_mr(gt, n_draws=n, seed=1, thresholds=(0.3, 0.5, 0.7))
    assert got != mm.chance_mr(gt, n_draws=n, seed=2, thresholds=(0.3, 0.5, 0.7))
    # a pooled length longer than the video is clipped to it: GT = whole video, pool {D, 3D} -> IoU 1 always
    gt = [{"qid": 0, "duration": 10.0, "relevant_windows": [[0.0, 10.0]]},
          {"qid": 1, "duration": 40.0, "relevant_windows": [[0.0, 30.0]]}]
    got = mm.chance_mr(gt[:1] + [dict(gt[1], duration=40.0)], n_draws=200, seed=0, thresholds=(0.9,))
    one = mm.chance_mr(gt[:1], n_draws=200, seed=0, thresholds=(0.9,))
    assert one["R1@0.9"] == 100.0 and one["miou"] == 100.0
    assert 0 < got["miou"] < 100
    with pytest.raises(JaxprvrError):
        mm.chance_mr([{"qid": 0, "relevant_windows": [[0, 1]]}], 10, 0)


# ---------------------------------------------------------------------------------------------- files and CLI
def test_jsonl_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    sub, gt = random_data(rng, 6, "charades", False, True)
    mm.save_jsonl(sub, tmp_path / "s.jsonl")
    assert not (tmp_path / "s.jsonl").read_text().endswith("\n")  # the official "\n".join
    assert mm.load_jsonl(tmp_path / "s.jsonl", "submission") == sub
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(sub[0]) + "\n{not json}\n")
    with pytest.raises(JaxprvrError, match="bad.jsonl:2"):
        mm.load_jsonl(bad)
    bad.write_text(json.dumps(sub[0]) + "\n" + json.dumps(dict(sub[1], pred_relevant_windows=[[0, 1, float("nan")]])))
    with pytest.raises(JaxprvrError, match="bad.jsonl:2"):
        mm.load_jsonl(bad, "submission")
    bad.write_text(json.dumps({"qid": 1}) + "\n")
    with pytest.raises(JaxprvrError, match="bad.jsonl:1"):
        mm.load_jsonl(bad, "gt")
    with pytest.raises(JaxprvrError):
        mm.load_jsonl(tmp_path / "missing.jsonl")


def test_cli_roundtrip(tmp_path, capsys):
    rng = np.random.default_rng(6)
    sub, gt = random_data(rng, 9, "tacos", False, False)
    mm.save_jsonl(sub, tmp_path / "s.jsonl")
    mm.save_jsonl(gt, tmp_path / "g.jsonl")
    out = tmp_path / "m" / "metrics.json"
    rc = mm.main(["--dataset", "tacos", "--submission", str(tmp_path / "s.jsonl"), "--gt", str(tmp_path / "g.jsonl"),
                  "--out", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    ref = r_eval(sub, gt, "tacos")
    assert_same(json.loads(lines[0], object_pairs_hook=OrderedDict), ref["brief"])
    assert_same(json.loads(out.read_text(), object_pairs_hook=OrderedDict), ref)
    assert "0.1" in json.loads(out.read_text())["full"]["MR-R1"]  # TACoS thresholds
    mm.save_jsonl(sub[:-1], tmp_path / "s2.jsonl")
    rc = mm.main(["--dataset", "tacos", "--submission", str(tmp_path / "s2.jsonl"), "--gt",
                  str(tmp_path / "g.jsonl"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "qids" in err[0]
    rc = mm.main(["--dataset", "tacos", "--no-match-number", "--submission", str(tmp_path / "s2.jsonl"), "--gt",
                  str(tmp_path / "g.jsonl"), "--out", str(out)])
    assert rc == 0 and json.loads(out.read_text())["qid_mismatch"] == {"submission_only": 0, "gt_only": 1}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mm.main(["--help"])
    assert e.value.code == 0 and "--submission" in capsys.readouterr().out


def test_mrnet_metrics_untouched():
    """This module is separate from MRNet's jaxprvr.metrics.vmr, whose public API is unchanged."""
    from jaxprvr.metrics import vmr

    assert set(vmr.__all__) == {"nms_topk", "predict_moments", "predict_moments_padded", "vmr_metrics",
                                "chance_recall", "official_key", "metric_key"}
    assert not any(getattr(mm, name, None) is getattr(vmr, name) for name in vmr.__all__)
