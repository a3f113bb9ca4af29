"""jaxprvr.metrics.vmr against a torch transcription of the official evaluation (xian-sh/MRNet @ 53432f5
``ret/data/datasets/evaluation.py`` L9-19 and L53-80, L115-135; ``ret/data/datasets/utils.py`` L11-17, L34-39) and
brute-force loops."""

import itertools

import numpy as np
import pytest
import torch

from jaxprvr.errors import JaxprvrError
from jaxprvr.metrics.vmr import chance_recall, nms_topk, official_key, predict_moments, predict_moments_padded, \
    vmr_metrics
from jaxprvr.ops.proposals import mask2d

ANET = (0.3, 0.5, 0.7)
TACOS = (0.1, 0.3, 0.5)


# ------------------------------------------------------------------------ torch transcription (CPU)
def t_iou(candidates, gt):
    """utils.py L11-17."""
    start, end = candidates[:, 0], candidates[:, 1]
    s, e = gt[0].float(), gt[1].float()
    inter = end.min(e) - start.max(s)
    union = end.max(e) - start.min(s)
    return inter.clamp(min=0) / union


def t_score2d_to_moments_scores(score2d, num_clips, duration):
    """utils.py L34-39."""
    grids = score2d.nonzero()
    scores = score2d[grids[:, 0], grids[:, 1]]
    grids[:, 1] += 1
    moments = grids * duration / num_clips
    return moments, scores


def t_nms(moments, scores, thresh, strict=True):
    """evaluation.py L9-19; the sort made stable (the official one is not: ties are implementation-defined)."""
    scores, ranks = scores.sort(descending=True, stable=True)
    moments = moments[ranks]
    suppressed = ranks.zero_().bool()
    numel = suppressed.numel()
    for i in range(numel - 1):
        if suppressed[i]:
            continue
        ov = t_iou(moments[i + 1:], moments[i])
        mask = ov > thresh if strict else ov >= thresh
        suppressed[i + 1:][mask] = True
    return moments[~suppressed], scores[~suppressed]


def t_evaluate(maps, durations, gts, score_pow, nms_thresh, iou_metrics, recall_metrics=(1, 5)):
    """evaluation.py L43-80 and L115-135 (no logging, no results json); maps: [(contrastive, iou)] per video
    (n_q, N, N) float32; gts per video (n_q, 2)."""
    num_recall_metrics, num_iou_metrics = len(recall_metrics), len(iou_metrics)
    recall_metrics = torch.tensor(recall_metrics)
    iou_metrics = torch.tensor(iou_metrics)
    num_clips = maps[0][1].shape[-1]
    recall_x_iou = torch.zeros(num_recall_metrics, num_iou_metrics)
    recall_m_iou = 0.
    num_instance = 0
    for (contrastive, iou2d), duration, gt_moments in zip(maps, durations, gts):
        score2d = torch.pow(torch.from_numpy(contrastive) * 0.5 + 0.5, score_pow) * torch.from_numpy(iou2d)
        for gt_moment, pred_score2d in zip(torch.from_numpy(gt_moments), score2d):
            num_instance += 1
            candidates, scores = t_score2d_to_moments_scores(pred_score2d, num_clips, duration)
            moments, _ = t_nms(candidates, scores, nms_thresh)
            for i, r in enumerate(recall_metrics):
                mious = t_iou(moments[:r], gt_moment)
                bools = mious[:, None].expand(r, num_iou_metrics) >= iou_metrics
                recall_x_iou[i] += bools.any(dim=0)
                if i == 0:
                    recall_m_iou += mious.item()
    recall_m_iou /= num_instance
    recall_x_iou /= num_instance
    result_dict = {}
    for i in range(num_recall_metrics):
        for j in range(num_iou_metrics):
            result_dict['R@{},IoU@{:.01f}'.format(recall_metrics[i], torch.round(iou_metrics[j] * 100) / 100)] = \
                recall_x_iou[i][j]
    result_dict['R@{1},mIoU'] = recall_m_iou
    result_dict['Best_R1'] = sum(recall_x_iou[0]) / num_iou_metrics
    result_dict['Best_R5'] = sum(recall_x_iou[1]) / num_iou_metrics
    return result_dict


