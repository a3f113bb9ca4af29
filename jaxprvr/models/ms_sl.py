"""MS-SL (HuiGuanLab/ms-sl, ``MS_SL_Net`` in ``method/model.py:12-375``).

Query: LinearLayer -> positional encoding (30) -> v1 BertAttention -> masked attention pooling.
Clip: LinearLayer -> positional encoding -> v1 BertAttention (no mask) -> 528 multi-scale proposals
(window means of size 1..32, concatenated window 1 first, ``encode_feat_map`` :141-152).
Frame: LinearLayer -> positional encoding -> v1 BertAttention (frame mask).
Frame-scale scores use key-clip guided attention (``mapping_linear``) on the frames, guided by the
proposal with the highest cosine to the query (the query's own video in training, every video at test).

Parameter table (torch ``state_dict`` key -> Flax ``params`` path -> transform). ``{br}`` is one of
``query``, ``clip``, ``frame``; ``{qkv}`` one of ``query``, ``key``, ``value``; ``{w,b}`` the torch
``weight``/``bias``.

==================================================  ==================================================  =========
torch key                                           Flax path                                           transform
==================================================  ==================================================  =========
``{br}_input_proj.LayerNorm.weight``                ``{br}_input_proj/LayerNorm/scale``                 none
``{br}_input_proj.LayerNorm.bias``                  ``{br}_input_proj/LayerNorm/bias``                  none
``{br}_input_proj.net.1.weight``                    ``{br}_input_proj/net_1/kernel``                    transpose
``{br}_input_proj.net.1.bias``                      ``{br}_input_proj/net_1/bias``                      none
``{br}_pos_embed.position_embeddings.weight``       ``{br}_pos_embed/position_embeddings/embedding``    none
``{br}_pos_embed.LayerNorm.{weight,bias}``          ``{br}_pos_embed/LayerNorm/{scale,bias}``           none
``{br}_encoder.self.{qkv}.weight``                  ``{br}_encoder/self/{qkv}/kernel``                  transpose
``{br}_encoder.self.{qkv}.bias``                    ``{br}_encoder/self/{qkv}/bias``                    none
``{br}_encoder.output.dense.weight``                ``{br}_encoder/output/dense/kernel``                transpose
``{br}_encoder.output.dense.bias``                  ``{br}_encoder/output/dense/bias``                  none
``{br}_encoder.output.LayerNorm.{weight,bias}``     ``{br}_encoder/output/LayerNorm/{scale,bias}``      none
``modular_vector_mapping.weight``                   ``modular_vector_mapping/kernel``                   transpose
``mapping_linear.{0,1}.weight``                     ``mapping_linear_{0,1}/kernel``                     transpose
==================================================  ==================================================  =========

Parameter-free torch modules (``pool_layers``, the NCE criteria, dropouts) have no Flax counterpart.
Note ``clip_pos_embed`` has ``max_ctx_l`` (128) rows although only the first 32 are used (as official).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr.config import ModelConfig
from jaxprvr.models.layers import (BertAttention, LinearLayer, QueryBranch,
                                   dense, l2_normalize, max_scores, to_dtype, to_float32, to_stat)

KEY_CLIP_MASK_FILL = -1e9  # masked_fill value of key_clip_guided_attention (model.py:220, :238)


@functools.lru_cache(maxsize=None)
def proposal_windows(map_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(window size k, start s) of every proposal, in the official concatenated order (k = 1 first).

    ``pool_layers = [Identity] + [AvgPool1d(k, stride=1) for k in 2..map_size]`` (model.py:43-45) concatenated
    along time (:141-152): proposal ``p`` is ``mean(x[s:s+k])``. ``map_size * (map_size + 1) / 2`` in all.
    """
    ks, ss = [], []
    for k in range(1, map_size + 1):
        ks.extend([k] * (map_size - k + 1))
        ss.extend(range(map_size - k + 1))
    return np.asarray(ks, np.int32), np.asarray(ss, np.int32)


