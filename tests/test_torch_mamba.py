"""torch_ref.mamba: the official mamba_ssm Mamba-1 layer and reference scan, importable on CPU."""

from __future__ import annotations

import math

import numpy as np
import torch

from torch_ref import mamba


def numpy_scan(u, delta, A, B, C, D, z, delta_bias):
    """The Mamba-1 selective scan, float64, one time step at a time (softplus with torch's threshold 20)."""
    delta = delta + delta_bias[None, :, None]
    delta = np.where(delta > 20, delta, np.log1p(np.exp(np.minimum(delta, 20))))
    b, d, n_t = u.shape
    x = np.zeros((b, d, A.shape[1]))
    ys = []
    for t in range(n_t):
        x = np.exp(delta[:, :, t, None] * A[None]) * x + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append(np.einsum("bdn,bn->bd", x, C[:, :, t]))
    y = np.stack(ys, -1) + u * D[None, :, None]
    return y * (z / (1 + np.exp(-z)))


def test_reference_scan_matches_a_numpy_recurrence():
    ref = mamba.load()
    rng = np.random.default_rng(0)
    b, d, n, t = 2, 6, 4, 9
    u, delta, z = (rng.standard_normal((b, d, t)) for _ in range(3))
    A = -np.exp(rng.standard_normal((d, n)))
    B, C = rng.standard_normal((b, n, t)), rng.standard_normal((b, n, t))
    D, bias = rng.standard_normal(d), rng.standard_normal(d)
    T = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    out = ref.selective_scan_ref(T(u), T(delta), T(A), T(B), T(C), T(D), T(z), T(bias), delta_softplus=True)
    np.testing.assert_allclose(out.numpy(), numpy_scan(u, delta, A, B, C, D, z, bias), rtol=1e-5, atol=1e-5)


def test_official_mamba_layer_runs_on_cpu_with_the_official_layout():
    ref = mamba.load()
    d_model, d_state, d_conv, expand = 384, 16, 4, 2
    m = ref.Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, use_fast_path=False)
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"A_log": (d_inner, d_state), "D": (d_inner,), "in_proj.weight": (2 * d_inner, d_model),
                      "conv1d.weight": (d_inner, 1, d_conv), "conv1d.bias": (d_inner,),
                      "x_proj.weight": (dt_rank + 2 * d_state, d_inner), "dt_proj.weight": (d_inner, dt_rank),
                      "dt_proj.bias": (d_inner,), "out_proj.weight": (d_model, d_inner)}
    # S4D-real init: A = -(1..N) for every channel
    np.testing.assert_allclose(np.exp(m.A_log.detach().numpy()), np.tile(np.arange(1, d_state + 1), (d_inner, 1)),
                               rtol=1e-6)
    x = torch.randn(2, 7, d_model, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # causal: the output at t does not depend on inputs after t
    x2 = x.detach().clone()
    x2[:, 5:] += 1.0
    with torch.no_grad():
        np.testing.assert_allclose(m(x2)[:, :5].numpy(), y[:, :5].detach().numpy(), rtol=1e-5, atol=1e-6)