def py_nms(spans, scores, thresh):
    """Brute force in python floats over the float32 values: stable descending order, strict suppression."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept = []
    for i in order:
        ok = True
        for j in kept:
            s1, e1 = spans[i]
            s2, e2 = spans[j]
            inter = np.float32(min(e1, e2)) - np.float32(max(s1, s2))
            union = np.float32(max(e1, e2)) - np.float32(min(s1, s2))
            if np.float32(max(inter, np.float32(0))) / union > np.float32(thresh):
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


# ---------------------------------------------------------------------------------------------- helpers
def random_video(rng, n, mask, n_q, levels=None):
    """Masked float32 maps; ``levels`` quantises the scores (many exact ties)."""
    c = rng.uniform(-1, 1, (n_q, n, n))
    i = rng.uniform(0, 1, (n_q, n, n))
    if levels:
        c = np.round(c * levels) / levels
        i = np.round(i * levels) / levels + 1.0 / (4 * levels)
    return (c * mask).astype(np.float32), (i * mask).astype(np.float32)


def random_gts(rng, dur, n_q):
    g = np.sort(rng.uniform(0, dur, (n_q, 2)), axis=1)
    g[:, 1] = np.maximum(g[:, 1], g[:, 0] + 1e-3 * dur)
    return g.astype(np.float32)


# --------------------------------------------------------------------------------------------------- NMS
@pytest.mark.parametrize("thresh", [0.5, 0.4, 0.0, 0.99])
def test_nms_topk_is_the_prefix_of_the_full_greedy_nms(thresh):
    rng = np.random.default_rng(int(thresh * 100))
    n, m = 16, mask2d(16, [3, 2, 1])
    for trial in range(6):
        dur = float(rng.uniform(5, 200))
        cells = np.argwhere(m)
        spans = np.stack([cells[:, 0] * np.float32(dur), (cells[:, 1] + 1) * np.float32(dur)], 1).astype(np.float32)
        spans = (spans / np.float32(n)).astype(np.float32)
        scores = rng.uniform(size=len(cells)).astype(np.float32)
        if trial % 2:
            scores = (np.round(scores * 4) / 4).astype(np.float32)  # exact ties: stable order decides
        full = py_nms(spans, scores, thresh)
        ref_m, _ = t_nms(torch.from_numpy(spans), torch.from_numpy(scores), thresh)
        np.testing.assert_array_equal(spans[full], ref_m.numpy())
        for k in (1, 5, 10, len(full) + 3):
            got = nms_topk(spans, scores, thresh, k)
            np.testing.assert_array_equal(got, full[:k])


def test_nms_is_strict_and_stable():
    # grid spans with IoU exactly 0.5: [0, 2] and [0, 4] (duration = N: float32 arithmetic is exact)
    spans = np.array([[0, 4], [0, 2], [1, 3], [8, 9], [8, 9]], np.float32)
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.5], np.float32)
    got = list(nms_topk(spans, scores, 0.5, 10))
    assert got == [0, 1, 2, 3]  # IoU 0.5 with [0, 4] is NOT > 0.5: [0, 2] and [1, 3] survive; ties in order
    non_strict, _ = t_nms(torch.from_numpy(spans), torch.from_numpy(scores), 0.5, strict=False)
    assert len(non_strict) != len(got)  # the >= variant would be caught
    # stable tie order: the equal-score [8, 9] at index 3 is kept, not index 4
    reverse = np.argsort(-scores[::-1], kind="stable")  # an order that reverses the ties
    assert list(len(scores) - 1 - reverse)[:3] != got[:3]


# ------------------------------------------------------------------------------------------ predictions
@pytest.mark.parametrize("n,counts,levels,pw,thr", [
    (64, [15, 8, 8], None, 0.5, 0.5), (64, [15, 8, 8], 8, 0.5, 0.5), (32, [7, 4, 4], 4, 0.3, 0.4),
])
def test_predict_moments_matches_the_official_pipeline(n, counts, levels, pw, thr):
    rng = np.random.default_rng(n + (levels or 0))
    m = mask2d(n, counts)
    c, i = random_video(rng, n, m, 4, levels)
    c[0, 0, 0] = -1.0  # a valid cell with score exactly 0: not a candidate (score2d.nonzero())
    dur = float(rng.uniform(10, 150))
    got = predict_moments(c, i, m, dur, pw, thr, 10)
    assert isinstance(got, list) and len(got) == 4
    score2d = torch.pow(torch.from_numpy(c) * 0.5 + 0.5, pw) * torch.from_numpy(i)
    for q in range(4):
        cand, sc = t_score2d_to_moments_scores(score2d[q], n, dur)
        ref_m, ref_s = t_nms(cand, sc, thr)
        g = got[q]
        assert g.shape == (min(10, len(ref_m)), 3) and g.dtype == np.float32
        np.testing.assert_array_equal(g[:, :2], ref_m[:10].numpy())
        # torch's float32 pow is not correctly rounded on CPU: scores agree to an ulp
        np.testing.assert_allclose(g[:, 2], ref_s[:10].numpy(), rtol=2e-7, atol=0)
    one = predict_moments(c[1], i[1], m, dur, pw, thr, 5)
    np.testing.assert_array_equal(one, got[1][:5])


def test_predict_moments_fewer_candidates_than_topk_and_none():
    n, m = 8, mask2d(8, [3, 1])
    c = np.zeros((2, n, n), np.float32)
    i = np.zeros((2, n, n), np.float32)
    i[0, 0, 0] = 0.5  # one candidate
    preds, counts = predict_moments_padded(c, i, m, 8.0, 0.5, 0.5, 5)
    assert list(counts) == [1, 0] and preds.shape == (2, 5, 3)
    np.testing.assert_allclose(preds[0, 0], [0.0, 1.0, np.sqrt(np.float32(0.5)) * np.float32(0.5)], rtol=1e-7)
    assert np.isnan(preds[0, 1:]).all() and np.isnan(preds[1]).all()


# ----------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("thresholds,levels", [(ANET, None), (ANET, 6), (TACOS, 4)])
def test_vmr_metrics_equal_the_official_evaluate(thresholds, levels):
    rng = np.random.default_rng(len(thresholds) + (levels or 0))
    n, counts = 32, [7, 4, 4]
    m = mask2d(n, counts)
    maps, durs, gts, preds, flat_gts = [], [], [], [], []
    for v in range(6):
        nq = int(rng.integers(1, 5))
        dur = float(np.float32(rng.uniform(10, 150))) if v else float(n)  # video 0: integer spans
        c, i = random_video(rng, n, m, nq, levels)
        g = random_gts(rng, dur, nq)
        if v == 0:  # GT on the grid: the top-1 hits 0.5 or 0.7 exactly ([0, 5] or [0, 7] vs [0, 10])
            g[0] = [0.0, 10.0]
            c[0] = -1.0 * m
            c[0, 0, 4] = c[0, 0, 6] = 1.0  # top cells [0, 5] (IoU 0.5), [0, 7] (IoU 0.7)
        maps.append((c, i))
        durs.append(dur)
        gts.append(g)
        p, _ = predict_moments_padded(c, i, m, dur, 0.5, 0.5, 10)
        preds.append(p)
        flat_gts.append(g)
    ref = t_evaluate(maps, durs, gts, 0.5, 0.5, thresholds)
    got = vmr_metrics(np.concatenate(preds), np.concatenate(flat_gts), thresholds)
    off = got["official"]
    assert set(off) == set(ref)
    for key, val in ref.items():
        assert off[key] == float(val), key  # bit-identical float32 (mIoU: float64 accumulation)
    assert got["n_queries"] == sum(len(g) for g in gts)
    for r, t in itertools.product((1, 5), thresholds):
        assert got[f"R{r}@{t:g}"] == off[official_key(r, t)]
    assert got["mIoU"] == off["R@{1},mIoU"]


def test_threshold_hit_exactly_counts_in_float32():
    # IoU([0, 7], [0, 10]) = float32(0.7) exactly: a hit at theta=0.7 (float32), a miss in float64 comparison
    gts = np.array([[0, 10], [0, 10], [0, 10]], np.float32)
    preds = [np.array([[0, 7, 1.0]]), np.array([[0, 5, 1.0]]), np.array([[0, 3, 1.0]])]
    res = vmr_metrics(preds, gts, ANET)
    assert res["R1@0.7"] == pytest.approx(1 / 3) and res["R1@0.5"] == pytest.approx(2 / 3)
    assert res["R1@0.3"] == 1.0  # 0.3 exactly (float32(3) / float32(10) == float32(0.3))
    assert float(np.float32(7) / np.float32(10)) < 0.7  # so a float64 threshold would miss it


def test_short_prediction_lists():
    gts = np.array([[0, 10], [20, 30], [40, 50], [0, 1]], np.float32)
    preds = [
        np.array([[50, 60, 0.9]], np.float32),  # one moment, a miss
        np.array([[0, 5, 0.9], [20, 30, 0.8]], np.float32),  # the second hits: R@5 yes, R@1 no
        np.array([[40, 45, 0.9], [41, 50, 0.8], [0, 2, 0.1]], np.float32),  # top-1 IoU 0.5
        np.zeros((0, 3), np.float32),  # nothing predicted: a miss, IoU 0
    ]
    res = vmr_metrics(preds, gts, ANET)
    assert res["R1@0.5"] == pytest.approx(1 / 4) and res["R5@0.5"] == pytest.approx(2 / 4)
    assert res["R5@0.7"] == pytest.approx(2 / 4) and res["R1@0.7"] == 0.0
    assert res["mIoU"] == pytest.approx((0 + 0 + 0.5 + 0) / 4)
    # a padded array input gives the same numbers
    pad = np.full((4, 3, 3), np.nan, np.float32)
    for q, p in enumerate(preds):
        pad[q, :len(p)] = p
    assert vmr_metrics(pad, gts, ANET) == res


def test_single_moment_matches_the_official_broadcast():
    n = 8
    m = np.zeros((n, n), bool)
    m[2, 5] = True  # a single candidate -> one moment after NMS
    c = (np.ones((1, n, n)) * m).astype(np.float32)
    i = (np.full((1, n, n), 0.5) * m).astype(np.float32)
    gt = np.array([[2.0, 6.0]], np.float32)
    ref = t_evaluate([(c, i)], [8.0], [gt], 0.5, 0.5, ANET)
    p, _ = predict_moments_padded(c, i, m, 8.0, 0.5, 0.5, 5)
    got = vmr_metrics(p, gt, ANET)["official"]
    for key, val in ref.items():
        assert got[key] == float(val)


def test_vmr_metrics_bad_input():
    with pytest.raises(JaxprvrError):
        vmr_metrics([np.zeros((1, 3))], np.zeros((2, 2)), ANET)
    with pytest.raises(JaxprvrError):
        vmr_metrics([], np.zeros((0, 2)), ANET)


# ---------------------------------------------------------------------------------------------- chance
def test_chance_recall_brute_force_and_monte_carlo():
    rng = np.random.default_rng(0)
    n, m = 16, mask2d(16, [3, 2, 1])
    durs = rng.uniform(10, 100, 5).astype(np.float32)
    gts = np.stack([random_gts(rng, d, 1)[0] for d in durs])
    got = chance_recall(m, durs, gts, ANET)
    cells = np.argwhere(m)
    for t in ANET:
        per_q = []
        for d, g in zip(durs, gts):
            hits = 0
            for i, j in cells:
                s = np.float32(np.float32(i) * d) / np.float32(n)
                e = np.float32(np.float32(j + 1) * d) / np.float32(n)
                inter = max(np.float32(min(e, g[1]) - max(s, g[0])), np.float32(0))
                hits += np.float32(inter / np.float32(max(e, g[1]) - min(s, g[0]))) >= np.float32(t)
            per_q.append(hits / len(cells))
        assert got[f"chance_R1@{t:g}"] == pytest.approx(np.mean(per_q), abs=1e-12)
        # Monte Carlo: R@1 of a uniformly drawn valid proposal per query
        draws = rng.integers(0, len(cells), (20000, len(durs)))
        ij = cells[draws]  # (draws, Q, 2)
        s = ij[..., 0] * durs / n
        e = (ij[..., 1] + 1) * durs / n
        inter = np.clip(np.minimum(e, gts[:, 1]) - np.maximum(s, gts[:, 0]), 0, None)
        iou = inter / (np.maximum(e, gts[:, 1]) - np.minimum(s, gts[:, 0]))
        assert abs((iou >= t).mean() - got[f"chance_R1@{t:g}"]) < 0.01
