"""PRVR models (Flax linen), one file per family, shared blocks in :mod:`jaxprvr.models.layers`.

Every model is a ``nn.Module`` built from its family's config type (:mod:`jaxprvr.config`) with the methods

* ``encode_query(query_feats (Q,Lq,Dq), query_mask (Q,Lq), *, train) -> (Q, D)``
* ``encode_video(clip_feats (B,32,Dv), frame_feats (B,128,Dv), frame_mask (B,128), frame_len (B,), *, train)
  -> dict`` of the gallery-side arrays stored per video
* ``score(query (Q,D), video: dict) -> {"clip": (Q,V), "frame": (Q,V)[, "video": (Q,V)]}`` cosine scores
  used at test time (MTM's video score refines each query over all V videos given: the whole gallery)
* ``branch_weights() -> {branch: weight}`` the test-time weights of the fused score ``sum_k w_k scores[k]``
* ``__call__(batch, *, train) -> (scores, aux)`` the training forward; ``scores`` has ``clip``, ``clip_raw``,
  ``frame``, ``frame_raw``; ``aux`` the named intermediates.

``cfg.compute_dtype`` ("float32" | "bfloat16") sets the dtype of activations and matmuls; parameters are
float32 either way, and encoder outputs, scores and ``aux`` come back float32 (see :mod:`jaxprvr.models.layers`).

Call a method with ``model.apply(variables, ..., method="encode_query", rngs={"dropout": key})``.
"""

from __future__ import annotations

import flax.linen as nn

from jaxprvr import registry
from jaxprvr.config import ModelConfig
from jaxprvr.errors import JaxprvrError
from jaxprvr.models.layers import resolve_branch_impl, resolve_compute_dtype


def build_model(cfg: ModelConfig) -> nn.Module:
    """The Flax model of ``cfg.name`` (its registry row), built from its family's config type."""
    if cfg.name not in registry.FAMILIES:
        raise JaxprvrError("model.name", f"one of {list(registry.FAMILIES)}", repr(cfg.name))
    row = registry.get(cfg.name)
    if not isinstance(cfg, row.model_config):
        raise JaxprvrError("model config", f"a {row.model_config.__name__} for {cfg.name}", type(cfg).__name__)
    resolve_compute_dtype(cfg)  # an unknown model.compute_dtype fails here, not at the first trace
    resolve_branch_impl(cfg)  # and so does an unknown model.branch_impl
    return row.model_class()(cfg)


def __getattr__(name):  # jaxprvr.models.MTM etc. without importing every model file up front
    classes = {"MSSL": "ms_sl", "GMMFormer": "gmmformer", "GMMFormerV2": "gmmformer_v2", "MTM": "mtm"}
    if name in classes:
        return registry.get(classes[name]).model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_model"]
