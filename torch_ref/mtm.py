"""PyTorch twins of MTM's building blocks (official ``src/Models/MTM/model.py`` names); see
:mod:`jaxprvr.models.mtm`. The Mamba layers are the official ``mamba_ssm`` ones (:mod:`torch_ref.mamba`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from torch_ref.dropout import HashDropout
from torch_ref.mamba import load as load_mamba

TCN_DROPOUT = 0.1
POOL_FILL = -1e9


class TCN(nn.Module):
    def __init__(self, hidden_size, dropout=TCN_DROPOUT):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.conv1 = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.dropout = HashDropout(dropout)
        self.conv2 = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, padding=1)
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, x):
        y = self.dropout(self.relu(self.conv1(x.transpose(1, 2))))
        y = self.dropout(self.relu(self.conv2(y))).transpose(1, 2)
        return self.layer_norm(x + torch.clamp(self.alpha, 0.0, 1.0) * y)


def mamba_stack(d_model: int, num_layers: int) -> nn.ModuleList:
    """``nn.ModuleList([Mamba, LayerNorm] * num_layers)`` as ``MTM_Net`` builds ``clip_mamba``/``frame_mamba``."""
    mamba_cls = load_mamba().Mamba
    layers = []
    for _ in range(num_layers):
        layers.append(mamba_cls(d_model=d_model, d_state=16, d_conv=4, expand=2, use_fast_path=False))
        layers.append(nn.LayerNorm(d_model, eps=1e-5))
    return nn.ModuleList(layers)


def mamba_residual(layers: nn.ModuleList, h):
    m = h
    for i in range(0, len(layers), 2):
        m = layers[i + 1](layers[i](m))
    return h + m


class AttentionPooling(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.attn_proj = nn.Linear(hidden_size, 1)

    def forward(self, x, mask=None):
        scores = self.attn_proj(x)
        if mask is not None:
            scores = scores.masked_fill(mask.unsqueeze(2) == 0, POOL_FILL)
        return torch.sum(x * torch.softmax(scores, dim=1), dim=1)


class MLPReconstructor(nn.Module):
    def __init__(self, input_dim, output_dim, num_layers=2, hidden_dim_factor=2, dropout=0.1):
        super().__init__()
        layers, cur = [], input_dim
        for _ in range(num_layers - 1):
            nxt = min(int(cur * hidden_dim_factor), output_dim)
            layers += [nn.Linear(cur, nxt), nn.ReLU(), HashDropout(dropout)]
            cur = nxt
        layers.append(nn.Linear(cur, output_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        return self.mlp(x)


# ---------------------------------------------------------------------------------------------- the model
import torch.nn.functional as F  # noqa: E402

from torch_ref.layers import (BertAttentionV2, BertCrossAttention, DyGMMBlock, LinearLayer,  # noqa: E402
                              QueryBranch, as_tensor, max_scores, reset_parameters)

MTM_WIDTHS = (None, 0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0, 0.05, 2.0, 15.0)  # model_components.py DyGMMBlock


class MTMDyGMMBlock(DyGMMBlock):
    """MTM's DyGMMBlock: 11 branches also held in ``attns`` (so the state_dict has ``attnK.*`` and ``attns.K.*``
    for the same tensors), ``layer2`` named ``fixed_layer2_projection`` with ``map_size`` outputs, logits sliced
    to L when L < map_size."""

    def __init__(self, hidden_size, num_heads, map_size, sft_factor, drop=0.1):
        super().__init__(hidden_size, num_heads, map_size, sft_factor, drop, MTM_WIDTHS)
        self.attns = nn.ModuleList([getattr(self, f"attn{k}") for k in range(self.n_branches)])
        self.fixed_layer2_projection = self.layer2
        del self.layer2
        # key order of the official module: attn0..attn10, attns.*, ca, layer1, fixed_layer2_projection
        order = [f"attn{k}" for k in range(self.n_branches)] + ["attns", "ca", "layer1", "dropout",
                                                                "fixed_layer2_projection"]
        self._modules = type(self._modules)((k, self._modules[k]) for k in order)

    def forward(self, x, attention_mask=None, weight_token=None):
        n, seq_len = x.shape[0], x.shape[1]
        oo = torch.stack([attn(x, attention_mask) for attn in self.attns], dim=-1)
        token = weight_token.to(oo.device).type_as(oo).repeat(n, 1, 1)
        weight = torch.cat([self.ca(token, oo[..., k], attention_mask) for k in range(self.n_branches)], dim=1)
        weight = self.fixed_layer2_projection(self.dropout(F.relu(self.layer1(weight))))
        if seq_len < self.frame_len:
            weight = weight[:, :, :seq_len]
        weight = F.softmax(weight.permute(0, 2, 1) / self.sft_factor, dim=-1)
        return torch.sum(oo * weight.unsqueeze(2), dim=-1)


class VideoGuidedTextRefiner(nn.Module):
    def __init__(self, hidden_size, num_heads, drop):
        super().__init__()
        self.cross_attention = BertCrossAttention(hidden_size, num_heads, drop)
        self.linear_out = LinearLayer(hidden_size, hidden_size, layer_norm=True, dropout=drop, relu=False)

    def forward(self, query, video):
        ctx = video.unsqueeze(0).expand(query.shape[0], -1, -1)
        return self.linear_out(self.cross_attention(query.unsqueeze(1), ctx, None)[:, 0])


class MTM(QueryBranch, nn.Module):
    """Twin of the official ``MTM_Net`` (state_dict keys and order, the ``attns`` aliases included), with the
    Flax model's method and output names (:class:`jaxprvr.models.mtm.MTM`)."""

    pads_to_max_length = True  # MTM data_provider.py:64-158, train and eval

    def branch_weights(self) -> dict[str, float]:
        """The fused score adds the video branch (``video_scale_w``)."""
        return dict(super().branch_weights(), video=float(self.cfg.video_scale_w))

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.n_heads
        self._init_inputs(cfg, BertAttentionV2(d, h, cfg.drop), clip_rows=cfg.map_size, video_branch=True)
        self.clip_input_proj = LinearLayer(cfg.visual_feat_dim, d, True, cfg.input_drop, True)
        self.clip_encoder = MTMDyGMMBlock(d, h, cfg.map_size, cfg.sft_factor, cfg.drop)
        self.clip_mamba = mamba_stack(d, cfg.num_mamba_layers)
        self.frame_input_proj = LinearLayer(cfg.visual_feat_dim, d, True, cfg.input_drop, True)
        self.frame_tcn = TCN(d)
        self.frame_encoder_1 = MTMDyGMMBlock(d, h, cfg.max_ctx_l, cfg.sft_factor, cfg.drop)
        self.frame_mamba = mamba_stack(d, cfg.num_mamba_layers)
        self.video_input_proj = LinearLayer(cfg.visual_feat_dim, d, True, cfg.input_drop, True)
        self.video_encoder = MTMDyGMMBlock(d, h, cfg.max_ctx_l, cfg.sft_factor, cfg.drop)
        self.video_pooling = AttentionPooling(d)
        self.video_guided_text_refinement = VideoGuidedTextRefiner(d, h, cfg.drop)
        self.modular_vector_mapping = nn.Linear(d, 1, bias=False)
        self.weight_token = nn.Parameter(torch.randn(1, 1, d))
        self.text_reconstructor = MLPReconstructor(d, cfg.max_desc_l * cfg.q_feat_size, 2, 4, cfg.drop)
        self.video_reconstructor = MLPReconstructor(d, cfg.max_ctx_l * cfg.visual_feat_dim, 2, 4, cfg.drop)
        reset_parameters(self)  # MTM_Net.reset_parameters: also every Linear inside Mamba (dt_proj.bias -> 0)

    def _encode_video(self, clip_feats, frame_feats, frame_mask):
        keep = frame_mask.unsqueeze(-1) == 1.0
        clip_emb = self.clip_pos_embed(self.clip_input_proj(clip_feats))
        clips_1 = self.clip_encoder(clip_emb, None, self.weight_token)
        clips = mamba_residual(self.clip_mamba, clips_1)
        frame_emb = self.frame_pos_embed(self.frame_input_proj(frame_feats))
        frame_tcn = self.frame_tcn(frame_emb)
        f1 = self.frame_encoder_1(frame_tcn, frame_mask, self.weight_token)
        frames_1 = torch.where(keep, f1, 0.0 * f1)
        frames = mamba_residual(self.frame_mamba, frames_1)
        video_emb = self.video_pos_embed(self.video_input_proj(frame_feats))
        vs = self.video_encoder(video_emb, frame_mask, self.weight_token)
        video_seq = torch.where(keep, vs, 0.0 * vs)
        video = self.video_pooling(video_seq, frame_mask)
        out = {"clip_feats": clips, "frame_feats": frames, "video_feats": video}
        stages = {"clip_embed": clip_emb, "clip_feats_1": clips_1, "frame_embed": frame_emb, "frame_tcn": frame_tcn,
                  "frame_feats_1": frames_1, "video_embed": video_emb, "video_seq": video_seq}
        return out, stages

    def encode_video(self, clip_feats, frame_feats, frame_mask, frame_len=None):
        return self._encode_video(clip_feats, frame_feats, frame_mask)[0]

    def _video_scores(self, query, video_feats):
        refined = self.video_guided_text_refinement(query, video_feats)
        return F.normalize(refined, dim=-1) @ F.normalize(video_feats, dim=-1).t(), refined @ video_feats.t(), refined

    def score(self, query, video):
        qn = F.normalize(query, dim=-1)
        clip, _ = max_scores(qn, F.normalize(video["clip_feats"], dim=-1))
        frame, _ = max_scores(qn, F.normalize(video["frame_feats"], dim=-1))
        return {"clip": clip, "frame": frame, "video": self._video_scores(query, video["video_feats"])[0]}

    def forward(self, batch, train: bool = False):
        self.train(train)
        c = self.cfg
        dev, dt = next(self.parameters()).device, next(self.parameters()).dtype
        f = lambda k: as_tensor(batch[k], dev, dt)  # noqa: E731
        video, vstages = self._encode_video(f("clip_feats"), f("frame_feats"), f("frame_mask"))
        q2 = self.encode_query(f("query_feats"), f("query_mask"))
        q, qstages = self._encode_query(f("query_feats"), f("query_mask"))
        qn = F.normalize(q, dim=-1)
        clips, frames, v = video["clip_feats"], video["frame_feats"], video["video_feats"]
        clip, _ = max_scores(qn, F.normalize(clips, dim=-1))
        clip_raw, _ = max_scores(q, clips)
        frame, _ = max_scores(qn, F.normalize(frames, dim=-1))
        frame_raw, _ = max_scores(q, frames)
        vid, vid_raw, refined = self._video_scores(q, v)
        recon_text = self.text_reconstructor(q2).view(q.shape[0], c.max_desc_l, c.q_feat_size)
        recon_video = self.video_reconstructor(v).view(v.shape[0], c.max_ctx_l, c.visual_feat_dim)
        scores = {"clip": clip, "clip_raw": clip_raw, "frame": frame, "frame_raw": frame_raw, "video": vid,
                  "video_raw": vid_raw}
        aux = {"query": q, "query2": q2, **qstages, **vstages, **video, "refined_query": refined,
               "recon_text": recon_text, "recon_video": recon_video}
        return scores, aux
