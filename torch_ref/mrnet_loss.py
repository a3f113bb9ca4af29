"""The official MRNet losses (``ret/modeling/ret_model/loss.py``, MMN's file verbatim), in PyTorch on CPU.

* :class:`BceLoss` (L6-22): BCE between ``sigmoid(10 cos)`` and the IoU scaled by ``(iou - min) / (max - min)``
  clamped to [0, 1], over the mask2d cells of every query, mean (``nn.BCELoss`` clamps its logs at -100).
* :class:`ContrastiveLoss` (L31-115), every quirk kept:

  - positives: ``torch.topk`` of each query's masked IoU (L82; tie order implementation-defined);
  - ``L_vid``: per positive proposal, a softmax over all the batch's sentences with logits
    ``(cos - margin [same sentence]) / tau_v``; same-video sentences whose GT IoU >= ``sent_removal_iou`` are
    removed (a 0 multiplying ``exp``, L109); the sentence itself stays (the identity added twice then clamped,
    L69, L108-109); the numerator carries ``- margin`` too (L86-87);
  - ``L_sent``: the denominator holds the positive (``cos - margin``), every valid proposal of the same video
    whose IoU < ``neg_video_iou`` and the others *multiplied by 0 before exp* (each still adds ``exp(0) = 1``,
    L95-96, L113), and every valid proposal of every other video; ``+ 1e-6`` inside the log (L114).

``box_iou`` is ``ret/data/datasets/utils.py`` L19-31 (NaN for two empty spans: ``NaN < x`` is False, so such a
sentence is not removed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BceLoss", "ContrastiveLoss", "box_iou"]


def box_iou(boxes1, boxes2):
    """utils.py L19-27: pairwise 1-D IoU of (n, 2) and (m, 2) spans."""
    area1 = boxes1[:, 1] - boxes1[:, 0]
    area2 = boxes2[:, 1] - boxes2[:, 0]
    max_start = torch.max(boxes1[:, None, 0], boxes2[:, 0])
    min_end = torch.min(boxes1[:, None, 1], boxes2[:, 1])
    inter = (min_end - max_start).clamp(min=0)
    return inter / (area1[:, None] + area2 - inter)


class BceLoss:
    """loss.py L6-22 (``epoch`` is accepted and unused, as officially)."""

    def __init__(self, min_iou, max_iou, mask2d):
        self.min_iou, self.max_iou, self.mask2d = min_iou, max_iou, mask2d
        self.bceloss = torch.nn.BCELoss(reduction="none")

    def linear_scale(self, iou):
        return (iou - self.min_iou) / (self.max_iou - self.min_iou)

    def __call__(self, scores2d, ious2d, epoch=1):
        iou1d = self.linear_scale(ious2d.masked_select(self.mask2d)).clamp(0, 1)
        scores1d = scores2d.masked_select(self.mask2d)
        return self.bceloss(scores1d, iou1d).mean()


class ContrastiveLoss:
    """loss.py L31-115. ``lcfg``: MRNetLossConfig (tau_video, tau_sent, neg_video_iou, num_pos_proposals,
    sent_removal_iou, margin)."""

    def __init__(self, lcfg, mask2d):
        self.mask2d = mask2d
        self.T_v, self.T_s = lcfg.tau_video, lcfg.tau_sent
        self.neg_iou, self.top_k = lcfg.neg_video_iou, lcfg.num_pos_proposals
        self.sent_removal_iou, self.margin = lcfg.sent_removal_iou, lcfg.margin
        self.eps = 1e-6

    def __call__(self, feat2ds, sent_feats, iou2ds, gt_proposals):
        """feat2ds (B, C, N, N) (the contrastive map); sent_feats list(B) (n_q, C) (post-TransRet query tokens);
        iou2ds list(B) (n_q, N, N); gt_proposals list(B) (n_q, 2) seconds. Returns ``(loss_vid, loss_sent)``."""
        B, C, _, _ = feat2ds.size()
        dev = feat2ds.device
        feat1ds_norm = F.normalize(feat2ds.masked_select(self.mask2d).reshape(B, C, -1), dim=1)
        sent_feat_cat = torch.cat(sent_feats, 0)
        S = sent_feat_cat.size(0)
        sent_feat_cat_norm = F.normalize(sent_feat_cat, dim=1)
        sent_mask = torch.ones(S, S, device=dev)
        bounds = [0]
        for s in sent_feats:
            bounds.append(bounds[-1] + s.size(0))
        for i, gt in enumerate(gt_proposals):  # L65-68: same-video sentences with high GT IoU are removed
            iou_mask = box_iou(gt, gt) < self.sent_removal_iou
            sent_mask[bounds[i]:bounds[i + 1], bounds[i]:bounds[i + 1]] = iou_mask.float()
        sent_mask += torch.diag(torch.ones(S, device=dev)).float()  # L69
        margin_mask = torch.diag(torch.ones(S, device=dev)) * self.margin
        vid_pos_list, vid_neg_list, sent_pos_list, sent_neg_list = [], [], [], []
        k = self.top_k
        for i, (sent_feat, iou2d) in enumerate(zip(sent_feats, iou2ds)):
            feat1d = feat1ds_norm[i, :, :]
            sent_feat = F.normalize(sent_feat, dim=1)
            iou1d = iou2d.masked_select(self.mask2d).reshape(sent_feat.size(0), -1)
            topk_index = torch.topk(iou1d, k, dim=-1)[1]
            selected = feat1d.index_select(dim=1, index=topk_index.reshape(-1)).reshape(C, -1, k).permute(1, 2, 0)
            vid_pos = torch.bmm(selected, sent_feat.unsqueeze(2)).reshape(-1, k) - self.margin
            vid_neg = torch.mm(selected.reshape(-1, C), sent_feat_cat_norm.t()).reshape(-1, k, S)
            vid_pos_list.append(vid_pos)
            vid_neg_list.append(vid_neg)
            sent_pos_list.append(vid_pos.clone())
            same = torch.mm(sent_feat, feat1d)
            same = (iou1d < self.neg_iou).float() * same  # zeroed, not removed: exp(0) = 1 stays (L95-96)
            rest = torch.arange(B, device=dev)
            others = feat1ds_norm.index_select(dim=0, index=rest[rest != i])
            others = torch.mm(sent_feat, others.transpose(1, 0).reshape(C, -1))
            sent_neg_list.append(torch.cat([vid_pos.clone().unsqueeze(2), same.unsqueeze(1).repeat(1, k, 1),
                                            others.unsqueeze(1).repeat(1, k, 1)], dim=2))
        vid_pos = torch.cat(vid_pos_list, dim=0).transpose(0, 1) / self.T_v
        vid_neg = (torch.cat(vid_neg_list, dim=0).permute(1, 0, 2) - margin_mask) / self.T_v
        sent_mask += torch.diag(torch.ones(S, device=dev)).float()  # L108
        vid_neg_exp = torch.exp(vid_neg) * sent_mask.clamp(min=0, max=1)
        loss_vid = -(vid_pos - torch.log(vid_neg_exp.sum(dim=2, keepdim=False))).mean()
        sent_pos = torch.cat(sent_pos_list, dim=0) / self.T_s
        sent_neg_exp = torch.exp(torch.cat(sent_neg_list, dim=0) / self.T_s)
        loss_sent = -(sent_pos - torch.log(sent_neg_exp.sum(dim=2, keepdim=False) + self.eps)).mean()
        return loss_vid, loss_sent
