"""PyTorch twin of MRNet (official ``RET``, xian-sh/MRNet @ 53432f5, ``ret/modeling/ret_model/``), on CPU.

A re-statement of the official model from its code (``.cuda()`` dropped, nothing else changed on purpose):
module tree, construction order (so ``torch.manual_seed(s); MRNet(cfg)`` draws the official initialisation),
``state_dict`` keys (ActivityNet 90, TACoS 65, Charades 112, incl. the persistent ``xpos.scale`` buffers and the
int64 ``num_batches_tracked``) and the per-video forward of ``RET.forward`` (``ret_model.py`` L507-595).
``ret_variant="projected"`` is ``ret_model.py`` (six bias-free ``W_*`` as ``x @ W`` and one output Linear);
``ret_variant="mha"`` is ``ret_model_tacos.py`` (four Linears, the README's TACoS file swap).

Calling convention (the official ``batches``, see :func:`official_batch` for our padded batches)::

    model = MRNet(cfg)                       # a jaxprvr Config (model + loss), or MRNetConfig [, loss_cfg]
    model.train(); loss_vid, loss_sent, loss_iou, loss_sparse = model(batches, cur_epoch=epoch)
    model.eval();  map2d_iou, sent_feat_iou, contrastive_scores, iou_scores = model(batches)

``batches`` is a dict (or an object with these attributes): ``feats`` (B, num_pre_clips, input_size);
``queries`` list of B (n_q, text_dim); ``all_iou2d`` list of B (n_q, N, N); ``moments`` list of B (n_q, 2)
(seconds; the training loss only). Each video has its own n_q: TransRet runs once per video on the
unpadded ``[n_q query tokens ; N clip tokens]`` sequence (L534-552). After every forward ``model.last`` holds
the intermediate maps (``map2d``, ``map2d_iou``, ``txt_feats`` = post-TransRet query tokens, ``txt_feat_iou``,
``vid_feats``, ``iou_scores``, and ``contrastive_scores`` in eval) for parity checks.

Dropout: every official ``nn.Dropout`` is a :class:`torch_ref.dropout.HashDropout` at the official place
(``input_vid_proj.{0,1}.net.0`` p=0.5 before each Linear, ``trans_ret.dropout_{1,2}.{i}`` p=0.1, and
``trans_ret.rets.{i}.self_attn.dropout`` on the attention probabilities only when ``att_dropout > 0``; the
official ``ATT_DROPOUT`` None gives no module). Unarmed they draw from torch's RNG (the official behaviour);
armed with :func:`torch_ref.dropout.arm` they take given hash masks in call order. The per-video loop makes
B calls of ``input_vid_proj`` dropouts and of the TransRet dropouts per forward (video ``b``'s call is the
``b``-th); :func:`flax_counters` builds the :class:`~torch_ref.dropout.Draw` index of a torch call that is a
slice of one batched (padded) Flax draw.

Numerics: ``LinearLayer``'s ``x.float()`` casts (L128-131) are casts to the weights' dtype (float32 officially),
so ``model.double()`` runs in float64; the decay ``D`` and the sine PE stay float32 as the official code builds
them (L379-389, position_encoding.py L61-68). The discarded Hardswish of the logits (L141-142) is not computed.
``attn *= attn_mask`` (L144) is written out of place (same values and gradients).

The losses are :mod:`torch_ref.mrnet_loss`; the official recipe (optimizer, train step, total, checkpoints)
is at the end of this file; the official evaluation is :mod:`torch_ref.vmr_eval`.
"""

from __future__ import annotations

import collections
import copy
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxprvr.errors import JaxprvrError
from torch_ref.dropout import HashDropout, flat_index
from torch_ref.mrnet_loss import BceLoss, ContrastiveLoss

__all__ = ["MRNet", "official_batch", "flax_counters", "official_total", "official_optimizer",
           "official_train_step", "official_train_epoch", "save_official_checkpoint", "load_official_checkpoint",
           "official_lenient_load", "official_state_keys", "split_cfg"]


def split_cfg(cfg, loss_cfg=None):
    """``(model_cfg, loss_cfg)`` from a full Config, or from an MRNetConfig (+ an optional MRNetLossConfig)."""
    from jaxprvr.config import MRNetLossConfig

    if hasattr(cfg, "model") and hasattr(cfg, "loss"):
        return cfg.model, (loss_cfg if loss_cfg is not None else cfg.loss)
    return cfg, (loss_cfg if loss_cfg is not None else MRNetLossConfig())


def _get(batch, key):
    return batch[key] if isinstance(batch, dict) else getattr(batch, key)


def _tensor(x, dtype=None, device=None):
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=dtype if dtype is not None else t.dtype)


# ---------------------------------------------------------------------------------------------- pieces


