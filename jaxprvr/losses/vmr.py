"""Training losses of MRNet (moment retrieval), batched with padding masks.

Official code (xian-sh/MRNet @ 53432f5; ``loss.py`` is MMN's): ``ret/modeling/ret_model/loss.py`` (``BceLoss``
L6-28, ``ContrastiveLoss`` L31-115), the model's inputs to them (``ret_model.py`` L563-584) and the total
(``ret/engine/trainer.py`` L67-106).

Batch layout (the VMR batch, see jaxprvr/models/mrnet.py): B video slots (``video_valid``), Q query slots per
video (``query_mask``), the GT ``moments`` (B, Q, 2) in seconds and ``iou2d`` (B, Q, N, N). A query counts when
its slot is real and its video is valid. Every loss here equals the official loss on the real queries and videos
alone (the official batch has no padding), and padded entries get zero gradient.

Proposals are the ``mask2d`` cells (static for a config; the model returns it as ``aux["mask2d"]``). The official
code gathers them with ``masked_select`` (row-major cell order); here every sum runs over all N x N cells with
the mask as a weight, which visits the same cells.

Tie rule of the top-k positives: ``torch.topk`` (L82) leaves the order of equal IoUs to the implementation, and
equal IoUs between grid proposals are common. Here ``jax.lax.top_k`` on the row-major cells picks, among equal
IoUs, the cell with the lower flat index ``i * N + j`` first (= the earlier cell in ``masked_select`` order).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr.config import MRNetLossConfig
from jaxprvr.errors import JaxprvrError

__all__ = ["BCE_LOG_CLAMP", "CONTRASTIVE_EPS", "ONLY_IOU_FACTOR", "l2_normalize", "box_iou", "iou_bce_loss",
           "contrastive_losses", "mrnet_loss"]

BCE_LOG_CLAMP = -100.0  # torch.nn.BCELoss clamps its log terms at -100
CONTRASTIVE_EPS = 1e-6  # loss.py L41, inside the log of L_sent
ONLY_IOU_FACTOR = 0.01  # trainer.py L104-106: the contrastive and sparsity terms after ONLY_IOU


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """``F.normalize``: ``x / max(||x||, eps)`` (finite gradient at 0)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def box_iou(a, b):
    """``utils.box_iou`` (ret/data/datasets/utils.py L19-27) of (..., Qa, 2) and (..., Qb, 2) spans:
    ``inter / (len_a + len_b - inter)`` with ``inter = max(min(e) - max(s), 0)``; 0/0 is NaN as there."""
    max_start = jnp.maximum(a[..., :, None, 0], b[..., None, :, 0])
    min_end = jnp.minimum(a[..., :, None, 1], b[..., None, :, 1])
    inter = jnp.maximum(min_end - max_start, 0.0)
    union = (a[..., 1] - a[..., 0])[..., :, None] + (b[..., 1] - b[..., 0])[..., None, :] - inter
    return inter / union


def _real_queries(batch, dtype):
    """(B, Q) 1.0 for a real query of a valid video."""
    qm = jnp.asarray(batch["query_mask"]).astype(dtype)
    vv = jnp.asarray(batch["video_valid"]).astype(dtype)
    return qm * vv[:, None]


