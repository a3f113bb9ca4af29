"""BackBone_tvr's text-video retrieval model: CLIP towers -> seqTransf -> WTI (DRL's weighted token interaction).

Official: shallowdream66/BackBone_tvr ``backbone_tvr/tvr/models/modeling.py`` (``BackBone_tvr``), ``module_cross.py``
(the seqTransf ``Transformer``), ``until_module.py`` (TF-style ``LayerNorm``, ``CrossEn``).

- Text (``get_text_feat`` L215-226): CLIP's text tower on ``max_words`` ids; every token projected (``[B, L, D]``),
  float32.
- Video (``get_video_feat`` L228-244, ``agg_video_feat`` L246-274): the image tower's class-token embedding of every
  frame ``[B, T, D]``; ``seqTransf``: ``x = f + frame_position_embeddings[:T]``, ``num_hidden_layers`` CLIP-style
  blocks with TF LayerNorm (eps 1e-12, ``until_module.py`` L42-55) and the additive mask ``(1 - mask) * -1e6`` on
  padded **keys** (L267, ``module_cross.py`` L39), then ``x + f``. ``agg_module = "None"`` skips it.
- WTI (``get_similarity_logits`` L167-195, :func:`wti_logits`).
- Initialisation (L85-129): Linear and Embedding weights N(0, 0.02), biases 0; CLIP from its weights; then
  ``frame_position_embeddings`` <- CLIP's text ``positional_embedding`` and seqTransf block ``i`` <- CLIP text block
  ``i`` (:func:`init_from_clip`).

Parameters: ``clip/{visual, text, logit_scale}`` (:mod:`jaxprvr.models.clip`), ``frame_position_embeddings/embedding``,
``transformerClip/resblocks_i``, ``text_weight_fc/{fc_0, fc_2}``, ``video_weight_fc/{fc_0, fc_2}``.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.models.clip import CLIP, PRECISIONS, CLIPDims, Transformer

F32 = jnp.float32
TF_LN_EPS = 1e-12  # until_module.LayerNorm
VIDEO_MASK_FILL = -1000000.0  # modeling.py L267
WEIGHT_MASK_FILL = -9e15  # modeling.py L170, L174
AGG_MODULES = ("seqTransf", "None")


def clip_dims(cfg) -> CLIPDims:
    """The CLIP sizes of a :class:`~jaxprvr.config.ClipWTIConfig`."""
    return CLIPDims(embed_dim=cfg.embed_dim, image_resolution=cfg.image_resolution, vision_layers=cfg.vision_layers,
                    vision_width=cfg.vision_width, vision_patch_size=cfg.vision_patch_size,
                    context_length=cfg.context_length, vocab_size=cfg.vocab_size, text_width=cfg.text_width,
                    text_layers=cfg.text_layers, vision_heads=cfg.vision_heads,
                    text_heads=cfg.text_heads).validate("model (CLIP sizes)")


def with_clip_dims(cfg, dims: CLIPDims, where: str = "model.clip"):
    """``cfg`` with the CLIP sizes of ``dims`` (the weights decide, as ``modeling.py`` L48-60 does)."""
    return dataclasses.replace(cfg, embed_dim=dims.embed_dim, image_resolution=dims.image_resolution,
                               vision_layers=dims.vision_layers, vision_width=dims.vision_width,
                               vision_patch_size=dims.vision_patch_size, context_length=dims.context_length,
                               vocab_size=dims.vocab_size, text_width=dims.text_width, text_layers=dims.text_layers,
                               vision_heads=dims.vision_heads, text_heads=dims.text_heads)


def wti_logits(text_feat, text_mask, video_feat, video_mask, text_weight_logits, video_weight_logits):
    """``get_similarity_logits`` (L167-195): ``(A, B)`` cosine-scale logits of A texts x B videos.

    ``wt = softmax_t(fill(w_t, mask 0 -> -9e15))``, the same for frames; features L2-normalised by their norm (no
    eps, as ``x / x.norm()``); ``S[a,b,t,v] = <t_a,t / ||.||, v_b,v / ||.||> * mt[a,t] * mv[b,v]`` (masked entries 0,
    not -inf: the maxima include them); ``t2v = sum_t wt max_v S``, ``v2t = sum_v wv max_t S``; ``(t2v + v2t) / 2``.
    Computed in float32 (float64 for float64 inputs)."""
    dt = jnp.float64 if text_feat.dtype == jnp.float64 else F32
    t, v = text_feat.astype(dt), video_feat.astype(dt)
    tm, vm = text_mask.astype(dt), video_mask.astype(dt)
    wt = jax.nn.softmax(jnp.where(tm > 0, text_weight_logits.astype(dt), WEIGHT_MASK_FILL), axis=-1)
    wv = jax.nn.softmax(jnp.where(vm > 0, video_weight_logits.astype(dt), WEIGHT_MASK_FILL), axis=-1)
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    s = jnp.einsum("atd,bvd->abtv", t, v) * tm[:, None, :, None] * vm[None, :, None, :]
    t2v = jnp.einsum("abt,at->ab", s.max(axis=-1), wt)
    v2t = jnp.einsum("abv,bv->ab", s.max(axis=-2), wv)
    return (t2v + v2t) / 2.0


def symmetric_ce(logits, logit_scale):
    """``(CrossEn(s L) + CrossEn(s L^T)) / 2`` with ``s = exp(logit_scale)`` (L155-159; ``CrossEn``: the mean of
    ``-log_softmax(rows)`` at the diagonal)."""
    m = logits * jnp.exp(logit_scale).astype(logits.dtype)

    def ce(x):
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(x, axis=-1)))

    return (ce(m) + ce(m.T)) / 2.0


class WeightMLP(nn.Module):
    """``nn.Sequential(Linear(W, W), ReLU, Linear(W, 1))`` -> ``(..., )`` logits (``.squeeze(2)``)."""

    width: int

    @nn.compact
    def __call__(self, x):
        init = dict(kernel_init=nn.initializers.normal(0.02), bias_init=nn.initializers.zeros, param_dtype=F32)
        h = nn.relu(nn.Dense(self.width, name="fc_0", dtype=x.dtype, **init)(x))
        return nn.Dense(1, name="fc_2", dtype=x.dtype, **init)(h)[..., 0]


class ClipWTI(nn.Module):
    """``forward(text_ids [B, L], text_mask [B, L], video [B, T, 3, R, R] float, video_mask [B, T]) -> ({"logits"
    (B, B) text x video, "logit_scale"}, aux {"text_feat", "video_feat", "frame_feat"})``; ``__call__(batch)`` is
    the same on a dict batch."""

    cfg: object

    def setup(self):
        c = self.cfg
        if c.agg_module not in AGG_MODULES:
            raise JaxprvrError("model.agg_module", f"one of {AGG_MODULES}", repr(c.agg_module))
        if c.precision not in PRECISIONS:
            raise JaxprvrError("model.precision", f"one of {sorted(PRECISIONS)}", repr(c.precision))
        dims = clip_dims(c)
        if dims.text_width != dims.embed_dim:
            raise JaxprvrError("model", "text_width == embed_dim (the head runs on projected features at the text "
                               "width, modeling.py L81-98)", f"{dims.text_width} vs {dims.embed_dim}")
        self.dims = dims
        self.clip = CLIP(dims, c.precision, c.remat, logit_scale_init=1.0)  # module_clip.py: torch.ones([])
        w = dims.text_width
        if c.agg_module == "seqTransf":
            self.frame_position_embeddings = nn.Embed(dims.context_length, w,
                                                      embedding_init=nn.initializers.normal(0.02), param_dtype=F32)
            self.transformerClip = Transformer(w, c.num_hidden_layers, dims.t_heads, ln_eps=TF_LN_EPS,
                                               dtype=PRECISIONS[c.precision], remat=c.remat, init="bert")
        self.text_weight_fc = WeightMLP(w)
        self.video_weight_fc = WeightMLP(w)

    def text_features(self, ids):
        """``[B, L, D]``: every token after ``ln_final @ text_projection``, float32."""
        out = self.clip.encode_text(ids)["tokens"]
        return out if out.dtype == jnp.float64 else out.astype(F32)

    def frame_features(self, video):
        """``[B, T, D]``: the class-token embedding of every frame, float32."""
        b, t = video.shape[:2]
        emb = self.clip.encode_image(video.reshape((b * t,) + video.shape[2:]))["embeds"]
        emb = emb if emb.dtype == jnp.float64 else emb.astype(F32)
        return emb.reshape(b, t, -1)

    def aggregate(self, frames, video_mask):
        """``agg_video_feat``: seqTransf over the frames with padded keys masked, plus the residual."""
        if self.cfg.agg_module == "None":
            return frames
        t = frames.shape[1]
        x = frames + self.frame_position_embeddings(jnp.arange(t))[None].astype(frames.dtype)
        bias = ((1.0 - video_mask.astype(frames.dtype)) * VIDEO_MASK_FILL)[:, None, None, :]  # (B, 1, 1, T): keys
        x = self.transformerClip(x.astype(PRECISIONS[self.cfg.precision]), bias=bias)
        return x.astype(frames.dtype) + frames

    def video_features(self, video, video_mask):
        return self.aggregate(self.frame_features(video), video_mask)

    def similarity(self, text_feat, text_mask, video_feat, video_mask):
        """WTI logits ``(A, B)`` of feature blocks (the evaluator calls it per block pair, like ``_run_on_single_gpu``)."""
        return wti_logits(text_feat, text_mask, video_feat, video_mask, self.text_weight_fc(text_feat),
                          self.video_weight_fc(video_feat))

    def __call__(self, batch, train: bool = False):
        """The task's call: ``batch`` holds ``text_ids``, ``text_mask``, ``video``, ``video_mask`` (no dropout
        anywhere in the official model, so ``train`` changes nothing)."""
        del train
        return self.forward(batch["text_ids"], batch["text_mask"], batch["video"], batch["video_mask"])

    def forward(self, text_ids, text_mask, video, video_mask):
        text_feat = self.text_features(text_ids)
        frames = self.frame_features(video)
        video_feat = self.aggregate(frames, video_mask)
        logits = self.similarity(text_feat, text_mask, video_feat, video_mask)
        return ({"logits": logits, "logit_scale": self.clip.logit_scale},
                {"text_feat": text_feat, "video_feat": video_feat, "frame_feat": frames})


def init_from_clip(params: dict, num_hidden_layers: int) -> dict:
    """BackBone_tvr's initialisation trick (L107-128), on a parameter tree whose ``clip`` holds the loaded CLIP:
    ``frame_position_embeddings`` <- the text ``positional_embedding``; seqTransf block ``i`` <- text block ``i``
    for ``i < num_hidden_layers`` (cut from the beginning; blocks beyond CLIP's text depth keep their init)."""
    out = dict(params)

    def copy(a):  # own buffers (``val.clone()``): the train state donates them, an alias would be donated twice
        return a.copy() if isinstance(a, np.ndarray) else jnp.array(a, copy=True)

    if "frame_position_embeddings" in params:
        out["frame_position_embeddings"] = {"embedding": copy(params["clip"]["text"]["positional_embedding"])}
    if "transformerClip" in params:
        text = params["clip"]["text"]["transformer"]
        blocks = dict(params["transformerClip"])
        for i in range(num_hidden_layers):
            if f"resblocks_{i}" in text:
                blocks[f"resblocks_{i}"] = jax.tree.map(copy, text[f"resblocks_{i}"])
        out["transformerClip"] = blocks
    return out


def clamp_logit_scale(params: dict, max_value: float = math.log(100.0)) -> dict:
    """``torch.clamp_(logit_scale, max=ln 100)`` after each step (``main_retrieval.py`` L262-268)."""
    out = dict(params)
    clip = dict(out["clip"])
    clip["logit_scale"] = jnp.minimum(clip["logit_scale"], jnp.asarray(max_value, clip["logit_scale"].dtype))
    out["clip"] = clip
    return out


__all__ = ["ClipWTI", "WeightMLP", "wti_logits", "symmetric_ce", "init_from_clip", "clamp_logit_scale", "clip_dims",
           "with_clip_dims", "TF_LN_EPS", "VIDEO_MASK_FILL", "WEIGHT_MASK_FILL", "AGG_MODULES"]
