"""Text-video figures from ``--save-scores DIR`` (:func:`jaxprvr.tasks.t2v.save_scores`): ``sim.npy`` (texts x
columns), ``ids.json`` (``captions``, ``video_ids`` of the columns, ``gt``: each text's column), ``frames.json``
(with ``--save-inputs``: each video's file). For a seeded sample of captions: the top-5 columns as the middle frame
of their videos (frame ``n_frames // 2`` in decord's numbering, :mod:`jaxprvr.data.video`), the true video framed
in green.

The video files: ``frames.json``'s paths, else the dataset's video folder under ``--data-root`` (or the demo
dataset with ``--demo``; :func:`jaxprvr.data.t2v.layout`, files found as the official loaders find them,
:func:`jaxprvr.data.t2v.walk_videos`). A video that cannot be found or decoded is drawn as a labelled placeholder
and counted."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from jaxprvr.errors import JaxprvrError
from jaxprvr.report.figures import new_figure, plain, save
from jaxprvr.report.runs import read_json, sample_indices

TOP = 5


def load(path: Path) -> dict:
    try:
        sim = np.load(path / "sim.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise JaxprvrError(path / "sim.npy", "a (texts, videos) float array (.npy)", f"unreadable: {e}") from None
    ids = read_json(path / "ids.json", "the text and video ids (JSON: captions, video_ids, gt)")
    if not isinstance(ids, dict) or not all(k in ids for k in ("captions", "video_ids", "gt")):
        found = f"keys {sorted(ids)}" if isinstance(ids, dict) else type(ids).__name__
        raise JaxprvrError(path / "ids.json", "captions, video_ids and gt", found)
    if sim.ndim != 2 or sim.shape != (len(ids["captions"]), len(ids["video_ids"])) or len(ids["gt"]) != sim.shape[0]:
        raise JaxprvrError(path / "sim.npy", f"a ({len(ids['captions'])}, {len(ids['video_ids'])}) matrix "
                           "(ids.json: captions x video_ids, one gt per caption)", f"shape {sim.shape}")
    frames = read_json(path / "frames.json", "frames.json") if (path / "frames.json").is_file() else {}
    metrics = read_json(path / "metrics.json", "the metrics (JSON)") if (path / "metrics.json").is_file() else {}
    return {"sim": sim, "captions": ids["captions"], "video_ids": ids["video_ids"],
            "gt": np.asarray(ids["gt"], np.int64), "frames": frames, "metrics": metrics}


def top_columns(sim_row: np.ndarray, k: int = TOP) -> np.ndarray:
    """The ``k`` best columns of one text, best first, in the order of the metric's ranks
    (:func:`jaxprvr.metrics.t2v.grouped_t2v_ranks`: NaN first, as torch sorts it, ties in column order)."""
    x = np.asarray(sim_row, np.float64)
    return np.argsort(np.where(np.isnan(x), -np.inf, -x), kind="stable")[:k]


def true_ranks(sim: np.ndarray, gt, rows) -> list:
    """The 1-based rank of each of ``rows``' true column, as the metric ranks it
    (:func:`jaxprvr.metrics.t2v.grouped_t2v_ranks`); ``None`` where the true column's similarity is not finite
    (the metric drops that text)."""
    from jaxprvr.metrics.t2v import grouped_t2v_ranks

    rows = np.asarray(rows, np.int64)
    ranks, valid = grouped_t2v_ranks(sim[rows], np.asarray(gt, np.int64)[rows])
    return [int(r) + 1 if ok else None for r, ok in zip(ranks, valid)]


def video_files(ev, wanted, data_root, demo: bool, frames: dict) -> tuple[dict, str]:
    """``({video id: path}, why)`` for the wanted ids that can be located (see the module docstring); ``why``: the
    error that kept the videos missing from ``frames.json`` from being searched (``""`` when they were, or when
    neither ``--data-root`` nor ``--demo`` asked for it)."""
    out = {v: Path(frames[v]["path"]) for v in wanted if isinstance(frames.get(v), dict) and frames[v].get("path")}
    rest = [v for v in wanted if v not in out]
    if not rest or (data_root is None and not demo):
        return out, ""
    try:
        out.update(_search(ev, rest, data_root))
    except JaxprvrError as e:  # e.g. --demo without a run config: the frames as placeholders, the page says why
        return out, str(e)
    return out, ""


def _search(ev, rest, data_root) -> dict:
    """The video files of ``rest`` in the dataset's video folder under ``data_root`` (``None``: the demo dataset of
    the run's config)."""
    from jaxprvr.data.t2v import DATASETS, layout, walk_videos

    data = ev.config.get("data", {})
    dataset = data.get("dataset")
    root = Path(data_root) if data_root is not None else None
    if root is None:  # --demo: the demo dataset of the run's config
        if dataset not in DATASETS:
            raise JaxprvrError(ev.path, "a run config naming a text-video dataset (for --demo)", repr(dataset))
        from jaxprvr.report.runs import eval_config
        from jaxprvr.tasks import task_for

        cfg = eval_config(ev)
        root = task_for(cfg).demo_root(cfg)
    search = root
    if dataset in DATASETS:
        video_dir = layout(dataset, root, data.get("anno_path") or None, data.get("video_path") or None)[1]
        search = video_dir if video_dir.is_dir() else root
    return walk_videos(search, rest)


