"""MESM's training criterion and matcher as pure JAX functions over the static (padded) batch.

Official code (lntzm/MESM @ 8501bdea): ``model/criterion.py`` (``Criterion``, all of it), ``model/matcher.py``
(``HungarianMatcher.forward`` L60-117), ``utils/span_utils.py`` (``span_xx_to_cxw`` L5-23, ``span_cxw_to_xx``
L26-42, ``temporal_iou`` L45-72, ``generalized_temporal_iou`` L92-121), the weights (``runner.py``
``build_criterion`` L309-345) and the total (``criterion.py`` L365, used by ``train.py`` L60-75).

Batch layout: the static batch of ``jaxprvr/data/mesm.py`` (R row slots, ``row_group`` -1 on padding rows, Lv
frames with ``video_mask``, Lw words with ``words_mask``, W windows with ``span_mask``; W = 1 for the
single-moment datasets, 5 for QVHighlights). Every term equals the official term computed on the official
(dynamic, unpadded-rows) batch of the real rows alone: means run over the real rows, not over R; the saliency
rank loss keeps the official ``-1e3`` fill on the frames inside the official per-batch padding (``t <`` the
longest real video) and drops the frames beyond it, which the official batch does not have. Padded rows, frames,
words and windows may hold any values (NaN included): they are replaced before any nonlinearity, so they change
neither the terms nor the gradients, and their own gradient is exactly zero.

Matching (``matcher.py`` L60-117). The cost is ``set_cost_span * L1(cx, w) - set_cost_giou * GIoU -
set_cost_class * softmax(logits)[..., 0]`` (index 0 is the foreground, ``matcher.py`` L35). Single-moment
datasets hand ``linear_sum_assignment`` a (Q, 1) column per row (L112-117); scipy transposes a tall problem and,
for the one row, takes the first minimal column (its shortest-path step keeps the earlier index on a tie), i.e.
``argmin`` with the lower query index on ties, which is what :func:`match` computes, in JAX. QVHighlights
(``multi_clip``) solves one Hungarian problem per row over its valid windows (L108-111) through
:mod:`jaxprvr.ops.matching` (one host callback per call, zero gradient); the problem is passed as
(windows x queries), the orientation scipy itself solves a tall (queries x windows) problem in, so ties resolve
as in the official call. Indices are ``(R, W)`` int32: the query matched to each window, ``-1`` for padded
windows and padded rows. :func:`mesm_loss` takes them as an optional input (one array per decoder layer).

Dtype: everything runs in ``result_type(pred_logits, float32)``, which is the official computation in float32
training. In float64 it equals an official run whose torch default dtype is float64 (the ``empty_weight`` buffer
``[1, eos_coef]`` and the ``count + 1e-6`` denominators are built in the default dtype officially), except that the
official ``generalized_temporal_iou`` casts to float32 (``span_utils.py`` L111-112) whatever the input dtype; here
GIoU runs in the working dtype. ``class_error`` and ``rec_fw_acc`` are float32 as officially (``.float()``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxprvr.config import MESMLossConfig
from jaxprvr.errors import JaxprvrError
from jaxprvr.ops.matching import linear_sum_assignment

__all__ = [
    "FOREGROUND_LABEL",
    "SALIENCY_TAU",
    "SALIENCY_PAD",
    "RANK_LEVELS",
    "span_cxw_to_xx",
    "span_xx_to_cxw",
    "temporal_iou",
    "generalized_temporal_iou",
    "paired_generalized_temporal_iou",
    "match_cost",
    "match",
    "match_all",
    "loss_spans",
    "loss_labels",
    "loss_saliency",
    "loss_rec_fw",
    "loss_rec_ss",
    "mesm_weight_dict",
    "mesm_loss",
]

FOREGROUND_LABEL = 0  # criterion.py L42-43, matcher.py L35
BACKGROUND_LABEL = 1
SALIENCY_TAU = 0.5  # criterion.py L164
SALIENCY_PAD = -1e3  # criterion.py L162 (padded frames), L181 (dropped ranks)
RANK_LEVELS = tuple(range(1, 12))  # criterion.py L170: r = 1..11
RANK_DROP_ABOVE = 100  # criterion.py L171: labels > 100 are dropped (never, with QVH's 0..12)
LOG_EPS = 1e-6  # criterion.py L188, L190, L269, L270


def _count_plus_eps(count, dtype):
    """``pos_mask.sum(1) + 1e-6`` (``criterion.py`` L190, L270). Officially an int64 count plus a Python float lands
    in torch's DEFAULT dtype (float32 unless changed), then widens in the division; here it is taken in the working
    dtype, i.e. as an official run whose default dtype is the working dtype (the same in float32; the twin,
    torch_ref/mesm_loss.py, does likewise)."""
    return count.astype(dtype) + LOG_EPS


# ---------------------------------------------------------------------------------------------- span utilities

def span_cxw_to_xx(cxw):
    """``span_utils.py`` L26-42: (..., 2) (center, width) -> (st, ed) = (c - w/2, c + w/2)."""
    return jnp.stack([cxw[..., 0] - 0.5 * cxw[..., 1], cxw[..., 0] + 0.5 * cxw[..., 1]], axis=-1)


def span_xx_to_cxw(xx):
    """``span_utils.py`` L5-23: (..., 2) (st, ed) -> ((st + ed) / 2, ed - st)."""
    return jnp.stack([(xx[..., 0] + xx[..., 1]) * 0.5, xx[..., 1] - xx[..., 0]], axis=-1)


def temporal_iou(a, b):
    """``span_utils.py`` L45-72 batched: a (..., N, 2), b (..., M, 2) -> (iou, union), each (..., N, M)."""
    a1, a2 = a[..., :, None, 0], a[..., :, None, 1]
    b1, b2 = b[..., None, :, 0], b[..., None, :, 1]
    inter = jnp.maximum(jnp.minimum(a2, b2) - jnp.maximum(a1, b1), 0.0)
    union = (a2 - a1) + (b2 - b1) - inter
    return inter / union, union


def generalized_temporal_iou(a, b):
    """``span_utils.py`` L92-121 batched: (..., N, 2) x (..., M, 2) -> (..., N, M), in the inputs' dtype.
    ``iou - (enclosing - union) / enclosing``; 0/0 (a point against itself) is NaN as officially."""
    iou, union = temporal_iou(a, b)
    left = jnp.minimum(a[..., :, None, 0], b[..., None, :, 0])
    right = jnp.maximum(a[..., :, None, 1], b[..., None, :, 1])
    enclosing = jnp.maximum(right - left, 0.0)
    return iou - (enclosing - union) / enclosing


def paired_generalized_temporal_iou(a, b):
    """The diagonal ``diag(generalized_temporal_iou(a, b))`` (``criterion.py`` L91) elementwise: (..., 2) x
    (..., 2) -> (...), the same arithmetic per pair."""
    return generalized_temporal_iou(a[..., None, :], b[..., None, :])[..., 0, 0]


# ---------------------------------------------------------------------------------------------- batch helpers

def _dtype(outputs):
    return jnp.result_type(jnp.asarray(outputs["pred_logits"]).dtype, jnp.float32)


def _get(mapping, key, where):
    if key not in mapping:
        raise JaxprvrError(where, f"key {key!r}", f"keys {sorted(mapping)}")
    return jnp.asarray(mapping[key])


def _real_rows(batch):
    return _get(batch, "row_group", "mesm_loss batch") >= 0


def _mean_rows(x, real):
    """Mean over the real rows of a per-row quantity (the official ``.mean()`` over the batch)."""
    return jnp.sum(jnp.where(real, x, 0.0)) / jnp.sum(real)


def _targets(batch, st, multi_clip: bool):
    """(norm_span, norm_moment, valid windows) of the real rows, padding replaced by the unit span."""
    span = _get(batch, "norm_span", "mesm_loss batch").astype(st)
    moment = _get(batch, "norm_moment", "mesm_loss batch").astype(st)
    if span.ndim != 3 or span.shape[-1] != 2 or moment.shape != span.shape:
        raise JaxprvrError("mesm_loss batch", "norm_span and norm_moment of shape (R, W, 2)",
                           f"{span.shape} and {moment.shape}")
    real = _real_rows(batch)
    w = span.shape[1]
    if "span_mask" in batch:
        valid = jnp.asarray(batch["span_mask"]).astype(bool)
    else:
        valid = jnp.ones(span.shape[:2], bool)
    if not multi_clip and w != 1:
        raise JaxprvrError("mesm_loss batch", "one window per row (W = 1) unless multi_clip", f"W = {w}")
    valid = valid & real[:, None]
    unit_xx = jnp.asarray([0.0, 1.0], st)
    unit_cxw = jnp.asarray([0.5, 1.0], st)
    span = jnp.where(valid[..., None], span, unit_cxw)
    moment = jnp.where(valid[..., None], moment, unit_xx)
    return span, moment, valid


# ---------------------------------------------------------------------------------------------- matching

def match_cost(pred_logits, pred_spans, tgt_spans, tgt_moments, cfg: MESMLossConfig):
    """``matcher.py`` L70-105, one row against its own windows: (R, Q, 2) logits and (cx, w) spans, (R, W, 2)
    target spans and moments -> the cost (R, Q, W) = ``set_cost_span * cdist_L1 + set_cost_giou * (-GIoU) +
    set_cost_class * (-p_fg)``, summed in the official order."""
    prob = jax.nn.softmax(pred_logits, axis=-1)[..., FOREGROUND_LABEL]  # (R, Q)
    diff = jnp.abs(pred_spans[:, :, None, :] - tgt_spans[:, None, :, :])  # (R, Q, W, 2)
    cost_span = diff[..., 0] + diff[..., 1]  # torch.cdist(p=1)
    cost_giou = -generalized_temporal_iou(span_cxw_to_xx(pred_spans), tgt_moments)  # (R, Q, W)
    cost_class = -prob[:, :, None]
    return cfg.set_cost_span * cost_span + cfg.set_cost_giou * cost_giou + cfg.set_cost_class * cost_class


def _layer_cost(outputs_layer, batch, cfg_loss, multi_clip):
    """(cost (R, Q, W), valid windows (R, W)) of one decoder layer, padded rows neutralised, no gradient."""
    st = _dtype(outputs_layer)
    logits = jax.lax.stop_gradient(_get(outputs_layer, "pred_logits", "match outputs").astype(st))
    spans = jax.lax.stop_gradient(_get(outputs_layer, "pred_spans", "match outputs").astype(st))
    real = _real_rows(batch)
    tgt_spans, tgt_moments, valid = _targets(batch, st, multi_clip)
    logits = jnp.where(real[:, None, None], logits, 0.0)
    spans = jnp.where(real[:, None, None], spans, 0.5)
    return match_cost(logits, spans, tgt_spans, tgt_moments, cfg_loss), valid


def _assign(costs, valid, multi_clip):
    """costs (L, R, Q, W), valid (R, W) -> (L, R, W): the argmin (single-moment) or ONE host callback for the
    Hungarian problems of every layer and row (``multi_clip``)."""
    if not multi_clip:
        idx = jnp.argmin(costs[..., 0], axis=-1).astype(jnp.int32)  # first minimum = scipy's tie rule
        return jnp.where(valid[None, :, 0], idx, -1)[..., None]
    rows = jnp.broadcast_to(valid, (costs.shape[0],) + valid.shape)
    return linear_sum_assignment(jnp.swapaxes(costs, -1, -2), row_valid=rows)  # a query per window


def match(outputs_layer: Mapping, batch: Mapping, cfg_loss: MESMLossConfig, multi_clip: bool):
    """``HungarianMatcher.forward`` (``matcher.py`` L60-117) for one decoder layer: ``(R, W)`` int32, the query
    matched to each window, ``-1`` for padded windows and rows. Single-moment: the first argmin query (scipy on a
    (Q, 1) column, module docstring). ``multi_clip``: Hungarian per row over its valid windows (host callback).
    No gradient flows through the indices."""
    cost, valid = _layer_cost(outputs_layer, batch, cfg_loss, multi_clip)
    return _assign(cost[None], valid, multi_clip)[0]


def match_all(outputs: Mapping, batch: Mapping, cfg_loss: MESMLossConfig, multi_clip: bool) -> list:
    """The matching of every decoder layer the criterion uses: ``[final, aux_0, aux_1, ...]`` (``criterion.py``
    L333 and L352: the last layer and each ``aux_outputs`` entry are matched separately), with one host
    callback for all layers (``multi_clip``)."""
    layers = [outputs] + list(outputs.get("aux_outputs", ()))
    costs = [_layer_cost(layer, batch, cfg_loss, multi_clip) for layer in layers]
    out = _assign(jnp.stack([c for c, _ in costs]), costs[0][1], multi_clip)
    return [out[i] for i in range(len(layers))]


# ---------------------------------------------------------------------------------------------- terms

def _matched(indices, valid_windows):
    idx = jnp.asarray(indices).astype(jnp.int32)
    ok = (idx >= 0) & valid_windows
    return jnp.where(ok, idx, 0), ok


def loss_spans(pred_spans, indices, norm_span, norm_moment, span_mask, *, multi_clip: bool):
    """``Criterion.loss_spans`` (``criterion.py`` L71-110): ``{"loss_span", "loss_giou"}``.

    ``pred_spans`` (R, Q, 2) (cx, w); ``indices`` (R, W) a query per window (-1: none); targets (R, W, 2);
    ``span_mask`` (R, W) the real windows of real rows. ``loss_span`` = mean |pred - target| over the matched
    pairs x 2 coordinates; ``loss_giou`` = mean (1 - GIoU(xx(pred), target moment)) over the pairs. The target
    moment is ``norm_moment`` for single-moment datasets (L88) and ``span_cxw_to_xx(norm_span)`` for
    ``multi_clip`` (L83)."""
    st = pred_spans.dtype
    q, ok = _matched(indices, span_mask)
    src = jnp.take_along_axis(pred_spans, q[..., None], axis=1)  # (R, W, 2)
    src = jnp.where(ok[..., None], src, jnp.asarray([0.5, 1.0], st))
    tgt = jnp.where(ok[..., None], norm_span, jnp.asarray([0.5, 1.0], st))
    tgt_moment = span_cxw_to_xx(tgt) if multi_clip else jnp.where(ok[..., None], norm_moment,
                                                                 jnp.asarray([0.0, 1.0], st))
    n = jnp.sum(ok).astype(st)
    l1 = jnp.sum(jnp.where(ok[..., None], jnp.abs(src - tgt), 0.0)) / (2.0 * n)
    giou = paired_generalized_temporal_iou(span_cxw_to_xx(src), tgt_moment)
    lg = jnp.sum(jnp.where(ok, 1.0 - giou, 0.0)) / n
    return {"loss_span": l1, "loss_giou": lg}


def loss_labels(pred_logits, indices, span_mask, real, *, eos_coef: float):
    """``Criterion.loss_labels`` (``criterion.py`` L112-137): ``{"loss_label", "class_error"}``.

    Matched queries get class 0 (foreground), all others class 1; ``F.cross_entropy(weight=[1, eos_coef],
    reduction="none").mean()``: each entry ``-weight[t] * log_softmax[t]``, averaged as a PLAIN mean over all
    (real rows x Q) entries (not the weighted mean of DETR). ``class_error`` = 100 - the top-1 accuracy (in %,
    argmax with the lower class on a tie, as ``topk``) of the matched queries (``utils.accuracy``), float32 as
    officially."""
    st = pred_logits.dtype
    n_q = pred_logits.shape[1]
    logits = jnp.where(real[:, None, None], pred_logits, 0.0)
    q, ok = _matched(indices, span_mask & real[:, None])
    fg = jnp.any((q[:, :, None] == jnp.arange(n_q)[None, None, :]) & ok[:, :, None], axis=1)  # (R, Q)
    logp = jax.nn.log_softmax(logits, axis=-1)
    w = jnp.where(fg, 1.0, eos_coef).astype(st)  # empty_weight[target]
    ce = -w * jnp.where(fg, logp[..., FOREGROUND_LABEL], logp[..., BACKGROUND_LABEL])
    loss = jnp.sum(jnp.where(real[:, None], ce, 0.0)) / (jnp.sum(real).astype(st) * n_q)
    top1 = jnp.argmax(logits, axis=-1) == FOREGROUND_LABEL  # (R, Q)
    matched_top1 = jnp.take_along_axis(top1, q, axis=1)  # (R, W)
    # utils.accuracy (data_utils.py L147-163) counts in float32 (``.float()``) whatever the logits' dtype.
    f32 = jnp.float32
    acc = jnp.sum(jnp.where(ok, matched_top1, False)).astype(f32) * (f32(100.0) / jnp.sum(ok).astype(f32))
    return {"loss_label": loss, "class_error": f32(100.0) - acc}


def loss_saliency(saliency_scores, neg_saliency_scores, video_mask, contrast_label, real, *, rank_coef: float,
                  use_triplet: bool = False, pos_idx=None, neg_idx=None, saliency_margin: float = 0.2,
                  stable_neg_pair: bool = False):
    """``Criterion.loss_saliency`` (``criterion.py`` L139-221): rank-contrastive / rank_coef + neg_pair
    (+ triplet).

    ``saliency_scores``, ``neg_saliency_scores``, ``video_mask``, ``contrast_label`` (R, Lv); ``contrast_label``
    is QVH's ``saliency_label`` (0..12) or, elsewhere, ``clip_mask`` as float (L153-156).

    * neg_pair = mean over real rows of sum_t -log(1 - sigmoid(s_neg_t)) over valid frames (L150), computed
      literally (inf in float32 once sigmoid rounds to 1); ``stable_neg_pair`` uses softplus(s_neg) instead.
    * rank: scores [s ; s_neg] with padded frames at -1e3, labels [label ; 0]; for r = 1..11, skipped when no
      label >= r in the batch: log-softmax over the 2 Lv positions of scores / 0.5 (with ``+1e-6`` in the log),
      mean log-prob of the positions with label >= r (``/(count + 1e-6)``, :func:`_count_plus_eps`), negated, zeroed for rows without a
      positive and averaged over ALL real rows (L170-194). Summed over r and divided by ``rank_coef``.
    * triplet (``use_triplet``): sum clamp(margin + s[neg_idx] - s[pos_idx], 0) / (rows x pairs) * 2 (L202-213).
    """
    st = saliency_scores.dtype
    lv = saliency_scores.shape[1]
    vm = jnp.asarray(video_mask).astype(bool) & real[:, None]
    n = jnp.sum(real).astype(st)
    s_pos = jnp.where(vm, saliency_scores, 0.0)
    s_neg = jnp.where(vm, neg_saliency_scores, 0.0)

    neg_term = jax.nn.softplus(s_neg) if stable_neg_pair else -jnp.log(1.0 - jax.nn.sigmoid(s_neg))
    loss_neg_pair = jnp.sum(jnp.where(vm, neg_term, 0.0)) / n

    # The official batch is padded to its longest real video (pad_sequences_1d); frames beyond it do not exist.
    dyn_len = jnp.max(jnp.where(real, jnp.sum(vm, axis=1), 0))
    in_dyn = jnp.tile(jnp.arange(lv) < dyn_len, 2)  # (2 Lv,)
    label = jnp.where(vm, jnp.asarray(contrast_label).astype(st), 0.0)
    scores = jnp.concatenate([s_pos, s_neg], axis=1)  # (R, 2 Lv)
    labels = jnp.concatenate([label, jnp.zeros_like(label)], axis=1)
    vm2 = jnp.concatenate([vm, vm], axis=1)
    scores = jnp.where(vm2, scores, SALIENCY_PAD)
    keep = ~(labels > RANK_DROP_ABOVE)
    cur = jnp.where(keep, scores / SALIENCY_TAU, SALIENCY_PAD)
    row_max = jnp.max(jnp.where(in_dyn[None], cur, -jnp.inf), axis=1, keepdims=True)
    logits = cur - row_max
    denom = jnp.sum(jnp.where(in_dyn[None], jnp.exp(logits), 0.0), axis=1, keepdims=True)
    log_prob = logits - jnp.log(denom + LOG_EPS)  # (R, 2 Lv)

    levels = jnp.asarray(RANK_LEVELS, st)[:, None, None]
    pos = (labels[None] >= levels) & in_dyn[None, None] & real[None, :, None]  # (11, R, 2 Lv)
    n_pos = jnp.sum(pos, axis=2)  # (11, R)
    mlpp = jnp.sum(jnp.where(pos & vm2[None], log_prob[None], 0.0), axis=2) / _count_plus_eps(n_pos, st)
    per_row = jnp.where(n_pos > 0, -mlpp, 0.0)
    per_level = jnp.sum(jnp.where(real[None], per_row, 0.0), axis=1) / n  # (11,)
    active = jnp.sum(n_pos, axis=1) > 0
    loss_rank = jnp.sum(jnp.where(active, per_level, 0.0)) / rank_coef

    loss = loss_rank + loss_neg_pair
    if use_triplet:
        if pos_idx is None or neg_idx is None:
            raise JaxprvrError("loss_saliency", "pos_idx and neg_idx with use_triplet", "None")
        s_raw = jnp.where(real[:, None], saliency_scores, 0.0)
        p_idx = jnp.where(real[:, None], jnp.asarray(pos_idx).astype(jnp.int32), 0)
        n_idx = jnp.where(real[:, None], jnp.asarray(neg_idx).astype(jnp.int32), 0)
        pairs = p_idx.shape[1]
        d = saliency_margin + jnp.take_along_axis(s_raw, n_idx, axis=1) - jnp.take_along_axis(s_raw, p_idx, axis=1)
        hinge = jnp.where(d >= 0.0, d, 0.0)  # torch.clamp(min=0): gradient 1 at 0
        loss_triplet = jnp.sum(jnp.where(real[:, None], hinge, 0.0)) / (n * pairs) * 2.0
        loss = loss + loss_triplet
    return loss


def loss_rec_fw(recfw_words_logit, words_label, words_mask, real, *, label_smoothing: float = 0.1):
    """``Criterion.loss_rec_fw`` / ``cal_nll_loss`` (``criterion.py`` L276-306): ``(loss, acc)``.

    Per word ``(1 - eps) * (-log p_y) + eps / C * (-sum_c log p_c)``, averaged over ALL valid words of the row
    (``words_mask``, not only the masked ones), then over the real rows. ``acc`` = the share of valid words whose
    argmax is the label, pooled over the batch (unweighted by rows), float32 as officially."""
    st = recfw_words_logit.dtype
    n_cls = recfw_words_logit.shape[-1]
    m = jnp.asarray(words_mask).astype(bool) & real[:, None]
    logit = jnp.where(m[..., None], recfw_words_logit, 0.0)
    label = jnp.where(m, jnp.asarray(words_label).astype(jnp.int32), 0)
    hit = (jnp.argmax(logit, axis=-1) == label) & m
    acc = jnp.sum(hit).astype(jnp.float32) / jnp.sum(m).astype(jnp.float32)  # ``.float()`` (L293-294): float32
    logp = jax.nn.log_softmax(logit, axis=-1)
    nll = -jnp.take_along_axis(logp, label[..., None], axis=-1)[..., 0]
    smooth = -jnp.sum(logp, axis=-1)
    nll = (1.0 - label_smoothing) * nll + label_smoothing / n_cls * smooth
    count = jnp.sum(m, axis=-1).astype(st)
    per_row = jnp.sum(jnp.where(m, nll, 0.0), axis=-1) / jnp.where(real, count, 1.0)
    return _mean_rows(per_row, real), acc


def _normalize(x, eps: float = 1e-12):
    """``F.normalize(p=2)``: ``x / max(||x||, eps)``."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), eps)


