"""MESM criterion and matcher (jaxprvr/losses/mesm.py) against a float64 numpy transcription of the official code.

The reference below re-states lntzm/MESM ``model/matcher.py`` L60-117, ``model/criterion.py`` (all of it),
``utils/span_utils.py`` and ``runner.py`` ``build_criterion`` on the OFFICIAL batch (the real rows only, padded
per batch to the longest video / sentence as ``pad_sequences_1d`` does, QVH targets as per-row lists), looping
over rows where the official code loops, with scipy's ``linear_sum_assignment`` exactly as the official matcher
calls it. The JAX side runs on the static batch (padding rows, frames, words and windows filled with garbage or
NaN). Planted mutants of the reference show that each comparison sees the official choice.

float64 here means an official run whose torch default dtype is float64 (the ``empty_weight`` buffer and the
``count + 1e-6`` denominators follow the default dtype officially); GIoU in float64 (no ``.float()`` cast). The
float32 run (the official one, GIoU cast included) is compared with the PyTorch twin at 1e-5.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import block_diag
from scipy.optimize import linear_sum_assignment

from jaxprvr.config import MESMLossConfig
from jaxprvr.errors import JaxprvrError
from jaxprvr.losses import mesm as M
from tests.conftest import x64

NQ = 5  # decoder queries
D = 6  # feature width
NCLS = 7  # MLM classes
RTOL, ATOL = 1e-10, 1e-12

CHARADES = MESMLossConfig()  # config/charades/C+SF_C.json: cost_class 4, saliency 4, rank 12, no triplet
TACOS = MESMLossConfig(set_cost_class=6.0, loss_label_coef=6.0, loss_saliency_coef=1.0, rank_coef=1.0,
                       use_triplet=True)
QVH = MESMLossConfig(loss_saliency_coef=1.0, rank_coef=12.0, use_triplet=True, loss_recfw_coef=0.5)


def assert_close(a, b, rtol=RTOL, atol=ATOL):
    """allclose that never accepts NaN or inf on either side."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), f"non-finite value: {a} vs {b}"
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------- reference

def np_cxw_to_xx(s):
    return np.stack([s[..., 0] - 0.5 * s[..., 1], s[..., 0] + 0.5 * s[..., 1]], axis=-1)


def np_xx_to_cxw(s):
    return np.stack([(s[..., 0] + s[..., 1]) * 0.5, s[..., 1] - s[..., 0]], axis=-1)


