"""Dropout masks from a counter-based hash: the same Bernoulli masks, far cheaper bits on CPU.

``jax.random.bernoulli`` draws its uniforms with the key's generator. With the "rbg" key the train step uses,
XLA:CPU lowers that to Philox ``rng_bit_generator`` plus the concatenation of its four output words, which is
scalar 64-bit arithmetic: measured on the 2-core build machine, it was the largest single cost of the
GMMFormer v2 and MS-SL train steps (the input dropout alone draws 16 x 128 x 3072 numbers per step).
Here every element's 32 random bits are a hash of its flat index and of the dropout key instead:

    seed0, seed1 = mix(key data)                       (a handful of scalar operations per dropout layer)
    bits[i]      = fmix32(fmix32(i * 0x9E3779B9 ^ seed0) ^ seed1)

``fmix32`` is MurmurHash3's 32-bit finalizer, a bijection with full avalanche; two rounds keyed by two
independent seed words give bits whose statistics the tests check (keep rate, byte histograms, neighbour
and cross-layer correlations). Everything is uint32 arithmetic that vectorises, and ``i`` is an iota, so the
masks are the same whether the array lives on one device or is split over many (XLA partitions the iota
with its offsets).

The keep decision is ``bits >= round(rate * 2**32)``: the keep probability is ``1 - rate`` to within 2**-32,
and kept values are scaled by ``1 / (1 - rate)`` as in ``torch.nn.Dropout`` and ``flax.linen.Dropout``
(:func:`keep_scale`). The masks differ from the draws of ``torch.nn.Dropout`` (torch's Philox stream is not
reproducible here), but not from those of the torch twins when asked: :mod:`torch_ref.dropout` computes the same
bits in PyTorch, and ``torch_ref.dropout.shared_dropout`` makes a twin's train-mode forward draw exactly the
masks of one Flax forward (its keys recorded per module and call, ``layers.sow_dropout_key``), so forwards,
losses and gradients with dropout on compare across frameworks (docs/parity.md, "Shared dropout masks").
Without it the twins keep ``nn.Dropout``'s own masks, the official behaviour.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9
_MAX_ELEMENTS = 2**32  # flat indices are uint32


def fmix32(h):
    """MurmurHash3's finalizer on uint32 (a bijection; jnp or numpy arrays)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def key_seeds(key):
    """Two uint32 seed words from a JAX PRNG key (any implementation: its key data is folded word by word)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = jnp.asarray(key, jnp.uint32).reshape(-1)
    h = jnp.uint32(_GOLDEN)
    for i in range(words.shape[0]):
        h = fmix32(h ^ words[i]) + jnp.uint32(i + 1)
    return fmix32(h), fmix32(h ^ jnp.uint32(0x85EBCA6B))


def hash_bits(key, shape) -> jax.Array:
    """``uint32`` random bits of ``shape``, a function of the key and of each element's flat index."""
    size = math.prod(shape)
    if size > _MAX_ELEMENTS:
        raise ValueError(f"hash_bits: {size} elements do not fit a uint32 counter (at most 2**32)")
    s0, s1 = key_seeds(key)
    idx = jax.lax.iota(jnp.uint32, size).reshape(shape) if shape else jnp.uint32(0)
    return fmix32(fmix32(idx * np.uint32(_GOLDEN) ^ s0) ^ s1)


def keep_threshold(rate: float) -> np.uint32:
    """The uint32 threshold ``t`` with ``P(bits >= t) = 1 - rate`` (to 2**-32)."""
    return np.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))


def keep_mask(key, shape, rate: float) -> jax.Array:
    """Boolean ``shape`` mask, True with probability ``1 - rate``."""
    return hash_bits(key, shape) >= keep_threshold(rate)


def dropout(key, x, rate: float):
    """Inverted dropout of ``x``: kept elements scaled by ``1 / (1 - rate)``, dropped ones zero."""
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    keep = keep_mask(key, x.shape, rate)
    return jax.lax.select(keep, x * keep_scale(rate, x.dtype), jnp.zeros_like(x))


def keep_scale(rate: float, dtype) -> np.ndarray:
    """The multiplier of kept values, ``1 / (1 - rate)``: the reciprocal of ``1 - rate`` rounded to ``dtype``,
    taken in ``dtype`` on the host. XLA compiles ``x / c`` for a constant ``c`` into this very multiplication
    (its algebraic simplifier), so float32 results are those of ``x / (1 - rate)``; written out, they do not
    depend on that rewrite, and the torch twin (:func:`torch_ref.dropout.dropout`) reproduces them bit for bit."""
    return np.reciprocal(np.asarray(1.0 - rate, dtype))
