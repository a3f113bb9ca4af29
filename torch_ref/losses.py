"""The official PRVR training losses in PyTorch, in the official (unpadded, loop-per-video) form.

A reference for :mod:`jaxprvr.losses.prvr`: same term names and weights, but written the way the official
code writes them, on an unpadded batch (every query and video is real). ``file:line`` references are to:

* ms-sl ``method/model.py``: total loss ``:81-113`` (weights 0.02 / 0.04 hard-coded at ``:102,106``),
  ``get_clip_triplet_loss`` ``:282-320``, ``get_frame_trip_loss`` ``:322-341``, ``get_neg_scores``
  ``:343-367``, ``get_ranking_loss`` ``:369-375``; ``method/model_components.py``: ``clip_nce`` ``:21-49``,
  ``frame_nce`` ``:52-79``;
* GMMFormer ``src/Losses/loss.py``: ``query_diverse_loss`` (QDL v1) ``:12-36``, ``loss.forward`` ``:48-78``,
  ``get_clip_triplet_loss`` ``:80-116`` (the same code as ms-sl's);
* GMMFormer_v2 ``src/Losses/loss.py``: QDL v2 ``:12-38``, ``loss.forward`` ``:50-81``;
  ``src/Models/gmmformerV2/model.py:91-116``: the optimal matching loss (scipy ``linear_sum_assignment``);
* MTM ``src/Losses/loss.py``: QDL (= v2) ``:8-32``, ``loss.forward`` ``:51-101`` (video NCE ``:76``, triplet
  weights ``:46-49``, reconstruction ``:79-93``), ``get_clip_triplet_loss`` ``:103-162`` (its own version: videos
  without queries skipped, pool from position 0, one draw per query); ``src/Models/MTM/model.py:253-270``: the
  optimal matching loss, 1.0 when no video has >= 2 queries.

Batch layout: ``query_labels (Q,)`` is the batch row of each query's video (ints; the queries of one video are
contiguous, as the official collate makes them), scores are ``(Q, B)`` (the MS-SL frame matrices ``(Q, Q)``).

Randomness. The official triplet losses draw their negatives inside the loss with the global torch RNG. Here the
draw is split out: ``sample_*`` functions draw *indices* exactly as the official code does (same sort, same
``torch.randint`` ranges), from an optional ``torch.Generator``; the loss functions take the indices.
:func:`total_loss` samples them unless a ``negatives`` dict is given (keys :func:`negative_keys`, the index
conventions of :mod:`jaxprvr.losses.prvr`):

* ``clip_t2v[q]`` / ``frame_t2v[q]``: the negative *video* of query ``q`` (official ``sample_indices``);
* ``clip_v2t[v]`` / ``frame_v2t[v]``: the negative *query* of video ``v``. The official code samples a score
  from the sorted list ``neg_pair_scores`` rather than an index; the query index of that score is
  returned here, and the loss reads the same entry of the score matrix (the same value and gradient);
* MS-SL ``frame_row[i]``: the column ``j != i`` of row ``i`` of the ``(Q, Q)`` frame matrix;
  ``frame_col[i]``: the row ``j != i`` of column ``i`` (official ``get_neg_scores`` on the transpose);
* GMMFormer v2 / MTM ``ot_assignment[q]`` (optional): the clip matched to query ``q`` (-1: none) instead of
  running the Hungarian matching;
* MTM ``clip_*``, ``frame_*``, ``video_*``: as ``clip_*`` above, drawn by MTM's own triplet sampler
  (:func:`sample_mtm_triplet_negatives`); ``-1`` means "no negative" (the official code then uses the positive
  score as the negative, a constant ``margin`` contribution).

Everything follows the device of its inputs (CPU or CUDA); the official ``.cuda()`` calls are not reproduced.
Where the official code crashes (a batch of one video: empty ``torch.randint`` range; no video with >= 2 queries:
``torch.stack([])``) these functions raise as well; MTM's code guards both cases, and so does its form here.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = [
    "LOSSES",
    "NEGATIVES",
    "MS_SL_CLIP_NCE_WEIGHT",
    "MS_SL_FRAME_NCE_WEIGHT",
    "label_dict",
    "clip_nce",
    "frame_nce",
    "sample_clip_triplet_negatives",
    "clip_triplet_loss",
    "sample_frame_triplet_negatives",
    "frame_triplet_loss",
    "sample_mtm_triplet_negatives",
    "mtm_triplet_loss",
    "reconstruction_loss",
    "query_diverse_loss_v1",
    "query_diverse_loss_v2",
    "optimal_matching_assignment",
    "optimal_matching_loss",
    "negative_keys",
    "sample_negatives",
    "total_loss",
]

MS_SL_CLIP_NCE_WEIGHT = 0.02  # ms-sl method/model.py:102
MS_SL_FRAME_NCE_WEIGHT = 0.04  # ms-sl method/model.py:106
MASK_VALUE = 999  # the "impossibly large" positive score of the official sorts (model.py:309,335)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

def _labels_list(query_labels) -> list[int]:
    if torch.is_tensor(query_labels):
        query_labels = query_labels.detach().cpu().numpy()
    return [int(x) for x in np.asarray(query_labels).reshape(-1)]


def label_dict(query_labels) -> dict[int, list[int]]:
    """``{video row: [query indices]}`` in order of first appearance (ms-sl ``model.py:92-99``)."""
    out: dict[int, list[int]] = {}
    for index, label in enumerate(_labels_list(query_labels)):
        out.setdefault(label, []).append(index)
    return out


def _index(idx, device) -> torch.Tensor:
    if torch.is_tensor(idx):
        return idx.to(device=device, dtype=torch.long)
    return torch.as_tensor(np.asarray(idx), dtype=torch.long, device=device)


def _like(x, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (numpy array or tensor) as a tensor of ``ref``'s dtype and device."""
    if torch.is_tensor(x):
        return x.to(device=ref.device, dtype=ref.dtype)
    return torch.as_tensor(np.asarray(x), dtype=ref.dtype, device=ref.device)


