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


def _real_count(cfg) -> int:
    from jaxprvr.models import build_model
    from jaxprvr.tasks import task_for

    model, batch = build_model(cfg.model), task_for(cfg).dummy_batch(cfg)
    variables = jax.jit(lambda k: model.init({"params": k}, batch, train=False))(jax.random.PRNGKey(0))
    return sum(int(np.asarray(x).size) for x in jax.tree_util.tree_leaves(variables["params"]))


def test_param_count_equals_a_real_init():
    """The traced count of a tiny MS-SL equals the element count of its really initialised parameters; a model
    two units wider (the mutant) has another count."""
    cfg = tiny_config("ms_sl")
    assert param_count(cfg) == _real_count(cfg)
    assert param_count(tiny_config("ms_sl", extra=["model.hidden_size=34"])) != param_count(cfg)
