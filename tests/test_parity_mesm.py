"""MESM parity (``parity.mesm``): ``parity.check``'s rows in float64 (rtol 1e-9) on a QVHighlights-like and a
Charades-like config and TACoS's TwoMLP enhancer, bugs planted on either side failing the rows they should, the CLI,
and the official checkpoint files both ways (torch2jax -> evaluate -> jax2torch, bit-exact).

Tiny widths (hidden 16, 2 heads, one layer per stack, 2 decoder layers, 4 queries, 6 + 4 video features, 8-wide
text) on small synthetic datasets in the official layout. The compiled programs are shared between the tests
(one check object per config, module-scoped); a test that patches the model forgets the programs it changes.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprvr.config import load_config
from jaxprvr.errors import JaxprvrError
from parity import mesm as pm
from parity.rows import TOLERANCES
from tests.conftest import FAST_COMPILE, x64

TINY = ["model.hidden_dim=16", "model.nheads=2", "model.dim_feedforward=24", "model.num_recfw_layers=1",
        "model.t2v_layers=1", "model.enc_layers=1", "model.dec_layers=2", "model.num_recss_layers=1",
        "model.num_queries=4", "model.max_words_l=10", "model.vocab_size=40"]
EXTRA = {"qvhighlights": ["data.feat_dims=(6,4)", "model.t_feat_dim=8"],
         "charades": ["data.feat_dims=(6,4)", "model.t_feat_dim=8", "model.max_video_l=20"],
         "tacos": ["data.feat_dims=(8,)", "model.max_video_l=20", "model.num_recfw_layers=2"]}
GROUPS = ("convert", "block", "model", "loss", "grad", "train", "dropout", "metrics")


def tiny(dataset, extra=()):
    return load_config(dataset, "mesm", TINY + EXTRA[dataset] + list(extra))


def checker(dataset, dtype="float64", extra=(), dropout_grads=False):
    chk = pm.MESMCheck(pm.SPEC, tiny(dataset, extra), ckpt=None, data_root=None, seed=0, n_videos=3, steps=5,
                       device=None, say=lambda s: None, compiler_options=FAST_COMPILE, tol=TOLERANCES[dtype],
                       perturb="none")
    chk.dropout_grads = dropout_grads  # (the CLI's default compares the dropout-on gradients too)
    return chk


def failing(rows, words=""):
    return [r for r in rows if not r.passed and words in r.stage]


def summary(rows):
    return [(r.group, r.stage[:90], r.note[:160]) for r in rows if not r.passed]


@pytest.fixture(scope="module")
def qvh():
    """The QVHighlights-like float64 check (windows, ss_video_feat, Hungarian matching) and its rows, every group."""
    with x64():
        chk = checker("qvhighlights")
        rows = chk.run(GROUPS)
    return chk, rows


# ---------------------------------------------------------------------------------------------- pieces


def test_prefix_index_matches_numpy():
    """A twin tensor's dropout counters are the flat indices of the same elements in the padded Flax array."""
    idx = pm._prefix_index((5, 3, 7, 4))((2, 3, 6, 1), "cpu").numpy()
    grid = np.meshgrid(*[np.arange(n) for n in (2, 3, 6, 1)], indexing="ij")
    assert np.array_equal(idx, np.ravel_multi_index(grid, (5, 3, 7, 4)))
    from torch_ref.dropout import SharedDropoutError

    with pytest.raises(SharedDropoutError):
        pm._prefix_index((2, 3))((3, 3), "cpu")


def test_matching_formats_round_trip():
    single = torch.tensor([[2, 0], [0, 0], [3, 0]])
    a = pm._indices_to_jax(single, 5, 1, False)
    assert a[:, 0].tolist() == [2, 0, 3, -1, -1]
    assert pm._indices_to_twin(a, 3, False).tolist() == [2, 0, 3]
    multi = [(torch.tensor([1, 3]), torch.tensor([0, 2])), (torch.tensor([0]), torch.tensor([1]))]
    b = pm._indices_to_jax(multi, 3, 5, True)
    assert b.tolist() == [[1, -1, 3, -1, -1], [-1, 0, -1, -1, -1], [-1] * 5]
    back = pm._indices_to_twin(b, 2, True)
    assert [(i.tolist(), j.tolist()) for i, j in back] == [([1, 3], [0, 2]), ([0], [1])]


