"""MRNet (xian-sh/MRNet @ 53432f5, ``RET`` in ``ret/modeling/ret_model/ret_model.py`` L469-595), batched.

Forward of one batch of B videos, each with all its queries (Q padded query slots, ``query_mask``):

1. ``featpool`` (``featpool.py`` L5-20): Conv1d(k=1, input_size -> featpool_hidden) -> ReLU -> AvgPool1d(
   featpool_kernel, stride num_pre_clips // num_clips): ``(B, N, H)``.
2. ``input_vid_proj_{0,1}`` (L492-501): two LinearLayers ``LayerNorm -> Dropout(input_dropout) -> Linear``, the
   first followed by ReLU: ``(B, N, d)``.
3. ``text_encoder`` (``text_encoder.py`` L6-46): ``fc_out2`` gives the query tokens ``(B, Q, d)``; ``fc_out1``
   (only returned at official inference, for visualisation) is kept as a parameter and never used.
4. ``trans_ret`` (L392-453): ``trans_layers`` pre-LN blocks ``X <- X + Drop(RetLayer(LN1(X)))``,
   ``X <- X + Drop(FFN(LN2(X)))`` (FFN Linear -> exact GELU -> Linear), then a final LayerNorm, over the joint
   sequence ``[Q query slots ; N video tokens]`` of every video at once. The official code runs it per video on
   ``[n_q query tokens ; N video tokens]`` (L534-552). Here padded query slots are excluded as attention *keys*
   additively (``key_valid``), after the official multiplicative mask; the multiplicative mask is 1 on every
   text row/column, so the rows of the real queries and of the video tokens are exactly the official per-video
   rows. The sine PE of the query tokens is normalised by the TRUE count ``n_queries`` (position_encoding.py
   L61-64). Padded query rows are computed (finite, meaningless) and masked out of every output.
5. RetLayer (L204-377; ``ret_variant``):

   * ``"projected"`` (``ret_model.py``, ActivityNet/Charades): six bias-free ``(d, d)`` parameters used as
     ``x @ W`` (L222-228, init ``randn(d, d) / d``); ``Q_t = (PE + T) W_txt_Q``, ``K_t = (PE + T) W_txt_K``,
     ``V_t = T W_txt_V``, ``Q_v = xPos(V) W_vid_Q``, ``K_v = xPos_down(V) W_vid_K``, ``V_v = V W_vid_V``
     (L335-341; xPos over the whole d-dim token, before W); the attention module has only the output Linear
     ``self_attn.linears.0`` (L173, L197).
   * ``"mha"`` (``ret_model_tacos.py``, TACoS): no W; Q/K inputs ``[PE + T ; xPos(V)]``/``[PE + T ; xPos_down(V)]``,
     V input ``[T ; V]`` (L204-210), then ``linears.0/1/2`` (with bias) project q/k/v and ``linears.3`` is the
     output (L91-98).

   Attention (L135-161 / tacos L49-61): per head ``softmax((q_h / sqrt(d_k)) k_h^T * M)`` -> dropout(att_dropout)
   -> ``@ v_h``, heads concatenated; ``M`` is the multiplicative mask (decay ``D`` x sparse ``Lambda`` on the
   video-video block, 1 elsewhere; L254-302). ``att_mode "v"`` attends the video tokens only; the text output is
   ``LN1(T) W_txt_V`` (projected, no output Linear, L316/L327) or ``LN1(T)`` itself (mha, tacos L206/L218).
   ``att_softmax=False``: the projected variant's attention output is zero (``attn_new = zeros_like``, L145-157:
   the released Charades config); the mha variant multiplies the masked logits by ``v`` without a softmax
   (tacos L54-60; padded query keys get weight 0 there). ``attention_impl``: ``parallel`` or ``chunkwise``
   (:func:`jaxprvr.ops.retention.chunked_attention`, the same result).
6. ``proposal_map`` (feat2d.py SparseMaxPool, as max over ``[i..j]``), ``proposal_conv`` (proposal_conv.py L20-46):
   Conv2d(d -> predictor_hidden, k, padding (k-1)L//2), L-1 more convs without padding, each followed by
   BatchNorm -> ReLU -> x the mask-renormalisation weight map; then the two 1x1 heads ``conv1x1_contrastive``
   (``map2d``) and ``conv1x1_iou``.
7. ``text_out`` (text_out.py L29-53): ``fc_out1(txt_mem)`` is the IoU-branch query; ``fc_out2`` and ``layernorm``
   exist (parameters kept) but are unused.
8. Scores (L563-595): ``iou_scores = sigmoid(10 cos(fc_out1(txt_mem), map2d_iou)) * mask2d``,
   ``contrastive_scores = cos(txt_mem, map2d) * mask2d``; both also x ``query_mask`` (padded slots are 0).

Call: ``model.apply(variables, batch, train=..., rngs={"dropout": k}, mutable=["batch_stats"] when train)``
-> ``(outputs, aux)``; ``outputs`` = ``{"iou_scores" (B,Q,N,N), "contrastive_scores" (B,Q,N,N), "map2d" (B,N,N,C),
"txt_mem" (B,Q,C)}``; ``aux = {"loss_sparsity": sum_layers mean|off(Lambda)| x sum(video_valid)`` (the official
sum over the videos of the batch, L540; 0 when ``mask_mode`` is ``no``/``ret``), ``"mask2d"`` (N, N) 0/1 (the
static proposal mask, for :func:`jaxprvr.losses.vmr.mrnet_loss`)}``.

BatchNorm (:class:`TorchBatchNorm`): torch ``BatchNorm2d`` semantics; in training the statistics are taken over
all N x N cells (valid proposals or not, proposal_conv.py L41) of the *valid* videos only (``video_valid``; the
official batch has no padding videos), two-pass biased variance for normalising, the running variance updated
with the unbiased one, momentum 0.1, eps 1e-5. Collection ``batch_stats``: ``mean``, ``var``,
``num_batches_tracked`` (int32 here; the official buffer is int64).

Dtypes: ``model.compute_dtype`` float32 (official), bfloat16 (Linear/Conv/attention matmuls in bf16; LayerNorm,
BatchNorm statistics, softmax, masks, xPos/PE, cosine scores in float32) or float64 (with jax_enable_x64:
everything float64, as in :mod:`jaxprvr.models.layers`).

Init: torch defaults, as the official model does not re-initialise: Linear/Conv weight and bias
U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LayerNorm (1, 0); Embedding N(0, 1); BatchNorm (1, 0), running (0, 1);
``W_*`` N(0, 1) / d.

Parameter table: official ``state_dict`` key -> collection / Flax path, kind (``layout``). A numeric torch path
segment is joined to the previous one with ``_`` (``trans_ret.rets.0`` -> ``trans_ret/rets_0``,
``trans_ret.ffns.0.2`` -> ``trans_ret/ffns_0_2``, ``proposal_conv.bn.1`` -> ``proposal_conv/bn_1``,
``input_vid_proj.0.net.1`` -> ``input_vid_proj_0/net_1``). :func:`official_key_table` builds the full table
for a config (ANet 90 keys, TACoS 65, Charades 112).

======================================================  =================================================  =========
torch key                                               Flax (``params`` unless said)                      kind
======================================================  =================================================  =========
``featpool.conv.weight`` (H, D_in, 1)                   ``featpool/conv/kernel`` (1, D_in, H)              conv1d
``featpool.conv.bias``                                  ``featpool/conv/bias``                             bias
``text_encoder.fc_out{1,2}.weight`` (d, 768)            ``text_encoder/fc_out{1,2}/kernel`` (768, d)       linear
``text_encoder.fc_out{1,2}.bias``                       ``text_encoder/fc_out{1,2}/bias``                  bias
``text_out.fc_out{1,2}.weight`` / ``.bias``             ``text_out/fc_out{1,2}/kernel`` / ``bias``         linear/bias
``text_out.layernorm.{weight,bias}``                    ``text_out/layernorm/{scale,bias}``                layernorm
``trans_ret.rets.{i}.W_{vid,txt}_{Q,K,V}`` (d, d)       ``trans_ret/rets_{i}/W_{vid,txt}_{Q,K,V}``         param (x @ W: no transpose)
``trans_ret.rets.{i}.self_attn.linears.{j}.weight``     ``trans_ret/rets_{i}/self_attn/linears_{j}/kernel`` linear (j = 0; mha 0..3)
``trans_ret.rets.{i}.self_attn.linears.{j}.bias``       ``trans_ret/rets_{i}/self_attn/linears_{j}/bias``  bias
``trans_ret.rets.{i}.learn_vid_ret.weight`` (N^2, 1)    ``trans_ret/rets_{i}/learn_vid_ret/embedding``     embedding
``trans_ret.rets.{i}.xpos.scale`` (d/2,)                (none: a constant, ``ops.retention.xpos_scale(d)``) buffer
``trans_ret.ffns.{i}.{0,2}.weight`` / ``.bias``         ``trans_ret/ffns_{i}_{0,2}/kernel`` / ``bias``     linear/bias
``trans_ret.layer_norms_{1,2}.{i}.{weight,bias}``       ``trans_ret/layer_norms_{1,2}_{i}/{scale,bias}``   layernorm
``trans_ret.norm.{weight,bias}``                        ``trans_ret/norm/{scale,bias}``                    layernorm
``proposal_conv.convs.{j}.weight`` (o, i, k, k)         ``proposal_conv/convs_{j}/kernel`` (k, k, i, o)    conv2d
``proposal_conv.convs.{j}.bias``                        ``proposal_conv/convs_{j}/bias``                   bias
``proposal_conv.bn.{j}.{weight,bias}``                  ``proposal_conv/bn_{j}/{scale,bias}``              bn_param
``proposal_conv.bn.{j}.running_mean``                   ``batch_stats``: ``proposal_conv/bn_{j}/mean``     bn_mean
``proposal_conv.bn.{j}.running_var``                    ``batch_stats``: ``proposal_conv/bn_{j}/var``      bn_var
``proposal_conv.bn.{j}.num_batches_tracked`` (int64)    ``batch_stats``: ``.../bn_{j}/num_batches_tracked`` bn_count (int32 here)
``proposal_conv.conv1x1_{iou,contrastive}.weight``      ``proposal_conv/conv1x1_{iou,contrastive}/kernel`` conv2d
``proposal_conv.conv1x1_{iou,contrastive}.bias``        ``proposal_conv/conv1x1_{iou,contrastive}/bias``   bias
``input_vid_proj.{0,1}.LayerNorm.{weight,bias}``        ``input_vid_proj_{0,1}/LayerNorm/{scale,bias}``    layernorm
``input_vid_proj.{0,1}.net.1.{weight,bias}``            ``input_vid_proj_{0,1}/net_1/{kernel,bias}``       linear/bias
======================================================  =================================================  =========

Dropout modules (``layers.Dropout``, paths for :mod:`torch_ref.dropout`): ``input_vid_proj_{0,1}/net_0``,
``trans_ret/rets_{i}/self_attn/dropout`` (attention probabilities, only when att_dropout > 0),
``trans_ret/dropout_{1,2}_{i}``. The Flax masks are drawn on the padded batched tensors, the official ones per
video; a shared-mask comparison must map the counters of the real rows.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr.config import MRNetConfig
from jaxprvr.errors import JaxprvrError
from jaxprvr.models.layers import (F32, Dropout, layer_norm, l2_normalize, resolve_compute_dtype, stat_dtype,
                                   to_dtype, to_float32, to_stat, torch_dense, torch_uniform)
from jaxprvr.models.layers import TorchLinearLayer as LinearLayer
from jaxprvr.ops import proposals as P
from jaxprvr.ops import retention as R

Dtype = Any

RET_VARIANTS = ("projected", "mha")
ATT_MODES = ("all", "v")
MASK_MODES = ("no", "ret", "sparse", "both")
ATTENTION_IMPLS = ("parallel", "chunkwise")
BN_MOMENTUM = 0.1  # torch BatchNorm2d default
BN_EPS = 1e-5
SCORE_SCALE = 10.0  # iou_score * 10 before the sigmoid (ret_model.py L573)


# ---------------------------------------------------------------------------------------------- init / helpers


def torch_conv(features: int, in_features: int, kernel: tuple, padding, name: str, dtype: Dtype) -> nn.Conv:
    """``nn.Conv{1,2}d`` with torch's default init (fan_in = in_features x prod(kernel))."""
    init = torch_uniform(in_features * int(np.prod(kernel)))
    return nn.Conv(features, kernel, padding=padding, kernel_init=init, bias_init=init, name=name, dtype=dtype,
                   param_dtype=F32)