def iou_bce_loss(iou_scores, iou2d, mask2d, real, min_iou: float, max_iou: float):
    """``BceLoss`` (loss.py L6-22): ``BCELoss(p, clamp((iou - min) / (max - min), 0, 1))`` averaged over the
    mask2d cells of every real query (``real`` (B, Q) 0/1). ``iou_scores`` (B, Q, N, N) = ``sigmoid(10 cos)``
    (masked cells; the rest is ignored)."""
    st = iou_scores.dtype
    w = real[:, :, None, None] * jnp.asarray(mask2d, st)[None, None]
    on = w > 0
    y = jnp.clip((iou2d.astype(st) - min_iou) / (max_iou - min_iou), 0.0, 1.0)  # linear_scale(iou).clamp(0, 1)
    p = jnp.where(on, iou_scores, 0.5)  # keeps log() finite (and its gradient) off the counted cells
    log_p = jnp.maximum(jnp.log(p), BCE_LOG_CLAMP)
    log_1mp = jnp.maximum(jnp.log(1.0 - p), BCE_LOG_CLAMP)
    bce = -(y * log_p + (1.0 - y) * log_1mp)
    return jnp.sum(jnp.where(on, bce, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


def contrastive_losses(map2d, txt_mem, iou2d, moments, mask2d, real, video_valid, cfg: MRNetLossConfig):
    """``ContrastiveLoss`` (loss.py L44-115): ``(loss_vid, loss_sent)``, unweighted.

    ``map2d`` (B, N, N, C) the contrastive-head map, ``txt_mem`` (B, Q, C) the query tokens after TransRet,
    ``iou2d`` (B, Q, N, N), ``moments`` (B, Q, 2) seconds, ``mask2d`` (N, N), ``real`` (B, Q), ``video_valid`` (B,).

    * positives: per real query the top-k cells by IoU (tie rule: module docstring); ``pos = cos(p, s) - margin``.
    * ``L_vid``: for each positive proposal, ``-(pos / tau_v - log sum_r exp((cos(p, s_r) - margin [r = q]) /
      tau_v))`` over the real sentences ``r`` of the batch, without the other sentences of the same video whose
      GT IoU with this one is >= sent_removal_iou (a true removal, L67-69, L108-109).
    * ``L_sent``: ``-(pos / tau_s - log(exp(pos / tau_s) + sum_same exp(cos [iou < neg_video_iou] / tau_s)
      + sum_other exp(cos / tau_s) + 1e-6))``: the same-video sum runs over every mask2d cell, the removed ones
      (IoU >= neg_video_iou) as ``exp(0) = 1`` (the cosine is multiplied by 0 before the exp, L95-96); the
      other-video sum over every cell of every other valid video (L97-104, L111-114).
    Both are means over (real queries x k).
    """
    st = jnp.result_type(map2d.dtype, jnp.float32)
    b, n, _, c = map2d.shape
    q = txt_mem.shape[1]
    k = int(cfg.num_pos_proposals)
    mask = jnp.asarray(mask2d, st).reshape(n * n)
    on = mask > 0
    real = real.astype(st)
    vv = jnp.asarray(video_valid).astype(st)

    feat = l2_normalize(map2d.astype(st).reshape(b, n * n, c))  # (B, NN, C)
    sent = l2_normalize(txt_mem.astype(st))  # (B, Q, C)
    iou1d = iou2d.astype(st).reshape(b, q, n * n)

    # Positives (L81-87): top-k mask cells by IoU; lax.top_k puts the lower index first among equal values.
    _, top = jax.lax.top_k(jnp.where(on[None, None], iou1d, -jnp.inf), k)  # (B, Q, K)
    sel = jnp.take_along_axis(feat[:, None], top[..., None], axis=2)  # (B, Q, K, C) = feat[b, top[b, q, k]]
    pos = jnp.einsum("bqkc,bqc->bqk", sel, sent) - cfg.margin  # vid_pos

    # L_vid (L88-89, L105-110).
    neg = jnp.einsum("bqkc,vrc->bqkvr", sel, sent)  # (B, Q, K, B, Q): cos(positive, every sentence slot)
    eye = (jnp.arange(b)[:, None, None, None] == jnp.arange(b)[None, None, :, None]) & \
          (jnp.arange(q)[None, :, None, None] == jnp.arange(q)[None, None, None, :])  # (B, Q, B, Q): r is q
    neg = (neg - cfg.margin * eye[:, :, None].astype(st)) / cfg.tau_video
    same_video = (jnp.arange(b)[:, None] == jnp.arange(b)[None, :])[:, None, :, None]  # (B, 1, B, 1)
    gt_iou = box_iou(moments.astype(st), moments.astype(st))  # (B, Q, Q) within each video
    # sent_mask (L58, L66-69, L108-109): 1 across videos; within a video GT IoU < sent_removal_iou, and the
    # sentence itself; columns restricted to the real sentences of the batch.
    kept = jnp.where(same_video, (gt_iou < cfg.sent_removal_iou)[:, :, None, :] | eye, True)
    sent_mask = kept & (real[None, None] > 0)  # (B, Q, B, Q)
    denom_vid = jnp.sum(jnp.where(sent_mask[:, :, None], jnp.exp(neg), 0.0), axis=(-2, -1))  # (B, Q, K)
    w = jnp.broadcast_to(real[..., None], pos.shape)
    n_terms = jnp.maximum(jnp.sum(w), 1.0)
    safe_denom = jnp.where(w > 0, denom_vid, 1.0)
    loss_vid = -jnp.sum(jnp.where(w > 0, pos / cfg.tau_video - jnp.log(safe_denom), 0.0)) / n_terms

    # L_sent (L93-104, L111-114).
    cos_all = jnp.einsum("bqc,vmc->bqvm", sent, feat)  # (B, Q, B, NN)
    low_iou = (iou1d < cfg.neg_video_iou).astype(st)  # (B, Q, NN): same-video cells kept as negatives
    cos_same = jnp.einsum("bqc,bmc->bqm", sent, feat)  # (B, Q, NN): the query's own video
    same = jnp.sum(jnp.where(on[None, None], jnp.exp(cos_same * low_iou / cfg.tau_sent), 0.0), axis=-1)  # (B, Q)
    other_video = (~(jnp.arange(b)[:, None] == jnp.arange(b)[None, :]))[:, None, :, None] & \
                  (vv > 0)[None, None, :, None] & on[None, None, None, :]  # (B, 1, B, NN)
    other = jnp.sum(jnp.where(other_video, jnp.exp(cos_all / cfg.tau_sent), 0.0), axis=(-2, -1))  # (B, Q)
    total = jnp.exp(pos / cfg.tau_sent) + (same + other)[..., None]  # (B, Q, K)
    loss_sent = -jnp.sum(jnp.where(w > 0, pos / cfg.tau_sent - jnp.log(total + CONTRASTIVE_EPS), 0.0)) / n_terms
    return loss_vid, loss_sent


def _mask2d(aux, mask2d):
    if mask2d is not None:
        return mask2d
    if "mask2d" not in aux:
        raise JaxprvrError("mrnet_loss", "aux['mask2d'] (the model's proposal mask) or mask2d=", "neither")
    return aux["mask2d"]


def mrnet_loss(outputs: Mapping, aux: Mapping, batch: Mapping, loss_cfg: MRNetLossConfig, epoch, batch_size: int,
               *, mask2d=None):
    """The MRNet training loss, ``trainer.py`` L90-106: ``(loss, terms)``.

    ``outputs``/``aux``: the model's (``iou_scores``, ``map2d``, ``txt_mem``; ``loss_sparsity`` and ``mask2d``).
    ``epoch``: the 1-based epoch (a traced int is fine). ``batch_size``: the CONFIGURED batch size (the
    threshold ``loss_ratio * batch_size * w_sparse`` of L67 uses it even for a short last batch).

    ``terms`` as the official meters log them (L92-95): ``loss_iou``, ``loss_vid`` and ``loss_sent`` (x
    w_contrastive), ``loss_sp`` (x w_sparse). Epochs <= only_iou_epoch: ``iou + (sent + vid + sp)``, plus ``sp``
    once more when ``sp >= threshold``; later epochs scale the contrastive and sparsity parts by 0.01.
    """
    mask = _mask2d(aux, mask2d)
    iou_scores = outputs["iou_scores"]
    st = jnp.result_type(iou_scores.dtype, jnp.float32)
    real = _real_queries(batch, st)
    loss_iou = iou_bce_loss(iou_scores, jnp.asarray(batch["iou2d"]), mask, real, loss_cfg.min_iou, loss_cfg.max_iou)
    loss_vid, loss_sent = contrastive_losses(outputs["map2d"], outputs["txt_mem"], jnp.asarray(batch["iou2d"]),
                                             jnp.asarray(batch["moments"]), mask, real, batch["video_valid"],
                                             loss_cfg)
    w_c = loss_cfg.w_contrastive
    loss_vid, loss_sent = loss_vid * w_c, loss_sent * w_c  # L92
    loss_sp = jnp.asarray(aux["loss_sparsity"]).astype(st) * loss_cfg.w_sparse  # L93
    threshold = loss_cfg.loss_ratio * batch_size * loss_cfg.w_sparse  # overall_min, L67
    full = jnp.asarray(epoch) <= loss_cfg.only_iou_epoch
    factor = jnp.where(full, 1.0, ONLY_IOU_FACTOR).astype(st)
    loss = loss_iou + (loss_sent + loss_vid + loss_sp) * factor  # L97-99 / L103-104 (x1 is exact)
    loss = loss + jnp.where(loss_sp >= threshold, loss_sp * factor, 0.0)  # L100-101 / L105-106
    terms = {"loss_iou": loss_iou, "loss_vid": loss_vid, "loss_sent": loss_sent, "loss_sp": loss_sp}
    return loss, terms


# The loss of each moment-retrieval family, by model name (the task reads this table).
LOSSES = {"mrnet": mrnet_loss}
