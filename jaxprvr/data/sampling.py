"""Temporal resampling and normalisation of features, bit-exact with the official PRVR code.

All four official repositories (MS-SL, GMMFormer, GMMFormer v2, MTM) build the model inputs of a video
from its raw frame matrix ``F (n, d)`` with the same two functions, and normalise every row the same way
(ms-sl ``method/data_provider.py:27-70``; GMMFormer ``src/Datasets/data_provider.py:29-71``):

* :func:`average_to_fixed_length` -> the clip-level input ``(map_size, d)``, always ``map_size`` rows;
* :func:`uniform_feature_sampling` -> the frame-level input ``(min(n, max_len), d)``;
* :func:`l2_normalize_rows` -> ``x / (||x||_2 + eps)`` per row.

Both resamplers split ``[0, n)`` into bins with edges ``round(arange(0, bins + 1) / bins * n)`` and average
each bin. The two official functions compute the edges in different float precisions, and this matters for
bin counts that are not powers of two (e.g. 24 bins of 54 frames: bin 14's edge is 31.499998 in float32
but exactly 31.5 in float64, which rounds to 32), so :func:`bin_edges` takes the dtype explicitly.
"""

from __future__ import annotations

import numpy as np


def bin_edges(n: int, n_bins: int, dtype=np.float64) -> np.ndarray:
    """The ``n_bins + 1`` clamped bin edges the official resamplers use for ``n`` frames.

    ``round(arange(0, n_bins + 1) / n_bins * n)``, computed in ``dtype`` with round-half-to-even
    (torch.round and np.round agree), then clamped to ``<= n - 1``. The clamp is an official quirk: the last
    edge becomes ``n - 1``, an *exclusive* end, so the last raw frame never enters the last bin's mean.
    """
    if n < 1:
        raise ValueError(f"bin_edges: expected at least one frame, found n={n}")
    dtype = np.dtype(dtype)
    positions = np.arange(0, n_bins + 1, dtype=dtype) / dtype.type(n_bins) * dtype.type(n)
    return np.minimum(np.round(positions).astype(np.int64), n - 1)


def _bin_means(feats: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Row ``i`` = mean of ``feats[edges[i]:edges[i+1]]`` if that range is non-empty, else ``feats[edges[i]]``."""
    rows = []
    for start, end in zip(edges[:-1], edges[1:]):
        rows.append(feats[start:end].mean(axis=0) if start < end else feats[start])
    return np.stack(rows, axis=0)


def average_to_fixed_length(feats: np.ndarray, map_size: int = 32) -> np.ndarray:
    """Resamples ``feats (n, d)`` to exactly ``map_size`` rows (the clip-level input).

    Official ``average_to_fixed_length`` (ms-sl ``method/data_provider.py:27-47``): the edges come from
    ``torch.arange(0, map_size + 1, 1.0)``, which is **float32** whatever the feature dtype, and torch.round;
    each bin is averaged in the features' own dtype (float64 in the official loaders, see
    :mod:`jaxprvr.data.dataset`). Videos shorter than ``map_size`` repeat frames.
    """
    feats = np.asarray(feats)
    return _bin_means(feats, bin_edges(feats.shape[0], map_size, np.float32))


def uniform_feature_sampling(feats: np.ndarray, max_ctx_l: int = 128) -> np.ndarray:
    """Caps ``feats (n, d)`` at ``max_ctx_l`` rows (the frame-level input).

    Official ``uniform_feature_sampling`` (ms-sl ``method/data_provider.py:49-64``): returned unchanged
    when ``n <= max_ctx_l``; otherwise averaged into ``max_ctx_l`` bins whose edges come from
    ``np.arange(0, max_len + 1, 1.0)`` (**float64**) and np.round.
    """
    feats = np.asarray(feats)
    if feats.shape[0] <= max_ctx_l:
        return feats
    return _bin_means(feats, bin_edges(feats.shape[0], max_ctx_l, np.float64))


def l2_normalize_rows(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """``x / (||x||_2 + eps)`` along the last axis, eps *added* to the norm (``l2_normalize_np_array``,
    ms-sl ``method/data_provider.py:67-69``). Keeps the dtype of ``x``; an all-zero row stays zero."""
    x = np.asarray(x)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)
