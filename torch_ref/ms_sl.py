"""PyTorch twin of MS-SL (official ``MS_SL_Net``, ms-sl ``method/model.py``) with the official state_dict keys.

Same API and output names as :class:`jaxprvr.models.ms_sl.MSSL`. ``pool_layers`` and the parameter-free
NCE criteria of the official module are represented by ``pool_layers`` only (no state in either).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_ref.layers import (BertAttention, LinearLayer, QueryBranch, as_tensor,
                              max_scores, reset_parameters)

KEY_CLIP_MASK_FILL = -1e9


class MSSL(QueryBranch, nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.n_heads
        self._init_inputs(cfg, BertAttention(d, h, cfg.drop), clip_rows=cfg.max_ctx_l)
        self.clip_input_proj = LinearLayer(cfg.visual_feat_dim, d, True, cfg.input_drop, True)
        self.clip_encoder = BertAttention(d, h, cfg.drop)
        self.frame_input_proj = LinearLayer(cfg.visual_feat_dim, d, True, cfg.input_drop, True)
        self.frame_encoder = BertAttention(d, h, cfg.drop)
        self.modular_vector_mapping = nn.Linear(d, 1, bias=False)
        self.pool_layers = nn.ModuleList([nn.Identity()] + [nn.AvgPool1d(i, stride=1)
                                                            for i in range(2, cfg.map_size + 1)])
        self.mapping_linear = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(2)])
        reset_parameters(self)

    # ------------------------------------------------------------------ encoders
    def encode_feat_map(self, x):
        pool_in = x.permute(0, 2, 1)
        return torch.cat([pool(pool_in).permute(0, 2, 1) for pool in self.pool_layers], dim=1)

    def _encode_video(self, clip_feats, frame_feats, frame_mask):
        clip_emb = self.clip_pos_embed(self.clip_input_proj(clip_feats))
        clips = self.clip_encoder(clip_emb, None)
        frame_emb = self.frame_pos_embed(self.frame_input_proj(frame_feats))
        frames = self.frame_encoder(frame_emb, frame_mask)
        proposals = self.encode_feat_map(clips)
        video = {"proposals": proposals, "frame_feats": frames, "frame_mask": frame_mask}
        return video, {"clip_embed": clip_emb, "clip_feats": clips, "frame_embed": frame_emb}

    def encode_video(self, clip_feats, frame_feats, frame_mask, frame_len=None):
        return self._encode_video(clip_feats, frame_feats, frame_mask)[0]

    # ------------------------------------------------------------------ key-clip attention
    def key_clip_attention_train(self, frames, proposals, frame_mask, key_clip_index, labels):
        """``key_clip_guided_attention`` (model.py:206-227) without the batch-of-1 squeezes: ``(Q, D)``."""
        q_idx = torch.arange(labels.shape[0], device=labels.device)
        selected = key_clip_index[q_idx, labels]
        ef = frames[labels]
        key = self.mapping_linear[0](ef)
        guide = proposals[labels][q_idx, selected].unsqueeze(-1)  # (Q, D, 1)
        value = self.mapping_linear[1](ef)
        scores = torch.bmm(key, guide)[..., 0]  # (Q, L)
        scores = scores.masked_fill(frame_mask[labels].eq(0), KEY_CLIP_MASK_FILL).unsqueeze(1)
        return torch.bmm(torch.softmax(scores, dim=-1), value)[:, 0]

    def key_clip_attention_inference(self, frames, proposals, frame_mask, key_clip_index):
        """``key_clip_guided_attention_in_inference`` (model.py:229-246): ``(V, Q, D)``."""
        key = self.mapping_linear[0](frames)
        value = self.mapping_linear[1](frames)
        index = torch.arange(frames.shape[0], device=frames.device).unsqueeze(1)
        guide = proposals[index, key_clip_index.t()]  # (V, Q, D)
        scores = torch.bmm(key, guide.transpose(2, 1))  # (V, L, Q)
        scores = torch.softmax(scores.masked_fill(frame_mask.unsqueeze(-1).eq(0), KEY_CLIP_MASK_FILL), dim=1)
        return torch.bmm(scores.transpose(1, 2), value)

    # ------------------------------------------------------------------ scores
    def score(self, query, video):
        qn = F.normalize(query, dim=-1)
        clip, idx = max_scores(qn, F.normalize(video["proposals"], dim=-1))
        feats = self.key_clip_attention_inference(video["frame_feats"], video["proposals"], video["frame_mask"], idx)
        frame = torch.sum(F.normalize(feats, dim=-1) * qn.unsqueeze(0), dim=-1).transpose(1, 0)
        return {"clip": clip, "frame": frame}

    def forward(self, batch, train: bool = False):
        self.train(train)
        dev, dt = next(self.parameters()).device, next(self.parameters()).dtype  # inputs follow the weights
        clip_feats = as_tensor(batch["clip_feats"], dev, dt)
        frame_feats = as_tensor(batch["frame_feats"], dev, dt)
        frame_mask = as_tensor(batch["frame_mask"], dev, dt)
        query_feats = as_tensor(batch["query_feats"], dev, dt)
        query_mask = as_tensor(batch["query_mask"], dev, dt)
        labels = as_tensor(batch["query_labels"], dev, torch.long)
        video, vstages = self._encode_video(clip_feats, frame_feats, frame_mask)
        q, qstages = self._encode_query(query_feats, query_mask)
        proposals, frames = video["proposals"], video["frame_feats"]
        qn = F.normalize(q, dim=-1)
        clip, idx = max_scores(qn, F.normalize(proposals, dim=-1))
        clip_raw, _ = max_scores(q, proposals)
        feats = self.key_clip_attention_train(frames, proposals, frame_mask, idx, labels)
        frame = torch.matmul(qn, F.normalize(feats, dim=-1).t())
        frame_raw = torch.matmul(q, feats.t())
        scores = {"clip": clip, "clip_raw": clip_raw, "frame": frame, "frame_raw": frame_raw}
        aux = {"query": q, **qstages, **vstages, "proposals": proposals, "frame_feats": frames,
               "key_clip_index": idx, "key_clip_selected": idx[torch.arange(labels.shape[0], device=dev), labels],
               "frame_scale_feat": feats}
        return scores, aux
