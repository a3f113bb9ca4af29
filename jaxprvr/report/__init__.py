"""Run reports with plots: ``python -m jaxprvr.report RUN [RUN ...] --out DIR`` (docs/report.md).

``DIR/index.html`` is one self-contained page (inline CSS, no script, nothing fetched) showing PNGs written beside
it, each with its pixel size stated:

* the curves of every ``RUN/metrics.jsonl`` (:mod:`jaxprvr.report.curves`): each loss term, the learning rate(s),
  the throughput, the validation metrics per epoch; several runs overlaid, the legend naming each run and its
  values of the config fields that differ between the runs (``RUN/config.json``);
* each run's final metrics (``RUN/test_results.json``, else the test records of ``metrics.jsonl``) beside the
  official numbers its config quotes (``configs/<model>/<dataset>.py``) and the chance level the run printed
  (computed with the task's function where the results lack it);
* per task, from the outputs of ``python -m jaxprvr.evaluate ... --save-outputs DIR`` (``--eval DIR``, or found
  in a run folder or its sub-folders): PRVR's R@K curve and rank histogram (:mod:`~jaxprvr.report.prvr`), moment
  retrieval's timelines of ground truth and top-5 moments and MRNet's 2-D score maps
  (:mod:`~jaxprvr.report.moments`), text-video retrieval's top-5 videos of sampled captions as middle frames
  (:mod:`~jaxprvr.report.t2v`).

matplotlib is optional (``pip install jaxprvr[report]``), imported only here and only when a report is drawn:
the trainer never imports it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

__all__ = ["build_report"]

# report kinds (jaxprvr.report.runs: the module of a family's Task object) as the page names them
KIND_NAMES = {"prvr": "PRVR", "vmr": "moment retrieval (2-D proposal maps)",
              "vmr_detr": "moment retrieval (DETR-style)", "t2v": "text-video", "other": "other models"}


def _renderers():
    from jaxprvr.report import moments, prvr, t2v

    return {"prvr": prvr.render, "vmr": moments.render_vmr, "vmr_detr": moments.render_vmr_detr, "t2v": t2v.render}


def build_report(runs=(), out="report", *, evals=(), samples: int = 8, seed: int = 0, data_root=None,
                 demo: bool = False, command: str = "") -> dict:
    """Writes ``out/index.html`` and its PNGs; returns a summary (the files, their sizes, what was counted)."""
    from jaxprvr.errors import JaxprvrError
    from jaxprvr.report import curves
    from jaxprvr.report import html as H
    from jaxprvr.report.figures import mpl
    from jaxprvr.report.runs import (EvalDir, config_differences, evals_in_run, flatten, load_run, metric_rows,
                                     official_numbers, open_eval, run_labels, slug, unique_names)

    mpl()  # before any work: without matplotlib, the one-line hint
    if not runs and not evals:
        raise JaxprvrError("python -m jaxprvr.report", "at least one RUN folder or --eval DIR", "neither")
    if int(samples) < 0:
        raise JaxprvrError("--samples", "a count >= 0", repr(samples))
    loaded = [load_run(r) for r in runs]
    for r, name in zip(loaded, unique_names([r.path for r in loaded])):
        r.name = name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections, shown_all, diffs = [], [], {}

    # -- runs, grouped by task: a group's runs are overlaid and compared
    groups: dict[str, list] = {}
    for r in loaded:
        groups.setdefault(r.kind or "other", []).append(r)
    if loaded:
        rows = [[H.esc(r.name), H.esc(r.path), H.esc(r.model or "?"), H.esc(r.dataset or "?"), str(len(r.steps)),
                 str(len(r.vals)), H.esc(r.results_source or "none")] for r in loaded]
        sections.append(("Runs", H.table(["run", "folder", "model", "dataset", "step records", "validations",
                                          "test results"], rows, 4)))
        body = ""
        for kind, group in groups.items():
            diff = diffs[kind] = config_differences(group)
            body += f"<h3>{H.esc(KIND_NAMES.get(kind, kind))}: {H.esc(', '.join(r.name for r in group))}</h3>"
            if diff:
                flat = [flatten(r.config) for r in group]
                body += "<p>Config fields that differ between these runs:</p>" + H.table(
                    ["field"] + [H.esc(r.name) for r in group],
                    [[H.esc(k)] + [H.esc(f.get(k, "-")) for f in flat] for k in diff], len(group) + 1)
            shown = curves.render(group, run_labels(group, diff), out, f"curves_{slug(kind)}")
            shown_all += shown
            body += "".join(H.figure(x) for x in shown) or '<p class="muted">No records in metrics.jsonl.</p>'
        sections.append(("Training curves", body))

        # -- final metrics
        body = ""
        for r in loaded:
            body += f"<h3>{H.esc(r.name)}</h3>"
            if not r.results:
                body += '<p class="muted">No test results in this run (test_results.json).</p>'
                continue
            if r.kind is None:
                body += f'<p class="muted">Unknown model {H.esc(r.model)!s}: no table.</p>'
                continue
            official, source = official_numbers(r.model, r.dataset)
            computed = False
            for split, res in r.results.items():
                table_rows = metric_rows(r.kind, res, official if split == "test" else None)
                computed = computed or any(row.chance_computed for row in table_rows)
                body += f"<p>split <code>{H.esc(split)}</code> ({H.esc(r.results_source)})</p>"
                body += H.metrics_table(table_rows, with_official=bool(official) and split == "test")
            body += (f'<p class="muted">Official: {H.esc(source)} (configs/{H.esc(r.model)}/{H.esc(r.dataset)}.py)'
                     f"</p>" if source else '<p class="muted">The config quotes no official numbers.</p>')
            if computed:
                body += '<p class="muted">* chance computed here with the task\'s function (not saved).</p>'
        sections.append(("Final metrics", body))

    # -- evaluation outputs
    found: list[EvalDir] = []
    for r in loaded:
        for d in evals_in_run(r):
            found.append(open_eval(d, r.name if d == r.path else f"{r.name}/{d.name}"))  # its config: the run's
    seen = {e.path.resolve() for e in found}
    for d in evals:
        if Path(d).resolve() not in seen:
            found.append(open_eval(d))
            seen.add(Path(d).resolve())
    render = _renderers()
    eval_summaries = []
    body = ""
    for i, ev in enumerate(found):
        res = render[ev.kind](ev, out, f"eval{i}_{slug(ev.kind)}", samples=samples, seed=seed, data_root=data_root,
                              demo=demo)
        shown_all += res["figures"]
        body += f"<h3>{H.esc(ev.name)} <span class='muted'>({H.esc(ev.kind)}: {H.esc(ev.path)})</span></h3>"
        body += H.notes(res["notes"])
        rows = metric_rows(ev.kind, res["metrics"]) if res["metrics"] else []
        if rows:
            body += H.metrics_table(rows, with_official=False)
        body += "".join(H.figure(s) for s in res["figures"])
        eval_summaries.append({"path": str(ev.path), "kind": ev.kind, "figures": [s.file for s in res["figures"]],
                               "notes": res["notes"], "unreadable": res.get("unreadable", [])})
    if found:
        sections.append(("Evaluation outputs", body))

    when = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    header = (f'<p class="muted">Written {H.esc(when)}'
              + (f" by <code>{H.esc(command)}</code>" if command else "") + ".</p>")
    H.write(out / "index.html", H.page("jaxprvr report", header, sections))
    return {"out": str(out), "index": str(out / "index.html"), "runs": [r.name for r in loaded],
            "figures": [{"file": s.file, "width": s.width, "height": s.height, "title": s.title} for s in shown_all],
            "evals": eval_summaries, "config_differences": diffs}