def _randint(low: int, high, size, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``torch.randint(low, high, size).to(device)`` as officially (drawn on the generator's device)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(low, high, size=size, generator=generator, device=gen_device).to(device)


# ----------------------------------------------------------------------------------------------------
# InfoNCE terms
# ----------------------------------------------------------------------------------------------------

def clip_nce(scores: torch.Tensor, query_labels) -> torch.Tensor:
    """Official ``clip_nce.forward`` (ms-sl ``model_components.py:26-47``) on unnormalised ``scores (Q, B)``.

    ``mean_q[LSE_v s_qv - s_{q,y(q)}] + mean_v[LSE_q s_qv - LSE_{q in Q(v)} s_qv]``; a video without a query
    keeps the zero of the initialised ``v2t_*`` tensors.
    """
    query_bsz, vid_bsz = scores.shape
    labels = _labels_list(query_labels)
    diagonal = torch.arange(query_bsz, device=scores.device)
    t2v_nominator = scores[diagonal, _index(labels, scores.device)]
    t2v_nominator = torch.logsumexp(t2v_nominator.unsqueeze(1), dim=1)
    t2v_denominator = torch.logsumexp(scores, dim=1)
    v2t_nominator = torch.zeros(vid_bsz).to(scores)
    v2t_denominator = torch.zeros(vid_bsz).to(scores)
    for i, label in label_dict(labels).items():
        v2t_nominator[i] = torch.logsumexp(scores[label, i], dim=0)
        v2t_denominator[i] = torch.logsumexp(scores[:, i], dim=0)
    return torch.mean(t2v_denominator - t2v_nominator) + torch.mean(v2t_denominator - v2t_nominator)


def frame_nce(scores: torch.Tensor) -> torch.Tensor:
    """Official MS-SL ``frame_nce.forward`` (``model_components.py:57-77``) on the unnormalised ``(Q, Q)``
    matrix: ``mean_i[LSE(concat(x[i, :], x[:, i])) - x[i, i]]`` (the diagonal counts twice in the denominator)."""
    bsz = scores.shape[0]
    x = scores.view(bsz, bsz, -1)
    nominator = x * torch.eye(bsz, dtype=scores.dtype, device=scores.device)[:, :, None]
    nominator = torch.logsumexp(nominator.sum(dim=1), dim=1)
    denominator = torch.cat((x, x.permute(1, 0, 2)), dim=1).view(bsz, -1)
    denominator = torch.logsumexp(denominator, dim=1)
    return torch.mean(denominator - nominator)


# ----------------------------------------------------------------------------------------------------
# Triplet ranking terms
# ----------------------------------------------------------------------------------------------------

def sample_clip_triplet_negatives(scores: torch.Tensor, query_labels, *, hard: bool, hard_pool_size: int,
                                  generator: Optional[torch.Generator] = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of the official ``get_clip_triplet_loss`` (ms-sl ``model.py:282-320``) -> ``(t2v (Q,), v2t (B,))``.

    Per video ``v`` (in order, one draw each when not ``hard``): the scores of the queries of other videos
    sorted descending; ``hard``: the first (the hardest, no pool), else position ``randint(0, n)``.
    Then per query: the scores with the positive set to 999 sorted descending, position
    ``randint(1, min(1 + hard_pool_size, B) if hard else B)`` (``:306-314``). The same order of RNG calls as
    officially, so a seeded global RNG reproduces the official draws.
    """
    s = scores.detach()
    labels = np.asarray(_labels_list(query_labels))
    n_q, n_v = s.shape
    v2t = torch.zeros(n_v, dtype=torch.long, device=s.device)
    for i in range(n_v):
        others = torch.as_tensor(np.where(labels != i)[0], dtype=torch.long, device=s.device)
        _, order = torch.sort(s[:, i][others], descending=True)
        if hard:
            pos = 0
        else:
            pos = int(_randint(0, order.shape[0], (1,), s.device, generator)[0])
        v2t[i] = others[order[pos]]
    text_indices = torch.arange(n_q, device=s.device)
    mask_score = s.clone()
    mask_score[text_indices, _index(labels, s.device)] = MASK_VALUE
    _, sorted_indices = torch.sort(mask_score, descending=True, dim=1)
    max_idx = min(1 + hard_pool_size, n_v) if hard else n_v
    t2v = sorted_indices[text_indices, _randint(1, max_idx, (n_q,), s.device, generator)]
    return t2v, v2t


def clip_triplet_loss(scores: torch.Tensor, query_labels, *, margin: float, t2v_negatives,
                      v2t_negatives) -> torch.Tensor:
    """Official ``get_clip_triplet_loss`` (ms-sl ``model.py:282-320``; GMMFormer ``loss.py:80-116``) on cosine
    ``scores (Q, B)`` with given negatives:
    ``sum_q [m + S[q, t2v_q] - S[q, y(q)]]_+ / Q + sum_v [m + S[v2t_v, v] - mean_{q in Q(v)} S[q, v]]_+ / B``."""
    v2t_scores = scores.t()
    t2v_scores = scores
    labels = np.asarray(_labels_list(query_labels))
    v2t_neg = _index(v2t_negatives, scores.device)
    v2t_loss = 0
    for i in range(v2t_scores.shape[0]):
        pos_pair_scores = torch.mean(v2t_scores[i][np.where(labels == i)])
        sample_neg_pair_scores = v2t_scores[i][v2t_neg[i]]
        v2t_loss += (margin + sample_neg_pair_scores - pos_pair_scores).clamp(min=0).sum()
    text_indices = torch.arange(t2v_scores.shape[0], device=scores.device)
    t2v_pos_scores = t2v_scores[text_indices, _index(labels, scores.device)]
    t2v_neg_scores = t2v_scores[text_indices, _index(t2v_negatives, scores.device)]
    t2v_loss = (margin + t2v_neg_scores - t2v_pos_scores).clamp(min=0)
    return t2v_loss.sum() / len(t2v_scores) + v2t_loss / len(v2t_scores)


def _sample_square(scores: torch.Tensor, *, hard: bool, hard_pool_size: int,
                   generator: Optional[torch.Generator]) -> torch.Tensor:
    """Official ``get_neg_scores`` (ms-sl ``model.py:343-367``) returning the sampled column per row."""
    bsz = len(scores)
    batch_indices = torch.arange(bsz, device=scores.device)
    masked = scores.detach().clone()
    masked[batch_indices, batch_indices] = MASK_VALUE
    _, sorted_indices = torch.sort(masked, descending=True, dim=1)
    max_idx = min(1 + hard_pool_size, bsz) if hard else bsz
    return sorted_indices[batch_indices, _randint(1, max_idx, (bsz,), scores.device, generator)]


def sample_frame_triplet_negatives(scores: torch.Tensor, *, hard: bool, hard_pool_size: int,
                                   generator: Optional[torch.Generator] = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of MS-SL ``get_frame_trip_loss`` (``model.py:322-341``) on the ``(Q, Q)`` frame matrix ->
    ``(row (Q,), col (Q,))``: the negative column of each row, then the negative row of each column."""
    row = _sample_square(scores, hard=hard, hard_pool_size=hard_pool_size, generator=generator)
    col = _sample_square(scores.t(), hard=hard, hard_pool_size=hard_pool_size, generator=generator)
    return row, col


def frame_triplet_loss(scores: torch.Tensor, *, margin: float, row_negatives, col_negatives) -> torch.Tensor:
    """Official MS-SL ``get_frame_trip_loss`` with given negatives (``model.py:322-375``):
    ``sum_i [m + S[i, row_i] - S[i, i]]_+ / N + sum_i [m + S[col_i, i] - S[i, i]]_+ / N``."""
    bsz = len(scores)
    diagonal = torch.arange(bsz, device=scores.device)
    pos_scores = scores[diagonal, diagonal]
    pos_query_neg_context = scores[diagonal, _index(row_negatives, scores.device)]
    neg_query_pos_context = scores.transpose(0, 1)[diagonal, _index(col_negatives, scores.device)]
    loss_neg_ctx = torch.clamp(margin + pos_query_neg_context - pos_scores, min=0).sum() / len(pos_scores)
    loss_neg_q = torch.clamp(margin + neg_query_pos_context - pos_scores, min=0).sum() / len(pos_scores)
    return loss_neg_ctx + loss_neg_q


# ----------------------------------------------------------------------------------------------------
# MTM triplet ranking and reconstruction terms
# ----------------------------------------------------------------------------------------------------

def sample_mtm_triplet_negatives(scores: torch.Tensor, query_labels, *, hard: bool, hard_pool_size: int,
                                 generator: Optional[torch.Generator] = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of MTM's ``get_clip_triplet_loss`` (MTM ``loss.py:103-152``) -> ``(t2v (Q,), v2t (B,))``, long,
    ``-1`` where the official code draws nothing.

    v2t (``:110-126``), per video ``i`` in order: no query -> skipped (``:112-113``); no query of another video ->
    no draw (``:117-118``); else the scores of the other videos' queries sorted descending and position
    ``randint(0, min(hard_pool_size, n) if hard else n, size=(1,))``; the *query index* of that score is returned.
    t2v (``:131-152``): the row with the positive set to ``-inf`` (officially written in place into the score
    matrix through ``.data``, ``:134-135``) sorted descending; the label removed from the order (``:140``); none
    left -> no draw (``:142-143``); else one ``randint(0, min(hard_pool_size, n) if hard else n, (1,))`` per query
    (``:145-151``), the video at that position. The official order of RNG calls, so a seeded generator gives the
    draws of the official global RNG with the same seed.
    """
    s = scores.detach()
    labels = np.asarray(_labels_list(query_labels))
    n_q, n_v = s.shape
    v2t = torch.full((n_v,), -1, dtype=torch.long, device=s.device)
    for i in range(n_v):
        if len(np.where(labels == i)[0]) == 0:
            continue
        neg_indices = np.where(labels != i)[0]
        if len(neg_indices) == 0:
            continue
        neg = torch.as_tensor(neg_indices, dtype=torch.long, device=s.device)
        _, order = torch.sort(s[:, i][neg], descending=True)
        n = order.shape[0]
        high = min(hard_pool_size, n) if hard else n
        pos = int(_randint(0, high, (1,), s.device, generator)[0])
        v2t[i] = neg[order[pos]]
    t2v = torch.full((n_q,), -1, dtype=torch.long, device=s.device)
    if n_q == 0:
        return t2v, v2t
    text_indices = torch.arange(n_q, device=s.device)
    mask_score = s.clone()
    mask_score[text_indices, _index(labels, s.device)] = -float("inf")
    _, sorted_indices = torch.sort(mask_score, descending=True, dim=1)
    sorted_indices = sorted_indices.cpu().tolist()
    for i in range(n_q):
        valid = [idx for idx in sorted_indices[i] if idx != labels[i]]
        if len(valid) == 0:
            continue
        high = min(hard_pool_size, len(valid)) if hard else len(valid)
        t2v[i] = valid[int(_randint(0, high, (1,), torch.device("cpu"), generator).item())]
    return t2v, v2t


def mtm_triplet_loss(scores: torch.Tensor, query_labels, *, margin: float, t2v_negatives,
                     v2t_negatives) -> torch.Tensor:
    """MTM's ``get_clip_triplet_loss`` (``loss.py:103-162``) on cosine ``scores (Q, B)`` with given negatives
    (``-1``: none, the positive score stands in, ``:118``, ``:143``):
    ``sum_q [m + S[q, t2v_q] - S[q, y(q)]]_+ / Q
    + sum_{v with queries} [m + S[v2t_v, v] - mean_{q in Q(v)} S[q, v]]_+ / B``
    (videos without a query add nothing but count in ``B``, ``:159``)."""
    labels = np.asarray(_labels_list(query_labels))
    n_q, n_v = scores.shape
    v2t_scores = scores.t()
    v2t_neg = [int(x) for x in _index(v2t_negatives, torch.device("cpu")).tolist()]
    v2t_loss = scores.new_zeros(())
    for i in range(n_v):
        pos_indices = np.where(labels == i)[0]
        if len(pos_indices) == 0:
            continue
        pos_pair_scores = torch.mean(v2t_scores[i][pos_indices])
        neg = pos_pair_scores if v2t_neg[i] < 0 else v2t_scores[i][v2t_neg[i]]
        v2t_loss = v2t_loss + (margin + neg - pos_pair_scores).clamp(min=0).sum()
    if n_q == 0:
        t2v_loss = scores.new_zeros(())
    else:
        text_indices = torch.arange(n_q, device=scores.device)
        label_idx = _index(labels, scores.device)
        t2v_idx = _index(t2v_negatives, scores.device)
        t2v_pos_scores = scores[text_indices, label_idx]
        # -1: the positive entry itself (official ``t2v_neg_scores_list.append(t2v_pos_scores[i])``)
        t2v_neg_scores = scores[text_indices, torch.where(t2v_idx >= 0, t2v_idx, label_idx)]
        t2v_loss = (margin + t2v_neg_scores - t2v_pos_scores).clamp(min=0).sum()
    return t2v_loss / max(n_q, 1) + v2t_loss / max(n_v, 1)


def reconstruction_loss(recon: torch.Tensor, target, mask) -> torch.Tensor:
    """MTM's text / video reconstruction term (``loss.py:79-92``): ``nn.MSELoss(reduction='sum')`` between
    ``normalize(recon) * mask`` and ``target * mask`` (the target is not normalised) over
    ``mask.sum() * D + 1e-6``. ``target (N, L, D)`` and ``mask (N, L)`` may be numpy arrays."""
    target = _like(target, recon)
    mask = _like(mask, recon)
    m = mask.unsqueeze(-1)
    sq = ((F.normalize(recon, dim=-1) * m - target * m) ** 2).sum()
    return sq / (mask.sum() * target.shape[-1] + 1e-6)


# ----------------------------------------------------------------------------------------------------
# Query-diverse losses
# ----------------------------------------------------------------------------------------------------

def _same_video_pairs(query_labels, bs: int, device) -> torch.Tensor:
    """The official ``N_one_hot``: a block of ones from each video's first to last query, minus the eye
    (GMMFormer ``loss.py:24-27``)."""
    n_one_hot = torch.zeros((bs, bs), device=device)
    for _, label in label_dict(query_labels).items():
        n_one_hot[label[0]:(label[-1] + 1), label[0]:(label[-1] + 1)] = torch.ones((len(label), len(label)),
                                                                                   device=device)
    return n_one_hot - torch.eye(bs, device=device)


def query_diverse_loss_v1(query: torch.Tensor, query_labels, *, margin: float, alpha: float) -> torch.Tensor:
    """GMMFormer ``query_diverse_loss.forward`` (``loss.py:18-36``):
    ``sum_j log(1 + sum_{i: (i,j) same video, i != j} exp(alpha (cos_ij + m))) / Q``."""
    bs = query.shape[0]
    x = F.normalize(query, dim=-1)
    cos = torch.matmul(x, x.t())
    n_one_hot = _same_video_pairs(query_labels, bs, query.device)
    neg_exp = torch.exp(alpha * (cos + margin))
    n_sim_sum = torch.where(n_one_hot == 1, neg_exp, torch.zeros_like(neg_exp)).sum(dim=0)
    return torch.log(1 + n_sim_sum).sum() / bs


def query_diverse_loss_v2(query: torch.Tensor, query_labels, *, margin: float, alpha: float,
                          lam: float) -> torch.Tensor:
    """GMMFormer_v2 ``query_diverse_loss.forward`` (``loss.py:19-38``): per pair
    ``(1 + cos)^lam log(1 + exp(alpha (cos + m)))``, summed, over ``Q``; the focal factor is not detached."""
    bs = query.shape[0]
    x = F.normalize(query, dim=-1)
    cos = torch.matmul(x, x.t())
    n_one_hot = _same_video_pairs(query_labels, bs, query.device)
    neg_exp = torch.exp(alpha * (cos + margin))
    n_sim_sum = torch.where(n_one_hot == 1, neg_exp, torch.zeros_like(neg_exp))
    focal = torch.where(n_one_hot == 1, cos, torch.zeros_like(cos))
    return (((1 + focal) ** lam) * torch.log(1 + n_sim_sum)).sum(dim=0).sum() / bs


# ----------------------------------------------------------------------------------------------------
# Optimal matching loss (GMMFormer v2)
# ----------------------------------------------------------------------------------------------------

def _matching_sim(clip_feats: torch.Tensor, query: torch.Tensor, video: int, queries: list[int]) -> torch.Tensor:
    """``-cos`` between the queries of ``video`` and its clips, ``(n_queries, n_clips)`` (``model.py:110``)."""
    return -1. * torch.matmul(F.normalize(clip_feats[video], dim=-1),
                              F.normalize(query[queries], dim=-1).t()).permute(1, 0)


def optimal_matching_assignment(clip_feats: torch.Tensor, query: torch.Tensor, query_labels) -> torch.Tensor:
    """The Hungarian matching of GMMFormer_v2 ``model.py:103-111`` as ``(Q,)`` long: the clip matched to each
    query of a video with >= 2 queries, -1 elsewhere (``scipy.optimize.linear_sum_assignment`` as officially)."""
    labels = _labels_list(query_labels)
    out = torch.full((len(labels),), -1, dtype=torch.long)
    with torch.no_grad():
        for k, v in label_dict(labels).items():
            if len(v) == 1:
                continue
            sim = _matching_sim(clip_feats, query, k, v)
            q_idx, c_idx = linear_sum_assignment(sim.detach().cpu())
            for qi, ci in zip(q_idx, c_idx):
                out[v[int(qi)]] = int(ci)
    return out.to(query.device)


def optimal_matching_loss(clip_feats: torch.Tensor, query: torch.Tensor, query_labels, *,
                          assignment=None, empty: Optional[float] = None) -> torch.Tensor:
    """GMMFormer_v2 optimal matching loss (``model.py:102-116``): ``1 + mean`` of the matched ``-cos`` entries
    pooled over every video with >= 2 queries (single-query videos are skipped, ``:107-108``).

    ``assignment (Q,)`` (clip per query, -1 = none) replaces the Hungarian matching; entries of single-query
    videos are ignored as the official loop skips them. When nothing is matched: ``empty=None`` raises
    (GMMFormer_v2: ``torch.stack([])`` fails); a number returns that constant (MTM ``model.py:267-270``:
    ``torch.tensor(1.0)``, no gradient).
    """
    labels = _labels_list(query_labels)
    total_sim = []
    if assignment is not None:
        assignment = [int(a) for a in _index(assignment, torch.device("cpu")).tolist()]
    for k, v in label_dict(labels).items():
        if len(v) == 1:
            continue
        sim = _matching_sim(clip_feats, query, k, v)
        if assignment is None:
            q_idx, c_idx = linear_sum_assignment(sim.detach().cpu())
        else:
            pairs = [(i, assignment[q]) for i, q in enumerate(v) if assignment[q] >= 0]
            q_idx, c_idx = [p[0] for p in pairs], [p[1] for p in pairs]
        for qi, ci in zip(q_idx, c_idx):
            total_sim.append(sim[int(qi), int(ci)])
    if not total_sim and empty is not None:
        return torch.tensor(float(empty), dtype=query.dtype, device=query.device)
    if not total_sim:
        raise ValueError("optimal_matching_loss: no video with >= 2 matched queries in the batch "
                         "(the official code fails on torch.stack([]))")
    return 1 + torch.stack(total_sim).mean()


# ----------------------------------------------------------------------------------------------------
# Negatives and the total loss
# ----------------------------------------------------------------------------------------------------

def _official_factors(loss_cfg, *, mtm: bool = False, v2: bool = False) -> tuple[list[float], list[float]]:
    """The official positional ``loss_factor`` and ``neg_factor`` lists from a named loss config
    (:mod:`jaxprvr.config`: ``w_clip_nce, w_frame_nce, w_qdl[, w_ot[, w_video_nce]]`` and
    ``qdl_margin, qdl_alpha[, qdl_lambda]``)."""
    lf = [loss_cfg.w_clip_nce, loss_cfg.w_frame_nce, loss_cfg.w_qdl]
    nf = [loss_cfg.qdl_margin, loss_cfg.qdl_alpha]
    if v2 or mtm:
        lf.append(loss_cfg.w_ot)
        nf.append(loss_cfg.qdl_lambda)
    if mtm:
        lf.append(loss_cfg.w_video_nce)
    return [float(f) for f in lf], [float(f) for f in nf]


def _sample_ms_sl(scores, query_labels, *, hard, hard_pool_size, generator):
    out = {}
    out["clip_t2v"], out["clip_v2t"] = sample_clip_triplet_negatives(
        scores["clip"], query_labels, hard=hard, hard_pool_size=hard_pool_size, generator=generator)
    out["frame_row"], out["frame_col"] = sample_frame_triplet_negatives(
        scores["frame"], hard=hard, hard_pool_size=hard_pool_size, generator=generator)
    return out


def _sample_gmm(scores, query_labels, *, hard, hard_pool_size, generator):
    out = {}
    for key in ("clip", "frame"):
        out[f"{key}_t2v"], out[f"{key}_v2t"] = sample_clip_triplet_negatives(
            scores[key], query_labels, hard=hard, hard_pool_size=hard_pool_size, generator=generator)
    return out


def _sample_mtm(scores, query_labels, *, hard, hard_pool_size, generator):
    out = {}
    for key in ("clip", "frame", "video"):
        out[f"{key}_t2v"], out[f"{key}_v2t"] = sample_mtm_triplet_negatives(
            scores[key], query_labels, hard=hard, hard_pool_size=hard_pool_size, generator=generator)
    return out


_GMM_NEGATIVES = ("clip_t2v", "clip_v2t", "frame_t2v", "frame_v2t")
# model -> (negative keys, official sampler): as jaxprvr.losses.prvr.NEGATIVES
NEGATIVES = {
    "ms_sl": (("clip_t2v", "clip_v2t", "frame_row", "frame_col"), _sample_ms_sl),
    "gmmformer": (_GMM_NEGATIVES, _sample_gmm),
    "gmmformer_v2": (_GMM_NEGATIVES, _sample_gmm),
    "mtm": (_GMM_NEGATIVES + ("video_t2v", "video_v2t"), _sample_mtm),
}


def _entry(table, model_name):
    if model_name not in table:
        raise ValueError(f"model name must be one of {list(table)}, got {model_name!r}")
    return table[model_name]


def negative_keys(model_name: str) -> tuple[str, ...]:
    """The keys of the ``negatives`` dict of :func:`total_loss` (as :func:`jaxprvr.losses.prvr.negative_keys`)."""
    return _entry(NEGATIVES, model_name)[0]


def sample_negatives(model_name: str, scores: Mapping[str, torch.Tensor], query_labels, *, hard: bool,
                     hard_pool_size: int, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """All negatives of one official training step, drawn in the official order (clip triplet, then frame
    triplet): ``clip_*`` from ``scores["clip"]``, ``frame_*`` from ``scores["frame"]``. MTM (``loss.py:71-77``):
    clip, frame, then ``video_*`` from ``scores["video"]``, each with :func:`sample_mtm_triplet_negatives`."""
    return _entry(NEGATIVES, model_name)[1](scores, query_labels, hard=hard, hard_pool_size=hard_pool_size,
                                            generator=generator)


def _ms_sl_terms(scores, aux, batch, labels, loss_cfg, negatives):
    """ms-sl ``model.py:81-113``: ``0.02 clip_nce(clip_raw) + clip_trip(clip) + 0.04 frame_nce(frame_raw)
    + frame_trip(frame)`` (weights hard-coded officially)."""
    margin = float(loss_cfg.margin)
    return {
        "clip_nce": MS_SL_CLIP_NCE_WEIGHT * clip_nce(scores["clip_raw"], labels),
        "clip_trip": clip_triplet_loss(scores["clip"], labels, margin=margin, t2v_negatives=negatives["clip_t2v"],
                                       v2t_negatives=negatives["clip_v2t"]),
        "frame_nce": MS_SL_FRAME_NCE_WEIGHT * frame_nce(scores["frame_raw"]),
        "frame_trip": frame_triplet_loss(scores["frame"], margin=margin, row_negatives=negatives["frame_row"],
                                         col_negatives=negatives["frame_col"]),
    }


def _gmm_terms(scores, aux, labels, loss_cfg, negatives, *, v2: bool):
    """GMMFormer ``loss.py:48-78`` / GMMFormer_v2 ``loss.py:50-81``: ``lf0 clip_nce(clip_raw) + clip_trip(clip)
    + lf1 clip_nce(frame_raw) + clip_trip(frame) + lf2 QDL1|QDL2(query2) [+ lf3 L_OT(clip_feats, query2)]``."""
    lf, nf = _official_factors(loss_cfg, v2=v2)
    margin = float(loss_cfg.margin)
    terms = {}
    for i, key in enumerate(("clip", "frame")):
        terms[f"{key}_nce"] = lf[i] * clip_nce(scores[f"{key}_raw"], labels)
        terms[f"{key}_trip"] = clip_triplet_loss(scores[key], labels, margin=margin,
                                                 t2v_negatives=negatives[f"{key}_t2v"],
                                                 v2t_negatives=negatives[f"{key}_v2t"])
    if not v2:
        terms["qdl"] = lf[2] * query_diverse_loss_v1(aux["query2"], labels, margin=nf[0], alpha=nf[1])
        return terms
    terms["qdl"] = lf[2] * query_diverse_loss_v2(aux["query2"], labels, margin=nf[0], alpha=nf[1], lam=nf[2])
    terms["ot"] = lf[3] * optimal_matching_loss(aux["clip_feats"], aux["query2"], labels,
                                                assignment=negatives.get("ot_assignment"))
    return terms


def _gmmformer_terms(scores, aux, batch, labels, loss_cfg, negatives):
    return _gmm_terms(scores, aux, labels, loss_cfg, negatives, v2=False)


def _gmmformer_v2_terms(scores, aux, batch, labels, loss_cfg, negatives):
    return _gmm_terms(scores, aux, labels, loss_cfg, negatives, v2=True)


def _mtm_terms(scores, aux, batch, labels, loss_cfg, negatives):
    """MTM ``loss.py:51-101``: ``lf0 clip_nce(clip_raw) + tlf0 trip(clip) + lf1 clip_nce(frame_raw)
    + tlf1 trip(frame) + lf4 clip_nce(video_raw) + tlf2 trip(video) + lf2 QDL2(query2) + lf3 L_OT(clip_feats, query2)
    + lr recon(recon_text, query_feats, query_mask) + lr recon(recon_video, frame_feats, frame_mask)`` with
    ``tlf = (w_clip_trip, w_frame_trip, w_video_trip)``, ``lr = w_recon``, ``trip`` = :func:`mtm_triplet_loss` and
    ``L_OT`` = 1.0 when no video has >= 2 queries (``model.py:267-270``)."""
    lf, nf = _official_factors(loss_cfg, mtm=True)
    tlf = [float(loss_cfg.w_clip_trip), float(loss_cfg.w_frame_trip), float(loss_cfg.w_video_trip)]
    lambda_recon = float(loss_cfg.w_recon)
    margin = float(loss_cfg.margin)
    terms = {}
    for key, nce_w, trip_w in (("clip", lf[0], tlf[0]), ("frame", lf[1], tlf[1]), ("video", lf[4], tlf[2])):
        terms[f"{key}_nce"] = nce_w * clip_nce(scores[f"{key}_raw"], labels)
        terms[f"{key}_trip"] = trip_w * mtm_triplet_loss(scores[key], labels, margin=margin,
                                                         t2v_negatives=negatives[f"{key}_t2v"],
                                                         v2t_negatives=negatives[f"{key}_v2t"])
    terms["qdl"] = lf[2] * query_diverse_loss_v2(aux["query2"], labels, margin=nf[0], alpha=nf[1], lam=nf[2])
    terms["ot"] = lf[3] * optimal_matching_loss(aux["clip_feats"], aux["query2"], labels,
                                                assignment=negatives.get("ot_assignment"), empty=1.0)
    terms["recon_text"] = lambda_recon * reconstruction_loss(aux["recon_text"], batch["query_feats"],
                                                             batch["query_mask"])
    terms["recon_video"] = lambda_recon * reconstruction_loss(aux["recon_video"], batch["frame_feats"],
                                                              batch["frame_mask"])
    return terms


# model -> its official loss terms: as jaxprvr.losses.prvr.LOSSES
LOSSES = {"ms_sl": _ms_sl_terms, "gmmformer": _gmmformer_terms, "gmmformer_v2": _gmmformer_v2_terms,
          "mtm": _mtm_terms}


def total_loss(model_name: str, scores: Mapping[str, torch.Tensor], aux: Mapping[str, torch.Tensor],
               batch: Mapping, loss_cfg, negatives: Optional[Mapping] = None, *, hard: bool = False,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The official training loss of ``model_name`` -> ``(loss, terms)`` (:data:`LOSSES`), terms as in the JAX
    ``total_loss``; ``loss_cfg`` a named loss config (:mod:`jaxprvr.config`), read into the official
    ``lf = loss_factor`` and ``nf = neg_factor`` lists (:func:`_official_factors`).

    ``scores``: ``clip``, ``clip_raw``, ``frame``, ``frame_raw`` (MTM also ``video``, ``video_raw``); ``aux``:
    ``query2`` (the second ``encode_query`` pass; MTM's ``video_query``, its first) and, for v2 / MTM,
    ``clip_feats`` (MTM also ``recon_text``, ``recon_video``); ``batch["query_labels"]`` (MTM also
    ``query_feats``, ``query_mask``, ``frame_feats``, ``frame_mask``: numpy arrays or tensors). ``negatives``
    (keys :func:`negative_keys`, optional ``ot_assignment``) replaces the sampling, which otherwise uses
    ``hard``, ``loss_cfg.hard_pool_size`` and ``generator``. Every term is weighted; they sum to the loss.
    """
    terms_fn = _entry(LOSSES, model_name)
    labels = _labels_list(batch["query_labels"])
    if negatives is None:
        negatives = sample_negatives(model_name, scores, labels, hard=hard, hard_pool_size=int(loss_cfg.hard_pool_size),
                                     generator=generator)
    else:
        missing = [k for k in negative_keys(model_name) if k not in negatives]
        if missing:
            raise KeyError(f"total_loss negatives: missing {missing}")
    terms = terms_fn(scores, aux, batch, labels, loss_cfg, negatives)
    loss = sum(terms.values())
    return loss, terms
