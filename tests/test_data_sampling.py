"""Sampling against loop-based transcriptions of the official ``average_to_fixed_length`` and
``uniform_feature_sampling`` (ms-sl ``method/data_provider.py:27-64``) and against the official torch calls."""

import math

import numpy as np
import pytest

from jaxprvr.data.sampling import (average_to_fixed_length, bin_edges, l2_normalize_rows,
                                   uniform_feature_sampling)

LENGTHS = [1, 2, 3, 5, 16, 31, 32, 33, 47, 64, 100, 127, 128, 129, 130, 200, 255, 256, 257, 300, 1000]
LENGTHS += np.random.default_rng(0).integers(1, 700, size=40).tolist()


# --- independent references (Python scalars and loops; Python's round() is half-to-even) ---

def ref_edges(n, n_bins, float_type):
    """round(k / n_bins * n) evaluated in ``float_type`` scalar arithmetic, clamped to n - 1."""
    edges = []
    for k in range(n_bins + 1):
        x = float_type(k) / float_type(n_bins) * float_type(n)
        edges.append(min(round(float(x)), n - 1))
    return edges


def ref_bin_means(feats, edges):
    rows = []
    for i in range(len(edges) - 1):
        s, e = edges[i], edges[i + 1]
        if s < e:
            total = np.zeros(feats.shape[1], dtype=np.float64)
            for t in range(s, e):
                total = total + feats[t]
            rows.append(total / (e - s))
        else:
            rows.append(np.array(feats[s], dtype=np.float64))
    return np.stack(rows)


def ref_average_to_fixed_length(feats, map_size=32):
    """Clip-level input: edges in float32 (torch.arange(..., 1.0) is float32)."""
    return ref_bin_means(feats, ref_edges(len(feats), map_size, np.float32))


def ref_uniform_feature_sampling(feats, max_len=128):
    """Frame-level input: unchanged up to max_len, else edges in float64 (np.arange(..., 1.0))."""
    if len(feats) <= max_len:
        return np.array(feats)
    return ref_bin_means(feats, ref_edges(len(feats), max_len, float))


def ref_l2_normalize(x, eps=1e-5):
    out = np.empty_like(x)
    for i, row in enumerate(x):
        norm = math.sqrt(sum(float(v) * float(v) for v in row))
        out[i] = row / (norm + eps)
    return out


def _feats(n, d=5, seed=0):
    return np.random.default_rng([seed, n]).standard_normal((n, d))


# --- tests ---

@pytest.mark.parametrize("n", LENGTHS)
def test_average_to_fixed_length_matches_reference(n):
    feats = _feats(n)
    np.testing.assert_array_equal(bin_edges(n, 32, np.float32), ref_edges(n, 32, np.float32))
    out = average_to_fixed_length(feats, 32)
    assert out.shape == (32, feats.shape[1]) and out.dtype == np.float64
    np.testing.assert_allclose(out, ref_average_to_fixed_length(feats, 32), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n", LENGTHS)
def test_uniform_feature_sampling_matches_reference(n):
    feats = _feats(n)
    out = uniform_feature_sampling(feats, 128)
    assert out.shape == (min(n, 128), feats.shape[1])
    if n <= 128:
        np.testing.assert_array_equal(out, feats)
    else:
        np.testing.assert_array_equal(bin_edges(n, 128, np.float64), ref_edges(n, 128, float))
        np.testing.assert_allclose(out, ref_uniform_feature_sampling(feats, 128), rtol=1e-12, atol=1e-14)


def test_edge_precision_differs_for_non_power_of_two_bins():
    """24 bins over 54 frames: 14/24*54 is 31.499998 in float32 (-> 31) but 31.5 in float64 (-> 32)."""
    assert bin_edges(54, 24, np.float32)[14] == 31
    assert bin_edges(54, 24, np.float64)[14] == 32
    for n in range(1, 400):
        for bins in (24, 48, 100):
            np.testing.assert_array_equal(bin_edges(n, bins, np.float32), ref_edges(n, bins, np.float32))
            np.testing.assert_array_equal(bin_edges(n, bins, np.float64), ref_edges(n, bins, float))


def test_last_frame_quirk_known_answer():
    """The clamp makes the last edge n-1 exclusive: with 64 frames the last clip is frame 62 alone."""
    feats = np.arange(64, dtype=np.float64)[:, None] * np.ones((1, 3))
    out = average_to_fixed_length(feats, 32)
    np.testing.assert_array_equal(out[31], [62.0, 62.0, 62.0])
    np.testing.assert_array_equal(out[0], [0.5, 0.5, 0.5])  # frames 0 and 1
    one = average_to_fixed_length(feats[:1], 32)  # a 1-frame video repeats its frame
    np.testing.assert_array_equal(one, np.zeros((32, 3)))


def test_l2_normalize_rows():
    x = np.random.default_rng(3).standard_normal((7, 9)).astype(np.float32)
    x[2] = 0.0
    out = l2_normalize_rows(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref_l2_normalize(x), rtol=1e-6)
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_allclose(l2_normalize_rows(np.array([[3.0, 4.0]])), [[3 / 5.00001, 4 / 5.00001]], rtol=1e-15)


def test_against_official_torch_calls():
    """The official average_to_fixed_length (ms-sl method/data_provider.py:27-47), written with the same torch
    calls; checked on the clip size 32 and on sizes where float32 and float64 edges differ."""
    torch = pytest.importorskip("torch")

    def torch_average_to_fixed_length(visual_input, map_size):
        visual_input = torch.from_numpy(visual_input)
        num_clips = visual_input.shape[0]
        idxs = torch.arange(0, map_size + 1, 1.0) / map_size * num_clips
        idxs = torch.min(torch.round(idxs).long(), torch.tensor(num_clips - 1))
        rows = []
        for i in range(map_size):
            s, e = idxs[i].item(), idxs[i + 1].item()
            rows.append(torch.mean(visual_input[s:e], dim=0) if s < e else visual_input[s])
        return torch.stack(rows, dim=0).numpy(), idxs.numpy()

    for map_size in (32, 24, 48):
        for n in LENGTHS + [54, 102, 108]:
            feats = _feats(n)
            expected, idxs = torch_average_to_fixed_length(feats, map_size)
            np.testing.assert_array_equal(bin_edges(n, map_size, np.float32), idxs)
            np.testing.assert_allclose(average_to_fixed_length(feats, map_size), expected, rtol=1e-12, atol=1e-14)