class FeatAvgPool(nn.Module):
    """featpool.py L5-13: Conv1d(k=1) -> ReLU -> AvgPool1d(kernel, stride) over time, (B, T, D) -> (B, C, N)."""

    def __init__(self, input_size, hidden_size, kernel_size, stride):
        super().__init__()
        self.conv = nn.Conv1d(input_size, hidden_size, 1, 1)
        self.pool = nn.AvgPool1d(kernel_size, stride)

    def forward(self, x):
        return self.pool(self.conv(x.transpose(1, 2)).relu())


def official_mask2d(pooling_counts, n) -> tuple[torch.Tensor, list]:
    """mask2d and the (i, j) index ranges of each pooled diagonal (feat2d.py L6-19)."""
    mask2d = torch.zeros(n, n, dtype=torch.bool)
    mask2d[range(n), range(n)] = 1
    stride, offset, maskij = 1, 0, []
    for c in pooling_counts:
        for _ in range(c):
            offset += stride
            i, j = range(0, n - offset, stride), range(offset, n, stride)
            mask2d[i, j] = 1
            maskij.append((i, j))
        stride *= 2
    return mask2d, maskij


class SparseMaxPool(nn.Module):
    """feat2d.py L3-38: the 2-D map by a chain of MaxPool1d (2,1) / (3,2); no parameters, ``mask2d`` a plain
    tensor attribute (not a buffer, as officially)."""

    def __init__(self, pooling_counts, n):
        super().__init__()
        self.mask2d, self.maskij = official_mask2d(pooling_counts, n)
        poolers = [nn.MaxPool1d(2, 1) for _ in range(pooling_counts[0])]
        for c in pooling_counts[1:]:
            poolers.extend([nn.MaxPool1d(3, 2)] + [nn.MaxPool1d(2, 1) for _ in range(c - 1)])
        self.poolers = poolers  # a plain list (no state_dict entries), as officially

    def forward(self, x):
        b, d, n = x.shape
        map2d = x.new_zeros(b, d, n, n)
        map2d[:, :, range(n), range(n)] = x
        for pooler, (i, j) in zip(self.poolers, self.maskij):
            x = pooler(x)
            map2d[:, :, i, j] = x
        return map2d


class DistilBert(nn.Module):
    """text_encoder.py L6-46 (a misnomer: two Linears over the pre-extracted query vectors). Returns the lists
    ``sent_feat`` (fc_out2, the TransRet query tokens) and ``sent_feat_iou`` (fc_out1, returned at inference
    only: it never reaches a loss)."""

    def __init__(self, input_dim, joint_space_size):
        super().__init__()
        self.fc_out1 = nn.Linear(input_dim, joint_space_size)
        self.fc_out2 = nn.Linear(input_dim, joint_space_size)

    def forward(self, queries):
        sent_feat, sent_feat_iou = [], []
        for x in queries:
            out_iou = self.fc_out1(x).squeeze(0)
            out = self.fc_out2(x).squeeze(0)
            if out_iou.ndim == 1 and out.ndim == 1:  # one query: (d,) -> (1, d) (L40-42)
                out_iou, out = out_iou.view(1, -1), out.view(1, -1)
            sent_feat.append(out)
            sent_feat_iou.append(out_iou)
        return sent_feat, sent_feat_iou


class TextOut(nn.Module):
    """text_out.py L29-53: ``fc_out1`` (the IoU branch query) is used; ``fc_out2`` and ``layernorm`` are built and
    never reach the output (the contrastive branch reads the raw txt_mem, ret_model.py L583, L586-593)."""

    def __init__(self, input_size, joint_space_size):
        super().__init__()
        self.fc_out1 = nn.Linear(input_size, joint_space_size)
        self.fc_out2 = nn.Linear(input_size, joint_space_size)
        self.layernorm = nn.LayerNorm(joint_space_size)

    def forward(self, txts):
        txt_feat, txt_feat_iou = [], []
        for query in txts:
            txt_feat_iou.append(self.fc_out1(query).squeeze(0))
            txt_feat.append(self.fc_out2(query).squeeze(0))
        return txt_feat, txt_feat_iou


class LinearLayer(nn.Module):
    """ret_model.py L110-132: LayerNorm -> Dropout -> Linear [-> ReLU]; ``.float()`` = cast to the weights' dtype."""

    def __init__(self, in_hsz, out_hsz, dropout=0.1, relu=True):
        super().__init__()
        self.relu = relu
        self.LayerNorm = nn.LayerNorm(in_hsz)
        self.net = nn.Sequential(HashDropout(dropout), nn.Linear(in_hsz, out_hsz))

    def forward(self, x):
        dt = self.LayerNorm.weight.dtype
        x = self.net(self.LayerNorm(x.to(dt)).to(dt))
        return F.relu(x) if self.relu else x


