"""MTM parity end to end: ``parity.check`` passes every stage for a tiny MTM (with the EMA), a wrong weight or a
wrong EMA step turns the rows downstream of it to FAIL, and an official-format MTM checkpoint saved from the
torch_ref twin (with ``ema_shadow``) converts to JAX, evaluates to the torch pipeline's score matrix and metrics,
and converts back bit-exactly.

The twin is independent of the JAX code (official mamba_ssm Mamba on its reference scan, official losses, the
official EMA class, the official evaluation protocol in torch); see docs/parity.md (MTM).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from jaxprvr.config import load_config
from parity import check, convert
from tests.conftest import FAST_COMPILE, TINY_QUERY, TINY_VISUAL, tiny_config
import torch_ref
from torch_ref import checkpoints as ckpt
from torch_ref.optim import EMA

# hidden 32, 2 heads; frames padded to max_ctx_l = 32 (MTM always pads to max_ctx_l), 8 clips; 2 Mamba layers
# per branch (the official table)
TINY = ["model.hidden_size=32", "model.n_heads=2", f"model.q_feat_size={TINY_QUERY}",
        f"model.visual_feat_dim={TINY_VISUAL}", "model.max_ctx_l=32", "model.map_size=8",
        "data.eval_context_bsz=64", "data.eval_query_bsz=64"]
EMA_ON = ["train.use_ema=true"]
METRICS = ("r1", "r5", "r10", "r100", "sumr")


@contextlib.contextmanager
def one_torch_thread():
    """torch's OpenMP threads next to XLA's pool on a small shared machine can slow the twin's many small ops by
    orders of magnitude; one thread keeps the test's time predictable (the numerics do not depend on it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _cfg(extra=()):
    return load_config("tvr", "mtm", TINY + list(extra))


@pytest.fixture(scope="module", autouse=True)
def shared_compiled_work():
    """The module's costliest work that does not depend on the weights is done once and shared by its tests:

    * the jitted training gradient of ``parity.check`` (:func:`parity.check.make_grad_fn`): one per (model config,
      loss config, XLA options). The full check, the official-init gradients and the wrong-EMA-step check use the
      same tiny MTM and the same batch shapes (the EMA lives in the optimizer, not in the loss), so they share one
      executable instead of tracing MTM's forward and backward and compiling (or loading) it three times;
    * the abstract parameter tree of ``parity.convert`` (``jax.eval_shape`` of MTM's init, a full trace of the
      model) per model config, traced once for the module's seven conversions.

    Both are pure functions of the configs in the key; every weight, batch, loss, gradient and file is still
    computed and compared by each test."""
    real_grad_fn, real_abstract = check.make_grad_fn, convert._abstract_params
    grad_fns, abstract = {}, {}

    def make_grad_fn(name, cfg, model, compiler_options=None):
        key = (name, cfg.model, cfg.loss, tuple(sorted((compiler_options or {}).items())))
        if key not in grad_fns:
            grad_fns[key] = real_grad_fn(name, cfg, model, compiler_options)
        return grad_fns[key]

    def abstract_params(cfg):
        if cfg.model not in abstract:
            abstract[cfg.model] = real_abstract(cfg)
        return abstract[cfg.model]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(check, "make_grad_fn", make_grad_fn)
        mp.setattr(convert, "_abstract_params", abstract_params)
        yield


# ---------------------------------------------------------------------------------------------- parity.check
@pytest.fixture(scope="module")
def perturbed_ckpt(tmp_path_factory):
    """An official-format MTM file of the twin's init + N(0, 0.1^2) on every tensor (the attns aliases share the
    perturbed tensors). At the official init the last LayerNorm of the frame Mamba stack has bias 0, so the padded
    frame rows come out near 0 and F.normalize's gradient there is ~1e11 (both frameworks): the grad stage's
    eps32 x max||g|| floor would then swamp every other tensor. Perturbed weights keep the comparison sharp."""
    cfg = _cfg()
    torch.manual_seed(0)
    twin = torch_ref.build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("mtm_ckpt") / "best.ckpt"
    ckpt.save_official(path, "mtm", twin.state_dict(), config=convert.official_config(cfg))
    return path