def test_official_options_and_back():
    """opt.json holds v_feat_dim without the TEF's 2 (utils/config.py L242-243 runs after display_save); an
    options dict that differs from the config changes it and says where."""
    cfg = tiny("qvhighlights")
    opt = pm.official_options(cfg)
    assert opt["v_feat_dim"] == 10 and opt["use_tef"] and opt["dataset_name"] == "qvhighlights"
    assert opt["weight_decay"] == cfg.train.wd and opt["gamma"] == cfg.train.lr_gamma
    same, diff = pm.config_from_options(cfg, opt)
    assert diff == {} and same == cfg
    other, diff = pm.config_from_options(cfg, dict(opt, hidden_dim=32, grad_clip=0.5))
    assert other.model.hidden_dim == 32 and other.train.max_grad_norm == 0.5
    assert diff == {"model.hidden_dim": [16, 32], "train.max_grad_norm": [0.1, 0.5]}
    kept, _ = pm.config_from_options(cfg, dict(opt, hidden_dim=32), ["model.hidden_dim=16"])  # --set wins
    assert kept.model.hidden_dim == 16


# ---------------------------------------------------------------------------------------------- full checks


def test_qvh_float64_every_group_passes(qvh):
    _, rows = qvh
    assert not failing(rows), summary(rows)
    assert {r.group for r in rows} == set(GROUPS)
    stages = " | ".join(r.stage for r in rows)
    for words in ("head_major mask", "per_row mask", "the head-major mask bites", "SS-MESM recon_feat",
                  "item's windows (ss_video_feat)", "encoder memory_global", "decoder layer 1: the heads' reference",
                  "CLIP text tower", "out[neg_saliency_scores] [train, dropout off]", "out[recfw_words_logit]",
                  "batch-order dependence", "[injected matching]", "Hungarian per row", "tensors without an official",
                  "gradients zero in exact arithmetic", "params after 5 steps", "never-updated tensors",
                  "dropout calls mapped", "submission rows", "metrics of the val split"):
        assert words in stages, words
    order = next(r for r in rows if "batch-order dependence" in r.stage)
    assert order.max_abs > pm.QUIRK_BITES and "both >" in order.tolerance  # the quirk acts on this batch
    conv = [r for r in rows if r.group == "convert"]
    assert len(conv) == 2 and all(r.tolerance == "bit-exact" for r in conv)


def test_charades_float64_passes():
    """Charades-like (single moments: the argmin matching, the row's own video in SS-MESM, pooled videos): every
    group but grad / train / dropout, which run the same TASK.loss / TASK.optimizer programs as QVHighlights' (the
    full Charades check, 125 rows, passes from the CLI: docs/parity.md)."""
    with x64():
        rows = checker("charades").run(("convert", "block", "model", "loss", "metrics"))
    assert not failing(rows), summary(rows)
    assert any("argmin query per row" in r.stage for r in rows)
    assert any("the row's video" in r.stage for r in rows)
    assert any("metrics of the test split" in r.stage for r in rows)


def test_tacos_two_mlp_convert_block_model():
    """TACoS's T2VEncoder_TwoMLP (the MLM pass's second FFN) and the GloVe text path."""
    with x64():
        chk = checker("tacos")
        rows = chk.run(("convert", "block", "model"))
    assert not failing(rows), summary(rows)
    assert any("MLM pass (TwoMLP" in r.stage for r in rows)
    c = chk.cfg.model
    shared = len(pm.make_table(dataclasses.replace(c, share_MLP=True)))
    assert not c.share_MLP and len(pm.make_table(c)) == shared + 8 * c.num_recfw_layers  # linear{1,2}_1, norm{1,2}_1


def test_per_row_config_is_order_independent():
    """With the corrected mask (``t2v_mask=per_row``) swapping items changes nothing, in the twin and in Flax."""
    with x64():
        chk = checker("charades", extra=["model.t2v_mask=per_row"])
        rows = chk.reorder_rows(chk.params(chk.twin))
    assert not failing(rows), summary(rows)
    order = next(r for r in rows if "batch-order dependence" in r.stage)
    assert order.max_abs < 1e-9 and "per_row" in order.tolerance


# ---------------------------------------------------------------------------------------------- mutants


def forget(*kinds):
    """A fixture factory: the compiled programs of ``kinds`` (those a planted bug changes) are dropped before and
    after the test, the others (the whole-model programs) are kept for the next tests."""

    @pytest.fixture()
    def fixture():
        pm.clear_compiled(*kinds)
        yield
        pm.clear_compiled(*kinds)

    return fixture


