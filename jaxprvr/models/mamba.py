"""Mamba-1 layer with ``mamba_ssm.modules.mamba_simple.Mamba``'s parameter layout and math (``__init__`` and
``forward``, ``mamba_ssm/modules/mamba_simple.py:32-206`` in mamba_ssm 2.3.2.post1, unchanged since 2.0.0; MTM
builds it at ``src/Models/MTM/model.py:138,163``).

Forward (``use_fast_path=False``, no inference cache), for ``h (B, L, d_model)``::

    x, z   = split(in_proj(h))                       # d_inner each, in_proj has no bias
    x      = SiLU(causal depthwise conv1d(x))        # kernel d_conv, left padding d_conv - 1, with bias
    dt, B, C = split(x_proj(x), [dt_rank, N, N])     # x_proj has no bias
    delta  = softplus(dt_proj(dt))                   # torch softplus: identity above 20
    y      = selective_scan(x, delta, A=-exp(A_log), B, C, D, z)   # y * SiLU(z) inside
    out    = out_proj(y)                             # no bias

``dt_proj``'s bias is the scan's ``delta_bias`` in mamba_ssm; adding it in the Dense is the same float32 sum
``W dt + b``. Parameters (torch key -> Flax path): ``in_proj.weight`` -> ``in_proj/kernel`` (transpose),
``conv1d.weight (d_inner, 1, d_conv)`` -> ``conv1d/kernel (d_conv, 1, d_inner)`` (axes reversed),
``conv1d.bias`` -> ``conv1d/bias``, ``x_proj.weight`` -> ``x_proj/kernel``, ``dt_proj.{weight,bias}`` ->
``dt_proj/{kernel,bias}``, ``A_log`` -> ``A_log``, ``D`` -> ``D``, ``out_proj.weight`` -> ``out_proj/kernel``.

Initialisation (``init_scheme``):

* ``"mamba"`` — mamba_ssm's own: torch-default uniform ``±1/sqrt(fan_in)`` for the Linears and the conv
  (fan_in of the depthwise conv = ``d_conv``), ``dt_proj.weight ~ U(±dt_rank^-0.5 * dt_scale)``,
  ``dt_proj.bias = softplus^-1(dt)`` with ``dt`` log-uniform in ``[dt_min, dt_max]`` floored at
  ``dt_init_floor``, ``A_log = log(1..N)`` per channel (S4D-real), ``D = 1``;
* ``"mtm"`` — MTM's ``reset_parameters`` override: every Linear (``in_proj``, ``x_proj``, ``dt_proj``,
  ``out_proj``) ``N(0, 0.02)`` with zero bias, so ``dt_proj.bias`` starts at 0; the conv, ``A_log`` and ``D``
  keep mamba_ssm's init.

Compute dtype (``dtype``): ``in_proj``, the conv, ``x_proj`` and ``out_proj`` run in ``dtype`` (float32
parameters); ``dt_proj`` (a rank-``dt_rank`` matmul whose output goes through ``exp(delta * A)``) and the whole
selective scan, its recurrence state included, are float32 whatever ``dtype`` (as in mamba_ssm's CUDA kernel,
which takes bf16 ``u``/``B``/``C`` and accumulates in float32); the scan output is cast back to ``dtype``.
With a float64 ``dtype`` (double-precision parity checks) they are float64.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprvr.ops.selective_scan import selective_scan

Dtype = Any

INITS = ("mamba", "mtm")


def _torch_default(fan_in: int):
    """torch's default Linear/Conv weight and bias init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dt_bias_init(dt_min: float, dt_max: float, floor: float):
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus

    return init


class Mamba(nn.Module):
    """``mamba_ssm`` Mamba-1 with ``use_fast_path=False``; ``(B, L, d_model) -> (B, L, d_model)``."""

    d_model: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # "auto": ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False
    init_scheme: str = "mamba"  # "mamba" | "mtm" (see the module docstring)
    scan: str = "sequential"  # selective_scan method (associative | sequential | chunked): measured, docs/benchmarks.md
    chunk_size: int = 64
    dtype: Dtype = jnp.float32  # compute dtype of the projections and the conv (the scan is float32)

    @nn.compact
    def __call__(self, h):
        if self.init_scheme not in INITS:
            raise ValueError(f"Mamba init_scheme must be one of {INITS}, got {self.init_scheme!r}")
        d_inner = int(self.expand * self.d_model)
        dt_rank = self.dt_rank or math.ceil(self.d_model / 16)
        n = self.d_state
        mtm = self.init_scheme == "mtm"
        stat = jnp.float64 if jnp.dtype(self.dtype) == jnp.float64 else jnp.float32  # dt, A, D and the scan
        normal = nn.initializers.normal(stddev=0.02)
        zeros = nn.initializers.zeros

        def dense(features, fan_in, name, use_bias, kernel_init=None, bias_init=None, dtype=self.dtype):
            return nn.Dense(features, use_bias=use_bias, name=name, dtype=dtype, param_dtype=jnp.float32,
                            kernel_init=kernel_init or (normal if mtm else _torch_default(fan_in)),
                            bias_init=bias_init or (zeros if mtm else _torch_default(fan_in)))

        seq_len = h.shape[1]
        xz = dense(2 * d_inner, self.d_model, "in_proj", self.bias)(h)
        x, z = jnp.split(xz, 2, axis=-1)
        x = nn.Conv(d_inner, kernel_size=(self.d_conv,), feature_group_count=d_inner,
                    padding=[(self.d_conv - 1, 0)], use_bias=self.conv_bias, name="conv1d",
                    dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=_torch_default(self.d_conv), bias_init=_torch_default(self.d_conv))(x)
        x = jax.nn.silu(x[:, :seq_len])
        x_dbl = dense(dt_rank + 2 * n, d_inner, "x_proj", False)(x)
        dt, b, c = jnp.split(x_dbl, [dt_rank, dt_rank + n], axis=-1)
        dt_std = dt_rank ** -0.5 * self.dt_scale
        dt = dense(d_inner, dt_rank, "dt_proj", True,
                   kernel_init=None if mtm else (lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -dt_std, dt_std)),
                   bias_init=None if mtm else _dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
                   dtype=stat)(dt)
        a_log = self.param("A_log", lambda k, s: jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), s)),
                           (d_inner, n))
        d_skip = self.param("D", nn.initializers.ones, (d_inner,))
        t = lambda v: jnp.swapaxes(v, 1, 2)  # noqa: E731  (B, L, C) -> (B, C, L), mamba_ssm's layout
        y = selective_scan(t(x), t(dt), -jnp.exp(a_log.astype(stat)), t(b), t(c), d_skip.astype(stat),
                           z=t(z), delta_softplus=True, method=self.scan, chunk_size=self.chunk_size)
        return dense(self.d_model, d_inner, "out_proj", self.bias)(t(y).astype(h.dtype))
