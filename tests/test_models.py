"""MS-SL, GMMFormer v1 and v2 models: API, shapes, padding, score consistency, dropout, official sizes.

Tiny sizes (hidden 32, 2 heads, query dim 16, visual dim 12, 8 clips, 16 frames, 6 tokens) keep it fast;
parameter counts are checked at the official TVR size with ``jax.eval_shape`` (no real init).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprvr.config import model_config
from jaxprvr.errors import JaxprvrError
from jaxprvr.models import GMMFormer, GMMFormerV2, MSSL, build_model
from jaxprvr.models import ms_sl
from jaxprvr.models.gmmformer import batch_frame_length

NAMES = ["ms_sl", "gmmformer", "gmmformer_v2"]
TINY = dict(hidden_size=32, n_heads=2, q_feat_size=16, visual_feat_dim=12, max_desc_l=6, max_ctx_l=16, map_size=8,
            input_drop=0.3, drop=0.3)
FRAME_LENS = [16, 9, 3]  # valid videos; the batch length L_b is 16 = max_ctx_l
QUERIES = [2, 1, 2]  # queries per valid video


def tiny_cfg(name, **kw):
    return model_config(name, **{**TINY, **kw})


def make_batch(cfg, frame_lens=FRAME_LENS, queries=QUERIES, pad_videos=1, pad_queries=2, seed=0):
    rng = np.random.default_rng(seed)
    nv, nq = len(frame_lens), sum(queries)
    b, q = nv + pad_videos, nq + pad_queries
    dv, dq, lf, lq = cfg.visual_feat_dim, cfg.q_feat_size, cfg.max_ctx_l, cfg.max_desc_l
    clip = np.zeros((b, cfg.map_size, dv), np.float32)
    frames = np.zeros((b, lf, dv), np.float32)
    fmask = np.zeros((b, lf), np.float32)
    flen = np.zeros((b,), np.int32)
    for i, n in enumerate(frame_lens):
        clip[i] = rng.standard_normal((cfg.map_size, dv))
        frames[i, :n] = rng.standard_normal((n, dv))
        fmask[i, :n] = 1
        flen[i] = n
    qf = np.zeros((q, lq, dq), np.float32)
    qm = np.zeros((q, lq), np.float32)
    labels = np.zeros((q,), np.int32)
    k = 0
    for v, c in enumerate(queries):
        for _ in range(c):
            n = int(rng.integers(2, lq + 1))
            qf[k, :n] = rng.standard_normal((n, dq))
            qm[k, :n] = 1
            labels[k] = v
            k += 1
    return dict(clip_feats=clip, frame_feats=frames, frame_mask=fmask, frame_len=flen,
                video_valid=(np.arange(b) < nv).astype(np.float32), query_feats=qf, query_mask=qm,
                query_valid=(np.arange(q) < nq).astype(np.float32), query_labels=labels)


def random_params(shapes, seed=1):
    """Parameters for a shape tree without running the initializers: LN scales 1 + 0.1 N, the rest N(0, 0.2^2)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        z = rng.standard_normal(s.shape)
        return jnp.asarray(1.0 + 0.1 * z if str(getattr(path[-1], "key", "")) == "scale" else 0.2 * z, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# Behavioural tests use fewer Gaussian branches (the code path is the same; the official 4 / 8 branch blocks are
# checked numerically in test_layers.py and by size below) to keep the compile time of the file small.
TEST_WIDTHS = {"gmmformer": (None, 0.5), "gmmformer_v2": (None, 0.5, 0.1)}


@functools.lru_cache(maxsize=None)
def setup_model(name, **kw):
    cfg = tiny_cfg(name, **kw)
    model = build_model(cfg)
    if name in TEST_WIDTHS:
        model = model.clone(widths=TEST_WIDTHS[name])
    shapes = jax.eval_shape(lambda b: model.init(jax.random.key(0), b), make_batch(cfg))
    return cfg, model, {"params": random_params(shapes["params"])}


BATCH_KINDS = {
    "padded": dict(),
    "single": dict(frame_lens=[5], queries=[1], pad_videos=0, pad_queries=0),
    "short": dict(frame_lens=[10, 4, 7]),  # L_b = 10 < max_ctx_l
}


@functools.lru_cache(maxsize=None)
def batch_of(name, kind):
    return make_batch(setup_model(name)[0], **BATCH_KINDS[kind])


def garbage_padding(batch, seed=5):
    """The same batch with random features (and a large frame_len) in the padded rows; masks stay zero."""
    rng = np.random.default_rng(seed)
    out = {k: v.copy() for k, v in batch.items()}
    pv, pq = out["video_valid"] == 0, out["query_valid"] == 0
    for k, rows in (("clip_feats", pv), ("frame_feats", pv), ("query_feats", pq)):
        out[k][rows] = rng.standard_normal(out[k][rows].shape)
    out["frame_len"][pv] = out["frame_mask"].shape[1]
    out["query_labels"][pq] = 1
    return out


@functools.lru_cache(maxsize=None)
def _all_fn(name):
    _, model, _ = setup_model(name)

    def f(v, b, key):
        evaluation = model.apply(v, b)
        training = model.apply(v, b, train=True, rngs={"dropout": key})
        video = model.apply(v, b["clip_feats"], b["frame_feats"], b["frame_mask"], b["frame_len"],
                            method="encode_video")
        query = model.apply(v, b["query_feats"], b["query_mask"], method="encode_query")
        return evaluation, training, (video, query, model.apply(v, query, video, method="score"))

    return jax.jit(f)


@functools.lru_cache(maxsize=None)
def run_all(name, kind="padded", seed=0, garbage=False):
    """One jitted program per model and batch shape: (eval (scores, aux), train (scores, aux),
    (encode_video, encode_query, score)), as numpy."""
    _, _, v = setup_model(name)
    b = batch_of(name, kind)
    b = garbage_padding(b) if garbage else b
    # an "rbg" key compiles the ~60 dropout sites about 2x faster than threefry on CPU
    return jax.tree_util.tree_map(np.asarray, _all_fn(name)(v, b, jax.random.key(seed, impl="rbg")))


def run(name, kind="padded", train=False, seed=0):
    evaluation, training, _ = run_all(name, kind, seed)
    return training if train else evaluation


def encode(name, kind="padded"):
    return run_all(name, kind)[2]


def tvr_shapes(name):
    cfg = model_config(name)  # official TVR size: q 768, v 3072, hidden 384
    S = jax.ShapeDtypeStruct
    b, q = 2, 3
    batch = dict(clip_feats=S((b, 32, 3072), jnp.float32), frame_feats=S((b, 128, 3072), jnp.float32),
                 frame_mask=S((b, 128), jnp.float32), frame_len=S((b,), jnp.int32), video_valid=S((b,), jnp.float32),
                 query_feats=S((q, 30, 768), jnp.float32), query_mask=S((q, 30), jnp.float32),
                 query_valid=S((q,), jnp.float32), query_labels=S((q,), jnp.int32))
    model = build_model(cfg)
    return jax.eval_shape(lambda bt: model.init(jax.random.key(0), bt), batch)["params"]


def flat_paths(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- registry, sizes, names
def test_build_model_and_branch_weights():
    assert isinstance(build_model(model_config("ms_sl")), MSSL)
    assert isinstance(build_model(model_config("gmmformer")), GMMFormer)
    assert isinstance(build_model(model_config("gmmformer_v2")), GMMFormerV2)
    with pytest.raises(JaxprvrError, match="model.name"):
        build_model(dataclasses.replace(model_config("mtm"), name="mtm_typo"))
    with pytest.raises(JaxprvrError, match="--model"):
        model_config("mtm_typo")
    assert build_model(model_config("gmmformer", clip_scale_w=0.5, frame_scale_w=0.5)).branch_weights() == {
        "clip": 0.5, "frame": 0.5}
    assert build_model(model_config("mtm", frame_scale_w=0.35, video_scale_w=0.03)).branch_weights() == {
        "clip": 0.7, "frame": 0.35, "video": 0.03}


# Exact counts of the official torch models at TVR size (the official classes instantiated: 4.853 M,
# 12.848 M, 32.273 M); the table and the block sizes are in docs/parity.md, "Parameter counts of the
# official models".
OFFICIAL_COUNTS = {"ms_sl": 4_852_992, "gmmformer": 12_848_256, "gmmformer_v2": 32_273_440}


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_at_tvr_size(name):
    n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(tvr_shapes(name)))
    assert n == OFFICIAL_COUNTS[name]
    assert round(n / 1e6, 3) == {"ms_sl": 4.853, "gmmformer": 12.848, "gmmformer_v2": 32.273}[name]


def test_block_sizes_match_the_analytic_counts():
    p = flat_paths(tvr_shapes("gmmformer_v2"))

    def size(prefix):
        return sum(int(np.prod(v.shape)) for k, v in p.items() if k.startswith(prefix))

    assert size("query_encoder/") == 1_626_624  # v2 BertAttention
    assert size("clip_encoder/ca/") == 740_736  # BertCrossAttention
    assert size("clip_encoder/") == 13_913_888  # DyGMMBlock-8, frame_len 32
    p1 = flat_paths(tvr_shapes("gmmformer"))
    assert sum(int(np.prod(v.shape)) for k, v in p1.items() if k.startswith("query_encoder/")) == 592_128


def test_torch_names():
    ms = flat_paths(tvr_shapes("ms_sl"))
    for k in ["query_input_proj/LayerNorm/scale", "query_input_proj/net_1/kernel",
              "query_pos_embed/position_embeddings/embedding",
              "clip_pos_embed/LayerNorm/bias", "frame_encoder/self/value/bias", "clip_encoder/output/LayerNorm/scale",
              "modular_vector_mapping/kernel", "mapping_linear_0/kernel", "mapping_linear_1/kernel"]:
        assert k in ms, k
    assert ms["clip_pos_embed/position_embeddings/embedding"].shape == (128, 384)  # max_ctx_l rows, as official
    assert "modular_vector_mapping/bias" not in ms and "mapping_linear_0/bias" not in ms
    v1 = flat_paths(tvr_shapes("gmmformer"))
    for k in ["clip_encoder_2/attn3/self/query/kernel", "frame_encoder_1/attn0/output/dense/bias",
              "frame_encoder_2/attn2/output/LayerNorm/scale", "modular_vector_mapping_2/kernel"]:
        assert k in v1, k
    v2 = flat_paths(tvr_shapes("gmmformer_v2"))
    for k in ["weight_token", "clip_encoder/attn7/norm2/scale", "frame_encoder_1/ca/output/layer1/kernel",
              "frame_encoder_1/layer2/kernel", "query_encoder/output/layer2/bias", "query_encoder/norm1/bias"]:
        assert k in v2, k
    assert v2["weight_token"].shape == (1, 1, 384)
    assert v2["clip_encoder/layer2/kernel"].shape == (384, 32)
    assert v2["frame_encoder_1/layer2/kernel"].shape == (384, 128)


def test_official_init_ms_sl():
    cfg = tiny_cfg("ms_sl")
    model = build_model(cfg)
    params = flat_paths(jax.jit(lambda b: model.init(jax.random.key(0), b))(make_batch(cfg))["params"])
    for k, v in params.items():
        v = np.asarray(v)
        if k.endswith("scale"):
            assert np.all(v == 1), k
        elif k.endswith("bias"):
            assert np.all(v == 0), k
        elif v.size >= 256:
            assert abs(v.std() - 0.02) < 0.005, k


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_keys_and_no_nan(name):
    cfg, _, _ = setup_model(name)
    batch = batch_of(name, "padded")
    b, q = batch["clip_feats"].shape[0], batch["query_feats"].shape[0]
    d = cfg.hidden_size
    for train in (False, True):
        scores, aux = run(name, train=train)
        assert set(scores) == {"clip", "clip_raw", "frame", "frame_raw"}
        assert scores["clip"].shape == scores["clip_raw"].shape == (q, b)
        frame_cols = q if name == "ms_sl" else b
        assert scores["frame"].shape == scores["frame_raw"].shape == (q, frame_cols)
        assert aux["query"].shape == (q, d) and aux["clip_feats"].shape == (b, cfg.map_size, d)
        assert aux["frame_feats"].shape == (b, cfg.max_ctx_l, d)
        assert aux["query_tokens"].shape == (q, cfg.max_desc_l, d)
        if name == "ms_sl":
            p = cfg.map_size * (cfg.map_size + 1) // 2
            assert aux["proposals"].shape == (b, p, d) and aux["key_clip_index"].shape == (q, b)
            assert aux["key_clip_selected"].shape == (q,) and aux["frame_scale_feat"].shape == (q, d)
        else:
            assert aux["query2"].shape == (q, d)
        if name == "gmmformer":
            assert aux["video_feats"].shape == (b, d) and int(aux["gmm_length"]) == max(FRAME_LENS)
            assert aux["clip_feats_1"].shape == (b, cfg.map_size, d)
            assert aux["frame_feats_1"].shape == aux["frame_feats"].shape
        for k, a in {**scores, **aux}.items():
            assert np.isfinite(a).all(), (k, train)
    video, _, _ = encode(name)
    expected = {"ms_sl": {"proposals", "frame_feats", "frame_mask"}, "gmmformer": {"clip_feats", "video_feats"},
                "gmmformer_v2": {"clip_feats", "frame_feats"}}[name]
    assert set(video) == expected


@pytest.mark.parametrize("name", ["ms_sl", "gmmformer_v2"])
def test_gradients_finite_with_padding(name):
    """Zero-norm rows (v2's zeroed padding, padded queries) must not give NaN gradients through the cosine."""
    _, model, v = setup_model(name)
    batch = batch_of(name, "padded")
    qv, vv = batch["query_valid"], batch["video_valid"]

    def loss(params):
        scores, aux = model.apply({"params": params}, batch)
        cols = qv if name == "ms_sl" else vv
        total = jnp.sum(scores["clip"] * qv[:, None] * vv[None, :])
        total += jnp.sum(scores["frame"] * qv[:, None] * cols[None, :])
        total += 1e-3 * jnp.sum(scores["frame_raw"] * qv[:, None] * cols[None, :])
        return total

    grads = jax.jit(jax.grad(loss))(v["params"])
    for k, g in flat_paths(grads).items():
        assert np.isfinite(np.asarray(g)).all(), k


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_change_valid_scores(name):
    """Padded videos/queries (zero masks) cannot influence the valid rows: filling them with random
    features, a full frame_len and another label leaves every valid score and stage unchanged."""
    (sp, ap), _, (video, _, test) = run_all(name)
    (sg, ag), _, (video_g, _, test_g) = run_all(name, garbage=True)
    nq, nv = sum(QUERIES), len(FRAME_LENS)
    for k in sp:
        cols = nq if (name == "ms_sl" and k.startswith("frame")) else nv
        np.testing.assert_allclose(sp[k][:nq, :cols], sg[k][:nq, :cols], rtol=1e-6, atol=1e-6, err_msg=k)
    for k in test:
        np.testing.assert_allclose(test[k][:nq, :nv], test_g[k][:nq, :nv], rtol=1e-6, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(ap["query"][:nq], ag["query"][:nq])
    for k in video:
        np.testing.assert_allclose(video[k][:nv], video_g[k][:nv], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_score_matches_training_forward(name):
    scores, aux = run(name)
    batch = batch_of(name, "padded")
    _, query, test = encode(name)
    np.testing.assert_allclose(np.asarray(query), aux["query"], rtol=1e-6, atol=1e-6)
    assert set(test) == {"clip", "frame"}
    q, b = batch["query_feats"].shape[0], batch["clip_feats"].shape[0]
    assert test["clip"].shape == test["frame"].shape == (q, b)
    np.testing.assert_allclose(np.asarray(test["clip"]), scores["clip"], rtol=1e-5, atol=1e-6)
    if name == "ms_sl":
        # training frame scores are (Q, Q): column j uses query j's key clip in its own video; the test-time
        # pair (i, y(i)) is the diagonal
        own = np.asarray(test["frame"])[np.arange(q), batch["query_labels"]]
        np.testing.assert_allclose(own, np.diag(scores["frame"]), rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(test["frame"]), scores["frame"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_dropout(name):
    (a, aux_eval), (c, aux), _ = run_all(name, seed=1)
    (a2, _), (c2, _), _ = run_all(name, seed=2)
    for k in a:  # train=False ignores the dropout rng
        np.testing.assert_array_equal(a[k], a2[k])
    assert not np.allclose(c["clip"], a["clip"]) and not np.allclose(c["clip"], c2["clip"])
    if name != "ms_sl":  # the second encode_query pass draws its own dropout masks
        assert not np.allclose(aux["query"], aux["query2"])
        np.testing.assert_array_equal(aux_eval["query"], aux_eval["query2"])


@pytest.mark.parametrize("name", NAMES)
def test_single_query_and_single_video(name):
    """The official .squeeze() calls crash on a batch of one; the port keeps the batch axes."""
    _, model, v = setup_model(name)
    scores, _ = jax.jit(lambda v, b: model.apply(v, b))(v, batch_of(name, "single"))
    assert scores["clip"].shape == (1, 1) and scores["frame"].shape == (1, 1)
    assert np.isfinite(np.asarray(scores["frame"])).all()


# ----------------------------------------------------------------------------- MS-SL specifics
def test_ms_sl_proposals_official_order():
    ks, ss = ms_sl.proposal_windows(32)
    assert len(ks) == 528
    assert list(ks[:32]) == [1] * 32 and list(ss[:32]) == list(range(32))
    assert (ks[32], ss[32]) == (2, 0) and (ks[-1], ss[-1]) == (32, 0)
    x = np.random.default_rng(0).standard_normal((2, 32, 5)).astype(np.float32)
    ref = np.concatenate([np.stack([x[:, s:s + k].mean(1) for s in range(32 - k + 1)], 1) for k in range(1, 33)], 1)
    got = np.asarray(ms_sl.encode_feat_map(jnp.asarray(x)))
    assert got.shape == (2, 528, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[:, :32], x)  # window 1 is the identity


def _key_clip_inputs(seed=0, v=3, q=4, length=7, p=6, d=5):
    rng = np.random.default_rng(seed)
    key, value = rng.standard_normal((v, length, d)), rng.standard_normal((v, length, d))
    props = rng.standard_normal((v, p, d))
    mask = np.ones((v, length), np.float32)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    idx = rng.integers(0, p, (q, v)).astype(np.int32)
    return key, value, props, mask, idx


def _brute_force(key, value, props, mask, qi, vi, idx):
    guide = props[vi, idx[qi, vi]]
    s = key[vi] @ guide
    s = np.where(mask[vi] == 0, -1e9, s)
    a = np.exp(s - s.max())
    a /= a.sum()
    return a @ value[vi]


def test_ms_sl_key_clip_attention_inference_is_the_pairwise_loop():
    key, value, props, mask, idx = _key_clip_inputs()
    arrays = (jnp.asarray(a, jnp.float32) for a in (key, value, props, mask))
    got = np.asarray(ms_sl.key_clip_attention_inference(*arrays, jnp.asarray(idx)))
    assert got.shape == (3, 4, 5)
    for vi in range(3):
        for qi in range(4):
            ref = _brute_force(key, value, props, mask, qi, vi, idx)
            np.testing.assert_allclose(got[vi, qi], ref, rtol=1e-5, atol=1e-5)


def test_ms_sl_key_clip_attention_train_uses_own_video():
    key, value, props, mask, idx = _key_clip_inputs(seed=1)
    labels = np.array([2, 0, 1, 1], np.int32)
    arrays = (jnp.asarray(a, jnp.float32) for a in (key, value, props, mask))
    got = np.asarray(ms_sl.key_clip_attention_train(*arrays, jnp.asarray(idx), jnp.asarray(labels)))
    assert got.shape == (4, 5)
    for qi, vi in enumerate(labels):
        np.testing.assert_allclose(got[qi], _brute_force(key, value, props, mask, qi, vi, idx), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GMMFormer v1 specifics
def test_gmm_batch_length_ignores_padded_videos():
    flen = jnp.asarray([5, 9, 0, 7], jnp.int32)
    mask = jnp.asarray((np.arange(12)[None] < np.asarray([5, 9, 0, 7])[:, None]).astype(np.float32))
    assert int(batch_frame_length(flen, mask)) == 9
    assert int(batch_frame_length(jnp.zeros(2, jnp.int32), jnp.zeros((2, 12)))) == 1


def _gmm_encode(model, v, clip, frames, mask, flen):
    fn = jax.jit(lambda *a: model.apply(v, *a, False, method=lambda m, *x: m._encode_video(*x)))
    return fn(clip, frames, mask, flen)


def test_gmm_static_padding_equals_official_batch_padding_and_fixed_length_flag():
    """Frames padded to max_ctx_l with the grid on L_b = 10 give the official result on frames padded to L_b;
    gmm_fixed_length=True builds the grid on max_ctx_l instead (frame branch only)."""
    cfg, model, v = setup_model("gmmformer")
    b = batch_of("gmmformer", "short")
    lb = 10
    full, stages = _gmm_encode(model, v, b["clip_feats"], b["frame_feats"], b["frame_mask"], b["frame_len"])
    cut, stages_cut = _gmm_encode(model, v, b["clip_feats"], b["frame_feats"][:, :lb], b["frame_mask"][:, :lb],
                                  b["frame_len"])
    assert int(stages["gmm_length"]) == int(stages_cut["gmm_length"]) == lb
    for k in full:
        np.testing.assert_allclose(np.asarray(full[k])[:3], np.asarray(cut[k])[:3], rtol=1e-5, atol=1e-5, err_msg=k)
    fixed = model.clone(cfg=dataclasses.replace(cfg, gmm_fixed_length=True))
    fx, stages_fx = _gmm_encode(fixed, v, b["clip_feats"], b["frame_feats"], b["frame_mask"], b["frame_len"])
    assert int(stages_fx["gmm_length"]) == cfg.max_ctx_l
    np.testing.assert_array_equal(np.asarray(fx["clip_feats"]), np.asarray(full["clip_feats"]))
    assert not np.allclose(np.asarray(fx["video_feats"])[:3], np.asarray(full["video_feats"])[:3])


# ----------------------------------------------------------------------------- GMMFormer v2 specifics
def test_v2_zeroed_padding_rows_take_part_in_the_frame_max():
    scores, aux = run("gmmformer_v2")
    frames = aux["frame_feats"]
    assert np.all(frames[1, FRAME_LENS[1]:] == 0) and np.all(frames[3] == 0)
    f = scores["frame"]
    assert np.all(f[:, 1:3] >= 0)  # videos with padding: the max includes cosine 0
    assert np.all(f[:, 3] == 0)  # an all-padding video scores exactly 0
