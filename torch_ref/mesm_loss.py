"""MESM's matcher, criterion and training recipe, twin of ``model/matcher.py``, ``model/criterion.py``,
``utils/span_utils.py`` and ``runner.py`` L300-352 / ``train.py`` L42-98 (lntzm/MESM @ 8501bdea; vmr.md B3, B4).

* :class:`HungarianMatcher`: cost ``cost_span·L1(cx, w) − cost_giou·GIoU(st, ed) − cost_class·p_fg`` (foreground
  = class 0). Single-moment datasets: per row, ``linear_sum_assignment`` on the row's 10x1 cost column (the
  argmin query), returned as the official (B, 2) tensor ``[query, 0]``; QVH (``multi_clip``): per row over its
  <= 5 windows, a list of ``(query_idx, window_idx)``.
* :class:`Criterion`: ``loss_span`` (L1 mean), ``loss_giou`` (1 − GIoU mean), ``loss_label`` (2-way CE,
  ``empty_weight = [1, eos_coef]``, ``reduction="none"`` then a plain ``.mean()``), ``loss_saliency``
  (rank-contrastive / rank_coef + negative-pair + optional triplet), ``loss_rec_fw`` (label-smoothed MLM NLL over
  all valid words), ``loss_rec_ss`` (supervised contrastive over the rows, positives GIoU >= gamma in the same
  video), the ``_0`` aux keys on decoder layer 0 (span + label, its own matching); the total is
  ``Σ weight_dict[k] · losses[k]`` in the official order. Each term is callable alone; ``indices`` /
  ``aux_indices`` inject the matchings; :attr:`Criterion.last_indices` holds those used.
* the positive counts ``pos_mask.sum(1) + 1e-6`` (saliency, rec_ss) are taken in the losses' dtype; officially the
  long count plus a Python float lands in torch's *default* dtype (float32 unless changed), so a float64 twin
  equals an official run whose default dtype is float64 (the two agree in float32); likewise the CE class weights
  ``[1, eos_coef]`` (the official ``empty_weight`` buffer, built in the default dtype) are taken in the logits'.
* ``generalized_temporal_iou`` casts to float32 (``spans.float()``, ``span_utils.py`` L313-314) as officially, so
  GIoU terms are float32-precise even in a float64 run; ``giou_float32=False`` keeps the input dtype.
* :func:`official_optimizer` (AdamW over the trainable parameters + StepLR) and :func:`official_step`
  (``train.py`` L62-76: forward, criterion, ``zero_grad``, backward, ``clip_grad_norm_``, step).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from jaxprvr.errors import JaxprvrError
from torch_ref.mesm import MULTI_MOMENT, MESMOptions, prepare_batch

__all__ = ["HungarianMatcher", "Criterion", "build_criterion", "build_weight_dict", "official_optimizer",
           "official_step", "span_cxw_to_xx", "span_xx_to_cxw", "temporal_iou", "generalized_temporal_iou",
           "LOSS_FIELDS"]

# MESMLossConfig field -> the opt.json name (identical) read by build_criterion
LOSS_FIELDS = ("set_cost_span", "set_cost_giou", "set_cost_class", "loss_span_coef", "loss_giou_coef",
               "loss_label_coef", "loss_saliency_coef", "eos_coef", "loss_recfw_coef", "loss_recss_coef",
               "iou_gamma", "recss_tau", "rank_coef", "use_triplet", "saliency_margin")


# ---------------------------------------------------------------------------------------------- spans


def span_xx_to_cxw(xx):
    return torch.stack([xx.sum(-1) * 0.5, xx[..., 1] - xx[..., 0]], dim=-1)


def span_cxw_to_xx(cxw):
    return torch.stack([cxw[..., 0] - 0.5 * cxw[..., 1], cxw[..., 0] + 0.5 * cxw[..., 1]], dim=-1)


def temporal_iou(spans1, spans2):
    """(N, M) IoU and union of [st, ed] spans (``span_utils.py`` L247-274)."""
    areas1 = spans1[:, 1] - spans1[:, 0]
    areas2 = spans2[:, 1] - spans2[:, 0]
    left = torch.max(spans1[:, None, 0], spans2[:, 0])
    right = torch.min(spans1[:, None, 1], spans2[:, 1])
    inter = (right - left).clamp(min=0)
    union = areas1[:, None] + areas2 - inter
    return inter / union, union


def generalized_temporal_iou(spans1, spans2, float32: bool = True):
    """``IoU − (enclosing − union) / enclosing`` (``span_utils.py`` L294-323), in float32 as officially
    (``.float()``) unless ``float32=False``. Spans must satisfy ed >= st (the official asserts)."""
    if float32:
        spans1, spans2 = spans1.float(), spans2.float()
    if not bool((spans1[:, 1] >= spans1[:, 0]).all()) or not bool((spans2[:, 1] >= spans2[:, 0]).all()):
        raise JaxprvrError("generalized_temporal_iou", "spans with end >= start", "an inverted span")
    iou, union = temporal_iou(spans1, spans2)
    left = torch.min(spans1[:, None, 0], spans2[:, 0])
    right = torch.max(spans1[:, None, 1], spans2[:, 1])
    enclosing = (right - left).clamp(min=0)
    return iou - (enclosing - union) / enclosing


# ---------------------------------------------------------------------------------------------- matcher


class HungarianMatcher(nn.Module):
    """``model/matcher.py`` L9-117 (no parameters)."""

    def __init__(self, cost_class: float = 1, cost_span: float = 1, cost_giou: float = 1,
                 span_loss_type: str = "l1", max_v_l: int = 75, multi_clip: bool = False,
                 giou_float32: bool = True):
        super().__init__()
        self.cost_class, self.cost_span, self.cost_giou = cost_class, cost_span, cost_giou
        self.span_loss_type, self.max_v_l, self.multi_clip = span_loss_type, max_v_l, multi_clip
        self.foreground_label = 0
        self.giou_float32 = giou_float32
        if cost_class == 0 and cost_span == 0 and cost_giou == 0:
            raise JaxprvrError("HungarianMatcher", "a non-zero cost", "all costs 0")
        if span_loss_type != "l1":
            raise JaxprvrError("HungarianMatcher span_loss_type", "l1", span_loss_type)

    def cost_matrix(self, outputs, targets) -> torch.Tensor:
        """(B, nq, T): every query of every row against every target (window) of the batch."""
        bs, nq = outputs["pred_spans"].shape[:2]
        if self.multi_clip:
            moments = torch.cat([v["moments"] for v in targets["norm_moment"]])
            spans = torch.cat([v["spans"] for v in targets["norm_span"]])
        else:
            moments, spans = targets["norm_moment"], targets["norm_span"]
        out_prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)
        tgt_ids = torch.full([len(spans)], self.foreground_label)
        cost_class = -out_prob[:, tgt_ids]
        out_spans = outputs["pred_spans"].flatten(0, 1)
        cost_span = torch.cdist(out_spans, spans, p=1)
        cost_giou = -generalized_temporal_iou(span_cxw_to_xx(out_spans), moments, self.giou_float32)
        c = self.cost_span * cost_span + self.cost_giou * cost_giou + self.cost_class * cost_class
        return c.view(bs, nq, -1).cpu()

    @torch.no_grad()
    def forward(self, outputs, targets):
        c = self.cost_matrix(outputs, targets)
        if self.multi_clip:
            sizes = [len(v["spans"]) for v in targets["norm_span"]]
            idx = [linear_sum_assignment(part[i].numpy()) for i, part in enumerate(c.split(sizes, -1))]
            return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in idx]
        idx = [linear_sum_assignment(c[i, :, i].unsqueeze(1).numpy()) for i in range(c.shape[-1])]
        return torch.from_numpy(np.array(idx).squeeze(-1))


# ---------------------------------------------------------------------------------------------- criterion


def _as_indices(indices, multi_clip: bool):
    """Injected matchings: single-moment a (B,) query vector or the official (B, 2) ``[query, 0]``; QVH a list of
    ``(query_idx, window_idx)`` pairs."""
    if multi_clip:
        return [(torch.as_tensor(np.asarray(i), dtype=torch.int64), torch.as_tensor(np.asarray(j), dtype=torch.int64))
                for i, j in indices]
    t = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    if t.ndim == 1:
        t = torch.stack([t, torch.zeros_like(t)], dim=1)
    if t.ndim != 2 or t.shape[1] != 2:
        raise JaxprvrError("Criterion indices", "(B,) query indices or the official (B, 2) [query, 0]",
                           f"shape {tuple(t.shape)}")
    return t


class Criterion(nn.Module):
    """``model/criterion.py`` L9-367 (the ``empty_weight`` buffer ``[1, eos_coef]`` in the default dtype)."""

    def __init__(self, matcher, weight_dict, losses, eos_coef, span_loss_type, max_video_l, rank_coef, use_triplet,
                 saliency_margin=1, multi_clip=False, gamma=0.9, recss_tau=0.5, label_smoothing=0.1,
                 giou_float32: bool = True):
        super().__init__()
        self.matcher, self.weight_dict, self.losses = matcher, dict(weight_dict), list(losses)
        self.span_loss_type, self.max_video_l, self.saliency_margin = span_loss_type, max_video_l, saliency_margin
        self.foreground_label, self.background_label = 0, 1
        self.eos_coef = eos_coef
        empty_weight = torch.ones(2)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)
        self.rank_coef, self.use_triplet = rank_coef, use_triplet
        self.rec_ss, self.rec_fw = "rec_ss" in losses, "rec_fw" in losses
        self.multi_clip, self.gamma, self.recss_tau = multi_clip, gamma, recss_tau
        self.label_smoothing = label_smoothing
        self.giou_float32 = giou_float32
        self.last_indices: dict = {}

    @staticmethod
    def _src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch_idx, torch.cat([src for src, _ in indices])

    # -- terms (each takes the model outputs, the prepared batch and the matching)

    def loss_spans(self, outputs, targets, indices):
        """``loss_span`` = mean |pred − gt| over (cx, w); ``loss_giou`` = mean (1 − GIoU) (L71-110)."""
        if self.multi_clip:
            src = outputs["pred_spans"][self._src_permutation_idx(indices)]
            tgt = torch.cat([t["spans"][i] for t, (_, i) in zip(targets["norm_span"], indices)], dim=0)
            tgt_moments = span_cxw_to_xx(tgt)
        else:
            src = outputs["pred_spans"][torch.arange(indices.shape[0]), indices[:, 0], :]
            tgt, tgt_moments = targets["norm_span"], targets["norm_moment"]
        loss_span = F.l1_loss(src, tgt, reduction="none")
        loss_giou = 1 - torch.diag(generalized_temporal_iou(span_cxw_to_xx(src), tgt_moments, self.giou_float32))
        return {"loss_span": loss_span.mean(), "loss_giou": loss_giou.mean()}

    def loss_labels(self, outputs, targets, indices, log=True):
        """Plain-mean weighted CE, matched queries foreground (0), the rest background (1) (L112-137)."""
        logits = outputs["pred_logits"]
        target_classes = torch.full(logits.shape[:2], self.background_label, dtype=torch.int64,
                                    device=logits.device)
        if self.multi_clip:
            idx = self._src_permutation_idx(indices)
        else:
            idx = (torch.arange(indices.shape[0], device=logits.device), indices[:, 0].to(logits.device))
        target_classes[idx] = self.foreground_label
        weight = torch.tensor([1.0, self.eos_coef], dtype=logits.dtype, device=logits.device)  # = empty_weight
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight, reduction="none")
        losses = {"loss_label": loss_ce.mean()}
        if log:
            with torch.no_grad():
                matched = logits[idx]
                pred = matched.topk(1, 1, True, True)[1].t()
                correct = pred.eq(self.foreground_label)[:1].reshape(-1).float().sum(0)
                losses["class_error"] = 100 - correct * (100.0 / matched.shape[0])
        return losses

    def loss_saliency(self, outputs, targets, indices=None, log=True):
        """neg_pair + rank_contrastive / rank_coef (+ triplet) (L139-221)."""
        vid_token_mask = targets["video_mask"].to(outputs["saliency_scores"].dtype)
        neg = outputs["neg_saliency_scores"].clone()
        loss_neg_pair = (-torch.log(1.0 - torch.sigmoid(neg)) * vid_token_mask).sum(dim=1).mean()
        scores = outputs["saliency_scores"].clone()
        if "saliency_label" in targets and targets["saliency_label"] is not None:
            label = targets["saliency_label"]
        else:
            label = targets["clip_mask"].to(scores.dtype)
        scores = torch.cat([scores, neg], dim=1)
        label = torch.cat([label, torch.zeros_like(label)], dim=1)
        vid_token_mask = vid_token_mask.repeat([1, 2])
        scores = vid_token_mask * scores + (1.0 - vid_token_mask) * -1e3
        tau = 0.5
        loss_rank = 0.0
        for rank in range(1, 12):
            drop_mask = ~(label > 100)
            pos_mask = label >= rank
            if torch.sum(pos_mask) == 0:
                continue
            batch_drop_mask = torch.sum(pos_mask, dim=1) > 0
            cur = scores * drop_mask / tau + ~drop_mask * -1e3
            logits = cur - torch.max(cur, dim=1, keepdim=True)[0]
            log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True) + 1e-6)
            count = pos_mask.sum(1).to(log_prob.dtype)  # long + 1e-6 is the default dtype's officially
            mean_log_prob_pos = (pos_mask * log_prob * vid_token_mask).sum(1) / (count + 1e-6)
            loss_rank = loss_rank + (-mean_log_prob_pos * batch_drop_mask).mean()
        loss = loss_rank / self.rank_coef + loss_neg_pair
        if self.use_triplet:
            s = outputs["saliency_scores"]
            pos_idx, neg_idx = targets["pos_idx"].to(s.device), targets["neg_idx"].to(s.device)
            pairs = pos_idx.shape[1]
            rows = torch.arange(len(s), device=s.device)
            pos = torch.stack([s[rows, pos_idx[:, c]] for c in range(pairs)], dim=1)
            negs = torch.stack([s[rows, neg_idx[:, c]] for c in range(pairs)], dim=1)
            loss = loss + torch.clamp(self.saliency_margin + negs - pos, min=0).sum() / (len(pos) * pairs) * 2
        return {"loss_saliency": loss}

    def loss_rec_ss(self, outputs, targets, indices=None, log=True):
        """SS-MESM's supervised contrastive loss over the batch rows (L223-274)."""
        num_clips = targets["num_clips"]
        if self.multi_clip:
            merged = torch.stack([torch.stack([m["moments"].min(), m["moments"].max()])
                                  for m in targets["norm_moment"]])
        else:
            merged = targets["norm_moment"]
        iou = None
        for moments in torch.split(merged, num_clips.tolist()):
            g = generalized_temporal_iou(moments, moments, self.giou_float32)
            iou = g if iou is None else torch.block_diag(iou, g)
        pos_mask = iou >= self.gamma
        clip_mask = targets["clip_mask"].unsqueeze(-1)
        clip_feat = (outputs["projed_video_feat"] * clip_mask).sum(dim=1) / clip_mask.sum(dim=1)
        words_mask = outputs["expanded_words_mask"].unsqueeze(-1)
        words_feat = (outputs["expanded_words_feat"] * words_mask).sum(dim=1) / words_mask.sum(dim=1)
        cos = F.normalize(clip_feat, dim=-1, p=2) @ F.normalize(words_feat, dim=-1, p=2).permute(1, 0)
        cos = cos / self.recss_tau
        logits = cos - torch.max(cos, dim=1, keepdim=True)[0]
        log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True) + 1e-6)
        mean_log_prob_pos = (pos_mask * log_prob).sum(1) / (pos_mask.sum(1).to(log_prob.dtype) + 1e-6)
        return {"loss_rec_ss": (-mean_log_prob_pos).mean()}

    def cal_nll_loss(self, logit, idx, mask):
        """Label-smoothed NLL, ``(1-ε)(−log p_y) + ε/C Σ_c (−log p_c)``, averaged over the valid words of each row
        (``words_mask``: all of them, not only the masked ones) (L291-306). Returns (per-row loss, accuracy)."""
        eps = self.label_smoothing
        acc = (logit.max(dim=-1)[1] == idx).float()
        mean_acc = (acc * mask).sum() / mask.sum()
        logp = logit.log_softmax(dim=-1)
        nll = -logp.gather(dim=-1, index=idx.unsqueeze(-1)).squeeze(-1)
        smooth = -logp.sum(dim=-1)
        nll = (1 - eps) * nll + eps / logp.size(-1) * smooth
        nll = nll.masked_fill(mask == 0, 0)
        return (nll.sum(dim=-1) / mask.sum(dim=-1)).contiguous(), mean_acc

    def loss_rec_fw(self, outputs, targets, indices=None, log=True):
        nll, acc = self.cal_nll_loss(outputs["recfw_words_logit"], targets["words_label"].to(
            outputs["recfw_words_logit"].device), outputs["words_mask"])
        return {"loss_rec_fw": nll.mean(), "rec_fw_acc": acc}

    def get_loss(self, loss, outputs, targets, indices, **kwargs):
        fn = {"span": self.loss_spans, "label": self.loss_labels, "saliency": self.loss_saliency,
              "rec_ss": self.loss_rec_ss, "rec_fw": self.loss_rec_fw}.get(loss)
        if fn is None:
            raise JaxprvrError("Criterion losses", "span | label | saliency | rec_ss | rec_fw", repr(loss))
        return fn(outputs, targets, indices, **kwargs)

    def prepare(self, targets, like: torch.Tensor) -> dict:
        """The batch as the criterion reads it (:func:`torch_ref.mesm.prepare_batch` in the outputs' dtype)."""
        return prepare_batch(targets, dtype=like.dtype, device=like.device, multi_clip=self.multi_clip)

    def forward(self, outputs, targets, is_training: bool = True, indices=None, aux_indices: Optional[Sequence] = None):
        """``(losses, total)`` as officially (L319-367). ``indices`` / ``aux_indices`` (one per aux layer)
        replace the matcher's; the matchings used are left in :attr:`last_indices`."""
        targets = self.prepare(targets, outputs["pred_spans"])
        main = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(main, targets) if indices is None else _as_indices(indices, self.multi_clip)
        self.last_indices = {"main": indices, "aux": []}
        losses = {}
        for loss in self.losses:
            if loss == "rec_fw" and not is_training:
                continue
            losses.update(self.get_loss(loss, outputs, targets, indices))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            ind = (self.matcher(aux, targets) if aux_indices is None
                   else _as_indices(aux_indices[i], self.multi_clip))
            self.last_indices["aux"].append(ind)
            for loss in self.losses:
                if loss in ("saliency", "rec_ss", "rec_fw"):
                    continue
                losses.update({f"{k}_{i}": v for k, v in self.get_loss(loss, aux, targets, ind).items()})
        total = sum(losses[k] * self.weight_dict[k] for k in losses.keys() if k in self.weight_dict)
        return losses, total


