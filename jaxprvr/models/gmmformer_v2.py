"""GMMFormer v2 (huangmozhi9527/GMMFormer_v2, ``GMMFormerV2_Net`` in ``src/Models/gmmformerV2/model.py:14-233``).

Query: LinearLayer -> positional encoding (30) -> v2 BertAttention (4xFFN) -> masked attention pooling.
Clip: LinearLayer -> positional encoding -> DyGMMBlock(frame_len=32, no mask) -> 32 clip vectors.
Frame: pad to 128 -> LinearLayer -> positional encoding -> DyGMMBlock(frame_len=128, frame mask) -> padded
rows zeroed -> 128 frame vectors. The frame score is the max cosine over all 128 rows, the zeroed padding
(cosine 0) included. ``weight_token`` (1, 1, D) ~ N(0, 1) is one model-level parameter shared by both blocks.

Parameter table (torch ``state_dict`` key -> Flax ``params`` path -> transform). ``{br}`` is one of
``query``, ``clip``, ``frame``; ``{blk}`` is ``clip_encoder`` or ``frame_encoder_1``; ``{k}`` is 0..7;
``{qkv}`` one of ``query``, ``key``, ``value``; ``{A}`` is ``query_encoder``, ``{blk}.attn{k}`` or
``{blk}.ca`` (Flax: ``.`` -> ``/``).

===================================================  ===================================================  =========
torch key                                            Flax path                                            transform
===================================================  ===================================================  =========
``{br}_input_proj.LayerNorm.{weight,bias}``          ``{br}_input_proj/LayerNorm/{scale,bias}``           none
``{br}_input_proj.net.1.weight``                     ``{br}_input_proj/net_1/kernel``                     transpose
``{br}_input_proj.net.1.bias``                       ``{br}_input_proj/net_1/bias``                       none
``{br}_pos_embed.position_embeddings.weight``        ``{br}_pos_embed/position_embeddings/embedding``     none
``{br}_pos_embed.LayerNorm.{weight,bias}``           ``{br}_pos_embed/LayerNorm/{scale,bias}``            none
``{A}.self.{qkv}.weight``                            ``{A}/self/{qkv}/kernel``                            transpose
``{A}.self.{qkv}.bias``                              ``{A}/self/{qkv}/bias``                              none
``{A}.output.layer{1,2}.weight``                     ``{A}/output/layer{1,2}/kernel``                     transpose
``{A}.output.layer{1,2}.bias``                       ``{A}/output/layer{1,2}/bias``                       none
``{A}.norm{1,2}.weight``                             ``{A}/norm{1,2}/scale``                              none
``{A}.norm{1,2}.bias``                               ``{A}/norm{1,2}/bias``                               none
``{blk}.layer{1,2}.weight``                          ``{blk}/layer{1,2}/kernel``                          transpose
``{blk}.layer{1,2}.bias``                            ``{blk}/layer{1,2}/bias``                            none
``modular_vector_mapping.weight``                    ``modular_vector_mapping/kernel``                    transpose
``weight_token``                                     ``weight_token``                                     none
===================================================  ===================================================  =========

``{blk}.layer2`` maps to ``frame_len`` outputs (32 for ``clip_encoder``, 128 for ``frame_encoder_1``).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxprvr.config import ModelConfig
from jaxprvr.models.layers import (DYGMM_WIDTHS, BertAttentionV2, DyGMMBlock, LinearLayer, QueryBranch,
                                   clip_frame_scores,
                                   dense, l2_normalize, max_scores, resolve_branch_impl, to_dtype,
                                   to_float32)


class GMMFormerV2(QueryBranch, nn.Module):
    """GMMFormer v2 network. See the module docstring for names; methods as in :mod:`jaxprvr.models`."""

    cfg: ModelConfig
    widths: tuple = DYGMM_WIDTHS  # branch widths of both DyGMMBlocks, code order (MTM: layers.MTM_WIDTHS)

    def setup(self):
        c = self.cfg
        d = c.hidden_size
        dt = self.compute_dtype  # validates cfg.compute_dtype
        batched = resolve_branch_impl(c)  # validates cfg.branch_impl
        self._setup_inputs(clip_rows=c.max_ctx_l)  # query/clip/frame positional encodings, query_input_proj
        self.query_encoder = BertAttentionV2(d, c.n_heads, c.drop, dtype=dt)
        self.clip_input_proj = LinearLayer(d, layer_norm=True, dropout=c.input_drop, relu=True, dtype=dt)
        # frame_len=32 / 128 are literals in the official code (model.py:37, :43) = map_size / max_ctx_l.
        self.clip_encoder = DyGMMBlock(d, c.n_heads, c.map_size, c.sft_factor, c.drop, self.widths, dtype=dt,
                                       batched=batched)
        self.frame_input_proj = LinearLayer(d, layer_norm=True, dropout=c.input_drop, relu=True, dtype=dt)
        self.frame_encoder_1 = DyGMMBlock(d, c.n_heads, c.max_ctx_l, c.sft_factor, c.drop, self.widths, dtype=dt,
                                          batched=batched)
        self.modular_vector_mapping = dense(1, use_bias=False, dtype=dt)
        # torch.randn(1, 1, D), not touched by reset_parameters (model.py:47).
        self.weight_token = self.param("weight_token", nn.initializers.normal(stddev=1.0), (1, 1, d))

    # ------------------------------------------------------------------ encoders
    def _encode_video(self, clip_feats, frame_feats, frame_mask, train):
        """Encoders in the compute dtype; the returned ``video`` features are float32."""
        dt = self.compute_dtype
        clip_feats, frame_feats = to_dtype(clip_feats, dt), to_dtype(frame_feats, dt)
        clip_emb = self.clip_pos_embed(self.clip_input_proj(clip_feats, train=train), train=train)
        clips = self.clip_encoder(clip_emb, None, self.weight_token, train=train)
        fix = self.cfg.max_ctx_l - frame_feats.shape[1]
        if fix > 0:  # model.py:138-145: zero features and zero mask up to 128
            frame_feats = jnp.pad(frame_feats, ((0, 0), (0, fix), (0, 0)))
            frame_mask = jnp.pad(frame_mask, ((0, 0), (0, fix)))
        frame_emb = self.frame_pos_embed(self.frame_input_proj(frame_feats, train=train), train=train)
        frames = self.frame_encoder_1(frame_emb, frame_mask, self.weight_token, train=train)
        frames = jnp.where(frame_mask[..., None] == 1.0, frames, 0.0)  # model.py:150-151
        video = to_float32({"clip_feats": clips, "frame_feats": frames})
        return video, {"clip_embed": clip_emb, "frame_embed": frame_emb}

    def encode_video(self, clip_feats, frame_feats, frame_mask, frame_len, *, train: bool = False):
        """Gallery side: ``{"clip_feats" (B,32,D), "frame_feats" (B,128,D)}`` (``frame_len`` unused)."""
        del frame_len
        return self._encode_video(clip_feats, frame_feats, frame_mask, train)[0]

    # ------------------------------------------------------------------ scores
    def score(self, query, video):
        """Test-time cosine scores ``{"clip", "frame"}`` ``(Q, V)`` (model.py:213-233)."""
        qn = l2_normalize(query)
        clip, _ = max_scores(qn, l2_normalize(video["clip_feats"]))
        frame, _ = max_scores(qn, l2_normalize(video["frame_feats"]))
        return {"clip": clip, "frame": frame}

    def __call__(self, batch, *, train: bool = False):
        """Training forward (model.py:75-119); all scores ``(Q, B)``.

        ``aux["query2"]`` is the second, independent-dropout ``encode_query`` pass used by the query-diverse
        and optimal-matching losses (:100); the matching itself is the loss's business.
        """
        video, vstages = self._encode_video(batch["clip_feats"], batch["frame_feats"], batch["frame_mask"], train)
        q, qstages = self._encode_query(batch["query_feats"], batch["query_mask"], train)
        q2 = self.encode_query(batch["query_feats"], batch["query_mask"], train=train)
        clips, frames = video["clip_feats"], video["frame_feats"]
        scores = clip_frame_scores(q, clips, frames)
        aux = {"query": q, "query2": q2, **qstages, **vstages, "clip_feats": clips, "frame_feats": frames}
        return to_float32(scores), to_float32(aux)
