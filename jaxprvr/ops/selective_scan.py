"""Mamba-1 selective scan as a pure JAX function (the ``selective_scan_ref`` of mamba_ssm).

Semantics follow ``mamba_ssm/ops/selective_scan_interface.py::selective_scan_ref`` with the
channels-first layout of mamba_ssm and *variable* (input-dependent) ``B`` and ``C``, which is how
MTM's ``Mamba(d_model=384, d_state=16, d_conv=4, expand=2)`` calls it (d_inner = 768, L = 32 for
clips and 128 for frames; the layers are built at MTM ``src/Models/MTM/model.py:138,163`` and the call
is ``mamba_ssm/modules/mamba_simple.py:182-200``, mamba_ssm 2.3.2.post1)::

    u      (b, d, L)     delta (b, d, L)     A (d, N) real
    B      (b, N, L)     C     (b, N, L)     D (d,)   z (b, d, L)   delta_bias (d,)

    delta   <- delta + delta_bias[:, None]                     (if delta_bias is given)
    delta   <- softplus(delta), identity where delta > 20      (if delta_softplus; torch threshold)
    dA_t     = exp(delta_t[..., None] * A)                     (b, d, N) per step
    dBu_t    = delta_t[..., None] * B_t[:, None, :] * u_t[..., None]
    x_t      = dA_t * x_{t-1} + dBu_t,      x_{-1} = 0         (b, d, N) state
    y_t      = sum_n x_t[..., n] * C_t[:, None, n]
    out      = y + u * D[:, None]                              (if D is given)
    out      = out * silu(z)                                   (if z is given)

Everything is computed in float32 (or float64 if any input is float64), whatever the input dtype;
the output has the dtype of ``u``. With ``return_last_state`` the pair ``(out, x_{L-1})`` is
returned, the state having shape (b, d, N) and the accumulation dtype (mamba_ssm returns it in the
accumulation dtype too).

The recurrence is a first-order linear recurrence ``x_t = a_t x_{t-1} + b_t`` (element-wise per
channel and state index), and it is computed in one of three interchangeable forms:

``method="associative"``
    ``jax.lax.associative_scan`` over L on the pairs ``(a, b)`` with the associative combine
    ``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``. Depth O(log L), work O(L log L)-ish, and it
    materialises ``(b, d, L, N)`` arrays for dA, dBu and all the states (several times over for the
    intermediate levels, and again for the backward pass). Highest parallelism, largest memory.

``method="sequential"``
    ``jax.lax.scan`` over L carrying the (b, d, N) state; ``y_t`` is reduced inside the step so no
    (b, d, L, N) array is ever built in the forward pass. Depth O(L), minimum work and memory
    (the backward pass stores the per-step carries, i.e. O(b d L N) once). It parallelises only over
    (b, d, N), which is plenty for MTM's 768 x 16 channels, but each of the L steps is a separate
    small kernel launch on an accelerator.

``method="chunked"``
    L is split into chunks of ``chunk_size`` (the tail padded with delta = 0, i.e. dA = 1 and dBu = 0,
    which leaves the state unchanged, and the output sliced back); ``jax.lax.scan`` runs over the
    chunks carrying the state, and inside each chunk an associative scan computes the states
    relative to the chunk's initial state (``x_t = A_cum_t x_0 + B_cum_t``). The chunk body is wrapped
    in ``jax.checkpoint`` so that the backward pass re-computes each chunk instead of storing its
    (b, d, T, N) intermediates: backward memory is O(b d N L / T) for the carries plus one chunk's
    worth of intermediates, i.e. flat in L. Depth O((L / T) log T).

All three give the same result to float32 rounding (and the same gradients; tests/test_ops_selective_scan.py).
Which is fastest depends on the device and the shape: on 2 CPU cores the sequential form is the fastest
at MTM's shapes (docs/benchmarks.md, "Selective scan"), so the Mamba layer (:class:`jaxprvr.models.mamba.Mamba`)
defaults to ``"sequential"``; on GPU the associative form is expected to compete (not measured yet).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["METHODS", "selective_scan", "softplus_torch"]

METHODS = ("associative", "sequential", "chunked")

_HI = jax.lax.Precision.HIGHEST


def softplus_torch(x):
    """``torch.nn.functional.softplus(x)`` with beta 1 and threshold 20: ``x`` where ``x > 20``,
    else ``log1p(exp(x))``. The exp input is clamped so the unused branch never overflows (finite gradients);
    the gradient is sigmoid(x) for x <= 20 and 1 above, as in torch."""
    x = jnp.asarray(x)
    above = x > 20.0
    # where (not minimum) for the clamp: minimum splits the gradient 0.5/0.5 at x == 20 exactly
    return jnp.where(above, x, jnp.log1p(jnp.exp(jnp.where(above, 20.0, x))))


def _combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {u.shape}")
    b, d, L = u.shape
    if L < 1:
        raise ValueError(f"selective_scan: sequence length must be >= 1, got u shape {u.shape}")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {delta.shape} must equal u shape {u.shape}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (dim={d}, d_state), got shape {A.shape}")
    if jnp.issubdtype(A.dtype, jnp.complexfloating):
        raise ValueError("selective_scan: complex A is not supported (Mamba-1 uses real A)")
    n = A.shape[1]
    for name, arr in (("B", B), ("C", C)):
        if arr.shape != (b, n, L):
            raise ValueError(
                f"selective_scan: {name} must be variable, shaped (batch, d_state, L) = {(b, n, L)}, "
                f"got {arr.shape}")
    for name, arr in (("D", D), ("delta_bias", delta_bias)):
        if arr is not None and arr.shape != (d,):
            raise ValueError(f"selective_scan: {name} must be (dim,) = {(d,)}, got {arr.shape}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {z.shape} must equal u shape {u.shape}")


def _scan_associative(u, delta, A, B, C):
    """All arrays in the accumulation dtype. Returns y (b, d, L) and the last state (b, d, N)."""
    dA = jnp.exp(delta[..., None] * A[None, :, None, :])                    # (b, d, L, N)
    Bt = jnp.swapaxes(B, 1, 2)[:, None]                                      # (b, 1, L, N)
    dBu = (delta * u)[..., None] * Bt                                        # (b, d, L, N)
    _, xs = jax.lax.associative_scan(_combine, (dA, dBu), axis=2)
    y = jnp.einsum("bdln,bnl->bdl", xs, C, precision=_HI)
    return y, xs[:, :, -1, :]


def _scan_sequential(u, delta, A, B, C):
    b, d, _ = u.shape
    n = A.shape[1]
    xs_in = (jnp.moveaxis(delta, 2, 0), jnp.moveaxis(u, 2, 0),
             jnp.moveaxis(B, 2, 0), jnp.moveaxis(C, 2, 0))                   # (L, b, d) / (L, b, N)

    def step(x, inp):
        dt, ut, bt, ct = inp
        x = jnp.exp(dt[..., None] * A) * x + (dt * ut)[..., None] * bt[:, None, :]
        y = jnp.sum(x * ct[:, None, :], axis=-1)
        return x, y

    x0 = jnp.zeros((b, d, n), u.dtype)
    last, ys = jax.lax.scan(step, x0, xs_in)
    return jnp.moveaxis(ys, 0, 2), last


def _scan_chunked(u, delta, A, B, C, chunk_size):
    b, d, L = u.shape
    n = A.shape[1]
    T = min(int(chunk_size), L)
    nc = -(-L // T)
    pad = nc * T - L
    if pad:
        # delta = 0 gives dA = exp(0) = 1 and dBu = 0: the padded steps leave the state unchanged.
        widths = ((0, 0), (0, 0), (0, pad))
        u, delta, B, C = (jnp.pad(a, widths) for a in (u, delta, B, C))

    def chunks(a):  # (b, k, nc*T) -> (nc, b, k, T)
        return jnp.moveaxis(a.reshape(a.shape[0], a.shape[1], nc, T), 2, 0)

    @jax.checkpoint
    def body(x0, inp):
        dt, uc, bc, cc = inp                                                 # (b,d,T) x2, (b,N,T) x2
        dA = jnp.exp(dt[..., None] * A[None, :, None, :])                    # (b, d, T, N)
        dBu = (dt * uc)[..., None] * jnp.swapaxes(bc, 1, 2)[:, None]         # (b, d, T, N)
        a_cum, b_cum = jax.lax.associative_scan(_combine, (dA, dBu), axis=2)
        xs = a_cum * x0[:, :, None, :] + b_cum
        y = jnp.einsum("bdtn,bnt->bdt", xs, cc, precision=_HI)
        return xs[:, :, -1, :], y

    x0 = jnp.zeros((b, d, n), u.dtype)
    last, ys = jax.lax.scan(body, x0, (chunks(delta), chunks(u), chunks(B), chunks(C)))
    y = jnp.moveaxis(ys, 0, 2).reshape(b, d, nc * T)[:, :, :L]
    return y, last


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, method="associative", chunk_size=64):
    """Mamba-1 selective scan (mamba_ssm ``selective_scan_ref`` semantics; see the module docstring).

    Args:
      u, delta: (batch, dim, L).  A: (dim, N) real.  B, C: (batch, N, L) (variable B and C).
      D, delta_bias: optional (dim,).  z: optional (batch, dim, L) gate (``out * silu(z)``).
      delta_softplus: apply torch-threshold softplus to ``delta (+ delta_bias)``.
      return_last_state: also return the final state x_{L-1}, (batch, dim, N).
      method: ``"associative"``, ``"sequential"`` or ``"chunked"`` (same result, different cost).
      chunk_size: chunk length for ``"chunked"`` (clamped to L).

    Returns:
      ``out`` (batch, dim, L) in ``u``'s dtype, or ``(out, last_state)`` if ``return_last_state``.
    """
    if method not in METHODS:
        raise ValueError(f"selective_scan: unknown method {method!r}; expected one of {METHODS}")
    if method == "chunked" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                or chunk_size < 1):
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    u, delta, A, B, C = (jnp.asarray(a) for a in (u, delta, A, B, C))
    D, z, delta_bias = (None if a is None else jnp.asarray(a) for a in (D, z, delta_bias))
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)

    out_dtype = u.dtype
    acc = jnp.promote_types(
        jnp.float32, jnp.result_type(*[a.dtype for a in (u, delta, A, B, C, D, z, delta_bias) if a is not None]))
    u, delta, A, B, C = (a.astype(acc) for a in (u, delta, A, B, C))

    if delta_bias is not None:
        delta = delta + delta_bias.astype(acc)[:, None]
    if delta_softplus:
        delta = softplus_torch(delta)

    if method == "associative":
        y, last = _scan_associative(u, delta, A, B, C)
    elif method == "sequential":
        y, last = _scan_sequential(u, delta, A, B, C)
    else:
        y, last = _scan_chunked(u, delta, A, B, C, chunk_size)

    out = y if D is None else y + u * D.astype(acc)[:, None]
    if z is not None:
        out = out * jax.nn.silu(z.astype(acc))
    out = out.astype(out_dtype)
    return (out, last) if return_last_state else out
