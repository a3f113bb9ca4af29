"""Training losses of the PRVR models (MS-SL, GMMFormer v1, GMMFormer v2), with padding masks.

Faithful to the official PyTorch code; ``file:line`` references are to these snapshots:

* ``ms-sl``: ``method/model.py`` (total loss ``:81-113``, triplets ``:282-375``),
  ``method/model_components.py`` (``clip_nce`` ``:21-49``, ``frame_nce`` ``:52-79``);
* ``GMMFormer``: ``src/Losses/loss.py`` (QDL v1 ``:12-36``, total ``:48-78``, triplet ``:80-116``);
* ``GMMFormer_v2``: ``src/Losses/loss.py`` (QDL v2 ``:12-38``, total ``:50-81``),
  ``src/Models/gmmformerV2/model.py:100-116`` (optimal matching loss);
* ``MTM``: ``src/Losses/loss.py`` (QDL v2 ``:9-32``, total ``:54-105``, triplet with a hard pool in both
  directions ``:107-164``), ``src/Models/MTM/model.py:245-275`` (optimal matching with its guard).

Batch layout (static shapes). ``B`` video slots with ``video_valid (B,)`` 0/1, ``Q`` query slots with
``query_valid (Q,)`` 0/1 and ``query_labels (Q,)`` int32 = the batch row of the query's video; the
queries of one video are contiguous. Padded rows and columns may hold any finite values: every loss
equals the official loss computed on the valid sub-batch alone (masked log-sum-exps, masked means,
negatives drawn only among valid items) and its gradient w.r.t. padded entries is zero.

Randomness. Every sampled negative comes from a ``sample_*`` function that takes a PRNG key and returns
integer indices; the loss functions take the indices, so tests can inject them. :func:`total_loss`
samples them from its key unless a ``negatives`` dict is passed (keys in :func:`negative_keys`).

Edge cases where the official code crashes (no valid negative for a row, no video with two queries in
the optimal matching loss) contribute 0 here, or 1.0 for the matching loss; see docs/quirks.md.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from jaxprvr.errors import JaxprvrError
from jaxprvr.ops.matching import gather_assigned, grouped_linear_sum_assignment

__all__ = [
    "LOSSES",
    "NEGATIVES",
    "MS_SL_CLIP_NCE_WEIGHT",
    "MS_SL_FRAME_NCE_WEIGHT",
    "l2_normalize",
    "masked_logsumexp",
    "clip_nce",
    "frame_nce",
    "clip_triplet_loss",
    "frame_triplet_loss",
    "query_diverse_loss_v1",
    "query_diverse_loss_v2",
    "optimal_matching_cost",
    "optimal_matching_loss",
    "reconstruction_loss",
    "sample_t2v_negatives",
    "sample_v2t_negatives",
    "sample_square_negatives",
    "negative_keys",
    "sample_negatives",
    "total_loss",
]

# Hard-coded in the official MS-SL (method/model.py:102,106), for every dataset.
MS_SL_CLIP_NCE_WEIGHT = 0.02
MS_SL_FRAME_NCE_WEIGHT = 0.04


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------

def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``torch.nn.functional.normalize``: ``x / max(||x||, eps)``, with a finite gradient at 0."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    # max(||x||, eps) == sqrt(max(||x||^2, eps^2)); the where keeps sqrt away from 0 (NaN gradient).
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """log-sum-exp over the entries where ``mask`` is true; 0 where none is (gradient 0 there)."""
    mask = mask.astype(bool)
    xm = jnp.where(mask, x, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(xm, axis=axis, keepdims=True))
    any_ = jnp.any(mask, axis=axis, keepdims=True)
    m = jnp.where(any_, m, 0.0)
    s = jnp.sum(jnp.exp(xm - m), axis=axis, keepdims=True)
    out = jnp.log(jnp.where(any_, s, 1.0)) + m
    return jnp.squeeze(jnp.where(any_, out, 0.0), axis=axis)


def _bool(x) -> jax.Array:
    return jnp.asarray(x) > 0


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _f32(x) -> jax.Array:
    """``x`` as float32; float64 (a float64 model, ``parity.check --dtype float64``) stays float64."""
    x = jnp.asarray(x)
    return x.astype(jnp.float32) if x.dtype not in (jnp.float32, jnp.float64) else x


def _positive_mask(query_labels, query_valid, n_videos) -> jax.Array:
    """(Q, B) bool: query i is a valid query of video v."""
    labels = jnp.asarray(query_labels, jnp.int32)
    return (labels[:, None] == jnp.arange(n_videos)[None, :]) & _bool(query_valid)[:, None]


def _row_gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[i, idx[i]]`` for a 2-D ``x``."""
    return jnp.take_along_axis(x, jnp.asarray(idx, jnp.int32)[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------------------------------
# InfoNCE terms
# ----------------------------------------------------------------------------------------------------

def clip_nce(scores: jax.Array, query_labels, query_valid, video_valid) -> jax.Array:
    """Official ``clip_nce`` (InfoNCE with temperature 1) on unnormalised ``scores (Q, B)``.

    ``mean_i[LSE_v s_iv - s_{i,y(i)}] + mean_v[LSE_i s_iv - LSE_{i in Q(v)} s_iv]``
    (ms-sl ``model_components.py:26-47``). The second mean runs over all (valid) videos; a video with
    no query contributes 0, as the official zero-initialised ``v2t_*`` tensors do (``:39-45``).
    """
    s = _f32(scores)
    qv, vv = _bool(query_valid), _bool(video_valid)
    pos = _positive_mask(query_labels, qv, s.shape[1])
    t2v = masked_logsumexp(s, vv[None, :], axis=1) - _row_gather(s, query_labels)
    v2t_den = masked_logsumexp(s, qv[:, None], axis=0)
    v2t_nom = masked_logsumexp(s, pos, axis=0)
    has_q = jnp.any(pos, axis=0)
    v2t = jnp.where(has_q, v2t_den - v2t_nom, 0.0)
    return _masked_mean(t2v, qv) + _masked_mean(v2t, vv)


def frame_nce(scores: jax.Array, query_valid) -> jax.Array:
    """Official MS-SL ``frame_nce`` on the unnormalised ``(Q, Q)`` matrix (diagonal = positives).

    ``mean_i[LSE(concat(x[i,:], x[:,i])) - x[i,i]]``: the 2N-term denominator holds the diagonal twice
    (ms-sl ``model_components.py:68-77``).
    """
    x = _f32(scores)
    qv = _bool(query_valid)
    both = jnp.concatenate([x, x.T], axis=1)  # row i: x[i, :] then x[:, i]
    den = masked_logsumexp(both, jnp.concatenate([qv, qv])[None, :], axis=1)
    return _masked_mean(den - jnp.diagonal(x), qv)


# ----------------------------------------------------------------------------------------------------
# Triplet ranking terms
# ----------------------------------------------------------------------------------------------------

def clip_triplet_loss(scores: jax.Array, query_labels, query_valid, video_valid, *, margin: float,
                      t2v_negatives, v2t_negatives, no_negative_margin: bool = False) -> jax.Array:
    """Official ``get_clip_triplet_loss`` on cosine ``scores (Q, B)``, with given negatives.

    ``t2v_negatives (Q,)``: a video index per query; ``v2t_negatives (B,)``: a query index per video.
    ``(1/Nq) sum_i [m + S[i,n_i] - S[i,y(i)]]_+ + (1/Nv) sum_v [m + S[n_v,v] - mean_{i in Q(v)} S[i,v]]_+``
    (ms-sl ``model.py:282-320``; GMMFormer ``Losses/loss.py:80-116``, identical). A row with no valid
    negative (a batch of one video) contributes 0 (the official ``torch.randint`` would raise), or, with
    ``no_negative_margin`` (MTM ``loss.py:119-120,144-145``: the negative is the positive itself), ``margin``.
    """
    s = _f32(scores)
    qv, vv = _bool(query_valid), _bool(video_valid)
    pos_mask = _positive_mask(query_labels, qv, s.shape[1])
    n_valid_videos = jnp.sum(vv)

    t2v_pos = _row_gather(s, query_labels)
    t2v_neg = _row_gather(s, t2v_negatives)
    t2v = jnp.maximum(margin + t2v_neg - t2v_pos, 0.0)
    t2v_ok = qv & (n_valid_videos >= 2)
    empty = jnp.maximum(margin, 0.0) if no_negative_margin else 0.0
    t2v_loss = jnp.sum(jnp.where(t2v_ok, t2v, jnp.where(qv, empty, 0.0))) / jnp.maximum(jnp.sum(qv), 1)

    pm = pos_mask.astype(s.dtype)
    n_pos = jnp.sum(pm, axis=0)
    v2t_pos = jnp.sum(jnp.where(pos_mask, s, 0.0), axis=0) / jnp.maximum(n_pos, 1.0)
    v2t_neg = _row_gather(s.T, v2t_negatives)
    v2t = jnp.maximum(margin + v2t_neg - v2t_pos, 0.0)
    n_other = jnp.sum(qv) - n_pos
    v2t_ok = vv & (n_pos > 0) & (n_other > 0)
    v2t_empty = jnp.where(vv & (n_pos > 0), empty, 0.0)
    v2t_loss = jnp.sum(jnp.where(v2t_ok, v2t, v2t_empty)) / jnp.maximum(jnp.sum(vv), 1)
    return t2v_loss + v2t_loss


def frame_triplet_loss(scores: jax.Array, query_valid, *, margin: float, row_negatives,
                       col_negatives) -> jax.Array:
    """Official MS-SL ``get_frame_trip_loss`` on the cosine ``(Q, Q)`` matrix (diagonal = positives).

    ``row_negatives[i]``: column j != i (query i vs. frame feature j); ``col_negatives[i]``: row j != i
    (query j vs. frame feature i). ``(1/N) sum_i [m + S[i,r_i] - S[i,i]]_+ + (1/N) sum_i [m + S[c_i,i] - S[i,i]]_+``
    (ms-sl ``model.py:322-375``). Off-diagonal entries of the same video count as negatives.
    """
    s = _f32(scores)
    qv = _bool(query_valid)
    pos = jnp.diagonal(s)
    ok = qv & (jnp.sum(qv) >= 2)
    n = jnp.maximum(jnp.sum(qv), 1)
    neg_ctx = _row_gather(s, row_negatives)
    neg_q = _row_gather(s.T, col_negatives)
    loss_ctx = jnp.sum(jnp.where(ok, jnp.maximum(margin + neg_ctx - pos, 0.0), 0.0)) / n
    loss_q = jnp.sum(jnp.where(ok, jnp.maximum(margin + neg_q - pos, 0.0), 0.0)) / n
    return loss_ctx + loss_q


# ----------------------------------------------------------------------------------------------------
# Query-diverse losses (GMMFormer v1 / v2)
# ----------------------------------------------------------------------------------------------------

def _same_video_pairs(query_labels, query_valid) -> jax.Array:
    """(Q, Q) bool: i != j, both valid, same video (the official contiguous block mask minus the eye,
    GMMFormer ``Losses/loss.py:24-27``)."""
    labels = jnp.asarray(query_labels, jnp.int32)
    qv = _bool(query_valid)
    q = labels.shape[0]
    return (labels[:, None] == labels[None, :]) & qv[:, None] & qv[None, :] & ~jnp.eye(q, dtype=bool)


def query_diverse_loss_v1(query: jax.Array, query_labels, query_valid, *, margin: float,
                          alpha: float) -> jax.Array:
    """GMMFormer QDL: ``(1/Nq) sum_j log(1 + sum_{i:(i,j) in P} exp(alpha (cos_ij + m)))``.

    ``query (Q, D)`` is the second ``encode_query`` pass; ``(m, alpha) = neg_factor[:2]``
    (GMMFormer ``Losses/loss.py:18-36``; the sum runs over dim 0, the mean over all Nq queries).
    """
    x = l2_normalize(_f32(query))
    cos = x @ x.T
    pairs = _same_video_pairs(query_labels, query_valid)
    neg_exp = jnp.exp(alpha * (jnp.where(pairs, cos, 0.0) + margin))
    col_sum = jnp.sum(jnp.where(pairs, neg_exp, 0.0), axis=0)
    return _masked_mean(jnp.log(1.0 + col_sum), _bool(query_valid))


def query_diverse_loss_v2(query: jax.Array, query_labels, query_valid, *, margin: float, alpha: float,
                          lam: float) -> jax.Array:
    """GMMFormer v2 QDL: ``(1/Nq) sum_{(i,j) in P} (1 + cos_ij)^lam log(1 + exp(alpha (cos_ij + m)))``.

    The log is per pair and the focal factor ``(1 + cos)^lam`` is not detached
    (GMMFormer_v2 ``Losses/loss.py:31-36``); ``(m, alpha, lam) = neg_factor``.
    """
    x = l2_normalize(_f32(query))
    cos = x @ x.T
    pairs = _same_video_pairs(query_labels, query_valid)
    c = jnp.where(pairs, cos, 0.0)
    per_pair = jnp.power(1.0 + c, lam) * jnp.log(1.0 + jnp.exp(alpha * (c + margin)))
    total = jnp.sum(jnp.where(pairs, per_pair, 0.0))
    return total / jnp.maximum(jnp.sum(_bool(query_valid)), 1)


# ----------------------------------------------------------------------------------------------------
# Optimal matching loss (GMMFormer v2)
# ----------------------------------------------------------------------------------------------------

def optimal_matching_cost(clip_feats: jax.Array, query: jax.Array, query_labels) -> jax.Array:
    """``C[q, k] = -cos(clip_{y(q), k}, q')`` -> ``(Q, n_clips)`` (GMMFormer_v2 ``model.py:110``)."""
    labels = jnp.asarray(query_labels, jnp.int32)
    clips = l2_normalize(_f32(clip_feats))[labels]  # (Q, K, D): each query's own video
    q = l2_normalize(_f32(query))
    return -jnp.einsum("qkd,qd->qk", clips, q)


def optimal_matching_loss(clip_feats: jax.Array, query: jax.Array, query_labels, query_valid,
                          video_valid, *, assignment=None) -> jax.Array:
    """GMMFormer v2 optimal matching loss: ``1 + mean(matched C)`` over all matched pairs of the batch.

    For every video with >= 2 (valid) queries, its queries are assigned one-to-one to distinct clips
    by the Hungarian algorithm on ``C = -cos(clip_k, q')`` (host callback, zero gradient); the matched
    ``C`` entries of all videos are pooled into one mean (GMMFormer_v2 ``model.py:102-116``).
    Videos with a single query are skipped (``:107-108``). When no video has >= 2 queries the
    official code crashes (``torch.stack([])``); here the loss is 1.0 with zero gradient (MTM's guard).
    ``assignment (Q,)`` (column per query, -1 = none) may be injected instead of running the matching.
    """
    labels = jnp.asarray(query_labels, jnp.int32)
    qv = _bool(query_valid)
    cost = optimal_matching_cost(clip_feats, query, labels)
    n_videos = clip_feats.shape[0]
    per_video = jnp.sum(_positive_mask(labels, qv, n_videos), axis=0)  # (B,)
    active = qv & _bool(video_valid)[labels] & (per_video[labels] >= 2)
    if assignment is None:
        assignment = grouped_linear_sum_assignment(cost, labels, active)
    assignment = jnp.where(active, jnp.asarray(assignment, jnp.int32), -1)
    vals, mask = gather_assigned(cost, assignment)
    return 1.0 + jnp.sum(vals * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------------------------------
# Reconstruction (MTM)
# ----------------------------------------------------------------------------------------------------

def reconstruction_loss(recon: jax.Array, target: jax.Array, mask, row_valid) -> jax.Array:
    """MTM's masked reconstruction loss (``loss.py:85-99``) of ``recon (N, L, D)`` against ``target (N, L, D)``:

    ``sum(mask * (normalize(recon) - target)^2) / (sum(mask) * D + 1e-6)`` with ``normalize`` per token
    (``F.normalize``, eps 1e-12) and ``mask (N, L)`` the token mask of each row; ``row_valid (N,)`` drops padded
    rows (queries or videos) from both sums. The targets are the model's own (L2-normalised) inputs."""
    r = l2_normalize(_f32(recon))
    t = _f32(target)
    m = _f32(mask) * _bool(row_valid).astype(jnp.float32)[:, None]
    err = jnp.sum(jnp.square((r - t) * m[..., None]))
    return err / (jnp.sum(m) * t.shape[-1] + 1e-6)


# ----------------------------------------------------------------------------------------------------
# Negative sampling
# ----------------------------------------------------------------------------------------------------

def _draw(key, scores: jax.Array, candidates: jax.Array, *, hard, pool_size: int) -> jax.Array:
    """One column per row of ``candidates (R, C)``: uniform over the candidates, or (hard) uniform over
    the ``pool_size`` highest-scoring candidates. Rows without candidates return 0 (masked later).

    ``hard`` is a Python bool, or a traced boolean scalar: then both draws are made and one is selected,
    so a training step switching to hard negatives at some epoch compiles once."""
    scores = jax.lax.stop_gradient(_f32(scores))
    n_rows, n_cols = candidates.shape
    n = jnp.sum(candidates, axis=1)
    r = jax.random.randint(key, (n_rows,), 0, jnp.maximum(n, 1))
    # position of the r-th (0-based) candidate = first column where the running count exceeds r
    uniform = jnp.argmax(jnp.cumsum(candidates, axis=1) > r[:, None], axis=1).astype(jnp.int32)
    if isinstance(hard, bool) and not hard:
        return uniform
    k = min(int(pool_size), n_cols)
    if k < 1:
        raise JaxprvrError("hard negative pool_size", "an integer >= 1", repr(pool_size))
    masked = jnp.where(candidates, scores, -jnp.inf)
    _, top = jax.lax.top_k(masked, k)  # descending; ties -> lower index first
    n_eff = jnp.minimum(n, k)
    r = jax.random.randint(key, (n_rows,), 0, jnp.maximum(n_eff, 1))
    hardest = _row_gather(top, r).astype(jnp.int32)
    if isinstance(hard, bool):
        return hardest
    return jnp.where(hard, hardest, uniform)


def sample_t2v_negatives(key, scores: jax.Array, query_labels, query_valid, video_valid, *, hard: bool,
                         pool_size: int) -> jax.Array:
    """``(Q,)`` a negative video per query: uniform over the valid other videos; when ``hard``, uniform
    over the ``pool_size`` highest-scoring valid other videos.

    Official (ms-sl ``model.py:306-314``): positives set to 999 in a copy, sort descending, draw a
    sorted position with ``torch.randint(1, min(1 + pool, Nv) if hard else Nv)``.
    """
    s = _f32(scores)
    cand = _bool(video_valid)[None, :] & ~_positive_mask(query_labels, jnp.ones(s.shape[0]), s.shape[1])
    return _draw(key, s, cand, hard=hard, pool_size=pool_size)


def sample_v2t_negatives(key, scores: jax.Array, query_labels, query_valid, video_valid, *, hard: bool,
                         pool_size: int = 1) -> jax.Array:
    """``(B,)`` a negative query per video among the valid queries of other videos: uniform, or when
    ``hard`` uniform over the top ``pool_size`` (official MS-SL/GMMFormer: ``pool_size=1``, the single
    hardest, ``neg_pair_scores[0]`` at ms-sl ``model.py:293-299``; MTM draws from the top pool)."""
    s = _f32(scores)
    labels = jnp.asarray(query_labels, jnp.int32)
    cand = (_bool(query_valid)[None, :] & (labels[None, :] != jnp.arange(s.shape[1])[:, None])
            & _bool(video_valid)[:, None])
    return _draw(key, s.T, cand, hard=hard, pool_size=pool_size)


def sample_square_negatives(key, scores: jax.Array, valid, *, hard: bool, pool_size: int) -> jax.Array:
    """``(N,)`` for a square matrix with positives on the diagonal: per row i, a column j != i among the
    valid ones, uniform or (hard) uniform in the top ``pool_size`` (ms-sl ``get_neg_scores``,
    ``model.py:343-367``). Call on ``scores.T`` for the column direction."""
    s = _f32(scores)
    v = _bool(valid)
    cand = v[None, :] & v[:, None] & ~jnp.eye(s.shape[0], dtype=bool)
    return _draw(key, s, cand, hard=hard, pool_size=pool_size)


# Each family's negatives: the keys of the ``negatives`` dict and the sampler drawing them.

def _sample_ms_sl(scores, batch, keys, *, hard, hard_pool_size):
    lab, qv, vv = batch["query_labels"], batch["query_valid"], batch["video_valid"]
    return {
        "clip_t2v": sample_t2v_negatives(keys[0], scores["clip"], lab, qv, vv, hard=hard, pool_size=hard_pool_size),
        "clip_v2t": sample_v2t_negatives(keys[1], scores["clip"], lab, qv, vv, hard=hard, pool_size=1),
        "frame_row": sample_square_negatives(keys[2], scores["frame"], qv, hard=hard, pool_size=hard_pool_size),
        "frame_col": sample_square_negatives(keys[3], jnp.asarray(scores["frame"]).T, qv, hard=hard,
                                             pool_size=hard_pool_size),
    }


def _sample_gmm(scores, batch, keys, *, hard, hard_pool_size):
    """GMMFormer / v2: the hardest video per query (pool) and the single hardest query per video."""
    lab, qv, vv = batch["query_labels"], batch["query_valid"], batch["video_valid"]
    out = {}
    for i, branch in enumerate(("clip", "frame")):
        out[f"{branch}_t2v"] = sample_t2v_negatives(keys[2 * i], scores[branch], lab, qv, vv, hard=hard,
                                                    pool_size=hard_pool_size)
        out[f"{branch}_v2t"] = sample_v2t_negatives(keys[2 * i + 1], scores[branch], lab, qv, vv, hard=hard,
                                                    pool_size=1)
    return out


def _sample_mtm(scores, batch, keys, *, hard, hard_pool_size):
    """MTM: both directions of its three triplets uniformly from the ``hard_pool_size`` hardest
    (MTM ``loss.py:122-128,150-153``)."""
    lab, qv, vv = batch["query_labels"], batch["query_valid"], batch["video_valid"]
    out = {}
    for i, branch in enumerate(("clip", "frame", "video")):
        out[f"{branch}_t2v"] = sample_t2v_negatives(keys[2 * i], scores[branch], lab, qv, vv, hard=hard,
                                                    pool_size=hard_pool_size)
        out[f"{branch}_v2t"] = sample_v2t_negatives(keys[2 * i + 1], scores[branch], lab, qv, vv, hard=hard,
                                                    pool_size=hard_pool_size)
    return out


_GMM_NEGATIVES = ("clip_t2v", "clip_v2t", "frame_t2v", "frame_v2t")
# model -> (negative keys, sampler)
NEGATIVES = {
    "ms_sl": (("clip_t2v", "clip_v2t", "frame_row", "frame_col"), _sample_ms_sl),
    "gmmformer": (_GMM_NEGATIVES, _sample_gmm),
    "gmmformer_v2": (_GMM_NEGATIVES, _sample_gmm),
    "mtm": (_GMM_NEGATIVES + ("video_t2v", "video_v2t"), _sample_mtm),
}


def negative_keys(model_name: str) -> tuple[str, ...]:
    """The keys of the ``negatives`` dict :func:`total_loss` uses for ``model_name``."""
    return _entry(NEGATIVES, model_name)[0]


def sample_negatives(model_name: str, scores: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], key,
                     *, hard: bool, hard_pool_size: int) -> dict[str, jax.Array]:
    """All negatives one training step of ``model_name`` needs (shapes: ``*_t2v``/``frame_row``/
    ``frame_col`` ``(Q,)``; ``*_v2t`` ``(B,)``), drawn from ``key`` (split once per negative key, in the order of
    :func:`negative_keys`). MTM draws both directions of its three triplets from the hard pool; MS-SL and
    GMMFormer take the single hardest query per video."""
    names, sampler = _entry(NEGATIVES, model_name)
    return sampler(scores, batch, jax.random.split(key, len(names)), hard=hard, hard_pool_size=hard_pool_size)


# ----------------------------------------------------------------------------------------------------
# Total loss: one function per family, ``(scores, aux, batch, cfg, negatives) -> terms``
# ----------------------------------------------------------------------------------------------------

def _entry(table, model_name):
    if model_name not in table:
        raise JaxprvrError("model name", f"one of {list(table)}", repr(model_name))
    return table[model_name]


def _ms_sl_terms(scores, aux, batch, cfg, negatives):
    """``0.02 clipNCE(clip_raw) + clipTrip(clip) + 0.04 frameNCE(frame_raw) + frameTrip(frame)`` with the (Q, Q)
    frame matrices; the weights are hard-coded as in ms-sl ``model.py:102-109``."""
    lab, qv, vv = batch["query_labels"], batch["query_valid"], batch["video_valid"]
    margin = float(cfg.margin)
    return {
        "clip_nce": MS_SL_CLIP_NCE_WEIGHT * clip_nce(scores["clip_raw"], lab, qv, vv),
        "clip_trip": clip_triplet_loss(scores["clip"], lab, qv, vv, margin=margin,
                                       t2v_negatives=negatives["clip_t2v"], v2t_negatives=negatives["clip_v2t"]),
        "frame_nce": MS_SL_FRAME_NCE_WEIGHT * frame_nce(scores["frame_raw"], qv),
        "frame_trip": frame_triplet_loss(scores["frame"], qv, margin=margin, row_negatives=negatives["frame_row"],
                                         col_negatives=negatives["frame_col"]),
    }


def _nce_and_triplets(scores, batch, cfg, negatives, branches, *, mtm):
    """``w_<b>_nce clipNCE(<b>_raw) + t_b Trip(<b>)`` per branch: GMMFormer/v2 triplets unweighted (``t_b = 1``),
    MTM's weighted by ``w_<b>_trip`` and counting ``margin`` for a row without negatives."""
    lab, qv, vv = batch["query_labels"], batch["query_valid"], batch["video_valid"]
    terms = {}
    for b in branches:
        terms[f"{b}_nce"] = float(getattr(cfg, f"w_{b}_nce")) * clip_nce(scores[f"{b}_raw"], lab, qv, vv)
        terms[f"{b}_trip"] = (float(getattr(cfg, f"w_{b}_trip")) if mtm else 1.0) * clip_triplet_loss(
            scores[b], lab, qv, vv, margin=float(cfg.margin), t2v_negatives=negatives[f"{b}_t2v"],
            v2t_negatives=negatives[f"{b}_v2t"], no_negative_margin=mtm)
    return terms


def _ot_term(aux, batch, cfg, negatives):
    return float(cfg.w_ot) * optimal_matching_loss(aux["clip_feats"], aux["query2"], batch["query_labels"],
                                                   batch["query_valid"], batch["video_valid"],
                                                   assignment=negatives.get("ot_assignment"))


def _qdl_v2_term(aux, batch, cfg):
    return float(cfg.w_qdl) * query_diverse_loss_v2(aux["query2"], batch["query_labels"], batch["query_valid"],
                                                    margin=float(cfg.qdl_margin), alpha=float(cfg.qdl_alpha),
                                                    lam=float(cfg.qdl_lambda))


def _gmmformer_terms(scores, aux, batch, cfg, negatives):
    """``w_clip_nce clipNCE(clip_raw) + clipTrip(clip) + w_frame_nce clipNCE(frame_raw) + clipTrip(frame)
    + w_qdl QDL1(query2)`` (GMMFormer ``Losses/loss.py:68-76``)."""
    terms = _nce_and_triplets(scores, batch, cfg, negatives, ("clip", "frame"), mtm=False)
    terms["qdl"] = float(cfg.w_qdl) * query_diverse_loss_v1(aux["query2"], batch["query_labels"], batch["query_valid"],
                                                            margin=float(cfg.qdl_margin), alpha=float(cfg.qdl_alpha))
    return terms


def _gmmformer_v2_terms(scores, aux, batch, cfg, negatives):
    """As GMMFormer with QDL2, ``+ w_ot L_OT(clip_feats, query2)`` (GMMFormer_v2 ``Losses/loss.py:71-79``)."""
    terms = _nce_and_triplets(scores, batch, cfg, negatives, ("clip", "frame"), mtm=False)
    terms["qdl"] = _qdl_v2_term(aux, batch, cfg)
    terms["ot"] = _ot_term(aux, batch, cfg, negatives)
    return terms


def _mtm_terms(scores, aux, batch, cfg, negatives):
    """MTM ``Losses/loss.py:76-105``: NCE + weighted triplet (hard pool both ways, ``margin`` for a row without
    negatives) for clip, frame and video, ``+ w_qdl QDL2(query2) + w_ot L_OT(clip_feats, query2)
    + w_recon (L_txt + L_vid)`` (``aux["recon_text"]`` vs ``batch["query_feats"]``, ``aux["recon_video"]`` vs
    ``batch["frame_feats"]``)."""
    terms = _nce_and_triplets(scores, batch, cfg, negatives, ("clip", "frame", "video"), mtm=True)
    terms["qdl"] = _qdl_v2_term(aux, batch, cfg)
    terms["ot"] = _ot_term(aux, batch, cfg, negatives)
    rec = float(cfg.w_recon)
    terms["recon_text"] = rec * reconstruction_loss(aux["recon_text"], batch["query_feats"], batch["query_mask"],
                                                    batch["query_valid"])
    terms["recon_video"] = rec * reconstruction_loss(aux["recon_video"], batch["frame_feats"], batch["frame_mask"],
                                                     batch["video_valid"])
    return terms


# model -> its loss terms; the loss config type each needs (at least) is its registry row's loss_config.
LOSSES = {"ms_sl": _ms_sl_terms, "gmmformer": _gmmformer_terms, "gmmformer_v2": _gmmformer_v2_terms,
          "mtm": _mtm_terms}


def total_loss(model_name: str, scores: Mapping[str, jax.Array], aux: Mapping[str, jax.Array],
               batch: Mapping[str, jax.Array], cfg, key, *, hard,
               negatives: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The official training loss of ``model_name`` -> ``(loss, terms)`` (:data:`LOSSES`; ``cfg`` a loss config
    of the model's family, :mod:`jaxprvr.config`).

    ``terms`` holds every weighted term (``clip_nce``, ``clip_trip``, ``frame_nce``, ``frame_trip``, and ``qdl``,
    ``ot``, MTM's ``video_nce``, ``video_trip``, ``recon_text``, ``recon_video`` where used); they sum to
    ``loss``. ``hard`` (a Python bool, or a traced boolean scalar so that one compiled step serves both phases)
    switches on hard negatives (``epoch >= hard_negative_start_epoch``). ``negatives`` (keys
    :func:`negative_keys`) replaces sampling; ``key`` is then unused. An optional ``negatives["ot_assignment"]
    (Q,)`` (the clip of each query, -1 = none) replaces the Hungarian matching of the v2 optimal matching loss.
    """
    terms_fn = _entry(LOSSES, model_name)
    _check_loss_config(model_name, cfg)
    if negatives is None:
        negatives = sample_negatives(model_name, scores, batch, key, hard=hard, hard_pool_size=cfg.hard_pool_size)
    else:
        missing = [k for k in negative_keys(model_name) if k not in negatives]
        if missing:
            raise JaxprvrError("total_loss negatives", f"keys {list(negative_keys(model_name))}",
                               f"{sorted(negatives)} (missing {missing})")
    terms = terms_fn(scores, aux, batch, cfg, negatives)
    return sum(terms.values()), terms


def _check_loss_config(model_name: str, cfg) -> None:
    from jaxprvr import registry

    want = registry.get(model_name).loss_config
    if not isinstance(cfg, want):
        raise JaxprvrError("loss config", f"a {want.__name__} (or a subclass) for {model_name}", type(cfg).__name__)
