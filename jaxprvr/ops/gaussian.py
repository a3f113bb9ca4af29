"""Gaussian attention masks of GMMFormer (v1, v2) and MTM, as pure functions.

The official ``BertSelfAttention.generate_gauss_weight(props_len, width)``
(GMMFormer ``src/Models/gmmformer/model_components.py:186-199``, identical in GMMFormer_v2
``src/Models/gmmformerV2/model_components.py:263-276``) builds, for a key length ``L``::

    c_i = i / L                      (torch.arange(L) / L)
    x_j = linspace(0, 1, L)_j        (torch.linspace, computed on the CPU)
    s   = clamp(w, min=1e-2) / 9
    g_ij = 0.3989.../s * exp(-(x_j - c_i)^2 / (2 s^2)),   g /= max_j g_ij

and multiplies the *scaled* attention logits by it, before the additive padding mask
(``BertSelfAttention.forward``: GMMFormer ``model_components.py:220-231``, GMMFormer_v2 ``:297-307``).
The factor 0.3989.../s cancels in the row-max normalisation; it is kept so the
float32 rounding follows the official code. ``linspace`` and the divisions round exactly as torch's CPU
path; XLA's ``exp`` differs from torch's CPU ``exp`` by 1 ulp on about 9% of float32 inputs, so entries
of the mask can differ from the official ones by ~1e-7 (far below the parity tolerances).

Our arrays are padded statically to ``size`` while GMMFormer v1 builds the grid on the padded batch
length ``L <= size`` (a traced int32 in a jitted step). :func:`gaussian_mask` therefore returns a
``(size, size)`` array whose top-left ``L x L`` block is the official mask and whose other entries are
1 (no modulation). Positions ``>= L`` are padding, which the additive ``-10000`` key mask removes anyway,
so the rows/columns ``< L`` are the official ones (to the ``exp`` ulp above).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# 1/sqrt(2*pi) as written in the official code (model_components.py:195).
_GAUSS_NORM = 0.3989422804014327


def _gaussian_mask_f64(length, width, size: int):
    """:func:`gaussian_mask` in float64: ``c_i = i / L``, ``x_j`` = torch's ``linspace(0, 1, L)`` formula
    (``step * j`` below ``L // 2``, ``1 - step * (L - 1 - j)`` above), ``s = max(w, 1e-2) / 9``."""
    f64 = jnp.float64
    if width is None:
        return jnp.ones((size, size), f64)
    n = jnp.clip(jnp.asarray(length, jnp.int32), 1, size)
    nf = n.astype(f64)
    j = jnp.arange(size, dtype=f64)
    step = jnp.where(n > 1, 1.0 / jnp.maximum(nf - 1.0, 1.0), 0.0)
    pos = jnp.where(j < (n // 2).astype(f64), step * j, 1.0 - step * (nf - 1.0 - j))
    center = j / nf
    sigma = max(float(width), 1e-2) / 9.0
    diff = pos[None, :] - center[:, None]
    g = (_GAUSS_NORM / sigma) * jnp.exp(-(diff * diff) / (2.0 * sigma * sigma))
    valid = jnp.arange(size) < n
    inside = valid[:, None] & valid[None, :]
    row_max = jnp.max(jnp.where(valid[None, :], g, 0.0), axis=-1, keepdims=True)
    g = g / jnp.where(row_max > 0, row_max, 1.0)
    return jnp.where(inside, g, 1.0)


def _exact_div(a, b):
    """IEEE ``a / b`` for same-shape arrays: XLA's algebraic simplifier rewrites a division by a broadcast
    scalar into a multiplication by its reciprocal (an ulp off); the barrier keeps torch's true division."""
    return a / jax.lax.optimization_barrier(b)


def _torch_linspace_np(length: int) -> np.ndarray:
    """``torch.linspace(0, 1, L)`` of the torch CPU kernel, float32 (``RangeFactoriesKernel.cpp``).

    ``step = 1/(L-1)`` in float32; index ``j < L//2`` gives ``step*j``, the others ``1 - step*(L-1-j)``, and
    the AVX2/AVX512 builds contract the latter into one fused multiply-add (a single rounding), which is
    what float64 arithmetic rounded once to float32 reproduces. ``L == 1`` gives ``[0]``.
    """
    if length == 1:
        return np.zeros(1, np.float32)
    step = np.float64(np.float32(1.0) / np.float32(length - 1))
    j = np.arange(length, dtype=np.float64)
    x = np.where(j < length // 2, step * j, 1.0 - step * (length - 1 - j))
    return x.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _linspace_table(size: int) -> np.ndarray:
    """Row ``L-1`` = ``torch.linspace(0, 1, L)`` padded with zeros to ``size``, for L = 1..size."""
    table = np.zeros((size, size), np.float32)
    for n in range(1, size + 1):
        table[n - 1, :n] = _torch_linspace_np(n)
    return table


def linspace01(length, size: int):
    """``torch.linspace(0, 1, length)`` padded with zeros to ``size`` entries (float32), bit-exact.

    The exact values matter: for the narrow widths a 1-ulp change of ``x_j`` moves the exponent by ~1e-4.
    ``length`` may be a traced integer in ``[1, size]`` (then the row is read from a ``(size, size)`` table).
    """
    if isinstance(length, (int, np.integer)):
        row = np.zeros(size, np.float32)
        row[:length] = _torch_linspace_np(int(length))
        return jnp.asarray(row)
    index = jnp.clip(jnp.asarray(length, jnp.int32), 1, size) - 1
    return jnp.asarray(_linspace_table(size))[index]


def gaussian_mask(length, width: float | None, size: int, *, cuda_center: bool = False, dtype=jnp.float32):
    """The ``(size, size)`` multiplicative Gaussian mask of a GMMFormer attention branch.

    Args:
      length: the grid length ``L`` (Python int or traced int32 scalar), ``1 <= L <= size``; values
        below 1 are clamped to 1 (an all-padding batch never builds a grid in the official code).
      width: the branch width ``w``; ``None`` means plain attention (an all-ones mask).
      size: the static padded length.
      cuda_center: compute ``c_i = i * (1/L)`` as torch does when ``torch.arange(L).cuda() / L`` runs on a GPU
        (``div_true_kernel_cuda`` multiplies by the reciprocal of a scalar divisor); the default ``i / L`` is
        the torch CPU result. They differ by at most an ulp.
      dtype: float32 (the official rounding, above), or float64 (needs jax_enable_x64): the same formula in
        double precision, as the float64 twin computes it under ``torch.set_default_dtype(torch.float64)``
        (``python -m parity.check --dtype float64``).

    Returns:
      ``(size, size)`` in ``dtype``; entry ``[i, j]`` for ``i, j < L`` is the official ``g_ij``,
      every other entry is 1.
    """
    if jnp.dtype(dtype) == jnp.float64:
        return _gaussian_mask_f64(length, width, size)
    if width is None:
        return jnp.ones((size, size), jnp.float32)
    if isinstance(length, (int, np.integer)):
        length = max(int(length), 1)
        if length > size:
            raise ValueError(f"grid length {length} > size {size}")
    else:
        length = jnp.clip(jnp.asarray(length, jnp.int32), 1, size)
    n = jnp.asarray(length, jnp.int32)
    idx = jnp.arange(size, dtype=jnp.int32)
    nf = jnp.full((size,), n.astype(jnp.float32))
    i = idx.astype(jnp.float32)
    # torch.arange(L) / L (model_components.py:188)
    center = i * _exact_div(jnp.ones_like(nf), nf) if cuda_center else _exact_div(i, nf)
    pos = linspace01(length, size)
    # The width is static: sigma, 2 sigma^2 and the prefactor in numpy float32, exactly as torch rounds them.
    f32 = np.float32
    sigma = f32(max(f32(width), f32(1e-2))) / f32(9.0)  # clamp(1e-2) / 9
    two_var = f32(2.0) * (sigma * sigma)  # 2 * width**2
    prefactor = (f32(1.0) / sigma) * f32(_GAUSS_NORM)  # w / width = reciprocal(width) * w (__rtruediv__)
    diff = pos[None, :] - center[:, None]
    g = prefactor * jnp.exp(_exact_div(-(diff * diff), jnp.full((size, size), two_var)))
    valid = idx < n
    inside = valid[:, None] & valid[None, :]
    row_max = jnp.max(jnp.where(valid[None, :], g, 0.0), axis=-1, keepdims=True)
    # row_max is > 0 for every width/length the official models use; the guard only keeps padded
    # rows (and degenerate widths, where the official float32 code divides 0 by 0) finite.
    g = _exact_div(g, jnp.broadcast_to(jnp.where(row_max > 0, row_max, 1.0), g.shape))
    return jnp.where(inside, g, jnp.float32(1.0))
