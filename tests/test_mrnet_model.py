"""MRNet model (jaxprvr/models/mrnet.py) at tiny sizes: padding, attention forms, BatchNorm, masks, key table.

The key test: the batched forward over padded query slots and a padded video gives, for every real query, the
rows that the official per-video loop computes (the same model on each video alone, n_q query tokens, no
padding); a planted mutant (padded query keys not excluded) breaks it.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxprvr.config import load_config
from jaxprvr.models import mrnet as M
from jaxprvr.models.mrnet import MRNet, official_key_table
from tests.conftest import x64

TINY = ["model.joint_space=32", "model.n_heads=4", "model.num_clips=16", "model.num_pre_clips=32",
        "model.featpool_kernel=2", "model.pooling_counts=[7,4]", "model.predictor_kernel=3",
        "model.predictor_layers=2", "model.featpool_hidden=24", "model.predictor_hidden=20", "model.input_size=12",
        "model.text_dim=10", "model.ffn_dim=48"]
B, Q = 4, 5
N_Q = (5, 2, 3, 1)
VALID = (1, 1, 1, 0)
ATOL = 1e-5


def tiny_cfg(*extra, dataset="activitynet"):
    return load_config(dataset, "mrnet", TINY + list(extra)).model


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    nq = np.asarray(N_Q, np.int32)
    qm = (np.arange(Q)[None] < nq[:, None]).astype(np.float32)
    queries = rng.normal(size=(B, Q, 10)).astype(np.float32)
    queries[qm == 0] = rng.normal(size=(int((qm == 0).sum()), 10)) * 3  # garbage in the padded slots
    return {"feats": rng.normal(size=(B, 32, 12)).astype(np.float32), "video_valid": np.asarray(VALID, np.float32),
            "queries": queries, "query_mask": qm, "n_queries": nq}


def one_video(batch, v):
    n = int(batch["n_queries"][v])
    return {"feats": batch["feats"][v:v + 1], "video_valid": np.ones(1, np.float32),
            "queries": batch["queries"][v:v + 1, :n], "query_mask": np.ones((1, n), np.float32),
            "n_queries": np.asarray([n], np.int32)}


def random_variables(model, seed=0):
    """Variables of ``model``'s tree filled from numpy (no compiled init: the tests are compile-bound): kernels
    N(0, 1/fan_in), ``W_*`` N(0, 1/d^2), biases N(0, 0.1^2), LayerNorm/BatchNorm scales 1 + N(0, 0.1^2), the
    sparse tables N(0, 1), BatchNorm running means N(0, 0.1^2) and variances U(0.5, 2). Configs with the same
    tree get the same values."""
    shapes = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)}, make_batch())
    rng = np.random.default_rng(seed)
    flat = flatten_dict(flax.core.unfreeze(shapes))
    out = {}
    for path in sorted(flat):
        s, name = flat[path].shape, path[-1]
        if name == "kernel":
            x = rng.normal(size=s) / np.sqrt(np.prod(s[:-1]))
        elif name.startswith("W_"):
            x = rng.normal(size=s) / s[0]
        elif name in ("bias", "mean"):
            x = rng.normal(size=s) * 0.1
        elif name == "scale":
            x = 1 + rng.normal(size=s) * 0.1
        elif name == "var":
            x = rng.uniform(0.5, 2.0, size=s)
        elif name == "embedding":
            x = rng.normal(size=s)
        elif name == "num_batches_tracked":
            out[path] = jnp.zeros(s, jnp.int32)
            continue
        else:
            raise AssertionError(path)
        out[path] = jnp.asarray(x, jnp.float32)
    return unflatten_dict(out)


@functools.lru_cache(maxsize=None)
def setup(cfg):
    """(model, random variables, jitted eval forward, jitted train forward)."""
    model = MRNet(cfg)
    variables = random_variables(model)
    evaluate = jax.jit(functools.partial(model.apply, train=False))
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats", "dropout_keys"]))
    return model, variables, evaluate, train


MAIN = tiny_cfg()
MHA_NO_SOFTMAX = tiny_cfg("model.ret_variant=mha", "model.att_softmax=false")
V_MODE = tiny_cfg("model.att_mode=v", "model.trans_layers=1")


def assert_real_rows_equal(out, per_video, atol=ATOL):
    for v, (o, _) in per_video.items():
        n = N_Q[v]
        for key in ("iou_scores", "contrastive_scores", "txt_mem"):
            np.testing.assert_allclose(np.asarray(out[key][v, :n]), np.asarray(o[key][0]), atol=atol, rtol=0,
                                       err_msg=f"{key} of video {v}")
        np.testing.assert_allclose(np.asarray(out["map2d"][v]), np.asarray(o["map2d"][0]), atol=atol, rtol=0)


def per_video_outputs(cfg, batch, videos=None):
    _, variables, evaluate, _ = setup(cfg)
    return {v: evaluate(variables, one_video(batch, v)) for v in (videos or range(B)) if VALID[v]}


@pytest.mark.parametrize("cfg,videos", [(MAIN, None), (MHA_NO_SOFTMAX, (1,)), (V_MODE, (1,))],
                         ids=["projected-all", "mha-all-nosoftmax", "v"])
def test_padded_batch_equals_per_video(cfg, videos):
    """Every real video (MAIN) or the one with 2 of 5 slots real: per-video runs compile once per query count."""
    batch = make_batch()
    _, variables, evaluate, _ = setup(cfg)
    out, aux = evaluate(variables, batch)
    assert_real_rows_equal(out, per_video_outputs(cfg, batch, videos))
    # padded query slots are zero in the score maps
    qm = batch["query_mask"][:, :, None, None]
    assert np.all(np.asarray(out["iou_scores"])[np.broadcast_to(qm == 0, out["iou_scores"].shape)] == 0)


def test_padding_mutant_is_caught(monkeypatch):
    """Padded query slots left as keys (key_valid dropped): the real rows move far beyond the tolerance."""
    batch = make_batch()
    model, variables, _, _ = setup(MAIN)
    real = M.R.masked_attention

    def mutant(q, k, v, mult_mask, key_valid, n_heads, **kw):
        return real(q, k, v, mult_mask, None, n_heads, **kw)

    monkeypatch.setattr(M.R, "masked_attention", mutant)
    bad, _ = jax.jit(functools.partial(model.apply, train=False))(variables, batch)
    monkeypatch.undo()
    good, _ = setup(MAIN)[2](variables, batch)  # equal to the per-video rows (test above)
    diff = max(float(np.max(np.abs(np.asarray(bad["txt_mem"][v, :N_Q[v]]) - np.asarray(good["txt_mem"][v, :N_Q[v]]))))
               for v in range(B) if VALID[v] and N_Q[v] < Q)
    assert diff > 100 * ATOL


def test_masks_and_sparsity_aux_against_numpy():
    batch = make_batch()
    _, variables, evaluate, _ = setup(MAIN)
    out, aux = evaluate(variables, batch)
    # mask2d written out (feat2d.py L6-19): diagonal, offsets 1..7 at stride 1, then 9, 11, 13, 15 at stride 2
    mask = np.eye(16, dtype=bool)
    for off in range(1, 8):
        for i in range(16 - off):
            mask[i, i + off] = True
    for off in (9, 11, 13, 15):
        for i in range(0, 16 - off, 2):
            mask[i, i + off] = True
    np.testing.assert_array_equal(np.asarray(aux["mask2d"]) > 0, mask)
    for key in ("iou_scores", "contrastive_scores"):
        x = np.asarray(out[key])
        assert np.all(x[:, :, ~mask] == 0)
        assert np.all(x[batch["query_mask"] > 0][:, mask] != 0)
    # sparsity: sum over layers of mean|(1 - I) sigmoid(E)|, times the 3 valid videos (ret_model.py L243-246, L540)
    want = 0.0
    for i in range(MAIN.trans_layers):
        e = np.asarray(variables["params"]["trans_ret"][f"rets_{i}"]["learn_vid_ret"]["embedding"], np.float64)
        e = e.reshape(16, 16)
        want += np.mean(np.abs((1 - np.eye(16)) / (1 + np.exp(-e))))
    np.testing.assert_allclose(float(aux["loss_sparsity"]), want * 3, rtol=1e-6)


def test_chunkwise_equals_parallel_with_attention_dropout():
    """Train mode, attention dropout 0.1, the same key: the chunkwise form (blocks of 8 keys over 21) gives the
    parallel outputs and BatchNorm statistics; the dropout keys sit at the torch module paths."""
    extra = ("model.att_dropout=0.1", "model.attention_chunk=8")
    batch = make_batch()
    rngs = {"dropout": jax.random.PRNGKey(5)}
    outs = {}
    for impl in ("parallel", "chunkwise"):
        cfg = tiny_cfg(*extra, f"model.attention_impl={impl}")
        _, variables, _, train = setup(cfg)
        outs[impl] = train(variables, batch, rngs=rngs)
    (o_p, a_p), s_p = outs["parallel"]
    (o_c, a_c), s_c = outs["chunkwise"]
    for key in ("iou_scores", "contrastive_scores", "map2d", "txt_mem"):
        np.testing.assert_allclose(np.asarray(o_c[key]), np.asarray(o_p[key]), atol=ATOL, rtol=0, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL), s_c["batch_stats"],
                 s_p["batch_stats"])
    paths = {"/".join(k[:-1]) for k in flatten_dict(flax.core.unfreeze(s_p["dropout_keys"]))}
    assert {"trans_ret/rets_0/self_attn/dropout", "trans_ret/dropout_1_0", "trans_ret/dropout_2_1",
            "input_vid_proj_0/net_0", "input_vid_proj_1/net_0"} <= paths


def test_att_softmax_false_is_the_output_bias():
    """ret_model.py L145-157: with att_softmax False the attention output is zero, so each RetLayer returns the
    output Linear's bias on every row (the released Charades config)."""
    cfg = tiny_cfg("model.att_softmax=false")
    model, variables, _, _ = setup(cfg)
    batch = make_batch()
    _, state = jax.jit(lambda v, b: model.apply(v, b, capture_intermediates=True, mutable=["intermediates"]))(
        variables, batch)
    for i in range(cfg.trans_layers):
        got = np.asarray(state["intermediates"]["trans_ret"][f"rets_{i}"]["self_attn"]["__call__"][0])
        bias = np.asarray(variables["params"]["trans_ret"][f"rets_{i}"]["self_attn"]["linears_0"]["bias"])
        np.testing.assert_array_equal(got, np.broadcast_to(bias, got.shape))


