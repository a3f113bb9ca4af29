"""PyTorch twin of GMMFormer v1 (official ``GMMFormer_Net``, ``src/Models/gmmformer/model.py``).

Same API and output names as :class:`jaxprvr.models.gmmformer.GMMFormer`. Frames are statically padded; the
Gaussian grid of the frame branch is built on ``L_b = max(frame_len)`` (the official padded batch length),
or on the padded length when ``cfg.gmm_fixed_length``; padded rows/keys get no Gaussian (the key mask
removes them), so valid rows equal the official model run on the batch padded to ``L_b``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_ref.layers import (GMM_WIDTHS, BertAttention, GMMBlock, LinearLayer, QueryBranch,
                              as_tensor, attention_pool, max_scores,
                              reset_parameters)


def batch_frame_length(frame_len, frame_mask) -> int:
    """Official Gaussian grid length: max frame count over videos with any valid frame (>= 1)."""
    has = (frame_mask > 0).any(dim=-1)
    return max(int((frame_len.to(frame_mask.device).long() * has.long()).max()), 1)


class GMMFormer(QueryBranch, nn.Module):
    def __init__(self, cfg, widths=GMM_WIDTHS):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.n_heads
        self._init_inputs(cfg, BertAttention(d, h, cfg.drop), clip_rows=cfg.max_ctx_l)
        self.clip_input_proj = LinearLayer(cfg.visual_feat_dim, d, True, cfg.input_drop, True)
        self.clip_encoder = GMMBlock(d, h, cfg.drop, widths)
        self.clip_encoder_2 = GMMBlock(d, h, cfg.drop, widths)
        self.frame_input_proj = LinearLayer(cfg.visual_feat_dim, d, True, cfg.input_drop, True)
        self.frame_encoder_1 = GMMBlock(d, h, cfg.drop, widths)
        self.frame_encoder_2 = GMMBlock(d, h, cfg.drop, widths)
        self.modular_vector_mapping = nn.Linear(d, 1, bias=False)
        self.modular_vector_mapping_2 = nn.Linear(d, 1, bias=False)
        reset_parameters(self)

    def _encode_video(self, clip_feats, frame_feats, frame_mask, frame_len):
        clip_emb = self.clip_pos_embed(self.clip_input_proj(clip_feats))
        clips_1 = self.clip_encoder(clip_emb, None)
        clips = self.clip_encoder_2(clips_1, None)
        gmm_length = frame_feats.shape[1] if self.cfg.gmm_fixed_length else batch_frame_length(frame_len, frame_mask)
        frame_emb = self.frame_pos_embed(self.frame_input_proj(frame_feats))
        frames_1 = self.frame_encoder_1(frame_emb, frame_mask, gmm_length)
        frames = self.frame_encoder_2(frames_1, frame_mask, gmm_length)
        video_vec = attention_pool(self.modular_vector_mapping_2, frames, frame_mask)
        video = {"clip_feats": clips, "video_feats": video_vec}
        stages = {"clip_embed": clip_emb, "clip_feats_1": clips_1, "frame_embed": frame_emb,
                  "frame_feats_1": frames_1, "frame_feats": frames,
                  "gmm_length": torch.tensor(gmm_length, dtype=torch.int32)}
        return video, stages

    def encode_video(self, clip_feats, frame_feats, frame_mask, frame_len):
        return self._encode_video(clip_feats, frame_feats, frame_mask, as_tensor(frame_len))[0]

    def score(self, query, video):
        qn = F.normalize(query, dim=-1)
        clip, _ = max_scores(qn, F.normalize(video["clip_feats"], dim=-1))
        frame = torch.matmul(qn, F.normalize(video["video_feats"], dim=-1).t())
        return {"clip": clip, "frame": frame}

    def forward(self, batch, train: bool = False):
        self.train(train)
        dev, dt = next(self.parameters()).device, next(self.parameters()).dtype  # inputs follow the weights
        f = lambda k: as_tensor(batch[k], dev, dt)  # noqa: E731
        video, vstages = self._encode_video(f("clip_feats"), f("frame_feats"), f("frame_mask"),
                                            as_tensor(batch["frame_len"], dev, torch.long))
        q, qstages = self._encode_query(f("query_feats"), f("query_mask"))
        q2 = self.encode_query(f("query_feats"), f("query_mask"))
        qn = F.normalize(q, dim=-1)
        clips, vv = video["clip_feats"], video["video_feats"]
        clip, _ = max_scores(qn, F.normalize(clips, dim=-1))
        clip_raw, _ = max_scores(q, clips)
        scores = {"clip": clip, "clip_raw": clip_raw, "frame": torch.matmul(qn, F.normalize(vv, dim=-1).t()),
                  "frame_raw": torch.matmul(q, vv.t())}
        aux = {"query": q, "query2": q2, **qstages, **vstages, "clip_feats": clips, "video_feats": vv}
        return scores, aux
