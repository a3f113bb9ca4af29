"""MRNet parity: conversion both ways through the official file, and ``parity.check``'s MRNet rows failing for
bugs planted into the Flax side (float64 mode, rtol 1e-9), with an unmutated control that passes.

A tiny MRNet (joint 16, N 16, one TransRet layer, a 2-layer 3x3 ProposalConv, 3 videos + 1 padding video) keeps
this file short on 2 cores; the official-size ActivityNet key/shape sets are checked without running anything.
"""

from __future__ import annotations

import inspect
import json

import jax
import numpy as np
import pytest
import torch

from jaxprvr.config import load_config
from jaxprvr.losses import vmr as lv
from jaxprvr.models import mrnet as fm
from jaxprvr.ops import retention as R
from parity import convert, mrnet as pm
from parity.rows import TOLERANCES
from tests.conftest import x64

TINY = ["model.joint_space=16", "model.n_heads=4", "model.featpool_hidden=16", "model.predictor_hidden=8",
        "model.ffn_dim=32", "model.input_size=24", "model.text_dim=20", "model.num_pre_clips=32",
        "model.num_clips=16", "model.featpool_kernel=2", "model.pooling_counts=(7,4)", "model.predictor_kernel=3",
        "model.predictor_layers=2", "model.trans_layers=1"]
DATASETS = ("activitynet", "tacos", "charades")


def tiny(dataset="activitynet"):
    return load_config(dataset, "mrnet", TINY)


def checker(dataset="activitynet", dtype="float64"):

    return pm.MRNetCheck(pm.SPEC, tiny(dataset), ckpt=None, data_root=None, seed=0, n_videos=3, steps=5,
                         device=None, say=lambda s: None, compiler_options=None, tol=TOLERANCES[dtype],
                         perturb="none")


def failing(rows, words):
    return [r for r in rows if not r.passed and words in r.stage]


# ---------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("dataset", DATASETS)
def test_convert_both_ways_through_official_files(dataset, tmp_path):
    """Twin -> 2 official AdamW steps -> official .pth -> torch2jax -> jax2torch -> .pth: every tensor, the
    optimizer state (moments, steps, groups, no state for never-updated params) and the scheduler equal the
    original file; the result loads strictly into the twin."""
    from torch_ref.mrnet import (MRNet as Twin, load_official_checkpoint, official_batch, official_optimizer,
                                 official_train_step, save_official_checkpoint)

    cfg = tiny(dataset)
    torch.manual_seed(0)
    twin = Twin(cfg)
    opt, sched = official_optimizer(twin, cfg)
    batch = pm.SPEC.make_batch(cfg.model, 3, 0)
    for _ in range(2):
        official_train_step(twin, opt, official_batch(batch), 1, cfg)
    sched.step()
    src = save_official_checkpoint(tmp_path / "in.pth", twin, opt, sched, epoch=1)
    out = tmp_path / "run"
    sets = [f"--set={s}" for s in TINY]
    assert convert.main(["torch2jax", "--model", "mrnet", "--config", dataset, *sets, str(src), str(out)]) == 0
    assert (out / "ckpt" / "best").is_dir() and (out / "ckpt" / "latest").is_dir()
    back = tmp_path / "back.pth"
    assert convert.main(["jax2torch", "--model", "mrnet", "--config", dataset, *sets, str(out / "ckpt" / "latest"),
                         str(back)]) == 0
    a = torch.load(src, weights_only=True)
    b = torch.load(back, weights_only=True)
    assert list(a) == list(b) == ["model", "optimizer", "scheduler", "epoch"] and a["epoch"] == b["epoch"] == 1
    assert list(a["model"]) == list(b["model"])
    for k, v in a["model"].items():
        assert b["model"][k].dtype == v.dtype and torch.equal(b["model"][k], v), k
    assert b["model"]["proposal_conv.bn.0.num_batches_tracked"].dtype == torch.int64
    sa, sb = a["optimizer"], b["optimizer"]
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    assert sb["param_groups"][1]["params"] == [] and sa["param_groups"][0]["lr"] == sb["param_groups"][0]["lr"]
    assert sorted(sa["state"]) == sorted(sb["state"])
    n_params = len(sa["param_groups"][0]["params"])
    assert len(sa["state"]) == n_params - len(pm.SPEC.no_grad_names(cfg))  # never-updated params: no state
    for i, s in sa["state"].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sb["state"][i][k], s[k]), (i, k)
    assert a["scheduler"] == b["scheduler"]
    fresh = Twin(cfg)
    load_official_checkpoint(back, fresh)  # strict
    # jaxprvr.load reads the official file in memory (parity SPEC.read_variables): the converted folder's variables,
    # BatchNorm statistics included, bit for bit; a file missing a tensor is one error naming it
    import jaxprvr
    from jaxprvr.errors import JaxprvrError

    mem, disk = jaxprvr.load(src, config=dataset, model="mrnet", overrides=TINY), jaxprvr.load(out / "ckpt" / "latest")
    for tree in ("params", "model_state"):
        x, y = getattr(mem, tree), getattr(disk, tree)
        assert jax.tree.structure(x) == jax.tree.structure(y) and jax.tree.leaves(x)
        assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    cut = dict(a)
    cut["model"] = {k: v for k, v in a["model"].items() if k != "proposal_conv.bn.0.weight"}
    torch.save(cut, tmp_path / "cut.pth")
    with pytest.raises(JaxprvrError, match="proposal_conv.bn.0.weight"):
        jaxprvr.load(tmp_path / "cut.pth", config=dataset, model="mrnet", overrides=TINY)


