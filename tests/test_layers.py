"""Shared blocks against an independent float64 numpy transcription of the official PyTorch math.

References: ms-sl ``method/model_components.py`` (v1 blocks), GMMFormer ``model_components.py`` (Gaussian
attention, GMMBlock), GMMFormer_v2 ``model_components.py`` (v2 blocks, DyGMMBlock); line ranges in the docstring of
:mod:`jaxprvr.models.layers`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprvr.models import layers as L

D, NH, N, T = 32, 2, 3, 8
RTOL, ATOL = 1e-5, 2e-6


# ----------------------------------------------------------------------------- numpy reference
def np_torch_linspace(n):
    """torch's CPU linspace kernel (RangeFactoriesKernel.cpp; its FMA builds round ``1 - step*k`` once)."""
    if n == 1:
        return np.zeros(1, np.float32)
    step = np.float64(np.float32(1) / np.float32(n - 1))
    j = np.arange(n)
    return np.where(j < n // 2, step * j, 1.0 - step * (n - 1 - j)).astype(np.float32)


def np_gauss(n, w):
    """generate_gauss_weight evaluated in float32 like the official code: for the narrow widths the exponent
    reaches ~-100, so a float64 grid (or an ulp off in linspace) would differ from torch by ~1e-5."""
    f = np.float32
    c = np.arange(n, dtype=f) / f(n)
    x = np_torch_linspace(n)
    s = f(max(w, 1e-2)) / f(9)
    g = f(0.3989422804014327) / s * np.exp(-((x[None, :] - c[:, None]) ** 2) / (f(2) * s**2))
    return (g / g.max(-1, keepdims=True)).astype(np.float64)


def np_ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def np_lin(x, p):
    return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_relu(x):
    return np.maximum(x, 0)


def np_self_attn(p, qs, ks, vs, mask, nh, wid=None):
    n, lq, d = qs.shape
    lk = ks.shape[1]
    dh = d // nh

    def split(x, name):
        return np_lin(x, p[name]).reshape(n, x.shape[1], nh, dh).transpose(0, 2, 1, 3)

    q, k, v = split(qs, "query"), split(ks, "key"), split(vs, "value")
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    if wid is not None:
        s = s * np_gauss(lk, wid)[None, None]
    if mask is not None:
        s = s + (1 - mask[:, None, None, :]) * -10000.0
    ctx = np_softmax(s, -1) @ v
    return ctx.transpose(0, 2, 1, 3).reshape(n, lq, d)


def np_bert_v1(p, x, mask, nh, wid=None):
    s = np_self_attn(p["self"], x, x, x, mask, nh, wid)
    return np_ln(np_lin(s, p["output"]["dense"]) + x, p["output"]["LayerNorm"])


def np_ffn(p, x):
    return np_lin(np_relu(np_lin(x, p["layer1"])), p["layer2"])


def np_bert_v2(p, x, mask, nh, wid=None):
    h = np_ln(x + np_self_attn(p["self"], x, x, x, mask, nh, wid), p["norm1"])
    return np_ln(h + np_ffn(p["output"], h), p["norm2"])


def np_cross(p, query, x, mask, nh):
    h = np_ln(query + np_self_attn(p["self"], query, x, x, mask, nh), p["norm1"])
    return np_ln(h + np_ffn(p["output"], h), p["norm2"])


def np_gmm_block(p, x, mask, nh, widths):
    return np.mean(np.stack([np_bert_v1(p[f"attn{k}"], x, mask, nh, w) for k, w in enumerate(widths)], -1), -1)


def np_dygmm(p, x, mask, token, nh, widths, sft):
    oo = np.stack([np_bert_v2(p[f"attn{k}"], x, mask, nh, w) for k, w in enumerate(widths)], -1)
    tok = np.repeat(token, x.shape[0], axis=0)
    weight = np.concatenate([np_cross(p["ca"], tok, oo[..., i], mask, nh) for i in range(oo.shape[-1])], axis=1)
    weight = np_lin(np_relu(np_lin(weight, p["layer1"])), p["layer2"])
    weight = np_softmax(weight.transpose(0, 2, 1) / sft, -1)
    return np.sum(oo * weight[:, :, None, :], -1)


def np_pool(logits, mask, x):
    m = mask[..., None]
    att = np_softmax(logits * m + (1 - m) * -1e10, 1)
    return np.einsum("blm,bld->bmd", att, x)[:, 0]


# ----------------------------------------------------------------------------- helpers
def rand(key, *shape):
    return np.asarray(jax.random.normal(jax.random.key(key), shape, jnp.float32))


def random_params(shapes, seed=1):
    """Random parameters for a shape tree (no initializer compiles): LN scales 1 + 0.1 N, other leaves
    N(0, 0.2^2), so every LN scale/bias and Linear bias is non-trivial."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        z = rng.standard_normal(s.shape)
        return jnp.asarray(1.0 + 0.1 * z if name == "scale" else 0.2 * z, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def init(module, *args, **kw):
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kw))["params"]
    params = random_params(shapes)
    return {"params": params}, jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def mask_of(lengths, size):
    return (np.arange(size)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


def paths(params):
    return {"/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("relu", [True, False])
def test_linear_layer(relu):
    x = rand(0, N, T, 12)
    m = L.LinearLayer(D, relu=relu, dropout=0.3)
    v, p = init(m, x)
    assert paths(v["params"]) == {"LayerNorm/scale", "LayerNorm/bias", "net_1/kernel", "net_1/bias"}
    ref = np_lin(np_ln(x, p["LayerNorm"]), p["net_1"])
    close(m.apply(v, x), np_relu(ref) if relu else ref)


def test_positional_encoding_uses_first_rows():
    x = rand(0, N, 5, D)
    m = L.TrainablePositionalEncoding(7, D, 0.3)
    v, p = init(m, x)
    assert paths(v["params"]) == {"position_embeddings/embedding", "LayerNorm/scale", "LayerNorm/bias"}
    close(m.apply(v, x), np_ln(x + p["position_embeddings"]["embedding"][:5], p["LayerNorm"]))


@pytest.mark.parametrize("wid", [None, 0.5, 5.0])
@pytest.mark.parametrize("masked", [False, True])
def test_self_attention(wid, masked):
    x = rand(0, N, T, D)
    mask = mask_of([T, 5, 1], T) if masked else None
    m = L.BertSelfAttention(D, NH, 0.3, wid)
    v, p = init(m, x, x, x, mask)
    close(m.apply(v, x, x, x, mask), np_self_attn(p, x, x, x, mask, NH, wid))


def test_gaussian_on_a_shorter_grid_matches_the_unpadded_computation():
    """GMMFormer v1 builds the grid on the batch length L_b < static size: rows < L_b match the official
    computation on the arrays truncated to L_b, for every video with length <= L_b."""
    lb = 6
    x = rand(0, N, T, D)
    mask = mask_of([6, 4, 1], T)
    m = L.BertAttention(D, NH, 0.0, 1.0)
    v, p = init(m, x, mask)
    got = np.asarray(m.apply(v, x, mask, gmm_length=jnp.int32(lb)))
    ref = np_bert_v1(p, x[:, :lb], mask[:, :lb], NH, 1.0)
    close(got[:, :lb], ref)
    jit_got = jax.jit(lambda n: m.apply(v, x, mask, gmm_length=n))(jnp.int32(lb))
    close(np.asarray(jit_got)[:, :lb], ref)


def test_bert_attention_v1():
    x = rand(0, N, T, D)
    mask = mask_of([T, 3, 0], T)  # includes an all-padding row: finite, ignored
    m = L.BertAttention(D, NH, 0.3, 0.5)
    v, p = init(m, x, mask)
    assert "output/LayerNorm/scale" in paths(v["params"]) and "self/query/kernel" in paths(v["params"])
    got = np.asarray(m.apply(v, x, mask))
    assert np.isfinite(got).all()
    # the all-padding row is (s*g - 10000) in float32 for every key: finite, unused, not compared
    close(got[:2], np_bert_v1(p, x, mask, NH, 0.5)[:2])


def test_bert_attention_v2():
    x = rand(0, N, T, D)
    mask = mask_of([T, 3, 2], T)
    m = L.BertAttentionV2(D, NH, 0.3, 10.0)
    v, p = init(m, x, mask)
    assert {"norm1/scale", "norm2/bias", "output/layer1/kernel", "output/layer2/bias"} <= paths(v["params"])
    assert v["params"]["output"]["layer1"]["kernel"].shape == (D, 4 * D)
    close(m.apply(v, x, mask), np_bert_v2(p, x, mask, NH, 10.0))


def test_cross_attention():
    x = rand(0, N, T, D)
    q = rand(1, N, 1, D)
    mask = mask_of([T, 3, 2], T)
    m = L.BertCrossAttention(D, NH, 0.3)
    v, p = init(m, q, x, mask)
    assert v["params"]["output"]["layer1"]["kernel"].shape == (D, D)
    close(m.apply(v, q, x, mask), np_cross(p, q, x, mask, NH))


def test_attention_pool_and_mask_logits():
    x = rand(0, N, T, D)
    logits = rand(1, N, T, 1)
    mask = mask_of([T, 2, 0], T)
    got = np.asarray(L.attention_pool(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(x)))
    assert np.isfinite(got).all()
    close(got, np_pool(logits.astype(np.float64), mask, x.astype(np.float64)))
    close(L.mask_logits(jnp.float32(3.0), jnp.float32(0.0)), -1e10, rtol=1e-7)


@pytest.mark.parametrize("batched", [True, False])
def test_gmm_block(batched):
    x = rand(0, N, T, D)
    mask = mask_of([T, 5, 3], T)
    m = L.GMMBlock(D, NH, 0.3, batched=batched)
    v, p = init(m, x, mask)
    assert {k.split("/")[0] for k in paths(v["params"])} == {"attn0", "attn1", "attn2", "attn3"}
    close(m.apply(v, x, mask), np_gmm_block(p, x, mask, NH, L.GMM_WIDTHS))
    one = m.apply(v, x[:1], mask[:1])  # batch of one keeps its batch axis (no squeeze bug)
    assert one.shape == (1, T, D)


@pytest.mark.parametrize("masked,batched", [(False, True), (True, True), (True, False)])
def test_dygmm_block(masked, batched):
    x = rand(0, N, T, D)
    token = rand(2, 1, 1, D)
    mask = mask_of([T, 5, 2], T) if masked else None
    m = L.DyGMMBlock(D, NH, frame_len=T, sft_factor=0.09, drop=0.3, batched=batched)
    v, p = init(m, x, mask, token)
    top = {k.split("/")[0] for k in paths(v["params"])}
    assert top == {f"attn{k}" for k in range(8)} | {"ca", "layer1", "layer2"}
    assert v["params"]["layer2"]["kernel"].shape == (D, T)
    # the temperature 0.09 amplifies float32 rounding ~10x (in float64 the difference is ~2e-7)
    close(m.apply(v, x, mask, token), np_dygmm(p, x, mask, token, NH, L.DYGMM_WIDTHS, 0.09), atol=5e-6)


def test_dygmm_block_custom_widths():
    x = rand(0, 2, T, D)
    token = rand(2, 1, 1, D)
    widths = (None, 0.5, 2.0)
    m = L.DyGMMBlock(D, NH, frame_len=T, sft_factor=0.6, widths=widths)
    v, p = init(m, x, None, token)
    close(m.apply(v, x, None, token), np_dygmm(p, x, None, token, NH, widths, 0.6))


def test_branch_impls_share_parameters_and_agree_in_training():
    """``batched`` and ``loop`` blocks have the same parameter tree and the same init (checkpoints move between
    them), and the same forward; in train mode both draw dropout (different masks, so only the eval forward can
    agree). ``model.branch_impl`` picks one, ``auto`` by backend."""
    from jaxprvr.config import model_config

    x = rand(0, N, T, D)
    token = rand(2, 1, 1, D)
    mask = mask_of([T, 5, 2], T)
    blocks = [L.DyGMMBlock(D, NH, frame_len=T, sft_factor=0.09, drop=0.3, batched=b) for b in (True, False)]
    vs = [b.init(jax.random.key(0), x, mask, token) for b in blocks]
    assert jax.tree.structure(vs[0]) == jax.tree.structure(vs[1])
    for a, b in zip(jax.tree.leaves(vs[0]), jax.tree.leaves(vs[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    outs = [np.asarray(b.apply(vs[0], x, mask, token)) for b in blocks]
    close(outs[0], outs[1], atol=1e-6)
    tr = [np.asarray(b.apply(vs[0], x, mask, token, train=True, rngs={"dropout": jax.random.key(1)})) for b in blocks]
    assert all(np.isfinite(t).all() and not np.allclose(t, outs[0]) for t in tr)
    assert L.resolve_branch_impl(model_config("gmmformer_v2", branch_impl="batched")) is True
    assert L.resolve_branch_impl(model_config("gmmformer_v2", branch_impl="loop")) is False
    assert L.resolve_branch_impl(model_config("gmmformer_v2")) is (jax.default_backend() != "cpu")
    with pytest.raises(Exception, match="branch_impl"):
        L.resolve_branch_impl(model_config("gmmformer_v2", branch_impl="fast"))


def test_batched_branches_draw_independent_dropout_and_get_their_own_gradients():
    """The vmapped branches of a block (attention_branches) are K modules, not K copies of one: with identical
    weights and widths, eval gives identical outputs, train gives each branch its own dropout masks (as K separate
    torch modules would), and each branch's parameters get the gradient of their own branch only."""
    import flax.linen as nn

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return L.attention_branches(self, lambda w, **kw: L.BertAttentionV2(D, NH, 0.3, w, **kw), (1.0, 1.0), x,
                                        None, train=train)

    x = jnp.asarray(rand(0, N, T, D))
    m = Two()
    p = m.init(jax.random.key(0), x)["params"]
    p = {"attn0": p["attn0"], "attn1": p["attn0"]}  # the same weights in both branches
    ev = np.asarray(m.apply({"params": p}, x))
    np.testing.assert_allclose(ev[0], ev[1], rtol=1e-6, atol=1e-7)
    tr = np.asarray(m.apply({"params": p}, x, True, rngs={"dropout": jax.random.key(3)}))
    assert not np.allclose(tr[0], tr[1]) and not np.allclose(tr[0], ev[0])

    def loss(q):  # depends on branch 0 only
        return jnp.sum(m.apply({"params": q}, x)[0] ** 2)

    g = jax.grad(loss)(p)
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(g["attn1"]))
    assert any(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(g["attn0"]))