forget_blocks = forget("block")
forget_loss = forget("loss", "match")


def test_mutant_per_row_mask_where_head_major_expected(qvh, forget_blocks, monkeypatch):
    from jaxprvr.models import mesm as fm

    real = fm.t2v_attention_mask
    monkeypatch.setattr(fm, "t2v_attention_mask", lambda q, k, h, n, mode="head_major": real(q, k, h, n, "per_row"))
    chk, _ = qvh
    with x64():
        rows = chk.block_rows()
    assert failing(rows, "head_major mask") and not failing(rows, "per_row mask")
    assert failing(rows, "the head-major mask bites")


def test_mutant_head_reference_detached(qvh, forget_blocks, monkeypatch):
    """The heads read the reference after .detach(): forward values unchanged, the gradients not."""
    from jaxprvr.models import mesm as fm

    monkeypatch.setattr(fm, "head_reference", jax.lax.stop_gradient)
    chk, _ = qvh
    with x64():
        rows = chk.block_rows()
    bad = failing(rows)
    assert [r.stage.split(" (")[0] for r in bad] == ["d sum(w * pred_spans of every decoder layer) / d"], summary(rows)
    assert "bbox_embed" in bad[0].note or "decoder.layers.0" in bad[0].note


def test_mutant_ca_qpos_proj_in_every_decoder_layer(qvh, monkeypatch):
    """Planted in the twin: every decoder layer adds layer 0's ``ca_qpos_proj(query_pos)`` (keep_query_pos)."""
    import torch_ref.mesm as tm

    chk, _ = qvh
    real = tm.TransformerDecoderLayer.forward

    def every_layer(self, tgt, memory, mask, pos, query_pos, sine, is_first):
        if is_first:
            return real(self, tgt, memory, mask, pos, query_pos, sine, True)
        owner = next(t for t in (chk.twin32, chk.twin64) if any(m is self for m in t.modules()))
        self._modules["ca_qpos_proj"] = owner.transformer.decoder.layers[0].ca_qpos_proj
        try:
            return real(self, tgt, memory, mask, pos, query_pos, sine, True)
        finally:
            self._modules["ca_qpos_proj"] = None

    monkeypatch.setattr(tm.TransformerDecoderLayer, "forward", every_layer)
    with x64():
        rows = chk.block_rows()
    assert failing(rows, "decoder layer 1: hs") and not failing(rows, "decoder layer 0: hs")
    assert not failing(rows, "T2V")


def test_mutant_label_loss_weighted_mean(qvh, forget_loss, monkeypatch):
    """DETR's weighted-mean cross entropy where the official code takes a plain mean (criterion.py L131-132)."""
    from jaxprvr.losses import mesm as lm

    def weighted(pred_logits, indices, span_mask, real, *, eos_coef):
        out = lm_loss_labels(pred_logits, indices, span_mask, real, eos_coef=eos_coef)
        st = pred_logits.dtype
        q, ok = lm._matched(indices, span_mask & real[:, None])
        fg = jnp.any((q[:, :, None] == jnp.arange(pred_logits.shape[1])[None, None, :]) & ok[:, :, None], axis=1)
        w = jnp.where(fg, 1.0, eos_coef).astype(st)
        plain_n = jnp.sum(real).astype(st) * pred_logits.shape[1]
        out["loss_label"] = out["loss_label"] * plain_n / jnp.sum(jnp.where(real[:, None], w, 0.0))
        return out

    lm_loss_labels = lm.loss_labels
    monkeypatch.setattr(lm, "loss_labels", weighted)
    chk, _ = qvh
    with x64():
        rows = chk.loss_rows()
    assert failing(rows, "term loss_label [") and failing(rows, "total [")
    assert not failing(rows, "term loss_span") and not failing(rows, "matching (")


def test_mutant_nan_in_one_gradient(qvh, monkeypatch):
    chk, _ = qvh
    real = chk.jax_grads

    def nan_one(*a, **k):
        loss, g, terms = real(*a, **k)
        g = dict(g)
        g["class_embed.weight"] = np.full_like(g["class_embed.weight"], np.nan)
        return loss, g, terms

    monkeypatch.setattr(chk, "jax_grads", nan_one)
    with x64():
        rows = chk.grad_rows()
    bad = failing(rows, "d loss / d param")
    assert bad and "non-finite" in bad[0].note and "class_embed.weight" in bad[0].note