def validate_config(cfg: MRNetConfig) -> None:
    """JaxprvrErrors for the settings this port does not have (named by their config key)."""
    checks = (("model.ret_variant", cfg.ret_variant, RET_VARIANTS), ("model.att_mode", cfg.att_mode, ATT_MODES),
              ("model.mask_mode", cfg.mask_mode, MASK_MODES),
              ("model.attention_impl", cfg.attention_impl, ATTENTION_IMPLS))
    for where, value, allowed in checks:
        if value not in allowed:
            raise JaxprvrError(where, f"one of {list(allowed)}", repr(value))
    if cfg.joint_space % cfg.n_heads:
        raise JaxprvrError("model.joint_space", f"a multiple of model.n_heads={cfg.n_heads}", str(cfg.joint_space))
    stride = cfg.num_pre_clips // cfg.num_clips
    pooled = (cfg.num_pre_clips - cfg.featpool_kernel) // max(stride, 1) + 1 if stride >= 1 else 0
    if stride < 1 or pooled != cfg.num_clips:
        raise JaxprvrError("model.featpool_kernel", f"AvgPool1d(kernel, stride=num_pre_clips // num_clips) giving "
                           f"num_clips={cfg.num_clips} clips from num_pre_clips={cfg.num_pre_clips}",
                           f"{pooled} clips (kernel {cfg.featpool_kernel}, stride {stride})")