def build_weight_dict(loss_cfg, aux_loss: bool, dec_layers: int, rec_fw: bool, rec_ss: bool):
    """``(weight_dict, losses)`` of ``build_criterion`` (``runner.py`` L309-327)."""
    g = (lambda k: loss_cfg[k]) if isinstance(loss_cfg, Mapping) else (lambda k: getattr(loss_cfg, k))
    losses = ["span", "label", "saliency"]
    weight_dict = {"loss_span": g("loss_span_coef"), "loss_giou": g("loss_giou_coef"),
                   "loss_label": g("loss_label_coef"), "loss_saliency": g("loss_saliency_coef")}
    if aux_loss:
        aux = {}
        for i in range(dec_layers - 1):
            aux.update({f"{k}_{i}": v for k, v in weight_dict.items() if k != "loss_saliency"})
        weight_dict.update(aux)
    if rec_fw:
        losses.append("rec_fw")
        weight_dict["loss_rec_fw"] = g("loss_recfw_coef")
    if rec_ss:
        losses.append("rec_ss")
        weight_dict["loss_rec_ss"] = g("loss_recss_coef")
    return weight_dict, losses


def build_criterion(cfg_model, cfg_loss=None, *, dataset_name: str, giou_float32: bool = True) -> Criterion:
    """``build_matcher`` + ``build_criterion`` (``runner.py`` L300-345) from a MESMConfig / opt.json dict /
    MESMOptions / the twin itself (its ``opts`` and ``loss_cfg``) and a MESMLossConfig (or the opt.json dict: the
    loss fields are read from it when ``cfg_loss`` is None)."""
    if hasattr(cfg_model, "opts") and isinstance(getattr(cfg_model, "opts"), MESMOptions):
        cfg_loss = cfg_loss if cfg_loss is not None else getattr(cfg_model, "loss_cfg", None)
        o = cfg_model.opts
    elif isinstance(cfg_model, MESMOptions):
        o = cfg_model
    elif isinstance(cfg_model, Mapping):
        o = MESMOptions.from_opt(cfg_model)
        cfg_loss = cfg_loss if cfg_loss is not None else cfg_model
    else:
        if cfg_loss is None and hasattr(cfg_model, "loss"):
            cfg_loss = cfg_model.loss
        o = MESMOptions.from_config(cfg_model)
    if cfg_loss is None:
        from jaxprvr.config import MESMLossConfig

        cfg_loss = MESMLossConfig()
    g = (lambda k, d=None: cfg_loss.get(k, d)) if isinstance(cfg_loss, Mapping) else (
        lambda k, d=None: getattr(cfg_loss, k, d))
    multi = dataset_name in MULTI_MOMENT
    matcher = HungarianMatcher(cost_span=g("set_cost_span"), cost_giou=g("set_cost_giou"),
                               cost_class=g("set_cost_class"), span_loss_type=o.span_loss_type,
                               max_v_l=o.max_video_l, multi_clip=multi, giou_float32=giou_float32)
    weight_dict, losses = build_weight_dict(cfg_loss, o.aux_loss, o.dec_layers, o.rec_fw, o.rec_ss)
    return Criterion(matcher, weight_dict, losses, eos_coef=g("eos_coef"), span_loss_type=o.span_loss_type,
                     max_video_l=o.max_video_l, rank_coef=g("rank_coef"), use_triplet=g("use_triplet"),
                     saliency_margin=g("saliency_margin"), multi_clip=multi, gamma=g("iou_gamma"),
                     recss_tau=g("recss_tau"), label_smoothing=g("label_smoothing", 0.1),
                     giou_float32=giou_float32)


