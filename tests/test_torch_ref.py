"""torch_ref: official key layout, parameter counts, Flax parity, official checkpoint loaders."""

from __future__ import annotations

import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprvr.config import model_config
from jaxprvr.models import build_model as build_flax
import torch_ref


NAMES = ("ms_sl", "gmmformer", "gmmformer_v2")
OFFICIAL_PARAMS = {"ms_sl": 4_852_992, "gmmformer": 12_848_256, "gmmformer_v2": 32_273_440}


def tiny_cfg(name, **kw):
    return model_config(name, hidden_size=32, n_heads=2, q_feat_size=16, visual_feat_dim=12, **kw)


def make_batch(cfg, lens=(50, 20, 7), labels=(0, 0, 1, 2, 2), seed=0, max_tokens=None):
    rng = np.random.default_rng(seed)
    b, q, dv, dq = len(lens), len(labels), cfg.visual_feat_dim, cfg.q_feat_size
    frames = np.zeros((b, cfg.max_ctx_l, dv), np.float32)
    fmask = np.zeros((b, cfg.max_ctx_l), np.float32)
    for i, n in enumerate(lens):
        frames[i, :n] = rng.standard_normal((n, dv))
        fmask[i, :n] = 1
    qf = np.zeros((q, cfg.max_desc_l, dq), np.float32)
    qm = np.zeros((q, cfg.max_desc_l), np.float32)
    for i, n in enumerate(rng.integers(3, (max_tokens or cfg.max_desc_l) + 1, q)):
        qf[i, :n] = rng.standard_normal((n, dq))
        qm[i, :n] = 1
    return dict(clip_feats=rng.standard_normal((b, cfg.map_size, dv)).astype(np.float32), frame_feats=frames,
                frame_mask=fmask, frame_len=np.asarray(lens, np.int32), video_valid=np.ones(b, np.float32),
                query_feats=qf, query_mask=qm, query_valid=np.ones(q, np.float32),
                query_labels=np.asarray(labels, np.int32))


def flax_path(model: torch.nn.Module, key: str):
    """torch key -> (Flax path, transpose?) by the naming rule; the transform is decided by layer type."""
    mod_name, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    module = model.get_submodule(mod_name) if mod_name else model
    parts = mod_name.split(".") if mod_name else []
    out = []
    for p in parts:
        if p.isdigit():
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    transpose = False
    if leaf == "weight":
        if isinstance(module, torch.nn.Linear):
            leaf, transpose = "kernel", True
        elif isinstance(module, torch.nn.LayerNorm):
            leaf = "scale"
        elif isinstance(module, torch.nn.Embedding):
            leaf = "embedding"
        else:
            raise AssertionError(f"unexpected weight owner {type(module)} for {key}")
    return "/".join(out + [leaf]), transpose


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flax_params(cfg, batch, seed=0, perturb=True):
    model = build_flax(cfg)
    params = model.init({"params": jax.random.key(seed)}, batch, train=False)["params"]
    if perturb:  # make biases / LayerNorms non-trivial
        rng = np.random.default_rng(seed + 1)
        leaves = flat(params)
        noisy = {k: (np.asarray(v) + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
                     if k.endswith(("bias", "scale")) else np.asarray(v)) for k, v in leaves.items()}
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: jnp.asarray(noisy["/".join(str(getattr(k, "key", k)) for k in p)]), params)
    return model, params


def load_flax_into(twin, params):
    leaves = flat(params)
    sd = {}
    for k in twin.state_dict():
        path, tr = flax_path(twin, k)
        a = np.asarray(leaves[path])
        sd[k] = torch.from_numpy(np.array(a.T if tr else a))
    twin.load_state_dict(sd, strict=True)
    return twin