def test_convert_rejects_a_wrong_config(tmp_path):
    from torch_ref.mrnet import MRNet as Twin, save_official_checkpoint

    torch.manual_seed(0)
    src = save_official_checkpoint(tmp_path / "a.pth", Twin(tiny("tacos")))
    sets = [f"--set={s}" for s in TINY]
    assert convert.main(["torch2jax", "--model", "mrnet", "--config", "activitynet", *sets, str(src),
                         str(tmp_path / "o")]) == 2  # mha keys vs the projected table: named error


@pytest.mark.parametrize("dataset", DATASETS)
def test_official_size_key_and_shape_sets(dataset):
    """At the released sizes (construct-only): the table's torch keys are the twin's state_dict keys in order,
    and every Flax leaf has the transformed torch shape."""
    from jaxprvr.models import build_model
    from jaxprvr.train import init_variables
    from torch_ref.mrnet import official_state_keys

    cfg = load_config(dataset, "mrnet")
    rows = pm.key_rows(cfg.model)
    assert [r[0] for r in rows] == official_state_keys(cfg)
    params, state = jax.eval_shape(lambda: init_variables(build_model(cfg.model), cfg, jax.random.PRNGKey(0)))
    flat = {"params": convert.flatten(params), "batch_stats": convert.flatten(state["batch_stats"])}
    with torch.device("meta"):
        from torch_ref.mrnet import MRNet as Twin

        sd = Twin(cfg).state_dict()
    for t, coll, f, kind in rows:
        if kind == "buffer":
            continue
        want = pm.to_flax(kind, np.empty(tuple(sd[t].shape), np.float32)).shape
        assert tuple(flat[coll][f].shape) == tuple(want), t


# ---------------------------------------------------------------------------------------------- mutants


@pytest.fixture(scope="module")
def ck64():
    with x64():
        yield checker("activitynet", "float64")


def test_control_every_row_passes(ck64):
    with x64():
        rows = (ck64.conversion_rows() + ck64.block_rows() + ck64.model_rows() + ck64.loss_rows()
                + ck64.grad_rows() + ck64.train_rows())
    bad = [(r.stage, r.note) for r in rows if not r.passed]
    assert not bad, bad


def _source_mutant(monkeypatch, module, fn_name, old, new):
    """``module.fn_name`` recompiled from its source with ``old`` replaced by ``new``."""
    src = inspect.getsource(getattr(module, fn_name))
    assert old in src
    ns = dict(vars(module))
    exec(compile(src.replace(old, new), f"<mutant {fn_name}>", "exec"), ns)
    monkeypatch.setattr(module, fn_name, ns[fn_name])


def test_decay_diagonal_one_fails(ck64, monkeypatch):
    orig = R.decay_mask
    monkeypatch.setattr(R, "decay_mask", lambda n, gamma, double=True, dtype=None: orig(
        n, gamma, double, dtype) - (np.eye(n) if double else 0))
    with x64():
        rows = ck64.block_rows()
    assert failing(rows, "decay mask") and failing(rows, "multiplicative mask") and failing(rows, "retention layer")


def test_xpos_keys_not_downscaled_fails(ck64, monkeypatch):
    orig = R.xpos
    monkeypatch.setattr(R, "xpos", lambda x, downscale=False, **kw: orig(x, False, **kw))
    with x64():
        rows = ck64.block_rows()
    assert failing(rows, "xPos downscaled") and failing(rows, "retention layer") and failing(rows, "TransRet")