def test_every_stage_passes_for_a_tiny_mtm_with_ema(perturbed_ckpt):
    cfg = _cfg(EMA_ON)
    with one_torch_thread():
        rows = check.run_check(cfg, ckpt=perturbed_ckpt, compiler_options=FAST_COMPILE)
    failed = [r for r in rows if not r.passed]
    assert not failed, check.format_table(failed)
    assert {r.group for r in rows} == {"convert", "block", "model", "loss", "grad", "train", "metrics"}
    stages = {r.stage for r in rows}
    # every score and named aux stage of the twin is compared
    with torch.no_grad():
        scores, aux = torch_ref.build_model(cfg.model)(check.make_batch(cfg.model), train=False)
    assert set(scores) == {"clip", "clip_raw", "frame", "frame_raw", "video", "video_raw"}
    assert {f"scores[{k}]" for k in scores} | {f"aux[{k}]" for k in aux} <= stages
    # all ten loss terms and the total
    terms = ("clip_nce", "clip_trip", "frame_nce", "frame_trip", "video_nce", "video_trip", "qdl", "ot",
             "recon_text", "recon_video")
    assert {f"term {t}" for t in terms} | {"total"} == {r.stage for r in rows if r.group == "loss"}
    blocks = " | ".join(r.stage for r in rows if r.group == "block")
    for what in ("selective_scan_ref", "Mamba layer", "clip_mamba", "frame_tcn", "clip_encoder (DyGMMBlock, 11",
                 "frame_encoder_1", "video_encoder", "video_pooling", "refiner", "reconstructor"):
        assert what in blocks, what
    train = [r.stage for r in rows if r.group == "train"]
    assert len(train) == 2 and train[1].startswith("EMA weights after 5 steps")
    grad = [r for r in rows if r.group == "grad"]
    assert len(grad) == 2 and "(639 tensors)" in grad[1].stage  # named_parameters: the 462 attns aliases once
    n_own = int(grad[1].note.split("own scale decides ")[1].split()[0])
    assert 639 - n_own < 160, grad[1].note  # the relative criterion decides for most tensors (zero-gradient ones apart)


def test_tied_padded_frame_maxima_route_the_gradient_as_torch_max():
    """MTM does not re-zero the padded frame rows after its Mamba stack; at the official init they come out
    bit-identical and tie for the frame-branch maximum of some queries. The official ``torch.max(dim)`` sends the
    whole gradient to the first maximal row; the JAX training scores must do the same (an even split over the
    ties is another subgradient, and moves the weights differently)."""
    import jax
    import jax.numpy as jnp
    import torch.nn.functional as F

    from jaxprvr.models.layers import clip_frame_scores
    from torch_ref.layers import max_scores

    cfg = _cfg()
    torch.manual_seed(0)
    twin = torch_ref.build_model(cfg.model)
    batch = check.make_batch(cfg.model)
    with torch.no_grad():
        _, aux = twin(batch, train=False)
    frames, query, clips = aux["frame_feats"], aux["query"], aux["clip_feats"]
    # the premise: a video's padded rows are identical and tie for some query's maximum
    n0 = int(batch["frame_len"][0])
    assert torch.equal(frames[0, n0:], frames[0, n0:n0 + 1].expand_as(frames[0, n0:]))
    s = torch.einsum("qd,vtd->qvt", F.normalize(query, dim=-1), F.normalize(frames, dim=-1))
    assert ((s == s.max(-1, keepdim=True).values).sum(-1) > 1).any()

    ft = frames.clone().requires_grad_(True)
    max_scores(F.normalize(query, dim=-1), F.normalize(ft, dim=-1))[0].sum().backward()
    gj = jax.grad(lambda f: jnp.sum(clip_frame_scores(query.numpy(), clips.numpy(), f)["frame"]))(frames.numpy())
    gt = ft.grad.numpy()
    np.testing.assert_allclose(np.asarray(gj), gt, rtol=1e-5, atol=1e-6 * np.abs(gt).max())


def test_official_init_gradients_with_tied_padded_frames():
    """The whole training gradient at the official init (padded frame rows tied and ~0 after the last LayerNorm,
    so the frame Mamba stack's LayerNorm biases get gradients of ~1e11 in both frameworks)."""
    with one_torch_thread():
        rows = check.run_check(_cfg(), groups=("grad",), compiler_options=FAST_COMPILE)
    assert all(r.passed for r in rows), check.format_table(rows)


