"""MESM's Flax model (``jaxprvr.models.mesm``) and its key table (``parity.mesm_keys``) at tiny widths.

Pieces against numpy re-statements of the official code (sine positions, DAB's sine embedding, the head-major T2V
mask as ``repeat(nhead, 1, 1)`` read batch-major, one T2V layer as torch's ``multi_head_attention_forward``, the text
post-processing, the SS-MESM slot layout, the left compaction, the samplers); then the whole model against the
PyTorch twin (``torch_ref.mesm``, float64, weights through ``torch_to_params``): every output and named intermediate
equal to 1e-9 on a Charades-like batch (train and eval), a QVHighlights-like one (groups of windows), a TACoS-like
TwoMLP one with the per-row mask and a glove.pkl one, each statically padded with garbage in the padding rows and
past the real lengths; the transformer's gradients; planted mutants (per-row mask where head-major is expected,
the head reference detached, ``ca_qpos_proj`` in every decoder layer, uncompacted SS-MESM slots) must fail.

The twin computes its sine positions in float32 whatever the model dtype (``cumsum(dtype=float32)``, a float32
``dim_t``, as a float64 official run does); the Flax model computes them in its statistics dtype. For the float64
comparisons the twin's two position functions are replaced by float64 versions of the same formula
(:func:`twin_positions_float64`); :func:`test_positions_match_twin_float32` checks the float32 ones separately.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprvr.config import MESMConfig
from jaxprvr.errors import JaxprvrError
from jaxprvr.models import mesm as M
from parity import mesm_keys as K

TOL = 1e-9
TINY = dict(v_feat_dim=6, t_feat_dim=10, hidden_dim=32, nheads=4, dim_feedforward=48, vocab_size=9, max_words_l=7,
            max_video_l=12, num_recfw_layers=1, t2v_layers=1, enc_layers=1, dec_layers=2, num_recss_layers=1,
            num_queries=5, dropout=0.0, input_dropout=0.0, compute_dtype="float64")


def tiny_cfg(**kw) -> MESMConfig:
    return MESMConfig(**{**TINY, **kw})


# ---------------------------------------------------------------------------------------------- numpy references


def np_sine_position(mask, d):
    """position_encoding.py L61-72 in float64 (numpy)."""
    x = np.cumsum(mask.astype(np.float64), axis=1)
    x = x / (x[:, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000.0 ** (2 * (np.arange(d) // 2) / d)
    p = x[..., None] / dim_t
    out = np.empty(p.shape)
    out[..., 0::2] = np.sin(p[..., 0::2])
    out[..., 1::2] = np.cos(p[..., 1::2])
    return out


def np_sine_embed(pos, d):
    """transformer.py L43-59 in float64 (numpy)."""
    each = d // 2
    dim_t = 10000.0 ** (2 * (np.arange(each) // 2) / each)
    parts = []
    for c in (0, 1):
        p = (pos[..., c] * 2 * math.pi)[..., None] / dim_t
        e = np.empty(p.shape)
        e[..., 0::2], e[..., 1::2] = np.sin(p[..., 0::2]), np.cos(p[..., 1::2])
        parts.append(e)
    return np.concatenate(parts, -1)


def np_official_attn_mask(q_pad, k_pad, nhead):
    """``matmul(qmask.float(), kmask.float()).bool().repeat(nhead, 1, 1)`` (transformer.py L528-530) as the
    (B*nhead, Lq, Lk) tensor torch's MHA reads batch-major (index b*nhead + h), reshaped to (B, nhead, Lq, Lk)."""
    per_row = (q_pad[:, :, None].astype(float) @ k_pad[:, None, :].astype(float)).astype(bool)
    rep = np.concatenate([per_row] * nhead, axis=0)  # repeat(nhead, 1, 1): head-major
    b = q_pad.shape[0]
    return rep.reshape(b, nhead, *per_row.shape[1:])  # .view(bsz, num_heads, ...) in the MHA


