"""GMMFormer v1 (huangmozhi9527/GMMFormer, ``GMMFormer_Net`` in ``src/Models/gmmformer/model.py:14-225``).

Query: LinearLayer -> positional encoding (30) -> v1 BertAttention -> masked attention pooling.
Clip: LinearLayer -> positional encoding -> GMMBlock -> GMMBlock (no mask) -> 32 clip vectors.
Frame: LinearLayer -> positional encoding -> GMMBlock -> GMMBlock (frame mask) -> masked attention pooling
(``modular_vector_mapping_2``) -> one vector per video.
A GMMBlock is four independent v1 BertAttention branches ``attn0..attn3`` with Gaussian widths
None / 0.5 / 1.0 / 5.0, averaged. The frame branch's Gaussian grid is built on the padded *batch* length
``L_b = max(frame_len)`` (official; ``cfg.gmm_fixed_length=True`` uses the fixed ``max_ctx_l``).

Parameter table (torch ``state_dict`` key -> Flax ``params`` path -> transform). ``{br}`` is one of
``query``, ``clip``, ``frame``; ``{enc}`` is ``clip_encoder``, ``clip_encoder_2``, ``frame_encoder_1`` or
``frame_encoder_2``; ``{k}`` is 0..3; ``{qkv}`` one of ``query``, ``key``, ``value``.

===================================================  ===================================================  =========
torch key                                            Flax path                                            transform
===================================================  ===================================================  =========
``{br}_input_proj.LayerNorm.{weight,bias}``          ``{br}_input_proj/LayerNorm/{scale,bias}``           none
``{br}_input_proj.net.1.weight``                     ``{br}_input_proj/net_1/kernel``                     transpose
``{br}_input_proj.net.1.bias``                       ``{br}_input_proj/net_1/bias``                       none
``{br}_pos_embed.position_embeddings.weight``        ``{br}_pos_embed/position_embeddings/embedding``     none
``{br}_pos_embed.LayerNorm.{weight,bias}``           ``{br}_pos_embed/LayerNorm/{scale,bias}``            none
``query_encoder.self.{qkv}.weight``                  ``query_encoder/self/{qkv}/kernel``                  transpose
``query_encoder.self.{qkv}.bias``                    ``query_encoder/self/{qkv}/bias``                    none
``query_encoder.output.dense.weight``                ``query_encoder/output/dense/kernel``                transpose
``query_encoder.output.dense.bias``                  ``query_encoder/output/dense/bias``                  none
``query_encoder.output.LayerNorm.{weight,bias}``     ``query_encoder/output/LayerNorm/{scale,bias}``      none
``{enc}.attn{k}.self.{qkv}.weight``                  ``{enc}/attn{k}/self/{qkv}/kernel``                  transpose
``{enc}.attn{k}.self.{qkv}.bias``                    ``{enc}/attn{k}/self/{qkv}/bias``                    none
``{enc}.attn{k}.output.dense.weight``                ``{enc}/attn{k}/output/dense/kernel``                transpose
``{enc}.attn{k}.output.dense.bias``                  ``{enc}/attn{k}/output/dense/bias``                  none
``{enc}.attn{k}.output.LayerNorm.{weight,bias}``     ``{enc}/attn{k}/output/LayerNorm/{scale,bias}``      none
``modular_vector_mapping.weight``                    ``modular_vector_mapping/kernel``                    transpose
``modular_vector_mapping_2.weight``                  ``modular_vector_mapping_2/kernel``                  transpose
===================================================  ===================================================  =========
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxprvr.config import ModelConfig
from jaxprvr.models.layers import (GMM_WIDTHS, BertAttention, GMMBlock, LinearLayer, QueryBranch,
                                   attention_pool, dense, l2_normalize,
                                   max_scores, resolve_branch_impl, to_dtype, to_float32)


def batch_frame_length(frame_len, frame_mask):
    """The official Gaussian grid length: the padded batch length = max frame count (>= 1).

    Videos whose mask is all zero (batch padding) do not count.
    """
    has_frames = jnp.any(frame_mask > 0, axis=-1)
    return jnp.maximum(jnp.max(jnp.where(has_frames, frame_len, 0)), 1).astype(jnp.int32)


class GMMFormer(QueryBranch, nn.Module):
    """GMMFormer v1 network. See the module docstring for names; methods as in :mod:`jaxprvr.models`."""

    cfg: ModelConfig
    widths: tuple = GMM_WIDTHS  # branch widths of every GMMBlock (official: None, 0.5, 1.0, 5.0)

    def setup(self):
        c = self.cfg
        d = c.hidden_size
        dt = self.compute_dtype  # validates cfg.compute_dtype
        batched = resolve_branch_impl(c)  # validates cfg.branch_impl
        self._setup_inputs(clip_rows=c.max_ctx_l)  # query/clip/frame positional encodings, query_input_proj
        self.query_encoder = BertAttention(d, c.n_heads, c.drop, dtype=dt)
        self.clip_input_proj = LinearLayer(d, layer_norm=True, dropout=c.input_drop, relu=True, dtype=dt)
        self.clip_encoder = GMMBlock(d, c.n_heads, c.drop, self.widths, dtype=dt, batched=batched)
        self.clip_encoder_2 = GMMBlock(d, c.n_heads, c.drop, self.widths, dtype=dt, batched=batched)
        self.frame_input_proj = LinearLayer(d, layer_norm=True, dropout=c.input_drop, relu=True, dtype=dt)
        self.frame_encoder_1 = GMMBlock(d, c.n_heads, c.drop, self.widths, dtype=dt, batched=batched)
        self.frame_encoder_2 = GMMBlock(d, c.n_heads, c.drop, self.widths, dtype=dt, batched=batched)
        self.modular_vector_mapping = dense(1, use_bias=False, dtype=dt)
        self.modular_vector_mapping_2 = dense(1, use_bias=False, dtype=dt)

    # ------------------------------------------------------------------ encoders
    def _encode_video(self, clip_feats, frame_feats, frame_mask, frame_len, train):
        """Encoders in the compute dtype; the returned ``video`` features are float32."""
        dt = self.compute_dtype
        clip_feats, frame_feats = to_dtype(clip_feats, dt), to_dtype(frame_feats, dt)
        clip_emb = self.clip_pos_embed(self.clip_input_proj(clip_feats, train=train), train=train)
        clips_1 = self.clip_encoder(clip_emb, None, train=train)
        clips = self.clip_encoder_2(clips_1, None, train=train)  # model.py:125-127
        # Gaussian grid length of the frame branch (model_components.py:225 uses the key length, i.e. the
        # padded batch length in the official collate); our frames are statically padded to max_ctx_l.
        gmm_length = None if self.cfg.gmm_fixed_length else batch_frame_length(frame_len, frame_mask)
        frame_emb = self.frame_pos_embed(self.frame_input_proj(frame_feats, train=train), train=train)
        frames_1 = self.frame_encoder_1(frame_emb, frame_mask, gmm_length=gmm_length, train=train)
        frames = self.frame_encoder_2(frames_1, frame_mask, gmm_length=gmm_length, train=train)
        video_vec = attention_pool(self.modular_vector_mapping_2(frames), frame_mask, frames)  # :169-179
        video = to_float32({"clip_feats": clips, "video_feats": video_vec})
        stages = {"clip_embed": clip_emb, "clip_feats_1": clips_1, "frame_embed": frame_emb,
                  "frame_feats_1": frames_1, "frame_feats": frames,
                  "gmm_length": jnp.asarray(frame_feats.shape[1] if gmm_length is None else gmm_length, jnp.int32)}
        return video, stages

    def encode_video(self, clip_feats, frame_feats, frame_mask, frame_len, *, train: bool = False):
        """Gallery side: ``{"clip_feats" (B,32,D), "video_feats" (B,D)}``."""
        return self._encode_video(clip_feats, frame_feats, frame_mask, frame_len, train)[0]

    # ------------------------------------------------------------------ scores
    def score(self, query, video):
        """Test-time cosine scores ``{"clip", "frame"}`` ``(Q, V)`` (model.py:206-225)."""
        qn = l2_normalize(query)
        clip, _ = max_scores(qn, l2_normalize(video["clip_feats"]))
        frame = qn @ l2_normalize(video["video_feats"]).T
        return {"clip": clip, "frame": frame}

    def __call__(self, batch, *, train: bool = False):
        """Training forward (model.py:81-108); all scores ``(Q, B)``.

        ``aux["query"]`` is the ``encode_query`` pass used for the scores, ``aux["query2"]`` the second,
        independent-dropout pass the official forward returns for the query-diverse loss (:106).
        """
        video, vstages = self._encode_video(batch["clip_feats"], batch["frame_feats"], batch["frame_mask"],
                                            batch["frame_len"], train)
        q, qstages = self._encode_query(batch["query_feats"], batch["query_mask"], train)
        q2 = self.encode_query(batch["query_feats"], batch["query_mask"], train=train)
        qn = l2_normalize(q)
        clips, video_vec = video["clip_feats"], video["video_feats"]
        clip, _ = max_scores(qn, l2_normalize(clips))
        clip_raw, _ = max_scores(q, clips)
        scores = {"clip": clip, "clip_raw": clip_raw,
                  "frame": qn @ l2_normalize(video_vec).T, "frame_raw": q @ video_vec.T}
        aux = {"query": q, "query2": q2, **qstages, **vstages, "clip_feats": clips, "video_feats": video_vec}
        return to_float32(scores), to_float32(aux)
