"""What a report reads: run folders (``config.json``, ``metrics.jsonl``, ``test_results.json``), the evaluation
outputs of ``python -m jaxprvr.evaluate --save-outputs`` and the facts beside them (official numbers, chance levels).
No plotting here: numpy and the library's own readers only.

Task kinds (how the figures and tables of a run or an evaluation folder are chosen): the module of the
:class:`~jaxprvr.tasks.base.Task` object that trains and evaluates a family (its registry row's ``task_object``):
``prvr``, ``vmr`` (moment retrieval on 2-D proposal maps), ``vmr_detr`` (DETR-style moment retrieval), ``t2v``. An
evaluation folder's kind is read from its files (:data:`MARKERS`); nothing here names a model family."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from jaxprvr.errors import JaxprvrError

KINDS = ("prvr", "vmr", "vmr_detr", "t2v")
SUBMISSION_SUFFIX = "_submission.jsonl"  # vmr_detr: <dataset>_<split>_submission.jsonl (MESMTask.save_outputs)
MARKERS = {"prvr": ("scores.npy", "query_ids.txt", "video_ids.txt"), "vmr": ("predictions.json",),
           "t2v": ("sim.npy", "ids.json")}


# ---------------------------------------------------------------------------------------------- files
def read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JaxprvrError(path, what, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JaxprvrError(path, what, f"an unreadable file ({e})") from None
    except json.JSONDecodeError as e:
        raise JaxprvrError(path, what, f"invalid JSON ({e.msg}, line {e.lineno})") from None


def read_jsonl(path: Path) -> list[dict]:
    """A run's ``metrics.jsonl``: :func:`jaxprvr.metrics.moments.load_jsonl` (an empty file allowed), each row an
    object; a bad line is an error naming ``path:line``."""
    from jaxprvr.metrics.moments import load_jsonl

    try:
        rows = load_jsonl(path, allow_empty=True)
    except UnicodeDecodeError as e:  # load_jsonl reports OSError only
        raise JaxprvrError(path, "a readable jsonl file", str(e)) from None
    for i, row in enumerate(rows, 1):  # load_jsonl refuses blank lines before the last row: row i is line i
        if not isinstance(row, dict):
            raise JaxprvrError(f"{path}:{i}", "one JSON object per line", type(row).__name__)
    return rows


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """A training run folder as :mod:`jaxprvr.train` writes it."""

    path: Path
    name: str
    config: dict
    steps: list = field(default_factory=list)  # the per-step log records (they hold "step")
    vals: list = field(default_factory=list)  # one record per validation ("split": "val")
    results: dict = field(default_factory=dict)  # split -> test metrics (test_results.json, else metrics.jsonl)
    results_source: str = ""

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name", ""))

    @property
    def dataset(self) -> str:
        return str(self.config.get("data", {}).get("dataset", ""))

    @property
    def kind(self) -> str | None:
        return kind_of_model(self.model)


def kind_of_model(name: str) -> str | None:
    """The report kind of a model name: the module of its registry row's Task object (``jaxprvr.tasks.vmr_detr``
    -> ``vmr_detr``); ``None`` for a name outside the registry or a task the report does not draw."""
    from jaxprvr import registry

    if name not in registry.FAMILIES:
        return None
    kind = type(registry.FAMILIES[name].task_instance()).__module__.rsplit(".", 1)[-1]
    return kind if kind in KINDS else None


def families_of_kind(kind: str) -> list[str]:
    """The registry's model names whose report kind is ``kind``, in registry order."""
    from jaxprvr import registry

    return [n for n in registry.FAMILIES if kind_of_model(n) == kind]


def slug(kind: str) -> str:
    """A kind as it appears in the report's file names (``vmr_detr`` -> ``vmr-detr``: one ``_`` between the parts
    of ``eval<i>_<kind>_<figure>.png``)."""
    return kind.replace("_", "-")


def _split_results(obj: dict) -> dict:
    """``test_results.json``: one split's metrics (with ``"split"``) or ``{split: metrics}`` for several."""
    if obj and all(isinstance(v, dict) and "split" in v for v in obj.values()):
        return dict(obj)
    return {str(obj.get("split", "test")): obj}


def load_run(path) -> Run:
    p = Path(path)
    if not p.is_dir():
        raise JaxprvrError(p, "a run folder (config.json, metrics.jsonl, test_results.json)",
                           "no such folder" if not p.exists() else "a file")
    cfg_path, log_path, res_path = p / "config.json", p / "metrics.jsonl", p / "test_results.json"
    if not cfg_path.exists() and not log_path.exists():
        raise JaxprvrError(p, "a run folder of python -m jaxprvr.train (config.json, metrics.jsonl)", "neither file")
    config = read_json(cfg_path, "the run's config (JSON)") if cfg_path.exists() else {}
    if not isinstance(config, dict):
        raise JaxprvrError(cfg_path, "a JSON object (the run's config)", type(config).__name__)
    rows = read_jsonl(log_path) if log_path.exists() else []
    run = Run(p, p.resolve().name, config)
    run.steps = [r for r in rows if "step" in r and "split" not in r]
    run.vals = [r for r in rows if r.get("split") == "val"]
    if res_path.exists():
        obj = read_json(res_path, "the test metrics (JSON)")
        if not isinstance(obj, dict):
            raise JaxprvrError(res_path, "a JSON object (test metrics)", type(obj).__name__)
        run.results, run.results_source = _split_results(obj), "test_results.json"
    else:
        tests = [r for r in rows if r.get("split") == "test"]
        if tests:
            run.results = {str(r.get("eval_split", "test")): r for r in tests}
            run.results_source = "metrics.jsonl"
    return run


