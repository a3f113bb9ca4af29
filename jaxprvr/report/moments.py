"""Moment-retrieval figures for a seeded sample of queries: a timeline of the ground-truth window(s) and the top-5
predicted windows with their scores, and (MRNet) the 2-D score maps.

* MRNet (``--save-predictions DIR``, :func:`jaxprvr.tasks.vmr.save_predictions`): ``predictions.json`` holds per
  query ``vid, query_id, query_rank, duration, gt, pred`` (ranked ``[start, end, score]`` in seconds) and
  ``score_maps.npz`` the ``<vid>/contrastive`` and ``<vid>/iou`` maps (queries in rank order, N x N, zero outside
  the proposal mask; cell (i, j) is the moment ``[i D / N, (j + 1) D / N]``). A window is marked on the map at the
  cell inside the mask of highest IoU with it.
* MESM (:meth:`jaxprvr.tasks.vmr_detr.MESMTask.save_outputs`): ``<dataset>_<split>_submission.jsonl``, the official
  rows ``qid, query, vid, pred_relevant_windows`` (ranked, seconds). They carry neither the ground truth nor the
  duration: with ``--data-root`` (or ``--demo``) both are read from the split's annotation
  (:func:`jaxprvr.data.mesm.read_split`, matched by ``qid``); without, the timelines show the predictions only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.report.figures import grid, plain, save
from jaxprvr.report.runs import SUBMISSION_SUFFIX, read_json, sample_indices

TOP = 5


# ---------------------------------------------------------------------------------------------- MRNet
def load_mrnet(path: Path) -> dict:
    preds = read_json(path / "predictions.json", "MRNet predictions (JSON, python -m jaxprvr.evaluate "
                                                 "--save-predictions)")
    queries = preds.get("queries") if isinstance(preds, dict) else None
    if not isinstance(queries, list) or not queries:
        raise JaxprvrError(path / "predictions.json", "a 'queries' list of ranked moments", "none")
    for i, q in enumerate(queries):
        if not all(k in q for k in ("vid", "duration", "gt", "pred")):
            raise JaxprvrError(f"{path / 'predictions.json'} queries[{i}]", "vid, duration, gt and pred",
                               f"keys {sorted(q)}")
    maps = None
    if (path / "score_maps.npz").is_file():
        maps = np.load(path / "score_maps.npz", allow_pickle=False)
    metrics = read_json(path / "metrics.json", "the metrics (JSON)") if (path / "metrics.json").is_file() else {}
    return {"queries": queries, "maps": maps, "metrics": metrics}


def _cell(window, duration: float, valid: np.ndarray) -> tuple[int, int] | None:
    """The proposal cell (start clip i, end clip j) among ``valid`` (``(n, n)`` bool: the map's cells inside the
    proposal mask) whose span has the highest IoU with ``window`` (seconds; the training target's IoU,
    :func:`jaxprvr.ops.proposals.moment_to_iou2d`; the first maximum in row-major order); ``None`` without a valid
    cell."""
    from jaxprvr.ops.proposals import moment_to_iou2d

    valid = np.asarray(valid, bool)
    if not valid.any():
        return None
    iou = moment_to_iou2d(np.asarray(window[:2], np.float32), duration, valid.shape[-1])
    iou = np.where(valid, np.nan_to_num(iou, nan=-1.0), -2.0)
    i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
    return int(i), int(j)


# ---------------------------------------------------------------------------------------------- MESM
def _mesm_split(sub: Path, config: dict) -> tuple[str, str]:
    """``(dataset, split)`` of ``<dataset>_<split>_submission.jsonl`` (dataset names hold underscores)."""
    from jaxprvr.config import DATASETS

    stem = sub.name[: -len(SUBMISSION_SUFFIX)]
    known = sorted({d for table in DATASETS.values() for d in table}, key=len, reverse=True)
    ds = config.get("data", {}).get("dataset")
    for d in ([ds] if ds else []) + known:
        if stem.startswith(d + "_"):
            return d, stem[len(d) + 1:]
    raise JaxprvrError(sub, "a file named <dataset>_<split>_submission.jsonl", repr(sub.name))


def mesm_ground_truth(ev, data_root) -> dict:
    """``{qid: {"duration", "relevant_windows"}}`` of the submission's split, from the annotation under ``data_root``
    (``None``: the demo dataset of the run's config), read with the run's config (:func:`~jaxprvr.report.runs.
    eval_config`)."""
    from jaxprvr.data.mesm import read_split
    from jaxprvr.report.runs import eval_config
    from jaxprvr.tasks import task_for
    from jaxprvr.tasks.vmr_detr import facts_of

    dataset, split = _mesm_split(ev.submission, ev.config)
    cfg = eval_config(ev, dataset)
    if data_root is None:
        data_root = task_for(cfg).demo_root(cfg)
    queries, _, _ = read_split(facts_of(cfg), Path(data_root), split, val_seed=cfg.data.val_seed)
    out = {}
    for q in queries:
        windows = q.relevant_windows if q.relevant_windows is not None else ([list(q.moment)] if q.moment else [])
        out[q.qid] = {"duration": float(q.duration), "relevant_windows": [list(map(float, w)) for w in windows]}
    return out


def load_mesm(ev, data_root, use_demo: bool) -> dict:
    from jaxprvr.metrics.moments import load_jsonl

    rows = load_jsonl(ev.submission, "submission")
    gt, note = None, ""
    if data_root is not None or use_demo:
        try:
            gt = mesm_ground_truth(ev, data_root)
        except JaxprvrError as e:  # e.g. one --data-root for runs of several datasets: the figure, without GT
            gt, note = None, f"no ground truth drawn: {e}"
        absent = sum(r["qid"] not in gt for r in rows) if gt is not None else 0
        if absent:
            note = f"{absent} of {len(rows)} submission rows have no ground truth in the annotation (drawn without)"
    else:
        note = "no ground truth drawn: pass --data-root (or --demo) to read it from the annotation"
    metrics = {}
    if (ev.path / "metrics.json").is_file():
        m = read_json(ev.path / "metrics.json", "the metrics (JSON)")
        metrics = dict(m.get("brief", m)) if isinstance(m, dict) else {}
    if gt and not any(k.startswith("chance_") for k in metrics):
        from jaxprvr.tasks.vmr_detr import chance_fields

        rows_gt = [dict(qid=q, **g) for q, g in gt.items() if g["relevant_windows"]
                   and q in {r["qid"] for r in rows}]
        if rows_gt:  # what the test line prints
            metrics.update(chance_fields(rows_gt))
    return {"rows": rows, "gt": gt, "note": note, "metrics": metrics}


# ---------------------------------------------------------------------------------------------- figures
def timeline_figure(items: list[dict]):
    """One panel per query: ground truth (green) on the top row, the top-5 predictions below with their scores."""
    fig, axes = grid(len(items), 1, 9.0, 1.9)
    for ax, it in zip(axes, items):
        dur = it["duration"]
        for s, e in it["gt"]:
            ax.barh(0, e - s, left=s, height=0.7, color="#2ca02c")
        preds = it["pred"][:TOP]
        for k, (s, e, sc) in enumerate(preds, start=1):
            ax.barh(k, e - s, left=s, height=0.7, color="C0" if k == 1 else "#9ecae1")
            ax.text(min(e, dur) + dur * 0.005, k, f"{sc:.3f}", va="center", fontsize=6)
        ax.set_yticks(range(len(preds) + 1), ["GT"] + [f"#{k}" for k in range(1, len(preds) + 1)], fontsize=6)
        ax.set_ylim(len(preds) + 0.6, -0.6)
        ax.set_xlim(0, dur * 1.08 if dur > 0 else 1)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(plain(it["title"]), fontsize=7, loc="left")
    axes[-1].set_xlabel("seconds", fontsize=7)
    return fig


def map_figure(items: list[dict]):
    """Per query: the contrastive and IoU maps (cells outside the proposal mask blank), the ground-truth cell (o)
    and the top-1 prediction's cell (x)."""
    fig, axes = grid(2 * len(items), 2, 3.6, 3.0)
    for n, it in enumerate(items):
        for ax, key in zip(axes[2 * n: 2 * n + 2], ("contrastive", "iou")):
            m = np.asarray(it[key], np.float32)
            shown = np.ma.masked_where(m == 0, m)
            im = ax.imshow(shown, origin="upper", cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
            if it.get("gt_cell") is not None:
                ax.plot(it["gt_cell"][1], it["gt_cell"][0], "o", mfc="none", mec="red", markersize=8)
            if it.get("pred_cell") is not None:
                ax.plot(it["pred_cell"][1], it["pred_cell"][0], "x", color="white", markersize=7)
            ax.set_xlabel("end clip", fontsize=7)
            ax.set_ylabel("start clip", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_title(plain(f"{it['title']}: {key}"), fontsize=7)
    return fig


def render_vmr(ev, out_dir: Path, prefix: str, samples: int, seed: int, **_) -> dict:
    data = load_mrnet(ev.path)
    qs = data["queries"]
    picked = sample_indices(len(qs), samples, seed)
    items, maps_items, notes = [], [], []
    for i in picked:
        q = qs[int(i)]
        title = f"{q['vid']} / query {q.get('query_id', q.get('query_rank'))}"
        items.append({"title": title, "duration": float(q["duration"]), "gt": [q["gt"]],
                      "pred": [tuple(map(float, p)) for p in q["pred"]]})
        maps = data["maps"]
        key = f"{q['vid']}/contrastive"
        if maps is not None and key in maps.files:
            rank = int(q.get("query_rank", 0))
            c, u = maps[key][rank], maps[f"{q['vid']}/iou"][rank]
            valid = (c != 0) | (u != 0)  # the saved maps are zero outside the proposal mask
            dur = float(q["duration"])
            maps_items.append({"title": title, "contrastive": c, "iou": u, "gt_cell": _cell(q["gt"], dur, valid),
                               "pred_cell": _cell(q["pred"][0], dur, valid) if q["pred"] else None})
    shown = []
    if items:
        shown.append(save(timeline_figure(items), out_dir, f"{prefix}_timelines.png",
                          f"Ground truth and top-{TOP} moments",
                          f"{len(items)} of {len(qs)} queries, sampled with seed {seed}"))
    if maps_items:
        shown.append(save(map_figure(maps_items), out_dir, f"{prefix}_score_maps.png", "2-D score maps",
                          "o: the ground-truth cell, x: the top-1 prediction's cell"))
    elif data["maps"] is None:
        notes.append("no score_maps.npz in this folder: no 2-D maps drawn")
    return {"figures": shown, "metrics": data["metrics"], "notes": notes}


def render_vmr_detr(ev, out_dir: Path, prefix: str, samples: int, seed: int, data_root=None, demo: bool = False,
                **_) -> dict:
    data = load_mesm(ev, data_root, demo)
    rows, gt = data["rows"], data["gt"] or {}
    picked = sample_indices(len(rows), samples, seed)
    items = []
    for i in picked:
        r = rows[int(i)]
        g = gt.get(r["qid"])
        preds = [tuple(map(float, w)) for w in r["pred_relevant_windows"]]
        dur = g["duration"] if g else max([p[1] for p in preds[:TOP]] + [1.0])
        query = r.get("query") or ""
        items.append({"title": f"{r.get('vid')} / qid {r['qid']}: {query}"[:140], "duration": dur,
                      "gt": g["relevant_windows"] if g else [], "pred": preds})
    shown = []
    if items:
        shown.append(save(timeline_figure(items), out_dir, f"{prefix}_timelines.png",
                          f"Ground truth and top-{TOP} moments",
                          f"{len(items)} of {len(rows)} queries, sampled with seed {seed}"))
    return {"figures": shown, "metrics": data["metrics"], "notes": [data["note"]] if data["note"] else []}