def proposal_mask(cfg: MRNetConfig) -> np.ndarray:
    """The static ``(N, N)`` bool mask of the valid proposals (feat2d.py L6-19)."""
    mask = np.asarray(P.mask2d(cfg.num_clips, tuple(cfg.pooling_counts)), bool)
    if not mask.any():
        raise JaxprvrError("model.pooling_counts", "a pooling that fills the N x N map", str(cfg.pooling_counts))
    return mask


def cosine_map(query, cells):
    """``cos(query[b, q], cells[b, i, j])``: ``(B, Q, C) x (B, N, N, C) -> (B, Q, N, N)`` (F.normalize, eps 1e-12)."""
    return jnp.einsum("bqc,bijc->bqij", l2_normalize(query), l2_normalize(cells))


# ---------------------------------------------------------------------------------------------- blocks


class FeatAvgPool(nn.Module):
    """``featpool``: Conv1d(k=1) -> ReLU -> AvgPool1d(kernel, stride) over time; ``(B, P, D) -> (B, N, H)``."""

    cfg: MRNetConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        x = torch_conv(c.featpool_hidden, c.input_size, (1,), "VALID", "conv", self.dtype)(x)
        x = jax.nn.relu(x)
        stride = c.num_pre_clips // c.num_clips
        return nn.avg_pool(x, (c.featpool_kernel,), strides=(stride,), padding="VALID")


