"""PyTorch twins of the jaxprvr PRVR models (official module names / state_dict keys) and official
checkpoint loaders/writers. See :mod:`torch_ref.checkpoints`.

Each twin takes a :class:`configs.base.ModelConfig` and offers ``encode_query(feats, mask)``,
``encode_video(clip, frames, mask, frame_len)``, ``score(query, video)`` and ``forward(batch, train)`` ->
``(scores, aux)`` with the Flax models' names. ``forward`` sets the module mode (``self.train(train)``); the
other methods use the current mode. Inputs may be numpy arrays or tensors; tensors follow the parameters'
device (CPU or CUDA).

MTM (:mod:`torch_ref.mtm`) builds the official ``mamba_ssm`` Mamba layers, so it is imported lazily: ``MODELS``
lists it by name (value ``None`` until first used), :func:`build_model` and ``torch_ref.MTM`` import it on demand.
"""

from torch_ref.gmmformer import GMMFormer
from torch_ref.gmmformer_v2 import GMMFormerV2
from torch_ref.ms_sl import MSSL

LAZY_MODELS = {"mtm": ("torch_ref.mtm", "MTM")}
MODELS = {"ms_sl": MSSL, "gmmformer": GMMFormer, "gmmformer_v2": GMMFormerV2, "mtm": None}


def model_class(name: str):
    """The twin class of ``name`` (importing a lazy one, e.g. MTM, on first use)."""
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
    if MODELS[name] is None:
        import importlib

        module, attr = LAZY_MODELS[name]
        MODELS[name] = getattr(importlib.import_module(module), attr)
    return MODELS[name]


def build_model(cfg):
    """The twin named ``cfg.name``."""
    return model_class(cfg.name)(cfg)


def __getattr__(name):  # torch_ref.MTM without importing torch_ref.mtm up front
    if name == "MTM":
        return model_class("mtm")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODELS", "MSSL", "GMMFormer", "GMMFormerV2", "MTM", "build_model", "model_class"]
