"""MRNet's maskable retention (``RetLayer``) as pure functions: masks, position codes and attention.

Official source: xian-sh/MRNet @ 53432f5, ``ret/modeling/ret_model/``: ``ret_model.py`` (RetLayer L204-389,
``attention`` L135-161, ``MultiHeadedAttention`` L166-201), ``position_encoding.py`` (PositionEmbeddingSine
L35-72) and ``xpos_relative_position.py`` (XPOS L36-63 and its helpers L6-33). ``file Lx`` below is that code.

What RetLayer computes, per video (batch 1 there; any leading batch shape here):

* decay ``D = gamma^(n-m) [n >= m]`` (+ ``D^T``: diagonal 2) over the N video tokens (``_get_D`` L379-389);
* a learned, input-independent sparse mask ``Lambda = I + (1 - I) sigmoid(E)``, E an ``nn.Embedding(N*N, 1)``
  (L240, L257-262), and the sparsity loss ``mean |(1 - I) sigmoid(E)|`` (L243-246);
* the multiplicative mask ``M`` (L268-302): ``att_mode="all"``: ones over ``[n_txt queries ; N clips]`` except the
  clip-clip block, the product of the enabled masks; ``"v"``: only the (N, N) clip block;
* ``S_h = (Q_h / sqrt(d_k)) K_h^T``; ``A_h = softmax(S_h * M)``: the mask multiplies the LOGITS (a masked pair
  gets logit 0, weight exp(0)); attention dropout on ``A_h``; ``A_h V_h``; heads concatenated (L135-161,
  L190-196). ``att_softmax=False`` keeps the zero buffer (L145-157): the attention output is zero.

The batched port adds what the per-video loop does not need: padded query slots are excluded as keys
(``key_valid``, additive ``-inf`` after the multiplication) and the sine code is normalised by each video's TRUE
query count (a traced int).

Attention dropout interface (:class:`AttentionDropout`): the mask of the parallel form is
``jaxprvr.ops.dropout.dropout(key, probs, rate)`` over the whole ``(*batch, H, Lq, Lk)`` probability tensor, i.e.
element ``(b, h, i, j)`` is kept iff ``hash(key, flat index of (b, h, i, j))`` passes the threshold.
:func:`chunked_attention` recomputes those very hashes for each key block from the global ``(b, h, i, j)``
indices (:meth:`AttentionDropout.block`), so both forms drop exactly the same elements. From a Flax module, use
:func:`module_attention_dropout` (draws the ``'dropout'`` key like ``jaxprvr.models.layers.Dropout`` and records
it with ``sow_dropout_key`` so that ``torch_ref.dropout`` can replay the masks on a ``(*batch, H, Lq, Lk)`` tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.ops.dropout import _GOLDEN, _MAX_ELEMENTS, dropout as hash_dropout, fmix32, keep_scale, \
    keep_threshold, key_seeds

ATT_MODES = ("all", "v")
MASK_MODES = ("no", "ret", "sparse", "both")
SINE_EPS = 1e-6  # position_encoding.py L63
SINE_TEMPERATURE = 10000  # position_encoding.py L40
SINE_SCALE = 2 * math.pi  # position_encoding.py L47-49 (normalize=True, scale None)
XPOS_SCALE_BASE = 512  # xpos_relative_position.py L38


def _np_float(dtype) -> Any:
    return np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32


# ----------------------------------------------------------------------------------------------------- masks


def decay_mask(n: int, gamma: float, double: bool = True, dtype=jnp.float32) -> jax.Array:
    """``D[i, j] = gamma^(i - j) [i >= j]`` (+ ``D^T`` if ``double``: ``gamma^|i-j|`` off the diagonal, 2 on it),
    ``_get_D`` ret_model.py L379-389.

    There, ``gamma ** (n - m)`` is a float32 tensor (python float base, int64 exponent): ``float32(gamma)`` raised
    to the integer; ``m > n`` entries overflow to inf for small gamma, ``inf * 0 = nan`` and L384 zeroes NaNs.
    Here the powers of ``float32(gamma)`` are taken in float64 and rounded once to float32 (bit-identical to
    torch's float32 pow at the released (N, gamma) = (64, 0.98) and (128, 0.999); torch's own pow is not correctly
    rounded, so elsewhere an entry may differ by an ulp). ``dtype=float64``: ``gamma`` and the powers in float64.
    """
    f = _np_float(dtype)
    g = np.float64(np.float32(gamma)) if f is np.float32 else np.float64(gamma)
    k = np.arange(n)[:, None] - np.arange(n)[None, :]
    with np.errstate(over="ignore"):
        d = np.where(k >= 0, np.power(g, np.maximum(k, 0).astype(np.float64)), 0.0).astype(f)
    if double:
        d = d + d.T
    return jnp.asarray(d, dtype)


def _square_table(table) -> jax.Array:
    """E as (N, N): an (N*N, 1) embedding weight reshaped row-major (L258), or an (N, N) array as is."""
    table = jnp.asarray(table)
    if table.ndim == 2 and table.shape[1] == 1:
        n = math.isqrt(table.shape[0])
        if n * n == table.shape[0]:
            return table.reshape(n, n)
    if table.ndim == 2 and table.shape[0] == table.shape[1]:
        return table
    raise JaxprvrError("retention.sparse_mask", "an (N*N, 1) embedding table or an (N, N) array",
                       f"shape {tuple(table.shape)}")


def sparse_mask(table):
    """``(mask, off_diag)``: ``off = (1 - I) sigmoid(E)``, ``mask = I + off`` (ret_model.py L257-262), E the
    ``learn_vid_ret`` embedding weights, (N*N, 1) as stored or already (N, N)."""
    e = _square_table(table)
    n = e.shape[0]
    eye = jnp.eye(n, dtype=e.dtype)
    off = (1.0 - eye) * jax.nn.sigmoid(e)
    return eye + off, off


def sparsity_loss(table) -> jax.Array:
    """``mean(|off|)`` over all N*N entries, diagonal zeros included (ret_model.py L243-246, L296-300)."""
    return jnp.mean(jnp.abs(sparse_mask(table)[1]))


def multiplicative_mask(n_txt: int, decay, sparse, att_mode: str, mask_mode: str) -> jax.Array:
    """The mask ``M`` that multiplies the logits (ret_model.py L268-302).

    ``decay`` and ``sparse`` are (N, N) (:func:`decay_mask`, ``sparse_mask(...)[0]``; either may be None when
    ``mask_mode`` does not use it). ``att_mode="all"``: (n_txt + N, n_txt + N), ones except the clip-clip block
    ``[n_txt:, n_txt:]``; ``"v"``: (N, N). The block is ``1`` (``no``), ``D`` (``ret``), ``Lambda`` (``sparse``)
    or ``D * Lambda`` (``both``: L298-299 multiply a ones tensor by D, then by Lambda).
    """
    if att_mode not in ATT_MODES:
        raise JaxprvrError("model.att_mode", f"one of {list(ATT_MODES)}", repr(att_mode))
    if mask_mode not in MASK_MODES:
        raise JaxprvrError("model.mask_mode", f"one of {list(MASK_MODES)}", repr(mask_mode))
    ref = decay if decay is not None else sparse
    if ref is None:
        raise JaxprvrError("retention.multiplicative_mask", "the decay or the sparse (N, N) mask", "neither")
    n = ref.shape[-1]
    dtype = jnp.result_type(*[m for m in (decay, sparse) if m is not None])
    block = jnp.ones((n, n), dtype)
    if mask_mode in ("ret", "both"):
        block = block * decay
    if mask_mode in ("sparse", "both"):
        block = block * sparse
    if att_mode == "v":
        return block
    full = jnp.ones((n_txt + n, n_txt + n), dtype)
    return full.at[n_txt:, n_txt:].set(block)


# ----------------------------------------------------------------------------------------- position codes


def sine_dim_t(d: int, dtype=jnp.float32) -> np.ndarray:
    """``dim_t = temperature ** (2 * (i // 2) / d)``, i < d (position_encoding.py L66-68), on the host: the
    float32 exponent, the power taken in float64 and rounded once."""
    f = _np_float(dtype)
    expo = (2 * (np.arange(d) // 2)).astype(f) / f(d)
    return np.power(np.float64(SINE_TEMPERATURE), expo.astype(np.float64)).astype(f)


def sine_query_pe(n_valid, n_max: int, d: int, dtype=jnp.float32) -> jax.Array:
    """PositionEmbeddingSine(d, normalize=True) of the query tokens as RetLayer calls it (ret_model.py L314,
    L335: an all-ones ``(1, n_q)`` mask), for a batch padded to ``n_max`` query slots.

    position_encoding.py L61-70: ``x = cumsum(ones) = 1..n_q``; ``x = x / (x[-1] + 1e-6) * 2 pi`` (float32);
    ``pos = x / dim_t``; output ``[sin(pos_0), cos(pos_1), sin(pos_2), ...]`` (sin at even, cos at odd features).
    ``n_valid``: int array of any batch shape (traced is fine), the TRUE query count of each video; returns
    ``(*n_valid.shape, n_max, d)``, rows ``k >= n_valid`` zero.
    """
    n_valid = jnp.asarray(n_valid)
    k = jnp.arange(1, n_max + 1, dtype=dtype)  # cumsum of the all-ones mask
    last = n_valid.astype(dtype)[..., None]
    x = k / (last + jnp.asarray(SINE_EPS, dtype)) * jnp.asarray(SINE_SCALE, dtype)  # L64, left to right
    pos = x[..., None] / jnp.asarray(sine_dim_t(d, dtype))
    even = (jnp.arange(d) % 2) == 0
    pe = jnp.where(even, jnp.sin(pos), jnp.cos(pos))
    valid = jnp.arange(n_max) < n_valid[..., None]
    return jnp.where(valid[..., None], pe, jnp.zeros((), dtype))


def xpos_scale(d: int, dtype=jnp.float32) -> np.ndarray:
    """The ``XPOS.scale`` buffer, ``(arange(0, d, 2) + 0.4 d) / (1.4 d)`` (xpos_relative_position.py L43-45):
    float32 (int64 + python float), shape (d // 2,)."""
    f = _np_float(dtype)
    return ((np.arange(0, d, 2).astype(f) + f(0.4 * d)) / f(1.4 * d)).astype(f)


def _xpos_tables(length: int, d: int, scale_base: int, downscale: bool, dtype, scale=None):
    """(cos * s, sin * s), each (length, d) duplicate-interleaved (L47-62 with offset 0), on the host."""
    f = _np_float(dtype)
    s = xpos_scale(d, dtype) if scale is None else np.asarray(scale, f)
    half = s.shape[0]
    pos = np.arange(length).astype(f)
    # L51: scale ** (arange / scale_base)[:, None]; the power of float32 operands in float64, rounded once.
    expo = (pos / f(scale_base))[:, None]
    sc = np.power(s[None, :].astype(np.float64), expo.astype(np.float64)).astype(f)  # (length, d/2)
    # fixed_pos_embedding L6-12 on a (length, d/2) input: inv_freq = 1 / 10000 ** (arange(dim) / dim).
    inv = (f(1.0) / np.power(np.float64(10000.0), (np.arange(half).astype(f) / f(half)).astype(np.float64))
           .astype(f)).astype(f)
    inp = (pos[:, None] * inv[None, :]).astype(f)
    sin, cos = np.sin(inp.astype(np.float64)).astype(f), np.cos(inp.astype(np.float64)).astype(f)
    if downscale:  # L59-60
        sc = (f(1.0) / sc).astype(f)
    # apply_rotary_pos_emb L30-33: duplicate_interleave(t * scale) -> [a0, a0, a1, a1, ...]
    cos_s = np.repeat((cos * sc).astype(f), 2, axis=1)
    sin_s = np.repeat((sin * sc).astype(f), 2, axis=1)
    return cos_s, sin_s


def rotate_every_two(x):
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` over the last axis (xpos_relative_position.py L14-18)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return jnp.stack((-x2, x1), axis=-1).reshape(x.shape)


def xpos(x, downscale: bool = False, scale_base: int = XPOS_SCALE_BASE, scale=None):
    """XPOS(d).forward(x, offset=0, downscale) (xpos_relative_position.py L36-63) over the whole d-dim token.

    ``x`` (..., length, d), positions ``0..length-1`` along axis -2; ``x * cos * s^(n/512) +
    rotate_every_two(x) * sin * s^(n/512)``, ``s^(-n/512)`` when ``downscale`` (the keys). ``scale``: the buffer
    values if given (a converted ``xpos.scale``), else :func:`xpos_scale`. The sin/cos/power tables are host
    constants (float32 operands, float64 functions, rounded once), so they may differ from torch's float32
    ``sin``/``pow`` by an ulp.
    """
    length, d = x.shape[-2], x.shape[-1]
    if d % 2:
        raise JaxprvrError("retention.xpos", "an even token width", f"d={d}")
    cos_s, sin_s = _xpos_tables(length, d, scale_base, downscale, x.dtype, scale)
    return x * jnp.asarray(cos_s, x.dtype) + rotate_every_two(x) * jnp.asarray(sin_s, x.dtype)


# --------------------------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class AttentionDropout:
    """Inverted counter-hash dropout of the attention probabilities, addressable by block.

    ``self(probs)`` is ``jaxprvr.ops.dropout.dropout(key, probs, rate)`` on the whole ``(*batch, H, Lq, Lk)``
    tensor. ``block(p, full_shape, row0, col0)`` applies the SAME elements' decisions to the block
    ``probs[..., row0:row0 + p.shape[-2], col0:col0 + p.shape[-1]]`` (a traced ``col0`` is fine): every element's
    bits are the hash of its flat index in ``full_shape``; columns past ``full_shape[-1]`` (chunk padding) get
    some bits too but multiply zero probabilities.
    """

    key: Any
    rate: float

    def __call__(self, probs):
        return hash_dropout(self.key, probs, self.rate)

    def keep_block(self, full_shape, block_shape, row0=0, col0=0):
        """The keep mask (bool ``block_shape``) of the block starting at (row0, col0) of ``full_shape``."""
        if math.prod(full_shape) > _MAX_ELEMENTS:
            raise JaxprvrError("retention.AttentionDropout", "at most 2**32 attention probabilities",
                               f"{math.prod(full_shape)}")
        *lead, lq, lk = full_shape
        *blead, bq, bk = block_shape
        lead_n = math.prod(lead)
        rows = jnp.asarray(row0, jnp.uint32) + jax.lax.iota(jnp.uint32, bq)
        cols = jnp.asarray(col0, jnp.uint32) + jax.lax.iota(jnp.uint32, bk)
        bh = jax.lax.iota(jnp.uint32, lead_n).reshape(tuple(lead) or ())
        idx = ((bh[..., None, None] * np.uint32(lq) + rows[:, None]) * np.uint32(lk) + cols[None, :])
        idx = jnp.broadcast_to(idx, tuple(lead) + (bq, bk)).reshape(tuple(blead) + (bq, bk))
        s0, s1 = key_seeds(self.key)
        bits = fmix32(fmix32(idx * np.uint32(_GOLDEN) ^ s0) ^ s1)
        return bits >= keep_threshold(self.rate)

    def block(self, p, full_shape, row0=0, col0=0):
        if self.rate <= 0.0:
            return p
        if self.rate >= 1.0:
            return jnp.zeros_like(p)
        keep = self.keep_block(full_shape, p.shape, row0, col0)
        return jax.lax.select(keep, p * keep_scale(self.rate, p.dtype), jnp.zeros_like(p))


def module_attention_dropout(module, rate: Optional[float], deterministic: bool,
                             rng_collection: str = "dropout") -> Optional[AttentionDropout]:
    """An :class:`AttentionDropout` for a Flax ``module`` (call it inside the module's ``__call__``/compact
    method), or None when ``deterministic`` or ``rate`` is falsy. Draws one key as
    ``jaxprvr.models.layers.Dropout`` does (``make_rng``) and records it (``sow_dropout_key``: the
    ``dropout_keys`` collection, when mutable)."""
    if deterministic or not rate:
        return None
    from jaxprvr.models.layers import sow_dropout_key  # local: layers imports jaxprvr.ops

    key = module.make_rng(rng_collection)
    sow_dropout_key(module, key)
    return AttentionDropout(key, float(rate))


def _stat(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _logits(qh, kh):
    """(..., H, Lq, dk) x (..., H, Lk, dk) -> (..., H, Lq, Lk) in float32 (float64 for float64)."""
    st = _stat(qh.dtype)
    if qh.dtype == st and kh.dtype == st:
        return jnp.einsum("...hqd,...hkd->...hqk", qh, kh)
    return jnp.einsum("...hqd,...hkd->...hqk", qh, kh, preferred_element_type=st)


def _split_heads(x, n_heads):
    *lead, length, d = x.shape
    if d % n_heads:
        raise JaxprvrError("retention.attention", f"a width divisible by n_heads={n_heads}", f"d={d}")
    return jnp.swapaxes(x.reshape(*lead, length, n_heads, d // n_heads), -2, -3)  # (..., H, L, dk)


def _merge_heads(x):
    x = jnp.swapaxes(x, -2, -3)  # (..., L, H, dk)
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def _scaled_q(q, n_heads):
    dk = q.shape[-1] // n_heads
    # ret_model.py L136-137: q / math.sqrt(E), E = d_k (a python float divisor).
    return _split_heads(q, n_heads) / jnp.asarray(math.sqrt(dk), q.dtype)


def _check(q, k, v, mult_mask, key_valid):
    if k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise JaxprvrError("retention.attention", "q, k, v of shapes (..., L, d)",
                           f"q {q.shape}, k {k.shape}, v {v.shape}")
    if mult_mask is not None and tuple(mult_mask.shape[-2:]) != (q.shape[-2], k.shape[-2]):
        raise JaxprvrError("retention.attention", f"a mask of shape (..., {q.shape[-2]}, {k.shape[-2]})",
                           f"{tuple(mult_mask.shape)}")
    if key_valid is not None and key_valid.shape[-1] != k.shape[-2]:
        raise JaxprvrError("retention.attention", f"key_valid of shape (..., {k.shape[-2]})",
                           f"{tuple(key_valid.shape)}")


def masked_attention(q, k, v, mult_mask, key_valid, n_heads: int, *, softmax: bool = True,
                     dropout: Optional[Callable] = None):
    """RetLayer's attention in the parallel form (ret_model.py ``attention`` L135-161, heads L190-196).

    q, k, v: (..., L, d), already projected. Per head: ``S = (q_h / sqrt(d_k)) k_h^T`` (float32 logits, float64
    for float64 inputs), ``S * mult_mask`` (``(L, L)`` or broadcastable ``(..., L, L)``; None = no mask),
    keys with ``key_valid == 0`` (``(..., L)``; None = all valid) set to ``-inf`` AFTER the multiplication,
    row softmax (a row with no valid key gives zeros), ``dropout(probs)`` if given (a callable on the
    ``(..., H, Lq, Lk)`` probabilities, e.g. :class:`AttentionDropout`), ``probs @ v_h``, heads concatenated.
    ``softmax=False``: zeros of the output shape (the official zero buffer, L145-157).
    """
    _check(q, k, v, mult_mask, key_valid)
    if not softmax:
        return jnp.zeros(q.shape[:-1] + (v.shape[-1],), v.dtype)
    qh = _scaled_q(q, n_heads)
    kh, vh = _split_heads(k, n_heads), _split_heads(v, n_heads)
    s = _logits(qh, kh)
    if mult_mask is not None:
        mm = jnp.asarray(mult_mask, s.dtype)
        s = s * (mm[..., None, :, :] if mm.ndim > 2 else mm)  # L143-144, the same mask for every head
    if key_valid is not None:
        s = jnp.where((jnp.asarray(key_valid) != 0)[..., None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    den = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / jnp.where(den > 0, den, 1.0)
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum("...hqk,...hkd->...hqd", probs.astype(vh.dtype), vh)
    return _merge_heads(out)


def chunked_attention(q, k, v, mult_mask, key_valid, n_heads: int, chunk: int = 128, *, softmax: bool = True,
                      dropout: Optional[AttentionDropout] = None):
    """:func:`masked_attention` with the keys in blocks of ``chunk`` and an online softmax (``lax.scan`` over
    the blocks: running max, rescaled denominator and accumulator), so the (Lq, Lk) logits never exist at once.

    Lk need not be a multiple of ``chunk`` (the last block is padded with invalid keys). ``dropout`` must address
    blocks (:class:`AttentionDropout`): each block's keep decisions are those of the parallel form's element
    ``(b, h, i, j)``, applied to the unnormalised weights (``keep * exp(s - m) / (1 - rate)``) before the
    division by the final denominator: the same value as dropping the normalised probabilities.
    """
    _check(q, k, v, mult_mask, key_valid)
    if dropout is not None and not isinstance(dropout, AttentionDropout):
        raise JaxprvrError("retention.chunked_attention", "an AttentionDropout (addressable by block) or None",
                           type(dropout).__name__)
    if not softmax:
        return jnp.zeros(q.shape[:-1] + (v.shape[-1],), v.dtype)
    chunk = int(chunk)
    if chunk < 1:
        raise JaxprvrError("model.attention_chunk", "a positive block size", str(chunk))
    lq, lk = q.shape[-2], k.shape[-2]
    nc = -(-lk // chunk)
    pad = nc * chunk - lk
    qh = _scaled_q(q, n_heads)  # (..., H, Lq, dk)
    kh, vh = _split_heads(k, n_heads), _split_heads(v, n_heads)
    st = _stat(qh.dtype)
    lead = jnp.broadcast_shapes(qh.shape[:-2], kh.shape[:-2])  # (..., H)
    full_shape = tuple(lead) + (lq, lk)
    kv = jnp.ones(k.shape[:-1], bool) if key_valid is None else jnp.asarray(key_valid) != 0
    mm = jnp.ones((lq, lk), st) if mult_mask is None else jnp.asarray(mult_mask, st)

    def blocks(x, axis):  # split `axis` (of length lk) into (nc, ..., chunk, ...) with the block axis first
        x = jnp.moveaxis(x, axis, -1)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
        x = x.reshape(*x.shape[:-1], nc, chunk)
        return jnp.moveaxis(jnp.moveaxis(x, -2, 0), -1, axis)

    kb = blocks(kh, -2)  # (nc, ..., H, chunk, dk)
    vb = blocks(vh, -2)
    validb = blocks(kv, -1)  # (nc, ..., chunk)
    maskb = blocks(mm, -1)  # (nc, ..., Lq, chunk)
    dk_v = vh.shape[-1]
    m0 = jnp.full(tuple(lead) + (lq,), -jnp.inf, st)
    s0 = jnp.zeros(tuple(lead) + (lq,), st)
    acc0 = jnp.zeros(tuple(lead) + (lq, dk_v), st)

    def step(carry, xs):
        m, den, acc = carry
        kc, vc, valc, mc, c = xs
        s = _logits(qh, kc)  # (..., H, Lq, chunk)
        s = s * (mc[..., None, :, :] if mc.ndim > 2 else mc)
        s = jnp.where(valc[..., None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)  # m = -inf -> 0
        p = jnp.exp(s - m_safe[..., None])
        den = den * alpha + jnp.sum(p, axis=-1)
        if dropout is not None:
            p = dropout.block(p, full_shape, 0, c * chunk)
        pv = jnp.einsum("...hqk,...hkd->...hqd", p.astype(vc.dtype), vc)
        acc = acc * alpha[..., None] + pv.astype(st)
        return (m_new, den, acc), None

    xs = (kb, vb, validb, maskb, jnp.arange(nc, dtype=jnp.uint32))
    (m, den, acc), _ = jax.lax.scan(step, (m0, s0, acc0), xs)
    out = acc / jnp.where(den > 0, den, 1.0)[..., None]
    return _merge_heads(out.astype(v.dtype))
