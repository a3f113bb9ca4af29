"""MRNet/MMN's 2-D temporal proposal map: valid cells, the max-pooled map, the conv renormalisation weights,
candidate spans and IoU targets.

Official source: xian-sh/MRNet @ 53432f5 (MMN code): ``ret/modeling/ret_model/feat2d.py`` (SparseMaxPool
L3-38), ``ret/modeling/ret_model/proposal_conv.py`` (``get_padded_mask_and_weight`` L13-17, ProposalConv
L20-46) and ``ret/data/datasets/utils.py`` (``iou`` L11-17, ``score2d_to_moments_scores`` L34-39,
``moment_to_iou2d`` L42-46).

Cell ``(i, j)`` (``i <= j``) is the span of clips ``i..j``, in seconds ``[i * dur / N, (j + 1) * dur / N]``.
The static parts (mask, weights, spans, targets) are numpy on the host; :func:`proposal_map` is jnp.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprvr.errors import JaxprvrError


def _pool_plan(pooling_counts: Sequence[int]):
    """The official pooler list (feat2d.py L21-25) as (kernel, stride) pairs."""
    plan = [(2, 1)] * int(pooling_counts[0])
    for c in pooling_counts[1:]:
        plan += [(3, 2)] + [(2, 1)] * (int(c) - 1)
    return plan


def mask2d(n: int, pooling_counts: Sequence[int]) -> np.ndarray:
    """The valid proposal cells, bool (n, n) (feat2d.py L6-19): the diagonal, then per group ``c`` diagonals at
    offsets ``+stride`` with rows ``0, stride, 2 stride, ...`` (stride 1, 2, 4, ...). N=64 [15, 8, 8]: 1104 cells;
    N=128 [15, 8, 8, 8]: 2548.

    Raises a JaxprvrError where the official pooling chain itself fails (a MaxPool1d given fewer positions than
    its kernel: ``pooling_counts`` reach past N)."""
    if not pooling_counts or any(int(c) < 1 for c in pooling_counts) or n < 1:
        raise JaxprvrError("model.pooling_counts", "positive pooling counts and N >= 1",
                           f"{list(pooling_counts)} with N={n}")
    length = n
    for kernel, stride in _pool_plan(pooling_counts):
        if length < kernel:
            raise JaxprvrError("model.pooling_counts", f"a pooling chain that fits N={n} clips (the official "
                               "SparseMaxPool's MaxPool1d needs at least its kernel)",
                               f"{list(pooling_counts)}: a ({kernel}, {stride}) pool on {length} positions",
                               hint="lower the last pooling count or raise model.num_clips")
        length = (length - kernel) // stride + 1
    m = np.zeros((n, n), bool)
    m[np.arange(n), np.arange(n)] = True
    stride, offset = 1, 0
    for c in pooling_counts:
        for _ in range(int(c)):
            offset += stride
            i = np.arange(0, n - offset, stride)
            m[i, i + offset] = True
        stride *= 2
    return m


def proposal_map(x, mask) -> jax.Array:
    """``(B, n, n, C)``: cell ``(i, j)`` = ``max(x[:, i..j, :])`` where ``mask`` (bool (n, n)), 0 elsewhere.

    Equal to SparseMaxPool.forward (feat2d.py L31-38): the cumulative MaxPool1d chain (2,1)..., (3,2), (2,1)...
    fills diagonal ``offset`` with the max over ``offset + 1`` consecutive clips at the mask's start rows.
    ``x``: (B, n, C), channels last."""
    x = jnp.asarray(x)
    n = x.shape[-2]
    mask = jnp.asarray(mask, bool)
    if mask.shape != (n, n):
        raise JaxprvrError("proposals.proposal_map", f"a ({n}, {n}) mask", f"{tuple(mask.shape)}")
    upper = jnp.arange(n)[None, :] >= jnp.arange(n)[:, None]  # j >= i
    lo = jnp.asarray(-jnp.inf, x.dtype)
    grid = jnp.where(upper[None, :, :, None], x[:, None, :, :], lo)  # (B, i, j, C): x[j] for j >= i
    run = jax.lax.cummax(grid, axis=2)  # max over x[i..j]
    return jnp.where(mask[None, :, :, None], run, jnp.zeros((), x.dtype))


def _box_counts(m: np.ndarray, k: int, pad: int) -> np.ndarray:
    """``conv2d(m, ones(k, k), padding=pad)`` as exact integer counts (valid correlation of the padded map)."""
    mp = np.pad(m.astype(np.int64), pad)
    c = np.zeros((mp.shape[0] + 1, mp.shape[1] + 1), np.int64)
    c[1:, 1:] = mp.cumsum(0).cumsum(1)
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def conv_mask_weights(mask, kernel: int, layers: int) -> list:
    """The per-layer ``masked_weight`` of ProposalConv (proposal_conv.py L13-17, L27-33, L39-43): layer ``l``
    counts the previous layer's valid cells under each ``kernel x kernel`` window (``torch.round`` of the float
    ``F.conv2d`` with a ones kernel; here exact integers), weight ``1 / count`` where ``count > 0``, else 0; the
    next layer's mask is ``weight > 0``. Padding ``(kernel - 1) * layers // 2`` on the first conv, none after.
    Returns ``layers`` float32 arrays; their sizes go ``n + 2p - k + 1``, then ``- (k - 1)`` per layer (back to
    ``n`` when ``(k - 1) * layers`` is even, as in every released config)."""
    m = np.asarray(mask, bool)
    k = int(kernel)
    pad = (k - 1) * int(layers) // 2
    out = []
    for layer in range(int(layers)):
        p = pad if layer == 0 else 0
        if m.shape[0] + 2 * p < k:
            raise JaxprvrError("model.predictor_kernel", f"a kernel that fits the {m.shape[0] + 2 * p}-cell map",
                               f"kernel {k} at layer {layer}")
        cnt = _box_counts(m, k, p).astype(np.float32)
        w = np.zeros_like(cnt)
        w[cnt > 0] = np.float32(1.0) / cnt[cnt > 0]
        out.append(w)
        m = w > 0
    return out


def candidate_spans(n: int, duration) -> np.ndarray:
    """``(..., n, n, 2)`` float32 ``[i * dur / n, (j + 1) * dur / n]`` for every cell, in the official float32
    arithmetic (utils.py L34-39: an int64 index tensor times a python float gives float32, then ``/ n``):
    ``float32(float32(i) * float32(dur)) / float32(n)``. ``duration``: a scalar or an array (leading dims)."""
    f = np.float32
    d = np.asarray(duration, f)[..., None]
    idx = np.arange(n + 1, dtype=f)
    pos = (idx * d) / f(n)  # (..., n + 1): positions 0..n in seconds
    start = np.broadcast_to(pos[..., :n, None], pos.shape[:-1] + (n, n))
    end = np.broadcast_to(pos[..., None, 1:], pos.shape[:-1] + (n, n))
    return np.stack([start, end], axis=-1)


def iou_1d(candidates, gt) -> np.ndarray:
    """1-D IoU in float32 (utils.py L11-17): ``max(min(e1, e2) - max(s1, s2), 0) / (max(e1, e2) - min(s1, s2))``;
    ``candidates`` (..., 2), ``gt`` (..., 2), broadcast. Spans that only touch (or are reversed, the ``i > j``
    cells) have IoU 0; two identical zero-length spans give 0/0 = NaN as in the official code."""
    c = np.asarray(candidates, np.float32)
    g = np.asarray(gt, np.float32)
    start, end = c[..., 0], c[..., 1]
    s, e = g[..., 0], g[..., 1]
    inter = np.minimum(end, e) - np.maximum(start, s)
    union = np.maximum(end, e) - np.minimum(start, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.maximum(inter, np.float32(0)) / union).astype(np.float32)


def moment_to_iou2d(moments, duration, n: int) -> np.ndarray:
    """``(Q, n, n)`` float32 IoU of every cell's span with each GT moment (utils.py L42-46), all n*n cells:
    the ``i > j`` cells have ``end <= start``, so their intersection is ``<= 0`` and their IoU is 0 (mask2d drops
    them anyway). ``moments`` (Q, 2) or (2,) seconds; ``duration`` a scalar or (Q,). A (2,) moment gives (n, n)."""
    mom = np.asarray(moments, np.float32)
    single = mom.ndim == 1
    mom = mom.reshape(-1, 2)
    dur = np.asarray(duration, np.float32)
    spans = candidate_spans(n, dur)  # (n, n, 2) or (Q, n, n, 2)
    if spans.ndim == 3:
        spans = spans[None]
    out = iou_1d(spans, mom[:, None, None, :])
    return out[0] if single else out
