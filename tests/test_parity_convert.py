"""parity.convert: key tables, bit-exact round trips both ways, named errors, the CLI and its outputs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

from jaxprvr.config import model_config
from parity import convert
from parity.keys import KINDS
from tests.conftest import TINY_QUERY, TINY_VISUAL, tiny_config
from tests.test_torch_ref import NAMES, flat, flax_params, flax_path, make_batch, tiny_cfg
import torch_ref
from torch_ref import checkpoints as ckpt

TORCH_TYPES = {"linear": torch.nn.Linear, "layernorm": torch.nn.LayerNorm, "embedding": torch.nn.Embedding}


@pytest.mark.parametrize("name", NAMES)
def test_table_is_the_official_state_dict_and_kinds_follow_layer_types(name):
    with torch.device("meta"):
        twin = torch_ref.build_model(model_config(name))
    sd = twin.state_dict()
    tab = convert.table(name)
    assert [e.torch for e in tab] == list(sd)  # the official order
    for e in tab:
        # independent derivation from the torch module tree (layer type, not shape)
        path, transpose = flax_path(twin, e.torch)
        assert e.flax == path, e
        assert (e.kind == "linear") == transpose, e
        owner = twin.get_submodule(e.torch.rsplit(".", 1)[0]) if "." in e.torch else twin
        if e.kind in TORCH_TYPES:
            assert isinstance(owner, TORCH_TYPES[e.kind]) and e.torch.endswith(".weight"), e
        elif e.kind == "bias":
            assert e.torch.endswith(".bias"), e
        assert KINDS[e.kind] in (None, sd[e.torch].ndim), e


def _random_state_dict(name, seed=0, cfg=None):
    twin = torch_ref.build_model(cfg or tiny_cfg(name))
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in twin.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_torch_flax_torch_is_bit_exact_and_square_linears_are_transposed(name):
    sd = _random_state_dict(name)
    prefixed = {f"module.{k}": v for k, v in sd.items()}  # nn.DataParallel
    params = convert.torch_to_flax(name, prefixed)
    back = convert.flax_to_torch(name, params)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    fp = convert.flatten(params)
    w = sd["query_encoder.self.query.weight"].numpy()  # square (D, D): only the table knows to transpose
    assert w.shape[0] == w.shape[1]
    np.testing.assert_array_equal(fp["query_encoder/self/query/kernel"], w.T)
    np.testing.assert_array_equal(fp["query_pos_embed/position_embeddings/embedding"],
                                  sd["query_pos_embed.position_embeddings.weight"].numpy())


@pytest.mark.parametrize("name", NAMES)
def test_flax_torch_flax_is_bit_exact_and_the_twin_computes_the_same(name):
    cfg = tiny_cfg(name)
    batch = make_batch(cfg)
    model, params = flax_params(cfg, batch, seed=3)
    sd = convert.flax_to_torch(name, params)
    twin = torch_ref.build_model(cfg)
    twin.load_state_dict(sd, strict=True)
    again = convert.flatten(convert.torch_to_flax(name, twin.state_dict()))
    for path, a in flat(params).items():
        b = again[path]
        assert b.dtype == a.dtype and np.array_equal(np.asarray(a), b), path
    scores, _ = model.apply({"params": params}, batch, train=False)
    with torch.no_grad():
        tscores, _ = twin(batch, train=False)
    for k in scores:
        np.testing.assert_allclose(tscores[k].numpy(), np.asarray(scores[k]), rtol=1e-4, atol=1e-5, err_msg=k)


def test_bfloat16_round_trip_is_exact():
    sd = {k: v.to(torch.bfloat16) for k, v in _random_state_dict("ms_sl").items()}
    back = convert.flax_to_torch("ms_sl", convert.torch_to_flax("ms_sl", sd))
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], v) for k, v in sd.items())


def test_missing_and_unexpected_keys_are_named():
    sd = _random_state_dict("gmmformer_v2")
    del sd["clip_encoder.attn3.norm2.bias"]
    sd["clip_encoder.attn8.norm2.bias"] = torch.zeros(3)
    with pytest.raises(convert.ConversionError) as ei:
        convert.torch_to_flax("gmmformer_v2", sd, where="x.ckpt")
    e = ei.value
    assert e.missing == ["clip_encoder.attn3.norm2.bias"] and e.unexpected == ["clip_encoder.attn8.norm2.bias"]
    assert "x.ckpt" in str(e) and "clip_encoder.attn3.norm2.bias" in str(e) and "attn8" in str(e)
    # the wrong model: every key is named as missing or unexpected
    with pytest.raises(convert.ConversionError, match="missing") as ei:
        convert.torch_to_flax("gmmformer", _random_state_dict("ms_sl"))
    assert "mapping_linear.0.weight" in ei.value.unexpected
    params = convert.torch_to_flax("ms_sl", _random_state_dict("ms_sl"))
    params["extra"] = {"kernel": np.zeros(2)}
    with pytest.raises(convert.ConversionError, match="extra/kernel"):
        convert.flax_to_torch("ms_sl", params)
    bad = _random_state_dict("ms_sl")
    bad["mapping_linear.0.weight"] = torch.zeros(4)  # a Linear weight must be 2-D
    with pytest.raises(convert.ConversionError, match="mapping_linear.0.weight"):
        convert.torch_to_flax("ms_sl", bad)


def _official_adam_state(twin, steps=2, seed=0):
    """A real official-style BertAdam state: moments written by hand in the official layout and order."""
    g = torch.Generator().manual_seed(seed)
    moments = {k: (steps, torch.randn(v.shape, generator=g), torch.rand(v.shape, generator=g))
               for k, v in twin.state_dict().items()}
    return ckpt.bert_adam_state(twin.state_dict(), lr=1e-4, warmup=0.01, t_total=500, moments=moments), moments


def test_optimizer_state_round_trip_and_official_id_layout():
    twin = torch_ref.build_model(tiny_cfg("gmmformer"))
    opt_sd, moments = _official_adam_state(twin)
    # ids as torch.optim.Optimizer.state_dict numbers them: consecutive across the (decay, no-decay) groups
    torch_opt = torch.optim.SGD([{"params": [p for n, p in twin.named_parameters() if "bias" not in n
                                             and "LayerNorm" not in n]},
                                 {"params": [p for n, p in twin.named_parameters() if "bias" in n
                                             or "LayerNorm" in n]}], lr=0.1)
    ref_groups = [g["params"] for g in torch_opt.state_dict()["param_groups"]]
    assert [g["params"] for g in opt_sd["param_groups"]] == ref_groups
    params = convert.torch_to_flax("gmmformer", twin.state_dict())
    st = convert.optimizer_to_jax("gmmformer", opt_sd, params)
    assert int(st.count) == 2
    np.testing.assert_array_equal(convert.flatten(st.m)["clip_encoder/attn1/output/dense/kernel"],
                                  moments["clip_encoder.attn1.output.dense.weight"][1].numpy().T)
    back = convert.optimizer_to_torch("gmmformer", st, lr=1e-4, warmup=0.01, t_total=500)
    assert [g["params"] for g in back["param_groups"]] == ref_groups
    assert back["state"].keys() == opt_sd["state"].keys()
    for i, s in opt_sd["state"].items():
        assert back["state"][i]["step"] == 2
        assert torch.equal(back["state"][i]["next_m"], s["next_m"]) and torch.equal(back["state"][i]["next_v"], s["next_v"])
    assert convert.optimizer_to_jax("gmmformer", ckpt.bert_adam_state(twin.state_dict()), params) is None


# ---------------------------------------------------------------------------------------------- CLI
TINY_SET = ["model.hidden_size=32", "model.n_heads=2", f"model.q_feat_size={TINY_QUERY}",
            f"model.visual_feat_dim={TINY_VISUAL}", "data.eval_context_bsz=64", "data.eval_query_bsz=64"]


def _sets(extra=()):
    out = []
    for s in TINY_SET + list(extra):
        out += ["--set", s]
    return out


def _cli(capsys, argv):
    rc = convert.main(argv)
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc == 0 else None), out.err


@pytest.mark.parametrize("name", NAMES)
def test_official_file_to_jax_evaluates_like_torch_and_converts_back_bit_exact(name, tiny_root, tmp_path, capsys):
    from jaxprvr import evaluate
    from torch_ref.evaluate import TorchEvaluator

    cfg = tiny_config(name, extra=[f"model.visual_feat_dim={TINY_VISUAL}"])
    torch.manual_seed(5)
    twin = torch_ref.build_model(cfg.model)  # official init
    src = tmp_path / ("model.ckpt" if name == "ms_sl" else "best.ckpt")
    if name == "ms_sl":
        ckpt.save_official(src, name, twin.state_dict(), epoch=7, model_cfg=convert.spec("ms_sl").official_model_cfg(cfg))
    else:
        opt_sd, _ = _official_adam_state(twin, steps=12)
        ckpt.save_official(src, name, twin.state_dict(), epoch=7, model_val=[1, 2, 3, 4, 10.0],
                           config=convert.official_config(cfg), optimizer=opt_sd, module_prefix=True)
    out = tmp_path / "jax"
    rc, res, err = _cli(capsys, ["torch2jax", "--model", name, "--config", "tvr", *_sets(), str(src), str(out)])
    assert rc == 0, err
    assert res["optimizer_state"] == (name != "ms_sl") and res["epoch"] == 7

    # the converted folder evaluates (through the evaluate CLI) to the torch pipeline's metrics
    rc = evaluate.main(["--config", "tvr", "--model", name, "--ckpt", str(out), "--data-root", str(tiny_root),
                        "--no-progress"])
    jax_metrics = json.loads(capsys.readouterr().out)
    assert rc == 0
    from jaxprvr.data import PRVRDataset

    ds = PRVRDataset(tiny_root, cfg, "test")
    torch_metrics = TorchEvaluator(twin.eval(), cfg).evaluate(ds)
    for k in ("r1", "r5", "r10", "r100", "sumr"):
        assert abs(jax_metrics[k] - torch_metrics[k]) <= 0.1 + 1e-9, (k, jax_metrics[k], torch_metrics[k])

    # back to the official layout: bit-exact tensors, strict load, the official top-level keys
    dst = tmp_path / "back" / src.name
    rc, res, err = _cli(capsys, ["jax2torch", "--model", name, "--config", "tvr", *_sets(), str(out / "ckpt" /
                                 ("latest" if name != "ms_sl" else "best")), str(dst)])
    assert rc == 0, err
    raw = torch.load(dst, map_location="cpu", pickle_module=ckpt.RESTRICTED, weights_only=False)
    ref = ckpt.load_official(src)
    if name == "ms_sl":
        assert set(raw) == {"model", "model_cfg", "epoch"} and raw["epoch"] == 7
        assert type(raw["model_cfg"]).__name__ == "EasyDict" and raw["model_cfg"].hidden_size == 32
    else:
        assert set(raw) == {"config", "epoch", "model_val", "state_dict", "optimizer"} and raw["epoch"] == 7
        for i, s in ref.optimizer["state"].items():
            assert raw["optimizer"]["state"][i]["step"] == 12
            assert torch.equal(raw["optimizer"]["state"][i]["next_m"], s["next_m"])
            assert torch.equal(raw["optimizer"]["state"][i]["next_v"], s["next_v"])
    back = ckpt.load_official(dst)
    assert list(back.state_dict) == list(ref.state_dict)
    for k, v in ref.state_dict.items():
        assert torch.equal(back.state_dict[k], v), k
    torch_ref.build_model(cfg.model).load_state_dict(back.state_dict, strict=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    twin = torch_ref.build_model(model_config("ms_sl", hidden_size=32, n_heads=2, q_feat_size=TINY_QUERY,
                                             visual_feat_dim=TINY_VISUAL))
    src = tmp_path / "model.ckpt"
    ckpt.save_official(src, "ms_sl", twin.state_dict())
    rc, _, err = _cli(capsys, ["torch2jax", "--model", "gmmformer", "--config", "tvr", *_sets(), str(src),
                               str(tmp_path / "o")])
    assert rc == 2 and err.startswith("error:") and "ms_sl" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, ["torch2jax", "--model", "ms_sl", "--config", "tvr",
                               *_sets(["model.hidden_size=64"]), str(src), str(tmp_path / "o")])
    assert rc == 2 and "query_pos_embed.position_embeddings.weight" in err and "(30, 64)" in err and "(30, 32)" in err
    rc, _, err = _cli(capsys, ["torch2jax", "--model", "ms_sl", "--config", "tvr", str(tmp_path / "nope.ckpt"),
                               str(tmp_path / "o")])
    assert rc == 2 and "nope.ckpt" in err
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
    rc, _, err = _cli(capsys, ["torch2jax", "--model", "ms_sl", "--config", "tvr", str(tmp_path / "junk.ckpt"),
                               str(tmp_path / "o")])
    assert rc == 2 and "junk.ckpt" in err
    rc, _, err = _cli(capsys, ["torch2jax", "--model", "ms_sl", "--config", "tvr", *_sets(), str(src),
                               str(tmp_path / "o"), "--clip-weights", str(src)])  # ms_sl has no frozen CLIP tower
    assert rc == 2 and "--clip-weights" in err and "model.clip" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        convert.main(["--help"])


def test_converted_checkpoint_fine_tunes_and_resumes(tiny_root, tmp_path, capsys):
    """``train --init-from`` starts from the converted parameters; ``train --resume`` on the converted folder
    restores the official BertAdam moments and step (no training step is run: max-steps stops first)."""
    from jaxprvr import train
    from jaxprvr.checkpoint import Checkpoints, abstract_tree
    from tests.conftest import TINY_OVERRIDES

    name = "gmmformer"
    cfg = tiny_config(name, extra=[f"model.visual_feat_dim={TINY_VISUAL}"])
    twin = torch_ref.build_model(cfg.model)
    opt_sd, _ = _official_adam_state(twin, steps=3)
    src = tmp_path / "best.ckpt"
    ckpt.save_official(src, name, twin.state_dict(), epoch=0, model_val=[0, 0, 0, 0, 5.0], optimizer=opt_sd)
    conv = tmp_path / "conv"
    assert _cli(capsys, ["torch2jax", "--model", name, "--config", "tvr", *_sets(), str(src), str(conv)])[0] == 0
    expected = convert.torch_to_flax(name, twin.state_dict())
    expected_opt = convert.optimizer_to_jax(name, opt_sd, expected)
    sets = [a for s in TINY_OVERRIDES for a in ("--set", s)]
    common = ["--config", "tvr", "--model", name, "--data-root", str(tiny_root), "--no-progress", *sets]

    ft = tmp_path / "ft"
    assert train.main([*common, "--out", str(ft), "--init-from", str(conv), "--max-steps", "0"]) == 0
    assert train.main([*common, "--out", str(conv), "--resume", "--max-steps", "3"]) == 0
    capsys.readouterr()
    abstract = abstract_tree(jax.tree.map(np.asarray, expected))
    for run, want_opt in ((ft, None), (conv, expected_opt)):
        ck = Checkpoints(run / "ckpt", slots=("latest",))
        params, opt, meta = ck.restore("latest", abstract, abstract_tree(jax.tree.map(np.asarray, expected_opt))
                                       if want_opt is not None else None)
        ck.close()
        for path, a in convert.flatten(expected).items():
            np.testing.assert_array_equal(np.asarray(convert.flatten(params)[path]), a, err_msg=path)
        if want_opt is not None:
            assert int(opt.count) == 3 and meta["global_step"] == 3 and meta["next_epoch"] == 1
            for path, a in convert.flatten(want_opt.v).items():
                np.testing.assert_array_equal(np.asarray(convert.flatten(opt.v)[path]), a, err_msg=path)


def test_mtm_table_follows_num_mamba_layers():
    """An MTM with 1 Mamba layer per branch converts with the table built for it (model_table), bit-exactly;
    the official 2-layer table names its missing keys."""
    from jaxprvr.config import load_config
    from parity.mtm import make_table

    cfg = load_config("tvr", "mtm", ["model.hidden_size=32", "model.n_heads=2", f"model.q_feat_size={TINY_QUERY}",
                                     f"model.visual_feat_dim={TINY_VISUAL}", "model.num_mamba_layers=1"])
    assert convert.model_table(load_config("tvr", "mtm").model) == "mtm"  # the official count: the registered table
    tab = convert.model_table(cfg.model)
    assert tab == make_table(1)
    twin = torch_ref.build_model(cfg.model)
    sd = twin.state_dict()
    assert [e.torch for e in tab] == list(sd)
    back = convert.flax_to_torch(tab, convert.torch_to_flax(tab, sd))
    assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    with pytest.raises(convert.ConversionError, match="clip_mamba.2.A_log") as ei:
        convert.torch_to_flax("mtm", sd)
    assert all(k.startswith(("clip_mamba.", "frame_mamba.")) for k in ei.value.missing) and not ei.value.unexpected
