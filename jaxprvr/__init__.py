"""jaxprvr: JAX/Flax video-text retrieval with a PyTorch parity bridge."""

from jaxprvr.errors import JaxprvrError

__all__ = ["JaxprvrError"]
__version__ = "0.1.0"
