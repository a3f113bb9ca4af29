"""MTM's losses and EMA against numpy transcriptions of the official code (tianxinlin666/MTM).

References written here from ``src/Losses/loss.py`` (the triplet with its hard pool in both directions and its
empty-set guards, the reconstruction losses, the weighted total) and ``src/Opts/optimization.py`` (``EMA``),
unpadded, one Python loop per video/query. Negatives are injected, so the comparisons are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprvr.config import MTMLossConfig
from jaxprvr.losses import prvr as L
from jaxprvr.optim import EmaState, bert_adam, ema_decay_at, ema_update, eval_params, with_ema
from tests.test_losses_prvr import (ATOL, COUNTS, RTOL, _batch, _normalize, ref_clip_nce, ref_ot, ref_qdl2,
                                    _unpadded)

CFG = MTMLossConfig(margin=0.2, w_clip_nce=0.05, w_frame_nce=0.04, w_qdl=7e-3, w_ot=0.09, w_video_nce=0.015,
                    qdl_margin=0.15, qdl_alpha=32.0, qdl_lambda=1.0, w_clip_trip=1.0, w_frame_trip=0.5,
                    w_video_trip=2.0, w_recon=0.4, hard_pool_size=2)
LQ, DQ, LV, DV = 5, 6, 7, 4  # reconstruction shapes (tokens x dim, frames x dim)


def ref_mtm_trip(s, labels, margin, t2v_neg, v2t_neg):
    """``get_clip_triplet_loss`` of MTM ``loss.py:107-164`` with the draws given (-1: the official empty-set
    branches, where the negative is the positive itself)."""
    labels = np.asarray(labels)
    v2t = s.T
    v2t_loss = 0.0
    for i in range(v2t.shape[0]):
        pos_idx = np.where(labels == i)[0]
        if len(pos_idx) == 0:
            continue
        pos = np.mean(v2t[i][pos_idx])
        neg = pos if v2t_neg[i] < 0 else v2t[i][v2t_neg[i]]
        if v2t_neg[i] >= 0:
            assert labels[v2t_neg[i]] != i
        v2t_loss += max(margin + neg - pos, 0.0)
    t2v_loss = 0.0
    for i in range(s.shape[0]):
        pos = s[i, labels[i]]
        neg = pos if t2v_neg[i] < 0 else s[i, t2v_neg[i]]
        t2v_loss += max(margin + neg - pos, 0.0)
    return t2v_loss / max(s.shape[0], 1) + v2t_loss / max(v2t.shape[0], 1)


def ref_recon(recon, target, mask):
    """``loss.py:85-99``: MSE(sum) of the per-token-normalised reconstruction against the target, masked, over
    ``sum(mask) * D + 1e-6``."""
    r = recon / np.maximum(np.linalg.norm(recon, axis=-1, keepdims=True), 1e-12)
    err = ((r * mask[..., None] - target * mask[..., None]) ** 2).sum()
    return err / (mask.sum() * target.shape[-1] + 1e-6)


def _mtm_case(seed, counts=COUNTS):
    rng = np.random.default_rng(seed)
    scores, aux, labels = _unpadded(seed, counts)
    n_q, n_v = scores["clip"].shape
    scores["video"] = rng.uniform(-1, 1, (n_q, n_v)).astype(np.float32)
    scores["video_raw"] = rng.normal(0, 3, (n_q, n_v)).astype(np.float32)
    aux["recon_text"] = rng.normal(size=(n_q, LQ, DQ)).astype(np.float32)
    aux["recon_video"] = rng.normal(size=(n_v, LV, DV)).astype(np.float32)
    q_len = rng.integers(1, LQ + 1, n_q)
    v_len = rng.integers(1, LV + 1, n_v)
    batch = _batch(labels)
    batch["query_mask"] = (np.arange(LQ)[None] < q_len[:, None]).astype(np.float32)
    batch["frame_mask"] = (np.arange(LV)[None] < v_len[:, None]).astype(np.float32)
    batch["query_feats"] = (_normalize(rng.normal(size=(n_q, LQ, DQ))) * batch["query_mask"][..., None]).astype(np.float32)
    batch["frame_feats"] = (_normalize(rng.normal(size=(n_v, LV, DV))) * batch["frame_mask"][..., None]).astype(np.float32)
    negs = {}
    for b in ("clip", "frame", "video"):
        negs[f"{b}_t2v"] = np.array([rng.choice([v for v in range(n_v) if v != labels[i]]) if n_v > 1 else -1
                                     for i in range(n_q)], np.int32)
        negs[f"{b}_v2t"] = np.array([rng.choice(np.flatnonzero(labels != v)) if np.any(labels != v) else -1
                                     for v in range(n_v)], np.int32)
    return scores, aux, labels, batch, negs


def ref_total(scores, aux, labels, batch, negs, cfg):
    m = cfg.margin  # the official positional factor lists, from the named fields
    lf = (cfg.w_clip_nce, cfg.w_frame_nce, cfg.w_qdl, cfg.w_ot, cfg.w_video_nce)
    nf, tf = (cfg.qdl_margin, cfg.qdl_alpha, cfg.qdl_lambda), (cfg.w_clip_trip, cfg.w_frame_trip, cfg.w_video_trip)
    terms = dict(
        clip_nce=lf[0] * ref_clip_nce(scores["clip_raw"], labels),
        clip_trip=tf[0] * ref_mtm_trip(scores["clip"], labels, m, negs["clip_t2v"], negs["clip_v2t"]),
        frame_nce=lf[1] * ref_clip_nce(scores["frame_raw"], labels),
        frame_trip=tf[1] * ref_mtm_trip(scores["frame"], labels, m, negs["frame_t2v"], negs["frame_v2t"]),
        video_nce=lf[4] * ref_clip_nce(scores["video_raw"], labels),
        video_trip=tf[2] * ref_mtm_trip(scores["video"], labels, m, negs["video_t2v"], negs["video_v2t"]),
        qdl=lf[2] * ref_qdl2(aux["query2"], labels, nf[0], nf[1], nf[2]),
        recon_text=cfg.w_recon * ref_recon(aux["recon_text"], batch["query_feats"], batch["query_mask"]),
        recon_video=cfg.w_recon * ref_recon(aux["recon_video"], batch["frame_feats"], batch["frame_mask"]),
    )
    terms["ot"] = lf[3] * (ref_ot(aux["clip_feats"], aux["query2"], labels)
                           if max(np.bincount(labels)) >= 2 else 1.0)  # MTM's guard (model.py:270-273)
    return terms


def _pad_mtm(scores, aux, batch, negs):
    """Padded query slots at the end and one padded video slot in the middle, garbage everywhere padded."""
    rng = np.random.default_rng(9)
    n_q, n_v = scores["clip"].shape
    v_pos = np.array([v if v < 2 else v + 1 for v in range(n_v)])
    n_vp, n_qp = n_v + 1, n_q + 3

    def rows(x, pos, n):
        big = rng.normal(0, 3, (n,) + x.shape[1:]).astype(np.float32)
        big[pos] = x
        return big

    q_pos = np.arange(n_q)
    ps = {}
    for k, v in scores.items():
        big = rng.normal(0, 3, (n_qp, n_vp)).astype(np.float32)
        big[np.ix_(q_pos, v_pos)] = v
        ps[k] = big
    pa = dict(query2=rows(aux["query2"], q_pos, n_qp), recon_text=rows(aux["recon_text"], q_pos, n_qp),
              clip_feats=rows(aux["clip_feats"], v_pos, n_vp), recon_video=rows(aux["recon_video"], v_pos, n_vp))
    pb = dict(query_labels=np.concatenate([v_pos[batch["query_labels"]], np.zeros(3, np.int32)]).astype(np.int32),
              query_valid=np.r_[np.ones(n_q), np.zeros(3)].astype(np.float32),
              video_valid=np.isin(np.arange(n_vp), v_pos).astype(np.float32),
              query_feats=rows(batch["query_feats"], q_pos, n_qp), query_mask=rows(batch["query_mask"], q_pos, n_qp),
              frame_feats=rows(batch["frame_feats"], v_pos, n_vp), frame_mask=rows(batch["frame_mask"], v_pos, n_vp))
    pn = {}
    for k, v in negs.items():
        if k.endswith("t2v"):
            pn[k] = np.r_[np.where(v < 0, -1, v_pos[v]), np.zeros(3)].astype(np.int32)
        else:
            out = np.zeros(n_vp, np.int32)
            out[v_pos] = v
            pn[k] = out
    return ps, pa, pb, pn, q_pos, v_pos


@pytest.fixture(scope="module")
def total_fn():
    @jax.jit
    def value_and_grads(s, a, b, n):
        fn = lambda s_, a_: L.total_loss("mtm", s_, a_, b, CFG, None, hard=True, negatives=n)
        return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(s, a)

    return value_and_grads


def test_total_loss_matches_official_padded_and_unpadded(total_fn):
    scores, aux, labels, batch, negs = _mtm_case(3)
    want = ref_total(scores, aux, labels, batch, negs, CFG)
    ps, pa, pb, pn, q_pos, v_pos = _pad_mtm(scores, aux, batch, negs)
    (loss_u, terms_u), _ = total_fn(scores, aux, batch, negs)
    (loss_p, terms_p), (gs, ga) = total_fn(ps, pa, pb, pn)
    assert set(terms_p) == set(want) == set(terms_u)
    for k, v in want.items():
        np.testing.assert_allclose(terms_u[k], v, rtol=RTOL, atol=ATOL, err_msg=k)
        np.testing.assert_allclose(terms_p[k], v, rtol=RTOL, atol=ATOL, err_msg=k)
    np.testing.assert_allclose(loss_p, sum(want.values()), rtol=RTOL, atol=ATOL)
    # Padded rows get exactly zero gradient; valid rows a non-zero one.
    for k in ("video", "video_raw", "clip"):
        g = np.asarray(gs[k]).copy()
        assert np.any(g[np.ix_(q_pos, v_pos)] != 0), k
        g[np.ix_(q_pos, v_pos)] = 0
        assert np.all(g == 0), k
    for k, pos in (("recon_text", q_pos), ("recon_video", v_pos)):
        g = np.asarray(ga[k])
        assert np.any(g[pos] != 0) and np.all(np.delete(g, pos, axis=0) == 0), k


def test_one_video_batch_counts_the_margin(total_fn):
    """A batch of one video: no negatives anywhere; the official guards make every triplet row count margin
    (t2v: the positive as its own negative; v2t: ``sample_neg_pair_scores = pos_pair_scores``)."""
    scores, aux, labels, batch, negs = _mtm_case(4, counts=[3])
    assert all(np.all(v == -1) for v in negs.values())
    want = ref_total(scores, aux, labels, batch, negs, CFG)
    (_, terms), _ = total_fn(scores, aux, batch, negs)
    for k in ("clip_trip", "frame_trip", "video_trip"):
        np.testing.assert_allclose(terms[k], want[k], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(terms["clip_trip"], CFG.w_clip_trip * 2 * CFG.margin, rtol=1e-6)


def test_reconstruction_loss_against_numpy():
    rng = np.random.default_rng(0)
    recon = rng.normal(size=(4, 5, 3)).astype(np.float32)
    target = _normalize(rng.normal(size=(4, 5, 3))).astype(np.float32)
    mask = (rng.uniform(size=(4, 5)) > 0.3).astype(np.float32)
    got = L.reconstruction_loss(recon, target, mask, np.ones(4))
    np.testing.assert_allclose(got, ref_recon(recon, target, mask), rtol=1e-6)
    # An invalid row is dropped from both sums: the loss of the other rows alone.
    got = L.reconstruction_loss(recon, target, mask, np.array([1, 0, 1, 1.0]))
    keep = [0, 2, 3]
    np.testing.assert_allclose(got, ref_recon(recon[keep], target[keep], mask[keep]), rtol=1e-6)


def test_mtm_samples_both_directions_from_the_hard_pool():
    """MTM draws the video-to-text negative uniformly among the ``hard_pool_size`` hardest queries (GMMFormer
    takes the single hardest): over many keys every one of the top-k appears, nothing else does."""
    scores, aux, labels, batch, _ = _mtm_case(5)
    s = {k: jnp.asarray(v) for k, v in scores.items()}
    pool = 3
    draws = np.stack([np.asarray(L.sample_negatives("mtm", s, batch, jax.random.key(i), hard=True,
                                                    hard_pool_size=pool)["video_v2t"]) for i in range(60)])
    v2t = scores["video"].T
    for v in range(v2t.shape[0]):
        others = np.flatnonzero(labels != v)
        top = set(others[np.argsort(-v2t[v][others], kind="stable")[:pool]].tolist())
        assert set(draws[:, v].tolist()) == top, v
    assert set(L.negative_keys("mtm")) == {f"{b}_{d}" for b in ("clip", "frame", "video") for d in ("t2v", "v2t")}


# ----------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------

def ref_ema(shadow, params_seq, decay):
    """``EMA.__call__`` (``Opts/optimization.py:200-206``) in float64, step = 0, 1, ..."""
    s = np.asarray(shadow, np.float64)
    for step, p in enumerate(params_seq):
        d = min(decay, (1 + step) / (10.0 + step))
        s = (1.0 - d) * np.asarray(p, np.float64) + d * s
    return s


def test_ema_decay_and_update_against_numpy():
    steps = np.arange(0, 40000, 997)
    np.testing.assert_allclose(ema_decay_at(steps, 0.9995), np.minimum(0.9995, (1 + steps) / (10 + steps)),
                               rtol=1e-6)
    rng = np.random.default_rng(0)
    shadow0 = rng.normal(size=(3, 4)).astype(np.float32)
    seq = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(6)]
    s = {"w": jnp.asarray(shadow0)}
    for step, p in enumerate(seq):
        s = ema_update(s, {"w": jnp.asarray(p)}, step, 0.9995)
    np.testing.assert_allclose(s["w"], ref_ema(shadow0, seq, 0.9995), rtol=1e-5, atol=1e-6)


def test_with_ema_tracks_the_weights_after_each_step():
    """The wrapper leaves the BertAdam updates unchanged and averages the post-step weights."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
    base = bert_adam(lr=0.1, warmup=0.1, t_total=10)
    tx = with_ema(base, 0.9)
    st, st_base = tx.init(params), base.init(params)
    assert isinstance(st, EmaState)
    p, p_base, history = params, params, []
    for i in range(4):
        g = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32), "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
        u, st = tx.update(g, st, p)
        ub, st_base = base.update(g, st_base, p_base)
        p, p_base = optax.apply_updates(p, u), optax.apply_updates(p_base, ub)
        history.append(np.asarray(p["w"]))
    np.testing.assert_array_equal(p["w"], p_base["w"])
    np.testing.assert_allclose(st.shadow["w"], ref_ema(params["w"], history, 0.9), rtol=1e-5, atol=1e-6)
    assert eval_params(p, st, True) is st.shadow and eval_params(p, st, False) is p