def _masked_mean(feat, mask, real):
    m = jnp.asarray(mask).astype(bool) & real[:, None]
    total = jnp.sum(jnp.where(m[..., None], feat, 0.0), axis=1)
    count = jnp.sum(m, axis=1).astype(feat.dtype)
    return total / jnp.where(real, count, 1.0)[:, None]


def loss_rec_ss(projed_video_feat, clip_mask, expanded_words_feat, expanded_words_mask, moments, row_group, *,
                iou_gamma: float = 0.9, recss_tau: float = 0.5):
    """``Criterion.loss_rec_ss`` (``criterion.py`` L223-274): supervised contrastive over the real rows.

    a_b = normalize(mean of ``projed_video_feat`` over ``clip_mask``); t_b = normalize(mean of
    ``expanded_words_feat`` over ``expanded_words_mask``); logits a_b . t_k / tau over every real row k (with
    the official max shift and ``+1e-6`` in the log). Positives: rows of the same item (``row_group``, the
    official ``block_diag`` over ``num_clips``) whose moments (R, 2) have GIoU >= ``iou_gamma`` (rows of other
    items have GIoU 0 in the block-diagonal matrix, so they are positives only if ``iou_gamma <= 0``).
    Loss = -mean over rows of the mean log-prob of the positives (``/(count + 1e-6)``, :func:`_count_plus_eps`)."""
    group = jnp.asarray(row_group)
    real = group >= 0
    st = projed_video_feat.dtype
    clip_feat = _normalize(_masked_mean(projed_video_feat, clip_mask, real))
    words_feat = _normalize(_masked_mean(expanded_words_feat, expanded_words_mask, real))
    clip_feat = jnp.where(real[:, None], clip_feat, 0.0)
    words_feat = jnp.where(real[:, None], words_feat, 0.0)
    mom = jnp.where(real[:, None], moments, jnp.asarray([0.0, 1.0], st))
    giou = generalized_temporal_iou(mom, mom)  # (R, R)
    same = group[:, None] == group[None, :]
    both = real[:, None] & real[None, :]
    pos = (jnp.where(same, giou, 0.0) >= iou_gamma) & both
    cos = (clip_feat @ words_feat.T) / recss_tau
    row_max = jnp.max(jnp.where(real[None, :], cos, -jnp.inf), axis=1, keepdims=True)
    logits = jnp.where(real[:, None], cos - row_max, 0.0)
    denom = jnp.sum(jnp.where(both, jnp.exp(logits), 0.0), axis=1, keepdims=True)
    log_prob = logits - jnp.log(denom + LOG_EPS)
    mlpp = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / _count_plus_eps(jnp.sum(pos, axis=1), st)
    return _mean_rows(-mlpp, real)


