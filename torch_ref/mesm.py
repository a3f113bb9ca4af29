"""PyTorch twin of MESM (lntzm/MESM @ 8501bdea, AAAI'24): ``model/model.py`` ``MESM``, ``model/transformer.py``,
``model/attention.py``, ``model/position_encoding.py``, builders ``runner.py`` L160-298; CPU, any float dtype.

A re-statement of the official model from its code, with the official module tree and ``state_dict`` keys (273
for the C+SF / VGG+GloVe configs, 289 for TACoS's ``T2VEncoder_TwoMLP`` enhancer; ``text_encoder.*`` keys are never
part of it, as in the official checkpoints, ``train.py`` L186): an official ``model_test_best.ckpt["model"]`` loads
with ``strict=True``. The submodules are built in the official order (``build_model``: enhancer, aligner,
transformer, text position table, then ``MESM.__init__``), incl. ``T2VEncoder_TwoMLP``'s discarded first build and
every xavier re-initialisation, so ``torch.manual_seed(s)`` then :func:`build_mesm` draws the official weights (when
the official run built its text encoder first, build yours first too).

Semantics kept (vmr.md B2, B7, B9):

* ``nn.MultiheadAttention`` sequence-first with its fused ``in_proj`` (:class:`SeqMHA`, a subclass, so init and
  keys are torch's); the T2V layer's extra ``attn_mask`` is built head-major (``repeat(nhead, 1, 1)``) and read
  batch-major, so row ``b``, head ``h`` gets the padding mask of row ``(b * nhead + h) mod B``
  (``transformer.py`` L528-530); ``t2v_mask="per_row"`` gives each row its own mask (the corrected behaviour);
* the T2V post-norm quirk ``x = vid + drop(attn); out = LN2(x + drop(FFN(LN1(x))))`` (L535-540), TwoMLP's second
  FFN/norms in the MLM pass (L597-611); SS-MESM's T2V layers without positions (``model.py`` L474-483);
* the global token is key-masked (``transformer.py`` L185-186): no token attends to it, it attends to the video;
* DAB decoder: sine embedding of (c, w) with a float32 ``dim_t``, ``ref_point_head``, ``query_scale`` identity at
  layer 0, ``modulate_t_attn`` (``σ(ref_anchor_head(tgt)) / w`` over the whole sine embedding), ``ca_qpos_proj``
  only in layer 0, per-head [content; sine] cross-attention (custom MHA, :class:`DecoderMHA`, no in-projection,
  max-subtracted softmax), the refined reference appended *before* ``.detach()`` (L393-397), the final LayerNorm
  on every intermediate output; ``inverse_sigmoid`` eps 1e-3;
* ``PositionEmbeddingSine`` in float32 (``cumsum(dtype=float32)``) and the decoder's float32 ``dim_t``, promoted
  on use, as in a float64 official run; the decoder's zero ``tgt`` in the model's dtype (officially the default
  dtype: a float64 official run needs ``torch.set_default_dtype(torch.float64)``); ``masked_token``,
  ``unknown_token`` and ``masked_sent_token`` are created ``.float()`` as officially, so run ``model.double()``
  for float64 (officially too: the MLM path's LayerNorm rejects the mixed dtypes);
* init: xavier over every >1-D parameter of ``T2VEncoder``/``Transformer`` (overwriting ``bbox_embed``'s zero last
  weight; its bias stays 0), torch defaults elsewhere (SS-MESM's layers are deep copies of one layer: identical at
  init), ``query_embed`` N(0, 1), ``global_rep_{token,pos}`` randn, learned tokens zero, PReLU 0.25;
* the negative branch (``sample_outclass_neg`` with ``torch.randperm``, after the positive transformer), the MLM
  branch (``_replace_unknown``/``_mask_words`` projecting their tokens through ``input_txt_proj`` at every use,
  ``np.random.choice(p=L1-normalised float32 POS weight, replace=False)``), SS-MESM's second application of the
  input projections, and ``output_sent_proj`` computed though unused: every dropout is called in the official
  order, so with the same torch / numpy RNG states the train-mode forward draws the official masks.

Dropout: every official dropout is a :class:`torch_ref.dropout.HashDropout` (``nn.Dropout`` unless armed), at
the official place: ``*.net.0`` (p=input_dropout), ``dropout``, ``dropout1..3``, ``dropout_1``, ``dropout2_1``
(p=dropout) and the attention probabilities ``self_attn.dropout`` / ``cross_attn.dropout`` (p=dropout, shape
(B, H, Lq, Lk), the official (B·H, Lq, Lk) in the same order). The transformer-internal ones act on
sequence-first tensors (as officially, so torch's RNG draws the official masks); armed, they count their hash
counters on the batch-first view (B, L, ...), the Flax layout.

Calling convention (the official collate dict, see :func:`prepare_batch`)::

    model = build_mesm(cfg.model, cfg.loss)          # or MESM.from_opt(json.load(open("opt.json")))
    out = model(batch, words_feat=words, dataset_name="charades", is_training=True)   # official ``out`` dict
    model.aux                                         # named intermediates of the last forward
    out, aux = model(batch, ..., return_aux=True)

The criterion, matcher and the official optimizer / train step are in :mod:`torch_ref.mesm_loss`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxprvr.errors import JaxprvrError
from torch_ref.dropout import HashDropout
# LayerNorm -> Dropout -> Linear (-> ReLU) (model.py L412-434) and TrainablePositionalEncoding (position_encoding.py
# L10-32; built for its checkpoint keys, used only with use_txt_pos): the same modules as the PRVR twins'
from torch_ref.layers import LinearLayer, TrainablePositionalEncoding  # noqa: F401 (re-exported)

__all__ = ["MESM", "MESMOptions", "build_mesm", "official_state_keys", "STATE_DICT_KEYS", "STATE_DICT_COUNTS",
           "prepare_batch", "sample_outclass_neg",
           "official_mask_words", "t2v_head_masks", "inverse_sigmoid", "gen_sineembed_for_position",
           "sine_position", "CLIPTextEncoder", "GloveTextEncoder", "build_clip_text_encoder", "SINGLE_MOMENT",
           "MULTI_MOMENT", "T2V_MASKS"]

SINGLE_MOMENT = ("charades", "charades-cg", "charades-cd", "tacos")  # model.py L185
MULTI_MOMENT = ("qvhighlights",)  # model.py L190; runner.py L302 multi_clip
T2V_MASKS = ("head_major", "per_row")


# ---------------------------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class MESMOptions:
    """The official ``opt`` fields the model reads (official names; ``v_feat_dim`` is the json's value, before
    ``use_tef`` adds 2, ``utils/config.py`` L242-243). Built from a :class:`jaxprvr.config.MESMConfig` or an
    official ``opt.json`` dict."""

    v_feat_dim: int = 2816
    t_feat_dim: int = 512
    use_tef: bool = True
    tokenizer_type: str = "CLIP"
    load_vocab_pkl: bool = False
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.1
    input_dropout: float = 0.5
    n_input_proj: int = 2
    num_recfw_layers: int = 2
    t2v_layers: int = 2
    enc_layers: int = 2
    dec_layers: int = 2
    num_recss_layers: int = 4
    num_queries: int = 10
    share_MLP: bool = True
    rec_fw: bool = True
    rec_ss: bool = True
    aux_loss: bool = True
    use_txt_pos: bool = False
    max_words_l: int = 16
    max_video_l: int = 194
    vocab_size: int = 1111
    normalize_txt: bool = True
    pre_norm: bool = False
    position_embedding: str = "sine"
    span_loss_type: str = "l1"
    t2v_mask: str = "head_major"
    dataset_name: Optional[str] = None

    @property
    def vid_dim(self) -> int:
        return self.v_feat_dim + 2 if self.use_tef else self.v_feat_dim

    @property
    def num_classes(self) -> int:
        """MLM classes (``model.py`` L74-79): CLIP ``vocab_size + 3``, GloVe / glove.pkl ``vocab_size + 1``."""
        return self.vocab_size + (3 if self.tokenizer_type == "CLIP" else 1)

    @property
    def glove_pkl(self) -> bool:
        """CPL's glove.pkl path: 300-d vectors are the input, no text encoder (``runner.py`` L261-263)."""
        return self.tokenizer_type == "GloVeNLTK" and self.load_vocab_pkl

    def check(self, where: str = "MESM options") -> "MESMOptions":
        bad = []
        if self.tokenizer_type not in ("CLIP", "GloVeNLTK", "GloVeSimple"):
            bad.append(("tokenizer_type", "CLIP | GloVeNLTK | GloVeSimple", self.tokenizer_type))
        if self.pre_norm:
            bad.append(("pre_norm", "false (the official T2V layer raises NotImplementedError)", "true"))
        if self.position_embedding not in ("sine", "v2"):
            bad.append(("position_embedding", "sine", self.position_embedding))
        if self.span_loss_type != "l1":
            bad.append(("span_loss_type", "l1 (ce raises NotImplementedError officially)", self.span_loss_type))
        if self.t2v_mask not in T2V_MASKS:
            bad.append(("t2v_mask", " | ".join(T2V_MASKS), self.t2v_mask))
        if self.hidden_dim % self.nheads:
            bad.append(("hidden_dim", f"a multiple of nheads={self.nheads}", str(self.hidden_dim)))
        if not 1 <= self.n_input_proj <= 3:
            bad.append(("n_input_proj", "1, 2 or 3", str(self.n_input_proj)))
        if bad:
            k, e, f = bad[0]
            raise JaxprvrError(f"{where}: {k}", e, f)
        return self

    @classmethod
    def from_config(cls, cfg) -> "MESMOptions":
        if hasattr(cfg, "model") and not isinstance(cfg, Mapping):
            cfg = cfg.model
        names = {f.name for f in dataclasses.fields(cls)}
        got = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names}
        return cls(**got).check(type(cfg).__name__)

    @classmethod
    def from_opt(cls, opt: Mapping[str, Any], **overrides) -> "MESMOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise JaxprvrError("MESMOptions.from_opt", f"fields of {sorted(names)}", str(unknown))
        got = {k: v for k, v in dict(opt).items() if k in names}
        return cls(**{**got, **overrides}).check("opt.json")


