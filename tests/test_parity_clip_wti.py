"""BackBone_tvr parity (``parity.check --model clip_wti``): every row passes for the unmutated code (float64, rtol
1e-9), and bugs planted into the JAX side make the right row fail; the CLI writes JSON rows; ``parity.convert``
round trips (torch2jax / jax2torch with fp16 CLIP tensors, clip2jax / jax2clip) are bit-exact.

A tiny model (CLIP widths 32, one layer per tower, 2 heads, 32x32 frames of 16x16 patches, one seqTransf block,
max_words 8, 3 frames) keeps this file short on 2 busy cores.
"""

from __future__ import annotations

import inspect
import json

import jax
import numpy as np
import pytest
import torch

from jaxprvr.config import load_config
from jaxprvr.models import clip as fc
from jaxprvr.models import clip_wti as mw
from parity import clip_wti as pw
from parity import convert
from parity.rows import TOLERANCES
from tests.conftest import x64

TINY = ["model.image_resolution=32", "model.vision_patch_size=16", "model.vision_width=32", "model.vision_layers=1",
        "model.vision_heads=2", "model.text_width=32", "model.text_layers=1", "model.text_heads=2",
        "model.embed_dim=32", "model.num_hidden_layers=1", "model.max_words=8", "model.max_frames=3"]
SETS = [f"--set={s}" for s in TINY]


def tiny():
    return load_config("msrvtt", "clip_wti", TINY)


def failing(rows, words):
    return [r for r in rows if not r.passed and words in r.stage]


@pytest.fixture(scope="module")
def ck64():
    with x64():
        yield pw.ClipWTICheck(pw.SPEC, tiny(), ckpt=None, data_root=None, seed=0, n_videos=3, steps=5, device=None,
                              say=lambda s: None, compiler_options=None, tol=TOLERANCES["float64"], perturb="none")


# ---------------------------------------------------------------------------------------------- control


def test_control_every_row_passes(ck64):
    with x64():
        rows = ck64.run(("convert", "block", "model", "loss", "grad", "train", "dropout", "metrics"))
    bad = [(r.stage, r.note) for r in rows if not r.passed]
    assert not bad, bad
    assert {r.group for r in rows} == {"convert", "block", "model", "loss", "grad", "train", "dropout", "metrics"}
    conv = [r for r in rows if r.group == "convert"]
    assert any("fp16" in r.stage and "fp16 tensors back" in r.note for r in conv)
    assert any("synthetic MSR-VTT" in r.stage or "in-memory" in r.stage for r in rows if r.group == "metrics")
    assert any(r.stage.startswith("video inputs") for r in rows)


# ---------------------------------------------------------------------------------------------- mutants


def test_seqtransf_layernorm_eps_fails(ck64, monkeypatch):
    monkeypatch.setattr(mw, "TF_LN_EPS", 1e-5)  # torch's default instead of until_module's 1e-12
    with x64():
        rows = ck64.seqtransf_rows()
    assert failing(rows, "seqTransf block 0") and failing(rows, "seqTransf (")


def test_wti_max_filled_with_minus_inf_fails(ck64, monkeypatch):
    """DRL-style masking (padded similarities -inf before the max, padded tokens dropped after) instead of
    BackBone_tvr's multiplication by the masks, whose zeros take part in the maxima."""
    import jax.numpy as jnp

    def drl(text_feat, text_mask, video_feat, video_mask, wt_logits, wv_logits):
        dt = text_feat.dtype
        tm, vm = text_mask.astype(dt), video_mask.astype(dt)
        wt = jax.nn.softmax(jnp.where(tm > 0, wt_logits.astype(dt), mw.WEIGHT_MASK_FILL), axis=-1)
        wv = jax.nn.softmax(jnp.where(vm > 0, wv_logits.astype(dt), mw.WEIGHT_MASK_FILL), axis=-1)
        t = text_feat / jnp.linalg.norm(text_feat, axis=-1, keepdims=True)
        v = video_feat / jnp.linalg.norm(video_feat, axis=-1, keepdims=True)
        s = jnp.einsum("atd,bvd->abtv", t, v)
        s = jnp.where((tm[:, None, :, None] * vm[None, :, None, :]) > 0, s, -jnp.inf)
        t2v = jnp.einsum("abt,at->ab", jnp.where(tm[:, None, :] > 0, s.max(-1), 0.0), wt)
        v2t = jnp.einsum("abv,bv->ab", jnp.where(vm[None, :, :] > 0, s.max(-2), 0.0), wv)
        return (t2v + v2t) / 2.0

    monkeypatch.setattr(mw, "wti_logits", drl)
    with x64():
        rows = ck64.head_rows()
    assert failing(rows, "WTI (wti_logits") and failing(rows, "similarity (weight MLPs")
    assert not failing(rows, "weight_fc")
    assert all("non-finite" not in r.note for r in rows)  # a real difference, not a NaN