def test_dropout_train_flag():
    x = rand(0, N, T, D)
    mask = mask_of([T, 5, 3], T)
    m = L.BertAttentionV2(D, NH, 0.5, 1.0)
    v, _ = init(m, x, mask)
    a = m.apply(v, x, mask, train=False, rngs={"dropout": jax.random.key(1)})
    b = m.apply(v, x, mask, train=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = m.apply(v, x, mask, train=True, rngs={"dropout": jax.random.key(1)})
    d = m.apply(v, x, mask, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(np.asarray(c), np.asarray(a)) and not np.allclose(np.asarray(c), np.asarray(d))


def test_official_init():
    x = rand(0, N, T, 12)
    params = L.LinearLayer(D).init(jax.random.key(0), x)["params"]
    assert np.all(np.asarray(params["net_1"]["bias"]) == 0)
    assert np.all(np.asarray(params["LayerNorm"]["scale"]) == 1)
    assert np.all(np.asarray(params["LayerNorm"]["bias"]) == 0)
    assert abs(float(np.std(np.asarray(params["net_1"]["kernel"]))) - 0.02) < 0.004


def test_l2_normalize_and_max_scores():
    x = jnp.asarray(np.stack([rand(0, D), np.zeros(D, np.float32)]))
    y = np.asarray(L.l2_normalize(x))
    close(y[0], x[0] / np.linalg.norm(x[0]), atol=1e-7)
    assert np.all(y[1] == 0)  # F.normalize: a zero vector stays zero
    g = jax.grad(lambda z: L.l2_normalize(z).sum())(x)
    assert np.isfinite(np.asarray(g)).all()
    q, ctx = rand(1, 4, D), rand(2, 3, 5, D)
    s, idx = L.max_scores(jnp.asarray(q), jnp.asarray(ctx))
    ref = np.einsum("qd,vtd->qvt", q.astype(np.float64), ctx)
    close(s, ref.max(-1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(idx), ref.argmax(-1))