def test_a_wrong_mamba_weight_fails_downstream_only(monkeypatch):
    real = convert.torch_to_flax

    def off_by_a_little(tab, sd, where="state_dict"):
        params = real(tab, sd, where)
        k = params["frame_mamba_0"]["out_proj"]["kernel"]
        params["frame_mamba_0"]["out_proj"]["kernel"] = k * np.float32(1.01)
        return params

    monkeypatch.setattr(convert, "torch_to_flax", off_by_a_little)
    with one_torch_thread():
        rows = check.run_check(_cfg(), groups=("block", "model"))
    verdict = {r.stage: r.passed for r in rows}
    assert not verdict["Mamba layer (frame_mamba.0, official mamba_ssm.Mamba)"]
    assert not verdict["aux[frame_feats]"] and not verdict["scores[frame]"]
    # upstream of the wrong weight, or on other branches: still equal
    for stage in ("frame_tcn (TCN, eval)", "aux[frame_feats_1]", "aux[clip_feats]", "scores[clip]",
                  "scores[video]", "clip_mamba (h + LN(Mamba(...)), 2 layers)"):
        assert verdict[stage], stage
    assert [s for s in verdict if s.startswith("selective scan")][0] in {s for s, ok in verdict.items() if ok}


def test_a_wrong_ema_step_fails_only_the_ema_row(monkeypatch, perturbed_ckpt):
    """The torch EMA called with step = i + 1 instead of i (warm decay (1 + s) / (10 + s) one step ahead): the
    parameters still agree, the EMA weights do not."""
    real_call = EMA.__call__

    def one_step_late(self, model, step):
        return real_call(self, model, step + 1)

    monkeypatch.setattr(EMA, "__call__", one_step_late)
    with one_torch_thread():
        rows = check.run_check(_cfg(EMA_ON), ckpt=perturbed_ckpt, groups=("train",), steps=2,
                               compiler_options=FAST_COMPILE)
    assert [r.passed for r in rows] == [True, False], check.format_table(rows)


def test_cli_accepts_mtm_and_reports_bad_input(capsys):
    args = check.build_parser().parse_args(["--model", "mtm", "--config", "tvr"])
    assert args.model == "mtm"
    assert check.main(["--model", "mtm", "--config", "tvr", "--groups", "grads"]) == 2
    assert "--groups" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- conversion
def _sets(extra=()):
    return [a for s in TINY + list(extra) for a in ("--set", s)]


def _cli(capsys, argv):
    rc = convert.main(argv)
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc == 0 else None), out.err


def _official_mtm_file(path, cfg, *, with_ema: bool, seed=5):
    """An official-format MTM best.ckpt from the twin: its state_dict (with the attns aliases), BertAdam moments
    over named_parameters, and (``with_ema``) the official EMA's shadow after two updates of perturbed weights."""
    torch.manual_seed(seed)
    twin = torch_ref.build_model(cfg.model)  # official init
    ema = EMA.from_model(twin, cfg.train.ema_decay)
    g = torch.Generator().manual_seed(seed)
    for step in range(2):  # two "training steps": the weights move, the EMA follows at its warm decay
        with torch.no_grad():
            for p in twin.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        ema(twin, step)
    sd = twin.state_dict()
    names = ckpt.official_param_names("mtm", sd)
    moments = {k: (12, torch.randn(sd[k].shape, generator=g), torch.rand(sd[k].shape, generator=g)) for k in names}
    opt_sd = ckpt.bert_adam_state(names, lr=2.5e-4, warmup=0.01, t_total=500, moments=moments)
    ckpt.save_official(path, "mtm", sd, epoch=7, model_val=[1, 2, 3, 4, 10.0], config=convert.official_config(cfg),
                       optimizer=opt_sd, module_prefix=True, ema_shadow=ema.shadow if with_ema else None)
    return twin, (ema.shadow if with_ema else None)


def _torch_eval(cfg, state_dict, ds, shadow=None):
    from torch_ref.evaluate import TorchEvaluator

    twin = torch_ref.build_model(cfg.model)
    twin.load_state_dict(state_dict, strict=True)
    if shadow is not None:  # the official EMA.assign: the parameters become the shadow tensors
        ema = EMA(cfg.train.ema_decay)
        ema.shadow = dict(shadow)
        ema.assign(twin)
    with one_torch_thread():
        return TorchEvaluator(twin.eval(), cfg).evaluate(ds, keep_scores=True)