class XPOS(nn.Module):
    """xpos_relative_position.py L6-63 (torchscale's xPos) over the whole d-dim token; ``scale`` is a persistent
    buffer (a state_dict key)."""

    def __init__(self, head_dim, scale_base=512):
        super().__init__()
        self.head_dim, self.scale_base = head_dim, scale_base
        self.register_buffer("scale", (torch.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim))

    @staticmethod
    def _fixed_pos_embedding(x):
        seq_len, dim = x.shape
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim) / dim))
        sinusoid = torch.einsum("i , j -> i j", torch.arange(0, seq_len, dtype=torch.float), inv_freq).to(x)
        return torch.sin(sinusoid), torch.cos(sinusoid)

    @staticmethod
    def _rotate_every_two(x):
        return torch.stack((-x[:, :, 1::2], x[:, :, ::2]), dim=-1).flatten(-2)

    @staticmethod
    def _duplicate_interleave(m):
        dim0 = m.shape[0]
        return m.view(-1, 1).repeat(1, 2).view(dim0, -1)

    def forward(self, x, downscale=False):
        length = x.shape[1]
        scale = self.scale ** torch.arange(0, length, 1).to(self.scale).div(self.scale_base)[:, None]
        sin, cos = self._fixed_pos_embedding(scale)
        if downscale:
            scale = 1 / scale
        sin, cos = (self._duplicate_interleave(t * scale) for t in (sin, cos))
        return (x * cos) + (self._rotate_every_two(x) * sin)


def sine_pe(x, mask, num_pos_feats, temperature=10000, scale=2 * math.pi):
    """PositionEmbeddingSine(d, normalize=True).forward (position_encoding.py L51-72): float32, positions
    1..n normalised by the true count n (+1e-6), interleaved sin/cos."""
    x_embed = mask.cumsum(1, dtype=torch.float32)
    x_embed = x_embed / (x_embed[:, -1:] + 1e-6) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="trunc") / num_pos_feats)
    pos_x = x_embed[:, :, None] / dim_t
    return torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)