def unique_names(paths) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell equal names apart."""
    paths = [Path(p).resolve() for p in paths]
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in paths):
            return names
        depth += 1


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(runs: list[Run]) -> list[str]:
    """The ``section.field`` keys whose values differ between the runs' configs (a missing key counts)."""
    if len(runs) < 2:
        return []
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = object()
    return [k for k in keys if len({json.dumps(f.get(k, missing), default=str) for f in flat}) > 1]


def run_labels(runs: list[Run], diff: list[str], max_fields: int = 4) -> list[str]:
    """Legend labels: the run's name and its values of the differing config fields."""
    labels = []
    for r in runs:
        flat = flatten(r.config)
        parts = [f"{k}={flat.get(k, '-')}" for k in diff[:max_fields]]
        more = ", ..." if len(diff) > max_fields else ""
        labels.append(r.name + (f" ({', '.join(parts)}{more})" if parts else ""))
    return labels


# ---------------------------------------------------------------------------------------------- evaluation folders
@dataclass
class EvalDir:
    """One folder of evaluation outputs (``python -m jaxprvr.evaluate ... --save-outputs DIR``)."""

    path: Path
    kind: str
    name: str
    config: dict  # the config of the run it sits in ({} if none is found)
    submission: Path | None = None  # vmr_detr: the submission file


def eval_kind(path: Path) -> tuple[str, Path | None] | None:
    for kind, files in MARKERS.items():
        if all((path / f).is_file() for f in files):
            return kind, None
    subs = sorted(path.glob(f"*{SUBMISSION_SUFFIX}"))
    if subs:
        return "vmr_detr", subs[0]
    return None


def _config_above(path: Path) -> dict:
    """The ``config.json`` of the run folder holding ``path`` (itself or up to two levels up)."""
    for p in (path, *list(path.resolve().parents)[:2]):
        if (p / "config.json").is_file():
            cfg = read_json(p / "config.json", "a run's config (JSON)")
            return cfg if isinstance(cfg, dict) else {}
    return {}


def open_eval(path, name: str | None = None) -> EvalDir:
    p = Path(path)
    if not p.is_dir():
        raise JaxprvrError(p, "a folder of evaluation outputs (--save-outputs of python -m jaxprvr.evaluate)",
                           "no such folder" if not p.exists() else "a file")
    found = eval_kind(p)
    if found is None:
        raise JaxprvrError(p, "evaluation outputs: scores.npy + query_ids.txt + video_ids.txt (PRVR), "
                              "predictions.json (moment retrieval, proposal maps), "
                              "<dataset>_<split>_submission.jsonl (moment retrieval, DETR-style) or sim.npy + ids.json "
                              "(text-video)", "none of them")
    kind, sub = found
    return EvalDir(p, kind, name or p.resolve().name, _config_above(p), sub)


def eval_config(ev: EvalDir, dataset: str | None = None):
    """The :class:`jaxprvr.config.Config` of an evaluation folder: its run's saved config
    (:func:`jaxprvr.api.config_from_dict`; ``dataset``: the outputs' own dataset where it is not the run's). Only
    without a saved config (``{}``): the config file of ``dataset`` for the first registry family of the folder's
    kind."""
    from jaxprvr.api import config_from_dict
    from jaxprvr.config import load_config

    if ev.config:
        saved = ev.config
        if dataset and (saved.get("data") or {}).get("dataset") != dataset:
            saved = {**saved, "data": {**(saved.get("data") or {}), "dataset": dataset}}
        return config_from_dict(saved, where=f"{ev.path} (the config of its run)")
    if not dataset:
        raise JaxprvrError(ev.path, "a run config (config.json in the folder or up to two levels up)", "none")
    return load_config(dataset, families_of_kind(ev.kind)[0])


def evals_in_run(run: Run) -> list[Path]:
    """The evaluation folders a run holds: the run folder itself and its sub-folders (``ckpt`` aside)."""
    cands = [run.path] + sorted(c for c in run.path.iterdir() if c.is_dir() and c.name != "ckpt")
    return [c for c in cands if eval_kind(c) is not None]


# ---------------------------------------------------------------------------------------------- metric tables
def _prvr_keys(res: dict) -> list[str]:
    return [k for k in ("r1", "r5", "r10", "r100", "sumr", "medr", "meanr") if is_number(res.get(k))]


def _vmr_keys(res: dict) -> list[str]:
    return [k for k in res if re.fullmatch(r"R\d+@[\d.]+", k) or k == "mIoU"]