def test_official_mtm_file_with_ema_converts_evaluates_like_torch_and_converts_back_bit_exact(
        tiny_root, tmp_path, capsys):
    from jaxprvr import evaluate
    from jaxprvr.data import PRVRDataset

    cfg = tiny_config("mtm", extra=[f"model.visual_feat_dim={TINY_VISUAL}", "model.max_ctx_l=32",
                                    "model.map_size=8", *EMA_ON])
    src = tmp_path / "best.ckpt"
    twin, shadow = _official_mtm_file(src, cfg, with_ema=True)
    ref = ckpt.load_official(src)
    assert len(ref.state_dict) == len(convert.table("mtm")) and len(ref.ema_shadow) == 639

    out = tmp_path / "jax"
    rc, res, err = _cli(capsys, ["torch2jax", "--model", "mtm", "--config", "tvr", *_sets(EMA_ON), str(src), str(out)])
    assert rc == 0, err
    assert res["ema"] and res["ema_shadow"] == "from the file's ema_shadow"
    assert res["optimizer_state"] and res["optimizer_step"] == 12 and res["epoch"] == 7

    # jaxprvr.evaluate on the converted folder uses the EMA weights (train.use_ema), as training does: the same
    # fused score matrix and metrics as the torch pipeline on the twin with the official EMA.assign
    ds = PRVRDataset(tiny_root, cfg, "test")
    t_ema = _torch_eval(cfg, ref.state_dict, ds, shadow=ref.ema_shadow)
    t_raw = _torch_eval(cfg, ref.state_dict, ds)
    scores_dir = tmp_path / "scores"
    rc = evaluate.main(["--config", "tvr", "--model", "mtm", "--ckpt", str(out), "--data-root", str(tiny_root),
                        "--no-progress", "--save-scores", str(scores_dir)])
    jax_metrics = json.loads(capsys.readouterr().out)
    assert rc == 0 and jax_metrics["ema"] is True
    j_scores = np.load(scores_dir / "scores.npy")
    np.testing.assert_allclose(j_scores, t_ema["_scores"], rtol=1e-4, atol=1e-4)
    # the EMA and raw weights give clearly different scores, so this comparison can tell them apart
    assert np.abs(t_ema["_scores"] - t_raw["_scores"]).max() > 1e-2
    for k in METRICS:
        assert abs(jax_metrics[k] - t_ema[k]) <= 0.1 + 1e-9, (k, jax_metrics[k], t_ema[k])
    # --no-ema: the raw weights, as the torch pipeline on the raw twin
    rc = evaluate.main(["--config", "tvr", "--model", "mtm", "--ckpt", str(out), "--data-root", str(tiny_root),
                        "--no-progress", "--no-ema", "--save-scores", str(tmp_path / "raw")])
    raw_metrics = json.loads(capsys.readouterr().out)
    assert rc == 0 and raw_metrics["ema"] is False
    np.testing.assert_allclose(np.load(tmp_path / "raw" / "scores.npy"), t_raw["_scores"], rtol=1e-4, atol=1e-4)

    # back to the official layout, from the resumable slot and from the run folder ("best"): bit-exact
    for i, where in enumerate((out / "ckpt" / "latest", out)):
        dst = tmp_path / f"back{i}" / "best.ckpt"
        rc, res, err = _cli(capsys, ["jax2torch", "--model", "mtm", "--config", "tvr", *_sets(), str(where), str(dst)])
        assert rc == 0, err
        assert res["ema_shadow"] and res["optimizer_state"] and res["epoch"] == 7
        raw = torch.load(dst, map_location="cpu", pickle_module=ckpt.RESTRICTED, weights_only=False)
        assert set(raw) == {"config", "epoch", "model_val", "state_dict", "optimizer", "ema_shadow"}
        assert raw["config"]["use_ema"] is True and raw["config"]["model_name"] == "mtm"
        back = ckpt.load_official(dst)
        assert list(back.state_dict) == list(ref.state_dict)  # 1,101 keys, the attns aliases included
        for k, v in ref.state_dict.items():
            assert back.state_dict[k].dtype == v.dtype and torch.equal(back.state_dict[k], v), k
        assert list(back.ema_shadow) == list(shadow)  # named_parameters order, no aliases
        for k, v in shadow.items():
            assert torch.equal(back.ema_shadow[k], v), k
        for j, s in ref.optimizer["state"].items():
            assert back.optimizer["state"][j]["step"] == 12
            assert torch.equal(back.optimizer["state"][j]["next_m"], s["next_m"])
            assert torch.equal(back.optimizer["state"][j]["next_v"], s["next_v"])
        assert [g["params"] for g in back.optimizer["param_groups"]] == [g["params"] for g in
                                                                          ref.optimizer["param_groups"]]
        twin2 = torch_ref.build_model(cfg.model)
        twin2.load_state_dict(back.state_dict, strict=True)
        ema = EMA(cfg.train.ema_decay)  # the official EMA finds every parameter's shadow by its name
        ema.shadow = dict(back.ema_shadow)
        ema.assign(twin2)
        assert all(torch.equal(p, shadow[n]) for n, p in twin2.named_parameters())