class TextEncoder(nn.Module):
    """``text_encoder`` (text_encoder.py L6-46): returns ``fc_out2(queries)``; ``fc_out1`` only exists."""

    cfg: MRNetConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, queries):
        c = self.cfg
        fc_out1 = torch_dense(c.joint_space, c.text_dim, "fc_out1", self.dtype)
        fc_out2 = torch_dense(c.joint_space, c.text_dim, "fc_out2", self.dtype)
        if self.is_initializing():
            fc_out1(queries)  # sent_feat_iou: returned at official inference only, never in a loss
        return fc_out2(queries)


class TextOut(nn.Module):
    """``text_out`` (text_out.py L29-53): returns ``fc_out1(txt_mem)``; ``fc_out2`` and ``layernorm`` only exist."""

    cfg: MRNetConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, txt_mem):
        d = self.cfg.joint_space
        fc_out1 = torch_dense(d, d, "fc_out1", self.dtype)
        if self.is_initializing():
            torch_dense(d, d, "fc_out2", self.dtype)(txt_mem)  # txt_feat: unused (the loss takes txt_mem, L583)
            layer_norm(name="layernorm", dtype=self.dtype)(txt_mem)  # commented out in forward (L46)
        return fc_out1(txt_mem)


class LearnTable(nn.Module):
    """``learn_vid_ret = nn.Embedding(N * N, 1)`` (ret_model.py L240): the table itself, ``(N^2, 1)``, N(0, 1)."""

    rows: int

    @nn.compact
    def __call__(self):
        return self.param("embedding", nn.initializers.normal(stddev=1.0), (self.rows, 1), F32)


class AttentionDropoutKey(nn.Module):
    """``self_attn.dropout``: returns :func:`jaxprvr.ops.retention.module_attention_dropout` of this module (one
    ``'dropout'`` key per call, recorded at this module's path), or None when deterministic or the rate is 0."""

    rate: float

    @nn.compact
    def __call__(self, *, deterministic: bool):
        return R.module_attention_dropout(self, self.rate, deterministic)


class SelfAttention(nn.Module):
    """``self_attn`` (MultiHeadedAttention: ret_model.py L166-201 / ret_model_tacos.py L68-102).

    ``projected``: q, k, v are given already projected; only ``linears_0`` (the output Linear) exists.
    ``mha``: ``linears_0/1/2`` project q/k/v (with bias), ``linears_3`` is the output Linear.
    """

    cfg: MRNetConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, q, k, v, mult_mask, key_valid, *, train: bool = False):
        c = self.cfg
        d = c.joint_space
        mha = c.ret_variant == "mha"
        if mha:
            q = torch_dense(d, d, "linears_0", self.dtype)(q)
            k = torch_dense(d, d, "linears_1", self.dtype)(k)
            v = torch_dense(d, d, "linears_2", self.dtype)(v)
        out_proj = torch_dense(d, d, "linears_3" if mha else "linears_0", self.dtype)
        # self_attn.dropout (L176-177): an AttentionDropout (the same masks in both attention forms), its key
        # drawn and recorded under .../self_attn/dropout; None in eval or without att_dropout.
        dropout = AttentionDropoutKey(c.att_dropout, name="dropout")(deterministic=not train)
        if mha and not c.att_softmax:
            att = unnormalised_attention(q, k, v, mult_mask, key_valid, c.n_heads, dropout)
        elif c.attention_impl == "chunkwise":
            att = R.chunked_attention(q, k, v, mult_mask, key_valid, c.n_heads, chunk=c.attention_chunk,
                                      softmax=c.att_softmax, dropout=dropout)
        else:
            att = R.masked_attention(q, k, v, mult_mask, key_valid, c.n_heads, softmax=c.att_softmax,
                                     dropout=dropout)
        return out_proj(to_dtype(att, self.dtype))


