"""The PyTorch twin of BackBone_tvr (``backbone_tvr/tvr/models/modeling.py``, ``module_cross.py``,
``until_module.py``): CLIP + seqTransf + WTI, official module and key names (359 keys for ViT-B/32 with 4 seqTransf
blocks: ``clip.`` + OpenAI's 302, ``text_weight_fc.{0,2}``, ``video_weight_fc.{0,2}``,
``frame_position_embeddings.weight``, ``transformerClip.resblocks.{0..3}``).

Transcribed: ``get_text_feat`` / ``get_video_feat`` / ``agg_video_feat`` (seqTransf and None) /
``get_similarity_logits`` / the training loss (``CrossEn`` both ways); the construction (``init_weights`` then the
CLIP load then the initialisation trick, L85-129) as :func:`official_init`; ``convert_weights`` only when asked
(the GPU path). One process: ``AllGather`` is the identity (L146-153 runs only under CUDA + DDP).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_ref.clip import CLIP, NON_PARAMETER_KEYS, QuickGELU, dims_of


class TFLayerNorm(nn.Module):
    """``until_module.LayerNorm``: TF style, eps 1e-12 inside the square root, in the input dtype."""

    def __init__(self, hidden_size, eps=1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.variance_epsilon)
        return self.weight * x + self.bias


class CrossBlock(nn.Module):
    """``module_cross.ResidualAttentionBlock``: the additive mask repeated per head (``repeat_interleave``)."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = TFLayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = TFLayerNorm(d_model)
        self.n_head = n_head

    def attention(self, x, attn_mask):
        return self.attn(x, x, x, need_weights=False, attn_mask=attn_mask.repeat_interleave(self.n_head, dim=0))[0]

    def forward(self, para):
        x, attn_mask = para
        x = x + self.attention(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return (x, attn_mask)


class CrossTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[CrossBlock(width, heads) for _ in range(layers)])

    def forward(self, x, attn_mask):
        return self.resblocks((x, attn_mask))[0]


class BackBoneTVR(nn.Module):
    """``BackBone_tvr`` with the CLIP sizes given (``dims``: :func:`torch_ref.clip.dims_of` keys) instead of read
    from a fixed path; ``agg_module`` ``"seqTransf"`` | ``"None"``."""

    def __init__(self, dims: dict, agg_module: str = "seqTransf", num_hidden_layers: int = 4):
        super().__init__()
        self.agg_module = agg_module
        self.clip = CLIP(**dims)
        width = dims["transformer_width"]
        heads = width // 64 if dims.get("transformer_heads") is None else dims["transformer_heads"]
        self.text_weight_fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 1))
        self.video_weight_fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 1))
        if agg_module == "seqTransf":
            self.frame_position_embeddings = nn.Embedding(dims["context_length"], width)
            self.transformerClip = CrossTransformer(width, num_hidden_layers, heads)

    # -- features (the official ``.float()`` casts: fp16 -> fp32; a float64 twin stays float64)
    def get_text_feat(self, text_ids, text_mask):
        cls, text_feat = self.clip.encode_text(text_ids, return_hidden=True)
        return _float(text_feat), _float(cls)

    def get_video_feat(self, video, video_mask):
        b, t = video_mask.shape
        frames = self.clip.encode_image(video.reshape((b * t,) + tuple(video.shape[2:])), return_hidden=True)[0]
        frames = _float(frames).view(b, -1, frames.size(-1))
        return self.agg_video_feat(frames, video_mask)

    def agg_video_feat(self, video_feat, video_mask):
        if self.agg_module == "None":
            return video_feat
        original = video_feat
        t = video_feat.size(1)
        pos = self.frame_position_embeddings(torch.arange(t, dtype=torch.long).unsqueeze(0).expand(
            video_feat.size(0), -1))
        video_feat = video_feat + pos
        ext = (1.0 - video_mask.unsqueeze(1)) * -1000000.0
        ext = ext.expand(-1, video_mask.size(1), -1)
        video_feat = self.transformerClip(video_feat.permute(1, 0, 2), ext).permute(1, 0, 2)
        return video_feat + original

    def get_similarity_logits(self, text_feat, text_mask, video_feat, video_mask):
        text_weight = self.text_weight_fc(text_feat).squeeze(2)
        text_weight = text_weight.masked_fill((1 - text_mask).to(torch.bool), float(-9e15))
        text_weight = torch.softmax(text_weight, dim=-1)
        video_weight = self.video_weight_fc(video_feat).squeeze(2)
        video_weight = video_weight.masked_fill((1 - video_mask).to(torch.bool), float(-9e15))
        video_weight = torch.softmax(video_weight, dim=-1)
        text_feat = text_feat / text_feat.norm(dim=-1, keepdim=True)
        video_feat = video_feat / video_feat.norm(dim=-1, keepdim=True)
        logits = torch.einsum("atd,bvd->abtv", [text_feat, video_feat])
        logits = torch.einsum("abtv,at->abtv", [logits, text_mask])
        logits = torch.einsum("abtv,bv->abtv", [logits, video_mask])
        t2v, _ = logits.max(dim=-1)
        t2v = torch.einsum("abt,at->ab", [t2v, text_weight])
        v2t, _ = logits.max(dim=-2)
        v2t = torch.einsum("abv,bv->ab", [v2t, video_weight])
        out = (t2v + v2t) / 2.0
        return out, out.T

    def forward(self, text_ids, text_mask, video, video_mask):
        """The training loss (``forward`` in train mode, one process)."""
        text_mask = text_mask.to(torch.float32 if video.dtype != torch.float64 else torch.float64)
        video_mask = video_mask.to(text_mask.dtype)
        text_feat, _ = self.get_text_feat(text_ids, text_mask)
        video_feat = self.get_video_feat(video, video_mask)
        t2v, v2t = self.get_similarity_logits(text_feat, text_mask, video_feat, video_mask)
        scale = self.clip.logit_scale.exp()
        return (cross_en(t2v * scale) + cross_en(v2t * scale)) / 2.0


