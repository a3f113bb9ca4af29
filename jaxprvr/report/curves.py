"""Curves of one or several runs from their ``metrics.jsonl``: every logged loss term, the learning rate(s), the
throughput (per step) and the validation metrics (per epoch), runs overlaid.

The trainer's per-step record is ``{step, epoch, lr, lr_<group>..., <phase flags>, <items>_per_s, loss,
grad_norm, <the task's loss terms>}`` and its validation record ``{epoch, split: "val", [eval_split], improved,
<metrics>, n_*, seconds, ...}`` (:mod:`jaxprvr.train`). :func:`curve_series` sorts them into figures; the figures
draw exactly those series (one panel per key, one line per run)."""

from __future__ import annotations

import math

from jaxprvr.report.figures import grid, plain, save
from jaxprvr.report.runs import Run, is_number

FIGURES = {"train_loss": "loss terms (per step)", "train_lr": "learning rates (per step)",
           "train_throughput": "throughput (per step)", "val": "validation metrics (per epoch)"}
_VAL_SKIP = {"epoch", "improved", "seconds", "topk", "split", "eval_split", "protocol"}


def step_group(key: str) -> str | None:
    if key in ("step", "epoch"):
        return None
    if key == "lr" or key.startswith("lr_"):
        return "train_lr"
    if key.endswith("_per_s"):
        return "train_throughput"
    return "train_loss"


def _val_metric(key: str) -> bool:
    return not (key in _VAL_SKIP or key.startswith(("n_", "data_", "chance_")) or "/n_" in key)


def _num(v) -> float:
    return float(v) if is_number(v) else math.nan


def curve_series(runs: list[Run], labels: list[str]) -> dict:
    """``{figure: {key: [(label, xs, ys), ...]}}`` for the figures of :data:`FIGURES` (x = step, or epoch for
    ``val``); a record without the key gives no point, a non-numeric value NaN (a gap). Validation records of a
    run with several selection splits give one line per split, labelled ``label [split]``."""
    out = {f: {} for f in FIGURES}
    for run, label in zip(runs, labels):
        keys = list(dict.fromkeys(k for r in run.steps for k, v in r.items() if is_number(v)))
        for key in keys:
            group = step_group(key)
            if group is None:
                continue
            pts = [(r["step"], _num(r[key])) for r in run.steps if key in r and is_number(r.get("step"))]
            if pts:
                out[group].setdefault(key, []).append((label, [p[0] for p in pts], [p[1] for p in pts]))
        splits = list(dict.fromkeys(r.get("eval_split") for r in run.vals))
        for split in splits:
            recs = [r for r in run.vals if r.get("eval_split") == split]
            name = label if split is None else f"{label} [{split}]"
            keys = list(dict.fromkeys(k for r in recs for k, v in r.items() if is_number(v) and _val_metric(k)))
            for key in keys:
                pts = [(r["epoch"], _num(r[key])) for r in recs if key in r and is_number(r.get("epoch"))]
                if pts:
                    out["val"].setdefault(key, []).append((name, [p[0] for p in pts], [p[1] for p in pts]))
    if "loss" in out["train_loss"]:  # the total first
        out["train_loss"] = {"loss": out["train_loss"].pop("loss"), **out["train_loss"]}
    return {f: s for f, s in out.items() if s}


def _chance_lines(runs, labels) -> dict:
    """``{key: [(label, chance)]}``: the chance levels logged beside validation metrics (``chance_<key>``)."""
    out = {}
    for run, label in zip(runs, labels):
        for r in run.vals[-1:]:
            for k, v in r.items():
                if k.startswith("chance_") and is_number(v):
                    out.setdefault(k[len("chance_"):], []).append((label, float(v)))
    return out


def curve_figures(runs: list[Run], labels: list[str], series: dict | None = None) -> list[tuple[str, object, str]]:
    """``[(figure name, Figure, caption)]``: one panel per key of :func:`curve_series`, one line per run (dashed:
    a further selection split of the run), the runs' legend above the panels; dotted: a logged chance level."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    series = curve_series(runs, labels) if series is None else series
    chance = _chance_lines(runs, labels)
    colors = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    figs = []
    for name, panels in series.items():
        keys = list(panels)
        legend_h = 0.22 * len(labels) + 0.1
        fig, axes = grid(len(keys), 4, 3.2, 2.4, top=legend_h)
        for ax, key in zip(axes, keys):
            for label, xs, ys in panels[key]:
                base = label.split(" [", 1)[0]
                ax.plot(xs, ys, color=colors.get(base), marker="o" if len(xs) < 30 else None, markersize=3,
                        linewidth=1.2, label=plain(label), linestyle="-" if base == label else "--")
            for label, c in chance.get(key, []) if name == "val" else []:
                ax.axhline(c, color=colors.get(label), linestyle=":", linewidth=1.0, label=plain(f"chance ({label})"))
            ax.set_title(plain(key), fontsize=9)
            ax.set_xlabel("epoch" if name == "val" else "step", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        handles = [Line2D([], [], color=colors[lab], linewidth=2) for lab in labels]
        fig.legend(handles, [plain(lab) for lab in labels], loc="upper left", fontsize=7, frameon=False,
                   bbox_to_anchor=(0.0, 1.0))
        figs.append((name, fig, FIGURES[name]))
    return figs


def render(runs: list[Run], labels: list[str], out_dir, prefix: str = "curves") -> list:
    return [save(fig, out_dir, f"{prefix}_{name}.png", caption.capitalize(), caption)
            for name, fig, caption in curve_figures(runs, labels)]