# ---------------------------------------------------------------------------------------------- recipe


def official_optimizer(model: nn.Module, lr: float, wd: float, lr_drop: int = 400, gamma: float = 0.1):
    """``build_optimizer`` (``runner.py`` L348-352): AdamW (torch defaults: betas (0.9, 0.999), eps 1e-8) over the
    parameters with ``requires_grad`` in ``named_parameters`` order, and ``StepLR(lr_drop, gamma)`` stepped per
    epoch. Returns ``(optimizer, scheduler)``."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params}], lr=lr, weight_decay=wd)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, lr_drop, gamma=gamma)


def official_step(model: nn.Module, criterion: Criterion, batch: Mapping, optimizer, grad_clip: float, *,
                  dataset_name: str, words_feat=None, neg_index=None, masked_words=None, indices=None,
                  aux_indices=None) -> tuple[dict, Any]:
    """One step of ``train_epoch`` (``train.py`` L42-76): train mode, forward with ``is_training=True``, the
    criterion, ``zero_grad`` (torch 1.11's: grads zeroed, not freed), backward, ``clip_grad_norm_(grad_clip)``
    when > 0, ``optimizer.step()``. Returns ``(loss_dict, loss)``; the model's ``aux`` keeps the forward's
    intermediates and ``criterion.last_indices`` the matchings."""
    model.train()
    criterion.train()
    outputs = model(batch, words_feat=words_feat, dataset_name=dataset_name, is_training=True,
                    neg_index=neg_index, masked_words=masked_words)
    loss_dict, loss = criterion(outputs, batch, is_training=True, indices=indices, aux_indices=aux_indices)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss_dict, loss