def unnormalised_attention(q, k, v, mult_mask, key_valid, n_heads: int, dropout=None):
    """ret_model_tacos.py ``attention`` with ``att_softmax=False`` (L49-61): ``((q_h / sqrt(d_k)) k_h^T * M) @ v_h``
    without a softmax; padded keys (``key_valid == 0``) get weight 0 (their official counterpart does not exist)."""
    *lead, length, d = q.shape
    dk = d // n_heads
    qh = q.reshape(*lead, length, n_heads, dk) / math.sqrt(dk)
    kh = k.reshape(*lead, k.shape[-2], n_heads, dk)
    vh = v.reshape(*lead, v.shape[-2], n_heads, dk)
    st = stat_dtype(q.dtype)
    s = jnp.einsum("...qhd,...khd->...hqk", qh, kh, preferred_element_type=st) * mult_mask.astype(st)
    if key_valid is not None:
        s = s * key_valid.astype(st)[..., None, None, :]
    s = to_dtype(s, v.dtype)
    if dropout is not None:
        s = dropout(s)
    out = jnp.einsum("...hqk,...khd->...qhd", s, vh)
    return out.reshape(*lead, length, d)


class RetLayer(nn.Module):
    """One ``trans_ret.rets.{i}`` (ret_model.py L204-377; ret_model_tacos.py L105-233).

    ``h``: ``(B, Q + N, d)`` = LN1 of ``[query slots ; video tokens]``; ``n_q`` ``(B,)`` int true query counts;
    ``query_mask`` ``(B, Q)``. Returns ``(out (B, Q + N, d), sparsity of this layer (scalar))``.
    """

    cfg: MRNetConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, h, n_q, query_mask, *, train: bool = False):
        c = self.cfg
        dt = self.dtype
        st = stat_dtype(dt)
        d = c.joint_space
        n_slots = query_mask.shape[-1]
        n = h.shape[-2] - n_slots
        projected = c.ret_variant == "projected"
        if projected:  # L222-228, in the official order
            w = {name: self.param(name, nn.initializers.normal(stddev=1.0 / d), (d, d), F32)
                 for name in ("W_vid_Q", "W_vid_K", "W_vid_V", "W_txt_Q", "W_txt_K", "W_txt_V")}
        table = LearnTable(n * n, name="learn_vid_ret")()
        attn = SelfAttention(c, dtype=dt, name="self_attn")

        # Masks (L254-302), in the statistics dtype.
        decay = R.decay_mask(n, c.gamma, c.d_double, dtype=st)
        sparse, _ = R.sparse_mask(to_dtype(table, st))
        mult = R.multiplicative_mask(n_slots if c.att_mode == "all" else 0, decay, sparse, c.att_mode, c.mask_mode)
        if c.mask_mode in ("sparse", "both"):
            loss_sparsity = R.sparsity_loss(to_dtype(table, st))  # L296/L300
        else:
            loss_sparsity = jnp.zeros((), st)

        txt, vid = h[:, :n_slots], h[:, n_slots:]
        pe = R.sine_query_pe(n_q, n_slots, d, dtype=st)  # over the true n_q (mask_txt = ones(1, n_q), L252)
        txt_pe = to_dtype(to_dtype(pe, st) + to_stat(txt), dt)  # pos_embed(txt) + txt (L335)
        vid_up = to_dtype(R.xpos(to_stat(vid)), dt)  # xPos on the whole token, before W (L339)
        vid_down = to_dtype(R.xpos(to_stat(vid), downscale=True), dt)

        def mm(x, name):
            return jnp.matmul(x, w[name].astype(dt))

        if c.att_mode == "all":
            key_valid = jnp.concatenate([query_mask.astype(st), jnp.ones(vid.shape[:2], st)], axis=1)
            if projected:
                q = jnp.concatenate([mm(txt_pe, "W_txt_Q"), mm(vid_up, "W_vid_Q")], axis=1)
                k = jnp.concatenate([mm(txt_pe, "W_txt_K"), mm(vid_down, "W_vid_K")], axis=1)
                v = jnp.concatenate([mm(txt, "W_txt_V"), mm(vid, "W_vid_V")], axis=1)
            else:  # tacos L221-223: projections inside self_attn
                q = jnp.concatenate([txt_pe, vid_up], axis=1)
                k = jnp.concatenate([txt_pe, vid_down], axis=1)
                v = jnp.concatenate([txt, vid], axis=1)
            out = attn(q, k, v, mult, key_valid, train=train)
        else:  # "v": video-video attention only (L309-327; tacos L212-218)
            all_keys = jnp.ones(vid.shape[:2], st)
            if projected:
                ret = attn(mm(vid_up, "W_vid_Q"), mm(vid_down, "W_vid_K"), mm(vid, "W_vid_V"), mult, all_keys,
                           train=train)
                txt_out = mm(txt, "W_txt_V")  # no output projection (L316, L327); W_txt_Q/K unused (L314-315)
            else:
                ret = attn(vid_up, vid_down, vid, mult, all_keys, train=train)
                txt_out = txt
            out = jnp.concatenate([to_dtype(txt_out, ret.dtype), ret], axis=1)
        return out, loss_sparsity