def np_giou(s1, s2):
    """span_utils.py L45-72 and L92-121 (without the float32 cast) on (N, 2) x (M, 2)."""
    out = np.zeros((len(s1), len(s2)))
    for i in range(len(s1)):
        for j in range(len(s2)):
            a, b = s1[i], s2[j]
            inter = max(min(a[1], b[1]) - max(a[0], b[0]), 0.0)
            union = (a[1] - a[0]) + (b[1] - b[0]) - inter
            encl = max(max(a[1], b[1]) - min(a[0], b[0]), 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[i, j] = inter / union - (encl - union) / encl
    return out


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    m = x - x.max(-1, keepdims=True)
    return m - np.log(np.exp(m).sum(-1, keepdims=True))


def ref_matcher(layer, tg, multi, cfg, fg=0):
    """matcher.py L60-117: the full (bs*Q, #targets) cost, then scipy per row as the official code calls it."""
    bs, nq = layer["pred_spans"].shape[:2]
    if multi:
        moments = np.concatenate(tg["norm_moment"])
        spans = np.concatenate(tg["norm_span"])
    else:
        moments, spans = tg["norm_moment"], tg["norm_span"]
    prob = np_softmax(layer["pred_logits"].reshape(-1, 2))
    cost_class = -prob[:, [fg] * len(spans)]
    out_spans = layer["pred_spans"].reshape(-1, 2)
    cost_span = np.abs(out_spans[:, None, :] - spans[None, :, :]).sum(-1)
    cost_giou = -np_giou(np_cxw_to_xx(out_spans), moments)
    c = cfg.set_cost_span * cost_span + cfg.set_cost_giou * cost_giou + cfg.set_cost_class * cost_class
    c = c.reshape(bs, nq, -1)
    if multi:
        sizes = [len(s) for s in tg["norm_span"]]
        starts = np.cumsum([0] + sizes)
        return [linear_sum_assignment(c[i][:, starts[i]:starts[i + 1]]) for i in range(bs)]
    return np.array([linear_sum_assignment(c[i, :, i][:, None]) for i in range(bs)]).squeeze(-1)


def ref_to_static(idx, multi, r_cap, w_cap):
    """The official indices -> (R, W): the query of each window, -1 elsewhere."""
    out = np.full((r_cap, w_cap), -1, np.int32)
    if multi:
        for i, (rows, cols) in enumerate(idx):
            out[i, cols] = rows
    else:
        out[:len(idx), 0] = idx[:, 0]
    return out


def ref_loss_spans(layer, tg, idx, multi):
    if multi:
        src = np.concatenate([layer["pred_spans"][i, rows] for i, (rows, _) in enumerate(idx)])
        tgt = np.concatenate([tg["norm_span"][i][cols] for i, (_, cols) in enumerate(idx)])
        tgt_m = np_cxw_to_xx(tgt)
    else:
        src = layer["pred_spans"][np.arange(len(idx)), idx[:, 0]]
        tgt, tgt_m = tg["norm_span"], tg["norm_moment"]
    l1 = np.abs(src - tgt).mean()
    giou = 1 - np.diag(np_giou(np_cxw_to_xx(src), tgt_m))
    return {"loss_span": l1, "loss_giou": giou.mean()}


def ref_loss_labels(layer, idx, multi, eos, mutant=None):
    logits = layer["pred_logits"]
    fg = 1 if mutant == "fg1" else 0
    bg = 1 - fg
    target = np.full(logits.shape[:2], bg)
    pairs = ([(i, q) for i, (rows, _) in enumerate(idx) for q in rows] if multi
             else [(i, idx[i, 0]) for i in range(len(idx))])
    for i, q in pairs:
        target[i, q] = fg
    weight = np.ones(2)
    weight[-1] = eos
    logp = np_log_softmax(logits)
    ce, ws = [], []
    for i in range(logits.shape[0]):
        for q in range(logits.shape[1]):
            ce.append(-weight[target[i, q]] * logp[i, q, target[i, q]])
            ws.append(weight[target[i, q]])
    loss = sum(ce) / sum(ws) if mutant == "weighted_ce" else float(np.mean(ce))
    correct = sum(int(np.argmax(logits[i, q]) == fg) for i, q in pairs)
    f32 = np.float32  # utils.accuracy: ``.float()`` counts, then ``mul_(100.0 / n)`` in float32
    return {"loss_label": loss, "class_error": f32(100) - f32(correct) * f32(100.0 / len(pairs))}


def ref_loss_saliency(out, tg, cfg, multi, mutant=None):
    mask = tg["video_mask"].astype(np.float64)
    bs, ld = mask.shape
    neg = out["neg_saliency_scores"]
    loss_neg_pair = np.mean([sum(-math.log(1 - 1 / (1 + math.exp(-neg[i, t]))) * mask[i, t] for t in range(ld))
                             for i in range(bs)])
    label = tg["saliency_label"] if multi else tg["clip_mask"].astype(np.float64)
    scores = np.concatenate([out["saliency_scores"], neg], 1)
    labels = np.concatenate([label, np.zeros_like(label)], 1)
    mask2 = np.concatenate([mask, mask], 1)
    scores = mask2 * scores + (1 - mask2) * -1e3
    rank = 0.0
    for r in range(1, 12):
        pos = labels >= r
        if pos.sum() == 0:
            continue
        per_row, has_pos = [], []
        for i in range(bs):
            keep = ~(labels[i] > 100)
            cur = scores[i] * keep / 0.5 + ~keep * -1e3
            logits = cur - cur.max()
            lp = logits - math.log(np.exp(logits).sum() + 1e-6)
            mlpp = (pos[i] * lp * mask2[i]).sum() / (pos[i].sum() + 1e-6)  # torch's default dtype = float64 here
            per_row.append(-mlpp * (pos[i].sum() > 0))
            has_pos.append(pos[i].sum() > 0)
        per_row = np.asarray(per_row)
        rank += per_row[np.asarray(has_pos)].mean() if mutant == "rank_pos_rows" else per_row.mean()
    loss = rank / cfg.rank_coef + loss_neg_pair
    if cfg.use_triplet:
        s = out["saliency_scores"]
        terms = [max(cfg.saliency_margin + s[i, tg["neg_idx"][i, k]] - s[i, tg["pos_idx"][i, k]], 0.0)
                 for i in range(bs) for k in range(tg["pos_idx"].shape[1])]
        loss += sum(terms) / (bs * tg["pos_idx"].shape[1]) * 2
    return loss


def ref_loss_rec_fw(out, tg, eps, mutant=None):
    logit, label, mask = out["recfw_words_logit"], tg["words_label"], out["words_mask"]
    if mutant == "mlm_only":
        mask = mask & tg["mlm_mask"]
    per_row = []
    n_hit = n_all = 0
    for i in range(logit.shape[0]):
        vals = []
        for j in range(logit.shape[1]):
            if not mask[i, j]:
                continue
            lp = np_log_softmax(logit[i, j])
            vals.append((1 - eps) * -lp[label[i, j]] + eps / logit.shape[-1] * -lp.sum())
            n_hit += int(np.argmax(logit[i, j]) == label[i, j])
            n_all += 1
        per_row.append(sum(vals) / len(vals))
    return float(np.mean(per_row)), np.float32(n_hit) / np.float32(n_all)  # ``.float()`` (criterion.py L293-294)


def ref_loss_rec_ss(out, tg, cfg, multi, mutant=None):
    if multi:
        merged = np.stack([[m.min(), m.max()] for m in tg["norm_moment"]])
    else:
        merged = tg["norm_moment"]
    blocks, start = [], 0
    for n in tg["num_clips"]:
        blocks.append(np_giou(merged[start:start + n], merged[start:start + n]))
        start += n
    iou = block_diag(*blocks)
    pos = iou > cfg.iou_gamma if mutant == "giou_gt" else iou >= cfg.iou_gamma
    bs = len(merged)
    clip, words = [], []
    for i in range(bs):
        cm = tg["clip_mask"][i].astype(np.float64)
        c = (out["projed_video_feat"][i] * cm[:, None]).sum(0) / cm.sum()
        wm = out["expanded_words_mask"][i].astype(np.float64)
        w = (out["expanded_words_feat"][i] * wm[:, None]).sum(0) / wm.sum()
        clip.append(c / max(np.linalg.norm(c), 1e-12))
        words.append(w / max(np.linalg.norm(w), 1e-12))
    losses = []
    for i in range(bs):
        cos = np.array([clip[i] @ words[k] for k in range(bs)]) / cfg.recss_tau
        logits = cos - cos.max()
        lp = logits - math.log(np.exp(logits).sum() + 1e-6)
        losses.append(-(pos[i] * lp).sum() / (pos[i].sum() + 1e-6))
    return float(np.mean(losses))


def ref_criterion(out, tg, cfg, multi, mutant=None):
    """Criterion.forward (criterion.py L319-367) and build_criterion's weights (runner.py L309-330)."""
    fg = 1 if mutant == "fg1" else 0
    losses = {}

    def layer_losses(layer):
        idx = ref_matcher(layer, tg, multi, cfg, fg=fg)
        d = ref_loss_spans(layer, tg, idx, multi)
        d.update(ref_loss_labels(layer, idx, multi, cfg.eos_coef, mutant))
        return d

    losses.update(layer_losses(out))
    losses["loss_saliency"] = ref_loss_saliency(out, tg, cfg, multi, mutant)
    losses["loss_rec_fw"], losses["rec_fw_acc"] = ref_loss_rec_fw(out, tg, cfg.label_smoothing, mutant)
    losses["loss_rec_ss"] = ref_loss_rec_ss(out, tg, cfg, multi, mutant)
    for i, aux in enumerate(out["aux_outputs"]):
        losses.update({f"{k}_{i}": v for k, v in layer_losses(aux).items()})
    weights = {"loss_span": cfg.loss_span_coef, "loss_giou": cfg.loss_giou_coef, "loss_label": cfg.loss_label_coef,
               "loss_saliency": cfg.loss_saliency_coef}
    for i in range(len(out["aux_outputs"])):
        weights.update({f"loss_span_{i}": cfg.loss_span_coef, f"loss_giou_{i}": cfg.loss_giou_coef,
                        f"loss_label_{i}": cfg.loss_label_coef})
    weights["loss_rec_fw"] = cfg.loss_recfw_coef
    weights["loss_rec_ss"] = cfg.loss_recss_coef
    total = sum(losses[k] * weights[k] for k in losses if k in weights)
    return total, losses


# ---------------------------------------------------------------------------------------------- data

def make_case(seed, multi, n_clips=(2, 1, 3), dup_queries=False):
    """An official (dynamic) batch and model outputs, float64. Row 1 repeats row 0's moment (a same-video
    positive of SS-MESM); with ``dup_queries`` query 3 repeats query 1 (exact matching ties)."""
    rng = np.random.default_rng(seed)
    bs = sum(n_clips)
    lens = []
    for n in n_clips:
        lens += [int(rng.integers(5, 10))] * n if not multi else [int(rng.integers(5, 10)) for _ in range(n)]
    lens = np.asarray(lens)
    ld = lens.max()
    video_mask = np.arange(ld)[None] < lens[:, None]
    tg = {"video_mask": video_mask, "num_clips": list(n_clips)}
    clip_mask = np.zeros((bs, ld), bool)
    if multi:
        moments, spans, sal = [], [], np.zeros((bs, ld))
        for i in range(bs):
            n_w = int(rng.integers(1, 4))
            edges = np.sort(rng.choice(np.arange(lens[i] + 1), size=2 * n_w, replace=False))
            win = edges.reshape(n_w, 2) / lens[i]
            rng.shuffle(win)
            moments.append(win)
            spans.append(np_xx_to_cxw(win))
            for st, ed in win:
                a, b = int(round(st * lens[i])), int(round(ed * lens[i]))
                sal[i, a:b] = rng.integers(0, 13, size=b - a)
            if sal[i].max() == 0:
                sal[i, int(round(win[0, 0] * lens[i]))] = 12
        tg.update(norm_moment=moments, norm_span=spans, saliency_label=sal)
        clip_mask = sal != 0
    else:
        st = rng.uniform(0.0, 0.6, size=bs)
        ed = np.minimum(st + rng.uniform(0.1, 0.4, size=bs), 1.0)
        st[1], ed[1] = st[0], ed[0]
        moment = np.stack([st, ed], 1)
        for i in range(bs):
            a = int(st[i] * lens[i])
            b = min(int(ed[i] * lens[i]), lens[i] - 1)
            clip_mask[i, a:b + 1] = True
        tg.update(norm_moment=moment, norm_span=np_xx_to_cxw(moment))
    tg["clip_mask"] = clip_mask
    tg["pos_idx"] = np.stack([rng.integers(0, lens[i], size=2) for i in range(bs)])
    tg["neg_idx"] = np.stack([rng.integers(0, lens[i], size=2) for i in range(bs)])
    wl = rng.integers(2, 6, size=bs)
    lwd = wl.max()
    words_mask = np.arange(lwd)[None] < wl[:, None]
    tg["words_label"] = np.where(words_mask, rng.integers(0, NCLS, size=(bs, lwd)), 0)
    tg["mlm_mask"] = words_mask & (rng.uniform(size=(bs, lwd)) < 0.4)
    tg["mlm_mask"][:, 0] = True

    def layer():
        lay = {"pred_logits": rng.normal(size=(bs, NQ, 2)) * 1.5,
               "pred_spans": np.stack([rng.uniform(0.1, 0.9, (bs, NQ)), rng.uniform(0.05, 0.6, (bs, NQ))], -1)}
        if dup_queries:  # row 0: queries 1 and 3 both exactly on the (first) GT window, confident: a real tie
            lay["pred_spans"][0, 1] = tg["norm_span"][0][0] if multi else tg["norm_span"][0]
            lay["pred_logits"][0, 1] = [4.0, -4.0]
            lay["pred_logits"][:, 3] = lay["pred_logits"][:, 1]
            lay["pred_spans"][:, 3] = lay["pred_spans"][:, 1]
        return lay

    out = layer()
    out["aux_outputs"] = [layer()]
    out["saliency_scores"] = rng.normal(size=(bs, ld)) * 2
    out["neg_saliency_scores"] = rng.normal(size=(bs, ld)) * 2
    out["recfw_words_logit"] = rng.normal(size=(bs, lwd, NCLS)) * 2
    out["words_mask"] = words_mask
    out["projed_video_feat"] = rng.normal(size=(bs, ld, D))
    out["expanded_words_feat"] = rng.normal(size=(bs, lwd + 1, D))
    out["expanded_words_mask"] = np.concatenate([np.ones((bs, 1), bool), words_mask], 1)
    return out, tg


def to_static(out, tg, multi, caps=(9, 12, 7, None), seed=0, fill="garbage"):
    """The static padded layout (R, Lv, Lw, W); every padded entry is garbage (or NaN with fill="nan")."""
    r_cap, lv, lw, w_cap = caps
    w_cap = w_cap or (5 if multi else 1)
    rng = np.random.default_rng(1000 + seed)
    bs, ld = tg["video_mask"].shape
    lwd = out["words_mask"].shape[1]

    def junk(shape):
        if fill == "nan":
            return np.full(shape, np.nan)
        return rng.normal(size=shape) * 30

    def pad(x, shape, valid):
        y = junk(shape)
        sl = tuple(slice(0, s) for s in x.shape)
        y[sl] = x
        return np.where(valid, y, junk(shape))

    rows = np.arange(r_cap) < bs
    vm = np.zeros((r_cap, lv), bool)
    vm[:bs, :ld] = tg["video_mask"]
    wm = np.zeros((r_cap, lw), bool)
    wm[:bs, :lwd] = out["words_mask"]
    ewm = np.zeros((r_cap, lw + 1), bool)
    ewm[:bs, :lwd + 1] = out["expanded_words_mask"]

    def static_layer(lay):
        return {k: pad(lay[k], (r_cap, NQ, 2), rows[:, None, None]) for k in ("pred_logits", "pred_spans")}

    s_out = static_layer(out)
    s_out["aux_outputs"] = [static_layer(a) for a in out["aux_outputs"]]
    s_out["saliency_scores"] = pad(out["saliency_scores"], (r_cap, lv), vm)
    s_out["neg_saliency_scores"] = pad(out["neg_saliency_scores"], (r_cap, lv), vm)
    s_out["recfw_words_logit"] = pad(out["recfw_words_logit"], (r_cap, lw, NCLS), wm[..., None])
    s_out["words_mask"] = wm
    s_out["projed_video_feat"] = pad(out["projed_video_feat"], (r_cap, lv, D), vm[..., None])
    s_out["expanded_words_feat"] = pad(out["expanded_words_feat"], (r_cap, lw + 1, D), ewm[..., None])
    s_out["expanded_words_mask"] = ewm

    span_mask = np.zeros((r_cap, w_cap), bool)
    nm = rng.uniform(-2, 2, size=(r_cap, w_cap, 2))  # garbage, including st > ed
    ns = rng.uniform(-2, 2, size=(r_cap, w_cap, 2))
    if multi:
        for i in range(bs):
            n_w = len(tg["norm_moment"][i])
            nm[i, :n_w], ns[i, :n_w], span_mask[i, :n_w] = tg["norm_moment"][i], tg["norm_span"][i], True
    else:
        nm[:bs, 0], ns[:bs, 0], span_mask[:bs, 0] = tg["norm_moment"], tg["norm_span"], True
    group = np.full(r_cap, -1, np.int32)
    group[:bs] = np.repeat(np.arange(len(tg["num_clips"])), tg["num_clips"])
    garbage_int = rng.integers(-50, 50, size=(r_cap, 2))
    batch = {
        "video_mask": vm, "words_mask": wm, "span_mask": span_mask, "norm_moment": nm, "norm_span": ns,
        "row_group": group, "num_rows": np.int32(bs),
        "clip_mask": np.where(vm, np.pad(tg["clip_mask"], ((0, r_cap - bs), (0, lv - ld))), rng.uniform(size=vm.shape) < 0.5),
        "pos_idx": np.where(rows[:, None], np.pad(tg["pos_idx"], ((0, r_cap - bs), (0, 0))), garbage_int),
        "neg_idx": np.where(rows[:, None], np.pad(tg["neg_idx"], ((0, r_cap - bs), (0, 0))), garbage_int),
        "words_label": np.where(wm, np.pad(tg["words_label"], ((0, r_cap - bs), (0, lw - lwd))),
                                rng.integers(-5, 100, size=wm.shape)).astype(np.int32),
    }
    if multi:
        batch["saliency_label"] = np.where(vm, np.pad(tg["saliency_label"], ((0, r_cap - bs), (0, lv - ld))),
                                           rng.integers(0, 13, size=vm.shape))
    return s_out, batch


_loss_jit = jax.jit(M.mesm_loss, static_argnames=("cfg_loss", "multi_clip", "stable_neg_pair"))
_match_jit = jax.jit(M.match_all, static_argnames=("cfg_loss", "multi_clip"))


def jax_loss(s_out, batch, cfg, multi, indices=None, internal_match=False, **kw):
    """The jitted loss in float64. The matchings are computed by the (small) jitted match_all and passed in, so
    that one compiled loss serves a config and shape set; ``internal_match`` lets mesm_loss match by itself."""
    with x64():
        if indices is None and not internal_match:
            indices = _match_jit(s_out, batch, cfg, multi)
        total, terms = _loss_jit(s_out, batch, cfg, multi_clip=multi, indices=indices, **kw)
        return float(total), {k: float(v) for k, v in terms.items()}


CASES = [("charades", CHARADES, False), ("tacos", TACOS, False), ("qvh", QVH, True)]


# ---------------------------------------------------------------------------------------------- span utils

def test_span_utils_official_docstring_values():
    """span_utils.py docstrings (L54-60, L105-109), hand-computed conversions, and the transcription on random spans."""
    a = np.asarray([[0, 0.2], [0.5, 1.0]])
    b = np.asarray([[0, 0.3], [0.0, 1.0]])
    rng = np.random.default_rng(0)
    s1 = np.sort(rng.uniform(size=(6, 2)), 1)
    s2 = np.sort(rng.uniform(size=(4, 2)), 1)

    @jax.jit
    def f(a, b, s1, s2):
        return (M.temporal_iou(a, b), M.generalized_temporal_iou(a, b), M.span_xx_to_cxw(a), M.span_cxw_to_xx(b),
                M.generalized_temporal_iou(s1, s2), M.paired_generalized_temporal_iou(s1[:4], s2))

    with x64():
        (iou, union), giou, cxw, xx, g, pg = f(a, b, s1, s2)
    np.testing.assert_allclose(iou, [[2 / 3, 0.2], [0.0, 0.5]], rtol=1e-12)
    np.testing.assert_allclose(union, [[0.3, 1.0], [0.8, 1.0]], rtol=1e-12)
    np.testing.assert_allclose(giou, [[2 / 3, 0.2], [-0.2, 0.5]], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cxw, [[0.1, 0.2], [0.75, 0.5]], rtol=1e-12)
    np.testing.assert_allclose(xx, [[-0.15, 0.15], [-0.5, 0.5]], rtol=1e-12)
    assert_close(g, np_giou(s1, s2))
    assert_close(pg, np.diag(np_giou(s1[:4], s2)))


# ---------------------------------------------------------------------------------------------- matcher

@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("dup", [False, True])
def test_matcher_against_scipy(multi, dup):
    """match() = scipy as matcher.py calls it, also with exact ties (duplicated queries), for both layers."""
    out, tg = make_case(3 + dup, multi, dup_queries=dup)
    s_out, batch = to_static(out, tg, multi)
    cfg = QVH if multi else CHARADES
    with x64():
        got = [np.asarray(i) for i in _match_jit(s_out, batch, cfg, multi)]
    for g, layer in zip(got, [out] + out["aux_outputs"]):
        want = ref_to_static(ref_matcher(layer, tg, multi, cfg), multi, *g.shape)
        np.testing.assert_array_equal(g, want)
    if dup and not multi:  # row 0: queries 1 and 3 tie as the argmin: the first one
        assert got[0][0, 0] == 1


def test_matcher_multi_is_optimal_brute_force():
    """Hungarian per row: the total cost equals the minimum over all injective window -> query maps."""
    out, tg = make_case(11, True, n_clips=(3, 2))
    s_out, batch = to_static(out, tg, True)
    with x64():
        got = np.asarray(_match_jit(s_out, batch, QVH, True)[0])
        cost = np.asarray(jax.jit(M.match_cost, static_argnums=4)(
            s_out["pred_logits"], s_out["pred_spans"], batch["norm_span"], batch["norm_moment"], QVH))
    for i in range(len(tg["norm_moment"])):
        n_w = len(tg["norm_moment"][i])
        c = cost[i, :, :n_w]
        best = min(sum(c[p[j], j] for j in range(n_w)) for p in itertools.permutations(range(NQ), n_w))
        assert len(set(got[i, :n_w])) == n_w and np.all(got[i, n_w:] == -1)
        assert sum(c[got[i, j], j] for j in range(n_w)) == pytest.approx(best, rel=1e-12)
    assert np.all(got[len(tg["norm_moment"]):] == -1)


def test_single_matcher_tie_rule_is_scipys():
    """A (Q, 1) column with ties: scipy takes the first minimum; so does match()."""
    for col in ([1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, -1.0, 5.0, -1.0, -1.0]):
        r, _ = linear_sum_assignment(np.asarray(col)[:, None])
        assert r[0] == int(jnp.argmin(jnp.asarray(col)))


# ---------------------------------------------------------------------------------------------- terms

@pytest.mark.parametrize("name,cfg,multi", CASES)
def test_criterion_against_reference(name, cfg, multi):
    out, tg = make_case({"charades": 21, "tacos": 22, "qvh": 23}[name], multi)
    s_out, batch = to_static(out, tg, multi)
    total, terms = jax_loss(s_out, batch, cfg, multi)
    want_total, want = ref_criterion(out, tg, cfg, multi)
    assert set(terms) == set(want), (sorted(terms), sorted(want))
    for k in want:
        assert_close(terms[k], want[k]), k
    assert_close(total, want_total)
    if multi:  # mesm_loss matching by itself (indices=None) is the same
        total2, terms2 = jax_loss(s_out, batch, cfg, multi, internal_match=True)
        assert total2 == total and terms2 == terms


def test_padding_invariance_and_nan_padding():
    """Other capacities (R, Lv, Lw, W) and other garbage, NaN included, give the same terms."""
    for multi, cfg in ((False, TACOS), (True, QVH)):
        out, tg = make_case(5, multi)
        _, ref = jax_loss(*to_static(out, tg, multi), cfg, multi)
        caps = (16, 20, 11, 3) if multi else (6, 9, 5, 1)  # more windows than W = 5 would need; no padded row
        for caps, seed, fill in ((caps, 1, "nan"),):
            _, got = jax_loss(*to_static(out, tg, multi, caps=caps, seed=seed, fill=fill), cfg, multi)
            for k in ref:
                assert_close(got[k], ref[k], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("multi", [False, True])
def test_injected_matching(multi):
    """Indices passed in are used as given (one array per layer) and agree with the reference terms."""
    cfg = QVH if multi else TACOS
    out, tg = make_case(7, multi)
    s_out, batch = to_static(out, tg, multi)
    rng = np.random.default_rng(0)
    ref_idx = []
    for _ in range(2):  # arbitrary, non-optimal matchings
        if multi:  # (sorted queries, a permutation of the windows), the layout linear_sum_assignment returns
            ref_idx.append([(np.sort(rng.choice(NQ, len(m), replace=False)), rng.permutation(len(m)))
                            for m in tg["norm_moment"]])
        else:
            ref_idx.append(np.stack([rng.integers(0, NQ, len(tg["norm_moment"])), np.zeros(len(tg["norm_moment"]), int)], 1))
    inj = [ref_to_static(i, multi, *batch["span_mask"].shape) for i in ref_idx]
    _, terms = jax_loss(s_out, batch, cfg, multi, indices=inj)
    for suffix, layer, idx in (("", out, ref_idx[0]), ("_0", out["aux_outputs"][0], ref_idx[1])):
        want = ref_loss_spans(layer, tg, idx, multi)
        want.update(ref_loss_labels(layer, idx, multi, cfg.eos_coef))
        for k, v in want.items():
            assert_close(terms[k + suffix], v)
    _, matched = jax_loss(s_out, batch, cfg, multi)
    assert abs(matched["loss_span"] - terms["loss_span"]) > 1e-6
    with pytest.raises(JaxprvrError):
        jax_loss(s_out, batch, cfg, multi, indices=inj[:1])


@pytest.mark.parametrize("multi", [False, True])
def test_gradients_finite_and_zero_on_padding(multi):
    cfg = QVH if multi else TACOS
    out, tg = make_case(9, multi)
    s_out, batch = to_static(out, tg, multi, fill="nan")
    fields = ["pred_logits", "pred_spans", "saliency_scores", "neg_saliency_scores", "recfw_words_logit",
              "projed_video_feat", "expanded_words_feat"]
    with x64():
        inj = [np.asarray(i) for i in _match_jit(s_out, batch, cfg, multi)]

        def f(params):
            o = dict(s_out)
            o.update({k: params[k] for k in fields})
            o["aux_outputs"] = [{"pred_logits": params["aux_logits"], "pred_spans": params["aux_spans"]}]
            return M.mesm_loss(o, batch, cfg, multi_clip=multi, indices=inj)[0]

        params = {k: jnp.asarray(s_out[k]) for k in fields}
        params["aux_logits"] = jnp.asarray(s_out["aux_outputs"][0]["pred_logits"])
        params["aux_spans"] = jnp.asarray(s_out["aux_outputs"][0]["pred_spans"])
        grads = jax.jit(jax.grad(f))(params)
    bs = sum(tg["num_clips"])
    vm, wm, ewm = batch["video_mask"], s_out["words_mask"], s_out["expanded_words_mask"]
    valid = {"pred_logits": np.arange(9)[:, None, None] < bs, "saliency_scores": vm, "neg_saliency_scores": vm,
             "recfw_words_logit": wm[..., None], "projed_video_feat": vm[..., None],
             "expanded_words_feat": ewm[..., None]}
    valid["pred_spans"] = valid["aux_logits"] = valid["aux_spans"] = valid["pred_logits"]
    for k, g in grads.items():
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), k
        assert np.all(np.where(np.broadcast_to(valid[k], g.shape), 0.0, g) == 0.0), k
        assert np.any(g != 0.0), k


def test_gamma_tie_and_neg_pair_flag():
    """A same-video pair at GIoU exactly == iou_gamma is a positive (>=, not >); stable_neg_pair = softplus, equal
    to the literal form in float64 and finite where the literal form overflows in float32."""
    out, tg = make_case(4, False)
    tg["norm_moment"][0] = [0.0, 0.5]
    tg["norm_moment"][1] = [0.125, 0.5]  # nested: GIoU = IoU = 0.375 / 0.5 = 0.75 exactly
    cfg = MESMLossConfig(iou_gamma=0.75)
    s_out, batch = to_static(out, tg, False)
    with x64():
        got = jax.jit(lambda o, b: M.loss_rec_ss(
            o["projed_video_feat"], b["clip_mask"] & b["video_mask"], o["expanded_words_feat"],
            o["expanded_words_mask"], b["norm_moment"][:, 0], b["row_group"], iou_gamma=0.75))(s_out, batch)
    assert_close(got, ref_loss_rec_ss(out, tg, cfg, False))
    with pytest.raises(AssertionError):
        assert_close(got, ref_loss_rec_ss(out, tg, cfg, False, mutant="giou_gt"))

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def sal(stable, scores, neg, dtype):
        real = jnp.asarray([True, True, False])
        vm = jnp.asarray([[True, True, False]] * 3)
        return M.loss_saliency(jnp.asarray(scores, dtype), jnp.asarray(neg, dtype), vm, vm.astype(dtype), real,
                               rank_coef=12.0, stable_neg_pair=stable)

    sc = np.asarray([[0.5, -1.0, 7.0], [2.0, 0.0, 1.0], [9.0, 9.0, 9.0]])
    with x64():
        assert_close(sal(True, sc, -sc, jnp.float64), sal(False, sc, -sc, jnp.float64), rtol=1e-13)
    big = np.asarray([[0.5, 30.0, 7.0], [2.0, 0.0, 1.0], [9.0, 9.0, 9.0]])  # sigmoid(30) == 1 in float32
    assert np.isinf(float(sal(False, sc, big, jnp.float32)))
    assert np.isfinite(float(sal(True, sc, big, jnp.float32)))


# ---------------------------------------------------------------------------------------------- mutants, NaN

@pytest.mark.parametrize("mutant,key,multi", [
    ("weighted_ce", "loss_label", False),
    ("fg1", "loss_label", False),
    ("fg1", "loss_label", True),
    ("rank_pos_rows", "loss_saliency", True),
    ("mlm_only", "loss_rec_fw", False),
])  # giou_gt (">" for ">="): test_gamma_tie_and_neg_pair_flag
def test_mutants_fail(mutant, key, multi):
    cfg = QVH if multi else CHARADES
    out, tg = make_case(13, multi)
    if mutant == "rank_pos_rows":  # a row with no positive at any level changes the mean over rows
        tg["saliency_label"][2] = 0.0  # (clip_mask, used by SS-MESM, keeps the row's clips)
    s_out, batch = to_static(out, tg, multi)
    _, terms = jax_loss(s_out, batch, cfg, multi)
    total, want = ref_criterion(out, tg, cfg, multi)
    assert_close(terms[key], want[key])  # the official reference passes
    _, bad = ref_criterion(out, tg, cfg, multi, mutant=mutant)
    with pytest.raises(AssertionError):
        assert_close(terms[key], bad[key])


def test_nan_never_passes():
    with pytest.raises(AssertionError):
        assert_close(np.nan, np.nan)
    with pytest.raises(AssertionError):
        assert_close(1.0, np.nan)
    out, tg = make_case(1, False)
    s_out, batch = to_static(out, tg, False)
    s_out["saliency_scores"][0, 0] = np.nan  # a real frame of a real row
    total, terms = jax_loss(s_out, batch, CHARADES, False)
    assert math.isnan(total) and math.isnan(terms["loss_saliency"])
    with pytest.raises(AssertionError):
        assert_close(total, ref_criterion(out, tg, CHARADES, False)[0])


def test_bad_input_errors():
    out, tg = make_case(1, False)
    s_out, batch = to_static(out, tg, False)
    del batch["row_group"]
    with pytest.raises(JaxprvrError, match="row_group"):  # raised while tracing: eval_shape runs nothing
        jax.eval_shape(lambda o, b: M.mesm_loss(o, b, CHARADES, multi_clip=False), s_out, batch)
    _, batch = to_static(out, tg, False, caps=(9, 12, 7, 2))
    with pytest.raises(JaxprvrError, match="W = 2"):
        jax.eval_shape(lambda o, b: M.mesm_loss(o, b, CHARADES, multi_clip=False), s_out, batch)
    s_out, batch = to_static(*make_case(1, True), True)
    del batch["saliency_label"]
    with pytest.raises(JaxprvrError, match="saliency_label"):
        jax.eval_shape(lambda o, b: M.mesm_loss(o, b, QVH, multi_clip=True), s_out, batch)


def test_weight_dict_is_build_criterions():
    w = M.mesm_weight_dict(TACOS, n_aux=1, rec_fw=True, rec_ss=True)
    assert list(w) == ["loss_span", "loss_giou", "loss_label", "loss_saliency", "loss_span_0", "loss_giou_0",
                       "loss_label_0", "loss_rec_fw", "loss_rec_ss"]
    assert (w["loss_span"], w["loss_giou"], w["loss_label"], w["loss_saliency"]) == (10.0, 1.0, 6.0, 1.0)
    assert (w["loss_label_0"], w["loss_rec_fw"], w["loss_rec_ss"]) == (6.0, 0.1, 0.1)
    assert "loss_rec_fw" not in M.mesm_weight_dict(TACOS, n_aux=0, rec_fw=False, rec_ss=True)


# ---------------------------------------------------------------------------------------------- PyTorch twin

def _twin_inputs(out, tg, multi):
    """The official collate dict and the outputs as float64 torch tensors (what the twin's Criterion reads)."""
    import torch

    def t(x):
        return torch.as_tensor(np.asarray(x))

    outputs = {k: t(v) for k, v in out.items() if k != "aux_outputs"}
    outputs["aux_outputs"] = [{k: t(v) for k, v in a.items()} for a in out["aux_outputs"]]
    batch = {"video_mask": tg["video_mask"], "clip_mask": tg["clip_mask"], "pos_idx": tg["pos_idx"],
             "neg_idx": tg["neg_idx"], "words_label": tg["words_label"], "num_clips": np.asarray(tg["num_clips"])}
    if multi:
        batch["norm_moment"] = [{"moments": m} for m in tg["norm_moment"]]
        batch["norm_span"] = [{"spans": s} for s in tg["norm_span"]]
        batch["saliency_label"] = tg["saliency_label"]
    else:
        batch["norm_moment"], batch["norm_span"] = tg["norm_moment"], tg["norm_span"]
    return outputs, batch


@pytest.mark.parametrize("name,cfg,multi,dup", [("tacos", TACOS, False, False), ("tacos", TACOS, False, True),
                                                ("qvh", QVH, True, False), ("qvh", QVH, True, True)])
def test_against_torch_twin(name, cfg, multi, dup):
    """Every term and the total against torch_ref.mesm_loss.Criterion (float64, GIoU in float64 through
    ``giou_float32=False``; the official float32 cast is the twin's default) on the same batch and outputs: the
    twin on the official dynamic batch, JAX on the static one. The matchings agree index for index."""
    import torch

    from jaxprvr.config import MESMConfig

    from torch_ref.mesm_loss import build_criterion

    out, tg = make_case({"charades": 31, "tacos": 32, "qvh": 33}[name] + 10 * dup, multi, dup_queries=dup)
    s_out, batch = to_static(out, tg, multi)
    _, terms = jax_loss(s_out, batch, cfg, multi)
    crit = build_criterion(MESMConfig(), cfg, dataset_name="qvhighlights" if multi else "charades",
                           giou_float32=False)
    t_out, t_batch = _twin_inputs(out, tg, multi)
    with torch.no_grad():
        t_terms, t_total = crit(t_out, t_batch, is_training=True)
    assert set(t_terms) == set(terms), (sorted(t_terms), sorted(terms))
    for k, v in t_terms.items():
        assert_close(terms[k], float(v)), k
    total, _ = jax_loss(s_out, batch, cfg, multi)
    assert_close(total, float(t_total))
    with x64():
        got = [np.array(i) for i in _match_jit(s_out, batch, cfg, multi)]
    for g, t_idx in zip(got, [crit.last_indices["main"]] + crit.last_indices["aux"]):
        if multi:
            t_idx = [(np.asarray(i), np.asarray(j)) for i, j in t_idx]
        np.testing.assert_array_equal(g, ref_to_static(np.asarray(t_idx) if not multi else t_idx, multi, *g.shape))
    # the twin with the JAX matchings injected gives the same terms (the injection paths agree)
    bs = sum(tg["num_clips"])
    if multi:  # (R, W) -> per row (queries, windows); their order is irrelevant to the losses
        inj = [[(r[r >= 0].copy(), np.flatnonzero(r >= 0)) for r in g[:bs]] for g in got]
    else:
        inj = [g[:bs, 0].copy() for g in got]
    with torch.no_grad():
        t2, _ = crit(t_out, t_batch, is_training=True, indices=inj[0], aux_indices=inj[1:])
    for k, v in t2.items():
        assert_close(terms[k], float(v)), k
    if dup:
        return
    # Mutant: the twin's default, the official float32 cast inside generalized_temporal_iou, is seen at 1e-10.
    crit32 = build_criterion(MESMConfig(), cfg, dataset_name="qvhighlights" if multi else "charades")
    with torch.no_grad():
        t32, _ = crit32(t_out, t_batch, is_training=True)
    with pytest.raises(AssertionError):
        assert_close(terms["loss_giou"], float(t32["loss_giou"]))
    # The training dtype: JAX in float32 against the official float32 run (GIoU cast included), rtol 1e-5.
    f32_out = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32) if x.dtype == np.float64 else x, s_out)
    total32, terms32 = _loss_jit(f32_out, batch, cfg, multi_clip=multi,
                                 indices=_match_jit(f32_out, batch, cfg, multi))  # x64 off: float32 throughout
    t_out32 = jax.tree_util.tree_map(lambda x: x.float() if x.dtype == torch.float64 else x, t_out)
    with torch.no_grad():
        t_terms32, t_total32 = crit32(t_out32, t_batch, is_training=True)
    assert terms32["loss_label"].dtype == jnp.float32
    for k, v in t_terms32.items():
        assert_close(terms32[k], float(v), rtol=1e-5, atol=1e-6), k
    assert_close(total32, float(t_total32), rtol=1e-5)


def test_one_host_callback_for_all_layers(monkeypatch):
    """QVH: the Hungarian problems of both decoder layers go to the host in ONE callback, same result."""
    from jaxprvr.ops import matching

    calls = []
    real_fn = matching.host_batched_assignment

    def counting(*args):
        calls.append(args[0].shape)
        return real_fn(*args)

    monkeypatch.setattr(matching, "host_batched_assignment", counting)
    out, tg = make_case(3, True)
    s_out, batch = to_static(out, tg, True)
    with x64():
        # a new function object: a fresh trace (jit reuses traces of M.match_all itself, callbacks included)
        got = jax.jit(lambda o, b: M.match_all(o, b, QVH, True))(s_out, batch)
    assert len(calls) == 1 and calls[0][:2] == (2, 9), calls  # (layers, R, W, Q)
    for g, layer in zip(got, [out] + out["aux_outputs"]):
        np.testing.assert_array_equal(g, ref_to_static(ref_matcher(layer, tg, True, QVH), True, *g.shape))