def _vmr_detr_keys(res: dict) -> list[str]:
    return [k for k in res if (k.startswith("MR-full-") or k.startswith("HL-min-")) and is_number(res[k])]


def _t2v_keys(res: dict) -> list[str]:
    return [f"{d}/{m}" for d in ("t2v", "v2t") for m in ("R1", "R5", "R10", "R50", "MdR", "MnR")
            if is_number(res.get(f"{d}/{m}"))]


# kind -> (metric keys of a result dict, chance key of a metric, scale to the printed unit)
TABLES = {
    "prvr": (_prvr_keys, lambda k: "chance_sumr" if k == "sumr" else None, 1.0),
    "vmr": (_vmr_keys, lambda k: f"chance_{k}" if k.startswith("R1@") else None, 100.0),
    "vmr_detr": (_vmr_detr_keys, lambda k: ("chance_" + k[len("MR-full-"):]) if k.startswith("MR-full-R1@") or
             k == "MR-full-miou" else None, 1.0),
    "t2v": (_t2v_keys, lambda k: "chance_t2v/R1" if k == "t2v/R1" else None, 1.0),
}


def computed_chance(kind: str, res: dict) -> dict:
    """The chance levels a run prints, computed with the function its task uses where the results lack them."""
    if kind == "prvr" and "chance_sumr" not in res and is_number(res.get("n_videos")):
        from jaxprvr.metrics.prvr import chance_sumr

        return {"chance_sumr": chance_sumr(int(res["n_videos"]))}
    if kind == "t2v" and "chance_t2v/R1" not in res and is_number(res.get("n_video")):
        from jaxprvr.metrics.t2v import chance_t2v_r1

        return {"chance_t2v/R1": chance_t2v_r1(int(res["n_video"]))}
    return {}


@dataclass
class Row:
    metric: str
    value: float | None
    official: float | None
    chance: float | None
    chance_computed: bool = False


def metric_rows(kind: str, res: dict, official: dict | None = None) -> list[Row]:
    """The final-metrics table of one split: the metric, its official number (if the config has one) and chance,
    in the unit the run prints (``vmr``'s fractions as percentages)."""
    keys_of, chance_of, scale = TABLES[kind]
    extra = computed_chance(kind, res)
    rows = []
    for k in keys_of(res):
        v = res.get(k)
        ck = chance_of(k)
        c = res.get(ck) if ck else None
        computed = False
        if ck and c is None and ck in extra:
            c, computed = extra[ck], True
        rows.append(Row(k, None if v is None else float(v) * scale, (official or {}).get(k),
                        None if c is None else float(c) * scale, computed))
    return rows


# ---------------------------------------------------------------------------------------------- official numbers
_PRVR_NAMES = {"SumR": "sumr"}


def _metric_name(kind: str, token: str) -> str | None:
    m = re.fullmatch(r"R@(\d+)", token)
    if kind == "prvr":
        return f"r{m.group(1)}" if m else _PRVR_NAMES.get(token)
    if kind == "t2v":
        if m:
            return f"t2v/R{m.group(1)}"
        return {"MdR": "t2v/MdR", "MnR": "t2v/MnR"}.get(token)
    return None


def parse_official(numbers: str, what: str, kind: str) -> dict:
    """``{metric key: value}`` of the official numbers a config quotes (:func:`jaxprvr.modelcard.official_numbers`):
    PRVR's ``a / b / c / d / e`` under the names ``R@1 / R@5 / R@10 / R@100 / SumR`` that end ``what``, or named
    values in the text (``t2v R@1 46.6 (R@5 73.4, R@10 83.5, MdR 2, MnR 13.0)``)."""
    out = {}
    if "/" in numbers and "/" in what:
        names = [n.strip() for n in what.split(",")[-1].split("/")]
        for n, v in zip(names, numbers.split("/")):
            key = _metric_name(kind, n)
            if key is not None and re.fullmatch(r"[0-9.]+", v.strip()):
                out[key] = float(v)
        return out
    for token, v in re.findall(r"(R@\d+|MdR|MnR) ([0-9]+(?:\.[0-9]+)?)", numbers):
        key = _metric_name(kind, token)
        if key is not None:
            out[key] = float(v)
    return out


def official_numbers(model: str, dataset: str) -> tuple[dict, str]:
    """``({metric key: value}, the quoted sentence)`` of ``configs/<model>/<dataset>.py`` (``({}, "")``: none)."""
    from jaxprvr.modelcard import official_numbers as quoted

    kind = kind_of_model(model)
    if not model or not dataset or kind is None:
        return {}, ""
    try:
        numbers, what = quoted(model, dataset)
    except ModuleNotFoundError:
        return {}, ""
    if not numbers:
        return {}, ""
    return parse_official(numbers, what, kind), f"{what}: {numbers}"


def sample_indices(n: int, samples: int, seed: int):
    """``min(samples, n)`` distinct indices of ``range(n)``, drawn by ``np.random.default_rng(seed)``, sorted."""
    import numpy as np

    k = max(0, min(int(samples), n))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)
