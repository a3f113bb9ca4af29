"""parity.check: the official-size forward parity per model, the full table on a tiny model, and that a
wrong weight makes it fail."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jaxprvr.config import load_config
from parity import check, convert
from tests.conftest import TINY_QUERY, TINY_VISUAL
import torch_ref

TINY = ["model.hidden_size=32", "model.n_heads=2", f"model.q_feat_size={TINY_QUERY}",
        f"model.visual_feat_dim={TINY_VISUAL}", "data.eval_context_bsz=64", "data.eval_query_bsz=64"]


@pytest.mark.parametrize("name", ["ms_sl", "gmmformer", "gmmformer_v2"])
def test_official_size_forward_blocks_and_losses(name):
    """TVR dims (3072 / 768 -> 384, 4 heads), the official init: conversion, every block, every score and aux
    stage, every loss term."""
    cfg = load_config("tvr", name)
    rows = check.run_check(cfg, n_videos=3, groups=("convert", "block", "model", "loss"))
    failed = [r for r in rows if not r.passed]
    assert not failed, check.format_table(failed)
    stages = {r.stage for r in rows}
    with torch.no_grad():
        _, taux = torch_ref.build_model(cfg.model)(check.make_batch(cfg.model, 3), train=False)
    assert {f"aux[{k}]" for k in taux} <= stages  # every named stage is compared
    assert {f"scores[{k}]" for k in ("clip", "clip_raw", "frame", "frame_raw")} <= stages
    n_blocks = {"ms_sl": 9, "gmmformer": 11, "gmmformer_v2": 8}[name]
    blocks = [r.stage for r in rows if r.group == "block"]
    assert len(blocks) == 2 * n_blocks  # at the official init and on perturbed weights (biases, LayerNorms)
    assert sum(s.endswith(" [perturbed]") for s in blocks) == n_blocks
    assert {f"aux[{k}] [perturbed]" for k in taux} <= stages


def test_cli_prints_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--model", "ms_sl", "--config", "tvr", "--json", str(out), "--videos", "3"]
    for s in TINY:
        argv += ["--set", s]
    rc = check.main(argv)
    text = capsys.readouterr().out
    assert rc == 0, text
    rows = json.loads(out.read_text())["rows"]
    assert {r["group"] for r in rows} == {"convert", "block", "model", "loss", "grad", "train", "dropout", "metrics"}
    assert all(set(r) == {"group", "stage", "max_abs", "max_rel", "tolerance", "passed", "note"} for r in rows)
    assert all(r["passed"] for r in rows)
    assert text.count("| PASS |") == len(rows) and f"{len(rows)}/{len(rows)} PASS" in text


def test_a_wrong_weight_fails(monkeypatch, capsys):
    real = convert.torch_to_flax

    def off_by_a_little(name, sd, where="state_dict"):
        params = real(name, sd, where)
        k = params["query_encoder"]["self"]["value"]["kernel"]
        params["query_encoder"]["self"]["value"]["kernel"] = k + np.float32(1e-3) * np.sign(k)
        return params

    monkeypatch.setattr(convert, "torch_to_flax", off_by_a_little)
    argv = ["--model", "ms_sl", "--config", "tvr", "--groups", "block,model"]
    for s in TINY:
        argv += ["--set", s]
    assert check.main(argv) == 1
    text = capsys.readouterr().out
    failing = [line for line in text.splitlines() if line.endswith("| FAIL |")]
    assert any("query_encoder" in line for line in failing)
    assert not any("query input_proj" in line for line in failing)  # upstream of the wrong weight: still equal


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert check.main(["--model", "ms_sl", "--config", "tvr", "--groups", "blocks"]) == 2
    assert "--groups" in capsys.readouterr().err
    assert check.main(["--model", "ms_sl", "--config", "tvr", "--ckpt", str(tmp_path / "none.ckpt")]) == 2
    assert "none.ckpt" in capsys.readouterr().err