def _merged_moments(batch, st, multi_clip: bool):
    """``criterion.py`` L225-231: the row's moment; QVH: [min, max] over all coordinates of its valid windows."""
    _, moment, valid = _targets(batch, st, multi_clip)
    if not multi_clip:
        return moment[:, 0]
    lo = jnp.min(jnp.where(valid[..., None], moment, jnp.inf), axis=(1, 2))
    hi = jnp.max(jnp.where(valid[..., None], moment, -jnp.inf), axis=(1, 2))
    real = _real_rows(batch)
    return jnp.stack([jnp.where(real, lo, 0.0), jnp.where(real, hi, 1.0)], axis=-1)


# ---------------------------------------------------------------------------------------------- total

def mesm_weight_dict(cfg_loss: MESMLossConfig, *, n_aux: int, rec_fw: bool, rec_ss: bool) -> dict:
    """``runner.py`` ``build_criterion`` L309-330: the weight of each loss key, in the official order
    (``n_aux`` = dec_layers - 1 with ``aux_loss``, else 0)."""
    base = {"loss_span": cfg_loss.loss_span_coef, "loss_giou": cfg_loss.loss_giou_coef,
            "loss_label": cfg_loss.loss_label_coef, "loss_saliency": cfg_loss.loss_saliency_coef}
    weights = dict(base)
    for i in range(n_aux):
        weights.update({f"{k}_{i}": v for k, v in base.items() if k != "loss_saliency"})
    if rec_fw:
        weights["loss_rec_fw"] = cfg_loss.loss_recfw_coef
    if rec_ss:
        weights["loss_rec_ss"] = cfg_loss.loss_recss_coef
    return weights