def np_layer_norm(x, w, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def np_t2v_layer(p, src_txt, src_vid, txt_pad, vid_pad, pos_txt, pos_vid, nhead, mode="head_major"):
    """T2V_TransformerEncoderLayer.forward_post (transformer.py L508-540) with torch's MHA (batch-first numpy)."""
    d = src_vid.shape[-1]
    hd = d // nhead
    w, bias = p["self_attn"]["in_proj"]["kernel"].T, p["self_attn"]["in_proj"]["bias"]  # torch (3d, d)
    q = (src_vid + pos_vid) @ w[:d].T + bias[:d]
    k = (src_txt + pos_txt) @ w[d:2 * d].T + bias[d:2 * d]
    v = src_txt @ w[2 * d:].T + bias[2 * d:]
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    qh = q.reshape(b, lq, nhead, hd).transpose(0, 2, 1, 3) * hd ** -0.5
    kh = k.reshape(b, lk, nhead, hd).transpose(0, 2, 1, 3)
    vh = v.reshape(b, lk, nhead, hd).transpose(0, 2, 1, 3)
    s = qh @ kh.transpose(0, 1, 3, 2)
    extra = np_official_attn_mask(vid_pad, txt_pad, nhead) if mode == "head_major" else \
        (vid_pad[:, None, :, None] & txt_pad[:, None, None, :])
    s = np.where(extra | txt_pad[:, None, None, :], -np.inf, s)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = (a @ vh).transpose(0, 2, 1, 3).reshape(b, lq, d)
    o = o @ p["self_attn"]["out_proj"]["kernel"] + p["self_attn"]["out_proj"]["bias"]
    x = src_vid + o
    y = np_layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"])
    y = y @ p["linear1"]["kernel"] + p["linear1"]["bias"]
    y = np.where(y >= 0, y, p["activation"]["weight"] * y)
    y = y @ p["linear2"]["kernel"] + p["linear2"]["bias"]
    return np_layer_norm(x + y, p["norm2"]["scale"], p["norm2"]["bias"])


POSITIONS = jax.jit(M.sine_position_embedding, static_argnums=(1, 2))
SINE_EMBED = jax.jit(M.sine_embed_for_position, static_argnums=1)
T2V_MASK = jax.jit(M.t2v_attention_mask, static_argnums=(2, 4))
TEXT = jax.jit(M.text_features, static_argnums=2)


def assert_close(name, got, want, tol=TOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    if want.dtype == bool:
        assert np.array_equal(got, want), name
        return
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(want)), f"{name}: non-finite values"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert err <= tol, f"{name}: max |diff| {err:.3g} > {tol:g}"


def test_assert_close_rejects_nan_and_mismatch():
    with pytest.raises(AssertionError):
        assert_close("nan", np.array([np.nan]), np.array([np.nan]))
    with pytest.raises(AssertionError):
        assert_close("off", np.array([1.0]), np.array([1.0 + 1e-8]))


# ---------------------------------------------------------------------------------------------- pure functions


def test_positions_and_sine_embed_against_numpy():
    rng = np.random.default_rng(0)
    mask = np.arange(9)[None] < np.array([9, 4, 1, 0])[:, None]
    pos = rng.uniform(0.01, 0.99, (3, 5, 2))
    with jax.enable_x64(True):
        got = np.asarray(POSITIONS(mask, 16, jnp.float64))
        emb = np.asarray(SINE_EMBED(pos, 16))
    assert_close("sine position", got, np_sine_position(mask, 16), 1e-12)
    assert_close("sine embed", emb, np_sine_embed(pos, 16), 1e-12)
    # extra padding after the valid prefix changes nothing (the last cumsum column is the count)
    wide = np.concatenate([mask, np.zeros((4, 5), bool)], 1)
    with jax.enable_x64(True):
        got_wide = np.asarray(POSITIONS(wide, 16, jnp.float64))
    assert_close("padded positions", got_wide[:, :9], got, 0.0)
    # mutants: sin/cos not interleaved, not normalised by the count
    bad = np_sine_position(mask, 16)[..., np.r_[0:16:2, 1:16:2]]
    with pytest.raises(AssertionError):
        assert_close("mutant interleave", got, bad, 1e-6)
    x = np.cumsum(mask, 1)[..., None] / 10000.0 ** (2 * (np.arange(16) // 2) / 16)
    with pytest.raises(AssertionError):
        assert_close("mutant normalize", got, np.where(np.arange(16) % 2 == 0, np.sin(x), np.cos(x)), 1e-6)


def test_positions_match_twin_float32():
    from torch_ref import mesm as T

    mask = np.arange(11)[None] < np.array([11, 6, 2])[:, None]
    got = np.asarray(POSITIONS(mask, 32, jnp.float32))
    want = T.sine_position(torch.from_numpy(mask), 32).numpy()
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert_close("float32 positions", got, want, 1e-5)
    pos = np.random.default_rng(1).uniform(0.05, 0.95, (4, 3, 2)).astype(np.float32)
    got = np.asarray(SINE_EMBED(pos, 32))
    want = T.gen_sineembed_for_position(torch.from_numpy(pos), 32).numpy()
    assert_close("float32 sine embed", got, want, 1e-5)


def test_t2v_mask_head_major_and_per_row():
    rng = np.random.default_rng(1)
    b, nh = 5, 4
    q_pad = np.arange(6)[None] >= rng.integers(1, 7, b)[:, None]
    k_pad = np.arange(4)[None] >= rng.integers(1, 5, b)[:, None]
    got = np.asarray(T2V_MASK(q_pad, k_pad, nh, b, "head_major"))
    want = np_official_attn_mask(q_pad, k_pad, nh) | k_pad[:, None, None, :]
    assert np.array_equal(got, want)
    # padding rows after the real ones: the real rows' masks are unchanged (the modulo takes the real row count)
    q2 = np.concatenate([q_pad, rng.random((3, 6)) < 0.5])
    k2 = np.concatenate([k_pad, rng.random((3, 4)) < 0.5])
    got2 = np.asarray(T2V_MASK(q2, k2, nh, b, "head_major"))
    assert np.array_equal(got2[:b], want)
    per_row = np.asarray(T2V_MASK(q_pad, k_pad, nh, b, "per_row"))
    assert np.array_equal(per_row, np.broadcast_to(k_pad[:, None, None, :], per_row.shape))
    assert not np.array_equal(per_row, got)  # the quirk is real on this batch
    with pytest.raises(JaxprvrError):
        M.t2v_attention_mask(jnp.asarray(q_pad), jnp.asarray(k_pad), nh, b, "rows")


def test_t2v_layer_against_numpy_mha():
    cfg = tiny_cfg()
    rng = np.random.default_rng(2)
    b, lq, lk, d = 5, 6, 4, 32
    q_pad = np.arange(lq)[None] >= np.array([6, 3, 5, 2, 4])[:, None]
    k_pad = np.arange(lk)[None] >= np.array([4, 1, 3, 2, 4])[:, None]
    src_vid, pos_vid = rng.normal(size=(b, lq, d)), rng.normal(size=(b, lq, d))
    src_txt, pos_txt = rng.normal(size=(b, lk, d)), rng.normal(size=(b, lk, d))
    layer = M.T2VLayer(cfg, dtype=jnp.float64)
    with jax.enable_x64(True):
        shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), src_txt, src_vid, k_pad, q_pad, pos_txt,
                                                   pos_vid, b))["params"]
        params = jax.tree.map(lambda s: rng.normal(size=s.shape) * (0.3 if len(s.shape) > 1 else 0.2), shapes)

        def run(mode):
            c = dataclasses.replace(cfg, t2v_mask=mode)
            return np.asarray(jax.jit(M.T2VLayer(c, dtype=jnp.float64).apply)(
                {"params": params}, src_txt, src_vid, k_pad, q_pad, pos_txt, pos_vid, b))

        head_major, per_row = run("head_major"), run("per_row")
    want = np_t2v_layer(params, src_txt, src_vid, k_pad, q_pad, pos_txt, pos_vid, 4)
    assert_close("T2V layer", head_major, want, 1e-12)
    assert_close("T2V layer per_row", per_row, np_t2v_layer(params, src_txt, src_vid, k_pad, q_pad, pos_txt, pos_vid,
                                                            4, "per_row"), 1e-12)
    with pytest.raises(AssertionError):  # mutant: the per-row mask where the official head-major one is expected
        assert_close("T2V layer mutant", per_row, want, 1e-6)


