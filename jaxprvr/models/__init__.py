"""PRVR models (Flax linen), one file per family, shared blocks in :mod:`jaxprvr.models.layers`.

Every model is a ``nn.Module`` built from a :class:`configs.base.ModelConfig` with the methods

* ``encode_query(query_feats (Q,Lq,Dq), query_mask (Q,Lq), *, train) -> (Q, D)``
* ``encode_video(clip_feats (B,32,Dv), frame_feats (B,128,Dv), frame_mask (B,128), frame_len (B,), *, train)
  -> dict`` of the gallery-side arrays stored per video
* ``score(query (Q,D), video: dict) -> {"clip": (Q,V), "frame": (Q,V)[, "video": (Q,V)]}`` cosine scores
  used at test time (MTM's video score refines each query over all V videos given: the whole gallery)
* ``__call__(batch, *, train) -> (scores, aux)`` the training forward; ``scores`` has ``clip``, ``clip_raw``,
  ``frame``, ``frame_raw``; ``aux`` the named intermediates.

``cfg.compute_dtype`` ("float32" | "bfloat16") sets the dtype of activations and matmuls; parameters are
float32 either way, and encoder outputs, scores and ``aux`` come back float32 (see :mod:`jaxprvr.models.layers`).

Call a method with ``model.apply(variables, ..., method="encode_query", rngs={"dropout": key})``.
"""

from __future__ import annotations

import flax.linen as nn

from configs.base import ModelConfig
from jaxprvr.errors import JaxprvrError
from jaxprvr.models.gmmformer import GMMFormer
from jaxprvr.models.gmmformer_v2 import GMMFormerV2
from jaxprvr.models.layers import resolve_branch_impl, resolve_compute_dtype
from jaxprvr.models.ms_sl import MSSL
from jaxprvr.models.mtm import MTM

MODELS = {"ms_sl": MSSL, "gmmformer": GMMFormer, "gmmformer_v2": GMMFormerV2, "mtm": MTM}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named ``cfg.name``."""
    if cfg.name not in MODELS:
        raise JaxprvrError("model.name", f"one of {sorted(MODELS)}", repr(cfg.name))
    resolve_compute_dtype(cfg)  # an unknown model.compute_dtype fails here, not at the first trace
    resolve_branch_impl(cfg)  # and so does an unknown model.branch_impl
    return MODELS[cfg.name](cfg)


def branch_weights(cfg: ModelConfig) -> dict[str, float]:
    """Test-time weights of the fused score ``sum_k w_k * scores[k]`` (MTM adds its video branch)."""
    weights = {"clip": cfg.clip_scale_w, "frame": cfg.frame_scale_w}
    if cfg.name == "mtm":
        weights["video"] = cfg.video_scale_w
    return weights


__all__ = ["MODELS", "MSSL", "GMMFormer", "GMMFormerV2", "MTM", "build_model", "branch_weights"]