def test_eot_at_the_last_position_fails(ck64, monkeypatch):
    src = inspect.getsource(fc.TextTower)
    old = "eot = jnp.argmax(ids, axis=-1)"
    assert old in src
    ns = dict(vars(fc))
    exec(compile(src.replace(old, "eot = jnp.full(ids.shape[:1], ids.shape[-1] - 1)"), "<mutant eot>", "exec"), ns)
    monkeypatch.setattr(fc, "TextTower", ns["TextTower"])
    with x64():
        rows = ck64.text_rows()
    assert failing(rows, "text tower embeds") and not failing(rows, "text tower tokens")


def test_logit_scale_clamp_missing_fails(ck64, monkeypatch):
    import optax

    import jaxprvr.optim as jo

    monkeypatch.setattr(jo, "clamp_max", lambda select, max_value: optax.identity())
    monkeypatch.setattr(ck64, "steps", 3)  # the clamp acts at the first step
    with x64():
        rows = ck64.train_rows()
    assert failing(rows, "logit_scale after each step") and failing(rows, "params after")
    assert "clip.logit_scale" in failing(rows, "params after")[0].note


def test_coef_lr_on_transformerclip_fails(ck64, monkeypatch):
    """``"clip." in name.lower()``: the seqTransf blocks (``transformerClip.``) get the CLIP's lr x coef_lr."""
    import jaxprvr.tasks.t2v as t2v

    orig = t2v._named
    monkeypatch.setattr(t2v, "_named", lambda params, fn: orig(params, lambda n: fn(n.lower())))
    monkeypatch.setattr(ck64, "steps", 3)  # steps 1 and 2 have lr > 0
    with x64():
        rows = ck64.train_rows()
    bad = failing(rows, "params after")
    assert bad and "transformerClip" in bad[0].note and not failing(rows, "logit_scale after")


def test_nan_in_one_gradient_fails(ck64, monkeypatch):
    orig = pw.ClipWTICheck.jax_grads

    def poisoned(self, *a, **kw):
        jl, jg = orig(self, *a, **kw)
        k = "transformerClip.resblocks.0.mlp.c_fc.weight"
        jg[k] = jg[k].copy()
        jg[k].flat[3] = np.nan
        return jl, jg

    monkeypatch.setattr(pw.ClipWTICheck, "jax_grads", poisoned)
    with x64():
        rows = ck64.grad_rows()
    bad = failing(rows, "d loss / d param")
    assert bad and "transformerClip.resblocks.0.mlp.c_fc.weight" in bad[0].note and "NaN" in bad[0].note


# ---------------------------------------------------------------------------------------------- the CLIs