def test_mutant_no_gradient_list_wrong(qvh, monkeypatch):
    """``trainable_mask`` keeps ``txt_position_embed`` trainable: AdamW's decay moves it (torch never steps a tensor
    without a gradient), and the no-gradient list no longer matches the twin's ``grad is None`` set."""
    from jaxprvr.tasks import vmr_detr

    real = vmr_detr.trainable_mask

    def leaky(params, m):
        mask = real(params, m)
        mask["txt_position_embed"] = jax.tree_util.tree_map(lambda _: True, mask["txt_position_embed"])
        return mask

    monkeypatch.setattr(vmr_detr, "trainable_mask", leaky)
    chk, _ = qvh
    with x64():
        rows = chk.train_rows() + chk.grad_rows()
    assert failing(rows, "never-updated tensors") and failing(rows, "tensors without an official gradient")
    assert not failing(rows, "d loss / d param")


# ---------------------------------------------------------------------------------------------- CLI, files


def test_check_cli_writes_rows(tmp_path):
    from parity import check

    out = tmp_path / "rows.json"
    argv = ["--model", "mesm", "--config", "qvhighlights", *[f"--set={s}" for s in TINY + EXTRA["qvhighlights"]],
            "--videos", "3", "--groups", "convert,loss", "--json", str(out)]
    assert check.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "mesm" and data["dtype"] == "float32"
    assert {r["group"] for r in data["rows"]} == {"convert", "loss"} and all(r["passed"] for r in data["rows"])
    assert any("[injected matching]" in r["stage"] for r in data["rows"])


