"""jaxprvr.ops.retention against torch transcriptions of the official RetLayer lines (xian-sh/MRNet @ 53432f5,
``ret/modeling/ret_model/``: ``ret_model.py`` L135-161, L182-201, L254-302, L379-389; ``position_encoding.py``
L35-72; ``xpos_relative_position.py`` L6-63), numpy formulas, and the parallel form (chunked attention, float64)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxprvr.errors import JaxprvrError
from jaxprvr.models.layers import DROPOUT_KEYS
from jaxprvr.ops.dropout import dropout as hash_dropout
from jaxprvr.ops.retention import (AttentionDropout, chunked_attention, decay_mask, masked_attention,
                                   module_attention_dropout, multiplicative_mask, rotate_every_two, sine_query_pe,
                                   sparse_mask, sparsity_loss, xpos, xpos_scale)


def enable_x64():
    """jax.enable_x64(True) (jax >= 0.8) or the older jax.experimental context."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as ctx  # older jax

    return ctx()


# --------------------------------------------------------------------------- torch transcriptions (CPU)
def torch_get_D(gamma, sequence_length, d_double):
    """ret_model.py L379-389."""
    n = torch.arange(sequence_length).unsqueeze(1)
    m = torch.arange(sequence_length).unsqueeze(0)
    D = (gamma ** (n - m)) * (n >= m).float()
    D[D != D] = 0
    out_D = D
    if d_double:
        out_D = D + D.T
    return out_D


def torch_masks(weight, gamma, txt_len, vid_len, att_mode, mask_mode, d_double=True):
    """ret_model.py L254-302 (the mask and the sparsity loss; ``.cuda()`` dropped)."""
    seq_len = txt_len + vid_len
    D = torch_get_D(gamma, vid_len, d_double)
    learn_ret = torch.sigmoid(weight.reshape(vid_len, vid_len))
    diag_mask = torch.diag(torch.ones(vid_len))
    video_ret = (1. - diag_mask) * learn_ret
    learn_mask = diag_mask + video_ret
    loss_sparsity = torch.tensor(0.0)
    if att_mode == 'v':
        ret_mask, sparse_m = D, learn_mask
        mask = torch.ones(vid_len, vid_len)
    else:
        ret_mask = torch.ones(seq_len, seq_len)
        ret_mask[txt_len:, txt_len:] = D
        sparse_m = torch.ones(seq_len, seq_len)
        sparse_m[txt_len:, txt_len:] = learn_mask
        mask = torch.ones(seq_len, seq_len)
    if mask_mode == 'ret':
        mask *= ret_mask
    elif mask_mode == 'sparse':
        mask *= sparse_m
        loss_sparsity += torch.mean(torch.abs(video_ret))
    elif mask_mode == 'both':
        mask *= ret_mask
        mask *= sparse_m
        loss_sparsity += torch.mean(torch.abs(video_ret))
    return mask, loss_sparsity


def torch_sine(x, mask, num_pos_feats, temperature=10000, scale=2 * math.pi):
    """position_encoding.py L51-72 with normalize=True."""
    x_embed = mask.cumsum(1, dtype=torch.float32)
    eps = 1e-6
    x_embed = x_embed / (x_embed[:, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode='trunc') / num_pos_feats)
    pos_x = x_embed[:, :, None] / dim_t
    return torch.stack((pos_x[:, :, 0::2].sin(), pos_x[:, :, 1::2].cos()), dim=3).flatten(2)


def t_fixed_pos_embedding(x):
    seq_len, dim = x.shape
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim) / dim))
    sinusoid_inp = torch.einsum("i , j -> i j", torch.arange(0, seq_len, dtype=torch.float), inv_freq).to(x)
    return torch.sin(sinusoid_inp), torch.cos(sinusoid_inp)


