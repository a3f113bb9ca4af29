"""Shared PyTorch building blocks of the PRVR twins, with the official module names and maths.

Module attribute names equal the official ones (ms-sl ``method/model_components.py``, GMMFormer
``src/Models/gmmformer/model_components.py``, GMMFormer_v2 ``src/Models/gmmformerV2/model_components.py``), so
``state_dict()`` keys are the official keys. Masks passed in are ``(N, L)`` floats (1 = valid). Nothing is
hard-coded to a device: every tensor made here follows its inputs. Every dropout is a
:class:`torch_ref.dropout.HashDropout`: ``nn.Dropout`` itself unless :func:`torch_ref.dropout.shared_dropout`
gives it the Flax model's masks.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_ref.dropout import HashDropout

INIT_STD = 0.02  # config.initializer_range
ATTN_MASK_FILL = -10000.0
POOL_MASK_FILL = -1e10
GMM_WIDTHS = (None, 0.5, 1.0, 5.0)
DYGMM_WIDTHS = (None, 0.5, 1.0, 5.0, 10.0, 3.0, 0.1, 8.0)
_GAUSS_NORM = 0.3989422804014327


def reset_parameters(model: nn.Module, std: float = INIT_STD) -> None:
    """The official ``reset_parameters``: Linear/Embedding weights N(0, std), Linear biases 0, LayerNorm (1, 0)."""

    def re_init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        elif isinstance(module, nn.Conv1d):
            module.reset_parameters()
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    model.apply(re_init)


def mask_logits(target, mask):
    return target * mask + (1 - mask) * POOL_MASK_FILL


def attention_pool(mapping: nn.Module, x, mask):
    """``get_modularized_queries``/``frames``: ``(N, L, D), (N, L) -> (N, D)`` (no batch-of-1 squeeze)."""
    att = F.softmax(mask_logits(mapping(x), mask.unsqueeze(2)), dim=1)
    return torch.einsum("blm,bld->bmd", att, x)[:, 0]


def max_scores(query, context):
    """``max_t <q_i, c_{v,t}>`` ``(Q, D) x (V, T, D) -> (Q, V)`` scores and argmax indices."""
    s = torch.matmul(context, query.t()).permute(2, 1, 0)  # (Q, T, V)
    return torch.max(s, dim=1)


def gaussian_weight(length: int, width: float, size: int, device) -> torch.Tensor:
    """Official ``generate_gauss_weight(length, width)`` embedded in a ``(size, size)`` array of ones.

    ``length`` is the grid length (the official key length); the top-left ``length x length`` block is the
    official mask, other entries (padding rows/keys, removed by the key mask) are 1.
    """
    length = max(int(length), 1)
    center = torch.arange(length, device=device) / length
    wid = width * torch.ones(length, device=device)
    weight = torch.linspace(0, 1, length)  # on the CPU, as official
    weight = weight.view(1, -1).expand(center.size(0), -1).to(center.device)
    center = center.unsqueeze(-1)
    wid = wid.unsqueeze(-1).clamp(1e-2) / 9
    weight = _GAUSS_NORM / wid * torch.exp(-(weight - center) ** 2 / (2 * wid ** 2))
    g = weight / weight.max(dim=-1, keepdim=True)[0]
    if length == size:
        return g
    out = torch.ones(size, size, device=device, dtype=g.dtype)
    out[:length, :length] = g
    return out


class LinearLayer(nn.Module):
    """``LayerNorm(in) -> Dropout -> Linear -> ReLU`` (keys ``LayerNorm.*``, ``net.1.*``)."""

    def __init__(self, in_hsz, out_hsz, layer_norm=True, dropout=0.1, relu=True):
        super().__init__()
        self.relu = relu
        self.layer_norm = layer_norm
        if layer_norm:
            self.LayerNorm = nn.LayerNorm(in_hsz)
        self.net = nn.Sequential(HashDropout(dropout), nn.Linear(in_hsz, out_hsz))

    def forward(self, x):
        if self.layer_norm:
            x = self.LayerNorm(x)
        x = self.net(x)
        return F.relu(x) if self.relu else x


class TrainablePositionalEncoding(nn.Module):
    """``Dropout(LayerNorm(x + E[:L]))``."""

    def __init__(self, max_position_embeddings, hidden_size, dropout=0.1):
        super().__init__()
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size)
        self.dropout = HashDropout(dropout)

    def forward(self, x):
        bsz, seq_length = x.shape[:2]
        ids = torch.arange(seq_length, dtype=torch.long, device=x.device).unsqueeze(0).repeat(bsz, 1)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(ids)))


class BertSelfAttention(nn.Module):
    """Multi-head attention; optional multiplicative Gaussian (width ``wid``) before the additive -10000 mask."""

    def __init__(self, hidden_size, num_heads, drop=0.1, wid: Optional[float] = None):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
        self.num_attention_heads = num_heads
        self.attention_head_size = hidden_size // num_heads
        self.all_head_size = hidden_size
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = HashDropout(drop)
        self.wid = wid

    def _heads(self, x):
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

    def forward(self, query_states, key_states, value_states, attention_mask=None, gmm_length=None):
        q = self._heads(self.query(query_states))
        k = self._heads(self.key(key_states))
        v = self._heads(self.value(value_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if self.wid is not None:
            size = scores.shape[-1]
            g = gaussian_weight(size if gmm_length is None else gmm_length, self.wid, size, scores.device)
            scores = scores * g.unsqueeze(0).unsqueeze(0)
        if attention_mask is not None:
            scores = scores + (1 - attention_mask[:, None, None, :]) * ATTN_MASK_FILL
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(*ctx.shape[:-2], self.all_head_size)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden_size, drop=0.1):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size)
        self.dropout = HashDropout(drop)

    def forward(self, h, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(h)) + input_tensor)


class BertAttention(nn.Module):
    """v1 flavour (MS-SL, GMMFormer): ``LN(x + Drop(Dense(SelfAttn(x))))``."""

    def __init__(self, hidden_size, num_heads, drop=0.1, wid=None):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads, drop, wid)
        self.output = BertSelfOutput(hidden_size, drop)

    def forward(self, x, attention_mask=None, gmm_length=None):
        return self.output(self.self(x, x, x, attention_mask, gmm_length), x)


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout=0.1):
        super().__init__()
        self.layer1 = nn.Linear(d_model, d_ff)
        self.dropout = HashDropout(dropout)
        self.layer2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.layer2(self.dropout(F.relu(self.layer1(x))))


class BertAttentionV2(nn.Module):
    """v2 flavour: ``h = norm1(x + Drop(SelfAttn(x)))``; ``norm2(h + Drop(FFN_4D(h)))``."""

    def __init__(self, hidden_size, num_heads, drop=0.1, wid=None, ffn_mult=4):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads, drop, wid)
        self.output = FeedForward(hidden_size, int(ffn_mult * hidden_size), drop)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.dropout1 = HashDropout(drop)
        self.dropout2 = HashDropout(drop)

    def forward(self, x, attention_mask=None):
        h = self.norm1(x + self.dropout1(self.self(x, x, x, attention_mask)))
        return self.norm2(h + self.dropout2(self.output(h)))


class BertCrossAttention(nn.Module):
    """v2 cross attention: Q from ``query``, 1xD FFN."""

    def __init__(self, hidden_size, num_heads, drop=0.1):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads, drop)
        self.output = FeedForward(hidden_size, hidden_size, drop)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.dropout1 = HashDropout(drop)
        self.dropout2 = HashDropout(drop)

    def forward(self, query, x, attention_mask=None):
        q = self.norm1(query + self.dropout1(self.self(query, x, x, attention_mask)))
        return self.norm2(q + self.dropout2(self.output(q)))


class GMMBlock(nn.Module):
    """GMMFormer v1: branches ``attn0..attn3`` (widths None/0.5/1/5), unweighted mean (no squeeze)."""

    def __init__(self, hidden_size, num_heads, drop=0.1, widths: Sequence[Optional[float]] = GMM_WIDTHS):
        super().__init__()
        self.n_branches = len(widths)
        for k, w in enumerate(widths):
            setattr(self, f"attn{k}", BertAttention(hidden_size, num_heads, drop, w))

    def forward(self, x, attention_mask=None, gmm_length=None):
        oo = torch.stack([getattr(self, f"attn{k}")(x, attention_mask, gmm_length)
                          for k in range(self.n_branches)], dim=-1)
        return torch.mean(oo, dim=-1)


class DyGMMBlock(nn.Module):
    """GMMFormer v2 DyGMMBlock: 8 v2 branches, shared cross attention ``ca`` read by ``weight_token``,
    ``layer2(Drop(ReLU(layer1(C))))`` logits, softmax over branches at temperature ``sft_factor``."""

    def __init__(self, hidden_size, num_heads, frame_len, sft_factor, drop=0.1,
                 widths: Sequence[Optional[float]] = DYGMM_WIDTHS):
        super().__init__()
        self.n_branches = len(widths)
        for k, w in enumerate(widths):
            setattr(self, f"attn{k}", BertAttentionV2(hidden_size, num_heads, drop, w))
        self.ca = BertCrossAttention(hidden_size, num_heads, drop)
        self.layer1 = nn.Linear(hidden_size, hidden_size)
        self.dropout = HashDropout(drop)
        self.layer2 = nn.Linear(hidden_size, frame_len)
        self.frame_len = frame_len
        self.sft_factor = sft_factor

    def forward(self, x, attention_mask=None, weight_token=None):
        if x.shape[1] != self.frame_len:
            raise ValueError(f"DyGMMBlock expects L == frame_len == {self.frame_len}, got {x.shape[1]}")
        oo = torch.stack([getattr(self, f"attn{k}")(x, attention_mask) for k in range(self.n_branches)], dim=-1)
        token = weight_token.to(oo.device).type_as(oo).repeat(oo.shape[0], 1, 1)
        weight = torch.cat([self.ca(token, oo[..., k], attention_mask) for k in range(self.n_branches)], dim=1)
        weight = self.layer2(self.dropout(F.relu(self.layer1(weight))))  # (N, K, frame_len)
        weight = F.softmax(weight.permute(0, 2, 1) / self.sft_factor, dim=-1)  # (N, L, K)
        return torch.sum(oo * weight.unsqueeze(2), dim=-1)


def as_tensor(x, device=None, dtype=None):
    """numpy/jax arrays or tensors -> torch tensor (copy only when needed)."""
    if not torch.is_tensor(x):
        import numpy as np
        x = torch.from_numpy(np.array(x))
    return x.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else x


class QueryBranch:
    """The query branch every PRVR model shares (official ``encode_query``): ``query_input_proj`` ->
    ``query_pos_embed`` -> ``query_encoder`` -> attention pooling with ``modular_vector_mapping``.
    Mixed into a model whose ``__init__`` defines those four submodules (:meth:`_init_inputs` registers the
    shared ones)."""

    # Whether the official evaluation pads every frame block to ``max_ctx_l`` and every query block to
    # ``max_desc_l`` (MTM's data_provider) instead of to the block's longest item (ms-sl, GMMFormer).
    pads_to_max_length = False

    def branch_weights(self) -> dict[str, float]:
        """Test-time weights of the fused score ``sum_k w_k * scores[k]`` (as the Flax models')."""
        return {"clip": float(self.cfg.clip_scale_w), "frame": float(self.cfg.frame_scale_w)}

    def _init_inputs(self, cfg, query_encoder, clip_rows: int, video_branch: bool = False) -> None:
        """Registers, in the official order (which is the state_dict order): the positional encodings
        ``query_pos_embed`` (``max_desc_l`` rows), ``clip_pos_embed`` (``clip_rows``), ``frame_pos_embed``
        (and MTM's ``video_pos_embed``) of ``max_ctx_l`` rows, then ``query_input_proj`` and ``query_encoder``."""
        d, drop = cfg.hidden_size, cfg.input_drop
        self.query_pos_embed = TrainablePositionalEncoding(cfg.max_desc_l, d, drop)
        self.clip_pos_embed = TrainablePositionalEncoding(clip_rows, d, drop)
        self.frame_pos_embed = TrainablePositionalEncoding(cfg.max_ctx_l, d, drop)
        if video_branch:
            self.video_pos_embed = TrainablePositionalEncoding(cfg.max_ctx_l, d, drop)
        self.query_input_proj = LinearLayer(cfg.q_feat_size, d, True, drop, True)
        self.query_encoder = query_encoder

    def _encode_query(self, query_feats, query_mask):
        emb = self.query_pos_embed(self.query_input_proj(query_feats))
        tokens = self.query_encoder(emb, query_mask)
        return attention_pool(self.modular_vector_mapping, tokens, query_mask), {"query_embed": emb,
                                                                                 "query_tokens": tokens}

    def encode_query(self, query_feats, query_mask):
        return self._encode_query(query_feats, query_mask)[0]
