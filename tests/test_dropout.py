"""The counter-hash dropout (jaxprvr/ops/dropout.py, layers.Dropout): its bits against a pure-Python
reimplementation of the hash, and the statistics a dropout mask must have (keep rate, unbiased scaling,
uniform bytes, no correlation between neighbours, between layers or between steps)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprvr.models.layers import Dropout
from jaxprvr.ops.dropout import hash_bits, keep_threshold

M32 = 0xFFFFFFFF


def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _reference_bits(key_words, n):
    """The documented formula in Python integers (no numpy uint32 wrap-around, no jnp)."""
    h = 0x9E3779B9
    for i, w in enumerate(int(x) for x in key_words):
        h = (_fmix(h ^ w) + i + 1) & M32
    s0, s1 = _fmix(h), _fmix(h ^ 0x85EBCA6B)
    return np.array([_fmix(_fmix(((i * 0x9E3779B9) & M32) ^ s0) ^ s1) for i in range(n)], np.uint64)


@pytest.mark.parametrize("impl", ["rbg", "threefry2x32"])
def test_bits_match_the_formula(impl):
    key = jax.random.key(7, impl=impl)
    got = np.asarray(jax.jit(lambda k: hash_bits(k, (3, 5, 7)))(key)).reshape(-1)
    ref = _reference_bits(np.asarray(jax.random.key_data(key)).reshape(-1), 105)
    np.testing.assert_array_equal(got.astype(np.uint64), ref)


def test_threshold_gives_the_rate():
    for rate in (0.1, 0.15, 0.2, 0.5):
        assert abs(1 - int(keep_threshold(rate)) / 2**32 - (1 - rate)) <= 2**-32
    assert int(keep_threshold(1 - 1e-12)) == 2**32 - 1


def test_bits_are_uniform_and_independent():
    n = 1 << 20
    bits = np.asarray(hash_bits(jax.random.key(3, impl="rbg"), (n,)), np.uint64)
    # every byte of the word uniform: chi-square over 256 bins (255 dof; p=1e-6 at about 375)
    for shift in (0, 8, 16, 24):
        counts = np.bincount(((bits >> shift) & 0xFF).astype(np.int64), minlength=256)
        chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())
        assert chi2 < 375, (shift, chi2)
    u = bits.astype(np.float64) / 2**32
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    # neighbours along the flat index (the counter) and along a row stride of 3072 are uncorrelated
    for lag in (1, 2, 3072):
        r = np.corrcoef(u[:-lag], u[lag:])[0, 1]
        assert abs(r) < 5 / np.sqrt(n), (lag, r)


class _TwoLayers(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x, train: bool):
        return Dropout(self.rate)(x, deterministic=not train), Dropout(self.rate)(x, deterministic=not train)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_module_statistics(rate):
    x = jnp.ones((64, 128, 96), jnp.float32)
    m = _TwoLayers(rate)
    f = jax.jit(lambda k: m.apply({}, x, True, rngs={"dropout": k}))
    a, b = (np.asarray(t) for t in f(jax.random.key(0, impl="rbg")))
    a2, _ = (np.asarray(t) for t in f(jax.random.key(1, impl="rbg")))
    n, keep = a.size, 1 - rate
    # values are 0 or 1 / keep; the keep rate is binomial; the scaled mean is 1 (unbiased)
    assert set(np.unique(a)) <= {0.0, np.float32(1 / keep)}
    sd = np.sqrt(rate * keep / n)
    for m_ in (a, b, a2):
        assert abs((m_ > 0).mean() - keep) < 5 * sd
    # two layers in one call and one layer at two keys draw independent masks: P(both kept) = keep^2
    for other in (b, a2):
        both = ((a > 0) & (other > 0)).mean()
        assert abs(both - keep**2) < 5 * np.sqrt(keep**2 * (1 - keep**2) / n), both
    # the same key gives the same masks; train=False and rate 0 are the identity
    np.testing.assert_array_equal(np.asarray(f(jax.random.key(0, impl="rbg"))[0]), a)
    np.testing.assert_array_equal(np.asarray(m.apply({}, x, False)[0]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(_TwoLayers(0.0).apply({}, x, True)[0]), np.asarray(x))


def test_bits_do_not_depend_on_the_jit_layout():
    """The same bits eagerly, jitted as one array, and as a slice of a larger draw's index space are
    consistent: element i depends only on (key, i)."""
    key = jax.random.key(11, impl="rbg")
    full = np.asarray(jax.jit(lambda k: hash_bits(k, (8, 16)))(key))
    np.testing.assert_array_equal(np.asarray(hash_bits(key, (8, 16))), full)
    np.testing.assert_array_equal(np.asarray(hash_bits(key, (128,))), full.reshape(-1))