def test_text_features_both_paths():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 5, 4))
    mask = np.arange(5)[None] < np.array([5, 2, 3])[:, None]
    with jax.enable_x64(True):
        words, m, sent = (np.asarray(a) for a in TEXT(w, mask, False))
    z = np.where(mask[..., None], w, 0.0)
    s = z.sum(1) / mask.sum(1, keepdims=True)
    nz = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-5)  # noqa: E731
    assert_close("CLIP words", words, nz(z), 1e-12)
    assert_close("CLIP sentence", sent, nz(s), 1e-12)
    assert np.array_equal(m, mask)
    # glove.pkl: zero vectors at padding, mask recomputed from the normalised words, mean of the normalised words
    w_pkl = np.where(mask[..., None], w, 0.0)
    with jax.enable_x64(True):
        words, m, sent = (np.asarray(a) for a in TEXT(w_pkl, np.ones((3, 5), bool), True))
    nw = nz(w_pkl)
    assert np.array_equal(m, nw.sum(-1) != 0) and np.array_equal(m, mask)
    assert_close("pkl sentence", sent, nz(nw.sum(1) / mask.sum(1, keepdims=True)), 1e-12)
    with pytest.raises(AssertionError):  # mutant: the CLIP order (mean of the raw words) on the pkl path
        assert_close("pkl mutant", sent, nz(w_pkl.sum(1) / mask.sum(1, keepdims=True)), 1e-6)


def test_group_slots_and_compaction():
    groups = np.array([0, 0, 0, 1, 2, 2, -1, -1])
    rows, valid, own = (np.asarray(a) for a in jax.jit(M.group_slots, static_argnums=1)(groups, 5))
    for b, g in enumerate(groups):
        members = [i for i, h in enumerate(groups) if h == g] if g >= 0 else []
        assert valid[b].tolist() == [j < len(members) for j in range(5)]
        assert rows[b, :len(members)].tolist() == members
        if g >= 0:
            assert own[b] == members.index(b)
    x = np.arange(2 * 6 * 1, dtype=float).reshape(2, 6, 1) + 1
    mask = np.array([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1]], bool)
    out, m = (np.asarray(a) for a in jax.jit(M.compact_left)(x, mask))
    for b in range(2):
        sel = x[b][mask[b]]
        assert np.array_equal(out[b, :len(sel)], sel) and not out[b, len(sel):].any()
        assert m[b].tolist() == [j < len(sel) for j in range(6)]


def test_sample_outclass_neg():
    groups = jnp.asarray([0, 0, 1, 2, 2, 2, -1, -1])
    keys = jax.random.split(jax.random.key(0), 400)
    neg = np.asarray(jax.jit(jax.vmap(lambda k: M.sample_outclass_neg(k, groups, 6)))(keys))
    g = np.asarray(groups)
    assert (neg[:, 6:] == -1).all()
    real = neg[:, :6]
    assert (real >= 0).all() and (real < 6).all() and (g[real] != g[None, :6]).all()
    # uniform over the candidates: row 2 (item 1) has 5 candidates, each drawn about 80 times in 400
    counts = np.bincount(real[:, 2], minlength=6)
    assert counts[2] == 0 and counts[[0, 1, 3, 4, 5]].min() > 50
    single = np.asarray(jax.jit(M.sample_outclass_neg)(jax.random.key(1), jnp.asarray([0, 0, 0]), 3))
    assert (single == -1).all()  # one item: no candidate (the official code crashes there)


