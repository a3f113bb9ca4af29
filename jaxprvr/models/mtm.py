"""MTM (tianxinlin666/MTM, ``src/Models/MTM/model.py``; ``MTM_Net`` is :84-405): building blocks.

* :class:`TCN` (``model.py:28-50``): ``LN(x + clamp(alpha, 0, 1) * Drop(ReLU(conv2(Drop(ReLU(conv1(x)))))))``,
  both convs ``Conv1d(D, D, k=3, padding=1)`` (torch default init under MTM's ``reset_parameters``), dropout
  hard-coded 0.1, ``alpha`` a learnable scalar starting at 0.5; unmasked (padding leaks into the last frames,
  as officially).
* :func:`mamba_residual`: the clip and frame branches' ``h + LN(Mamba(LN(Mamba(h))))`` (``model.py:300-305,
  319-324``): ``num_mamba_layers`` pairs of (``Mamba``, ``nn.LayerNorm``) held in one list, so the torch keys
  are ``clip_mamba.0.*`` (Mamba), ``clip_mamba.1.{weight,bias}`` (LayerNorm), ... and the Flax names
  ``clip_mamba_0``, ``clip_mamba_1``, ... (:func:`make_mamba_stack`, assigned in ``setup``). No mask inside; padded rows are not
  re-zeroed after it (official).
* :class:`AttentionPooling` (``model.py:52-66``): ``softmax(masked_fill(attn_proj(x), mask == 0, -1e9))``
  over time, weighted sum (``attn_proj`` has a bias).
* :class:`MLPReconstructor` (``model.py:9-26``): Linear/ReLU/Dropout layers in a ``mlp`` Sequential; the hidden
  width is ``min(input * factor, output)``.

Parameter names follow the torch attributes (``conv1``, ``conv2``, ``layer_norm``, ``alpha``; ``attn_proj``;
``mlp_0``, ``mlp_3`` for ``mlp.0``/``mlp.3``); key rows in :mod:`parity.keys`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprvr.config import ModelConfig
from jaxprvr.models.layers import (F32, MTM_WIDTHS, Dropout, QueryBranch, dense, layer_norm, resolve_branch_impl,
                                   softmax_f32, to_dtype, to_float32, to_stat)
from jaxprvr.models.mamba import Mamba

TCN_DROPOUT = 0.1  # hard-coded in MTM_Net (model.py: TCN(hidden_size, dropout=0.1))
POOL_FILL = -1e9
Dtype = Any


def _torch_conv_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class TCN(nn.Module):
    hidden_size: int
    dropout: float = TCN_DROPOUT
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        d = self.hidden_size

        def conv(name):
            init = _torch_conv_init(3 * d)  # torch Conv1d default: fan_in = in_channels * kernel
            return nn.Conv(d, kernel_size=(3,), padding=[(1, 1)], name=name, kernel_init=init, bias_init=init,
                           dtype=self.dtype, param_dtype=F32)

        y = Dropout(self.dropout)(jax.nn.relu(conv("conv1")(x)), deterministic=not train)
        y = Dropout(self.dropout)(jax.nn.relu(conv("conv2")(y)), deterministic=not train)
        alpha = self.param("alpha", nn.initializers.constant(0.5), ())
        return layer_norm("layer_norm", dtype=self.dtype)(x + to_dtype(jnp.clip(alpha, 0.0, 1.0), y.dtype) * y)


def make_mamba_stack(d_model: int, num_layers: int, scan: str = "sequential", dtype: Dtype = F32) -> list:
    """``[Mamba, LayerNorm] * num_layers`` (MTM's init: its ``reset_parameters`` re-initialises the Mamba
    Linears). Assign it to an attribute in ``setup`` (``self.clip_mamba = make_mamba_stack(...)``): Flax then
    names the entries ``clip_mamba_0``, ``clip_mamba_1``, ... like the torch ModuleList ``clip_mamba.0``, ..."""
    layers = []
    for _ in range(num_layers):
        layers.append(Mamba(d_model, d_state=16, d_conv=4, expand=2, init_scheme="mtm", scan=scan, dtype=dtype))
        layers.append(layer_norm(dtype=dtype))
    return layers


def mamba_residual(layers, h):
    """``h + LN(Mamba(... LN(Mamba(h))))`` over the ``[Mamba, LayerNorm, ...]`` list."""
    m = h
    for i in range(0, len(layers), 2):
        m = layers[i + 1](layers[i](m))
    return h + m


class AttentionPooling(nn.Module):
    hidden_size: int
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, mask=None):
        scores = to_stat(dense(1, name="attn_proj", dtype=self.dtype)(x))  # (N, L, 1), masked in float32 (or 64)
        if mask is not None:
            scores = jnp.where(mask[..., None] == 0, POOL_FILL, scores)
        w = softmax_f32(scores, axis=1, dtype=x.dtype)
        return jnp.sum(x * w, axis=1)


class MLPReconstructor(nn.Module):
    input_dim: int
    output_dim: int
    num_layers: int = 2
    hidden_dim_factor: float = 2
    dropout: float = 0.1
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        cur, idx = self.input_dim, 0
        for _ in range(self.num_layers - 1):
            nxt = min(int(cur * self.hidden_dim_factor), self.output_dim)
            x = jax.nn.relu(dense(nxt, name=f"mlp_{idx}", dtype=self.dtype)(x))
            x = Dropout(self.dropout)(x, deterministic=not train)
            cur, idx = nxt, idx + 3
        return dense(self.output_dim, name=f"mlp_{idx}", dtype=self.dtype)(x)


# ---------------------------------------------------------------------------------------------- the model


class VideoGuidedTextRefiner(nn.Module):
    """``model.py:68-82``: each query (``(Nq, D)``) cross-attends over *all* the videos it is given
    (``(Nv, D)``: the batch in training, the whole gallery at evaluation; docs/quirks.md), then
    ``linear_out`` = LinearLayer(D, D, LayerNorm, dropout, no ReLU).

    The official code expands the videos to ``(Nq, Nv, D)`` and projects keys and values once per query. Every
    step after the projections is per query row, so here the queries form one length-``Nq`` sequence over one
    ``(Nv, D)`` key set: the same outputs with the key/value projections computed once (``Nq`` times fewer
    FLOPs; the whole-gallery evaluation of TVR would otherwise project 2,179 videos for each of 10,895 queries).
    ``video_valid (Nv,)`` masks padded video slots (the official batches have none; the additive -10000 mask
    makes their weight exactly 0 in float32)."""

    hidden_size: int
    n_heads: int
    drop: float
    dtype: Dtype = F32

    @nn.compact
    def __call__(self, query, video, video_valid=None, *, train: bool = False):
        from jaxprvr.models.layers import BertCrossAttention, LinearLayer

        mask = None if video_valid is None else jnp.asarray(video_valid)[None, :]
        out = BertCrossAttention(self.hidden_size, self.n_heads, self.drop, name="cross_attention", dtype=self.dtype)(
            query[None], video[None], mask, train=train)[0]
        return LinearLayer(self.hidden_size, layer_norm=True, dropout=self.drop, relu=False, name="linear_out",
                           dtype=self.dtype)(out, train=train)


class MTM(QueryBranch, nn.Module):
    """MTM network (``MTM_Net``). Methods as in :mod:`jaxprvr.models` plus the video granularity:

    * ``encode_video`` -> ``{"clip_feats" (B, 32, D), "frame_feats" (B, 128, D), "video_feats" (B, D)}``;
    * ``score(query, video)`` -> ``clip``, ``frame``, ``video`` cosine scores ``(Q, V)``; the video score goes
      through the refiner over the V videos given;
    * ``__call__(batch, train)`` -> scores (``clip``, ``clip_raw``, ``frame``, ``frame_raw``, ``video``,
      ``video_raw``) and ``aux`` (``query``, ``query2`` (the first, independent-dropout pass), ``query_embed``, ``query_tokens``, ``clip_feats``, ``frame_feats``,
      ``video_feats``, ``refined_query``, ``recon_text`` (Q, max_desc_l, q_feat), ``recon_video``
      (B, max_ctx_l, visual_feat_dim), and the intermediate stages).

    As in GMMFormer v2, ``encode_query`` runs twice in training; the clip positional table has ``map_size`` rows.
    """

    cfg: ModelConfig
    scan: str = "sequential"
    widths: tuple = MTM_WIDTHS  # branch widths of the three DyGMMBlocks, code order (official: 11 branches)

    def branch_weights(self) -> dict[str, float]:
        """The fused score adds the video branch (``video_scale_w``)."""
        return {"clip": self.cfg.clip_scale_w, "frame": self.cfg.frame_scale_w, "video": self.cfg.video_scale_w}

    def setup(self):
        from jaxprvr.models.layers import BertAttentionV2, DyGMMBlock, LinearLayer, TrainablePositionalEncoding

        c = self.cfg
        d = c.hidden_size
        dt = self.compute_dtype  # validates cfg.compute_dtype
        batched = resolve_branch_impl(c)  # validates cfg.branch_impl

        def dygmm(frame_len):
            return DyGMMBlock(d, c.n_heads, frame_len, c.sft_factor, c.drop, self.widths,
                              layer2_name="fixed_layer2_projection", slice_logits=True, dtype=dt,
                              batched=batched)

        def proj():
            return LinearLayer(d, layer_norm=True, dropout=c.input_drop, relu=True, dtype=dt)

        self.query_pos_embed = TrainablePositionalEncoding(c.max_desc_l, d, c.input_drop, dtype=dt)
        self.clip_pos_embed = TrainablePositionalEncoding(c.map_size, d, c.input_drop, dtype=dt)
        self.frame_pos_embed = TrainablePositionalEncoding(c.max_ctx_l, d, c.input_drop, dtype=dt)
        self.video_pos_embed = TrainablePositionalEncoding(c.max_ctx_l, d, c.input_drop, dtype=dt)
        self.query_input_proj = proj()
        self.query_encoder = BertAttentionV2(d, c.n_heads, c.drop, dtype=dt)
        self.clip_input_proj = proj()
        self.clip_encoder = dygmm(c.map_size)
        self.clip_mamba = make_mamba_stack(d, c.num_mamba_layers, self.scan, dtype=dt)
        self.frame_input_proj = proj()
        self.frame_tcn = TCN(d, dtype=dt)
        self.frame_encoder_1 = dygmm(c.max_ctx_l)
        self.frame_mamba = make_mamba_stack(d, c.num_mamba_layers, self.scan, dtype=dt)
        self.video_input_proj = proj()
        self.video_encoder = dygmm(c.max_ctx_l)
        self.video_pooling = AttentionPooling(d, dtype=dt)
        self.video_guided_text_refinement = VideoGuidedTextRefiner(d, c.n_heads, c.drop, dtype=dt)
        self.modular_vector_mapping = dense(1, use_bias=False, dtype=dt)
        self.weight_token = self.param("weight_token", nn.initializers.normal(stddev=1.0), (1, 1, d))
        self.text_reconstructor = MLPReconstructor(d, c.max_desc_l * c.q_feat_size, 2, 4, c.drop, dtype=dt)
        self.video_reconstructor = MLPReconstructor(d, c.max_ctx_l * c.visual_feat_dim, 2, 4, c.drop, dtype=dt)

    # ------------------------------------------------------------------ encoders
    def _encode_video(self, clip_feats, frame_feats, frame_mask, train):
        """Encoders in the compute dtype; the returned features are float32 (``stages`` in the compute dtype)."""
        dt = self.compute_dtype
        clip_feats, frame_feats = to_dtype(clip_feats, dt), to_dtype(frame_feats, dt)
        keep = frame_mask[..., None] == 1.0
        clip_emb = self.clip_pos_embed(self.clip_input_proj(clip_feats, train=train), train=train)
        clips_1 = self.clip_encoder(clip_emb, None, self.weight_token, train=train)
        clips = mamba_residual(self.clip_mamba, clips_1)
        frame_emb = self.frame_pos_embed(self.frame_input_proj(frame_feats, train=train), train=train)
        frame_tcn = self.frame_tcn(frame_emb, train=train)
        frames_1 = jnp.where(keep, self.frame_encoder_1(frame_tcn, frame_mask, self.weight_token, train=train), 0.0)
        frames = mamba_residual(self.frame_mamba, frames_1)  # padded rows not re-zeroed (official)
        video_emb = self.video_pos_embed(self.video_input_proj(frame_feats, train=train), train=train)
        video_seq = jnp.where(keep, self.video_encoder(video_emb, frame_mask, self.weight_token, train=train), 0.0)
        video = self.video_pooling(video_seq, frame_mask)
        out = to_float32({"clip_feats": clips, "frame_feats": frames, "video_feats": video})
        stages = {"clip_embed": clip_emb, "clip_feats_1": clips_1, "frame_embed": frame_emb, "frame_tcn": frame_tcn,
                  "frame_feats_1": frames_1, "video_embed": video_emb, "video_seq": video_seq}
        return out, stages

    def encode_video(self, clip_feats, frame_feats, frame_mask, frame_len=None, *, train: bool = False):
        return self._encode_video(clip_feats, frame_feats, frame_mask, train)[0]

    def _video_scores(self, query, video_feats, train, video_valid=None):
        from jaxprvr.models.layers import l2_normalize

        refined = to_stat(self.video_guided_text_refinement(query, video_feats, video_valid, train=train))
        return l2_normalize(refined) @ l2_normalize(video_feats).T, refined @ video_feats.T, refined

    def score(self, query, video):
        from jaxprvr.models.layers import l2_normalize, max_scores

        qn = l2_normalize(query)
        clip, _ = max_scores(qn, l2_normalize(video["clip_feats"]))
        frame, _ = max_scores(qn, l2_normalize(video["frame_feats"]))
        # ``video_valid`` (optional): gallery padding, e.g. to a multiple of the devices; the refiner skips it.
        return {"clip": clip, "frame": frame,
                "video": self._video_scores(query, video["video_feats"], False, video.get("video_valid"))[0]}

    def __call__(self, batch, *, train: bool = False):
        from jaxprvr.models.layers import clip_frame_scores

        c = self.cfg
        video, vstages = self._encode_video(batch["clip_feats"], batch["frame_feats"], batch["frame_mask"], train)
        # model.py:238 and :372: encode_query runs twice (independent dropout): the first pass ("query2") feeds
        # the optimal matching, QDL and the text reconstruction; the second the scores and the refiner.
        q2 = self.encode_query(batch["query_feats"], batch["query_mask"], train=train)
        q, qstages = self._encode_query(batch["query_feats"], batch["query_mask"], train)
        vid, vid_raw, refined = self._video_scores(q, video["video_feats"], train, batch.get("video_valid"))
        recon_text = to_stat(self.text_reconstructor(q2, train=train)).reshape(
            q.shape[0], c.max_desc_l, c.q_feat_size)
        v = video["video_feats"]
        recon_video = to_stat(self.video_reconstructor(v, train=train)).reshape(
            v.shape[0], c.max_ctx_l, c.visual_feat_dim)
        scores = {**clip_frame_scores(q, video["clip_feats"], video["frame_feats"]), "video": vid,
                  "video_raw": vid_raw}
        aux = {"query": q, "query2": q2, **qstages, **vstages, **video, "refined_query": refined, "recon_text": recon_text,
               "recon_video": recon_video}
        return to_float32(scores), to_float32(aux)
