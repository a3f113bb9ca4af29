"""Mamba-1 selective scan: three JAX forms vs a float64 numpy recurrence, each other, finite differences, torch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprvr.ops.selective_scan import METHODS, selective_scan, softplus_torch

OPT_NAMES = ("D", "z", "delta_bias")
ALL_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _x64():
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older jax

    return enable_x64()


def ref_numpy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Straightforward float64 recurrence (loop over t). Returns (out, last_state)."""
    u, delta, A, B, C = (np.asarray(a, np.float64) for a in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias, np.float64)[:, None]
    if delta_softplus:
        delta = np.where(delta > 20, delta, np.log1p(np.exp(np.minimum(delta, 20))))
    b, d, L = u.shape
    x = np.zeros((b, d, A.shape[1]))
    ys = []
    for t in range(L):
        x = np.exp(delta[:, :, t, None] * A) * x + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append(np.sum(x * C[:, None, :, t], axis=-1))
    out = np.stack(ys, axis=-1)
    if D is not None:
        out = out + u * np.asarray(D, np.float64)[:, None]
    if z is not None:
        z = np.asarray(z, np.float64)
        out = out * z / (1 + np.exp(-z))
    return out, x


def make_inputs(seed, b, d, n, L, softplus, dtype=np.float32):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((b, d, L))
    if softplus:  # pre-activation, spread over the softplus threshold region too
        delta = rng.normal(-1.0, 2.0, (b, d, L))
        delta_bias = rng.normal(0.0, 0.5, (d,))
    else:  # already positive step sizes
        delta = rng.uniform(0.01, 1.0, (b, d, L))
        delta_bias = rng.uniform(0.0, 0.1, (d,))
    A = -np.tile(np.arange(1, n + 1, dtype=np.float64), (d, 1)) * rng.uniform(0.5, 1.5, (d, n))  # MTM: -exp(log(1..N))
    B = rng.standard_normal((b, n, L))
    C = rng.standard_normal((b, n, L))
    D = rng.standard_normal((d,))
    z = rng.standard_normal((b, d, L))
    arrs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    return {k: v.astype(dtype) for k, v in arrs.items()}


@functools.lru_cache(maxsize=None)
def _fwd(method, chunk_size, softplus, opts):
    def f(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=softplus,
                              return_last_state=True, method=method, chunk_size=chunk_size)

    return jax.jit(f)


def run(method, arrs, softplus, with_opts, chunk_size=64):
    kw = dict(arrs)
    if not with_opts:
        for k in OPT_NAMES:
            kw[k] = None
    return _fwd(method, chunk_size, softplus, with_opts)(**kw)


def _assert_close(got, ref, rel=1e-5, what=""):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(got - ref))) / scale
    assert err <= rel, f"{what}: max |diff| / scale = {err:.3e} (scale {scale:.3g})"
    return err


CASES = [  # (b, d, N, L, chunk_size)
    (2, 4, 3, 1, 2),
    (2, 4, 3, 3, 2),
    (2, 4, 3, 127, 16),
    (2, 768, 16, 32, 64),   # MTM clips
    (2, 768, 16, 128, 64),  # MTM frames
]


@pytest.mark.parametrize("opts", [True, False], ids=["opts_on", "opts_off"])
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}d{c[1]}N{c[2]}L{c[3]}" for c in CASES])
def test_matches_numpy_reference(case, opts):
    b, d, n, L, cs = case
    arrs = make_inputs(L + d, b, d, n, L, softplus=opts)
    kw = dict(arrs)
    if not opts:
        for k in OPT_NAMES:
            kw[k] = None
    ref_out, ref_last = ref_numpy(**kw, delta_softplus=opts)
    outs = {}
    for method in METHODS:
        out, last = run(method, arrs, opts, opts, cs)
        assert out.shape == (b, d, L) and out.dtype == jnp.float32
        assert last.shape == (b, d, n) and last.dtype == jnp.float32
        _assert_close(out, ref_out, what=f"{method} out")
        _assert_close(last, ref_last, what=f"{method} last state")
        outs[method] = (np.asarray(out), np.asarray(last))
    for method in METHODS[1:]:
        _assert_close(outs[method][0], outs[METHODS[0]][0], what=f"{method} vs associative out")
        _assert_close(outs[method][1], outs[METHODS[0]][1], what=f"{method} vs associative last")


