"""jaxprvr.ops.proposals against torch transcriptions of the official MMN/MRNet lines (xian-sh/MRNet @ 53432f5:
``feat2d.py`` L6-38, ``proposal_conv.py`` L13-17 and L27-43, ``ret/data/datasets/utils.py`` L11-17, L34-46) and
against brute-force loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jaxprvr.errors import JaxprvrError
from jaxprvr.ops.proposals import candidate_spans, conv_mask_weights, iou_1d, mask2d, moment_to_iou2d, proposal_map


# ---------------------------------------------------------------- torch transcriptions of the official lines
class TorchSparseMaxPool:
    """feat2d.py L3-38 (CPU: the ``.to("cuda")`` dropped)."""

    def __init__(self, pooling_counts, N):
        mask = torch.zeros(N, N, dtype=torch.bool)
        mask[range(N), range(N)] = 1
        stride, offset = 1, 0
        maskij = []
        for c in pooling_counts:
            for _ in range(c):
                offset += stride
                i, j = range(0, N - offset, stride), range(offset, N, stride)
                mask[i, j] = 1
                maskij.append((i, j))
            stride *= 2
        poolers = [nn.MaxPool1d(2, 1) for _ in range(pooling_counts[0])]
        for c in pooling_counts[1:]:
            poolers.extend([nn.MaxPool1d(3, 2)] + [nn.MaxPool1d(2, 1) for _ in range(c - 1)])
        self.mask2d, self.maskij, self.poolers = mask, maskij, poolers

    def forward(self, x):
        B, D, N = x.shape
        map2d = x.new_zeros(B, D, N, N)
        map2d[:, :, range(N), range(N)] = x
        for pooler, (i, j) in zip(self.poolers, self.maskij):
            x = pooler(x)
            map2d[:, :, i, j] = x
        return map2d


def torch_padded_mask_and_weight(mask, conv):
    """proposal_conv.py L13-17 (``.cuda()`` dropped)."""
    masked_weight = torch.round(F.conv2d(mask.clone().float(), torch.ones(1, 1, *conv.kernel_size),
                                         stride=conv.stride, padding=conv.padding, dilation=conv.dilation))
    masked_weight[masked_weight > 0] = 1 / masked_weight[masked_weight > 0]
    padded_mask = masked_weight > 0
    return padded_mask, masked_weight


def torch_conv_weights(mask2d_t, k, layers):
    """ProposalConv L27-33 and the mask loop of forward L39-43."""
    first_padding = (k - 1) * layers // 2
    convs = [nn.Conv2d(1, 1, k, padding=first_padding)] + [nn.Conv2d(1, 1, k) for _ in range(layers - 1)]
    padded = mask2d_t[None, None]
    out = []
    for conv in convs:
        padded, w = torch_padded_mask_and_weight(padded, conv)
        out.append(w[0, 0].numpy())
    return out


def torch_iou(candidates, gt):
    """utils.py L11-17."""
    start, end = candidates[:, 0], candidates[:, 1]
    s, e = gt[0].float(), gt[1].float()
    inter = end.min(e) - start.max(s)
    union = end.max(e) - start.min(s)
    return inter.clamp(min=0) / union


def torch_score2d_to_moments_scores(score2d, num_clips, duration):
    """utils.py L34-39."""
    grids = score2d.nonzero()
    scores = score2d[grids[:, 0], grids[:, 1]]
    grids[:, 1] += 1
    moments = grids * duration / num_clips
    return moments, scores


def torch_moment_to_iou2d(moment, num_clips, duration):
    """utils.py L42-46."""
    iou2d = torch.ones(num_clips, num_clips)
    candidates, _ = torch_score2d_to_moments_scores(iou2d, num_clips, duration)
    return torch_iou(candidates, moment).reshape(num_clips, num_clips)


# ------------------------------------------------------------------------------------------------- mask2d
@pytest.mark.parametrize("n,counts,cells", [(64, [15, 8, 8], 1104), (128, [15, 8, 8, 8], 2548)])
def test_mask2d_released_sizes(n, counts, cells):
    m = mask2d(n, counts)
    assert m.dtype == bool and m.shape == (n, n) and int(m.sum()) == cells
    np.testing.assert_array_equal(m, TorchSparseMaxPool(counts, n).mask2d.numpy())
    assert not np.tril(m, -1).any()


@pytest.mark.parametrize("n,counts", [(16, [3, 2, 1]), (9, [2, 1]), (32, [7, 4, 4]), (5, [4]), (12, [1, 1, 1])])
def test_mask2d_tiny_and_brute_force(n, counts):
    m = mask2d(n, counts)
    np.testing.assert_array_equal(m, TorchSparseMaxPool(counts, n).mask2d.numpy())
    # brute force: offset o is filled (rows multiple of its group's stride) iff o is one of the chain's offsets
    offsets, stride, o = {0: 1}, 1, 0
    for c in counts:
        for _ in range(c):
            o += stride
            offsets[o] = stride
        stride *= 2
    want = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(i, n):
            want[i, j] = (j - i) in offsets and i % offsets[j - i] == 0
    np.testing.assert_array_equal(m, want)


def test_mask2d_pooling_past_n_is_a_named_error():
    with pytest.raises(JaxprvrError, match="pooling_counts"):
        mask2d(16, [15, 8, 8])  # the official chain's MaxPool1d would get fewer positions than its kernel
    with pytest.raises(RuntimeError):  # ... as the transcription shows
        TorchSparseMaxPool([15, 8, 8], 16).forward(torch.zeros(1, 1, 16))


# ------------------------------------------------------------------------------------------- proposal_map
@pytest.mark.parametrize("n,counts", [(64, [15, 8, 8]), (16, [3, 2, 1]), (9, [2, 1])])
def test_proposal_map_equals_the_pooling_chain_and_brute_force(n, counts):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, n, 5)).astype(np.float32)
    m = mask2d(n, counts)
    got = np.asarray(jax.jit(proposal_map)(x, m))
    ref = TorchSparseMaxPool(counts, n).forward(torch.from_numpy(x).transpose(1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, ref)
    brute = np.zeros_like(got)
    for i in range(n):
        for j in range(i, n):
            if m[i, j]:
                brute[:, i, j] = x[:, i:j + 1].max(1)
    np.testing.assert_array_equal(got, brute)


def test_proposal_map_tacos_size():
    n, counts = 128, [15, 8, 8, 8]
    x = np.random.default_rng(1).standard_normal((1, n, 3)).astype(np.float32)
    m = mask2d(n, counts)
    ref = TorchSparseMaxPool(counts, n).forward(torch.from_numpy(x).transpose(1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(proposal_map(x, m)), ref)


def test_proposal_map_gradient_routes_to_the_argmax():
    n, counts = 16, [3, 2, 1]
    x = np.random.default_rng(1).standard_normal((1, n, 3)).astype(np.float32)
    m = mask2d(n, counts)
    xt = torch.from_numpy(x).transpose(1, 2).clone().requires_grad_(True)
    TorchSparseMaxPool(counts, n).forward(xt).sum().backward()  # the official chain's gradient
    g = np.asarray(jax.grad(lambda a: proposal_map(a, m).sum())(jnp.asarray(x)))
    np.testing.assert_array_equal(g, xt.grad.transpose(1, 2).numpy())
    want = np.zeros_like(x)  # brute force: every valid cell routes 1 to its argmax clip (distinct values)
    for i, j in zip(*np.nonzero(m)):
        for c in range(3):
            want[0, i + np.argmax(x[0, i:j + 1, c]), c] += 1
    np.testing.assert_array_equal(g, want)


# ------------------------------------------------------------------------------------------ conv weights
@pytest.mark.parametrize("n,counts,k,layers", [
    (64, [15, 8, 8], 9, 4),  # ActivityNet
    (64, [15, 8, 8], 17, 2),  # Charades
    (128, [15, 8, 8, 8], 5, 3),  # TACoS
    (16, [3, 2, 1], 3, 2), (9, [2, 1], 3, 1), (12, [3, 2], 4, 2), (8, [3, 1], 2, 3),
])
def test_conv_mask_weights_match_official(n, counts, k, layers):
    m = mask2d(n, counts)
    got = conv_mask_weights(m, k, layers)
    ref = torch_conv_weights(torch.from_numpy(m), k, layers)
    assert len(got) == layers
    for g, r in zip(got, ref):
        assert g.dtype == np.float32 and g.shape == r.shape
        np.testing.assert_array_equal(g, r)
    if (k - 1) * layers % 2 == 0:
        assert got[-1].shape == (n, n)


@pytest.mark.parametrize("n,counts,k,layers", [(16, [3, 2, 1], 3, 3), (12, [3, 2], 4, 2)])
def test_conv_weights_brute_force_loops(n, counts, k, layers):
    # independent loops: pad, count the window, 1 / count; the NEXT layer counts this layer's support
    # (a port that recounted mask2d at every layer, or padded every layer, fails here or on the shapes)
    got = conv_mask_weights(mask2d(n, counts), k, layers)
    m = mask2d(n, counts).astype(int)
    for layer in range(layers):
        p = (k - 1) * layers // 2 if layer == 0 else 0
        mp = np.pad(m, p)
        size = mp.shape[0] - k + 1
        w = np.zeros((size, size), np.float32)
        for i in range(size):
            for j in range(size):
                c = mp[i:i + k, j:j + k].sum()
                w[i, j] = np.float32(1) / np.float32(c) if c else 0
        np.testing.assert_array_equal(got[layer], w)
        m = (w > 0).astype(int)
    assert not np.array_equal(got[-1] > 0, mask2d(n, counts))  # the support really spreads


# ---------------------------------------------------------------------------------- spans, IoU, targets
def test_candidate_spans_float32_arithmetic():
    rng = np.random.default_rng(0)
    for n in (64, 128, 48):
        for dur in rng.uniform(1.0, 400.0, 40).tolist() + [17.03, 123.456789]:
            cand, _ = torch_score2d_to_moments_scores(torch.ones(n, n), n, dur)
            got = candidate_spans(n, dur).reshape(-1, 2)
            np.testing.assert_array_equal(got, cand.numpy())
    # per-query durations broadcast
    d = np.array([10.0, 33.3], np.float32)
    np.testing.assert_array_equal(candidate_spans(8, d)[1], candidate_spans(8, 33.3))


def test_candidate_spans_distinguish_float64_then_round():
    # the plausible variant float32(i * dur / n) computed in float64 differs somewhere: the test above can fail
    n = 64
    diff = 0
    for dur in np.random.default_rng(1).uniform(1.0, 400.0, 50):
        wrong = np.float32(np.arange(n + 1) * dur / n)
        diff += int((wrong != (np.arange(n + 1, dtype=np.float32) * np.float32(dur)) / np.float32(n)).sum())
    assert diff > 0


def test_iou_1d_matches_official_and_float64():
    rng = np.random.default_rng(2)
    c = np.sort(rng.uniform(0, 100, (500, 2)), axis=1).astype(np.float32)
    c[:50, 1] = c[:50, 0]  # zero-length candidates
    gt = np.array([20.5, 60.25], np.float32)
    got = iou_1d(c, gt)
    np.testing.assert_array_equal(got, torch_iou(torch.from_numpy(c), torch.from_numpy(gt)).numpy())
    c64, g64 = c.astype(np.float64), gt.astype(np.float64)
    inter = np.clip(np.minimum(c64[:, 1], g64[1]) - np.maximum(c64[:, 0], g64[0]), 0, None)
    np.testing.assert_allclose(got, inter / (np.maximum(c64[:, 1], g64[1]) - np.minimum(c64[:, 0], g64[0])),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [64, 128, 10])
def test_moment_to_iou2d_matches_official(n):
    rng = np.random.default_rng(n)
    durs = rng.uniform(5, 300, 6)
    moms = []
    for d in durs:
        s, e = np.sort(rng.uniform(-5, d + 5, 2))
        moms.append([max(s, 0), min(e, d)])
    moms[0] = [0.0, durs[0]]  # the whole video
    moms[1] = [durs[1] / n * 3, durs[1] / n * 7]  # on the grid
    got = moment_to_iou2d(np.array(moms), durs, n)
    assert got.dtype == np.float32 and got.shape == (6, n, n)
    for q, (mom, d) in enumerate(zip(moms, durs)):
        ref = torch_moment_to_iou2d(torch.Tensor(mom), n, float(d)).numpy()
        np.testing.assert_array_equal(got[q], ref)
        np.testing.assert_array_equal(moment_to_iou2d(np.array(mom), d, n), ref)
        # the i > j cells: end <= start, intersection <= 0: exactly 0 (not NaN, not negative)
        assert (got[q][np.tril_indices(n, -1)] == 0).all()