def middle_frame(path: Path) -> np.ndarray:
    """Frame ``n_frames // 2`` of ``path`` as uint8 ``[H, W, 3]``."""
    from jaxprvr.data.video import decode_frames, probe

    return decode_frames(path, [probe(path).n_frames // 2])[0]


def render(ev, out_dir: Path, prefix: str, samples: int, seed: int, data_root=None, demo: bool = False,
           **_) -> dict:
    data = load(ev.path)
    sim, vids, gt = data["sim"], data["video_ids"], data["gt"]
    picked = sample_indices(len(data["captions"]), samples, seed)
    # per caption: its top-5 columns, and its true column as a sixth panel when none of the five is its video
    panels = []
    for i in picked:
        top = [(f"#{k + 1}", int(c)) for k, c in enumerate(top_columns(sim[i]))]
        if all(vids[c] != vids[gt[i]] for _, c in top):
            top.append(("true", int(gt[i])))
        panels.append(top)
    wanted = list(dict.fromkeys(vids[c] for p in panels for _, c in p))
    files, unsearched = video_files(ev, wanted, data_root, demo, data["frames"])
    thumbs, bad = {}, {}
    for v in wanted:
        if v not in files:
            bad[v] = ("video file not searched (see the note above)" if unsearched else "video file not found"
                      + ("" if data_root is not None or demo else " (pass --data-root)"))
            continue
        try:
            thumbs[v] = middle_frame(files[v])
        except JaxprvrError as e:
            bad[v] = str(e)
    shown = []
    notes = [f"video files not searched: {unsearched}"] if unsearched else []
    if len(picked):
        fig = new_figure(2.0 * (TOP + 1), 2.1 * len(picked), layout="constrained")
        subs = fig.subfigures(len(picked), 1, squeeze=False)[:, 0]
        for sf, i, row, rank in zip(subs, picked, panels, true_ranks(sim, gt, picked)):
            rank = "-" if rank is None else rank
            sf.suptitle(plain(textwrap.shorten(f"“{data['captions'][i]}” (true video {vids[gt[i]]}, rank {rank})",
                                               110)), fontsize=8, x=0.01, ha="left")
            for k, ax in enumerate(sf.subplots(1, TOP + 1)):
                ax.set_xticks([])
                ax.set_yticks([])
                if k >= len(row):
                    ax.set_axis_off()
                    continue
                name, c = row[k]
                v = vids[c]
                true = v == vids[gt[i]]
                if v in thumbs:
                    ax.imshow(thumbs[v], interpolation="bilinear")
                else:
                    ax.imshow(np.full((90, 120, 3), 215, np.uint8))
                    ax.text(0.5, 0.5, plain("unreadable\n" + textwrap.shorten(bad[v], 60)), ha="center", va="center",
                            fontsize=5, wrap=True, transform=ax.transAxes)
                for sp in ax.spines.values():
                    sp.set_color("#2ca02c" if true else "0.7")
                    sp.set_linewidth(4 if true else 0.8)
                ax.set_title(plain(f"{name} {textwrap.shorten(v, 22)}\nsim {sim[i, c]:.3f}"), fontsize=6,
                             color="#2ca02c" if true else "black")
        shown.append(save(fig, out_dir, f"{prefix}_top{TOP}_videos.png", f"Top-{TOP} videos of sampled captions",
                          f"{len(picked)} of {len(data['captions'])} captions, sampled with seed {seed}; the "
                          "true video framed in green (a sixth panel when it is not in the top 5)"))
    if bad:
        notes.append(f"{len(bad)} video(s) could not be read and are drawn as labelled placeholders: "
                     + "; ".join(f"{v}: {r}" for v, r in bad.items()))
    return {"figures": shown, "metrics": data["metrics"], "notes": notes, "unreadable": sorted(bad)}