def test_no_last_state_and_dtype():
    arrs = make_inputs(0, 1, 4, 3, 7, softplus=True)
    arrs16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in arrs.items()}
    ref_out, _ = ref_numpy(**{k: np.asarray(v, np.float64) for k, v in arrs16.items()}, delta_softplus=True)
    for method in METHODS:
        out = selective_scan(**arrs16, delta_softplus=True, method=method, chunk_size=3)
        assert out.dtype == jnp.bfloat16 and out.shape == (1, 4, 7)
        # float32 accumulation: only the final rounding to bfloat16 is lost.
        _assert_close(out.astype(jnp.float32), ref_out, rel=1e-2, what=method)


def _grads(method, arrs, w_out, w_last, softplus, chunk_size):
    def loss(*args):
        out, last = selective_scan(*args, delta_softplus=softplus, return_last_state=True,
                                   method=method, chunk_size=chunk_size)
        return jnp.sum(out * w_out) + jnp.sum(last * w_last)

    return jax.jit(jax.grad(loss, argnums=tuple(range(8))))(*[arrs[k] for k in ALL_NAMES])


@pytest.mark.parametrize("softplus", [True, False])
def test_gradients_agree_between_methods(softplus):
    b, d, n, L = 2, 6, 4, 37
    arrs = make_inputs(11, b, d, n, L, softplus=softplus)
    rng = np.random.default_rng(5)
    w_out = rng.standard_normal((b, d, L)).astype(np.float32)
    w_last = rng.standard_normal((b, d, n)).astype(np.float32)
    grads = {m: _grads(m, arrs, w_out, w_last, softplus, 8) for m in METHODS}
    for m in METHODS[1:]:
        for name, g0, g1 in zip(ALL_NAMES, grads[METHODS[0]], grads[m]):
            assert np.all(np.isfinite(np.asarray(g1)))
            _assert_close(g1, g0, what=f"grad {name}: {m} vs associative")


