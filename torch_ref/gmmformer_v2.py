"""PyTorch twin of GMMFormer v2 (official ``GMMFormerV2_Net``, ``src/Models/gmmformerV2/model.py``).

Same API and output names as :class:`jaxprvr.models.gmmformer_v2.GMMFormerV2`. ``layer2`` of the clip /
frame DyGMMBlock has ``map_size`` / ``max_ctx_l`` outputs (the official literals 32 / 128).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_ref.layers import (DYGMM_WIDTHS, BertAttentionV2, DyGMMBlock, LinearLayer, QueryBranch,
                              as_tensor, max_scores, reset_parameters)


class GMMFormerV2(QueryBranch, nn.Module):
    def __init__(self, cfg, widths=DYGMM_WIDTHS):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.n_heads
        self._init_inputs(cfg, BertAttentionV2(d, h, cfg.drop), clip_rows=cfg.max_ctx_l)
        self.clip_input_proj = LinearLayer(cfg.visual_feat_dim, d, True, cfg.input_drop, True)
        self.clip_encoder = DyGMMBlock(d, h, cfg.map_size, cfg.sft_factor, cfg.drop, widths)
        self.frame_input_proj = LinearLayer(cfg.visual_feat_dim, d, True, cfg.input_drop, True)
        self.frame_encoder_1 = DyGMMBlock(d, h, cfg.max_ctx_l, cfg.sft_factor, cfg.drop, widths)
        self.modular_vector_mapping = nn.Linear(d, 1, bias=False)
        self.weight_token = nn.Parameter(torch.randn(1, 1, d))
        reset_parameters(self)  # weight_token (a raw Parameter) keeps its randn init, as official

    def _encode_video(self, clip_feats, frame_feats, frame_mask):
        clip_emb = self.clip_pos_embed(self.clip_input_proj(clip_feats))
        clips = self.clip_encoder(clip_emb, None, self.weight_token)
        fix = self.cfg.max_ctx_l - frame_feats.shape[1]
        if fix > 0:  # model.py:138-145
            frame_feats = F.pad(frame_feats, (0, 0, 0, fix))
            frame_mask = F.pad(frame_mask, (0, fix))
        frame_emb = self.frame_pos_embed(self.frame_input_proj(frame_feats))
        frames = self.frame_encoder_1(frame_emb, frame_mask, self.weight_token)
        frames = torch.where(frame_mask.unsqueeze(-1) == 1.0, frames, 0.0 * frames)
        return {"clip_feats": clips, "frame_feats": frames}, {"clip_embed": clip_emb, "frame_embed": frame_emb}

    def encode_video(self, clip_feats, frame_feats, frame_mask, frame_len=None):
        return self._encode_video(clip_feats, frame_feats, frame_mask)[0]

    def score(self, query, video):
        qn = F.normalize(query, dim=-1)
        clip, _ = max_scores(qn, F.normalize(video["clip_feats"], dim=-1))
        frame, _ = max_scores(qn, F.normalize(video["frame_feats"], dim=-1))
        return {"clip": clip, "frame": frame}

    def forward(self, batch, train: bool = False):
        self.train(train)
        dev, dt = next(self.parameters()).device, next(self.parameters()).dtype  # inputs follow the weights
        f = lambda k: as_tensor(batch[k], dev, dt)  # noqa: E731
        video, vstages = self._encode_video(f("clip_feats"), f("frame_feats"), f("frame_mask"))
        q, qstages = self._encode_query(f("query_feats"), f("query_mask"))
        q2 = self.encode_query(f("query_feats"), f("query_mask"))
        qn = F.normalize(q, dim=-1)
        clips, frames = video["clip_feats"], video["frame_feats"]
        clip, _ = max_scores(qn, F.normalize(clips, dim=-1))
        clip_raw, _ = max_scores(q, clips)
        frame, _ = max_scores(qn, F.normalize(frames, dim=-1))
        frame_raw, _ = max_scores(q, frames)
        scores = {"clip": clip, "clip_raw": clip_raw, "frame": frame, "frame_raw": frame_raw}
        aux = {"query": q, "query2": q2, **qstages, **vstages, "clip_feats": clips, "frame_feats": frames}
        return scores, aux
