"""PyTorch twins of the jaxprvr PRVR models (official module names / state_dict keys) and official
checkpoint loaders/writers. See :mod:`torch_ref.checkpoints`.

Each twin takes its family's model config (:mod:`jaxprvr.config`) and offers ``encode_query(feats, mask)``,
``encode_video(clip, frames, mask, frame_len)``, ``score(query, video)`` and ``forward(batch, train)`` ->
``(scores, aux)`` with the Flax models' names. ``forward`` sets the module mode (``self.train(train)``); the
other methods use the current mode. Inputs may be numpy arrays or tensors; tensors follow the parameters'
device (CPU or CUDA).

The twin classes are named by the family registry (:mod:`jaxprvr.registry`, ``Family.twin``) and imported on
first use: MTM's (:mod:`torch_ref.mtm`) builds the official ``mamba_ssm`` Mamba layers.
"""

from jaxprvr import registry


def model_class(name: str):
    """The twin class of ``name`` (imported on first use)."""
    return registry.get(name).twin_class()


def build_model(cfg):
    """The twin named ``cfg.name``."""
    return model_class(cfg.name)(cfg)


def __getattr__(name):  # torch_ref.MSSL etc. without importing every twin up front
    classes = {"MSSL": "ms_sl", "GMMFormer": "gmmformer", "GMMFormerV2": "gmmformer_v2", "MTM": "mtm"}
    if name in classes:
        return model_class(classes[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_model", "model_class"]