def _float(x):
    return x if x.dtype == torch.float64 else x.float()


def cross_en(sim_matrix):
    """``until_module.CrossEn``."""
    logpt = F.log_softmax(sim_matrix, dim=-1)
    return (-torch.diag(logpt)).mean()


def bert_init(module):
    """``BackBone_tvr.init_weights`` (L293-308)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(module, TFLayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def official_init(clip_state_dict, agg_module: str = "seqTransf", num_hidden_layers: int = 4, seed: int = 42,
                  dims: dict | None = None) -> BackBoneTVR:
    """The official construction: sizes from the CLIP weights, ``init_weights`` over the whole model, the CLIP
    loaded with ``strict=False`` (checked here: every CLIP key must load), then the initialisation trick."""
    torch.manual_seed(seed)
    sd = {k: v for k, v in clip_state_dict.items() if k not in NON_PARAMETER_KEYS}
    model = BackBoneTVR(dims or dims_of(sd), agg_module, num_hidden_layers)
    model.apply(bert_init)
    missing, unexpected = model.clip.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise KeyError(f"CLIP weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
    new = OrderedDict()
    if agg_module == "seqTransf":
        for key, val in sd.items():
            if key == "positional_embedding":
                new["frame_position_embeddings.weight"] = val.clone().float()
            elif key.find("transformer.resblocks") == 0 and int(key.split(".")[2]) < num_hidden_layers:
                new[key.replace("transformer.", "transformerClip.")] = val.clone().float()
    model.load_state_dict(new, strict=False)
    return model


def backbone_keys(dims: dict, agg_module: str = "seqTransf", num_hidden_layers: int = 4) -> list[str]:
    with torch.device("meta"):
        return list(BackBoneTVR(dims, agg_module, num_hidden_layers).state_dict())


def numpy_state(model) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- the recipe


def warmup_cosine(x, warmup=0.002):
    """``optimization.py`` L26-29."""
    import math

    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


class BertAdamTVR(torch.optim.Optimizer):
    """BackBone_tvr's ``BertAdam`` (``optimization.py`` L52-168; pytorch-pretrained-bert style): per tensor, the
    per-tensor ``clip_grad_norm_`` (``max_grad_norm``), ``m``/``v`` without bias correction, ``u = m / (sqrt(v) + e)
    + wd p``, ``p -= group lr * schedule(step / t_total) * u`` with ``step`` counted from 0; tensors whose grad is
    None are skipped."""

    def __init__(self, params, lr, warmup=-1, t_total=-1, schedule="warmup_cosine", b1=0.9, b2=0.999, e=1e-6,
                 weight_decay=0.01, max_grad_norm=1.0):
        defaults = dict(lr=lr, schedule=schedule, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p.data)
                    state["next_v"] = torch.zeros_like(p.data)
                next_m, next_v = state["next_m"], state["next_v"]
                beta1, beta2 = group["b1"], group["b2"]
                if group["max_grad_norm"] > 0:
                    torch.nn.utils.clip_grad_norm_(p, group["max_grad_norm"])
                next_m.mul_(beta1).add_(grad, alpha=1 - beta1)
                next_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = next_m / (next_v.sqrt() + group["e"])
                if group["weight_decay"] > 0.0:
                    update += group["weight_decay"] * p.data
                if group["t_total"] != -1:
                    lr_scheduled = group["lr"] * warmup_cosine(state["step"] / group["t_total"], group["warmup"])
                else:
                    lr_scheduled = group["lr"]
                p.data.add_(-(lr_scheduled * update))
                state["step"] += 1


def official_optimizer(model, lr=1e-4, coef_lr=1e-3, weight_decay=0.2, warmup=0.1, t_total=100):
    """``prep_optimizer`` (``main_retrieval.py`` L167-203): four groups (decay x clip), ``lr * coef_lr`` on names
    containing ``"clip."``, no decay on names containing ``bias`` / ``LayerNorm.bias`` / ``LayerNorm.weight``."""
    named = list(model.named_parameters())
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    decay = [(n, p) for n, p in named if not any(nd in n for nd in no_decay)]
    nodecay = [(n, p) for n, p in named if any(nd in n for nd in no_decay)]
    groups = [
        {"params": [p for n, p in decay if "clip." in n], "weight_decay": weight_decay, "lr": lr * coef_lr},
        {"params": [p for n, p in decay if "clip." not in n], "weight_decay": weight_decay},
        {"params": [p for n, p in nodecay if "clip." in n], "weight_decay": 0.0, "lr": lr * coef_lr},
        {"params": [p for n, p in nodecay if "clip." not in n], "weight_decay": 0.0},
    ]
    return BertAdamTVR(groups, lr=lr, warmup=warmup, schedule="warmup_cosine", b1=0.9, b2=0.98, e=1e-6,
                       t_total=t_total, weight_decay=weight_decay, max_grad_norm=1.0)


def official_after_backward(model, optimizer):
    """``train_epoch`` L254-268 after ``loss.backward()``: the global ``clip_grad_norm_(1.0)``, the step, zero_grad,
    ``logit_scale`` clamped at ln 100."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    torch.clamp_(model.clip.logit_scale.data, max=np.log(100))


# The registry names the twin by the Flax class name (one family, one name on both sides).
ClipWTI = BackBoneTVR