def test_gradients_vs_finite_differences_float64():
    b, d, n, L = 1, 2, 3, 5
    arrs = make_inputs(3, b, d, n, L, softplus=True, dtype=np.float64)
    rng = np.random.default_rng(9)
    w_out = rng.standard_normal((b, d, L))
    w_last = rng.standard_normal((b, d, n))

    def ref_loss(vals):
        out, last = ref_numpy(**vals, delta_softplus=True)
        return float(np.sum(out * w_out) + np.sum(last * w_last))

    eps = 1e-6
    fd = {}
    for name in ALL_NAMES:
        g = np.zeros_like(arrs[name])
        for idx in np.ndindex(g.shape):
            plus = {k: v.copy() for k, v in arrs.items()}
            minus = {k: v.copy() for k, v in arrs.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            g[idx] = (ref_loss(plus) - ref_loss(minus)) / (2 * eps)
        fd[name] = g

    with _x64():
        jarrs = {k: jnp.asarray(v, jnp.float64) for k, v in arrs.items()}
        for method in METHODS:
            grads = _grads(method, jarrs, jnp.asarray(w_out), jnp.asarray(w_last), True, 2)
            for name, g in zip(ALL_NAMES, grads):
                assert g.dtype == jnp.float64
                _assert_close(g, fd[name], rel=1e-6, what=f"{method} grad {name} vs finite differences")


def test_softplus_threshold():
    x = np.array([-30.0, -5.0, 0.0, 5.0, 19.0, 19.9, 19.999, 20.0, 20.001, 20.5, 30.0, 100.0, 1e4], np.float32)
    expected = np.where(x > 20, x, np.log1p(np.exp(np.minimum(x.astype(np.float64), 20))))
    got = np.asarray(softplus_torch(jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    with _x64():  # in float64 the two branches differ at the threshold: 20 is not above it, 20.001 is
        x64 = jnp.asarray([20.0, 20.001], jnp.float64)
        g64 = np.asarray(softplus_torch(x64))
        assert g64.dtype == np.float64
        assert g64[0] == np.log1p(np.exp(20.0)) and g64[0] != 20.0 and g64[1] == 20.001
    g = np.asarray(jax.vmap(jax.grad(softplus_torch))(jnp.asarray(x)))
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g[x > 20], 1.0)
    np.testing.assert_allclose(g[x <= 20], 1 / (1 + np.exp(-x[x <= 20].astype(np.float64))), rtol=1e-6)


def test_bad_arguments():
    arrs = make_inputs(0, 1, 4, 3, 5, softplus=False)
    with pytest.raises(ValueError, match="unknown method"):
        selective_scan(**arrs, method="pallas")
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(**arrs, method="chunked", chunk_size=0)
    bad = [("u", arrs["u"][0]), ("delta", arrs["delta"][:, :, :4]), ("A", arrs["A"][:3]),
           ("B", arrs["B"][0]), ("C", arrs["C"][:, :2]), ("D", arrs["D"][:2]), ("z", arrs["z"][:, :2]),
           ("delta_bias", arrs["delta_bias"][None])]
    for name, val in bad:
        with pytest.raises(ValueError, match="selective_scan"):
            selective_scan(**{**arrs, name: val})
    with pytest.raises(ValueError, match="complex"):
        selective_scan(**{**arrs, "A": arrs["A"].astype(np.complex64)})


def test_matches_torch_transcription():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
        # transcription of mamba_ssm selective_scan_ref for real A and variable B, C of shape (b, N, L)
        dtype_in = u.dtype
        u, delta = u.float(), delta.float()
        if delta_bias is not None:
            delta = delta + delta_bias[..., None].float()
        if delta_softplus:
            delta = F.softplus(delta)
        batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
        B, C = B.float(), C.float()
        x = A.new_zeros((batch, dim, dstate))
        ys = []
        deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
        last_state = None
        for i in range(u.shape[2]):
            x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
            if i == u.shape[2] - 1:
                last_state = x
            ys.append(y)
        y = torch.stack(ys, dim=2)
        out = y if D is None else y + u * D[:, None]
        if z is not None:
            out = out * F.silu(z)
        out = out.to(dtype=dtype_in)
        return out if not return_last_state else (out, last_state)

    b, d, n, L = 2, 768, 16, 32
    arrs = make_inputs(21, b, d, n, L, softplus=True)
    # put some pre-activations right at the softplus threshold
    arrs["delta"][0, :4, :4] = np.array([19.5, 20.0, 20.01, 25.0], np.float32)[:, None] - arrs["delta_bias"][:4, None]
    t_out, t_last = selective_scan_ref(**{k: torch.from_numpy(v) for k, v in arrs.items()}, delta_softplus=True,
                                       return_last_state=True)
    for method in METHODS:
        out, last = run(method, arrs, True, True, 64)
        _assert_close(out, t_out.numpy(), what=f"{method} vs torch out")
        _assert_close(last, t_last.numpy(), what=f"{method} vs torch last")


@pytest.mark.parametrize("length", [1, 3, 32, 127])
def test_matches_official_selective_scan_ref_outputs_and_gradients(length):
    """mamba_ssm's own ``selective_scan_ref`` (torch autograd) at MTM's channel/state sizes: outputs and the
    gradient of every input within 1e-5 relative, for each form."""
    import torch

    from torch_ref.mamba import load

    ref = load().selective_scan_ref
    rng = np.random.default_rng(length)
    b, d, n = 2, 768, 16
    arrs = dict(u=rng.standard_normal((b, d, length)), delta=0.5 * rng.standard_normal((b, d, length)),
                A=-np.exp(rng.standard_normal((d, n))), B=rng.standard_normal((b, n, length)),
                C=rng.standard_normal((b, n, length)), D=rng.standard_normal(d), z=rng.standard_normal((b, d, length)),
                delta_bias=rng.standard_normal(d))
    arrs = {k: v.astype(np.float32) for k, v in arrs.items()}
    w = rng.standard_normal((b, d, length)).astype(np.float32)
    ts = {k: torch.tensor(v, requires_grad=True) for k, v in arrs.items()}
    t_out = ref(**ts, delta_softplus=True)
    (t_out * torch.from_numpy(w)).sum().backward()
    names = list(arrs)
    for method in METHODS:
        def f(*xs):
            out = selective_scan(**dict(zip(names, xs)), delta_softplus=True, method=method, chunk_size=16)
            return jnp.sum(out * w), out

        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(names))), has_aux=True))(
            *[arrs[k] for k in names])
        scale = np.abs(t_out.detach().numpy()).max()
        assert np.abs(np.asarray(out) - t_out.detach().numpy()).max() <= 1e-5 * scale, method
        for k, g in zip(names, grads):
            tg = ts[k].grad.numpy()
            if not np.any(tg):  # L == 1: A only multiplies the zero initial state, so its gradient is 0
                assert k == "A" and length == 1 and not np.any(np.asarray(g)), (method, k)
                continue
            rel = np.linalg.norm(np.asarray(g) - tg) / np.linalg.norm(tg)
            assert rel <= 1e-5, (method, k, rel)