def t_rotate_every_two(x):
    x1 = x[:, :, ::2]
    x2 = x[:, :, 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def t_duplicate_interleave(m):
    dim0 = m.shape[0]
    return m.view(-1, 1).repeat(1, 2).view(dim0, -1)


def t_apply_rotary_pos_emb(x, sin, cos, scale=1):
    sin, cos = map(lambda t: t_duplicate_interleave(t * scale), (sin, cos))
    return (x * cos) + (t_rotate_every_two(x) * sin)


class TorchXPOS:
    """xpos_relative_position.py L36-63."""

    def __init__(self, head_dim, scale_base=512):
        self.scale_base = scale_base
        self.scale = (torch.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim)

    def forward(self, x, offset=0, downscale=False):
        length = x.shape[1]
        min_pos = 0
        max_pos = length + offset + min_pos
        scale = self.scale ** torch.arange(min_pos, max_pos, 1).to(self.scale).div(self.scale_base)[:, None]
        sin, cos = t_fixed_pos_embedding(scale)
        if scale.shape[0] > length:
            scale, sin, cos = scale[-length:], sin[-length:], cos[-length:]
        if downscale:
            scale = 1 / scale
        return t_apply_rotary_pos_emb(x, sin, cos, scale)


def torch_attention(q, k, v, attn_mask, dropout, att_softmax):
    """ret_model.py L135-161 (the discarded Hardswish dropped)."""
    B, Nt, E = q.shape
    q = q / math.sqrt(E)
    attn = torch.bmm(q, k.transpose(-2, -1))
    if attn_mask is not None:
        attn *= attn_mask
    attn_new = torch.zeros_like(attn)
    if att_softmax:
        attn_new = F.softmax(attn, dim=-1)
    if dropout is not None:
        attn_new = dropout(attn_new)
    return torch.bmm(attn_new, v)


def torch_mha_core(q, k, v, mask, h, att_softmax=True, dropout=None):
    """MultiHeadedAttention.forward L182-196 without the output Linear; q, k, v (L, 1, d) as RetLayer passes."""
    tgt_len, bsz, embed_dim = q.shape
    d_k = embed_dim // h
    q = q.reshape(tgt_len, bsz * h, d_k).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * h, d_k).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * h, d_k).transpose(0, 1)
    out = torch_attention(q, k, v, None if mask is None else mask.unsqueeze(0), dropout, att_softmax)
    return out.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("n,gamma", [(64, 0.98), (128, 0.999)])
def test_decay_mask_bit_identical_at_released_configs(n, gamma):
    got = np.asarray(decay_mask(n, gamma))
    np.testing.assert_array_equal(got, torch_get_D(gamma, n, True).numpy())
    np.testing.assert_array_equal(np.diag(got), 2.0)
    np.testing.assert_array_equal(np.asarray(decay_mask(n, gamma, double=False)), torch_get_D(gamma, n, False).numpy())


@pytest.mark.parametrize("n,gamma", [(7, 0.9), (40, 0.5), (300, 0.7), (16, 0.0)])
def test_decay_mask_other_gammas_within_an_ulp(n, gamma):
    # tiny gammas overflow gamma^(n-m) for m > n in torch (inf * 0 = nan, zeroed at L384): no NaN here either
    ref = torch_get_D(gamma, n, True).numpy()
    got = np.asarray(decay_mask(n, gamma))
    assert np.isfinite(got).all()
    tiny = np.float32(2.0**-126)  # float32 subnormals (0.7^299) carry fewer bits: compared absolutely
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=tiny)
    k = np.abs(np.arange(n)[:, None] - np.arange(n)[None])
    np.testing.assert_allclose(got, np.where(k == 0, 2.0, np.float64(np.float32(gamma)) ** k), rtol=1e-6, atol=tiny)


def test_decay_mask_float64():
    with enable_x64():
        got = np.asarray(decay_mask(20, 0.98, dtype=jnp.float64))
        assert got.dtype == np.float64
        k = np.abs(np.arange(20)[:, None] - np.arange(20)[None])
        np.testing.assert_allclose(got, np.where(k == 0, 2.0, 0.98 ** k), rtol=1e-15)