def _clones(module, n):
    """ret_model.py L163-164: deep copies of ONE module, so cloned Linears start identical (ret_model_tacos.py
    L75: q, k, v and output projections all begin with the same weights)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class MultiHeadedAttention(nn.Module):
    """ret_model.py L135-201 (``projected``: only the output Linear ``linears.0``) and ret_model_tacos.py
    L49-102 (``mha``: ``linears.{0,1,2}`` project q, k, v; ``linears.3`` the output)."""

    def __init__(self, h, d_model, dropout=None, att_softmax=True, variant="projected"):
        super().__init__()
        assert d_model % h == 0
        self.d_k, self.h, self.variant, self.att_softmax = d_model // h, h, variant, att_softmax
        self.linears = _clones(nn.Linear(d_model, d_model), 4 if variant == "mha" else 1)
        self.dropout = HashDropout(dropout) if dropout else None  # ATT_DROPOUT None -> no module (L176-179)

    def forward(self, q, k, v, mask=None):
        """q, k, v (L, 1, d) (sequence first, batch 1). Returns (L, 1, d)."""
        tgt_len, bsz, embed_dim = q.shape
        if self.variant == "mha":
            q, k, v = self.linears[0](q), self.linears[1](k), self.linears[2](v)
        q = q.reshape(tgt_len, bsz * self.h, self.d_k).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * self.h, self.d_k).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * self.h, self.d_k).transpose(0, 1)
        q = q / math.sqrt(q.shape[-1])
        attn = torch.bmm(q, k.transpose(-2, -1))
        if mask is not None:
            attn = attn * mask.unsqueeze(0)  # multiplicative, on the logits (L143-144)
        if self.variant == "mha":  # ret_model_tacos.py L56-57: no softmax -> the masked logits themselves
            probs = F.softmax(attn, dim=-1) if self.att_softmax else attn
        else:  # ret_model.py L145-157: zeros unless att_softmax (the released Charades config: zero output)
            probs = F.softmax(attn, dim=-1) if self.att_softmax else torch.zeros_like(attn).detach()
        if self.dropout is not None:
            probs = self.dropout(probs)
        out = torch.bmm(probs, v).transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        return self.linears[-1](out)


def decay_matrix(n, gamma, d_double=True):
    """``_get_D`` (ret_model.py L379-389), float32: gamma^(n-m)[n>=m] (+ transpose: diagonal 2)."""
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    d = (gamma ** (i - j)) * (i >= j).float()
    d[d != d] = 0
    return d + d.T if d_double else d


class RetLayer(nn.Module):
    """Maskable retention (ret_model.py L204-377; ret_model_tacos.py L105-244 for ``variant="mha"``)."""

    def __init__(self, mcfg):
        super().__init__()
        d = mcfg.joint_space
        self.variant, self.mask_mode, self.att_mode = mcfg.ret_variant, mcfg.mask_mode, mcfg.att_mode
        self.gamma, self.d_double, self.d_model = float(mcfg.gamma), bool(mcfg.d_double), d
        if self.variant not in ("projected", "mha"):
            raise JaxprvrError("model.ret_variant", "'projected' or 'mha'", repr(self.variant))
        modes = ("all", "v", "trans", "no") if self.variant == "projected" else ("all", "v", "no")
        if self.att_mode not in modes:
            raise JaxprvrError("model.att_mode", f"one of {modes}", repr(self.att_mode))
        if self.mask_mode not in ("no", "ret", "sparse", "both"):
            raise JaxprvrError("model.mask_mode", "no|ret|sparse|both", repr(self.mask_mode))
        if self.variant == "projected":  # registration order = official state_dict order (L222-228)
            for name in ("W_vid_Q", "W_vid_K", "W_vid_V", "W_txt_Q", "W_txt_K", "W_txt_V"):
                setattr(self, name, nn.Parameter(torch.randn(d, d) / d))
        self.self_attn = MultiHeadedAttention(mcfg.n_heads, d, dropout=mcfg.att_dropout,
                                              att_softmax=mcfg.att_softmax, variant=self.variant)
        self.xpos = XPOS(d)
        self.vid_length = mcfg.num_clips
        self.learn_vid_ret = nn.Embedding(self.vid_length * self.vid_length, 1)

    def masks(self, seq_len, txt_len, dtype=torch.float32):
        """``(mask, video_ret)``: the multiplicative mask of the attention (None in att_mode no) and the
        off-diagonal sigmoid table of the sparsity loss (L254-302)."""
        vid_len = seq_len - txt_len
        d = decay_matrix(vid_len, self.gamma, self.d_double).to(dtype)
        learn = torch.sigmoid(self.learn_vid_ret.weight.reshape(vid_len, vid_len))
        diag = torch.diag(torch.ones(vid_len, dtype=learn.dtype))
        video_ret = (1. - diag) * learn
        learn_mask = diag + video_ret
        if self.att_mode == "v":
            ret_mask, sparse_mask, mask = d, learn_mask, torch.ones(vid_len, vid_len, dtype=learn.dtype)
        elif self.att_mode in ("all", "trans"):
            ret_mask = torch.ones(seq_len, seq_len, dtype=learn.dtype)
            ret_mask[txt_len:, txt_len:] = d
            sparse_mask = torch.ones(seq_len, seq_len, dtype=learn.dtype)
            sparse_mask[txt_len:, txt_len:] = learn_mask
            mask = torch.ones(seq_len, seq_len, dtype=learn.dtype)
        else:  # "no": no mask; mask_mode other than "no" raises NameError/TypeError officially (L283-302)
            if self.mask_mode != "no":
                raise JaxprvrError("model.mask_mode", "'no' with att_mode 'no' (the official code crashes)",
                                   repr(self.mask_mode))
            return None, video_ret
        if self.mask_mode in ("ret", "both"):
            mask = mask * ret_mask
        if self.mask_mode in ("sparse", "both"):
            mask = mask * sparse_mask
        return mask, video_ret

    def forward(self, src, txt_len):
        """src (1, n_q + N, d) after LN1. Returns ``(out (1, n_q + N, d), loss_sparsity (scalar))``."""
        seq_len = src.shape[1]
        mask, video_ret = self.masks(seq_len, txt_len)
        loss_sparsity = torch.tensor(0.0)
        if self.mask_mode in ("sparse", "both"):
            loss_sparsity = loss_sparsity + torch.mean(torch.abs(video_ret))  # L243-246
        if self.att_mode == "no":
            return src, loss_sparsity
        txt_mem, vid_mem = src[:, :txt_len], src[:, txt_len:]
        mask_txt = torch.ones(1, txt_len)
        pe_txt = sine_pe(txt_mem, mask_txt, self.d_model) + txt_mem
        trans = self.att_mode == "trans"
        if self.variant == "projected" and not trans:
            txt_q, txt_k, txt_v = pe_txt @ self.W_txt_Q, pe_txt @ self.W_txt_K, txt_mem @ self.W_txt_V
            vid_q = self.xpos(vid_mem) @ self.W_vid_Q
            vid_k = self.xpos(vid_mem, downscale=True) @ self.W_vid_K
            vid_v = vid_mem @ self.W_vid_V
        else:  # mha (projections inside the attention) / trans (L349-366: no W at all)
            txt_q, txt_k, txt_v = pe_txt, pe_txt, txt_mem
            vid_q, vid_k, vid_v = self.xpos(vid_mem), self.xpos(vid_mem, downscale=True), vid_mem
        if self.att_mode == "v":  # only video -> video; query tokens leave as their V (no output Linear)
            ret_v = self.self_attn(vid_q.permute(1, 0, 2), vid_k.permute(1, 0, 2), vid_v.permute(1, 0, 2), mask)
            return torch.cat([txt_v, ret_v.transpose(0, 1)], dim=1), loss_sparsity
        q = torch.cat([txt_q, vid_q], dim=1).permute(1, 0, 2)
        k = torch.cat([txt_k, vid_k], dim=1).permute(1, 0, 2)
        v = torch.cat([txt_v, vid_v], dim=1).permute(1, 0, 2)
        out = self.self_attn(q, k, v, None if trans else mask)  # trans: no mask in the attention (L365)
        return out.transpose(0, 1), loss_sparsity


class TransRet(nn.Module):
    """ret_model.py L392-453: pre-LN blocks (retention, then FFN 1024 with GELU), dropouts 0.1, final LayerNorm.
    Module order as official: all RetLayers, then ffns, layer_norms_1, layer_norms_2, norm, dropouts."""

    def __init__(self, mcfg):
        super().__init__()
        d, n = mcfg.joint_space, mcfg.trans_layers
        self.layers = n
        self.rets = nn.ModuleList([RetLayer(mcfg) for _ in range(n)])
        self.ffns = nn.ModuleList([nn.Sequential(nn.Linear(d, mcfg.ffn_dim), nn.GELU(), nn.Linear(mcfg.ffn_dim, d))
                                   for _ in range(n)])
        self.layer_norms_1 = nn.ModuleList([nn.LayerNorm(d) for _ in range(n)])
        self.layer_norms_2 = nn.ModuleList([nn.LayerNorm(d) for _ in range(n)])
        self.norm = nn.LayerNorm(d)
        self.dropout_1 = nn.ModuleList([HashDropout(mcfg.dropout) for _ in range(n)])
        self.dropout_2 = nn.ModuleList([HashDropout(mcfg.dropout) for _ in range(n)])

    def forward(self, txt_src, vid_src):
        txt_length = txt_src.shape[1]
        src = torch.cat([txt_src, vid_src], dim=1)
        loss_sp = 0.
        for i in range(self.layers):
            temp, loss_sparsity = self.rets[i](self.layer_norms_1[i](src), txt_length)
            loss_sp = loss_sp + loss_sparsity
            src2 = self.dropout_1[i](temp) + src
            src = self.dropout_2[i](self.ffns[i](self.layer_norms_2[i](src2))) + src2
        return self.norm(src), loss_sp


def get_padded_mask_and_weight(mask, conv):
    """proposal_conv.py L13-17: round(conv(mask, ones)) -> 1/count where > 0 (0 elsewhere), and the new mask."""
    w = torch.round(F.conv2d(mask.clone().float(), torch.ones(1, 1, *conv.kernel_size), stride=conv.stride,
                             padding=conv.padding, dilation=conv.dilation))
    w[w > 0] = 1 / w[w > 0]
    return w > 0, w


class ProposalConv(nn.Module):
    """proposal_conv.py L20-46: [Conv2d -> BatchNorm2d -> ReLU -> x mask weight] x L, then two 1x1 heads. ``bn``
    is registered before ``convs`` (its keys come first, as officially)."""

    def __init__(self, input_size, hidden_size, k, num_stack_layers, output_size, mask2d):
        super().__init__()
        self.num_stack_layers = num_stack_layers
        self.mask2d = mask2d[None, None, :, :]
        first_padding = (k - 1) * num_stack_layers // 2
        self.bn = nn.ModuleList([nn.BatchNorm2d(hidden_size)])
        self.convs = nn.ModuleList([nn.Conv2d(input_size, hidden_size, k, padding=first_padding)])
        for _ in range(num_stack_layers - 1):
            self.convs.append(nn.Conv2d(hidden_size, hidden_size, k))
            self.bn.append(nn.BatchNorm2d(hidden_size))
        self.conv1x1_iou = nn.Conv2d(hidden_size, output_size, 1)
        self.conv1x1_contrastive = nn.Conv2d(hidden_size, output_size, 1)

    def mask_weights(self) -> list[torch.Tensor]:
        """The per-layer renormalisation weights (1, 1, N, N) (constants of mask2d and the conv geometry)."""
        padded, out = self.mask2d, []
        for conv in self.convs:
            padded, w = get_padded_mask_and_weight(padded, conv)
            out.append(w)
        return out

    def forward(self, x):
        for i, w in enumerate(self.mask_weights()):
            x = self.bn[i](self.convs[i](x)).relu()
            x = x * w.to(x.dtype)
        return self.conv1x1_contrastive(x), self.conv1x1_iou(x)


# ---------------------------------------------------------------------------------------------- the model


class MRNet(nn.Module):
    """The official ``RET`` (ret_model.py L469-595). ``cfg``: a jaxprvr Config (``.model`` MRNetConfig and
    ``.loss`` MRNetLossConfig) or an MRNetConfig (``loss_cfg`` then defaults to MRNetLossConfig())."""

    def __init__(self, cfg, loss_cfg=None):
        super().__init__()
        mcfg, lcfg = split_cfg(cfg, loss_cfg)
        self.cfg, self.loss_cfg = mcfg, lcfg
        self.joint_space = d = mcfg.joint_space
        if mcfg.num_pre_clips % mcfg.num_clips:
            raise JaxprvrError("model.num_pre_clips", f"a multiple of num_clips={mcfg.num_clips}",
                               str(mcfg.num_pre_clips))
        # construction order = official RNG order (L478-501)
        self.featpool = FeatAvgPool(mcfg.input_size, mcfg.featpool_hidden, mcfg.featpool_kernel,
                                    mcfg.num_pre_clips // mcfg.num_clips)
        self.feat2d = SparseMaxPool(mcfg.pooling_counts, mcfg.num_clips)
        self.text_encoder = DistilBert(mcfg.text_dim, d)
        self.text_out = TextOut(d, d)
        self.trans_ret = TransRet(mcfg)
        self.proposal_conv = ProposalConv(d, mcfg.predictor_hidden, mcfg.predictor_kernel, mcfg.predictor_layers,
                                          d, self.feat2d.mask2d)
        p = mcfg.input_dropout
        # L495-501 builds THREE LinearLayers and keeps the first two ([:n_input_proj]): the third is constructed
        # (its Linear draws from the RNG) and discarded, so the RNG state after construction matches.
        layers = [LinearLayer(mcfg.featpool_hidden, d, p, relu=True), LinearLayer(d, d, p, relu=False),
                  LinearLayer(d, d, p, relu=True)]
        self.input_vid_proj = nn.Sequential(*layers[:2])
        self.iou_score_loss = BceLoss(lcfg.min_iou, lcfg.max_iou, self.feat2d.mask2d)
        self.contrastive_loss = ContrastiveLoss(lcfg, self.feat2d.mask2d)
        self.only_iou_loss_epoch = lcfg.only_iou_epoch
        self.last: dict = {}

    @property
    def mask2d(self) -> torch.Tensor:
        return self.feat2d.mask2d

    def forward(self, batches, cur_epoch=1):
        dt = self.featpool.conv.weight.dtype
        feats_in = _tensor(_get(batches, "feats"), dt)
        queries = [_tensor(q, dt) for q in _get(batches, "queries")]
        ious2d = [_tensor(x, torch.float32) for x in _get(batches, "all_iou2d")]
        if len(ious2d) != feats_in.shape[0] or len(queries) != feats_in.shape[0]:  # L519-523
            raise JaxprvrError("MRNet batch", f"{feats_in.shape[0]} all_iou2d / queries entries",
                               f"{len(ious2d)} / {len(queries)}")
        for q, iou in zip(queries, ious2d):
            if q.shape[0] != iou.shape[0] or q.shape[0] == 0:
                raise JaxprvrError("MRNet batch", "as many iou2d maps as queries (>= 1)",
                                   f"{iou.shape[0]} maps for {q.shape[0]} queries")
        feats = self.featpool(feats_in).transpose(1, 2)  # B x N x C
        sent_feat, sent_feat_iou = self.text_encoder(queries)
        loss_sparse = 0.
        vid_feats, txt_feats = [], []
        for vid, txt in zip(feats, sent_feat):  # per video (L534-552)
            src_vid = self.input_vid_proj(vid).unsqueeze(0)
            src_txt = txt.unsqueeze(0)
            memory, loss_sp = self.trans_ret(src_txt, src_vid)
            loss_sparse = loss_sparse + loss_sp
            txt_feats.append(memory[:, :src_txt.shape[1]].squeeze(0))
            vid_feats.append(memory[:, src_txt.shape[1]:].squeeze(0))
        vid_stack = torch.stack(vid_feats, dim=0).transpose(1, 2)  # B x d x N
        map2d, map2d_iou = self.proposal_conv(self.feat2d(vid_stack))
        _, txt_feat_iou = self.text_out(txt_feats)
        mask = self.mask2d
        n = map2d.shape[-1]
        iou_scores = []
        for i, sf_iou in enumerate(txt_feat_iou):  # L564-573
            v = F.normalize(map2d_iou[i], dim=0)
            s = F.normalize(sf_iou.reshape(-1, self.joint_space), dim=1)
            iou_scores.append((torch.mm(s, v.reshape(v.size(0), -1)).reshape(-1, n, n) * 10).sigmoid() * mask)
        self.last = {"map2d": map2d, "map2d_iou": map2d_iou, "txt_feats": txt_feats, "vid_feats": vid_stack,
                     "txt_feat_iou": txt_feat_iou, "iou_scores": iou_scores, "loss_sparse": loss_sparse}
        if self.training:
            moments = [_tensor(m, torch.float32) for m in _get(batches, "moments")]
            loss_iou = self.iou_score_loss(torch.cat(iou_scores, dim=0), torch.cat(ious2d, dim=0).to(dt),
                                           cur_epoch)
            loss_vid, loss_sent = self.contrastive_loss(map2d, txt_feats, [x.to(dt) for x in ious2d], moments)
            return loss_vid, loss_sent, loss_iou, loss_sparse
        contrastive_scores = []
        for i, sf in enumerate(txt_feats):  # L586-594
            v = F.normalize(map2d[i], dim=0)
            s = F.normalize(sf, dim=1)
            contrastive_scores.append(torch.mm(s, v.reshape(v.size(0), -1)).reshape(-1, n, n) * mask)
        self.last["contrastive_scores"] = contrastive_scores
        return map2d_iou, sent_feat_iou, contrastive_scores, iou_scores


# ---------------------------------------------------------------------------------------------- batches, dropout


def official_batch(batch) -> dict:
    """Our padded batch (the data contract: ``feats`` (B, T, D), ``queries`` (B, Q, D), ``n_queries``, ``moments``
    (B, Q, 2), ``iou2d`` (B, Q, N, N), ``video_valid``; host keys ``index``, ``vid``) -> the official ``batches``
    (lists of the real queries of the real videos), with ``idxs`` (dataset indices) and ``vid`` when present."""
    valid = np.asarray(batch.get("video_valid", np.ones(len(batch["feats"]))), dtype=np.float32) > 0
    keep = np.nonzero(valid)[0]
    nq = np.asarray(batch["n_queries"]).astype(int)
    out = {
        "feats": torch.as_tensor(np.asarray(batch["feats"])[keep], dtype=torch.float32),
        "queries": [torch.as_tensor(np.asarray(batch["queries"][b])[:nq[b]], dtype=torch.float32) for b in keep],
        "all_iou2d": [torch.as_tensor(np.asarray(batch["iou2d"][b])[:nq[b]], dtype=torch.float32) for b in keep],
        "moments": [torch.as_tensor(np.asarray(batch["moments"][b])[:nq[b]], dtype=torch.float32) for b in keep],
        "num_sentence": [int(nq[b]) for b in keep],
    }
    if "index" in batch:
        out["idxs"] = [int(np.asarray(batch["index"])[b]) for b in keep]
    if "vid" in batch:
        out["vid"] = [batch["vid"][b] for b in keep]
    return out


def flax_counters(flax_shape: Sequence[int], *selectors) -> Callable[[Sequence[int], torch.device], torch.Tensor]:
    """A :class:`torch_ref.dropout.Draw` ``index`` for a torch dropout call that reads a slice of one Flax draw of
    ``flax_shape``: ``selectors`` pick, per leading Flax axis, an int (axis dropped) or a sequence of indices
    (``np.ix_`` style); the remaining axes are taken whole. E.g. video ``b`` of a (B, Q+N, d) TransRet draw whose
    torch call is (1, n_q + N, d): ``flax_counters((B, Q + N, d), b, rows)`` with ``rows = [0..n_q-1, Q..Q+N-1]``
    (then reshaped to the torch shape)."""
    full = flat_index(tuple(flax_shape)).numpy()
    picked = [np.asarray([s]) if np.isscalar(s) else np.asarray(s) for s in selectors]
    rest = [np.arange(k) for k in full.shape[len(picked):]]
    chosen = np.ascontiguousarray(full[np.ix_(*picked, *rest)])

    def index(shape, device):
        return torch.as_tensor(chosen.reshape(tuple(shape)), device=device)

    return index


# ---------------------------------------------------------------------------------------------- the recipe


def official_total(loss_vid, loss_sent, loss_iou, loss_sp, cfg, epoch, batch_size: Optional[int] = None):
    """``trainer.py`` L67, L90-106: ``(loss, terms)``; terms are the logged (weighted) values. The sparsity term is
    added a second time when ``w_sparse * L_sp >= loss_ratio * BATCH_SIZE * w_sparse`` with the CONFIGURED batch
    size (``cfg.train.batch_size``, or ``batch_size``); after ``only_iou_epoch`` everything but the BCE is x0.01."""
    lcfg = cfg.loss if hasattr(cfg, "loss") else cfg
    bs = batch_size if batch_size is not None else cfg.train.batch_size
    overall_min = lcfg.loss_ratio * bs * lcfg.w_sparse
    w = lcfg.w_contrastive
    loss_vid, loss_sent = loss_vid * w, loss_sent * w
    loss_sp = loss_sp * lcfg.w_sparse
    loss = 0
    if epoch <= lcfg.only_iou_epoch:
        loss += loss_iou
        loss += loss_sent + loss_vid + loss_sp
        if loss_sp >= overall_min:
            loss += loss_sp
    else:
        loss += loss_iou
        loss += (loss_sent + loss_vid + loss_sp) * 0.01
        if loss_sp >= overall_min:
            loss += loss_sp * 0.01
    return loss, {"loss_vid": loss_vid, "loss_sent": loss_sent, "loss_iou": loss_iou, "loss_sp": loss_sp}


def official_optimizer(model: nn.Module, cfg):
    """``train_net.py`` L41-52: AdamW over two groups (``base``; ``bert`` at 0.1 lr, empty: no parameter name
    contains "bert"), betas (adam_b1, adam_b2) = (0.9, 0.99), weight decay ``train.wd`` (1e-5); MultiStepLR(
    milestones, lr_gamma) stepped once per epoch. Returns ``(optimizer, scheduler)``."""
    t = cfg.train
    bert = [p for n, p in model.named_parameters() if "bert" in n]
    base = [p for n, p in model.named_parameters() if "bert" not in n]
    opt = torch.optim.AdamW([{"params": base}, {"params": bert, "lr": t.lr * 0.1}], lr=t.lr * 1.0,
                            betas=(t.adam_b1, t.adam_b2), weight_decay=t.wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.milestones), gamma=t.lr_gamma)
    return opt, sched


def official_train_step(model: nn.Module, optimizer, batch, epoch: int, cfg, batch_size: Optional[int] = None):
    """One iteration of ``trainer.py`` L88-111: zero_grad (torch 1.11: zeroing, not None), forward in train mode,
    :func:`official_total`, backward, ``clip_grad_norm_(parameters, train.max_grad_norm)`` (torch skips params
    whose grad is None), AdamW step (which skips them too: neither moments nor weight decay). Returns floats
    ``{"loss", "loss_vid", "loss_sent", "loss_iou", "loss_sp", "grad_norm"}``."""
    model.train()
    optimizer.zero_grad(set_to_none=False)
    loss_vid, loss_sent, loss_iou, loss_sp = model(batch, cur_epoch=epoch)
    loss, terms = official_total(loss_vid, loss_sent, loss_iou, loss_sp, cfg, epoch, batch_size)
    loss.backward()
    gn = float("nan")
    if cfg.train.max_grad_norm > 0:
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm))
    optimizer.step()
    return {"loss": float(loss.detach()), **{k: float(torch.as_tensor(v).detach()) for k, v in terms.items()},
            "grad_norm": gn}


def official_train_epoch(model, optimizer, scheduler, batches, epoch: int, cfg) -> list[dict]:
    """``trainer.py`` L70-141 for one (1-based) epoch: every batch, then ``scheduler.step()``."""
    logs = [official_train_step(model, optimizer, b, epoch, cfg) for b in batches]
    scheduler.step()
    return logs


def save_official_checkpoint(path, model, optimizer=None, scheduler=None, epoch: int = 1):
    """``checkpoint.py`` L36-46 (via ``trainer.py`` L143 ``**arguments``): ``{model, optimizer, scheduler, epoch}``."""
    data = {"model": model.state_dict()}
    if optimizer is not None:
        data["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        data["scheduler"] = scheduler.state_dict()
    data["epoch"] = epoch
    torch.save(data, path)
    return path


def official_state_keys(cfg) -> list[str]:
    """The official state_dict keys of ``cfg`` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return list(MRNet(cfg).state_dict())