def test_ema_without_shadow_in_the_file_or_without_use_ema(tmp_path, capsys):
    """``use_ema`` and a file without ``ema_shadow``: the shadow starts at the parameters (and the JSON says so);
    a file with ``ema_shadow`` and ``use_ema`` off: the EMA is left out (and the JSON says so)."""
    cfg = _cfg(EMA_ON)
    src = tmp_path / "plain.ckpt"
    twin, _ = _official_mtm_file(src, cfg, with_ema=False)
    rc, res, err = _cli(capsys, ["torch2jax", "--model", "mtm", "--config", "tvr", *_sets(EMA_ON), str(src),
                                 str(tmp_path / "a")])
    assert rc == 0, err
    assert res["ema"] and res["ema_shadow"].startswith("initialised from the parameters")
    dst = tmp_path / "a.ckpt"
    rc, res, err = _cli(capsys, ["jax2torch", "--model", "mtm", "--config", "tvr", *_sets(),
                                 str(tmp_path / "a" / "ckpt" / "latest"), str(dst)])
    assert rc == 0 and res["ema_shadow"], err
    back = ckpt.load_official(dst)
    named = dict(twin.named_parameters())
    assert list(back.ema_shadow) == list(named)
    for k, p in named.items():
        assert torch.equal(back.ema_shadow[k], p.detach()), k

    src2 = tmp_path / "ema.ckpt"
    _official_mtm_file(src2, cfg, with_ema=True)
    rc, res, err = _cli(capsys, ["torch2jax", "--model", "mtm", "--config", "tvr", *_sets(), str(src2),
                                 str(tmp_path / "b")])
    assert rc == 0, err
    assert not res["ema"] and res["ema_shadow"].startswith("not converted")
    rc, res, err = _cli(capsys, ["jax2torch", "--model", "mtm", "--config", "tvr", *_sets(),
                                 str(tmp_path / "b" / "ckpt" / "latest"), str(tmp_path / "b.ckpt")])
    assert rc == 0 and not res["ema_shadow"], err
    assert "ema_shadow" not in torch.load(tmp_path / "b.ckpt", map_location="cpu", pickle_module=ckpt.RESTRICTED,
                                          weights_only=False)


def test_ema_shadow_keys_are_checked_by_name():
    cfg = _cfg()
    twin = torch_ref.build_model(cfg.model)
    shadow = {n: p.detach().clone() for n, p in twin.named_parameters()}
    params = convert.torch_to_flax("mtm", twin.state_dict())
    tree = convert.shadow_to_jax("mtm", shadow, params)
    back = convert.shadow_to_torch("mtm", tree)
    assert list(back) == list(shadow) and all(torch.equal(back[k], v) for k, v in shadow.items())
    bad = dict(shadow)
    bad["clip_encoder.attns.3.norm1.bias"] = bad["clip_encoder.attn3.norm1.bias"]  # an alias is not a parameter name
    del bad["frame_tcn.alpha"]
    with pytest.raises(convert.ConversionError) as ei:
        convert.shadow_to_jax("mtm", bad, params, where="x.ckpt (ema_shadow)")
    assert ei.value.missing == ["frame_tcn.alpha"] and ei.value.unexpected == ["clip_encoder.attns.3.norm1.bias"]
    assert "ema_shadow" in str(ei.value)