def test_sample_mlm_mask_counts_and_probabilities():
    mask = np.arange(8)[None] < np.array([8, 1, 0, 2, 6])[:, None]
    weight = np.where(mask, np.array([0, 2, 1, 2, 1, 1, 2, 0], float)[None], 0.0)
    sample = jax.jit(M.sample_mlm_mask)
    got = np.asarray(sample(jax.random.key(0), mask, weight))
    l = mask.sum(1)
    assert got.sum(1).tolist() == [max(n // 3, 1) if n > 1 else 0 for n in l]
    assert not (got & (weight == 0)).any() and not (got & ~mask).any()
    # k = 2 of 6 weights [0, 2, 1, 2, 1, 1]: inclusion probabilities of successive sampling, by enumeration
    w = np.array([0, 2, 1, 2, 1, 1], float)
    p = w / w.sum()
    incl = np.zeros(6)
    for i in range(6):
        for j in range(6):
            if i != j and p[i] > 0 and p[j] > 0:
                pr = p[i] * p[j] / (1 - p[i])
                incl[i] += pr
                incl[j] += pr
    n = 20000
    rows = sample(jax.random.key(3), np.tile(np.arange(8) < 6, (n, 1)), np.tile(np.r_[w, 0, 0], (n, 1)))
    freq = np.asarray(rows).mean(0)[:6]
    assert np.abs(freq - incl).max() < 0.015, (freq, incl)
    assert np.abs(freq - 2 * p).max() > 0.03  # a mutant "independent draws with p" would not match


# ---------------------------------------------------------------------------------------------- key table


def test_key_table_counts_order_round_trip_and_errors():
    from torch_ref import mesm as T

    full = MESMConfig()
    assert len(K.make_table(full)) == 273 and len(K.make_table(dataclasses.replace(full, share_MLP=False))) == 289
    for cfg in (tiny_cfg(num_recfw_layers=2, enc_layers=2), tiny_cfg(share_MLP=False, tokenizer_type="GloVeNLTK")):
        keys = [e.torch for e in K.make_table(cfg)]
        assert keys == T.official_state_keys(cfg)
        twin = T.build_mesm(cfg)
        sd = twin.state_dict()
        assert list(sd) == keys  # the official state_dict order
        params = K.torch_to_params(sd, cfg)
        back = K.params_to_torch(params, cfg)
        assert list(back) == keys and all(np.array_equal(back[k], sd[k].numpy()) and back[k].dtype == np.float32
                                          for k in keys)
        # transposes by kind: the fused in_proj (3d, d) -> (d, 3d), a square Linear transposed, PReLU as is
        p = params["transformer"]["encoder"]["layers_0"]
        w = sd["transformer.encoder.layers.0.self_attn.in_proj_weight"].numpy()
        assert np.array_equal(p["self_attn"]["in_proj"]["kernel"], w.T)
        w = sd["transformer.encoder.layers.0.self_attn.out_proj.weight"].numpy()
        assert np.array_equal(p["self_attn"]["out_proj"]["kernel"], w.T) and not np.array_equal(w, w.T)
        assert p["activation"]["weight"].shape == (1,)
    sd = dict(sd)
    sd.pop("query_embed.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["text_encoder.token_embedding.weight"] = torch.zeros(2, 2)  # the frozen tower: ignored
    with pytest.raises(JaxprvrError, match=r"query_embed\.weight.*extra\.weight"):
        K.torch_to_params(sd, cfg)
    bad = dict(twin.state_dict())
    bad["class_embed.weight"] = bad["class_embed.weight"].T.contiguous()
    with pytest.raises(JaxprvrError, match="class_embed/kernel"):
        K.torch_to_params(bad, cfg)
    params["transformer"]["decoder"]["layers_1"]["ca_qpos_proj"] = {"kernel": np.zeros((32, 32)), "bias": np.zeros(32)}
    with pytest.raises(JaxprvrError, match="ca_qpos_proj"):
        K.params_to_torch(params, cfg)


# ---------------------------------------------------------------------------------------------- the twin


def twin_positions_float64(monkeypatch):
    """The twin's sine positions in the model's dtype (see the module docstring)."""
    from torch_ref import mesm as T

    def sine_position(mask, num_pos_feats, temperature=10000.0, normalize=True, scale=2 * math.pi):
        x = mask.cumsum(1, dtype=torch.float64)
        x = x / (x[:, -1:] + 1e-6) * scale
        dim_t = temperature ** (2 * (torch.arange(num_pos_feats, dtype=torch.float64) // 2) / num_pos_feats)
        p = x[:, :, None] / dim_t
        return torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2)

    def sine_embed(pos_tensor, dim):
        each = dim // 2
        dim_t = 10000 ** (2 * (torch.arange(each, dtype=torch.float64) // 2) / each)
        out = []
        for c in (0, 1):
            p = (pos_tensor[:, :, c] * (2 * math.pi))[:, :, None] / dim_t
            out.append(torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2))
        return torch.cat(out, dim=2)

    monkeypatch.setattr(T, "sine_position", sine_position)
    monkeypatch.setattr(T, "gen_sineembed_for_position", sine_embed)


def perturbed_twin(cfg, seed=0):
    """The twin at its official init, then every parameter moved (biases, LayerNorms, learned tokens, PReLU
    slopes, anchors: nothing left at a special value), float64."""
    from torch_ref import mesm as T

    torch.manual_seed(seed)
    twin = T.build_mesm(cfg).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            scale = 0.5 if p.dim() == 1 else 0.05
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return twin.eval()


def make_case(cfg, seed, items, shared_video, qvh=False, pad_rows=2, pad_frames=3, garbage_seed=None):
    """A batch of ``items`` (rows per item) in both layouts: the official dynamic collate dict (+ the raw word
    features and the injected neg_index / mlm_mask) and the static padded one, with garbage (drawn from
    ``garbage_seed``) in the padding rows and past the real lengths of the static one."""
    rng = np.random.default_rng(seed)
    grng = np.random.default_rng(seed + 1000 if garbage_seed is None else garbage_seed)
    b = sum(items)
    dv, dt, lw_cap = M.video_in_dim(cfg), cfg.t_feat_dim, cfg.max_words_l
    lv_rows = []
    for n in items:
        if shared_video:  # Charades / TACoS: the item's video repeated per query
            lv_rows += [int(rng.integers(3, 9))] * n
        else:  # QVH: a window per row
            lv_rows += [int(rng.integers(2, 7)) for _ in range(n)]
    lv = max(lv_rows)
    clip_text = cfg.tokenizer_type == "CLIP"  # SOT + at least one token + EOT
    lw_rows = [int(rng.integers(3 if clip_text else 2, lw_cap + 1)) for _ in range(b)]
    if not clip_text:
        lw_rows[int(rng.integers(b))] = 1  # a one-word query: no MLM position (l <= 1)
    lw = max(lw_rows)
    video = np.zeros((b, lv, dv))
    vmask = np.arange(lv)[None] < np.array(lv_rows)[:, None]
    r = 0
    for n in items:
        v = rng.normal(size=(lv_rows[r], dv))
        for j in range(n):
            video[r + j, :lv_rows[r + j]] = v if shared_video else rng.normal(size=(lv_rows[r + j], dv))
        r += n
    wmask = np.arange(lw)[None] < np.array(lw_rows)[:, None]
    if cfg.load_vocab_pkl:
        words = np.where(wmask[..., None], rng.normal(size=(b, lw, dt)), 0.0)  # zero vectors at padding
    else:
        words = rng.normal(size=(b, lw, dt))  # the text tower's output has values at padding too
    weight = np.where(wmask, rng.choice([1.0, 2.0], size=(b, lw)), 0.0)
    if clip_text:
        weight[:, 0] = 0.0  # SOT, EOT
        weight[np.arange(b), np.array(lw_rows) - 1] = 0.0
    unknown = wmask & (rng.random((b, lw)) < 0.25)
    clip = np.zeros((b, lv), bool)
    for i, n in enumerate(lv_rows):
        s = int(rng.integers(0, n))
        clip[i, s:int(rng.integers(s + 1, n + 1))] = True
    row_group = np.repeat(np.arange(len(items)), items)
    neg = np.array([rng.choice(np.flatnonzero(row_group != g)) for g in row_group])  # another item's row
    mlm = np.zeros((b, lw), bool)
    for i, n in enumerate(lw_rows):  # the official draw (model.py L370-378), numpy
        if n > 1:
            p = weight[i, :n] / weight[i, :n].sum()
            mlm[i, rng.choice(n, max(n // 3, 1), replace=False, p=p)] = True
    official = {"video_feat": video, "video_mask": vmask, "words_mask": wmask, "words_weight": weight,
                "unknown_mask": unknown, "clip_mask": clip, "num_clips": np.array(items)}
    if cfg.load_vocab_pkl:
        official["words_id"] = words  # the official glove.pkl collate passes the vectors as a 3-D words_id
    # static: R = b + pad_rows rows, pad_frames more frames, max_words_l words; garbage where nothing is valid
    big_r, big_lv = b + pad_rows, lv + pad_frames

    def pad(x, shape, fill):
        out = fill(shape)
        out[tuple(slice(0, n) for n in x.shape)] = x
        return out

    garbage = lambda s: grng.normal(size=s) * 3  # noqa: E731
    falses = lambda s: np.zeros(s, bool)  # noqa: E731
    rand_bool = lambda s: grng.random(s) < 0.5  # noqa: E731
    static = {"video_feat": pad(video, (big_r, big_lv, dv), garbage),
              "video_mask": pad(vmask, (big_r, big_lv), falses),
              "words_feat": pad(words, (big_r, lw_cap, dt), np.zeros if cfg.load_vocab_pkl else garbage),
              "words_mask": pad(wmask, (big_r, lw_cap), falses),
              "unknown_mask": pad(unknown, (big_r, lw_cap), rand_bool),
              "clip_mask": pad(clip, (big_r, big_lv), falses),
              "row_group": pad(row_group, (big_r,), lambda s: np.full(s, -1)).astype(np.int32),
              "num_rows": np.int32(b)}
    # padding rows: random prefix masks and features (they must not leak into the real rows)
    static["video_mask"][b:, :2] = True
    static["words_mask"][b:, :3] = True
    static["clip_mask"][b:, 1] = True
    if cfg.load_vocab_pkl:
        static["words_feat"][b:, :3] = garbage((pad_rows, 3, dt))
    if qvh:
        lg = big_lv * max(items) + 2
        ss = garbage((big_r, lg, dv))
        dyn_lg = max(sum(lv_rows[sum(items[:g]):sum(items[:g + 1])]) for g in range(len(items)))
        ss[:b, :dyn_lg] = 0.0  # the official split_expand_and_pad pads with zeros; garbage past that
        ssm = np.zeros((big_r, lg), bool)
        start = 0
        for n in items:
            frames = np.concatenate([video[i][vmask[i]] for i in range(start, start + n)])
            ss[start:start + n, :len(frames)] = frames
            ssm[start:start + n, :len(frames)] = True
            start += n
        static.update(ss_video_feat=ss, ss_video_mask=ssm)
    inject = {"neg_index": np.concatenate([neg, np.full(pad_rows, -1)]).astype(np.int32),
              "mlm_mask": pad(mlm, (big_r, lw_cap), rand_bool)}
    return official, words, static, inject, {"neg_index": neg, "masked_words": mlm}


def twin_run(twin, official, words, tin, dataset, training):
    with torch.no_grad():
        out, aux = twin(official, words_feat=None if twin.opts.glove_pkl else torch.from_numpy(words),
                        dataset_name=dataset, is_training=training, neg_index=torch.from_numpy(tin["neg_index"]),
                        masked_words=torch.from_numpy(tin["masked_words"]), return_aux=True)
    return out, aux


def to_np(x):
    if torch.is_tensor(x):
        return x.detach().numpy()
    return np.asarray(x)


def compare_all(f_out, f_aux, t_out, t_aux, min_names=0):
    """Every output and every intermediate both sides name, the Flax array cut to the twin's (dynamic) shape."""
    pairs = [(f"out.{k}", f_out[k], t_out[k]) for k in t_out if k in f_out]
    pairs += [(f"aux.{k}", f_aux[k], t_aux[k]) for k in t_aux if k in f_aux]
    assert set(t_out) <= set(f_out), set(t_out) - set(f_out)
    n = 0
    for name, f, t in pairs:
        if isinstance(t, (list, tuple)):
            assert len(f) == len(t), name
            for i, (fi, ti) in enumerate(zip(f, t)):
                pairs.append((f"{name}[{i}]", fi, ti))
            continue
        if isinstance(t, dict):
            pairs += [(f"{name}.{k}", f[k], t[k]) for k in t]
            continue
        t = to_np(t)
        f = np.asarray(f)
        assert f.ndim == t.ndim and all(a >= b for a, b in zip(f.shape, t.shape)), (name, f.shape, t.shape)
        assert_close(name, f[tuple(slice(0, s) for s in t.shape)], t)
        n += 1
    assert n >= min_names, n
    return n


FAST_COMPILE = {"xla_llvm_disable_expensive_passes": True}  # the tiny programs hardly run slower


@functools.lru_cache(maxsize=None)
def _model_fn(cfg, train, with_neg):
    model = M.MESM(cfg)
    return jax.jit(lambda params, batch, inject: model.apply({"params": params}, batch, train=train,
                                                            with_neg=with_neg, **inject))


_EXECUTABLES = {}


def flax_run(cfg, twin, static, inject, train, with_neg=True):
    """The Flax model on the twin's weights (float64), compiled once per (config, mode, shapes)."""
    params = K.torch_to_params(twin.state_dict(), cfg, dtype=np.float64, check_shapes=False)
    shapes = jax.tree.map(lambda a: (np.shape(a), np.asarray(a).dtype.str), (static, inject))
    key = (cfg, train, with_neg, str(shapes))
    if key not in _EXECUTABLES:
        _EXECUTABLES[key] = _model_fn(cfg, train, with_neg).lower(params, static, inject).compile(FAST_COMPILE)
    return _EXECUTABLES[key](params, static, inject)


@pytest.fixture()
def float64_twin(monkeypatch):
    twin_positions_float64(monkeypatch)
    with jax.enable_x64(True):
        yield


def test_model_matches_twin_train_qvh_two_mlp_glove_pkl(float64_twin):
    """Train mode (dropout rates 0: the MLM pass and the negative branch) with the official head-major mask, on a
    QVHighlights-like batch (groups of windows of different lengths: SS-MESM over the group's concatenated frames),
    with TACoS's TwoMLP enhancer (the MLM pass takes the second FFN) and the glove.pkl text path."""
    cfg = tiny_cfg(share_MLP=False, tokenizer_type="GloVeNLTK", load_vocab_pkl=True)
    twin = perturbed_twin(cfg, seed=3)
    official, words, static, inject, tin = make_case(cfg, seed=3, items=(2, 3, 1), shared_video=False, qvh=True)
    t_out, t_aux = twin_run(twin, official, words, tin, "qvhighlights", training=True)
    f_out, f_aux = flax_run(cfg, twin, static, inject, train=True)
    assert "recfw_words_logit" in f_out and "neg_saliency_scores" in f_out and "masked_words_feat" in t_aux
    compare_all(f_out, f_aux, t_out, t_aux, min_names=60)
    # mutant: the per-row mask where the official head-major one is expected
    twin.set_t2v_mask("per_row")
    p_out, _ = twin_run(twin, official, words, tin, "qvhighlights", training=True)
    with pytest.raises(AssertionError):
        compare_all(f_out, f_aux, p_out, {})


def test_model_matches_twin_eval_charades_per_row(float64_twin):
    """Eval mode on a Charades-like batch (CLIP text, several queries per video) with the per-row mask and the
    official dropout rates (inert in eval), without the negative branch (``with_neg`` off: no
    ``neg_saliency_scores``; the twin always runs it, the train test compares it); then other garbage in the
    padding rows and past the real lengths gives the same real rows, bit for bit."""
    cfg = tiny_cfg(dropout=0.1, input_dropout=0.5, t2v_mask="per_row")
    twin = perturbed_twin(cfg, seed=5)
    twin.set_t2v_mask("per_row")
    official, words, static, inject, tin = make_case(cfg, seed=5, items=(2, 1, 3), shared_video=True)
    t_out, t_aux = twin_run(twin, official, words, tin, "charades", training=False)
    f_out, f_aux = flax_run(cfg, twin, static, {}, train=False, with_neg=False)
    assert "recfw_words_logit" not in f_out and "masked_words_feat" not in f_aux
    assert "neg_saliency_scores" not in f_out and "neg_memory" not in f_aux
    t_out = {k: v for k, v in t_out.items() if k != "neg_saliency_scores"}
    compare_all(f_out, f_aux, t_out, t_aux, min_names=35)
    # padding invariance: the same real rows under different garbage (same shapes: the same executable)
    _, _, static2, _, _ = make_case(cfg, seed=5, items=(2, 1, 3), shared_video=True, garbage_seed=99)
    assert not np.array_equal(static2["video_feat"], static["video_feat"])
    g_out, g_aux = flax_run(cfg, twin, static2, {}, train=False, with_neg=False)
    compare_all(g_out, g_aux, t_out, t_aux, min_names=35)
    b, lv = official["video_mask"].shape

    def real(out, name):
        return np.asarray(out[name])[:b, :lv] if name.endswith("scores") else np.asarray(out[name])[:b]

    for name in ("pred_spans", "pred_logits", "saliency_scores", "recon_feat"):
        assert np.array_equal(real(g_out, name), real(f_out, name)), name
    # mutant: the official head-major mask where the per-row one is configured
    twin.set_t2v_mask("head_major")
    h_out, _ = twin_run(twin, official, words, tin, "charades", training=False)
    with pytest.raises(AssertionError):
        compare_all(f_out, f_aux, h_out, {})
    with pytest.raises(JaxprvrError, match="neg_index"):  # a forward with the negative branch needs one
        M.MESM._input(static, "neg_index", None, "the negative branch")


def test_transformer_derivatives_match_twin(float64_twin):
    """``transformer`` (global token, encoder, DAB decoder) and the heads' ``inverse_sigmoid(reference)``: the
    outputs, and directional derivatives of a loss over them along random directions in every transformer
    parameter, the anchors, the global token and the input (Flax forward-mode ``jvp`` vs the twin's autograd
    gradient dotted with the direction; one direction restricted to ``bbox_embed``, which reaches the loss only
    through the heads' non-detached reference). Two mutants planted in the twin are caught: the head reference
    detached, and ``ca_qpos_proj`` used in every decoder layer."""
    from parity.convert import flatten
    from torch_ref import mesm as T

    cfg = tiny_cfg()
    twin = perturbed_twin(cfg, seed=7)
    params = K.torch_to_params(twin.state_dict(), cfg, dtype=np.float64, check_shapes=False)
    rng = np.random.default_rng(7)
    b, l, d, nq = 4, 7, cfg.hidden_dim, cfg.num_queries
    pad = np.arange(l)[None] >= np.array([7, 3, 5, 1])[:, None]
    src = rng.normal(size=(b, l, d))
    pos = np.array(POSITIONS(~pad, d, jnp.float64))  # a writable copy (torch.from_numpy)
    w = [rng.normal(size=s) for s in ((2, b, nq, d), (2, b, nq, 2), (b, l, d), (b, d))]
    model = M.Transformer(cfg, jnp.float64)

    def loss(tp, qe, x, g, gp):
        hs, refs, mem, mem_g, _ = model.apply({"params": tp}, x, jnp.asarray(pad), qe, jnp.asarray(pos),
                                              jnp.broadcast_to(g, (b, 1, d)), jnp.broadcast_to(gp, (b, 1, d)))
        terms = (hs, M.inverse_sigmoid(refs), mem, mem_g)
        return sum(jnp.sum(wi * t) for wi, t in zip(w, terms)), (hs, refs)

    args = (params["transformer"], params["query_embed"]["embedding"], src, params["global_rep_token"],
            params["global_rep_pos"])
    jvp = jax.jit(lambda a, t: jax.jvp(loss, a, t, has_aux=True))
    directions = [jax.tree.map(lambda a: rng.normal(size=np.shape(a)), args) for _ in range(2)]
    only_bbox = jax.tree.map(np.zeros_like, directions[0])
    only_bbox[0]["decoder"]["bbox_embed"] = directions[0][0]["decoder"]["bbox_embed"]
    directions.append(only_bbox)
    results = [jvp(args, t) for t in directions]

    def torch_dir(t):
        """A direction in the twin's parameter names (through the key table)."""
        full = jax.tree.map(np.zeros_like, params)
        full["transformer"], full["query_embed"]["embedding"] = t[0], t[1]
        full["global_rep_token"], full["global_rep_pos"] = t[3], t[4]
        out = K.params_to_torch(full, cfg)
        out["input"] = t[2]
        return out

    def twin_run_grads(tw):
        tw.zero_grad()
        x = torch.tensor(src, requires_grad=True)
        gt, gp = tw.global_rep_token, tw.global_rep_pos
        out = tw.transformer(x, torch.from_numpy(pad), tw.query_embed.weight, torch.from_numpy(pos),
                             gt.reshape(1, 1, d).repeat(b, 1, 1), gp.reshape(1, 1, d).repeat(b, 1, 1))
        terms = (out[0], T.inverse_sigmoid(out[1]), out[2], out[3])
        value = sum((torch.from_numpy(wi) * t).sum() for wi, t in zip(w, terms))
        value.backward()
        g = {n: (p.grad.numpy() if p.grad is not None else np.zeros(p.shape)) for n, p in tw.named_parameters()}
        g["input"] = x.grad.numpy()
        return g, float(value.detach()), out[0].detach().numpy(), out[1].detach().numpy()

    def check(tw):
        g, value, t_hs, t_refs = twin_run_grads(tw)
        for (f_value, tangent, (f_hs, f_refs)), t in zip(results, directions):
            assert_close("loss", f_value, value)
            assert_close("hs", f_hs, t_hs)
            assert_close("references", f_refs, t_refs)
            td = torch_dir(t)
            dot = sum(float(np.sum(g[k] * td[k])) for k in td if k in g)
            assert_close("directional derivative", tangent, dot, 1e-8 * max(1.0, abs(dot)))
        assert abs(results[2][1]) > 1e-3  # bbox_embed moves the loss, through the head reference only

    check(twin)
    assert len(flatten(params["transformer"])) > 100
    # mutant 1: the head reference detached. Only the layer-0 bbox_embed output reaches it (the next layer's input
    # is detached anyway and the last refinement is unused), so detaching bbox_embed's output detaches it.
    hook = twin.transformer.decoder.bbox_embed.register_forward_hook(lambda m, i, o: o.detach())
    with pytest.raises(AssertionError, match="directional"):
        check(twin)
    hook.remove()
    check(twin)
    # mutant 2: ca_qpos_proj (layer 0's copy) used in every decoder layer
    layer1 = twin.transformer.decoder.layers[1]
    layer1.ca_qpos_proj = copy.deepcopy(twin.transformer.decoder.layers[0].ca_qpos_proj)
    orig = layer1.forward
    layer1.forward = lambda *a, is_first=False, **k: orig(*a, is_first=True, **k)
    with pytest.raises(AssertionError, match="loss|hs"):
        check(twin)


INIT_NORMAL = ("global_rep_token", "global_rep_pos", "query_embed/embedding",
               "txt_position_embed/position_embeddings/embedding")
INIT_ZERO = ("masked_token", "unknown_token", "ss_reconstructor/masked_sent_token")
XAVIER_OWNERS = ("enhance_encoder/", "t2v_encoder/", "transformer/")  # T2VEncoder / Transformer._reset_parameters


def init_rule(path: str, xavier_owners=XAVIER_OWNERS):
    """The official init of one Flax parameter (vmr.md B9): ``(kind, bound or value)``."""
    name = path.rsplit("/", 1)[-1]
    if path in INIT_NORMAL:
        return "normal", 1.0
    if path in INIT_ZERO or path.endswith(("in_proj/bias", "out_proj/bias", "bbox_embed/layers_2/bias")):
        return "const", 0.0
    if path.endswith("activation/weight"):
        return "const", 0.25
    if name == "scale":
        return "const", 1.0
    if name == "bias" and ("LayerNorm" in path or "/norm" in path):
        return "const", 0.0
    if name == "kernel" and (path.endswith("in_proj/kernel") or path.startswith(xavier_owners)):
        return "xavier", None
    return "torch", None


def init_violations(flat: dict, rule=init_rule) -> list[str]:
    bad = []
    for path, x in flat.items():
        x = np.asarray(x, np.float64)
        kind, v = rule(path)
        if kind == "const":
            if not np.all(x == v):
                bad.append(f"{path}: not all {v}")
            continue
        if kind == "normal":
            if x.size >= 32 and not (abs(x.mean()) < 0.5 and 0.6 < x.std() < 1.5) or not np.any(x):
                bad.append(f"{path}: not N(0, 1)")
            continue
        if kind == "xavier":
            bound = math.sqrt(6.0 / (x.shape[0] + x.shape[1]))
        else:  # torch's U(+-1/sqrt(fan_in)), the bias with its kernel's fan_in
            fan_in = x.shape[0] if path.endswith("kernel") else np.asarray(
                flat[path[:-len("bias")] + "kernel"]).shape[0]
            bound = 1.0 / math.sqrt(fan_in)
        m = np.abs(x).max()
        if m > bound * (1 + 1e-6) or (x.size >= 24 and m < 0.6 * bound):
            bad.append(f"{path}: max |x| {m:.3f} vs {kind} bound {bound:.3f}")
    return bad


def official_init_values(cfg, monkeypatch) -> dict:
    """Every parameter's initializer as the Flax model calls it, evaluated once: ``Module.param`` is observed
    during a traced (``jax.eval_shape``) init to record ``(init_fn, shape, dtype)`` per path, and the recorded
    initializers then run with ``jax.random.uniform``/``normal`` drawn by numpy (no RNG program to compile: a
    compiled init of this model takes ~15 s on a CPU, spent in its ~200 random draws)."""
    import flax.linen as nn
    import jax._src.random as jrandom

    records = {}
    orig_param = nn.Module.param

    def param(self, name, init_fn, *args, **kw):
        records["/".join(self.path + (name,))] = (init_fn, args)
        return orig_param(self, name, init_fn, *args, **kw)

    rng = np.random.default_rng(0)
    batch = {"video_feat": np.zeros((2, 3, M.video_in_dim(cfg)), np.float32), "video_mask": np.ones((2, 3), bool),
             "words_feat": np.zeros((2, 4, cfg.t_feat_dim), np.float32), "words_mask": np.ones((2, 4), bool),
             "unknown_mask": np.zeros((2, 4), bool), "clip_mask": np.ones((2, 3), bool),
             "row_group": np.array([0, 1], np.int32), "num_rows": np.int32(2)}
    with monkeypatch.context() as mp:
        mp.setattr(nn.Module, "param", param)
        jax.eval_shape(lambda: M.MESM(cfg).init(jax.random.key(0), batch))

    def uniform(key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0, **kw):
        return jnp.asarray(rng.uniform(float(minval), float(maxval), shape), dtype)

    def normal(key, shape=(), dtype=jnp.float32, **kw):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    with monkeypatch.context() as mp:
        for mod in (jax.random, jrandom):
            mp.setattr(mod, "uniform", uniform)
            mp.setattr(mod, "normal", normal)
        return {path: np.asarray(fn(jax.random.key(0), *args)) for path, (fn, args) in records.items()}


def test_official_init(monkeypatch):
    cfg = tiny_cfg(share_MLP=False, compute_dtype="float32", hidden_dim=48, nheads=4, dim_feedforward=40)
    flat = official_init_values(cfg, monkeypatch)
    assert set(flat) == {e.flax for e in K.make_table(cfg)}  # every official parameter, nothing else
    assert init_violations(flat) == []
    # mutants: SS-MESM's layers xavier-initialised like the encoders; bbox_embed's last weight left at 0
    wrong = init_violations(flat, lambda p: init_rule(p, XAVIER_OWNERS + ("ss_reconstructor/",)))
    assert wrong and all("ss_reconstructor" in v for v in wrong)
    flat["transformer/decoder/bbox_embed/layers_2/kernel"] = np.zeros_like(
        flat["transformer/decoder/bbox_embed/layers_2/kernel"])
    assert init_violations(flat) == ["transformer/decoder/bbox_embed/layers_2/kernel: max |x| 0.000 vs xavier "
                                     f"bound {math.sqrt(6 / (48 + 2)):.3f}"]