def _opts(cfg) -> MESMOptions:
    if isinstance(cfg, MESMOptions):
        return cfg.check()
    if isinstance(cfg, Mapping):
        return MESMOptions.from_opt(cfg)
    return MESMOptions.from_config(cfg)


# ---------------------------------------------------------------------------------------------- small pieces


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``log(x1 / x2)`` with ``x`` clamped to [0, 1], ``x1 = max(x, eps)``, ``x2 = max(1 - x, eps)``
    (``transformer.py`` L36-40, ``utils/data_utils.py`` L139-143)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_position(mask: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0,
                  normalize: bool = True, scale: float = 2 * math.pi) -> torch.Tensor:
    """``PositionEmbeddingSine`` (``position_encoding.py`` L51-72) in float32 whatever the model's dtype:
    ``x = cumsum(mask) / (x[-1] + 1e-6) * 2π``; channel pairs (sin, cos) of ``x / T^(2⌊i/2⌋/n)``. (B, L, n)."""
    x_embed = mask.cumsum(1, dtype=torch.float32)
    if normalize:
        x_embed = x_embed / (x_embed[:, -1:] + 1e-6) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="trunc") / num_pos_feats)
    pos_x = x_embed[:, :, None] / dim_t
    return torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)


class PositionEmbeddingSine(nn.Module):
    """No parameters (``position_encoding.py`` L35-72); ``x`` is only read for its device."""

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()
        if scale is not None and normalize is False:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats, self.temperature, self.normalize = num_pos_feats, temperature, normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x, mask):
        return sine_position(mask, self.num_pos_feats, self.temperature, self.normalize, self.scale)


def gen_sineembed_for_position(pos_tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """DAB's sine embedding of (center, width) (``transformer.py`` L43-59): ``dim/2`` channels each, ``dim_t`` built
    in float32 (then promoted by the division). ``pos_tensor`` (nq, B, 2) -> (nq, B, dim)."""
    scale = 2 * math.pi
    each = dim // 2
    dim_t = torch.arange(each, dtype=torch.float32, device=pos_tensor.device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="trunc") / each)
    out = []
    for c in (0, 1):
        p = (pos_tensor[:, :, c] * scale)[:, :, None] / dim_t
        out.append(torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2))
    return torch.cat(out, dim=2)


class MLP(nn.Module):
    """``num_layers`` Linears with ReLU between (``model.py`` L397-409 = ``transformer.py`` L21-33)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class SeqDropout(HashDropout):
    """A dropout on a sequence-first (L, B, ...) tensor: unarmed it is ``nn.Dropout`` on that tensor (the official
    call, so torch's RNG gives the official mask); armed, the hash counters are those of the batch-first view
    (B, L, ...), the Flax layout."""

    def forward(self, x):
        if self._draws is None or not self.training or self.p == 0.0:
            return nn.Dropout.forward(self, x)
        return super().forward(x.transpose(0, 1)).transpose(0, 1)


# ---------------------------------------------------------------------------------------------- attention


def t2v_head_masks(vid_pad: torch.Tensor, txt_pad: torch.Tensor, nhead: int, mode: str = "head_major"):
    """The T2V layer's extra ``attn_mask`` as the attention reads it, (B, H, Lq, Lk), True = masked.

    Per row ``M_r = vid_pad_r[:, None] & txt_pad_r[None, :]`` (``matmul(qmask.float(), kmask.float()).bool()``,
    ``transformer.py`` L528-530). ``head_major`` (official): ``M.repeat(nhead, 1, 1)`` read batch-major, so row b,
    head h gets ``M[(b * nhead + h) mod B]``; ``per_row``: ``M[b]`` for every head."""
    m = vid_pad[:, :, None] & txt_pad[:, None, :]
    b = m.shape[0]
    if mode == "head_major":
        idx = (torch.arange(b, device=m.device)[:, None] * nhead + torch.arange(nhead, device=m.device)[None]) % b
        return m[idx]
    if mode == "per_row":
        return m[:, None].expand(b, nhead, *m.shape[1:])
    raise JaxprvrError("t2v_mask", " | ".join(T2V_MASKS), repr(mode))


class SeqMHA(nn.MultiheadAttention):
    """``nn.MultiheadAttention(d, nhead, dropout)`` (same construction, initialisation and keys: fused
    ``in_proj_weight``/``in_proj_bias``, ``out_proj``), with its forward written out as torch's
    ``multi_head_attention_forward`` computes it with ``need_weights=True`` (separate q/k/v chunks of ``in_proj``,
    ``q * sqrt(1/head_dim)``, the key-padding and boolean masks as -inf, softmax, dropout of the probabilities,
    ``out_proj``), and the probability dropout as a :class:`HashDropout` child ``dropout`` (no key)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0):
        super().__init__(embed_dim, num_heads, dropout=dropout)
        self.dropout = HashDropout(dropout)

    def forward(self, query, key, value, key_padding_mask=None, head_masks=None):
        """``query`` (Lq, B, E), ``key``/``value`` (Lk, B, E); ``key_padding_mask`` (B, Lk) and ``head_masks``
        (B, H, Lq, Lk), True = not attended. Returns (Lq, B, E)."""
        lq, bsz, e = query.shape
        lk = key.shape[0]
        h = self.num_heads
        hd = e // h
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).reshape(lq, bsz * h, hd).transpose(0, 1)
        k = F.linear(key, w_k, b_k).reshape(lk, bsz * h, hd).transpose(0, 1)
        v = F.linear(value, w_v, b_v).reshape(lk, bsz * h, hd).transpose(0, 1)
        scores = torch.bmm(q * math.sqrt(1.0 / float(hd)), k.transpose(1, 2)).view(bsz, h, lq, lk)
        masked = None
        if key_padding_mask is not None:
            masked = key_padding_mask[:, None, None, :]
        if head_masks is not None:
            masked = head_masks if masked is None else (masked | head_masks)
        if masked is not None:
            scores = scores.masked_fill(masked, float("-inf"))
        probs = self.dropout(torch.softmax(scores, dim=-1))  # (B, H, Lq, Lk) = official (B*H, Lq, Lk)
        out = torch.bmm(probs.reshape(bsz * h, lq, lk), v)
        out = out.transpose(0, 1).reshape(lq * bsz, e)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias).view(lq, bsz, e)