@functools.lru_cache(maxsize=None)
def _window_indicator(map_size: int) -> np.ndarray:
    ks, ss = proposal_windows(map_size)
    t = np.arange(map_size)
    return ((t[None, :] >= ss[:, None]) & (t[None, :] < (ss + ks)[:, None])).astype(np.float32)  # (P, T)


def encode_feat_map(x):
    """The 528 multi-scale proposals ``(B, P, D)`` from encoded clips ``(B, T, D)``: window sums / k."""
    t = x.shape[1]
    ks, _ = proposal_windows(t)
    sums = jnp.einsum("pt,btd->bpd", jnp.asarray(_window_indicator(t), x.dtype), x)
    return sums / jnp.asarray(ks, x.dtype)[None, :, None]  # AvgPool1d: sum then divide by k


def key_clip_attention_train(key, value, proposals, frame_mask, key_clip_index, labels):
    """Training key-clip guided attention (``key_clip_guided_attention``, model.py:206-227).

    For query i: ``p* = key_clip_index[i, labels[i]]``, ``alpha = softmax_t(key_{y(i),t} . proposal_{y(i),p*})``
    (no 1/sqrt(d) scaling, raw proposal, masked_fill -1e9), ``f_i = sum_t alpha_t value_{y(i),t}``.

    Args:
      key, value: ``(B, L, D)`` = ``mapping_linear[0/1](frames)``.
      proposals: ``(B, P, D)`` unnormalised; frame_mask ``(B, L)``; key_clip_index ``(Q, B)``; labels ``(Q,)``.
    Returns ``(Q, D)``.
    """
    q_idx = jnp.arange(labels.shape[0])
    selected = key_clip_index[q_idx, labels]  # (Q,)
    guide = proposals[labels, selected]  # (Q, D)
    scores = jnp.einsum("qld,qd->ql", key[labels], guide)
    scores = jnp.where(frame_mask[labels] == 0, KEY_CLIP_MASK_FILL, scores)
    att = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("ql,qld->qd", att, value[labels])


def key_clip_attention_inference(key, value, proposals, frame_mask, key_clip_index):
    """Inference key-clip guided attention for every (video, query) pair (model.py:229-246).

    Args as :func:`key_clip_attention_train`, ``key_clip_index`` ``(Q, V)``. Returns ``(V, Q, D)``.
    """
    guide = jnp.take_along_axis(proposals, key_clip_index.T[:, :, None], axis=1)  # (V, Q, D)
    scores = jnp.einsum("vld,vqd->vlq", key, guide)
    scores = jnp.where(frame_mask[:, :, None] == 0, KEY_CLIP_MASK_FILL, scores)
    att = jax.nn.softmax(scores, axis=1)  # over frames
    return jnp.einsum("vlq,vld->vqd", att, value)