class TransRet(nn.Module):
    """``trans_ret`` (ret_model.py L392-453): pre-LN RetLayer + FFN blocks and a final LayerNorm."""

    cfg: MRNetConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, txt, vid, n_q, query_mask, *, train: bool = False):
        c = self.cfg
        dt = self.dtype
        d = c.joint_space
        src = jnp.concatenate([txt, vid], axis=1)
        loss_sp = jnp.zeros((), stat_dtype(dt))
        for i in range(c.trans_layers):
            h = layer_norm(name=f"layer_norms_1_{i}", dtype=dt)(src)
            temp, sp = RetLayer(c, dtype=dt, name=f"rets_{i}")(h, n_q, query_mask, train=train)
            loss_sp = loss_sp + sp
            src2 = Dropout(c.dropout, name=f"dropout_1_{i}")(to_dtype(temp, dt), deterministic=not train) + src
            f = layer_norm(name=f"layer_norms_2_{i}", dtype=dt)(src2)
            f = torch_dense(c.ffn_dim, d, f"ffns_{i}_0", dt)(f)
            f = jax.nn.gelu(f, approximate=False)  # nn.GELU() default: exact erf
            f = torch_dense(d, c.ffn_dim, f"ffns_{i}_2", dt)(f)
            src = Dropout(c.dropout, name=f"dropout_2_{i}")(f, deterministic=not train) + src2
        return layer_norm(name="norm", dtype=dt)(src), loss_sp


class TorchBatchNorm(nn.Module):
    """``nn.BatchNorm2d`` (momentum 0.1, eps 1e-5) over channels-last ``(B, H, W, C)``, batch statistics over the
    cells of the valid videos only (``valid (B,)`` 0/1).

    Training: ``mean``/biased ``var`` (two passes) over the ``sum(valid) * H * W`` positions normalise;
    the running buffers move as torch's: ``r <- (1 - m) r + m s`` with the unbiased variance
    ``var * n / (n - 1)``, and ``num_batches_tracked += 1`` (a batch without any valid video leaves the running
    statistics unchanged). Evaluation normalises with the running buffers. The output is
    ``(x - mean) * (1 / sqrt(var + eps)) * scale + bias``, computed in float32 (float64 under a float64 computation)
    and returned in ``x``'s dtype. At init nothing is updated (as torch's constructor)."""

    features: int
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS

    @nn.compact
    def __call__(self, x, valid, *, train: bool = False):
        c = self.features
        scale = self.param("scale", nn.initializers.ones, (c,), F32)
        bias = self.param("bias", nn.initializers.zeros, (c,), F32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), F32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), F32))
        tracked = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        xs = to_stat(x)
        st = xs.dtype
        if train:
            w = valid.astype(st)
            count = jnp.sum(w) * (x.shape[1] * x.shape[2])
            denom = jnp.maximum(count, 1.0)
            wb = w[:, None, None, None]
            mean = jnp.sum(xs * wb, axis=(0, 1, 2)) / denom
            var = jnp.sum(jnp.square(xs - mean) * wb, axis=(0, 1, 2)) / denom
            if not self.is_initializing():
                m = self.momentum
                unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
                some = count > 0
                ra_mean.value = jnp.where(some, (1.0 - m) * ra_mean.value + m * mean, ra_mean.value)
                ra_var.value = jnp.where(some, (1.0 - m) * ra_var.value + m * unbiased, ra_var.value)
                tracked.value = tracked.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = 1.0 / jnp.sqrt(to_dtype(var, st) + self.epsilon)
        y = (xs - to_dtype(mean, st)) * inv * to_dtype(scale, st) + to_dtype(bias, st)
        return to_dtype(y, x.dtype)


class ProposalConv(nn.Module):
    """``proposal_conv`` (proposal_conv.py L20-46): the masked conv stack and the two 1x1 heads."""

    cfg: MRNetConfig
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, video_valid, *, train: bool = False):
        c = self.cfg
        dt = self.dtype
        k, n_layers, hid = c.predictor_kernel, c.predictor_layers, c.predictor_hidden
        weights = P.conv_mask_weights(proposal_mask(c), k, n_layers)  # L13-17, constants
        pad = (k - 1) * n_layers // 2  # first_padding, L27
        in_ch = c.joint_space
        for j in range(n_layers):
            if j == 0:
                # The first conv's zero padding, applied as an explicit pad and a VALID conv: the same numbers,
                # but XLA's CPU backward of a conv that pads internally took 2.6x as long (benchmarks.vmr "conv").
                x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
            x = torch_conv(hid, in_ch, (k, k), "VALID", f"convs_{j}", dt)(x)
            x = TorchBatchNorm(hid, name=f"bn_{j}")(x, video_valid, train=train)
            x = jax.nn.relu(x) * jnp.asarray(weights[j], stat_dtype(dt))[None, :, :, None].astype(x.dtype)
            in_ch = hid
        out1 = torch_conv(c.joint_space, hid, (1, 1), "VALID", "conv1x1_contrastive", dt)(x)
        out2 = torch_conv(c.joint_space, hid, (1, 1), "VALID", "conv1x1_iou", dt)(x)
        return out1, out2