class DecoderMHA(nn.Module):
    """The decoder's ``MultiheadAttention`` (``attention.py`` L61-393): no input projection, q/k of width
    ``embed_dim`` and v of width ``vdim`` split into ``num_heads`` heads, ``q * (embed_dim/num_heads)^-0.5``,
    key padding -inf, ``softmax(w - max(w))``, dropout of the probabilities, ``out_proj`` (``vdim -> vdim``,
    bias initialised to 0). Keys: ``out_proj.*``."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, vdim=None):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.vdim = vdim if vdim is not None else embed_dim
        if embed_dim % num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        self.out_proj = nn.Linear(self.vdim, self.vdim)
        self.dropout = HashDropout(dropout)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query, key, value, key_padding_mask=None):
        lq, bsz, e = query.shape
        h = self.num_heads
        hd, vhd = e // h, self.vdim // h
        q = (query * float(hd) ** -0.5).contiguous().view(lq, bsz * h, hd).transpose(0, 1)
        k = key.contiguous().view(-1, bsz * h, hd).transpose(0, 1)
        v = value.contiguous().view(-1, bsz * h, vhd).transpose(0, 1)
        lk = k.shape[1]
        w = torch.bmm(q, k.transpose(1, 2))
        if key_padding_mask is not None:
            w = w.view(bsz, h, lq, lk).masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            w = w.view(bsz * h, lq, lk)
        w = torch.softmax(w - w.max(dim=-1, keepdim=True)[0], dim=-1)
        w = self.dropout(w.view(bsz, h, lq, lk)).view(bsz * h, lq, lk)
        out = torch.bmm(w, v).transpose(0, 1).contiguous().view(lq, bsz, self.vdim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)


def _clones(module, n):
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _xavier(module: nn.Module):
    """``_reset_parameters`` of T2VEncoder / Transformer (``transformer.py`` L78-81, L168-171)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


# ---------------------------------------------------------------------------------------------- T2V layers