def test_official_files_round_trip_through_evaluate(tmp_path):
    """A twin-made ``model_val_best.ckpt`` (+ opt.json, the pickled Namespace with torch.device) -> torch2jax ->
    jaxprvr.evaluate -> jax2torch: the same tensors, dtypes and key order; opt.json and the file load strictly into
    the twin built from opt.json (what eval.py does)."""
    from jaxprvr import evaluate
    from parity import convert
    from torch_ref.mesm import MESM as Twin, build_mesm
    from torch_ref.mesm_loss import official_optimizer

    sets = TINY + EXTRA["qvhighlights"] + ["model.t_feat_dim=64", "model.clip_width=64", "model.clip_layers=1",
                                           "model.clip_heads=1", "data.pos_tagger=rule"]
    cfg = load_config("qvhighlights", "mesm", sets)
    root = pm.SPEC.synthetic_root(cfg, tmp_path / "data")
    torch.manual_seed(0)
    twin = build_mesm(cfg.model, cfg.loss)
    opt, sched = official_optimizer(twin, 2e-4, 1e-4)
    src = pm.save_official(tmp_path / "res" / "model_val_best.ckpt", cfg, twin.state_dict(), epoch=7,
                           optimizer=opt.state_dict(), lr_scheduler=sched.state_dict())
    obj = pm.read_official(src)
    assert obj["opt"]["v_feat_dim"] == 12 and obj["opt"]["device"] == "cpu" and obj["opt_json"]["v_feat_dim"] == 10
    cli = [f"--set={s}" for s in sets]
    from torch_ref.mesm import CLIPTextEncoder

    clip = tmp_path / "pretrained_models" / "clip_text_encoder.pth"  # the official file's keys, width t_feat_dim
    clip.parent.mkdir()  # (OpenAI's layout has width / 64 heads)
    torch.save(CLIPTextEncoder(64, 77, 49408, 64, 1, 1, fp16=False).state_dict(), clip)
    assert convert.main(["torch2jax", "--model", "mesm", "--config", "qvhighlights", *cli, str(src),
                         str(tmp_path / "run"), "--clip-weights", str(clip)]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["clip"] == str(clip.absolute())
    assert evaluate.main(["--config", "qvhighlights", "--model", "mesm", "--ckpt", str(tmp_path / "run"),
                          "--data-root", str(root), "--split", "val", "--no-progress",
                          "--set=data.pos_tagger=rule"]) == 0
    dst = tmp_path / "back" / "model_val_best.ckpt"
    assert convert.main(["jax2torch", "--model", "mesm", "--config", "qvhighlights", *cli, str(tmp_path / "run"),
                         str(dst)]) == 0
    back = torch.load(dst, weights_only=True)
    assert list(back) == ["model", "epoch"] and back["epoch"] == 7
    sd = twin.state_dict()
    assert list(back["model"]) == list(sd) and len(sd) == len(pm.make_table(cfg.model))
    for k, v in sd.items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k
    opt_json = json.loads((dst.parent / "opt.json").read_text())
    assert opt_json["v_feat_dim"] == 10 and opt_json["hidden_dim"] == 16
    Twin.from_opt(opt_json).load_state_dict(back["model"], strict=True)


def test_clip_weights_are_checked_and_recorded(tmp_path):
    """``--clip-weights FILE`` / ``--set model.clip=FILE``: a text tower of width ``t_feat_dim`` is recorded as
    ``model.clip`` (absolute path); another width is refused."""
    import argparse

    from torch_ref.mesm import CLIPTextEncoder

    torch.manual_seed(0)
    path = tmp_path / "clip_text_encoder.pth"
    torch.save(CLIPTextEncoder(64, 77, 100, 64, 1, 1, fp16=False).state_dict(), path)
    args = argparse.Namespace(clip_weights=str(path))
    cfg, recorded = pm._clip_weights(args, tiny("qvhighlights", ["model.t_feat_dim=64"]))
    assert recorded == str(path.absolute()) and cfg.model.clip == recorded
    with pytest.raises(JaxprvrError, match="t_feat_dim = 8"):
        pm._clip_weights(args, tiny("qvhighlights"))
    with pytest.raises(JaxprvrError, match="no such file"):
        pm._clip_weights(argparse.Namespace(clip_weights=str(tmp_path / "none.pt")), tiny("qvhighlights"))


def test_torch2jax_refuses_bad_files(tmp_path):
    from parity import convert

    from torch_ref.mesm import build_mesm

    cfg = tiny("charades")
    torch.manual_seed(0)
    sd = OrderedDict(build_mesm(cfg.model).state_dict())
    sd.pop("class_embed.bias")
    bad = pm.save_official(tmp_path / "a" / "model_test_best.ckpt", cfg, sd)
    cli = [f"--set={s}" for s in TINY + EXTRA["charades"]]
    with pytest.raises(JaxprvrError, match="class_embed.bias"):
        convert.torch2jax(convert.build_parser().parse_args(
            ["torch2jax", "--model", "mesm", "--config", "charades", *cli, str(bad), str(tmp_path / "out")]))
    # a pickle that names another global is refused without running it
    evil = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model": {}, "x": print}, protocol=2))
    with pytest.raises(JaxprvrError, match="names __builtin__.print"):
        pm.read_official(evil)


def test_float32_gradient_rejudged_across_prelu_kinks():
    """``MESMCheck.kink_row``'s mechanism: float32 gradients computed with float64's PReLU branches equal the plain
    float32 ones when no input crosses 0, and one branch flipped by hand is counted as one crossing and moves the
    gradients (how an input that XLA's float32 forward puts on the other side of 0 is judged)."""
    chk = checker("qvhighlights", dtype="float32")
    skey = chk._grad_key()
    neg, mlm = chk.injected(chk.case, skey)
    params = chk.params(chk.twin_nd(chk.twin32))
    _, jg, _ = chk.jax_grads(params, chk.case, skey)
    branches = chk.prelu_branches(params, chk.case, neg, mlm)
    assert branches and all(v.dtype == bool for v in branches.values())
    _, kg, flips = chk.kink_grads(params, chk.case, skey, branches)
    assert flips == []
    for k in jg:
        np.testing.assert_allclose(kg[k], jg[k], rtol=1e-5, atol=1e-7, err_msg=k)
    tag = next(k for k in branches if "t2v_encoder/t2v_encoder/layers_0/activation" in k)
    flipped = dict(branches)
    flipped[tag] = branches[tag].copy()
    flipped[tag][0, 0, 0] = ~flipped[tag][0, 0, 0]
    _, kg2, flips2 = chk.kink_grads(params, chk.case, skey, flipped)
    # the hand-flipped input is one crossing; the changed forward may push later PReLU inputs across 0 too
    assert (tag, 1) in [(t, c) for t, c, _ in flips2]
    assert any(not np.allclose(kg2[k], jg[k], rtol=1e-5, atol=1e-7) for k in jg)


def test_rounding_allowance_scales_with_duration():
    """``_rounding_explained``: a float32 submission whose window edges moved by less than ``1.5 out_tol x duration``
    seconds (span noise carried through ``x duration``, then the 1e-4 rounding of ``clip_len = -1``) is explained;
    the same shift on a 10x shorter video, a shift past the allowance, a dropped window and a NaN are not."""
    rng = np.random.default_rng(0)
    tol, dur = 2e-4, 400.0  # allowance on an edge: 1.5 * 2e-4 * 400 + 1e-4 = 0.1201 s

    def sub(qid, windows):
        return {"qid": qid, "pred_relevant_windows": [[round(float(a), 4) for a in w] for w in windows]}

    base = np.sort(rng.uniform(0, dur, (10, 2)), axis=1)
    wins = np.concatenate([base, rng.uniform(0, 1, (10, 1))], axis=1)
    moved = wins + np.array([0.11, -0.11, 5e-5])
    explained = pm._rounding_explained([sub(1, moved)], [sub(1, wins)], -1, {1: dur}, tol)
    assert explained[0], explained[1]
    assert not pm._rounding_explained([sub(1, moved)], [sub(1, wins)], -1, {1: dur / 10}, tol)[0]
    assert not pm._rounding_explained([sub(1, moved)], [sub(1, wins)], -1)[0]  # no allowance: one unit only
    assert not pm._rounding_explained([sub(1, wins + [0.13, 0, 0])], [sub(1, wins)], -1, {1: dur}, tol)[0]
    assert not pm._rounding_explained([sub(1, wins[:9])], [sub(1, wins)], -1, {1: dur}, tol)[0]
    nan = wins.copy()
    nan[3, 0] = np.nan
    assert not pm._rounding_explained([sub(1, nan)], [sub(1, wins)], -1, {1: dur}, tol)[0]
    assert pm._rounding_explained([sub(1, wins)], [sub(1, wins)], -1, {1: dur}, tol)[0]
    # saliency (float16): two steps apart near 0 (float32 noise ~1e-7 > the step) is within the tolerance; a
    # difference past it is not
    sal = np.float16([1.7e-4, -0.39, 0.1])
    two_steps = sal.copy()
    two_steps[0] = np.nextafter(np.nextafter(sal[0], np.float16(1)), np.float16(1))
    far = sal.copy()
    far[2] = np.float16(0.1 + 5e-4)

    def with_sal(s_):
        return {**sub(1, wins), "pred_saliency_scores": [float(v) for v in s_]}

    assert pm._rounding_explained([with_sal(two_steps)], [with_sal(sal)], -1, {1: dur}, tol)[0]
    assert not pm._rounding_explained([with_sal(two_steps)], [with_sal(sal)], -1, {1: dur})[0]
    assert not pm._rounding_explained([with_sal(far)], [with_sal(sal)], -1, {1: dur}, tol)[0]


def test_transformer_gradient_row_rejudged_across_prelu_kinks(monkeypatch):
    """The transformer-gradient block row's kink rule: a float32 row that fails (here: a criterion no float32 run
    meets) with no PReLU input across 0 says so and stays failed; with one float64 branch flipped by hand the
    gradients are taken again on the flipped side (the crossing is counted and named) and re-judged."""
    chk = checker("qvhighlights", dtype="float32")
    chk.tol = dataclasses.replace(chk.tol, grad_rel=1e-12)
    row = next(r for r in chk.block_rows() if "pred_spans of every decoder layer" in r.stage)
    assert not row.passed and "no PReLU input crosses 0" in row.note, summary([row])
    recorder = pm._prelu_recorder

    def flipping(seen):  # the recorder, with the first input of every encoder PReLU call on the other side
        inner = recorder(seen)

        def icpt(next_fun, args, kwargs, ctx):
            before = set(seen)
            out = inner(next_fun, args, kwargs, ctx)
            for k in set(seen) - before:  # (interceptors nest: only the PReLU's own call adds its key)
                if "encoder" in k and type(ctx.module).__name__ == "PReLU":
                    first = (0,) * seen[k].ndim
                    seen[k] = seen[k].at[first].set(~seen[k][first])
            return out

        return icpt

    monkeypatch.setattr(pm, "_prelu_recorder", flipping)
    row2 = next(r for r in chk.block_rows() if "pred_spans of every decoder layer" in r.stage)
    assert "PReLU branch at the" in row2.stage and "crossings:" in row2.note, summary([row2])
