"""PyTorch twins of the jaxprvr PRVR models (official module names / state_dict keys) and official
checkpoint loaders/writers. See :mod:`torch_ref.checkpoints`.

Each twin takes a :class:`configs.base.ModelConfig` and offers ``encode_query(feats, mask)``,
``encode_video(clip, frames, mask, frame_len)``, ``score(query, video)`` and ``forward(batch, train)`` ->
``(scores, aux)`` with the Flax models' names. ``forward`` sets the module mode (``self.train(train)``); the
other methods use the current mode. Inputs may be numpy arrays or tensors; tensors follow the parameters'
device (CPU or CUDA).
"""

from torch_ref.gmmformer import GMMFormer
from torch_ref.gmmformer_v2 import GMMFormerV2
from torch_ref.ms_sl import MSSL

MODELS = {"ms_sl": MSSL, "gmmformer": GMMFormer, "gmmformer_v2": GMMFormerV2}


def build_model(cfg):
    """The twin named ``cfg.name``."""
    if cfg.name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {cfg.name!r}")
    return MODELS[cfg.name](cfg)


__all__ = ["MODELS", "MSSL", "GMMFormer", "GMMFormerV2", "build_model"]