def test_batchnorm_statistics_against_numpy_and_padding():
    """Train mode: bn_0 normalises with the biased statistics over the N x N cells of the 3 valid videos, the
    running buffers move by momentum 0.1 with the unbiased variance, num_batches_tracked counts; garbage in the
    padded video changes neither the statistics nor the real outputs."""
    model, variables, _, _ = setup(MAIN)
    batch = make_batch()
    fwd = jax.jit(lambda v, b: model.apply(v, b, train=True, capture_intermediates=True,
                                           mutable=["batch_stats", "intermediates"],
                                           rngs={"dropout": jax.random.PRNGKey(3)}))
    (out, _), state = fwd(variables, batch)
    inter = state["intermediates"]["proposal_conv"]
    x = np.asarray(inter["convs_0"]["__call__"][0], np.float64)  # (B, 18, 18, 20): the padded conv's output
    y = np.asarray(inter["bn_0"]["__call__"][0])
    valid = np.asarray(VALID, bool)
    xv = x[valid]
    mean = xv.mean(axis=(0, 1, 2))
    var = ((xv - mean) ** 2).mean(axis=(0, 1, 2))
    p = variables["params"]["proposal_conv"]["bn_0"]
    want = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(y, want, atol=1e-4, rtol=1e-4)
    old = variables["batch_stats"]["proposal_conv"]["bn_0"]
    new = state["batch_stats"]["proposal_conv"]["bn_0"]
    n = xv.shape[0] * xv.shape[1] * xv.shape[2]  # the first conv's padded output is 18 x 18 here
    np.testing.assert_allclose(np.asarray(new["mean"]), 0.9 * np.asarray(old["mean"]) + 0.1 * mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["var"]), 0.9 * np.asarray(old["var"]) + 0.1 * var * n / (n - 1),
                               rtol=1e-5)
    assert int(new["num_batches_tracked"]) == int(old["num_batches_tracked"]) + 1 == 1
    # mutant: statistics over all four videos differ visibly
    xa = x.reshape(-1, x.shape[-1])
    assert np.max(np.abs(xa.mean(0) - mean)) > 1e-3

    garbage = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(7)
    garbage["feats"][3] = rng.normal(size=garbage["feats"][3].shape) * 10
    garbage["queries"][3] = rng.normal(size=garbage["queries"][3].shape) * 10
    (out2, _), state2 = fwd(variables, garbage)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state2["batch_stats"],
                 state["batch_stats"])
    for key in ("iou_scores", "contrastive_scores", "map2d", "txt_mem"):
        np.testing.assert_array_equal(np.asarray(out2[key][:3]), np.asarray(out[key][:3]), err_msg=key)


