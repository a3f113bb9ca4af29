"""gaussian_mask against a numpy transcription of GMMFormer's ``generate_gauss_weight``
(``src/Models/gmmformer/model_components.py:186-199``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprvr.ops.gaussian import gaussian_mask, linspace01


def np_gauss(L, w):
    c = np.arange(L) / L
    x = np.linspace(0, 1, L)
    s = max(w, 1e-2) / 9
    g = np.exp(-(x[None, :] - c[:, None]) ** 2 / (2 * s * s))
    return g / g.max(-1, keepdims=True)


# GMMFormer v1 widths at any length; v2 / MTM widths at their fixed lengths 32 and 128.
CASES = [(L, w) for L in (1, 2, 3, 7, 32, 90) for w in (0.5, 1.0, 5.0)]
CASES += [(L, w) for L in (32, 128) for w in (10.0, 3.0, 0.1, 8.0, 0.05, 2.0, 15.0)]


@pytest.mark.parametrize("L,w", CASES)
def test_matches_numpy_formula(L, w):
    got = np.asarray(gaussian_mask(L, w, L))
    np.testing.assert_allclose(got, np_gauss(L, w), rtol=1e-4, atol=1e-6)
    assert got.max() <= 1.0 + 1e-6 and np.allclose(got.max(-1), 1.0)


def test_none_is_plain_attention():
    np.testing.assert_array_equal(np.asarray(gaussian_mask(5, None, 9)), np.ones((9, 9)))


@pytest.mark.parametrize("L", [1, 2, 5, 8])
def test_padded_grid_keeps_the_top_left_block(L):
    size = 8
    for w in (0.5, 5.0):
        full = np.asarray(gaussian_mask(L, w, size))
        np.testing.assert_allclose(full[:L, :L], np.asarray(gaussian_mask(L, w, L)), rtol=1e-6, atol=0)
        outside = np.ones((size, size), bool)
        outside[:L, :L] = False
        np.testing.assert_array_equal(full[outside], 1.0)


def test_traced_length_equals_python_int():
    f = jax.jit(lambda n: gaussian_mask(n, 1.0, 16))
    for L in (1, 2, 9, 16):
        # XLA's fused exp may differ from the eager one by an ulp; nothing more.
        np.testing.assert_allclose(np.asarray(f(jnp.int32(L))), np.asarray(gaussian_mask(L, 1.0, 16)),
                                   rtol=1e-6, atol=0)


def test_degenerate_inputs_stay_finite():
    # L = 0 (an all-padding batch) is clamped to 1; a tiny width on a short grid underflows every entry of a
    # row in float32 (the official code divides 0 by 0 there; no official config reaches it).
    assert np.isfinite(np.asarray(gaussian_mask(0, 0.5, 4))).all()
    assert np.isfinite(np.asarray(gaussian_mask(3, 0.1, 3))).all()


def torch_gauss(torch, L, w):
    """The official generate_gauss_weight on the CPU (model_components.py:186-199, .cuda() dropped)."""
    center = torch.arange(L) / L
    width = w * torch.ones(L)
    weight = torch.linspace(0, 1, L).view(1, -1).expand(center.size(0), -1)
    center = center.unsqueeze(-1)
    width = width.unsqueeze(-1).clamp(1e-2) / 9
    weight = 0.3989422804014327 / width * torch.exp(-(weight - center) ** 2 / (2 * width**2))
    return (weight / weight.max(dim=-1, keepdim=True)[0]).numpy()


def test_linspace_matches_torch_bitwise():
    torch = pytest.importorskip("torch")
    traced = jax.jit(lambda n: linspace01(n, 200))
    for L in (1, 2, 3, 10, 31, 32, 90, 128, 200):
        ref = torch.linspace(0, 1, L).numpy()
        np.testing.assert_array_equal(np.asarray(linspace01(L, L)), ref)
        np.testing.assert_array_equal(np.asarray(traced(jnp.int32(L)))[:L], ref)


@pytest.mark.parametrize("L", [2, 31, 90, 128])
def test_matches_official_torch_to_an_ulp(L):
    torch = pytest.importorskip("torch")
    f = jax.jit(lambda n, w: gaussian_mask(n, w, 128), static_argnums=1)
    # w = 0.1 on a 2-point grid underflows a whole row in float32 (torch gives NaN); v2 never builds it.
    for w in (0.5, 1.0, 5.0) if L < 8 else (0.1, 0.5, 1.0, 5.0, 10.0, 3.0, 8.0):
        ref = torch_gauss(torch, L, w)
        np.testing.assert_allclose(np.asarray(gaussian_mask(L, w, L)), ref, rtol=0, atol=2.4e-7)
        np.testing.assert_allclose(np.asarray(f(jnp.int32(L), w))[:L, :L], ref, rtol=0, atol=2.4e-7)