class T2VLayer(nn.Module):
    """``T2V_TransformerEncoderLayer`` (``transformer.py`` L475-540) and, with ``two_mlp``,
    ``T2V_TransformerEncoderLayer_TwoMLP`` (L557-611: a second FFN and norms for the MLM pass).

    Sequence-first. Video tokens (queries, + pos_vid) attend to text tokens (keys + pos_txt, values raw) under the
    text key-padding mask and the T2V ``attn_mask`` (:func:`t2v_head_masks`); then
    ``x = vid + drop1(attn)``, ``out = LN2(x + drop2(linear2(drop(PReLU(linear1(LN1(x)))))))``."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, two_mlp=False):
        super().__init__()
        self.self_attn = SeqMHA(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = SeqDropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = SeqDropout(dropout)
        self.dropout2 = SeqDropout(dropout)
        self.activation = nn.PReLU()
        self.nhead = nhead
        self.two_mlp = two_mlp
        self.t2v_mask = "head_major"
        if two_mlp:
            self.linear1_1 = nn.Linear(d_model, dim_feedforward)
            self.dropout_1 = SeqDropout(dropout)
            self.linear2_1 = nn.Linear(dim_feedforward, d_model)
            self.norm1_1 = nn.LayerNorm(d_model)
            self.norm2_1 = nn.LayerNorm(d_model)
            self.dropout2_1 = SeqDropout(dropout)

    def forward(self, src_txt, src_vid, txt_pad, pos_txt, vid_pad, pos_vid, is_MLM=False, record=None):
        q = src_vid if pos_vid is None else src_vid + pos_vid
        k = src_txt if pos_txt is None else src_txt + pos_txt
        masks = t2v_head_masks(vid_pad, txt_pad, self.nhead, self.t2v_mask)
        src2 = self.self_attn(q, k, src_txt, key_padding_mask=txt_pad, head_masks=masks)
        src2 = src_vid + self.dropout1(src2)
        if is_MLM and self.two_mlp:
            src3 = self.linear2_1(self.dropout_1(self.activation(self.linear1_1(self.norm1_1(src2)))))
            return self.norm2_1(src2 + self.dropout2_1(src3))
        src3 = self.linear2(self.dropout(self.activation(self.linear1(self.norm1(src2)))))
        return self.norm2(src2 + self.dropout2(src3))


class T2VStack(nn.Module):
    """``T2V_TransformerEncoder`` (``transformer.py`` L208-242): ``layers`` (deep copies), no final norm
    (``pre_norm`` false). Sequence-first."""

    def __init__(self, layer, num_layers):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers

    def forward(self, src_txt, src_vid, txt_pad, pos_txt, vid_pad, pos_vid, is_MLM=False, record=None):
        out = src_vid
        for i, layer in enumerate(self.layers):
            out = layer(src_txt, out, txt_pad, pos_txt, vid_pad, pos_vid, is_MLM=is_MLM)
            if record is not None:
                record.append(out)
        return out


class T2VEncoder(nn.Module):
    """``T2VEncoder`` / ``T2VEncoder_TwoMLP`` (``transformer.py`` L62-116): ``t2v_encoder`` = T2VStack, xavier
    re-initialised; the TwoMLP variant first builds (and discards) a plain one, as officially. Batch-first in and
    out (the official permutes)."""

    def __init__(self, d_model, nhead, num_layers, dim_feedforward, dropout, two_mlp=False):
        super().__init__()
        self.t2v_encoder = T2VStack(T2VLayer(d_model, nhead, dim_feedforward, dropout), num_layers)
        _xavier(self)
        if two_mlp:
            self.t2v_encoder = T2VStack(T2VLayer(d_model, nhead, dim_feedforward, dropout, two_mlp=True),
                                        num_layers)
            _xavier(self)
        self.d_model, self.nhead = d_model, nhead

    def forward(self, src_txt, src_vid, txt_pad, pos_txt, vid_pad, pos_vid, is_MLM=False, record=None):
        """``src_txt`` (B, Lt, d) keys/values, ``src_vid`` (B, Lv, d) queries; pads (B, L) True = padding."""
        seq = lambda x: None if x is None else x.permute(1, 0, 2)  # noqa: E731
        rec = [] if record is not None else None
        out = self.t2v_encoder(seq(src_txt), seq(src_vid), txt_pad, seq(pos_txt), vid_pad, seq(pos_vid),
                               is_MLM=is_MLM, record=rec)
        if record is not None:
            record.extend(r.permute(1, 0, 2) for r in rec)
        return out.permute(1, 0, 2)


# ---------------------------------------------------------------------------------------------- DETR transformer


class TransformerEncoderLayer(nn.Module):
    """Post-norm self-attention layer (``transformer.py`` L615-673): q = k = src + pos, v = src."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.self_attn = SeqMHA(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = SeqDropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = SeqDropout(dropout)
        self.dropout2 = SeqDropout(dropout)
        self.activation = nn.PReLU()

    def forward(self, src, src_key_padding_mask=None, pos=None):
        q = src if pos is None else src + pos
        src2 = self.self_attn(q, q, src, key_padding_mask=src_key_padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerEncoder(nn.Module):
    def __init__(self, layer, num_layers):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers

    def forward(self, src, src_key_padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src


class TransformerDecoderLayer(nn.Module):
    """DAB-DETR decoder layer (``transformer.py`` L676-797), post-norm, conditional cross-attention:
    q = [ca_qcontent(tgt) (+ ca_qpos(query_pos) in layer 0) ; ca_qpos_sine(sine)] per head,
    k = [ca_kcontent(mem) (+ ca_kpos(pos) in layer 0) ; ca_kpos(pos)] per head, v = ca_v(mem)."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = DecoderMHA(d_model, nhead, dropout=dropout, vdim=d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.dropout1 = SeqDropout(dropout)
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model)
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = DecoderMHA(d_model * 2, nhead, dropout=dropout, vdim=d_model)
        self.nhead = nhead
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = SeqDropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout2 = SeqDropout(dropout)
        self.dropout3 = SeqDropout(dropout)
        self.activation = nn.PReLU()

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, query_sine_embed, is_first):
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt2 = self.self_attn(q, k, self.sa_v_proj(tgt))
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        nq, bs, d = q_content.shape
        hw = k_content.shape[0]
        k_pos = self.ca_kpos_proj(pos)
        if is_first:
            q = q_content + self.ca_qpos_proj(query_pos)
            k = k_content + k_pos
        else:
            q, k = q_content, k_content
        h = self.nhead
        sine = self.ca_qpos_sine_proj(query_sine_embed).view(nq, bs, h, d // h)
        q = torch.cat([q.view(nq, bs, h, d // h), sine], dim=3).view(nq, bs, d * 2)
        k = torch.cat([k.view(hw, bs, h, d // h), k_pos.view(hw, bs, h, d // h)], dim=3).view(hw, bs, d * 2)
        tgt2 = self.cross_attn(q, k, v, key_padding_mask=memory_key_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class TransformerDecoder(nn.Module):
    """``TransformerDecoder`` (``transformer.py`` L280-420) with the official settings (return_intermediate,
    query_dim 2, cond_elewise ``query_scale``, ``modulate_t_attn``, one shared ``bbox_embed``, keep_query_pos
    false: ``ca_qpos_proj`` removed from layers >= 1)."""

    def __init__(self, layer, num_layers, norm, d_model):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.query_dim = 2
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, d_model, 2)
        self.bbox_embed = MLP(d_model, d_model, 2, 3)
        nn.init.constant_(self.bbox_embed.layers[-1].weight.data, 0)  # overwritten by Transformer's xavier
        nn.init.constant_(self.bbox_embed.layers[-1].bias.data, 0)
        self.d_model = d_model
        self.ref_anchor_head = MLP(d_model, d_model, 1, 2)
        for i in range(1, num_layers):
            self.layers[i].ca_qpos_proj = None

    def forward(self, tgt, memory, memory_key_padding_mask, pos, refpoints_unsigmoid, record=None):
        output = tgt
        intermediate = []
        reference_points = refpoints_unsigmoid.sigmoid()
        ref_points = [reference_points]
        for layer_id, layer in enumerate(self.layers):
            obj_center = reference_points[..., :self.query_dim]
            query_sine_embed = gen_sineembed_for_position(obj_center, self.d_model)
            query_pos = self.ref_point_head(query_sine_embed)
            pos_transformation = 1 if layer_id == 0 else self.query_scale(output)
            query_sine_embed = query_sine_embed * pos_transformation
            reft_cond = self.ref_anchor_head(output).sigmoid()
            query_sine_embed = query_sine_embed * (reft_cond[..., 0] / obj_center[..., 1]).unsqueeze(-1)
            output = layer(output, memory, memory_key_padding_mask, pos, query_pos, query_sine_embed,
                           is_first=(layer_id == 0))
            tmp = self.bbox_embed(output)
            new_reference_points = (tmp[..., :self.query_dim] + inverse_sigmoid(reference_points)).sigmoid()
            if layer_id != self.num_layers - 1:
                ref_points.append(new_reference_points)
            if record is not None:
                record.setdefault("dec_reference_in", []).append(reference_points.transpose(0, 1))
                record.setdefault("dec_query_sine_embed", []).append(query_sine_embed.transpose(0, 1))
                record.setdefault("dec_query_pos", []).append(query_pos.transpose(0, 1))
                record.setdefault("dec_output", []).append(output.transpose(0, 1))
                record.setdefault("dec_new_reference", []).append(new_reference_points.transpose(0, 1))
            reference_points = new_reference_points.detach()
            intermediate.append(self.norm(output))
        return torch.stack(intermediate).transpose(1, 2), torch.stack(ref_points).transpose(1, 2)


class Transformer(nn.Module):
    """``Transformer`` (``transformer.py`` L119-205): the global token (key-masked) prepended, the post-norm
    encoder, the DAB decoder on the video tokens; xavier over every >1-D parameter."""

    def __init__(self, d_model, nhead, num_queries, num_encoder_layers, num_decoder_layers, dim_feedforward,
                 dropout):
        super().__init__()
        self.encoder = TransformerEncoder(TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout),
                                          num_encoder_layers)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model), d_model)
        _xavier(self)
        self.d_model, self.nhead, self.dec_layers, self.num_queries = d_model, nhead, num_decoder_layers, num_queries
        self.dim_feedforward, self.dropout = dim_feedforward, dropout

    def forward(self, src, mask, query_embed, pos_embed, global_token, global_token_pos, record=None):
        """``src`` (B, L, d), ``mask`` (B, L) True = padding, ``query_embed`` (nq, 2), ``pos_embed`` (B, L, d).
        Returns hs (layers, B, nq, d), references (layers, B, nq, 2), memory (B, L, d), memory_global (B, d)."""
        gmask = torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device)
        mask = torch.cat([gmask, mask], dim=1)
        src = torch.cat([global_token, src], dim=1)
        pos_embed = torch.cat([global_token_pos, pos_embed], dim=1)
        bs, _, d = src.shape
        src, pos_embed = src.permute(1, 0, 2), pos_embed.permute(1, 0, 2)
        refpoint_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        memory_global, memory_local = memory[0], memory[1:]
        tgt = torch.zeros(refpoint_embed.shape[0], bs, d, dtype=memory.dtype, device=memory.device)
        hs, references = self.decoder(tgt, memory_local, mask[:, 1:], pos_embed[1:], refpoint_embed, record=record)
        if record is not None:
            record["encoder_memory"] = memory.transpose(0, 1)
        return hs, references, memory_local.transpose(0, 1), memory_global


# ---------------------------------------------------------------------------------------------- SS-MESM


class SegSenRecon(nn.Module):
    """SS-MESM (``model.py`` L437-503): the row's own sentence slot of its item's sentence sequence replaced by
    ``masked_sent_token``; ``num_layers`` T2V layers (deep copies of one, torch default init) where the sentences
    attend to the projected video without positions; the slot's output L2-normalised (``recon_feat``);
    ``output_sent_proj`` of it (``projed_recon_feat``, unused by the losses)."""

    def __init__(self, input_dropout, hidden_dim, nhead, num_layers, dim_feedforward, dropout):
        super().__init__()
        self.masked_sent_token = nn.Parameter(torch.zeros(hidden_dim).float(), requires_grad=True)
        self.recon_trans = T2VStack(T2VLayer(hidden_dim, nhead, dim_feedforward, dropout), num_layers)
        self.output_sent_proj = nn.Sequential(
            LinearLayer(hidden_dim, hidden_dim, layer_norm=True, dropout=input_dropout, relu=True),
            LinearLayer(hidden_dim, hidden_dim, layer_norm=True, dropout=input_dropout, relu=False))

    @staticmethod
    def sent_slots(num_clips: torch.Tensor, width: int) -> torch.Tensor:
        """(R, width) bool: row ``i`` of an item is True at column ``i`` (``_sequence_mask_sent``, L490-503)."""
        rows = []
        for n in num_clips.tolist():
            m = torch.zeros(n, width, dtype=torch.bool, device=num_clips.device)
            m[torch.arange(n), torch.arange(n)] = True
            rows.append(m)
        return torch.cat(rows)

    def forward(self, batched_vid, batched_vid_mask, batched_sent, batched_sent_mask, num_clips, record=None):
        loc = self.sent_slots(num_clips, batched_sent.shape[1])
        token = self.masked_sent_token.unsqueeze(0).unsqueeze(0)
        vec = (batched_sent.new_zeros(*batched_sent.size()) + token).masked_fill(~loc.unsqueeze(-1), 0)
        masked = batched_sent.masked_fill(loc.unsqueeze(-1), 0) + vec
        out = self.recon_trans(batched_vid.permute(1, 0, 2), masked.permute(1, 0, 2), ~batched_vid_mask, None,
                               ~batched_sent_mask, None).permute(1, 0, 2)
        recon_feat = F.normalize(out[loc])
        proj = self.output_sent_proj(recon_feat)
        if record is not None:
            record.update(ss_masked_sent=masked, ss_sent_loc=loc, ss_recon_tokens=out)
        return recon_feat, proj


# ---------------------------------------------------------------------------------------------- text encoders


class CLIPTextEncoder(nn.Module):
    """MESM's frozen CLIP text tower (``text_encoder.py`` L260-354; OpenAI keys ``token_embedding``,
    ``positional_embedding``, ``transformer.resblocks.i``, ``ln_final``, ``text_projection``): fp16 with
    ``convert_weights`` (LayerNorms in fp32) and a causal mask; returns ``last_hidden_state`` after ``ln_final``
    (before ``text_projection``). Built from :mod:`torch_ref.clip`'s blocks. Never registered in the twin (its
    keys are not in MESM checkpoints)."""

    def __init__(self, embed_dim, context_length, vocab_size, transformer_width, transformer_heads,
                 transformer_layers, fp16=True):
        super().__init__()
        from torch_ref.clip import LayerNorm, Transformer

        self.context_length = context_length
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       attn_mask=self.build_attention_mask)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.initialize_parameters()
        self.fp16 = fp16
        if fp16:
            from torch_ref.clip import convert_weights

            convert_weights(self)
        for p in self.parameters():
            p.requires_grad_(False)

    def initialize_parameters(self):
        from torch_ref.clip import initialize_text_parameters

        initialize_text_parameters(self)

    @staticmethod
    def build_attention_mask(n):
        return torch.full((n, n), float("-inf")).triu_(1)

    @property
    def dtype(self):
        return torch.float16 if self.fp16 else self.token_embedding.weight.dtype

    @torch.no_grad()
    def forward(self, text):
        x = self.token_embedding(text).type(self.dtype)
        x = x + self.positional_embedding[:x.shape[1]].type(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return {"last_hidden_state": self.ln_final(x).type(self.dtype)}


def build_clip_text_encoder(state_dict, fp16: bool = True) -> CLIPTextEncoder:
    """``runner.py`` L167-187: sizes from the weights, ``convert_weights`` before a strict load. Accepts MESM's
    ``clip_text_encoder.pth`` or a whole OpenAI CLIP state dict (``visual.*`` and ``logit_scale`` dropped)."""
    sd = {k: v for k, v in state_dict.items()
          if not k.startswith("visual.") and k not in ("logit_scale", "input_resolution", "context_length",
                                                       "vocab_size")}
    width = sd["ln_final.weight"].shape[0]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")})
    enc = CLIPTextEncoder(sd["text_projection"].shape[1], sd["positional_embedding"].shape[0],
                          sd["token_embedding.weight"].shape[0], width, width // 64, layers, fp16=fp16)
    own = enc.state_dict()
    enc.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}, strict=True)
    return enc.eval()


class GloveTextEncoder(nn.Module):
    """``GloveTextEncoder`` (``text_encoder.py`` L430-453): a frozen ``emb`` table (vocabulary id -> 300-d GloVe
    vector; the official ``<UNK>`` row is a fresh ``randn`` per build, give your seeded one)."""

    def __init__(self, vectors):
        super().__init__()
        vectors = (vectors.detach().clone() if torch.is_tensor(vectors)
                   else torch.as_tensor(np.asarray(vectors), dtype=torch.float32))
        self.emb = nn.Embedding(vectors.shape[0], vectors.shape[1])  # draws its N(0, 1) init as officially
        self.emb.weight.data = vectors
        self.emb.weight.requires_grad_(False)

    def forward(self, word_ids):
        return self.emb(word_ids)


# ---------------------------------------------------------------------------------------------- sampling


def sample_outclass_neg(num_clips: torch.Tensor) -> torch.Tensor:
    """``utils/data_utils.py`` L113-124: for every row, a row of another item, ``candidates[randperm(n)[0]]``
    (torch's CPU generator; one ``randperm`` per row, in row order)."""
    ends = num_clips.cumsum(dim=0)
    starts = torch.cat([torch.zeros([1], dtype=num_clips.dtype, device=num_clips.device), ends[:-1]])
    total = int(ends[-1])
    if len(num_clips) < 2:
        raise JaxprvrError("sample_outclass_neg", "a batch with at least 2 items (videos) for the negative branch",
                           f"{len(num_clips)} item(s)", "the official code fails here too")
    out = []
    for num, start, end in zip(num_clips.tolist(), starts.tolist(), ends.tolist()):
        for _ in range(num):
            keep = torch.ones([total], dtype=torch.bool, device=num_clips.device)
            keep[start:end] = False
            cand = torch.where(keep)[0]
            out.append(cand[torch.randperm(cand.shape[0])][0])
    return torch.stack(out)


def official_mask_words(words_mask: torch.Tensor, words_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The positions ``MESM._mask_words`` masks (``model.py`` L366-378): per row with ``l`` valid words (taken as
    the first ``l`` positions), none if ``l <= 1``, else ``max(l // 3, 1)`` positions drawn by
    ``np.random.choice(l, n, replace=False, p=w[:l])`` with ``w`` the row's L1-normalised float32 weight
    (numpy's global RNG, one call per row)."""
    lengths = words_mask.count_nonzero(dim=1)
    masked = torch.zeros_like(words_mask, dtype=torch.bool)
    weight = F.normalize(words_weight.float().cpu(), dim=1, p=1) if words_weight is not None else None
    for i, l in enumerate(lengths.tolist()):
        if l <= 1:
            continue
        p = weight[i, :l].numpy() if weight is not None else None
        choices = np.random.choice(np.arange(0, l), max(l // 3, 1), replace=False, p=p)
        masked[i, torch.as_tensor(choices)] = True
    return masked


# ---------------------------------------------------------------------------------------------- batches


def _t(x, dtype=None, device=None):
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=dtype if dtype is not None else t.dtype)


def _rows_of(value, span_mask=None) -> list:
    """QVH windows: the official list of dicts / a list of (n, 2) arrays / padded (R, W, 2) with span_mask."""
    if isinstance(value, (list, tuple)):
        return [v["moments"] if isinstance(v, Mapping) and "moments" in v else
                v["spans"] if isinstance(v, Mapping) else v for v in value]
    arr = value
    if span_mask is None:
        return list(arr)
    sm = np.asarray(span_mask.cpu() if torch.is_tensor(span_mask) else span_mask).astype(bool)
    return [arr[i][torch.as_tensor(sm[i])] if torch.is_tensor(arr) else np.asarray(arr[i])[sm[i]]
            for i in range(len(sm))]


def prepare_batch(batch: Mapping, *, dtype=torch.float32, device=None, multi_clip: Optional[bool] = None) -> dict:
    """The official collate dict (``dataset/base.py`` L288-380, ``dataset/qvhighlights.py`` L214-284) as torch
    tensors: floats in ``dtype``, masks bool, ids long; trailing zero ``num_clips`` (a padded item axis) dropped;
    ``norm_moment``/``norm_span`` computed from ``moment``/``duration`` when absent (``prepare_batch_input``
    L372-380); single-moment ``(R, 1, 2)`` squeezed to ``(R, 2)``; QVH windows (``multi_clip``) as the official
    lists ``[{"moments": (n, 2)}]`` / ``[{"spans": (n, 2)}]``. Other keys pass through."""
    out = dict(batch)
    floats = ("video_feat", "saliency_label", "duration", "moment")
    for k in floats:
        if out.get(k) is not None and not isinstance(out[k], (list, tuple)):
            out[k] = _t(out[k], dtype, device)
    for k in ("video_mask", "words_mask", "unknown_mask", "clip_mask"):
        if out.get(k) is not None:
            out[k] = _t(out[k], torch.bool, device)
    for k in ("words_label", "pos_idx", "neg_idx", "start_idx", "end_idx"):
        if out.get(k) is not None:
            out[k] = _t(out[k], torch.long, device)
    if out.get("words_id") is not None:
        w = _t(out["words_id"], device=device)
        out["words_id"] = w.to(dtype) if w.ndim == 3 else w.long()
    if out.get("words_feat") is not None:
        out["words_feat"] = _t(out["words_feat"], dtype, device)
    if out.get("words_weight") is not None:
        out["words_weight"] = _t(out["words_weight"])  # official: left on the CPU, cast .float() where used
    if out.get("num_clips") is not None:
        nc = _t(out["num_clips"], torch.long, device)
        n = len(nc)
        while n > 0 and int(nc[n - 1]) == 0:
            n -= 1
        if (nc[:n] <= 0).any():
            raise JaxprvrError("batch num_clips", "positive row counts (zeros only as trailing padding)",
                               str(nc.tolist()))
        out["num_clips"] = nc[:n]
    if multi_clip is None:
        mom = out.get("norm_moment")
        multi_clip = isinstance(mom, (list, tuple)) or (mom is not None and np.ndim(mom) == 3
                                                       and np.shape(mom)[1] > 1)
    if "norm_span" not in out and out.get("moment") is not None and out.get("duration") is not None:
        nm = out["moment"] / out["duration"].unsqueeze(1)
        out["norm_moment"] = nm
        out["norm_span"] = torch.stack([nm.sum(-1) * 0.5, nm[..., 1] - nm[..., 0]], dim=-1)
    sm = out.get("span_mask")
    for k, inner in (("norm_moment", "moments"), ("norm_span", "spans")):
        if out.get(k) is None:
            continue
        if multi_clip:
            out[k] = [{inner: _t(r, dtype, device)} for r in _rows_of(out[k], sm)]
        else:
            v = _t(out[k], dtype, device)
            out[k] = v[:, 0] if v.ndim == 3 else v
    return out


# ---------------------------------------------------------------------------------------------- MESM


def _split_expand_pad(split_num, expand_num, x):
    """``split_expand_and_pad`` (``utils/data_utils.py`` L97-110): split ``x`` by ``split_num``, repeat part i
    ``expand_num[i]`` times, zero-pad to the longest: (sum expand, Lmax, ...), mask."""
    parts = []
    for num, part in zip(expand_num.tolist(), torch.split(x, split_num.tolist(), dim=0)):
        parts += [part] * num
    return _pad(parts, x)


def _split_pad(split_num, x):
    """``split_and_pad`` (L85-94)."""
    return _pad(list(torch.split(x, split_num.tolist(), dim=0)), x)


def _pad(parts, like):
    n = max(len(p) for p in parts)
    out = like.new_zeros((len(parts), n) + tuple(like.shape[1:]))
    mask = torch.zeros(len(parts), n, dtype=torch.bool, device=like.device)
    for i, p in enumerate(parts):
        out[i, :len(p)] = p
        mask[i, :len(p)] = True
    return out, mask


class AuxDict(dict):
    """The last forward's named intermediates; copies and pickles of a model start empty (the tensors are graph
    nodes, which ``copy.deepcopy`` refuses)."""

    def __deepcopy__(self, memo):
        return AuxDict()

    def __reduce__(self):
        return (AuxDict, ())


class MESM(nn.Module):
    """``MESM`` (``model.py`` L16-394). See the module docstring; build with :func:`build_mesm` or
    :meth:`from_opt`. ``text_encoder`` (a :class:`CLIPTextEncoder` / :class:`GloveTextEncoder`, optional) is
    kept outside the module tree."""

    def __init__(self, cfg, text_encoder: Optional[nn.Module] = None):
        """``cfg``: a :class:`jaxprvr.config.MESMConfig` (``torch_ref.build_model``), a full Config, an
        ``opt.json`` dict or :class:`MESMOptions`."""
        super().__init__()
        o = _opts(cfg)
        self.opts = o
        d = o.hidden_dim
        # build_model order (runner.py L253-298): enhancer, aligner, transformer, position encodings, MESM
        self.enhance_encoder = T2VEncoder(d, o.nheads, o.num_recfw_layers, o.dim_feedforward, o.dropout,
                                          two_mlp=not o.share_MLP)
        self.t2v_encoder = T2VEncoder(d, o.nheads, o.t2v_layers, o.dim_feedforward, o.dropout)
        self.transformer = Transformer(d, o.nheads, o.num_queries, o.enc_layers, o.dec_layers, o.dim_feedforward,
                                       o.dropout)
        self.vid_position_embed = PositionEmbeddingSine(d, normalize=True)
        self.txt_position_embed = TrainablePositionalEncoding(o.max_words_l + 1 if o.rec_ss else o.max_words_l,
                                                              d, dropout=o.input_dropout)
        self.num_queries = o.num_queries
        self.max_words_l, self.max_video_l = o.max_words_l, o.max_video_l
        self.span_embed = MLP(d, d, 2, 3)
        self.class_embed = nn.Linear(d, 2)  # index 0 = foreground (criterion.py L42-46)
        self.query_embed = nn.Embedding(o.num_queries, 2)
        relu = [True] * 3
        relu[o.n_input_proj - 1] = False
        self.input_txt_proj = nn.Sequential(*[
            LinearLayer(o.t_feat_dim, d, dropout=o.input_dropout, relu=relu[0]),
            LinearLayer(d, d, dropout=o.input_dropout, relu=relu[1]),
            LinearLayer(d, d, dropout=o.input_dropout, relu=relu[2])][:o.n_input_proj])
        self.input_vid_proj = nn.Sequential(*[
            LinearLayer(o.vid_dim, d, dropout=o.input_dropout, relu=relu[0]),
            LinearLayer(d, d, dropout=o.input_dropout, relu=relu[1]),
            LinearLayer(d, d, dropout=o.input_dropout, relu=relu[2])][:o.n_input_proj])
        self.saliency_proj1 = nn.Linear(d, d)
        self.saliency_proj2 = nn.Linear(d, d)
        self.hidden_dim = d
        self.global_rep_token = nn.Parameter(torch.randn(d))
        self.global_rep_pos = nn.Parameter(torch.randn(d))
        if o.rec_fw:
            self.masked_token = nn.Parameter(torch.zeros(o.t_feat_dim).float(), requires_grad=True)
            self.unknown_token = nn.Parameter(torch.zeros(o.t_feat_dim).float(), requires_grad=True)
            self.output_txt_proj = nn.Sequential(
                LinearLayer(d, d, layer_norm=True, dropout=o.input_dropout, relu=True),
                nn.Linear(d, o.num_classes))
        if o.rec_ss:
            self.ss_reconstructor = SegSenRecon(o.input_dropout, d, o.nheads, o.num_recss_layers, o.dim_feedforward,
                                                o.dropout)
        self.set_t2v_mask(o.t2v_mask)
        object.__setattr__(self, "text_encoder", text_encoder)  # not registered: no text_encoder.* keys
        self.aux = AuxDict()

    # -- construction helpers

    @classmethod
    def from_opt(cls, opt: Mapping[str, Any], *, text_encoder=None, **overrides) -> "MESM":
        """From an official ``opt.json`` dict (``v_feat_dim`` before TEF, as saved by ``utils/config.py``)."""
        return cls(MESMOptions.from_opt(opt, **overrides), text_encoder=text_encoder)

    def set_t2v_mask(self, mode: str):
        """``head_major`` (official) or ``per_row`` for every T2V layer (enhancer, aligner, SS-MESM)."""
        if mode not in T2V_MASKS:
            raise JaxprvrError("t2v_mask", " | ".join(T2V_MASKS), repr(mode))
        for m in self.modules():
            if isinstance(m, T2VLayer):
                m.t2v_mask = mode
        self.opts = dataclasses.replace(self.opts, t2v_mask=mode)

    @property
    def dtype(self):
        return self.global_rep_token.dtype

    # -- text

    def _text(self, batch, words_feat):
        """Word / sentence features and the words mask (``model.py`` L103-163)."""
        o = self.opts
        words_id, words_mask = batch.get("words_id"), batch.get("words_mask")
        if words_feat is None:
            words_feat = batch.get("words_feat")
        if words_feat is None and words_id is not None and torch.is_tensor(words_id) and words_id.ndim == 3:
            words_feat = words_id  # the official glove.pkl collate puts the vectors in words_id
        if o.glove_pkl:  # post_process_text (L145-152): normalise first, mask = sum != 0, mean of normalised
            if words_feat is None:
                raise JaxprvrError("MESM batch", "words_feat (R, Lw, 300) or 3-D words_id (glove.pkl path)",
                                   "neither")
            wf = words_feat.to(self.dtype)
            if o.normalize_txt:
                wf = F.normalize(wf, dim=-1, p=2, eps=1e-5)
            words_mask = wf.sum(dim=-1) != 0
            sent = wf.sum(dim=1) / words_mask.sum(dim=1).unsqueeze(-1)
            if o.normalize_txt:
                sent = F.normalize(sent, dim=-1, p=2, eps=1e-5)
            return wf, sent, words_mask
        if words_mask is None:
            raise JaxprvrError("MESM batch", "words_mask (R, Lw) bool", "None")
        if words_feat is None:
            if self.text_encoder is None:
                raise JaxprvrError("MESM forward", "words_feat (the text encoder's output) or an attached "
                                   "text_encoder", "neither")
            out = self.text_encoder(words_id)
            words_feat = out["last_hidden_state"] if isinstance(out, Mapping) else out
            if o.tokenizer_type == "CLIP":
                words_feat = words_feat.to(torch.float32)  # model.py L108 (the GloVe table is used as is)
        wf = words_feat.to(self.dtype)
        if o.tokenizer_type == "CLIP":  # CLIP_encode_text (L115-117): truncate to max_words_l
            wf, words_mask = wf[:, :o.max_words_l], words_mask[:, :o.max_words_l]
        if wf.shape[:2] != words_mask.shape:
            raise JaxprvrError("MESM words_feat", f"shape (R, Lw, D) with (R, Lw) = words_mask's "
                               f"{tuple(words_mask.shape)}", str(tuple(wf.shape)))
        wf = wf.masked_fill(~words_mask.unsqueeze(-1), 0)
        sent = wf.sum(dim=1) / words_mask.sum(dim=1).unsqueeze(-1)
        if o.normalize_txt:
            wf = F.normalize(wf, dim=-1, p=2, eps=1e-5)
            sent = F.normalize(sent, dim=-1, p=2, eps=1e-5)
        return wf, sent, words_mask

    def _proj_token(self, token):
        return self.input_txt_proj(token.unsqueeze(0).unsqueeze(0))

    # -- forward

    def forward(self, batch: Mapping, *, words_feat: Optional[torch.Tensor] = None, dataset_name: Optional[str] = None,
                is_training: Optional[bool] = None, neg_index: Optional[torch.Tensor] = None,
                masked_words: Optional[torch.Tensor] = None, return_aux: bool = False):
        """The official ``MESM.forward(**batch, dataset_name, is_training)`` (``model.py`` L154-359).

        ``batch``: the official collate dict (tensors or arrays; :func:`prepare_batch` is applied). ``words_feat``
        (R, Lw, t_feat_dim): the text encoder's raw output (CLIP ``last_hidden_state``, GloVe vectors; truncated
        to max_words_l here for CLIP). ``neg_index`` (R,) / ``masked_words`` (R, Lw) bool replace the official
        samplers (:func:`sample_outclass_neg`, :func:`official_mask_words`). Returns the official ``out`` dict
        (and :attr:`aux`, the named intermediates, with ``return_aux``)."""
        o = self.opts
        dataset_name = dataset_name or o.dataset_name
        if dataset_name not in SINGLE_MOMENT + MULTI_MOMENT:
            raise JaxprvrError("MESM forward dataset_name", " | ".join(SINGLE_MOMENT + MULTI_MOMENT),
                               repr(dataset_name))
        if is_training is None:
            is_training = self.training
        dev = self.global_rep_token.device
        batch = prepare_batch(batch, dtype=self.dtype, device=dev, multi_clip=dataset_name in MULTI_MOMENT)
        if words_feat is not None:
            words_feat = _t(words_feat, self.dtype, dev)
        aux: dict = {}
        video_feat, video_mask, num_clips = batch["video_feat"], batch["video_mask"], batch["num_clips"]
        if int(num_clips.sum()) != video_feat.shape[0]:
            raise JaxprvrError("MESM batch num_clips", f"row counts summing to the {video_feat.shape[0]} rows",
                               str(num_clips.tolist()))

        words_feat, sentence_feat, words_mask = self._text(batch, words_feat)
        aux.update(words_feat=words_feat, sentence_feat=sentence_feat, words_mask=words_mask)
        bsz = video_feat.shape[0]
        projed_video_feat = self.input_vid_proj(video_feat)
        projed_words_feat = self.input_txt_proj(words_feat)
        vid_position = self.vid_position_embed(projed_video_feat, video_mask)
        txt_position = (self.txt_position_embed(projed_words_feat) if o.use_txt_pos
                        else torch.zeros_like(projed_words_feat))
        aux.update(projed_video_feat=projed_video_feat, projed_words_feat=projed_words_feat,
                   vid_position=vid_position, txt_position=txt_position)

        if o.rec_fw:
            rec = []
            enhanced_video_feat = self.enhance_encoder(projed_words_feat, projed_video_feat, ~words_mask,
                                                       txt_position, ~video_mask, vid_position, record=rec)
            aux["enhance_layers"] = rec
        else:
            enhanced_video_feat = projed_video_feat
        aux["enhanced_video_feat"] = enhanced_video_feat

        if o.rec_ss:
            if dataset_name in SINGLE_MOMENT:
                batched_vid, batched_vid_mask = video_feat, video_mask
            else:  # QVH: every row gets the concatenated valid frames of all rows of its group (L190-195)
                lengths = torch.stack([m.sum() for m in torch.split(video_mask, num_clips.tolist())]).long()
                batched_vid, batched_vid_mask = _split_expand_pad(lengths, num_clips, video_feat[video_mask])
            batched_sent, batched_sent_mask = _split_expand_pad(num_clips, num_clips, sentence_feat)
            aux.update(ss_batched_vid=batched_vid, ss_batched_vid_mask=batched_vid_mask, ss_batched_sent=batched_sent,
                       ss_batched_sent_mask=batched_sent_mask)
            batched_vid = self.input_vid_proj(batched_vid)
            batched_sent = self.input_txt_proj(batched_sent)
            aux.update(ss_projed_vid=batched_vid, ss_projed_sent=batched_sent)
            recon_feat, projed_recon_feat = self.ss_reconstructor(batched_vid, batched_vid_mask, batched_sent,
                                                                  batched_sent_mask, num_clips, record=aux)
            expanded_words_feat = torch.cat([recon_feat.unsqueeze(1), projed_words_feat], dim=1)
            recon_mask = torch.ones([bsz, 1], dtype=torch.bool, device=recon_feat.device)
            expanded_words_mask = torch.cat([recon_mask, words_mask], dim=1)
            aux.update(recon_feat=recon_feat, projed_recon_feat=projed_recon_feat)
        else:
            expanded_words_feat, expanded_words_mask = projed_words_feat, words_mask
        expanded_txt_position = (self.txt_position_embed(expanded_words_feat) if o.use_txt_pos
                                 else torch.zeros_like(expanded_words_feat))
        aux.update(expanded_words_feat=expanded_words_feat, expanded_words_mask=expanded_words_mask,
                   expanded_txt_position=expanded_txt_position)

        rec = []
        encoded_video_feat = self.t2v_encoder(expanded_words_feat, enhanced_video_feat, ~expanded_words_mask,
                                              expanded_txt_position, ~video_mask, vid_position, record=rec)
        aux.update(aligner_layers=rec, encoded_video_feat=encoded_video_feat)

        d = self.hidden_dim
        global_token = self.global_rep_token.reshape([1, 1, d]).repeat(bsz, 1, 1)
        global_token_pos = self.global_rep_pos.reshape([1, 1, d]).repeat(bsz, 1, 1)
        hs, reference, memory, memory_global = self.transformer(
            encoded_video_feat, ~video_mask, self.query_embed.weight, vid_position, global_token, global_token_pos,
            record=aux)
        outputs_class = self.class_embed(hs)
        outputs_coord = (self.span_embed(hs) + inverse_sigmoid(reference)).sigmoid()
        aux.update(hs=hs, references=reference, memory=memory, memory_global=memory_global,
                   outputs_class=outputs_class, outputs_coord=outputs_coord)

        # the negative branch (L260-302)
        if neg_index is None:
            neg_index = sample_outclass_neg(num_clips)
        else:
            neg_index = _t(neg_index, torch.long, dev).reshape(-1)
            if neg_index.shape[0] != bsz or bool((neg_index < 0).any()) or bool((neg_index >= bsz).any()):
                raise JaxprvrError("MESM neg_index", f"({bsz},) row indices in [0, {bsz})",
                                   str(neg_index.tolist()))
        aux["neg_index"] = neg_index
        neg_expanded_words_feat = expanded_words_feat[neg_index]
        neg_expanded_words_mask = expanded_words_mask[neg_index]
        neg_expanded_txt_position = expanded_txt_position[neg_index]
        if o.rec_ss:
            neg_words_feat = neg_expanded_words_feat[:, 1:, :]
            neg_words_mask = neg_expanded_words_mask[:, 1:]
            neg_txt_position = neg_expanded_txt_position[:, 1:, :]
        else:
            neg_words_feat, neg_words_mask, neg_txt_position = (neg_expanded_words_feat, neg_expanded_words_mask,
                                                                neg_expanded_txt_position)
        neg_vid_position = vid_position.clone()
        if o.rec_fw:
            neg_enhanced_video_feat = self.enhance_encoder(neg_words_feat, projed_video_feat, ~neg_words_mask,
                                                           neg_txt_position, ~video_mask, neg_vid_position)
        else:
            neg_enhanced_video_feat = projed_video_feat
        neg_encoded_video_feat = self.t2v_encoder(neg_expanded_words_feat, neg_enhanced_video_feat,
                                                  ~neg_expanded_words_mask, neg_expanded_txt_position, ~video_mask,
                                                  neg_vid_position)
        _, _, neg_memory, neg_memory_global = self.transformer(
            neg_encoded_video_feat, ~video_mask, self.query_embed.weight, neg_vid_position, global_token,
            global_token_pos)
        aux.update(neg_enhanced_video_feat=neg_enhanced_video_feat, neg_encoded_video_feat=neg_encoded_video_feat,
                   neg_memory=neg_memory, neg_memory_global=neg_memory_global)

        saliency_scores = torch.sum(self.saliency_proj1(memory) * self.saliency_proj2(memory_global).unsqueeze(1),
                                    dim=-1) / np.sqrt(d)
        neg_saliency_scores = torch.sum(
            self.saliency_proj1(neg_memory) * self.saliency_proj2(neg_memory_global).unsqueeze(1), dim=-1) / np.sqrt(d)

        if o.rec_fw and is_training:  # FW-MESM's MLM pass (L307-332)
            unknown_mask = batch["unknown_mask"]
            unk = self._proj_token(self.unknown_token)
            vec = (projed_words_feat.new_zeros(*projed_words_feat.size()) + unk).masked_fill(
                ~unknown_mask.unsqueeze(-1), 0)
            unknowned_words_feat = projed_words_feat.masked_fill(unknown_mask.unsqueeze(-1), 0) + vec
            clip_mask = batch["clip_mask"]
            selected_length = clip_mask.sum(dim=1)
            merged_clip_feat, merged_clip_mask = _split_pad(selected_length, projed_video_feat[clip_mask])
            msk = self._proj_token(self.masked_token)
            if masked_words is None:
                masked_words = official_mask_words(words_mask, batch.get("words_weight"))
            else:
                masked_words = _t(masked_words, torch.bool, dev)
                if masked_words.shape != words_mask.shape:
                    raise JaxprvrError("MESM masked_words", f"a bool mask of shape {tuple(words_mask.shape)}",
                                       str(tuple(masked_words.shape)))
            masked_words = masked_words.to(dev)
            vec = (unknowned_words_feat.new_zeros(*unknowned_words_feat.size()) + msk).masked_fill(
                ~masked_words.unsqueeze(-1), 0)
            masked_words_feat = unknowned_words_feat.masked_fill(masked_words.unsqueeze(-1), 0) + vec
            merged_clip_position, _ = _split_pad(selected_length, vid_position[clip_mask])
            recfw_out = self.enhance_encoder(merged_clip_feat, masked_words_feat, ~merged_clip_mask,
                                             merged_clip_position, ~words_mask, txt_position, is_MLM=True)
            recfw_words_logit = self.output_txt_proj(recfw_out)
            aux.update(unknown_token_proj=unk, masked_token_proj=msk, unknowned_words_feat=unknowned_words_feat,
                       merged_clip_feat=merged_clip_feat, merged_clip_mask=merged_clip_mask,
                       merged_clip_position=merged_clip_position, masked_words=masked_words,
                       masked_words_feat=masked_words_feat, recfw_out=recfw_out)

        out = {"pred_logits": outputs_class[-1], "pred_spans": outputs_coord[-1], "saliency_scores": saliency_scores,
               "neg_saliency_scores": neg_saliency_scores}
        if o.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_spans": b}
                                  for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
        if o.rec_ss:
            out.update(projed_video_feat=projed_video_feat, recon_feat=recon_feat, projed_recon_feat=projed_recon_feat,
                       expanded_words_feat=expanded_words_feat, expanded_words_mask=expanded_words_mask,
                       enhanced_video_feat=enhanced_video_feat, projed_words_feat=projed_words_feat)
        if o.rec_fw and is_training:
            out.update(words_mask=words_mask, recfw_words_logit=recfw_words_logit)
        self.aux = AuxDict(aux)
        return (out, self.aux) if return_aux else out


def build_mesm(cfg_model, cfg_loss=None, *, text_encoder: Optional[nn.Module] = None) -> MESM:
    """The twin from a :class:`jaxprvr.config.MESMConfig` (or a full Config, an ``opt.json`` dict, or
    :class:`MESMOptions`), built in the official order (``runner.py`` L253-298). ``cfg_loss``
    (:class:`~jaxprvr.config.MESMLossConfig`) is kept as ``model.loss_cfg`` for
    :func:`torch_ref.mesm_loss.build_criterion`."""
    if cfg_loss is None and hasattr(cfg_model, "model") and hasattr(cfg_model, "loss"):
        cfg_loss = cfg_model.loss
    model = MESM(_opts(cfg_model), text_encoder=text_encoder)
    model.loss_cfg = cfg_loss
    return model


STATE_DICT_COUNTS = {"charades C+SF_C": 273, "charades-cg C+SF_C": 273, "charades VGG_GloVe": 273,
                     "tacos C3D_GloVe (T2VEncoder_TwoMLP)": 289, "qvhighlights C+SF_C": 273}


def official_state_keys(cfg) -> list[str]:
    """The official checkpoint keys (``model_*.ckpt["model"]``, ``text_encoder.*`` removed) for a config, listed
    from the module rules of vmr.md B7 (not from a built model): 273 for C+SF / VGG+GloVe, 289 for TACoS."""
    o = _opts(cfg)

    def wb(p):
        return [f"{p}.weight", f"{p}.bias"]

    def t2v(p, two):
        ks = [f"{p}.self_attn.in_proj_weight", f"{p}.self_attn.in_proj_bias", *wb(f"{p}.self_attn.out_proj"),
              *wb(f"{p}.linear1"), *wb(f"{p}.linear2"), *wb(f"{p}.norm1"), *wb(f"{p}.norm2"), f"{p}.activation.weight"]
        if two:
            ks += [*wb(f"{p}.linear1_1"), *wb(f"{p}.linear2_1"), *wb(f"{p}.norm1_1"), *wb(f"{p}.norm2_1")]
        return ks

    def linear_layer(p):
        return [*wb(f"{p}.LayerNorm"), *wb(f"{p}.net.1")]

    keys = ["global_rep_token", "global_rep_pos"] + (["masked_token", "unknown_token"] if o.rec_fw else [])
    for i in range(o.num_recfw_layers):
        keys += t2v(f"enhance_encoder.t2v_encoder.layers.{i}", not o.share_MLP)
    for i in range(o.t2v_layers):
        keys += t2v(f"t2v_encoder.t2v_encoder.layers.{i}", False)
    for i in range(o.enc_layers):
        p = f"transformer.encoder.layers.{i}"
        keys += [f"{p}.self_attn.in_proj_weight", f"{p}.self_attn.in_proj_bias", *wb(f"{p}.self_attn.out_proj"),
                 *wb(f"{p}.linear1"), *wb(f"{p}.linear2"), *wb(f"{p}.norm1"), *wb(f"{p}.norm2"),
                 f"{p}.activation.weight"]
    for i in range(o.dec_layers):
        p = f"transformer.decoder.layers.{i}"
        for n in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                  "self_attn.out_proj", "norm1", "ca_qcontent_proj") + (("ca_qpos_proj",) if i == 0 else ()) + (
                "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj", "cross_attn.out_proj",
                "linear1", "linear2", "norm2", "norm3"):
            keys += wb(f"{p}.{n}")
        keys.append(f"{p}.activation.weight")
    keys += wb("transformer.decoder.norm")
    for head, n in (("query_scale", 2), ("ref_point_head", 2), ("bbox_embed", 3), ("ref_anchor_head", 2)):
        for j in range(n):
            keys += wb(f"transformer.decoder.{head}.layers.{j}")
    keys += ["txt_position_embed.position_embeddings.weight", *wb("txt_position_embed.LayerNorm")]
    for j in range(3):
        keys += wb(f"span_embed.layers.{j}")
    keys += [*wb("class_embed"), "query_embed.weight"]
    for proj in ("input_txt_proj", "input_vid_proj"):
        for j in range(o.n_input_proj):
            keys += linear_layer(f"{proj}.{j}")
    keys += [*wb("saliency_proj1"), *wb("saliency_proj2")]
    if o.rec_fw:
        keys += [*linear_layer("output_txt_proj.0"), *wb("output_txt_proj.1")]
    if o.rec_ss:
        keys.append("ss_reconstructor.masked_sent_token")
        for i in range(o.num_recss_layers):
            keys += t2v(f"ss_reconstructor.recon_trans.layers.{i}", False)
        keys += [*linear_layer("ss_reconstructor.output_sent_proj.0"),
                 *linear_layer("ss_reconstructor.output_sent_proj.1")]
    return keys


STATE_DICT_KEYS = official_state_keys  # the brief's name for the key-listing helper