def test_padded_keys_not_excluded_fails(ck64, monkeypatch):
    orig = R.masked_attention
    monkeypatch.setattr(R, "masked_attention", lambda q, k, v, m, kv, h, **kw: orig(
        q, k, v, m, None if kv is None else kv * 0 + 1, h, **kw))
    with x64():
        rows = ck64.block_rows()
    assert failing(rows, "retention layer") and failing(rows, "TransRet")


def test_batchnorm_biased_running_var_fails(ck64, monkeypatch):
    src = inspect.getsource(fm.TorchBatchNorm)
    old = "unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))"
    assert old in src
    ns = dict(vars(fm))
    exec(compile(src.replace(old, "unbiased = var"), "<mutant bn>", "exec"), ns)
    monkeypatch.setattr(fm, "TorchBatchNorm", ns["TorchBatchNorm"])
    with x64():
        rows = ck64.block_rows()
    assert failing(rows, "BatchNorm running mean/var")


def test_exp0_negatives_dropped_fails(ck64, monkeypatch):
    _source_mutant(monkeypatch, lv, "contrastive_losses",
                   "jnp.exp(cos_same * low_iou / cfg.tau_sent), 0.0)",
                   "jnp.where(low_iou > 0, jnp.exp(cos_same / cfg.tau_sent), 0.0), 0.0)")
    with x64():
        rows = ck64.loss_rows()
    assert failing(rows, "loss_sent") and not failing(rows, "loss_iou")


def test_margin_dropped_fails(ck64, monkeypatch):
    import dataclasses

    orig = lv.contrastive_losses
    monkeypatch.setattr(lv, "contrastive_losses", lambda *a: orig(*a[:-1], dataclasses.replace(a[-1], margin=0.0)))
    with x64():
        rows = ck64.loss_rows()
    assert failing(rows, "loss_vid") and failing(rows, "loss_sent")


def test_trainable_mask_off_decays_a_frozen_param(ck64, monkeypatch):
    monkeypatch.setattr(fm.MRNet, "trainable_mask", lambda self, params: jax.tree.map(lambda _: True, params))
    with x64():
        rows = ck64.train_rows()
    assert failing(rows, "never-updated") and failing(rows, "AdamW steps")


def test_nan_in_one_gradient_fails(ck64, monkeypatch):
    orig = pm.MRNetCheck.jax_grads

    def poisoned(self, *a, **kw):
        jl, jg, terms = orig(self, *a, **kw)
        k = "trans_ret.ffns.0.0.weight"
        jg[k] = jg[k].copy()
        jg[k].flat[3] = np.nan
        return jl, jg, terms

    monkeypatch.setattr(pm.MRNetCheck, "jax_grads", poisoned)
    with x64():
        rows = ck64.grad_rows()
    bad = failing(rows, "d loss / d param")
    assert bad and "trans_ret.ffns.0.0.weight" in bad[0].note and "NaN" in bad[0].note


def test_check_cli_json_float32(tmp_path):
    """The driver reaches the spec's rows (no family name in parity/check.py) and writes the JSON rows."""
    from parity import check

    out = tmp_path / "r.json"
    rc = check.main(["--model", "mrnet", "--config", "charades", *[f"--set={s}" for s in TINY], "--groups",
                     "convert,block,loss,metrics", "--perturb", "none", "--videos", "3", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and rows and all(r["passed"] for r in rows)
    assert {r["group"] for r in rows} == {"convert", "block", "loss", "metrics"}


# ---------------------------------------------------------------------------------------------- float32 training row


@pytest.fixture(scope="module")
def ck32():
    return checker("charades", "float32")


def test_float32_train_row_passes_and_runs_the_replay(ck32):
    rows = ck32.train_rows()
    bad = [(r.stage, r.note) for r in rows if not r.passed]
    assert not bad, bad
    assert "AdamW replay" in rows[0].tolerance


def test_float32_optimizer_eps_mutant_fails_despite_the_replay(ck32, monkeypatch):
    """Adam's eps 1e-6 instead of torch's 1e-8 on the JAX side only: the replay (official eps) rejects it."""
    import jaxprvr.optim as jo

    orig = jo.torch_adamw
    monkeypatch.setattr(jo, "torch_adamw", lambda *a, **kw: orig(*a, **{**kw, "eps": 1e-6}))
    rows = ck32.train_rows()
    bad = failing(rows, "AdamW steps")
    assert bad and "AdamW replay: not AdamW of its own gradients" in bad[0].note, [r.note for r in bad]
