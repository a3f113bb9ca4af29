"""The models page (``python -m jaxprvr.train --list --markdown``, docs/models.md): current, complete, and its
parameter counts equal to a real initialisation's.

The page traces every config's model once (about 10 s of CPU): its checks share one test, so that xdist never
runs that trace on both workers."""

import importlib
import pathlib
import re

import jax
import numpy as np

from jaxprvr import registry
from jaxprvr.config import configs_of, load_config
from jaxprvr.modelcard import official_numbers, param_count
from tests.conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "models.md"


def _rows(text: str) -> list[list[str]]:
    """The body rows of every table of the page, as cell lists (``\\|`` inside a cell is not a separator)."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model |")]


def test_the_page_is_current_complete_and_read_from_its_sources(capsys):
    from jaxprvr.train import main

    assert main(["--list", "--markdown"]) == 0
    page = capsys.readouterr().out
    # 1. docs/models.md is exactly what the command prints now
    assert DOC.read_text() == page, "docs/models.md is stale: python -m jaxprvr.train --list --markdown > docs/models.md"

    # 2. one row per (family, config file), every registry family, its checkpoint format and parity status on its
    # first row, one table (heading) per task
    rows = _rows(page)
    assert [r[1].strip("`") for r in rows] == [f"{n}/{d}" for n in registry.names() for d in configs_of(n)]
    assert {r[0] for r in rows} == {f.label for f in registry.FAMILIES.values()}
    for name, fam in registry.FAMILIES.items():
        assert fam.checkpoint_format and fam.parity_status, name
        first = next(r for r in rows if r[1] == f"`{name}/{configs_of(name)[0]}`")
        assert first[4:6] == [fam.checkpoint_format.replace("|", "\\|"), fam.parity_status.replace("|", "\\|")]
    heads = [line[3:] for line in page.splitlines() if line.startswith("## ")]
    assert len(heads) == len({f.task for f in registry.FAMILIES.values()}) == 3

    # 3. the numbers, re-read from their sources
    by_cfg = {r[1].strip("`"): r for r in rows}
    assert by_cfg["ms_sl/tvr"][2].endswith(f"({param_count(load_config('ms_sl/tvr')):,})")
    # the exact count and the rounded one agree
    exact = int(by_cfg["mtm/tvr"][2].split("(")[1].rstrip(")").replace(",", ""))
    assert by_cfg["mtm/tvr"][2].startswith(f"{exact / 1e6:.1f} M")
    # official numbers: the docstring's sentence, split here by hand
    doc = importlib.import_module("configs.gmmformer_v2.act").__doc__
    line = next(x for x in doc.splitlines() if x.startswith("Official test numbers"))
    assert by_cfg["gmmformer_v2/act"][3] == line.split("): ", 1)[1].rstrip(".") == "8.9 / 27.1 / 40.2 / 78.7 / 154.9"
    assert by_cfg["mrnet/tacos"][3] == "-" and official_numbers("mrnet", "tacos") == ("", "")

    # mutant: the page with one count changed is not the file
    cell = by_cfg["ms_sl/tvr"][2]
    assert page.count(cell) == 1 and page.replace(cell, f"{cell[:-2]}9)") != DOC.read_text()


def _real_counts(cfg) -> dict[str, int]:
    """The element count of every collection of a real initialisation (``params``, ``batch_stats``, ...). The
    values do not matter: an rbg key compiles the init about twice as fast as threefry."""
    from jaxprvr.models import build_model
    from jaxprvr.tasks import task_for

    model, batch = build_model(cfg.model), task_for(cfg).dummy_batch(cfg)
    key = jax.random.key(0, impl="unsafe_rbg")
    variables = jax.jit(lambda k: model.init({"params": k}, batch, train=False))(key)
    return {c: sum(int(np.asarray(x).size) for x in jax.tree_util.tree_leaves(v)) for c, v in variables.items()}


def _real_count(cfg) -> int:
    return _real_counts(cfg)["params"]


def _twin_count(cfg) -> tuple[int, int]:
    """``(parameters, buffers)`` of the family's PyTorch twin (torch_ref: the official module tree, where BatchNorm
    statistics are buffers and MESM's text encoder is kept outside the tree)."""
    from torch_ref import build_model

    twin = build_model(cfg.model)
    return sum(p.numel() for p in twin.parameters()), sum(b.numel() for b in twin.buffers())


MRNET_TINY = ["model.joint_space=16", "model.n_heads=4", "model.featpool_hidden=16", "model.predictor_hidden=8",
              "model.ffn_dim=32", "model.input_size=24", "model.text_dim=20", "model.num_pre_clips=32",
              "model.num_clips=16", "model.featpool_kernel=2", "model.pooling_counts=(7,4)",
              "model.predictor_kernel=3", "model.predictor_layers=2", "model.trans_layers=1"]
MESM_TINY = ["data.feat_dims=(16,16)", "model.hidden_dim=16", "model.nheads=2", "model.dim_feedforward=32",
             "model.clip_width=16", "model.clip_layers=1", "model.clip_heads=2", "model.t_feat_dim=16",
             "model.num_recfw_layers=1", "model.t2v_layers=1", "model.enc_layers=1", "model.num_recss_layers=1"]


def test_param_count_equals_a_real_init():
    """The traced count of a tiny MS-SL equals the element count of its really initialised parameters; a model
    two units wider (the mutant) has another count."""
    cfg = tiny_config("ms_sl")
    assert param_count(cfg) == _real_count(cfg)
    assert param_count(tiny_config("ms_sl", extra=["model.hidden_size=34"])) != param_count(cfg)


def test_param_count_leaves_out_batchnorm_statistics_and_the_frozen_text_tower():
    """MRNet: the page's count is a real init's ``params`` and the PyTorch twin's parameters, the BatchNorm
    statistics (``batch_stats``; buffers in torch) left out. MESM: the twin's parameters (its text encoder outside
    the module tree; a real MESM init compiles for about 10 s, too long here), and the text tower's depth does not
    change the count."""
    mrnet = load_config("activitynet", "mrnet", MRNET_TINY)
    real = _real_counts(mrnet)
    twin, buffers = _twin_count(mrnet)
    assert param_count(mrnet) == real["params"] == twin
    assert real["batch_stats"] > 0 and buffers >= real["batch_stats"]  # present, and not counted
    mesm = load_config("charades", "mesm", MESM_TINY)
    assert param_count(mesm) == _twin_count(mesm)[0]
    assert param_count(load_config("charades", "mesm", MESM_TINY + ["model.clip_layers=3"])) == param_count(mesm)