@pytest.mark.parametrize("dataset,n_keys", [("activitynet", 90), ("tacos", 65), ("charades", 112)])
def test_official_key_table_matches_the_variables(dataset, n_keys):
    """At the official sizes (abstract init): the table has the official key count and maps 1:1 onto the Flax
    variables (every parameter and BatchNorm statistic exactly once; xpos.scale has no Flax entry)."""
    cfg = load_config(dataset, "mrnet").model
    nq = 3
    batch = {"feats": jnp.zeros((1, cfg.num_pre_clips, cfg.input_size)), "video_valid": jnp.ones(1),
             "queries": jnp.zeros((1, nq, cfg.text_dim)), "query_mask": jnp.ones((1, nq)),
             "n_queries": jnp.full((1,), nq, jnp.int32)}
    shapes = jax.eval_shape(MRNet(cfg).init, {"params": jax.random.PRNGKey(0)}, batch)
    flat = {"/".join(k): v for k, v in flatten_dict(flax.core.unfreeze(shapes)).items()}
    table = official_key_table(cfg)
    assert len(table) == n_keys and len({t for t, *_ in table}) == n_keys
    mapped = {f"{c}/{p}" for _, c, p, _ in table if c}
    assert mapped == set(flat)
    assert sum(kind == "buffer" for *_, kind in table) == cfg.trans_layers
    d = cfg.joint_space
    for torch_key, c, p, kind in table:
        if kind == "param":
            assert flat[f"{c}/{p}"].shape == (d, d)
        if kind == "conv2d" and "convs_0" in p:
            k = cfg.predictor_kernel
            assert flat[f"{c}/{p}"].shape == (k, k, d, cfg.predictor_hidden)