def test_check_cli_json_float32(tmp_path):
    """The generic driver reaches the spec's rows (float32, the arbiter available) and writes the JSON rows."""
    from parity import check

    out = tmp_path / "r.json"
    rc = check.main(["--model", "clip_wti", "--config", "msrvtt", *SETS, "--groups", "convert,loss,dropout",
                     "--perturb", "none", "--videos", "3", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["dtype"] == "float32" and doc["rows"] and all(r["passed"] for r in doc["rows"])
    assert {r["group"] for r in doc["rows"]} == {"convert", "loss", "dropout"}


def _twin_file(tmp_path, name="pytorch_model.bin.2"):
    """A tiny BackBone_tvr state dict as a CUDA run saves it: the CLIP's convert_weights tensors in fp16."""
    from torch_ref.clip import convert_weights

    twin = pw.random_twin(tiny().model, seed=3)
    convert_weights(twin.clip)
    sd = twin.state_dict()
    path = tmp_path / name
    torch.save(sd, path)
    return path, sd


def test_convert_torch2jax_jax2torch_bit_exact(tmp_path, capsys):
    from jaxprvr.checkpoint import load_params
    from jaxprvr.evaluate import build_parser, load_checkpoint_config
    from jaxprvr.models import build_model
    from jaxprvr.train import init_params
    from torch_ref.clip_wti import BackBoneTVR

    src, sd = _twin_file(tmp_path)
    assert sum(v.dtype == torch.float16 for v in sd.values()) > 0
    out = tmp_path / "run"
    assert convert.main(["torch2jax", "--model", "clip_wti", "--config", "msrvtt", *SETS, str(src), str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["tensors"] == len(sd) and info["epoch"] == 2 and "float16" in info["source_dtypes"]
    # what jaxprvr.evaluate loads: the saved config (the weights' sizes) and the params
    args = build_parser().parse_args(["--config", "msrvtt", "--model", "clip_wti", "--ckpt", str(out)])
    cfg, _ = load_checkpoint_config(args)
    assert cfg.model.vision_width == 32 and cfg.model.text_heads == 2 and cfg.model.clip == ""
    abstract = jax.eval_shape(lambda: init_params(build_model(cfg.model), cfg, jax.random.PRNGKey(0)))
    params, _ = load_params(out, abstract)
    ref = pw.torch_to_params(cfg.model, sd)[1]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        assert np.array_equal(np.asarray(a), b)
    back = tmp_path / "back.bin"
    assert convert.main(["jax2torch", "--model", "clip_wti", "--config", "msrvtt", str(out), str(back)]) == 0
    got = torch.load(back, weights_only=True)
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    fresh = BackBoneTVR(pw.twin_dims(cfg.model), "seqTransf", 1)
    fresh.load_state_dict({k: v.float() for k, v in got.items()}, strict=True)
    # jaxprvr.load reads the official file in memory (parity SPEC.read_variables): the converted parameters bit for
    # bit, the CLIP sizes from the file; a file missing a tensor is one error naming it
    import jaxprvr
    from jaxprvr.errors import JaxprvrError

    mem = jaxprvr.load(src, config="msrvtt", model="clip_wti", overrides=TINY)
    assert mem.config.model.vision_width == 32 and mem.config.model.clip == ""
    assert jax.tree.structure(mem.params) == jax.tree.structure(params)
    assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree.leaves(mem.params),
                                                                            jax.tree.leaves(params)))
    key = next(k for k in sd if k.startswith("clip.visual"))
    torch.save({k: v for k, v in sd.items() if k != key}, tmp_path / "cut.bin")
    with pytest.raises(JaxprvrError, match=key.replace(".", r"\.")):
        jaxprvr.load(tmp_path / "cut.bin", config="msrvtt", model="clip_wti", overrides=TINY)


def test_convert_clip2jax_jax2clip_bit_exact_fp16(tmp_path, capsys):
    from torch_ref.clip import convert_weights, tiny_clip

    clip = tiny_clip(seed=4, vocab_size=300, vision_layers=1, transformer_layers=1)
    convert_weights(clip)
    sd = clip.state_dict()
    src = tmp_path / "clip.pt"
    torch.save(sd, src)
    assert convert.main(["clip2jax", str(src), str(tmp_path / "clipdir")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["tensors"] == len(sd) and "float16" in info["dtypes"]
    back = tmp_path / "back.pt"
    assert convert.main(["jax2clip", str(tmp_path / "clipdir"), str(back)]) == 0
    got = torch.load(back, weights_only=True)
    assert list(got) == list(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert convert.main(["clip2jax", str(src), str(tmp_path / "clipdir")]) == 2  # no overwrite without --force
    assert convert.main(["clip2jax", "--force", str(src), str(tmp_path / "clipdir")]) == 0


def test_convert_errors_are_one_line(tmp_path, capsys):
    src, _ = _twin_file(tmp_path, "best.pth")
    cases = [
        ["torch2jax", "--model", "clip_wti", "--config", "msrvtt", *SETS, "--set=model.num_hidden_layers=2", str(src),
         str(tmp_path / "o")],  # 1 block saved, 2 configured
        ["jax2torch", "--model", "clip_wti", "--config", "msrvtt", str(tmp_path / "nothing"), str(tmp_path / "x.bin")],
        ["clip2jax", str(tmp_path / "missing.pt"), str(tmp_path / "d")],
        ["jax2clip", str(tmp_path), str(tmp_path / "y.pt")],  # a folder without clip.json
        ["clip2jax", str(src), str(tmp_path / "d2")],  # a BackBone_tvr file, not an OpenAI CLIP
    ]
    for argv in cases:
        capsys.readouterr()
        assert convert.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, (argv, err)
    with pytest.raises(SystemExit) as e:
        convert.main(["clip2jax", "--help"])
    assert e.value.code == 0


def test_rank_changes_need_a_near_tie():
    """The full-evaluation metrics row accepts a differing rank only where the positive has a near-tie."""
    t = np.array([[1.0, 0.99999, 0.2], [0.1, 0.5, 0.3], [0.0, 0.2, 0.9]], np.float32)
    j = t.copy()
    j[0, 1] = 1.000005  # overtakes the positive of row 0 by 5e-6: a near-tie
    assert pw._rank_changes(j, t, 2e-5) == (1, 0) and pw._rank_changes(j, t, 1e-7) == (1, 1)
    j = t.copy()
    j[1, 2] = 0.6  # a real reordering
    assert pw._rank_changes(j, t, 2e-5) == (1, 1)
    cols = [c for f, n in pw._row_ranks(t) for c in range(f, f + n)]
    assert cols == pw.official_compute_metrics(t)["cols"]