# ---------------------------------------------------------------------------------------------- the model


class MRNet(nn.Module):
    """The MRNet network (``RET``), batched over videos with padded query slots. See the module docstring."""

    cfg: MRNetConfig

    @property
    def compute_dtype(self) -> Dtype:
        return resolve_compute_dtype(self.cfg)

    def trainable_mask(self, params):
        """A pytree of bools over ``params``: False for the parameters the official model never gives a gradient
        (``grad is None`` in torch, so AdamW neither updates nor decays them): ``text_encoder.fc_out1`` (its output
        is only returned at inference), ``text_out.fc_out2`` and ``text_out.layernorm`` (built, unused),
        ``W_txt_Q/K`` in mode ``v`` (computed, unused, ret_model.py L314-315), ``W_*_Q/K`` when the projected
        attention is zeroed (``att_softmax=False``: the logits feed only the discarded Hardswish, L141-157), and
        ``learn_vid_ret`` when the sparse mask is off (``mask_mode`` no/ret: neither the mask nor the sparsity
        loss uses it, L283-293)."""
        c = self.cfg
        frozen = [("text_encoder", "fc_out1"), ("text_out", "fc_out2"), ("text_out", "layernorm")]
        w_frozen = set()
        if c.ret_variant == "projected":
            if c.att_mode == "v":
                w_frozen |= {"W_txt_Q", "W_txt_K"}
            if not c.att_softmax:
                w_frozen |= {"W_txt_Q", "W_txt_K", "W_vid_Q", "W_vid_K"}
        sparse_off = c.mask_mode in ("no", "ret")

        def decide(path, _leaf):
            names = [getattr(k, "key", str(k)) for k in path]
            if any(tuple(names[i:i + 2]) == f for f in frozen for i in range(len(names) - 1)):
                return False
            if names and names[-1] in w_frozen:
                return False
            if sparse_off and "learn_vid_ret" in names:
                return False
            return True

        return jax.tree_util.tree_map_with_path(decide, params)

    def setup(self):
        c = self.cfg
        validate_config(c)
        dt = self.compute_dtype
        self.featpool = FeatAvgPool(c, dtype=dt)
        self.input_vid_proj_0 = LinearLayer(c.joint_space, c.featpool_hidden, c.input_dropout, True, dtype=dt)
        self.input_vid_proj_1 = LinearLayer(c.joint_space, c.joint_space, c.input_dropout, False, dtype=dt)
        self.text_encoder = TextEncoder(c, dtype=dt)
        self.trans_ret = TransRet(c, dtype=dt)
        self.proposal_conv = ProposalConv(c, dtype=dt)
        self.text_out = TextOut(c, dtype=dt)

    def __call__(self, batch, *, train: bool = False):
        c = self.cfg
        dt = self.compute_dtype
        st = stat_dtype(dt)
        feats = to_dtype(jnp.asarray(batch["feats"]), dt)
        queries = to_dtype(jnp.asarray(batch["queries"]), dt)
        query_mask = jnp.asarray(batch["query_mask"]).astype(st)
        video_valid = jnp.asarray(batch["video_valid"]).astype(st)
        n_q = jnp.asarray(batch["n_queries"]).astype(jnp.int32)
        if feats.ndim != 3 or feats.shape[1] != c.num_pre_clips or feats.shape[2] != c.input_size:
            raise JaxprvrError("batch['feats']", f"(B, num_pre_clips={c.num_pre_clips}, input_size={c.input_size})",
                               str(tuple(feats.shape)))
        n_slots = queries.shape[1]

        vid = self.featpool(feats)  # (B, N, H), L525-526
        vid = self.input_vid_proj_1(self.input_vid_proj_0(vid, train=train), train=train)  # L535
        txt = self.text_encoder(queries)  # (B, Q, d), L528
        mem, loss_sp = self.trans_ret(txt, vid, n_q, query_mask, train=train)
        txt_mem, vid_mem = mem[:, :n_slots], mem[:, n_slots:]

        mask = proposal_mask(c)
        map2d = P.proposal_map(vid_mem, mask)  # (B, N, N, d), L555
        map2d, map2d_iou = self.proposal_conv(map2d, video_valid, train=train)  # L556
        txt_iou = self.text_out(txt_mem)  # fc_out1, L558

        mask_f = jnp.asarray(mask, st)[None, None]
        qm = query_mask[:, :, None, None]
        iou_scores = jax.nn.sigmoid(cosine_map(to_stat(txt_iou), to_stat(map2d_iou)) * SCORE_SCALE) * mask_f * qm
        contrastive = cosine_map(to_stat(txt_mem), to_stat(map2d)) * mask_f * qm
        outputs = {"iou_scores": iou_scores, "contrastive_scores": contrastive, "map2d": map2d, "txt_mem": txt_mem}
        # ret_model.py L540: the per-video TransRet sparsity summed over the videos of the batch.
        aux = {"loss_sparsity": to_stat(loss_sp) * jnp.sum(video_valid), "mask2d": jnp.asarray(mask, st)}
        return to_float32(outputs), to_float32(aux)