def test_float64_under_x64():
    """compute_dtype float64 (jax_enable_x64): float64 outputs, equal to the float32 forward to float32 precision."""
    batch = make_batch()
    _, variables, evaluate, _ = setup(MAIN)
    ref, _ = evaluate(variables, batch)
    with x64():
        cfg = tiny_cfg("model.compute_dtype=float64")
        v64 = jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)
        out, aux = jax.jit(functools.partial(MRNet(cfg).apply, train=False))(v64, batch)
        assert out["iou_scores"].dtype == jnp.float64 and aux["loss_sparsity"].dtype == jnp.float64
        for key in ("iou_scores", "contrastive_scores", "txt_mem"):
            np.testing.assert_allclose(np.asarray(out[key]), np.asarray(ref[key]), atol=1e-4, err_msg=key)


def test_bfloat16_compute_dtype():
    """compute_dtype bfloat16: float32 outputs (scores, aux) near the float32 forward (measured max 0.02)."""
    batch = make_batch()
    _, variables, evaluate, _ = setup(MAIN)
    ref, ref_aux = evaluate(variables, batch)
    _, _, evaluate16, _ = setup(tiny_cfg("model.compute_dtype=bfloat16"))
    out, aux = evaluate16(variables, batch)
    for key in ("iou_scores", "contrastive_scores", "map2d", "txt_mem"):
        assert out[key].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out[key]), np.asarray(ref[key]), atol=0.1, err_msg=key)
    np.testing.assert_allclose(float(aux["loss_sparsity"]), float(ref_aux["loss_sparsity"]), rtol=1e-6)
