"""The family registry and the task seam: one list of models, generic drivers that never name one."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

from jaxprvr import registry
from jaxprvr.config import configs_of, load_config
from jaxprvr.errors import JaxprvrError

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERIC = ("jaxprvr/train.py", "jaxprvr/evaluate.py", "parity/check.py", "parity/convert.py")


def _family_literals(source: str) -> list[str]:
    """The string literals of ``source`` that are (or start with) a family name."""
    names = set(registry.names())
    consts = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return sorted(s for s in consts if s in names or any(s.startswith(n + "/") for n in names))


@pytest.mark.parametrize("path", GENERIC)
def test_generic_drivers_name_no_family(path):
    """No string literal of the generic loop, evaluator or parity drivers is (or starts with) a family name."""
    hits = _family_literals((ROOT / path).read_text())
    assert not hits, f"{path} names families {hits}: that knowledge belongs to the registry row, task or spec"


def test_family_literal_check_catches_a_planted_branch():
    planted = (ROOT / "jaxprvr/train.py").read_text() + '\nif cfg.model.name == "mtm":\n    pass\n'
    assert _family_literals(planted) == ["mtm"]


def test_train_and_evaluate_do_not_import_each_other_both_ways():
    def imports(path):
        tree = ast.parse((ROOT / path).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "jaxprvr.evaluate" not in imports("jaxprvr/train.py")
    assert "jaxprvr.config" not in {m for m in imports("configs/__init__.py")}


@pytest.mark.parametrize("name", registry.names())
def test_every_row_resolves(name):
    """Each row's classes, task and parity spec import and agree with each other."""
    row = registry.get(name)
    assert row.model_config().name == name  # the config type's default name is the row's
    assert row.task_instance().name == row.task
    spec = row.parity_module().SPEC
    assert spec.name == name and len(spec.table) > 0
    assert row.model_class().__name__ == row.twin.split(":")[1]  # Flax model and twin share the class name
    assert configs_of(name), f"{name} has no configs/{name}/*.py"
    for ds in configs_of(name):
        cfg = load_config(ds, name)
        assert isinstance(cfg.model, row.model_config) and isinstance(cfg.loss, row.loss_config)


def test_unknown_model_lists_the_registry():
    with pytest.raises(JaxprvrError) as e:
        registry.get("clip4clip")
    assert all(n in str(e.value) for n in registry.names())


def test_train_list_prints_the_config_table():
    r = subprocess.run([sys.executable, "-m", "jaxprvr.train", "--list"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{"):])
    rows = {row["config"]: row for row in out["configs"]}
    assert rows["tvr"]["default"] == registry.DEFAULT_MODEL["tvr"]
    assert set(rows["cha"]["models"]) == {n for n in registry.names() if "cha" in configs_of(n)}
    assert "| tvr | prvr |" in r.stdout


def test_mismatched_config_and_model_is_one_line():
    r = subprocess.run([sys.executable, "-m", "jaxprvr.train", "--config", "nonexistent_ds", "--demo"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tvr" in r.stderr  # the error lists the datasets
