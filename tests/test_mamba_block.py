"""jaxprvr.models.mamba.Mamba against the official mamba_ssm Mamba-1 (CPU, its reference scan): layout,
conversion, forward and gradients for every scan form, and both initialisations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprvr.models.mamba import Mamba
from parity import convert
from parity.keys import mamba_layer
from torch_ref import mamba as tm

TABLE = tuple(mamba_layer(""))
D_MODEL, L = 64, 21


def _official(seed=0, d_model=D_MODEL):
    torch.manual_seed(seed)
    m = tm.load().Mamba(d_model=d_model, d_state=16, d_conv=4, expand=2, use_fast_path=False)
    with torch.no_grad():  # non-trivial conv bias / D / A so every parameter matters
        for p in (m.conv1d.bias, m.D, m.A_log):
            p.add_(0.1 * torch.randn(p.shape))
    return m


def test_table_matches_the_official_state_dict():
    m = _official()
    assert [e.torch for e in TABLE] == list(m.state_dict())
    flax_shapes = jax.eval_shape(lambda: Mamba(D_MODEL).init(jax.random.key(0), jnp.zeros((1, 5, D_MODEL))))
    params = convert.torch_to_flax(TABLE, m.state_dict())
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, flax_shapes["params"])
    back = convert.flax_to_torch(TABLE, params)
    assert all(torch.equal(back[k], v) for k, v in m.state_dict().items())


@pytest.fixture(scope="module")
def case():
    m = _official(1)
    x = np.random.default_rng(0).standard_normal((2, L, D_MODEL)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    y = m(xt)
    w = torch.tensor(np.random.default_rng(1).standard_normal(y.shape).astype(np.float32))
    (y * w).sum().backward()
    grads = {k: p.grad.numpy() for k, p in m.named_parameters()}
    return m, x, y.detach().numpy(), w.numpy(), xt.grad.numpy(), grads


@pytest.mark.parametrize("scan", ["associative", "sequential", "chunked"])
def test_forward_and_gradients_match_official(case, scan):
    m, x, y_t, w, gx_t, g_t = case
    params = jax.tree.map(jnp.asarray, convert.torch_to_flax(TABLE, m.state_dict()))
    layer = Mamba(D_MODEL, scan=scan, chunk_size=8)

    def f(p, xx):
        return jnp.sum(layer.apply({"params": p}, xx) * w)

    y = layer.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(y), y_t, rtol=1e-5, atol=2e-6)
    gp, gx = jax.grad(f, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(np.asarray(gx), gx_t, rtol=1e-4, atol=1e-6)
    gp_t = convert.flax_to_arrays(TABLE, jax.device_get(gp))
    for k, g in g_t.items():
        rel = np.linalg.norm(gp_t[k] - g) / np.linalg.norm(g)
        assert rel < 1e-4, (k, rel)


def test_causal_and_length_one():
    layer = Mamba(16)
    p = layer.init(jax.random.key(0), jnp.zeros((1, 6, 16)))
    x = np.random.default_rng(2).standard_normal((1, 6, 16)).astype(np.float32)
    x2 = x.copy()
    x2[:, 4:] += 1
    y, y2 = layer.apply(p, x), layer.apply(p, x2)
    np.testing.assert_allclose(np.asarray(y2[:, :4]), np.asarray(y[:, :4]), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(y2[:, 4:]), np.asarray(y[:, 4:]))
    y1 = layer.apply(p, x[:, :1])
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y[:, :1]), rtol=1e-5, atol=1e-6)


def test_inits_follow_mamba_ssm_and_mtm():
    d_model, d_inner, n = 384, 768, 16
    dt_rank = math.ceil(d_model / 16)
    x = jnp.zeros((1, 3, d_model))
    pm = jax.device_get(Mamba(d_model).init(jax.random.key(0), x)["params"])
    mtm = jax.device_get(Mamba(d_model, init_scheme="mtm").init(jax.random.key(0), x)["params"])
    for p in (pm, mtm):  # kept by both: S4D-real A, D = 1, torch-default conv
        np.testing.assert_allclose(np.exp(p["A_log"]), np.tile(np.arange(1, n + 1), (d_inner, 1)), rtol=1e-6)
        np.testing.assert_array_equal(p["D"], np.ones(d_inner))
        k = p["conv1d"]["kernel"]  # torch default: U(+-1/sqrt(d_conv))
        assert np.abs(k).max() <= 0.5 and k.std() == pytest.approx(0.5 / math.sqrt(3), rel=0.05)
    # mamba_ssm: torch-default Linears, dt weight U(+-dt_rank^-0.5), softplus(dt bias) in [1e-3, 0.1]
    for name, fan_in in (("in_proj", d_model), ("x_proj", d_inner), ("out_proj", d_inner)):
        k = pm[name]["kernel"]
        assert np.abs(k).max() <= 1 / math.sqrt(fan_in) and k.std() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    assert np.abs(pm["dt_proj"]["kernel"]).max() <= dt_rank ** -0.5
    dt = np.log1p(np.exp(pm["dt_proj"]["bias"]))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert np.median(np.log(dt)) == pytest.approx((math.log(1e-3) + math.log(0.1)) / 2, abs=0.3)
    # MTM: every Linear N(0, 0.02), zero bias (dt_proj.bias too)
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        assert mtm[name]["kernel"].std() == pytest.approx(0.02, rel=0.1)
    np.testing.assert_array_equal(mtm["dt_proj"]["bias"], np.zeros(d_inner))