# ---------------------------------------------------------------------------------------------- key table


def official_key_table(cfg: MRNetConfig) -> list[tuple[str, str, str, str]]:
    """``(torch key, collection, Flax path, kind)`` for every official ``state_dict`` key of ``cfg``'s model, in the
    official ``state_dict()`` order. ``collection`` is ``params``, ``batch_stats`` or ``""`` (a buffer with no Flax
    entry: ``xpos.scale``). Kinds: ``linear`` (transpose), ``conv1d`` (axes 2,1,0), ``conv2d`` (axes 2,3,1,0),
    ``bias``, ``layernorm``, ``param`` (as is), ``embedding`` (as is), ``bn_param`` (as is), ``bn_mean``,
    ``bn_var``, ``bn_count`` (int64 torch <-> int32 Flax), ``buffer``."""
    rows: list[tuple[str, str, str, str]] = []

    def lin(t, f, bias=True):
        rows.append((f"{t}.weight", "params", f"{f}/kernel", "linear"))
        if bias:
            rows.append((f"{t}.bias", "params", f"{f}/bias", "bias"))

    def ln(t, f):
        rows.append((f"{t}.weight", "params", f"{f}/scale", "layernorm"))
        rows.append((f"{t}.bias", "params", f"{f}/bias", "bias"))

    def conv(t, f, kind):
        rows.append((f"{t}.weight", "params", f"{f}/kernel", kind))
        rows.append((f"{t}.bias", "params", f"{f}/bias", "bias"))

    # Module registration order of RET.__init__ (L474-504): featpool, feat2d (no parameters), text_encoder,
    # text_out, trans_ret, proposal_conv, input_vid_proj.
    conv("featpool.conv", "featpool/conv", "conv1d")
    lin("text_encoder.fc_out1", "text_encoder/fc_out1")
    lin("text_encoder.fc_out2", "text_encoder/fc_out2")
    lin("text_out.fc_out1", "text_out/fc_out1")
    lin("text_out.fc_out2", "text_out/fc_out2")
    ln("text_out.layernorm", "text_out/layernorm")
    mha = cfg.ret_variant == "mha"
    for i in range(cfg.trans_layers):
        t, f = f"trans_ret.rets.{i}", f"trans_ret/rets_{i}"
        if not mha:
            for name in ("W_vid_Q", "W_vid_K", "W_vid_V", "W_txt_Q", "W_txt_K", "W_txt_V"):
                rows.append((f"{t}.{name}", "params", f"{f}/{name}", "param"))
        for j in range(4 if mha else 1):
            lin(f"{t}.self_attn.linears.{j}", f"{f}/self_attn/linears_{j}")
        rows.append((f"{t}.xpos.scale", "", "", "buffer"))
        rows.append((f"{t}.learn_vid_ret.weight", "params", f"{f}/learn_vid_ret/embedding", "embedding"))
    for i in range(cfg.trans_layers):
        lin(f"trans_ret.ffns.{i}.0", f"trans_ret/ffns_{i}_0")
        lin(f"trans_ret.ffns.{i}.2", f"trans_ret/ffns_{i}_2")
    for which in (1, 2):
        for i in range(cfg.trans_layers):
            ln(f"trans_ret.layer_norms_{which}.{i}", f"trans_ret/layer_norms_{which}_{i}")
    ln("trans_ret.norm", "trans_ret/norm")
    for j in range(cfg.predictor_layers):
        t, f = f"proposal_conv.bn.{j}", f"proposal_conv/bn_{j}"
        rows.append((f"{t}.weight", "params", f"{f}/scale", "bn_param"))
        rows.append((f"{t}.bias", "params", f"{f}/bias", "bn_param"))
        rows.append((f"{t}.running_mean", "batch_stats", f"{f}/mean", "bn_mean"))
        rows.append((f"{t}.running_var", "batch_stats", f"{f}/var", "bn_var"))
        rows.append((f"{t}.num_batches_tracked", "batch_stats", f"{f}/num_batches_tracked", "bn_count"))
    for j in range(cfg.predictor_layers):
        conv(f"proposal_conv.convs.{j}", f"proposal_conv/convs_{j}", "conv2d")
    conv("proposal_conv.conv1x1_iou", "proposal_conv/conv1x1_iou", "conv2d")
    conv("proposal_conv.conv1x1_contrastive", "proposal_conv/conv1x1_contrastive", "conv2d")
    for j in range(2):
        ln(f"input_vid_proj.{j}.LayerNorm", f"input_vid_proj_{j}/LayerNorm")
        lin(f"input_vid_proj.{j}.net.1", f"input_vid_proj_{j}/net_1")
    return rows