# ---------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", NAMES)
def test_official_parameter_count(name):
    with torch.device("meta"):
        twin = torch_ref.build_model(model_config(name))
    assert sum(p.numel() for p in twin.parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_keys_map_one_to_one_onto_flax(name):
    cfg = model_config(name)
    with torch.device("meta"):
        twin = torch_ref.build_model(cfg)
    sds = jax.ShapeDtypeStruct
    b, q, l = 2, 3, cfg.max_ctx_l
    batch = dict(clip_feats=sds((b, cfg.map_size, cfg.visual_feat_dim), jnp.float32),
                 frame_feats=sds((b, l, cfg.visual_feat_dim), jnp.float32), frame_mask=sds((b, l), jnp.float32),
                 frame_len=sds((b,), jnp.int32), video_valid=sds((b,), jnp.float32),
                 query_feats=sds((q, cfg.max_desc_l, cfg.q_feat_size), jnp.float32),
                 query_mask=sds((q, cfg.max_desc_l), jnp.float32), query_valid=sds((q,), jnp.float32),
                 query_labels=sds((q,), jnp.int32))
    model = build_flax(cfg)
    shapes = flat(jax.eval_shape(lambda bt: model.init({"params": jax.random.key(0)}, bt, train=False),
                                 batch)["params"])
    seen = set()
    for k, v in twin.state_dict().items():
        path, tr = flax_path(twin, k)
        assert path in shapes, (k, path)
        assert tuple(shapes[path].shape) == (tuple(v.shape)[::-1] if tr else tuple(v.shape)), k
        assert path not in seen
        seen.add(path)
    assert seen == set(shapes)


# ---------------------------------------------------------------------------------------------- parity
def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


@pytest.mark.parametrize("name,fixed", [("ms_sl", False), ("gmmformer", False), ("gmmformer", True),
                                        ("gmmformer_v2", False)])
def test_whole_model_parity_with_flax(name, fixed):
    cfg = tiny_cfg(name, **({"gmm_fixed_length": fixed} if name == "gmmformer" else {}))  # a GMMFormer v1 field
    batch = make_batch(cfg)
    model, params = flax_params(cfg, batch)
    twin = load_flax_into(torch_ref.build_model(cfg), params).eval()
    variables = {"params": params}
    scores, aux = model.apply(variables, batch, train=False)
    with torch.no_grad():
        tscores, taux = twin(batch, train=False)
    assert set(scores) == set(tscores) and set(aux) == set(taux)
    for k in scores:
        np.testing.assert_allclose(_np(tscores[k]), np.asarray(scores[k]), rtol=1e-4, atol=1e-4, err_msg=k)
    for k in aux:
        a, t = np.asarray(aux[k]), _np(taux[k])
        assert a.shape == t.shape, k
        if np.issubdtype(a.dtype, np.integer):
            np.testing.assert_array_equal(t, a, err_msg=k)
        else:
            np.testing.assert_allclose(t, a, rtol=1e-5, atol=1e-6, err_msg=k)
    # test-time path: encode_video / encode_query / score
    video = model.apply(variables, batch["clip_feats"], batch["frame_feats"], batch["frame_mask"],
                        batch["frame_len"], method="encode_video")
    query = model.apply(variables, batch["query_feats"], batch["query_mask"], method="encode_query")
    sc = model.apply(variables, query, video, method="score")
    T = torch.from_numpy
    with torch.no_grad():
        tv = twin.encode_video(T(batch["clip_feats"]), T(batch["frame_feats"]), T(batch["frame_mask"]),
                               T(batch["frame_len"]))
        tq = twin.encode_query(T(batch["query_feats"]), T(batch["query_mask"]))
        tsc = twin.score(tq, tv)
    for k in ("clip", "frame"):
        np.testing.assert_allclose(_np(tsc[k]), np.asarray(sc[k]), rtol=1e-4, atol=1e-4, err_msg=k)
    if name == "gmmformer":
        assert int(taux["gmm_length"]) == (cfg.max_ctx_l if fixed else 50)


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_one_and_train_mode(name):
    cfg = tiny_cfg(name)
    batch = make_batch(cfg, lens=(9,), labels=(0,))
    twin = torch_ref.build_model(cfg)
    torch.manual_seed(0)
    s_train, _ = twin(batch, train=True)
    assert twin.training
    with torch.no_grad():
        s_eval, _ = twin(batch, train=False)
        s_eval2, _ = twin(batch, train=False)
    for k in s_eval:
        assert s_eval[k].shape == (1, 1)
        assert torch.isfinite(s_train[k]).all()
        assert torch.equal(s_eval[k], s_eval2[k])
    s_train["clip_raw"].sum().backward()  # differentiable


# ---------------------------------------------------------------------------------------------- checkpoints
from torch_ref import checkpoints as ckpt  # noqa: E402


def test_ms_sl_checkpoint_with_test_only_easydict(tmp_path, monkeypatch):
    class EasyDict(dict):  # a class named easydict.EasyDict that exists only in this test
        def __init__(self, d=None, **kw):
            super().__init__()
            for k, v in {**(d or {}), **kw}.items():
                setattr(self, k, v)

        def __setattr__(self, k, v):
            super().__setattr__(k, v)
            self[k] = v

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    fake = types.ModuleType("easydict")
    fake.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", fake)
    twin = torch_ref.build_model(tiny_cfg("ms_sl"))
    path = tmp_path / "model.ckpt"
    ckpt.save_official(path, "ms_sl", twin.state_dict(), epoch=7,
                       model_cfg=EasyDict(hidden_size=32, margin=0.1, q_feat_size=16))
    monkeypatch.delitem(sys.modules, "easydict")  # the loader must not need it
    raw = torch.load(path, map_location="cpu", pickle_module=ckpt.RESTRICTED, weights_only=False)
    assert set(raw) == {"model", "model_cfg", "epoch"}
    ck = ckpt.load_official(path)
    assert ck.layout == "ms_sl" and ck.model_name == "ms_sl" and ck.epoch == 7
    assert ck.config["hidden_size"] == 32 and ck.config["margin"] == 0.1
    assert type(raw["model_cfg"]).__name__ == "EasyDict" and raw["model_cfg"].margin == 0.1
    fresh = torch_ref.build_model(tiny_cfg("ms_sl"))
    ckpt.load_into(fresh, path)
    for k, v in twin.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


@pytest.mark.parametrize("name", ["gmmformer", "gmmformer_v2"])
def test_gmmformer_best_ckpt_roundtrip_with_module_prefix(tmp_path, name):
    twin = torch_ref.build_model(tiny_cfg(name))
    path = tmp_path / "best.ckpt"
    ckpt.save_official(path, name, twin.state_dict(), epoch=3, model_val=123.5, config={"lr": 3e-4},
                       module_prefix=True)
    raw = torch.load(path, map_location="cpu", pickle_module=ckpt.RESTRICTED, weights_only=False)
    assert set(raw) == {"config", "epoch", "model_val", "state_dict", "optimizer"}
    assert all(k.startswith("module.") for k in raw["state_dict"])
    sched = raw["optimizer"]["param_groups"][0]["schedule"]
    assert (sched._official_module, sched._official_name) == ("Opts.optimization", "WarmupLinearSchedule")
    assert sched.warmup == 0.01 and sched.warned_for_t_total_at_progress == -1
    # the pickle names the official class, and a plain torch.load cannot resolve it without the official code
    with pytest.raises(Exception):
        torch.load(path, map_location="cpu", weights_only=True)
    ck = ckpt.load_official(path)
    assert ck.layout == "gmmformer" and ck.model_name == name and ck.epoch == 3 and ck.model_val == 123.5
    assert ck.config == {"lr": 3e-4}
    fresh = torch_ref.build_model(tiny_cfg(name))
    fresh.load_state_dict(ck.state_dict, strict=True)
    for k, v in twin.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


class _EvilEval:
    def __reduce__(self):
        return eval, ("1+1",)


@pytest.mark.parametrize("payload", [_Evil(), _EvilEval()])
def test_restricted_unpickler_refuses_code(tmp_path, payload):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": payload}, path)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        ckpt.load_official(path)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.RESTRICTED.loads(pickle.dumps(payload))


def test_unknown_class_becomes_inert_placeholder():
    cls = ckpt.resolve_global("Opts.optimization", "WarmupLinearSchedule")
    assert issubclass(cls, ckpt.Placeholder)
    obj = cls("any", "args")  # REDUCE-style call runs nothing
    obj.__setstate__({"warmup": 0.1})
    assert obj.warmup == 0.1 and obj.to_dict() == {"warmup": 0.1}
    assert ckpt.strip_module_prefix({"module.a": 1, "module.b": 2}) == {"a": 1, "b": 2}


# ---------------------------------------------------------------------------------------------- extra
@pytest.mark.parametrize("length,size", [(50, 128), (128, 128), (32, 32), (1, 8)])
def test_gaussian_weight_matches_flax_op(length, size):
    from jaxprvr.ops.gaussian import gaussian_mask
    from torch_ref.layers import DYGMM_WIDTHS, gaussian_weight

    for w in DYGMM_WIDTHS[1:]:
        ours = gaussian_weight(length, w, size, torch.device("cpu")).numpy()
        np.testing.assert_allclose(ours, np.asarray(gaussian_mask(length, w, size)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_dropout(name):
    batch = make_batch(tiny_cfg(name))
    torch.manual_seed(0)
    no_drop = torch_ref.build_model(tiny_cfg(name, input_drop=0.0, drop=0.0))
    with torch.no_grad():
        a, _ = no_drop(batch, train=True)
        b, _ = no_drop(batch, train=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    drop = torch_ref.build_model(tiny_cfg(name, input_drop=0.3, drop=0.3))
    drop.load_state_dict(no_drop.state_dict(), strict=True)
    with torch.no_grad():
        c, aux = drop(batch, train=True)
    assert not torch.equal(c["clip_raw"], b["clip_raw"])
    if "query2" in aux:  # the second encode_query pass draws its own dropout masks
        assert not torch.equal(aux["query2"], aux["query"])