@pytest.mark.parametrize("att_mode", ["all", "v"])
@pytest.mark.parametrize("mask_mode", ["no", "ret", "sparse", "both"])
def test_multiplicative_mask_and_sparsity_match_official(att_mode, mask_mode):
    n, n_txt, gamma = 12, 5, 0.9
    w = torch.randn(n * n, 1, generator=torch.Generator().manual_seed(3))
    ref, ref_loss = torch_masks(w, gamma, n_txt, n, att_mode, mask_mode)
    lam, _ = sparse_mask(w.numpy())
    got = np.asarray(multiplicative_mask(n_txt, decay_mask(n, gamma), lam, att_mode, mask_mode))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=0)
    want_loss = float(ref_loss) if mask_mode in ("sparse", "both") else 0.0
    got_loss = float(sparsity_loss(w.numpy())) if mask_mode in ("sparse", "both") else 0.0
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)


def test_sparse_mask_numpy_formula_and_table_shapes():
    e = np.random.default_rng(0).standard_normal((6, 6)).astype(np.float32)
    mask, off = sparse_mask(e.reshape(36, 1))
    sig = 1 / (1 + np.exp(-e.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(off), sig * (1 - np.eye(6)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mask), sig * (1 - np.eye(6)) + np.eye(6), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(sparse_mask(e)[0]), np.asarray(mask))
    np.testing.assert_allclose(float(sparsity_loss(e)), (sig * (1 - np.eye(6))).mean(), rtol=1e-6)
    with pytest.raises(JaxprvrError):
        sparse_mask(np.zeros((35, 1)))
    with pytest.raises(JaxprvrError):
        multiplicative_mask(2, decay_mask(4, 0.9), None, "trans2", "both")


# ---------------------------------------------------------------------------------------- position codes
@pytest.mark.parametrize("d", [256, 8])
def test_sine_query_pe_matches_official_per_true_count(d):
    n_max = 9
    counts = np.array([[1, 4], [9, 0]], np.int32)
    got = np.asarray(jax.jit(lambda c: sine_query_pe(c, n_max, d))(counts))
    assert got.shape == (2, 2, n_max, d)
    for idx in np.ndindex(counts.shape):
        nq = int(counts[idx])
        if nq:
            ref = torch_sine(torch.zeros(1, nq, d), torch.ones(1, nq), d)[0].numpy()
            np.testing.assert_allclose(got[idx][:nq], ref, rtol=0, atol=2e-6)
        np.testing.assert_array_equal(got[idx][nq:], 0.0)


def test_sine_query_pe_numpy_formula():
    d, nq = 16, 5
    got = np.asarray(sine_query_pe(np.int32(nq), nq, d))
    pos = np.arange(1, nq + 1) / (nq + 1e-6) * 2 * np.pi
    dim_t = 10000.0 ** (2 * (np.arange(d) // 2) / d)
    p = pos[:, None] / dim_t
    want = np.where(np.arange(d) % 2 == 0, np.sin(p), np.cos(p))
    np.testing.assert_allclose(got, want, atol=2e-6)
    # padding slots do not change the real rows, and the official code normalised by a padded length (n_max)
    # would give other values: the true count matters
    np.testing.assert_array_equal(np.asarray(sine_query_pe(np.int32(nq), nq + 3, d))[:nq], got)
    wrong = torch_sine(torch.zeros(1, nq + 3, d), torch.ones(1, nq + 3), d)[0, :nq].numpy()
    assert np.abs(wrong - got).max() > 1e-2


def test_xpos_scale_buffer():
    np.testing.assert_array_equal(xpos_scale(256), TorchXPOS(256).scale.numpy())
    np.testing.assert_array_equal(xpos_scale(6), TorchXPOS(6).scale.numpy())


@pytest.mark.parametrize("length,d", [(64, 256), (128, 256), (12, 6), (5, 32)])
@pytest.mark.parametrize("downscale", [False, True])
def test_xpos_matches_official(length, d, downscale):
    x = np.random.default_rng(length + d).standard_normal((2, length, d)).astype(np.float32)
    ref = TorchXPOS(d).forward(torch.from_numpy(x), downscale=downscale).numpy()
    got = np.asarray(jax.jit(lambda a: xpos(a, downscale=downscale))(x))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)
    # positions along axis -2 with any leading shape
    got4 = np.asarray(xpos(x[None], downscale=downscale))[0]
    np.testing.assert_allclose(got4, got, rtol=1e-6, atol=1e-7)


def test_xpos_distinguishes_variants():
    # rotate-half (GPT-NeoX) instead of rotate-every-two, and no downscale for K, both move the output
    x = np.random.default_rng(0).standard_normal((1, 16, 8)).astype(np.float32)
    ref = TorchXPOS(8).forward(torch.from_numpy(x), downscale=True).numpy()
    half = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    np.testing.assert_allclose(np.asarray(rotate_every_two(jnp.asarray(x))),
                               t_rotate_every_two(torch.from_numpy(x)).numpy())
    assert not np.allclose(np.asarray(rotate_every_two(jnp.asarray(x))), half)
    assert np.abs(np.asarray(xpos(x, downscale=False)) - ref).max() > 1e-3
    np.testing.assert_allclose(np.asarray(xpos(x, downscale=True)), ref, rtol=1e-5, atol=2e-6)


# --------------------------------------------------------------------------------------------- attention
def _inputs(rng, lead, L, d, dtype=np.float32):
    q, k, v = (rng.standard_normal(lead + (L, d)).astype(dtype) for _ in range(3))
    m = (0.5 + rng.uniform(size=(L, L))).astype(dtype)
    return q, k, v, m


@pytest.mark.parametrize("softmax", [True, False])
def test_masked_attention_matches_official_per_video(softmax):
    rng = np.random.default_rng(0)
    n_txt, n, d, h = 3, 10, 32, 4
    L = n_txt + n
    q, k, v, _ = _inputs(rng, (1,), L, d)
    w = torch.randn(n * n, 1, generator=torch.Generator().manual_seed(1))
    ref_mask, _ = torch_masks(w, 0.98, n_txt, n, "all", "both")
    ref = torch_mha_core(*(torch.from_numpy(a[0])[:, None] for a in (q, k, v)), ref_mask, h, softmax)[:, 0].numpy()
    mm = multiplicative_mask(n_txt, decay_mask(n, 0.98), sparse_mask(w.numpy())[0], "all", "both")
    got = np.asarray(masked_attention(q, k, v, mm, np.ones((1, L)), h, softmax=softmax))[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if not softmax:
        np.testing.assert_array_equal(got, 0.0)


def test_masked_attention_padded_keys_equal_the_unpadded_video():
    # a video with 2 real queries in 4 slots gives the official per-video result on its real rows
    rng = np.random.default_rng(1)
    Q, nq, n, d, h = 4, 2, 6, 16, 2
    L = Q + n
    q, k, v, _ = _inputs(rng, (1,), L, d)
    w = rng.standard_normal((n * n, 1)).astype(np.float32)
    mm = multiplicative_mask(Q, decay_mask(n, 0.9), sparse_mask(w)[0], "all", "both")
    valid = np.concatenate([np.ones(nq), np.zeros(Q - nq), np.ones(n)])[None]
    got = np.asarray(masked_attention(q, k, v, mm, valid, h))[0]
    keep = np.flatnonzero(valid[0])
    ref_mask, _ = torch_masks(torch.from_numpy(w), 0.9, nq, n, "all", "both")
    ref = torch_mha_core(*(torch.from_numpy(a[0][keep])[:, None] for a in (q, k, v)), ref_mask, h)[:, 0].numpy()
    np.testing.assert_allclose(got[keep], ref, rtol=1e-5, atol=1e-6)


def test_mask_multiplies_logits_before_softmax():
    # the plausible variant softmax(S) * M (mask on the weights) gives another result; ours is the official one
    rng = np.random.default_rng(2)
    q, k, v, m = _inputs(rng, (1,), 6, 8)
    ref = torch_mha_core(*(torch.from_numpy(a[0])[:, None] for a in (q, k, v)), torch.from_numpy(m), 2)[:, 0].numpy()
    got = np.asarray(masked_attention(q, k, v, m, None, 2))[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    qh, kh = (a[0].reshape(6, 2, 4).transpose(1, 0, 2) for a in (q, k))
    s = np.einsum("hqd,hkd->hqk", qh / 2.0, kh)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True) * m
    wrong = np.einsum("hqk,hkd->qhd", p, v[0].reshape(6, 2, 4).transpose(1, 0, 2)).reshape(6, 8)
    assert np.abs(wrong - got).max() > 1e-3


CASES = [  # (lead, L, chunk)
    ((2,), 13, 4), ((2,), 16, 16), ((1,), 7, 3), ((3,), 20, 7), ((2,), 5, 8),
]


def _padded_case(rng, lead, L, d=16, dtype=np.float32):
    q, k, v, m = _inputs(rng, lead, L, d, dtype)
    valid = (rng.uniform(size=lead + (L,)) > 0.3).astype(dtype)
    valid[..., -1] = 1
    if lead[0] > 1:
        valid[-1] = 0  # one fully padded sequence: every row masked -> zeros
    return q, k, v, m, valid


@pytest.mark.parametrize("lead,L,chunk", CASES)
def test_chunked_equals_parallel_float32(lead, L, chunk):
    rng = np.random.default_rng(L * 7 + chunk)
    q, k, v, m, valid = _padded_case(rng, lead, L)
    both = jax.jit(lambda *a: (masked_attention(*a, 4), chunked_attention(*a, 4, chunk)))
    par, chk = (np.asarray(o) for o in both(q, k, v, m, valid))
    np.testing.assert_allclose(chk, par, rtol=1e-5, atol=1e-5)
    if lead[0] > 1:
        np.testing.assert_array_equal(par[-1], 0.0)
        np.testing.assert_array_equal(chk[-1], 0.0)
    assert np.isfinite(chk).all()


@pytest.mark.parametrize("lead,L,chunk", [CASES[0], CASES[2]])
def test_chunked_equals_parallel_float64(lead, L, chunk):
    with enable_x64():
        rng = np.random.default_rng(L)
        q, k, v, m, valid = _padded_case(rng, lead, L, dtype=np.float64)
        both = jax.jit(lambda *a: (masked_attention(*a, 4), chunked_attention(*a, 4, chunk)))
        par, chk = (np.asarray(o) for o in both(q, k, v, m, valid))
        assert chk.dtype == np.float64
        np.testing.assert_allclose(chk, par, rtol=1e-12, atol=1e-12)
        # and the float64 parallel form against a numpy loop
        qh = q.reshape(*q.shape[:-1], 4, 4)
        kh = k.reshape(*k.shape[:-1], 4, 4)
        vh = v.reshape(*v.shape[:-1], 4, 4)
        s = np.einsum("...qhd,...khd->...hqk", qh / 2.0, kh) * m
        s = np.where(valid[..., None, None, :] > 0, s, -np.inf)
        for idx in np.ndindex(s.shape[:-1]):
            row = s[idx]
            if np.isfinite(row).any():
                e = np.exp(row - row[np.isfinite(row)].max())
                s[idx] = e / e.sum()
            else:
                s[idx] = 0
        want = np.einsum("...hqk,...khd->...qhd", s, vh).reshape(par.shape)
        np.testing.assert_allclose(par, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("lead,L,chunk", [CASES[0], CASES[3], CASES[4]])
def test_chunked_dropout_draws_the_parallel_mask(lead, L, chunk):
    rng = np.random.default_rng(L + 1)
    q, k, v, m, valid = _padded_case(rng, lead, L)
    drop = AttentionDropout(jax.random.key(7), 0.3)
    fwd = jax.jit(lambda *a: (masked_attention(*a, 4, dropout=drop), chunked_attention(*a, 4, chunk, dropout=drop),
                              masked_attention(*a, 4)))
    par, chk, nodrop = (np.asarray(o) for o in fwd(q, k, v, m, valid))
    np.testing.assert_allclose(chk, par, rtol=1e-5, atol=1e-5)
    assert np.abs(par - nodrop).max() > 1e-2  # dropout really acts
    # the parallel form's mask is ops.dropout.dropout over the (*lead, H, L, L) probabilities, and the block
    # addressing recomputes exactly those bits
    shape = lead + (4, L, L)
    ones = jnp.ones(shape)
    full = np.asarray(jax.jit(lambda a: hash_dropout(drop.key, a, 0.3))(ones)) > 0
    blk = np.asarray(jax.jit(lambda: drop.keep_block(shape, lead + (4, L, min(chunk, L - 1)), 0, 1))())
    np.testing.assert_array_equal(blk, full[..., 1:1 + min(chunk, L - 1)])


def test_chunked_attention_matches_official_with_shared_dropout_masks():
    # the official attention with a dropout that applies our parallel-form mask gives the chunked result
    rng = np.random.default_rng(5)
    L, d, h = 11, 16, 4
    q, k, v, m = _inputs(rng, (1,), L, d)
    drop = AttentionDropout(jax.random.key(3), 0.25)
    keep = np.asarray(hash_dropout(drop.key, jnp.ones((1, h, L, L)), 0.25))[0]  # (h, L, L): 0 or 1/(1-p)

    def torch_drop(a):
        return a * torch.from_numpy(keep.copy())

    ref = torch_mha_core(*(torch.from_numpy(a[0])[:, None] for a in (q, k, v)), torch.from_numpy(m), h,
                         dropout=torch_drop)[:, 0].numpy()
    got = np.asarray(chunked_attention(q, k, v, m, np.ones((1, L)), h, 4, dropout=drop))[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_chunked_rejects_an_unaddressable_dropout_and_keeps_zero_attention():
    q, k, v, m = _inputs(np.random.default_rng(0), (1,), 5, 8)
    with pytest.raises(JaxprvrError):
        chunked_attention(q, k, v, m, None, 2, 2, dropout=lambda p: p)
    np.testing.assert_array_equal(np.asarray(chunked_attention(q, k, v, m, None, 2, 2, softmax=False)), 0.0)


def test_module_attention_dropout_sows_the_key_and_matches_the_pure_call():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, q, k, v, train):
            drop = module_attention_dropout(self, 0.2, deterministic=not train)
            return masked_attention(q, k, v, None, None, 2, dropout=drop)

    q, k, v, _ = _inputs(np.random.default_rng(1), (1,), 6, 8)
    blk = Block()
    variables = blk.init(jax.random.key(0), q, k, v, False)
    out_eval = blk.apply(variables, q, k, v, False)
    np.testing.assert_allclose(np.asarray(out_eval), np.asarray(masked_attention(q, k, v, None, None, 2)), rtol=1e-6)
    out, state = blk.apply(variables, q, k, v, True, rngs={"dropout": jax.random.key(9)}, mutable=[DROPOUT_KEYS])
    (key_data,) = state[DROPOUT_KEYS]["key"]
    again = masked_attention(q, k, v, None, None, 2, dropout=AttentionDropout(jax.random.wrap_key_data(key_data), 0.2))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    assert np.abs(np.asarray(out) - np.asarray(out_eval)).max() > 1e-3