def _layer_terms(layer, batch, indices, cfg_loss, multi_clip, st):
    real = _real_rows(batch)
    span, moment, valid = _targets(batch, st, multi_clip)
    indices = jnp.asarray(indices)
    if indices.shape != valid.shape:
        raise JaxprvrError("mesm_loss indices", f"an (R, W) = {valid.shape} array per decoder layer",
                           f"{indices.shape}")
    terms = loss_spans(_get(layer, "pred_spans", "mesm_loss outputs").astype(st), indices, span, moment, valid,
                       multi_clip=multi_clip)
    terms.update(loss_labels(_get(layer, "pred_logits", "mesm_loss outputs").astype(st), indices, valid, real,
                             eos_coef=cfg_loss.eos_coef))
    return terms


def mesm_loss(outputs: Mapping, batch: Mapping, cfg_loss: MESMLossConfig, *, multi_clip: bool,
              indices: Sequence | None = None, stable_neg_pair: bool = False):
    """``Criterion.forward`` (``criterion.py`` L319-367): ``(total, terms)``.

    ``outputs``: the model's dict under the official names (``pred_logits``, ``pred_spans``, ``aux_outputs``,
    ``saliency_scores``, ``neg_saliency_scores``; FW-MESM's ``recfw_words_logit`` (+ ``words_mask``, else the
    batch's); SS-MESM's ``projed_video_feat``, ``expanded_words_feat``, ``expanded_words_mask``). ``rec_fw`` is
    computed when ``recfw_words_logit`` is present (the model returns it in training only, as the official
    criterion skips it outside training, L343), ``rec_ss`` when ``expanded_words_feat`` is.
    ``multi_clip``: QVHighlights (Hungarian over windows, ``saliency_label`` as the rank labels, merged moments).
    ``indices``: ``None`` (match every layer, :func:`match_all`) or one (R, W) array per layer, ``[final, aux_0,
    ...]``. ``stable_neg_pair``: softplus for the neg_pair term (official: the literal -log(1 - sigmoid)).

    ``terms``: every official key (``loss_span``, ``loss_giou``, ``loss_label``, ``class_error``,
    ``loss_saliency``, ``loss_rec_fw``, ``rec_fw_acc``, ``loss_rec_ss`` and ``loss_span_i``, ``loss_giou_i``,
    ``loss_label_i``, ``class_error_i`` per aux layer i), unweighted; ``total`` = sum of weight x term over the
    weighted keys (:func:`mesm_weight_dict`), in the official key order.
    """
    st = _dtype(outputs)
    real = _real_rows(batch)
    aux = list(outputs.get("aux_outputs", ()))
    if indices is None:
        indices = match_all(outputs, batch, cfg_loss, multi_clip)
    indices = list(indices)
    if len(indices) != 1 + len(aux):
        raise JaxprvrError("mesm_loss indices", f"{1 + len(aux)} arrays (final layer + {len(aux)} aux layers)",
                           f"{len(indices)}")
    rec_fw = "recfw_words_logit" in outputs
    rec_ss = "expanded_words_feat" in outputs

    losses = _layer_terms(outputs, batch, indices[0], cfg_loss, multi_clip, st)
    if multi_clip:
        contrast = _get(batch, "saliency_label", "mesm_loss batch (multi_clip)")
    else:
        contrast = _get(batch, "clip_mask", "mesm_loss batch")
    losses["loss_saliency"] = loss_saliency(
        _get(outputs, "saliency_scores", "mesm_loss outputs").astype(st),
        _get(outputs, "neg_saliency_scores", "mesm_loss outputs").astype(st),
        _get(batch, "video_mask", "mesm_loss batch"), contrast, real, rank_coef=cfg_loss.rank_coef,
        use_triplet=cfg_loss.use_triplet, pos_idx=batch.get("pos_idx"), neg_idx=batch.get("neg_idx"),
        saliency_margin=cfg_loss.saliency_margin, stable_neg_pair=stable_neg_pair)
    if rec_fw:
        words_mask = outputs["words_mask"] if "words_mask" in outputs else _get(batch, "words_mask", "mesm_loss batch")
        losses["loss_rec_fw"], losses["rec_fw_acc"] = loss_rec_fw(
            jnp.asarray(outputs["recfw_words_logit"]).astype(st), _get(batch, "words_label", "mesm_loss batch"),
            words_mask, real, label_smoothing=cfg_loss.label_smoothing)
    if rec_ss:
        losses["loss_rec_ss"] = loss_rec_ss(
            _get(outputs, "projed_video_feat", "mesm_loss outputs").astype(st),
            _get(batch, "clip_mask", "mesm_loss batch").astype(bool) & _get(batch, "video_mask", "mesm_loss batch"),
            jnp.asarray(outputs["expanded_words_feat"]).astype(st),
            _get(outputs, "expanded_words_mask", "mesm_loss outputs"),
            _merged_moments(batch, st, multi_clip), batch["row_group"],
            iou_gamma=cfg_loss.iou_gamma, recss_tau=cfg_loss.recss_tau)
    for i, layer in enumerate(aux):
        for k, v in _layer_terms(layer, batch, indices[1 + i], cfg_loss, multi_clip, st).items():
            losses[f"{k}_{i}"] = v

    weights = mesm_weight_dict(cfg_loss, n_aux=len(aux), rec_fw=rec_fw, rec_ss=rec_ss)
    total = 0.0
    for k, v in losses.items():
        if k in weights:
            total = total + v * weights[k]
    return total, losses
