"""jaxprvr: JAX/Flax video-text retrieval with a PyTorch parity bridge.

``jaxprvr.load(path)`` (:mod:`jaxprvr.api`, docs/api.md) gives a trained model with the calls a notebook needs; it
is imported on first use, so ``import jaxprvr`` stays cheap (no JAX, no Flax).
"""

from jaxprvr.errors import JaxprvrError

__all__ = ["JaxprvrError", "load", "Loaded"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("load", "Loaded"):
        from jaxprvr import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
