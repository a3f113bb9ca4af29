"""PRVR losses against loop-based numpy transcriptions of the official PyTorch code.

References (written here from the official code, unpadded, one Python loop per video/query):
ms-sl ``method/model_components.py`` (clip_nce, frame_nce) and ``method/model.py`` (triplets);
GMMFormer(_v2) ``src/Losses/loss.py`` (QDL v1/v2) and GMMFormer_v2 ``src/Models/gmmformerV2/model.py``
(optimal matching loss). The sampled negatives are injected, so the comparison is exact.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxprvr.config import GMMFormerLossConfig, GMMFormerV2LossConfig
from jaxprvr.errors import JaxprvrError
from jaxprvr.losses import prvr as L

RTOL, ATOL = 1e-5, 1e-6
COUNTS = [3, 1, 2, 4, 2]  # queries per video (contiguous), one single-query video
D = 8
N_CLIPS = 32


# ----------------------------------------------------------------------------------------------------
# Official code, transcribed to numpy (unpadded)
# ----------------------------------------------------------------------------------------------------

def _lse(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def _label_dict(labels):
    d = {}
    for index, label in enumerate(labels):
        d.setdefault(int(label), []).append(index)
    return d


def ref_clip_nce(s, labels):
    n_q, n_v = s.shape
    t2v_nom = np.array([s[i, labels[i]] for i in range(n_q)])
    t2v_den = np.array([_lse(s[i]) for i in range(n_q)])
    v2t_nom = np.zeros(n_v)
    v2t_den = np.zeros(n_v)
    for i, lab in _label_dict(labels).items():
        v2t_nom[i] = _lse(s[lab, i])
        v2t_den[i] = _lse(s[:, i])
    return np.mean(t2v_den - t2v_nom) + np.mean(v2t_den - v2t_nom)


def ref_frame_nce(x):
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        total += _lse(np.concatenate([x[i, :], x[:, i]])) - x[i, i]
    return total / n


def ref_clip_trip(s, labels, margin, t2v_neg, v2t_neg):
    labels = np.asarray(labels)
    v2t = s.T
    v2t_loss = 0.0
    for i in range(v2t.shape[0]):
        pos = np.mean(v2t[i][np.where(labels == i)])
        assert labels[v2t_neg[i]] != i
        v2t_loss += max(margin + v2t[i][v2t_neg[i]] - pos, 0.0)
    t2v_loss = 0.0
    for i in range(s.shape[0]):
        assert t2v_neg[i] != labels[i]
        t2v_loss += max(margin + s[i, t2v_neg[i]] - s[i, labels[i]], 0.0)
    return t2v_loss / s.shape[0] + v2t_loss / v2t.shape[0]


def ref_frame_trip(s, margin, row_neg, col_neg):
    n = s.shape[0]
    ctx = sum(max(margin + s[i, row_neg[i]] - s[i, i], 0.0) for i in range(n)) / n
    qry = sum(max(margin + s.T[i, col_neg[i]] - s[i, i], 0.0) for i in range(n)) / n
    return ctx + qry


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _block_mask(labels):
    bs = len(labels)
    n = np.zeros((bs, bs))
    for _, lab in _label_dict(labels).items():
        n[lab[0]:lab[-1] + 1, lab[0]:lab[-1] + 1] = 1.0
    return n - np.eye(bs)


def ref_qdl1(q, labels, mrg, alpha):
    x = _normalize(np.asarray(q, np.float64))
    cos = x @ x.T
    nm = _block_mask(labels)
    neg_exp = np.exp(alpha * (cos + mrg))
    col = np.where(nm == 1, neg_exp, 0.0).sum(0)
    return np.log(1 + col).sum() / len(labels)


def ref_qdl2(q, labels, mrg, alpha, lam):
    x = _normalize(np.asarray(q, np.float64))
    cos = x @ x.T
    nm = _block_mask(labels)
    neg_exp = np.exp(alpha * (cos + mrg))
    sim = np.where(nm == 1, neg_exp, 0.0)
    focal = np.where(nm == 1, cos, 0.0)
    return (((1 + focal) ** lam) * np.log(1 + sim)).sum(0).sum() / len(labels)


def ref_ot(clip_feats, q, labels):
    total = []
    for k, v in _label_dict(labels).items():
        if len(v) == 1:
            continue
        sim = -(_normalize(clip_feats[k]) @ _normalize(q[v]).T).T  # (n_q, n_clips)
        qi, ci = linear_sum_assignment(sim)
        total += [sim[qi[i], ci[i]] for i in range(len(qi))]
    return 1 + np.mean(total)


# ----------------------------------------------------------------------------------------------------
# Data: an unpadded batch and the same batch padded (padding interleaved, garbage values)
# ----------------------------------------------------------------------------------------------------

def _unpadded(seed, counts=COUNTS, ms_sl=False):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    n_q, n_v = len(labels), len(counts)
    f_shape = (n_q, n_q) if ms_sl else (n_q, n_v)
    scores = dict(clip=rng.uniform(-1, 1, (n_q, n_v)), clip_raw=rng.normal(0, 3, (n_q, n_v)),
                  frame=rng.uniform(-1, 1, f_shape), frame_raw=rng.normal(0, 3, f_shape))
    aux = dict(query2=rng.normal(size=(n_q, D)), clip_feats=rng.normal(size=(n_v, N_CLIPS, D)))
    f32 = lambda t: {k: v.astype(np.float32) for k, v in t.items()}
    return f32(scores), f32(aux), labels


def _negatives(seed, s_clip, s_frame, labels, ms_sl):
    """Random valid negatives for the unpadded batch (what any sampler could return)."""
    rng = np.random.default_rng(seed)
    n_q, n_v = s_clip.shape
    t2v = lambda: np.array([rng.choice([v for v in range(n_v) if v != labels[i]]) for i in range(n_q)])
    v2t = lambda: np.array([rng.choice(np.flatnonzero(labels != v)) for v in range(n_v)])
    sq = lambda: np.array([rng.choice([j for j in range(n_q) if j != i]) for i in range(n_q)])
    if ms_sl:
        return dict(clip_t2v=t2v(), clip_v2t=v2t(), frame_row=sq(), frame_col=sq())
    return dict(clip_t2v=t2v(), clip_v2t=v2t(), frame_t2v=t2v(), frame_v2t=v2t())


def _pad(seed, scores, aux, labels, negs, ms_sl):
    """Embeds the batch into larger static shapes: padded video slots between real ones, padded query
    slots between the (contiguous) query groups and at the end, finite garbage everywhere else."""
    rng = np.random.default_rng(seed + 100)
    n_q, n_v = scores["clip"].shape
    vid_pos = np.array([0, 2, 3, 5, 6])[:n_v]  # padded video slots at 1, 4, 7
    n_vp = 8
    groups = [np.flatnonzero(labels == v) for v in range(n_v)]
    q_pos, cur = np.zeros(n_q, int), 0
    for gi, g in enumerate(groups):
        q_pos[g] = cur + np.arange(len(g))
        cur += len(g) + (1 if gi % 2 == 0 else 0)  # a padded query slot after some groups
    n_qp = cur + 2
    qv = np.zeros(n_qp, np.float32); qv[q_pos] = 1
    vv = np.zeros(n_vp, np.float32); vv[vid_pos] = 1
    lab = np.zeros(n_qp, np.int32); lab[q_pos] = vid_pos[labels]

    def emb(x, rows, cols):  # rows are always query slots; columns video or query slots
        big = rng.normal(0, 5, (n_qp, n_qp if cols is q_pos else n_vp)).astype(np.float32)
        big[np.ix_(rows, cols)] = x
        return big

    ps = dict(clip=emb(scores["clip"], q_pos, vid_pos), clip_raw=emb(scores["clip_raw"], q_pos, vid_pos))
    fcols = q_pos if ms_sl else vid_pos
    ps["frame"] = emb(scores["frame"], q_pos, fcols)
    ps["frame_raw"] = emb(scores["frame_raw"], q_pos, fcols)
    q2 = rng.normal(0, 5, (n_qp, D)).astype(np.float32); q2[q_pos] = aux["query2"]
    cf = rng.normal(0, 5, (n_vp, N_CLIPS, D)).astype(np.float32); cf[vid_pos] = aux["clip_feats"]
    pa = dict(query2=q2, clip_feats=cf)
    pn = {}
    for k, v in negs.items():
        if k.endswith("t2v"):
            out = np.zeros(n_qp, np.int32); out[q_pos] = vid_pos[v]
        elif k.endswith("v2t"):
            out = np.zeros(n_vp, np.int32); out[vid_pos] = q_pos[v]
        else:
            out = np.zeros(n_qp, np.int32); out[q_pos] = q_pos[v]
        pn[k] = out
    batch = dict(query_labels=lab, query_valid=qv, video_valid=vv)
    return ps, pa, batch, pn, q_pos, vid_pos


def _batch(labels):
    return dict(query_labels=labels.astype(np.int32), query_valid=np.ones(len(labels), np.float32),
                video_valid=np.ones(int(labels.max()) + 1, np.float32))


CFG = GMMFormerV2LossConfig(margin=0.1, w_clip_nce=0.05, w_frame_nce=0.04, w_qdl=8e-3, w_ot=0.09, qdl_margin=0.15,
                            qdl_alpha=32.0, qdl_lambda=1.0, hard_pool_size=2)


def _factors(cfg):
    """The official positional ``loss_factor`` / ``neg_factor`` lists of a named loss config."""
    return ((cfg.w_clip_nce, cfg.w_frame_nce, cfg.w_qdl, cfg.w_ot), (cfg.qdl_margin, cfg.qdl_alpha, cfg.qdl_lambda))


def _ref_total(model, scores, aux, labels, negs, cfg):
    m = cfg.margin
    lf, nf = _factors(cfg)
    if model == "ms_sl":
        return (0.02 * ref_clip_nce(scores["clip_raw"], labels)
                + ref_clip_trip(scores["clip"], labels, m, negs["clip_t2v"], negs["clip_v2t"])
                + 0.04 * ref_frame_nce(scores["frame_raw"])
                + ref_frame_trip(scores["frame"], m, negs["frame_row"], negs["frame_col"]))
    out = (lf[0] * ref_clip_nce(scores["clip_raw"], labels)
           + ref_clip_trip(scores["clip"], labels, m, negs["clip_t2v"], negs["clip_v2t"])
           + lf[1] * ref_clip_nce(scores["frame_raw"], labels)
           + ref_clip_trip(scores["frame"], labels, m, negs["frame_t2v"], negs["frame_v2t"]))
    if model == "gmmformer":
        return out + lf[2] * ref_qdl1(aux["query2"], labels, nf[0], nf[1])
    return (out + lf[2] * ref_qdl2(aux["query2"], labels, nf[0], nf[1], nf[2])
            + lf[3] * ref_ot(aux["clip_feats"], aux["query2"], labels))


# ----------------------------------------------------------------------------------------------------
# Building blocks against the references
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_building_blocks_match_official(seed):
    scores, aux, labels = _unpadded(seed)
    _, aux_ms, _ = _unpadded(seed, ms_sl=True)
    sq_scores, _, _ = _unpadded(seed + 7, ms_sl=True)
    b = _batch(labels)
    lab, qv, vv = b["query_labels"], b["query_valid"], b["video_valid"]
    np.testing.assert_allclose(L.clip_nce(scores["clip_raw"], lab, qv, vv),
                               ref_clip_nce(scores["clip_raw"], labels), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(L.frame_nce(sq_scores["frame_raw"], qv), ref_frame_nce(sq_scores["frame_raw"]),
                               rtol=RTOL, atol=ATOL)
    negs = _negatives(seed, scores["clip"], None, labels, ms_sl=False)
    got = L.clip_triplet_loss(scores["clip"], lab, qv, vv, margin=0.2, t2v_negatives=negs["clip_t2v"],
                              v2t_negatives=negs["clip_v2t"])
    np.testing.assert_allclose(got, ref_clip_trip(scores["clip"], labels, 0.2, negs["clip_t2v"], negs["clip_v2t"]),
                               rtol=RTOL, atol=ATOL)
    sqn = _negatives(seed, scores["clip"], None, labels, ms_sl=True)
    got = L.frame_triplet_loss(sq_scores["frame"], qv, margin=0.2, row_negatives=sqn["frame_row"],
                               col_negatives=sqn["frame_col"])
    np.testing.assert_allclose(got, ref_frame_trip(sq_scores["frame"], 0.2, sqn["frame_row"], sqn["frame_col"]),
                               rtol=RTOL, atol=ATOL)
    q = aux["query2"]
    np.testing.assert_allclose(L.query_diverse_loss_v1(q, lab, qv, margin=0.15, alpha=32.0),
                               ref_qdl1(q, labels, 0.15, 32.0), rtol=1e-4, atol=ATOL)
    for lam in (1.0, 0.5, 2.0):
        np.testing.assert_allclose(L.query_diverse_loss_v2(q, lab, qv, margin=0.2, alpha=32.0, lam=lam),
                                   ref_qdl2(q, labels, 0.2, 32.0, lam), rtol=1e-4, atol=ATOL)
    np.testing.assert_allclose(L.optimal_matching_loss(aux["clip_feats"], q, lab, qv, vv),
                               ref_ot(aux["clip_feats"], q, labels), rtol=RTOL, atol=ATOL)


def test_triplet_margin_actually_binds():
    """The clamp matters in the data above (else the reference comparison would be a linear check)."""
    scores, _, labels = _unpadded(0)
    s = scores["clip"]
    diffs = [0.1 + s[i, j] - s[i, labels[i]] for i in range(len(labels)) for j in range(s.shape[1])]
    assert min(diffs) < 0 < max(diffs)


def test_optimal_matching_more_queries_than_clips():
    """A video with more queries than clips: scipy assigns only n_clips of them (rectangular)."""
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], [5, 2]).astype(np.int32)
    clips = rng.normal(size=(2, 3, D)).astype(np.float32)
    q = rng.normal(size=(7, D)).astype(np.float32)
    b = _batch(labels)
    got = L.optimal_matching_loss(clips, q, labels, b["query_valid"], b["video_valid"])
    np.testing.assert_allclose(got, ref_ot(clips, q, labels), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------------
# total_loss: official value, padding invariance, gradients
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["ms_sl", "gmmformer", "gmmformer_v2"])
def test_total_loss_padded_matches_official_unpadded(model):
    ms = model == "ms_sl"
    scores, aux, labels = _unpadded(11, ms_sl=ms)
    negs = _negatives(5, scores["clip"], scores["frame"], labels, ms)
    want = _ref_total(model, scores, aux, labels, negs, CFG)
    ps, pa, pb, pn, q_pos, v_pos = _pad(11, scores, aux, labels, negs, ms)

    @jax.jit
    def value_and_grads(s, a, b, n):
        fn = lambda s_, a_: L.total_loss(model, s_, a_, b, CFG, None, hard=True, negatives=n)
        return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(s, a)

    (loss_u, terms_u), (gu_s, gu_a) = value_and_grads(scores, aux, _batch(labels),
                                                      {k: jnp.asarray(v, jnp.int32) for k, v in negs.items()})
    (loss_p, terms_p), (gp_s, gp_a) = value_and_grads(ps, pa, pb, pn)
    np.testing.assert_allclose(loss_u, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(loss_p, want, rtol=RTOL, atol=ATOL)
    expected_terms = {"clip_nce", "clip_trip", "frame_nce", "frame_trip"}
    expected_terms |= {"qdl"} if model == "gmmformer" else {"qdl", "ot"} if model == "gmmformer_v2" else set()
    assert set(terms_p) == expected_terms
    np.testing.assert_allclose(sum(float(v) for v in terms_p.values()), float(loss_p), rtol=1e-6)
    for k in terms_u:
        np.testing.assert_allclose(terms_p[k], terms_u[k], rtol=RTOL, atol=ATOL)

    # Gradients: the same on the valid entries, exactly zero on the padded ones.
    for k in scores:
        cols = q_pos if (ms and k.startswith("frame")) else v_pos
        sub = np.asarray(gp_s[k])[np.ix_(q_pos, cols)]
        np.testing.assert_allclose(sub, gu_s[k], rtol=1e-4, atol=1e-7)
        full = np.asarray(gp_s[k]).copy()
        full[np.ix_(q_pos, cols)] = 0
        assert np.all(full == 0), k
        assert np.any(np.asarray(gu_s[k]) != 0), k
    np.testing.assert_allclose(np.asarray(gp_a["query2"])[q_pos], gu_a["query2"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gp_a["clip_feats"])[v_pos], gu_a["clip_feats"], rtol=1e-4, atol=1e-7)
    assert np.all(np.delete(np.asarray(gp_a["query2"]), q_pos, axis=0) == 0)
    assert np.all(np.delete(np.asarray(gp_a["clip_feats"]), v_pos, axis=0) == 0)


@pytest.mark.parametrize("model,hard", [("ms_sl", False), ("ms_sl", True), ("gmmformer", True),
                                        ("gmmformer_v2", False)])
def test_total_loss_sampled_is_jittable_with_finite_grads(model, hard):
    ms = model == "ms_sl"
    scores, aux, labels = _unpadded(2, ms_sl=ms)
    negs = _negatives(0, scores["clip"], scores["frame"], labels, ms)
    ps, pa, pb, _, _, _ = _pad(2, scores, aux, labels, negs, ms)
    f = jax.jit(partial(L.total_loss, model, cfg=CFG), static_argnames=("hard",))
    (loss, terms), g = jax.value_and_grad(lambda s, a: f(s, a, pb, key=jax.random.key(4), hard=hard),
                                          argnums=(0, 1), has_aux=True)(ps, pa)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(g))
    # The sampled loss equals the loss with the same negatives injected.
    negs_drawn = L.sample_negatives(model, ps, pb, jax.random.key(4), hard=hard, hard_pool_size=CFG.hard_pool_size)
    assert set(negs_drawn) == set(L.negative_keys(model))
    loss_inj, _ = f(ps, pa, pb, key=jax.random.key(99), hard=hard, negatives=negs_drawn)
    np.testing.assert_allclose(loss, loss_inj, rtol=1e-6)


def test_unknown_model_and_short_factors_raise():
    scores, aux, labels = _unpadded(0)
    with pytest.raises(JaxprvrError):
        L.total_loss("msl", scores, aux, _batch(labels), CFG, jax.random.key(0), hard=False)
    cfg = GMMFormerLossConfig(w_clip_nce=0.05, w_frame_nce=0.04, w_qdl=8e-5)  # no w_ot / qdl_lambda for v2
    with pytest.raises(JaxprvrError, match="GMMFormerV2LossConfig"):
        L.total_loss("gmmformer_v2", scores, aux, _batch(labels), cfg, jax.random.key(0), hard=False)
    negs = _negatives(0, scores["clip"], scores["frame"], labels, False)
    del negs["frame_v2t"]
    with pytest.raises(JaxprvrError, match="frame_v2t"):
        L.total_loss("gmmformer", scores, aux, _batch(labels), CFG, None, hard=False, negatives=negs)


def test_ms_sl_weights_are_hard_coded():
    scores, aux, labels = _unpadded(3, ms_sl=True)
    negs = {k: jnp.asarray(v) for k, v in _negatives(1, scores["clip"], None, labels, True).items()}
    b = _batch(labels)
    a, ta = L.total_loss("ms_sl", scores, aux, b, CFG, None, hard=False, negatives=negs)
    c, tc = L.total_loss("ms_sl", scores, aux, b, dataclasses.replace(CFG, w_clip_nce=9.0, w_frame_nce=9.0), None,
                         hard=False, negatives=negs)
    np.testing.assert_allclose(a, c)
    np.testing.assert_allclose(ta["clip_nce"], 0.02 * ref_clip_nce(scores["clip_raw"], labels), rtol=RTOL)


# ----------------------------------------------------------------------------------------------------
# Optimal matching loss guard and gradient
# ----------------------------------------------------------------------------------------------------

def test_ot_guard_no_video_with_two_queries():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0], np.int32)
    qv = np.array([1, 1, 1, 0], np.float32)  # the second query of video 0 is padding
    vv = np.ones(3, np.float32)
    clips = jnp.asarray(rng.normal(size=(3, N_CLIPS, D)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
    f = jax.jit(lambda c, q_: L.optimal_matching_loss(c, q_, labels, qv, vv))
    val, (gc, gq) = jax.value_and_grad(f, argnums=(0, 1))(clips, q)
    assert float(val) == 1.0
    assert np.all(np.asarray(gc) == 0) and np.all(np.asarray(gq) == 0)


def test_ot_gradient_flows_only_through_matched_entries():
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 0, 1], np.int32)
    b = _batch(labels)
    clips = rng.normal(size=(2, 5, D)).astype(np.float32)
    q = rng.normal(size=(4, D)).astype(np.float32)
    cost = np.asarray(L.optimal_matching_cost(clips, q, labels))
    rows, cols = linear_sum_assignment(cost[:3])
    # d loss / d cost = 1/3 at the matched entries, found by differentiating through the cost.
    g = jax.grad(lambda c: 1.0 + jnp.sum(c[rows, cols]) / 3.0)(jnp.asarray(cost))
    want_q = jax.grad(lambda q_: jnp.sum(L.optimal_matching_cost(clips, q_, labels)[rows, cols]) / 3.0)(q)
    got_q = jax.grad(lambda q_: L.optimal_matching_loss(clips, q_, labels, b["query_valid"], b["video_valid"]))(q)
    np.testing.assert_allclose(got_q, want_q, rtol=1e-5, atol=1e-7)
    injected = np.full(4, -1, np.int32)
    injected[rows] = cols
    np.testing.assert_allclose(
        L.optimal_matching_loss(clips, q, labels, b["query_valid"], b["video_valid"], assignment=injected),
        1.0 + cost[rows, cols].mean(), rtol=1e-6)
    assert np.count_nonzero(np.asarray(g)) == 3
    assert np.all(np.asarray(got_q)[3] == 0)  # the single-query video takes no part


def _numeric_grad(fn, x, h=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (fn(xp) - fn(xm)) / (2 * h)
    return g


def test_qdl_and_ot_gradients_against_finite_differences_of_official():
    """Gradients of QDL v1/v2 (focal factor not detached) and L_OT vs central differences of the refs."""
    _, aux, labels = _unpadded(6)
    b = _batch(labels)
    lab, qv, vv = b["query_labels"], b["query_valid"], b["video_valid"]
    q = aux["query2"] * 0.3  # moderate cosines so that the QDL pairs do not saturate
    clips = aux["clip_feats"][:, :6]
    cases = [
        (lambda x: L.query_diverse_loss_v1(x, lab, qv, margin=0.15, alpha=32.0),
         lambda x: ref_qdl1(x, labels, 0.15, 32.0), q),
        (lambda x: L.query_diverse_loss_v2(x, lab, qv, margin=0.2, alpha=32.0, lam=1.0),
         lambda x: ref_qdl2(x, labels, 0.2, 32.0, 1.0), q),
        (lambda x: L.optimal_matching_loss(clips, x, lab, qv, vv), lambda x: ref_ot(clips, x, labels), q),
        (lambda c: L.optimal_matching_loss(c, q, lab, qv, vv), lambda c: ref_ot(c, q, labels), clips),
    ]
    for jfn, rfn, x in cases:
        got = np.asarray(jax.grad(jfn)(jnp.asarray(x, jnp.float32)))
        want = _numeric_grad(rfn, x)
        scale = np.abs(want).max()
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * scale)


# ----------------------------------------------------------------------------------------------------
# Negative sampling pools
# ----------------------------------------------------------------------------------------------------

N_KEYS = 400


def _draws(fn, *args, **kw):
    keys = jax.random.split(jax.random.key(1234), N_KEYS)
    return np.asarray(jax.vmap(lambda k: fn(k, *args, **kw))(keys))  # (N_KEYS, rows)


def _padded_case():
    scores, aux, labels = _unpadded(21)
    negs = _negatives(0, scores["clip"], scores["frame"], labels, False)
    ps, pa, pb, _, q_pos, v_pos = _pad(21, scores, aux, labels, negs, False)
    return ps, pb, q_pos, v_pos


def test_t2v_uniform_and_hard_pools():
    ps, pb, q_pos, v_pos = _padded_case()
    s = ps["clip"]
    lab, qv, vv = pb["query_labels"], pb["query_valid"], pb["video_valid"]
    for hard, pool in ((False, 2), (True, 2), (True, 1), (True, 50)):
        d = _draws(L.sample_t2v_negatives, s, lab, qv, vv, hard=hard, pool_size=pool)
        for i in q_pos:
            others = [v for v in v_pos if v != lab[i]]
            if hard:
                allowed = sorted(sorted(others, key=lambda v: -s[i, v])[:pool])
            else:
                allowed = sorted(others)
            got, counts = np.unique(d[:, i], return_counts=True)
            assert list(got) == allowed, (hard, pool, i)
            # roughly uniform over the pool (expected N_KEYS/len, generous bounds)
            assert counts.min() > 0.5 * N_KEYS / len(allowed) and counts.max() < 1.5 * N_KEYS / len(allowed)


def test_v2t_uniform_and_hardest():
    ps, pb, q_pos, v_pos = _padded_case()
    s = ps["frame"]
    lab, qv, vv = pb["query_labels"], pb["query_valid"], pb["video_valid"]
    d_unif = _draws(L.sample_v2t_negatives, s, lab, qv, vv, hard=False)
    d_hard = _draws(L.sample_v2t_negatives, s, lab, qv, vv, hard=True)
    d_pool = _draws(L.sample_v2t_negatives, s, lab, qv, vv, hard=True, pool_size=3)
    for v in v_pos:
        others = [i for i in q_pos if lab[i] != v]
        assert sorted(np.unique(d_unif[:, v])) == others
        hardest = max(others, key=lambda i: s[i, v])
        assert np.all(d_hard[:, v] == hardest)
        assert sorted(np.unique(d_pool[:, v])) == sorted(sorted(others, key=lambda i: -s[i, v])[:3])


def test_square_negatives_rows_and_columns():
    scores, aux, labels = _unpadded(8, ms_sl=True)
    negs = _negatives(0, scores["clip"], scores["frame"], labels, True)
    ps, _, pb, _, q_pos, _ = _pad(8, scores, aux, labels, negs, True)
    s, qv = ps["frame"], pb["query_valid"]
    for t, mat in (("row", s), ("col", s.T)):
        for hard, pool in ((False, 3), (True, 3)):
            d = _draws(L.sample_square_negatives, mat, qv, hard=hard, pool_size=pool)
            for i in q_pos:
                others = [j for j in q_pos if j != i]
                allowed = sorted(sorted(others, key=lambda j: -mat[i, j])[:pool]) if hard else others
                assert sorted(np.unique(d[:, i])) == allowed, (t, hard, i)


def test_negatives_distinguish_hard_from_uniform_in_total_loss():
    """``hard`` changes the drawn negatives (t2v pool, v2t hardest) for the same key."""
    ps, pb, _, _ = _padded_case()
    a = L.sample_negatives("gmmformer", ps, pb, jax.random.key(3), hard=False, hard_pool_size=2)
    b = L.sample_negatives("gmmformer", ps, pb, jax.random.key(3), hard=True, hard_pool_size=2)
    assert any(np.any(np.asarray(a[k]) != np.asarray(b[k])) for k in a)
    assert {k: np.asarray(v).shape for k, v in b.items()} == {
        "clip_t2v": (len(pb["query_valid"]),), "clip_v2t": (len(pb["video_valid"]),),
        "frame_t2v": (len(pb["query_valid"]),), "frame_v2t": (len(pb["video_valid"]),)}


def test_traced_hard_flag_selects_the_static_draws():
    """A traced ``hard`` (one compiled training step for both phases) gives exactly the static draws."""
    ps, pb, _, _ = _padded_case()
    for model in ("gmmformer", "ms_sl"):
        scores = ps if model == "gmmformer" else {**ps, "frame": ps["clip"] @ ps["clip"].T}
        traced = jax.jit(lambda h, s=scores, m=model: L.sample_negatives(m, s, pb, jax.random.key(5), hard=h,
                                                                          hard_pool_size=2))
        for hard in (False, True):
            want = L.sample_negatives(model, scores, pb, jax.random.key(5), hard=hard, hard_pool_size=2)
            got = traced(jnp.asarray(hard))
            for k in want:
                np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=f"{model} {k} {hard}")


# ----------------------------------------------------------------------------------------------------
# Optional: the official loss code transcribed in torch (autograd gradients)
# ----------------------------------------------------------------------------------------------------

def test_gmmformer_v2_value_and_grads_against_torch_transcription():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    scores, aux, labels = _unpadded(4)
    negs = _negatives(2, scores["clip"], scores["frame"], labels, False)
    cfg = CFG
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in {**scores, **aux}.items()}
    label_dict = _label_dict(labels)

    def clip_nce_t(s):
        nq, nv = s.shape
        t2v_nom = s[torch.arange(nq), torch.as_tensor(labels, dtype=torch.long)]
        t2v_den = torch.logsumexp(s, dim=1)
        v2t_nom = torch.zeros(nv, dtype=s.dtype)
        v2t_den = torch.zeros(nv, dtype=s.dtype)
        for i, lab in label_dict.items():
            v2t_nom[i] = torch.logsumexp(s[lab, i], dim=0)
            v2t_den[i] = torch.logsumexp(s[:, i], dim=0)
        return torch.mean(t2v_den - t2v_nom) + torch.mean(v2t_den - v2t_nom)

    def trip_t(s, t2v_neg, v2t_neg):
        lab = np.asarray(labels)
        v2t = s.t()
        v2t_loss = 0
        for i in range(v2t.shape[0]):
            pos = torch.mean(v2t[i][np.where(lab == i)])
            v2t_loss += (cfg.margin + v2t[i][int(v2t_neg[i])] - pos).clamp(min=0).sum()
        idx = torch.arange(s.shape[0])
        t2v = (cfg.margin + s[idx, torch.as_tensor(t2v_neg)] - s[idx, torch.as_tensor(lab, dtype=torch.long)]).clamp(min=0)
        return t2v.sum() / len(s) + v2t_loss / len(v2t)

    def qdl2_t(x):
        bs = x.shape[0]
        x = F.normalize(x, dim=-1)
        cos = x @ x.t()
        nm = torch.as_tensor(_block_mask(labels))
        neg_exp = torch.exp(cfg.qdl_alpha * (cos + cfg.qdl_margin))
        sim = torch.where(nm == 1, neg_exp, torch.zeros_like(neg_exp))
        focal = torch.where(nm == 1, cos, torch.zeros_like(cos))
        return (((1 + focal) ** cfg.qdl_lambda) * torch.log(1 + sim)).sum(dim=0).sum() / bs

    def ot_t(clips, q):
        total = []
        for k, v in label_dict.items():
            if len(v) == 1:
                continue
            sim = -1.0 * (F.normalize(clips[k], dim=-1) @ F.normalize(q[v], dim=-1).t()).permute(1, 0)
            qi, ci = linear_sum_assignment(sim.detach().cpu())
            total += [sim[qi[i], ci[i]] for i in range(len(qi))]
        return 1 + torch.stack(total).mean()

    lf = _factors(cfg)[0]
    loss_t = (lf[0] * clip_nce_t(t["clip_raw"]) + trip_t(t["clip"], negs["clip_t2v"], negs["clip_v2t"])
              + lf[1] * clip_nce_t(t["frame_raw"]) + trip_t(t["frame"], negs["frame_t2v"], negs["frame_v2t"])
              + lf[2] * qdl2_t(t["query2"]) + lf[3] * ot_t(t["clip_feats"], t["query2"]))
    loss_t.backward()

    def f(s, a):
        return L.total_loss("gmmformer_v2", s, a, _batch(labels), cfg, None, hard=False,
                            negatives={k: jnp.asarray(v) for k, v in negs.items()})[0]

    val, (gs, ga) = jax.value_and_grad(f, argnums=(0, 1))(scores, aux)
    np.testing.assert_allclose(val, loss_t.item(), rtol=RTOL, atol=ATOL)
    for k in scores:
        np.testing.assert_allclose(gs[k], t[k].grad.numpy(), rtol=1e-4, atol=1e-6)
    for k in aux:
        np.testing.assert_allclose(ga[k], t[k].grad.numpy(), rtol=1e-4, atol=1e-6)