class MSSL(QueryBranch, nn.Module):
    """MS-SL network. See the module docstring for names; methods as in :mod:`jaxprvr.models`."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        d = c.hidden_size
        dt = self.compute_dtype  # validates cfg.compute_dtype
        self._setup_inputs(clip_rows=c.max_ctx_l)  # query/clip/frame positional encodings, query_input_proj
        self.query_encoder = BertAttention(d, c.n_heads, c.drop, dtype=dt)
        self.clip_input_proj = LinearLayer(d, layer_norm=True, dropout=c.input_drop, relu=True, dtype=dt)
        self.clip_encoder = BertAttention(d, c.n_heads, c.drop, dtype=dt)  # deepcopy of query_encoder, re-initialised
        self.frame_input_proj = LinearLayer(d, layer_norm=True, dropout=c.input_drop, relu=True, dtype=dt)
        self.frame_encoder = BertAttention(d, c.n_heads, c.drop, dtype=dt)
        self.modular_vector_mapping = dense(1, use_bias=False, dtype=dt)
        self.mapping_linear = [dense(d, use_bias=False, dtype=dt) for _ in range(2)]

    def _mapped(self, frames):
        """``mapping_linear[0/1](frames)`` (the key-clip attention's keys and values), as float32."""
        return to_stat(self.mapping_linear[0](frames)), to_stat(self.mapping_linear[1](frames))

    # ------------------------------------------------------------------ encoders
    def _encode_video(self, clip_feats, frame_feats, frame_mask, train):
        """Encoders in the compute dtype; the returned features are float32 (the proposals are window means
        of the float32 clip features)."""
        dt = self.compute_dtype
        clip_feats, frame_feats = to_dtype(clip_feats, dt), to_dtype(frame_feats, dt)
        clip_emb = self.clip_pos_embed(self.clip_input_proj(clip_feats, train=train), train=train)
        clips = to_stat(self.clip_encoder(clip_emb, None, train=train))
        frame_emb = self.frame_pos_embed(self.frame_input_proj(frame_feats, train=train), train=train)
        frames = to_stat(self.frame_encoder(frame_emb, frame_mask, train=train))
        proposals = encode_feat_map(clips)
        video = {"proposals": proposals, "frame_feats": frames, "frame_mask": frame_mask}
        return video, {"clip_embed": clip_emb, "clip_feats": clips, "frame_embed": frame_emb}

    def encode_video(self, clip_feats, frame_feats, frame_mask, frame_len, *, train: bool = False):
        """Gallery side: ``{"proposals" (B,528,D), "frame_feats" (B,L,D), "frame_mask" (B,L)}``.

        ``frame_len`` is unused (MS-SL has no length-dependent part); kept for a uniform API.
        """
        del frame_len
        return self._encode_video(clip_feats, frame_feats, frame_mask, train)[0]

    # ------------------------------------------------------------------ scores
    def score(self, query, video):
        """Test-time cosine scores ``{"clip", "frame"}`` of shape ``(Q, V)`` (model.py:250-280)."""
        qn = l2_normalize(query)
        clip, key_clip_index = max_scores(qn, l2_normalize(video["proposals"]))
        frames = video["frame_feats"]
        feats = key_clip_attention_inference(*self._mapped(frames), video["proposals"], video["frame_mask"],
                                             key_clip_index)
        frame = jnp.einsum("vqd,qd->qv", l2_normalize(feats), qn)
        return {"clip": clip, "frame": frame}

    def __call__(self, batch, *, train: bool = False):
        """Training forward (model.py:81-90, :250-272).

        scores: ``clip``/``clip_raw`` ``(Q, B)``; ``frame``/``frame_raw`` ``(Q, Q)`` with the positive on the
        diagonal (row i: query i; column j: the key-clip attended feature of query j in its own video).
        """
        video, vstages = self._encode_video(batch["clip_feats"], batch["frame_feats"], batch["frame_mask"], train)
        q, qstages = self._encode_query(batch["query_feats"], batch["query_mask"], train)
        labels = batch["query_labels"]
        proposals, frames = video["proposals"], video["frame_feats"]
        qn = l2_normalize(q)
        clip, key_clip_index = max_scores(qn, l2_normalize(proposals))
        clip_raw, _ = max_scores(q, proposals)
        feats = key_clip_attention_train(*self._mapped(frames), proposals, video["frame_mask"], key_clip_index,
                                         labels)
        frame = qn @ l2_normalize(feats).T
        frame_raw = q @ feats.T
        scores = {"clip": clip, "clip_raw": clip_raw, "frame": frame, "frame_raw": frame_raw}
        aux = {"query": q, **qstages, **vstages, "proposals": proposals, "frame_feats": frames,
               "key_clip_index": key_clip_index,
               "key_clip_selected": key_clip_index[jnp.arange(labels.shape[0]), labels],
               "frame_scale_feat": feats}
        return to_float32(scores), to_float32(aux)