def _read(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise JaxprvrError(path, "an MRNet checkpoint (a dict)", type(obj).__name__)
    if "model" not in obj:  # a bare state_dict (checkpoint.py L114-118)
        obj = {"model": obj}
    sd = obj["model"]
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):  # model_serialization.py L61-68
        sd = collections.OrderedDict((k[len("module."):], v) for k, v in sd.items())
    obj["model"] = sd
    return obj


def load_official_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None) -> dict:
    """Load an official file (``pool_model_14.pth``, ``pool_model_110e.pth``, or one :func:`save_official_checkpoint`
    wrote) STRICTLY: the key sets and shapes must equal the model's (a :class:`JaxprvrError` names the
    differences). The official loader (model_serialization.py L10-80) instead matches keys by suffix and keeps
    the initial values of missing ones silently (:func:`official_lenient_load`). Optimizer / scheduler states
    are loaded when given and present. Returns the file's dict (``epoch`` etc.)."""
    obj = _read(path)
    sd, own = obj["model"], model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise JaxprvrError(path, f"the {len(own)} state_dict keys of this MRNet config",
                           f"{len(missing)} missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}",
                           hint="wrong --config (ret_variant, trans_layers, predictor_layers)?")
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise JaxprvrError(path, f"shape {tuple(own[bad[0]].shape)} for {bad[0]}", str(tuple(sd[bad[0]].shape)),
                           hint=f"{len(bad)} tensors differ in shape: wrong --config?")
    model.load_state_dict(sd, strict=True)
    if optimizer is not None and "optimizer" in obj:
        optimizer.load_state_dict(obj["optimizer"])
    if scheduler is not None and "scheduler" in obj:
        scheduler.load_state_dict(obj["scheduler"])
    return obj


def official_lenient_load(model: nn.Module, loaded_state_dict) -> list[str]:
    """The official ``load_state_dict`` (model_serialization.py L10-80): every model key takes the loaded key that
    is its longest suffix; keys without a match keep their current values, silently. Returns those keys."""
    own = model.state_dict()
    current, loaded = sorted(own), sorted(loaded_state_dict)
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded_state_dict = {k.replace("module.", ""): v for k, v in loaded_state_dict.items()}
        loaded = sorted(loaded_state_dict)
    kept = []
    for key in current:
        best = max(((len(j), j) for j in loaded if key.endswith(j)), default=(0, None))
        if best[0] == 0:
            kept.append(key)
        else:
            own[key] = loaded_state_dict[best[1]]
    model.load_state_dict(own)
    return kept

