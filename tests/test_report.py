"""``python -m jaxprvr.report`` on tiny real runs of each task (one report, built once per session):

* PRVR: two MS-SL runs (the official seed: 2 epochs of 2 steps; seed 1: stopped after epoch 0) and
  ``jaxprvr.evaluate --save-scores`` into the first; MRNet and text-video: runs stopped before their first step
  (``max_steps=0``: the run folder and its initial checkpoint; a train step would cost its compilation, and the
  curves and tables are the PRVR runs' business) with ``--save-predictions`` / ``--save-scores --save-inputs`` into
  them, one text-video file then corrupted; MESM: a submission of the official rows (``postprocess`` of random
  outputs, the file the evaluate CLI writes) in a folder passed with ``--eval``, ground truth from ``--data-root``;
* every figure the page shows exists, is a PNG (signature, IHDR with its CRC, IEND parsed here) of the width and
  height the page states, and every ``src``/``href`` names a file of the report folder;
* the curves draw exactly the ``metrics.jsonl`` values (read back from the figure's lines, compared with a direct
  JSON read); the R@K curve equals a brute-force ranking of ``scores.npy`` and the run's own test metrics; the final
  table holds the test results, the README's official numbers and the chance level (the task's formula);
  MESM's drawn ground truth is the annotation file's line ``qid``; the corrupted video is a counted placeholder;
* without matplotlib the command prints one line with the install hint; nothing outside ``jaxprvr/report``
  imports matplotlib; bad inputs give one-line errors. Mutants show that each check can fail."""

from __future__ import annotations

import ast
import json
import re
import struct
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from jaxprvr.errors import JaxprvrError

REPO = Path(__file__).resolve().parents[1]
SAMPLES, SEED = 2, 0
PRVR = ["model.hidden_size=16", "model.n_heads=2", "model.q_feat_size=12", "train.batch_size=8", "train.n_epoch=2",
        "train.log_every=1", "data.prefetch=0", "data.eval_context_bsz=8", "data.eval_query_bsz=16"]
MRNET = ["model.input_size=24", "model.text_dim=16", "model.num_pre_clips=32", "model.num_clips=16",
         "model.featpool_kernel=2", "model.pooling_counts=(7,4)", "model.joint_space=16", "model.featpool_hidden=16",
         "model.predictor_hidden=16", "model.predictor_kernel=3", "model.predictor_layers=1", "model.n_heads=2",
         "model.ffn_dim=16", "model.trans_layers=1", "train.batch_size=4", "data.eval_batch_size=4", "data.prefetch=0"]
T2V = ["model.image_resolution=32", "model.vision_patch_size=16", "model.vision_width=32", "model.vision_layers=1",
       "model.text_width=32", "model.text_layers=1", "model.embed_dim=32", "model.num_hidden_layers=1",
       "model.vision_heads=2", "model.text_heads=2", "model.max_frames=4", "model.max_words=16",
       "train.batch_size=4", "data.eval_batch_size=4", "data.prefetch=0", "data.workers=1"]


def _evaluate(config, model, ckpt, root, flag, out, sets):
    from jaxprvr.evaluate import main

    argv = ["--config", config, "--model", model, "--ckpt", str(ckpt), "--data-root", str(root), flag, str(out),
            "--no-progress", *[f"--set={s}" for s in sets if s.startswith("data.")]]
    assert main(argv) == 0


def _mesm_eval(base: Path) -> tuple[Path, Path]:
    """The folder MESMTask.save_outputs writes (submission + metrics.json), for random outputs of 5 windows."""
    from jaxprvr.config import load_config
    from jaxprvr.data.mesm import read_split
    from jaxprvr.data.synthetic_mesm import write
    from jaxprvr.metrics.moments import eval_submission, postprocess, save_jsonl
    from jaxprvr.tasks.vmr_detr import facts_of

    root = write("charades", None, base / "mesm_data", sizes={"train": 2, "test": 4},
                 feat_dims={"clip_image": 8, "slowfast": 8}, seed=1)
    queries = read_split(facts_of(load_config("charades", "mesm")), root, "test")[0]
    rng = np.random.default_rng(0)
    n = len(queries)
    spans = np.stack([rng.uniform(0.2, 0.8, (n, 5)), rng.uniform(0.05, 0.4, (n, 5))], -1)
    rows = postprocess(rng.normal(size=(n, 5, 2)), spans, None, [q.duration for q in queries], clip_len=1.0,
                       max_ts_val=150.0, qid=[q.qid for q in queries], query=[q.sentence for q in queries],
                       vid=[q.video_id for q in queries])
    out = base / "mesm_eval"
    out.mkdir()
    save_jsonl(rows, out / "charades_test_submission.jsonl")
    gt = [dict(qid=q.qid, duration=q.duration, relevant_windows=[list(q.moment)]) for q in queries]
    (out / "metrics.json").write_text(json.dumps(eval_submission(rows, gt, "charades")))
    return root, out


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    from jaxprvr.config import load_config
    from jaxprvr.data.synthetic import write_synthetic
    from jaxprvr.data.synthetic_t2v import write_synthetic_t2v
    from jaxprvr.data.synthetic_vmr import write_synthetic_vmr
    from jaxprvr.report import build_report
    from jaxprvr.train import train

    base = tmp_path_factory.mktemp("report")
    write_synthetic(base / "prvr_data", "tvr", n_train=16, n_val=8, n_test=8, seed=0, visual_dim=16, query_dim=12)
    train(load_config("tvr", "ms_sl", PRVR), base / "prvr_data", base / "prvr_a", progress=False)
    # a second run for the overlay: another seed, stopped after epoch 0 (2 steps and a validation; no test)
    train(load_config("tvr", "ms_sl", PRVR + ["train.seed=1"]), base / "prvr_data", base / "prvr_b", progress=False,
          max_steps=2)
    runs = [base / "prvr_a", base / "prvr_b"]
    _evaluate("tvr", "ms_sl", base / "prvr_a", base / "prvr_data", "--save-scores", base / "prvr_a" / "eval", PRVR)

    write_synthetic_vmr(base / "vmr_data", "activitynet", 8, 4, 4, seed=3, video_dim=24, query_dim=16,
                        num_pre_clips=32)
    train(load_config("activitynet", "mrnet", MRNET), base / "vmr_data", base / "mrnet", progress=False, max_steps=0)
    _evaluate("activitynet", "mrnet", base / "mrnet", base / "vmr_data", "--save-predictions", base / "mrnet" / "eval",
              MRNET)
    runs.append(base / "mrnet")

    write_synthetic_t2v(base / "t2v_data", "msrvtt", n_train=4, n_test=6, seed=1)
    train(load_config("msrvtt", "clip_wti", T2V), base / "t2v_data", base / "t2v", progress=False, max_steps=0)
    _evaluate("msrvtt", "clip_wti", base / "t2v", base / "t2v_data", "--save-scores", base / "t2v" / "eval",
              T2V + ["data.save_inputs=true"])
    runs.append(base / "t2v")
    # the top-1 video of the first sampled caption (the sample rule of the docs) becomes unreadable
    sim = np.load(base / "t2v" / "eval" / "sim.npy")
    first = int(np.sort(np.random.default_rng(SEED).choice(len(sim), SAMPLES, replace=False))[0])
    ids = json.loads((base / "t2v" / "eval" / "ids.json").read_text())
    bad = ids["video_ids"][int(np.argmax(sim[first]))]
    frames = json.loads((base / "t2v" / "eval" / "frames.json").read_text())
    Path(frames[bad]["path"]).write_bytes(b"not a video")

    mesm_root, mesm_eval = _mesm_eval(base)
    out = base / "out"
    summary = build_report(runs, out, evals=[mesm_eval], samples=SAMPLES, seed=SEED, data_root=mesm_root)
    return {"base": base, "out": out, "summary": summary, "runs": runs, "bad_video": bad, "mesm_root": mesm_root,
            "mesm_eval": mesm_eval}


# ---------------------------------------------------------------------------------------------- independent readers
def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk (CRC checked); the file must end with IEND."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG signature")
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise ValueError(f"{path}: first chunk {kind!r} of {length} bytes, not IHDR")
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise ValueError(f"{path}: IHDR CRC mismatch")
    if data[-12:] != b"\x00\x00\x00\x00IEND\xaeB`\x82":
        raise ValueError(f"{path}: no IEND chunk at the end")
    return struct.unpack(">II", data[16:24])


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list:
    p = _Tags()
    p.feed(html)
    return p.tags


def image_problems(out: Path, html: str) -> list[str]:
    """Every <img>: an existing PNG of the stated width/height."""
    bad = []
    for tag, a in tags(html):
        if tag != "img":
            continue
        try:
            size = png_size(out / a["src"])
        except (OSError, ValueError, KeyError) as e:
            bad.append(f"{a.get('src')}: {e}")
            continue
        if size != (int(a.get("width", -1)), int(a.get("height", -1))):
            bad.append(f"{a['src']}: PNG {size}, page says {a.get('width')} x {a.get('height')}")
    return bad


def reference_problems(out: Path, html: str) -> list[str]:
    """Every src/href: a relative path to an existing file inside the report folder; no script, no link out."""
    bad = []
    for tag, a in tags(html):
        if tag == "script":
            bad.append("a <script>")
        for key in ("src", "href"):
            if key in a:
                ref = a[key]
                target = (out / ref).resolve()
                if "://" in ref or ref.startswith("/") or out.resolve() not in target.parents or not target.is_file():
                    bad.append(f"{tag} {key}={ref!r}")
    return bad


def curve_problems(figs, runs) -> list[str]:
    """Each panel's lines (not the chance lines) against ``metrics.jsonl`` read here; every numeric step key
    (bools aside) has a panel."""
    bad = []
    recs = {r.name: [json.loads(x) for x in (r.path / "metrics.jsonl").read_text().splitlines()] for r in runs}
    seen = set()
    for name, fig, _ in figs:
        for ax in fig.axes:
            key = ax.get_title()
            if not key:
                continue
            seen.add(key)
            for line in ax.get_lines():
                label = line.get_label()
                if label.startswith("chance"):
                    continue
                run = label.split(" ", 1)[0]
                if name == "val":
                    rows = [r for r in recs[run] if r.get("split") == "val" and key in r]
                    want = ([r["epoch"] for r in rows], [r[key] for r in rows])
                else:
                    rows = [r for r in recs[run] if "step" in r and "split" not in r and key in r]
                    want = ([r["step"] for r in rows], [r[key] for r in rows])
                got = (list(line.get_xdata()), list(line.get_ydata()))
                if got[0] != want[0] or not np.allclose(got[1], want[1], rtol=0, atol=0):
                    bad.append(f"{name} {key} {run}: drawn {got}, metrics.jsonl {want}")
    keys = {k for rs in recs.values() for r in rs if "step" in r for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)} - {"step", "epoch"}
    bad += [f"no panel for {k}" for k in sorted(keys - seen)]
    return bad


# ---------------------------------------------------------------------------------------------- the report
def test_figures_are_pngs_of_the_stated_size_and_references_exist(built):
    out = built["out"]
    html = (out / "index.html").read_text()
    files = {f["file"] for f in built["summary"]["figures"]}
    assert {f for f in files if f.startswith("curves_")} == {f"curves_prvr_{f}.png" for f in (
        "train_loss", "train_lr", "train_throughput", "val")}  # the MRNet and t2v runs stopped before a step
    evals = {Path(e["path"]).name if Path(e["path"]).name != "eval" else Path(e["path"]).parent.name: e
             for e in built["summary"]["evals"]}
    assert set(evals) == {"prvr_a", "mrnet", "t2v", "mesm_eval"}
    assert [f.split("_", 2)[2] for f in evals["prvr_a"]["figures"]] == ["recall_at_k.png", "rank_histogram.png"]
    assert [f.split("_", 2)[2] for f in evals["mrnet"]["figures"]] == ["timelines.png", "score_maps.png"]
    assert [f.split("_", 2)[2] for f in evals["t2v"]["figures"]] == ["top5_videos.png"]
    assert [f.split("_", 2)[2] for f in evals["mesm_eval"]["figures"]] == ["timelines.png"]
    shown = {a["src"] for t, a in tags(html) if t == "img"}
    assert shown == files and sorted(out.glob("*.png")) == sorted(out / f for f in files)
    assert image_problems(out, html) == []
    assert reference_problems(out, html) == []
    # a timeline panel is 1.9 in at 100 dpi: the sample size is visible in the height
    for e in ("mrnet", "mesm_eval"):
        assert png_size(out / evals[e]["figures"][0])[1] == 190 * SAMPLES


def test_the_checks_catch_their_mutants(built, tmp_path):
    from jaxprvr.report.figures import DPI, new_figure, pixel_size

    out = built["out"]
    html = (out / "index.html").read_text()
    # a figure cropped on save (bbox_inches="tight") no longer has the size the page states
    fig = new_figure(3.0, 2.0)
    fig.add_subplot(1, 1, 1).plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "x.png", dpi=DPI, bbox_inches="tight")
    assert png_size(tmp_path / "x.png") != pixel_size(fig) == (300, 200)
    first = next(a for t, a in tags(html) if t == "img")
    mutated = html.replace(f'height="{first["height"]}"', f'height="{int(first["height"]) + 1}"', 1)
    assert len(image_problems(out, mutated)) == 1
    assert reference_problems(out, html + '<img src="missing.png">') == ["img src='missing.png'"]
    assert reference_problems(out, html + '<a href="https://example.com/x.png">') != []
    assert reference_problems(out, html + '<script src="curves_prvr_val.png"></script>') != []
    (tmp_path / "trunc.png").write_bytes((out / first["src"]).read_bytes()[:-12])
    with pytest.raises(ValueError, match="IEND"):
        png_size(tmp_path / "trunc.png")


def test_curves_draw_the_metrics_jsonl_values(built):
    from jaxprvr.report.curves import curve_figures, curve_series
    from jaxprvr.report.runs import config_differences, load_run, run_labels

    runs = [load_run(p) for p in built["runs"][:2]]
    diff = config_differences(runs)
    assert diff == ["train.seed"]
    labels = run_labels(runs, diff)
    assert labels == ["prvr_a (train.seed=2018)", "prvr_b (train.seed=1)"]  # MS-SL's official seed, then 1
    assert len(runs[1].steps) == 2 and len(runs[1].vals) == 1 and not runs[1].results  # stopped after epoch 0
    figs = curve_figures(runs, labels)
    assert [n for n, _, _ in figs] == ["train_loss", "train_lr", "train_throughput", "val"]
    assert curve_problems(figs, runs) == []
    val_panels = {ax.get_title() for n, f, _ in figs if n == "val" for ax in f.axes}
    assert {"r1", "r5", "r10", "r100", "sumr"} <= val_panels and "n_videos" not in val_panels
    # mutant: a series that lost its first point is caught
    series = curve_series(runs, labels)
    label, xs, ys = series["train_loss"]["loss"][0]
    series["train_loss"]["loss"][0] = (label, xs[1:], ys[1:])
    assert len(curve_problems(curve_figures(runs, labels, series), runs)) == 1


def test_prvr_recall_curve_and_final_table(built):
    from jaxprvr.report import prvr
    from jaxprvr.report.runs import load_run, metric_rows, official_numbers, open_eval

    run = load_run(built["runs"][0])
    test = json.loads((run.path / "test_results.json").read_text())
    data = prvr.load(run.path / "eval")
    ks, rk = prvr.recall_curve(prvr.ranks(data), len(data["video_ids"]))
    # brute force: the position of each query's video (cap_id before '#') in its stable descending order
    vids = (run.path / "eval" / "video_ids.txt").read_text().split()
    qids = (run.path / "eval" / "query_ids.txt").read_text().split()
    scores = np.load(run.path / "eval" / "scores.npy")
    rank = np.array([list(np.argsort(-scores[i], kind="stable")).index(vids.index(q.split("#")[0])) + 1
                     for i, q in enumerate(qids)])
    np.testing.assert_allclose(rk, [100.0 * np.mean(rank <= k) for k in range(1, len(vids) + 1)], rtol=1e-12)
    assert (rk[0], rk[4], rk[-1]) == (test["r1"], test["r5"], 100.0) and test["r10"] == test["r100"] == 100.0
    # the section's metrics, from the same ranks: the run's own test metrics
    shown = prvr.metrics(data, prvr.ranks(data))
    keys = ("r1", "r5", "r10", "r100", "sumr", "medr", "meanr")
    assert {k: shown[k] for k in keys} == {k: test[k] for k in keys} and shown["n_videos"] == test["n_videos"]
    # the table: the run's test numbers, the README's official numbers of ms_sl on TVR, chance = the task's formula
    official, source = official_numbers("ms_sl", "tvr")
    rows = {r.metric: r for r in metric_rows("prvr", test, official)}
    n = test["n_videos"]
    assert rows["sumr"].value == test["sumr"] and rows["sumr"].official == 172.3
    assert rows["sumr"].chance == pytest.approx(sum(100.0 * min(k, n) / n for k in (1, 5, 10, 100)))
    assert rows["r1"].official == 13.5 and rows["r1"].chance is None and "SumR" in source
    html = (built["out"] / "index.html").read_text()
    assert f"<td>{test['sumr']:.2f}</td><td>172.30</td><td>{rows['sumr'].chance:.2f}</td>" in html
    # MRNet: fractions shown as percentages, the saved chance beside R1; text-video: chance computed (not saved)
    mr = json.loads((built["runs"][2] / "eval" / "metrics.json").read_text())
    mrows = {r.metric: r for r in metric_rows("vmr", mr)}
    assert mrows["R1@0.5"].value == pytest.approx(100 * mr["R1@0.5"])
    assert mrows["R1@0.5"].chance == pytest.approx(100 * mr["chance_R1@0.5"]) and mrows["mIoU"].chance is None
    t2v = open_eval(built["runs"][3] / "eval")
    tm = json.loads((t2v.path / "metrics.json").read_text())
    trows = {r.metric: r for r in metric_rows("t2v", tm)}
    assert trows["t2v/R1"].chance == pytest.approx(100.0 / tm["n_video"]) and trows["t2v/R1"].chance_computed


def test_mesm_ground_truth_and_the_unreadable_video(built):
    from jaxprvr.report import moments
    from jaxprvr.report.runs import open_eval

    ev = open_eval(built["mesm_eval"])
    gt = moments.load_mesm(ev, built["mesm_root"], False)["gt"]
    ann = built["mesm_root"] / "data" / "charades" / "annotations"
    lines = (ann / "charades_sta_test.txt").read_text().splitlines()
    length = {r.split(",")[0]: float(r.rsplit(",", 1)[1]) for r in (ann / "Charades_v1_test.csv").read_text()
              .splitlines()[1:]}
    rows = [json.loads(x) for x in (ev.submission).read_text().splitlines()]
    for row in rows:  # the drawn window is the annotation's line qid: start/end swapped if needed, end <= length
        head, sentence = lines[row["qid"]].split("##")
        vid, a, b = head.split()
        assert (vid, sentence.strip()) == (row["vid"], row["query"])
        s, e = sorted((float(a), float(b)))
        assert gt[row["qid"]] == {"duration": length[vid], "relevant_windows": [[s, min(e, length[vid])]]}
    # the saved metrics lack a chance level: computed as the test line prints it (chance_mr, 200 draws, seed 0) on
    # the ground truth of the submission's rows
    from jaxprvr.metrics.moments import chance_mr

    saved = json.loads((ev.path / "metrics.json").read_text())
    assert not any(k.startswith("chance_") for k in saved.get("brief", saved))
    want = chance_mr([dict(qid=r["qid"], **gt[r["qid"]]) for r in rows], n_draws=200, seed=0,
                     thresholds=(0.3, 0.5, 0.7))
    got = moments.load_mesm(ev, built["mesm_root"], False)["metrics"]
    assert {k: got[f"chance_{k}"] for k in want} == want and {"R1@0.3", "R1@0.5", "R1@0.7", "miou"} <= set(want)
    t2v = next(e for e in built["summary"]["evals"] if e["kind"] == "t2v")
    assert t2v["unreadable"] == [built["bad_video"]]
    html = (built["out"] / "index.html").read_text()
    assert "1 video(s) could not be read" in html and built["bad_video"] in html


def test_the_run_config_is_read_with_config_from_dict(built, tmp_path):
    """An evaluation folder inside a run: its Config is the run's saved one (every field, through
    jaxprvr.api.config_from_dict), the outputs' dataset where it differs; the ground truth read with it is the
    annotation's."""
    import shutil

    from jaxprvr.config import load_config
    from jaxprvr.report import moments
    from jaxprvr.report.runs import eval_config, open_eval

    saved = load_config("charades", "mesm", ["data.feat_dims=(8,8)", "model.hidden_dim=16", "data.val_seed=3"])
    run = tmp_path / "run"
    shutil.copytree(built["mesm_eval"], run / "eval")
    (run / "config.json").write_text(json.dumps(saved.to_dict()))
    ev = open_eval(run / "eval")
    assert ev.kind == "vmr_detr" and eval_config(ev) == saved
    other = eval_config(ev, "charades_cd")
    assert other.data.dataset == "charades_cd" and (other.data.feat_dims, other.data.val_seed) == ((8, 8), 3)
    assert eval_config(open_eval(built["mesm_eval"]), "charades") == load_config("charades", "mesm")  # no config
    assert eval_config(open_eval(built["runs"][3] / "eval")).model == load_config("msrvtt", "clip_wti", T2V).model
    # an evaluation folder inside a run reads that run's config.json (build_report sets nothing on top)
    from jaxprvr.report.runs import load_run

    assert all(open_eval(r / "eval").config == load_run(r).config != {} for r in built["runs"][2:])
    want = moments.load_mesm(open_eval(built["mesm_eval"]), built["mesm_root"], False)["gt"]
    assert want and moments.load_mesm(ev, built["mesm_root"], False)["gt"] == want
    # a saved config whose model section this version cannot read: the figure without ground truth, and why
    (run / "config.json").write_text(json.dumps({**saved.to_dict(), "model": {"name": "mesm", "nope": 1}}))
    data = moments.load_mesm(open_eval(run / "eval"), built["mesm_root"], False)
    assert data["gt"] is None and "no ground truth drawn" in data["note"] and "nope" in data["note"]


# ---------------------------------------------------------------------------------------------- no fixture
# (last: xdist's work stealing takes tests from the tail of a queue; these do not need the session's runs)
def test_report_kinds_come_from_the_registry_task_objects(monkeypatch):
    """A family's report kind is the module of its Task object: a family added with another task object is drawn
    as that task, whatever its name."""
    import dataclasses

    from jaxprvr import registry
    from jaxprvr.report.runs import families_of_kind, kind_of_model

    want = {"ms_sl": "prvr", "gmmformer": "prvr", "gmmformer_v2": "prvr", "mtm": "prvr", "mrnet": "vmr",
            "mesm": "vmr_detr", "clip_wti": "t2v"}
    assert {n: kind_of_model(n) for n in registry.FAMILIES} == want
    assert families_of_kind("vmr_detr") == ["mesm"] and kind_of_model("nope") is None
    twin = dataclasses.replace(registry.FAMILIES["mesm"], name="detr2")
    monkeypatch.setitem(registry.FAMILIES, "detr2", twin)
    monkeypatch.setitem(registry.FAMILIES, "maps2", dataclasses.replace(registry.FAMILIES["mrnet"], name="maps2"))
    assert kind_of_model("detr2") == "vmr_detr" and kind_of_model("maps2") == "vmr"
    # and the report's code compares no string with a family name (docstrings aside: they say what wrote a file)
    named = [f"{p.name}:{n.lineno} {n.value!r}" for p in sorted((REPO / "jaxprvr" / "report").glob("*.py"))
             for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
             if isinstance(n, ast.Constant) and n.value in registry.FAMILIES]
    assert named == [] and any(isinstance(n, ast.Constant) and n.value in registry.FAMILIES
                               for n in ast.walk(ast.parse('k = "mesm" if name == "mesm" else "mrnet"')))


def test_prvr_figures_of_a_150_video_gallery(tmp_path):
    """Beyond 100 videos (the fixture's 8-video gallery saturates at R@10): R@K for K = 1..100 against a brute-force
    ranking, the metrics against eval_q2m, and the log-binned histogram's bars against the ranks counted here."""
    from jaxprvr.metrics.prvr import eval_q2m
    from jaxprvr.report import prvr
    from jaxprvr.report.runs import EvalDir

    rng = np.random.default_rng(0)
    nq, nv = 300, 150
    gt = rng.integers(0, nv, nq)
    scores = rng.normal(size=(nq, nv)).astype(np.float32)
    scores[0, gt[0]], scores[1, gt[1]] = 10.0, -10.0  # ranks 1 and 150: both ends of the histogram
    d = tmp_path / "eval"
    d.mkdir()
    np.save(d / "scores.npy", scores)
    (d / "query_ids.txt").write_text("".join(f"v{g}#enc#{i}\n" for i, g in enumerate(gt)))
    (d / "video_ids.txt").write_text("".join(f"v{j}\n" for j in range(nv)))
    data = prvr.load(d)
    r = prvr.ranks(data)
    brute = np.array([list(np.argsort(-scores[i], kind="stable")).index(gt[i]) + 1 for i in range(nq)])
    assert r.tolist() == brute.tolist() and (brute.min(), brute.max()) == (1, nv)
    ks, rk = prvr.recall_curve(r, nv)
    assert ks.tolist() == list(range(1, 101))
    np.testing.assert_allclose(rk, [100.0 * np.mean(brute <= k) for k in range(1, 101)], rtol=1e-12)
    assert 0 < rk[0] < rk[9] < rk[99] < 100
    shown, want = prvr.metrics(data, r), eval_q2m(scores, gt)
    assert {k: shown[k] for k in want} == want and shown["r100"] == rk[99]

    ax = prvr.histogram_figure(r, nv).axes[0]
    bars = [(p.get_x(), p.get_x() + p.get_width(), p.get_height()) for p in ax.patches]
    assert ax.get_xscale() == "log" and 10 < len(bars) < 45  # log bins, not one per rank
    assert all(b[1] == pytest.approx(c[0]) for b, c in zip(bars, bars[1:]))  # contiguous
    assert [h for _, _, h in bars] == [np.sum((brute > lo) & (brute < hi)) for lo, hi, _ in bars]
    assert sum(h for _, _, h in bars) == nq  # every rank, 1 and 150 included, in a bar
    res = prvr.render(EvalDir(d, "prvr", "eval", {}), tmp_path, "e0_prvr")
    assert [png_size(tmp_path / f.file) for f in res["figures"]] == [(640, 360), (640, 360)]


def test_mrnet_cells_lie_in_the_proposal_mask():
    """A window is marked at the valid cell of highest IoU (brute force here), never outside the mask; a top-1
    moment (a proposal span) at its own cell."""
    from jaxprvr.ops.proposals import mask2d
    from jaxprvr.report.moments import _cell

    n, dur = 16, 40.0
    valid = mask2d(n, (7, 4))
    step = dur / n

    def brute(s, e):
        best, at = -1.0, None
        for i, j in zip(*np.nonzero(valid)):
            a, b = i * step, (j + 1) * step
            iou = max(0.0, min(b, e) - max(a, s)) / (max(b, e) - min(a, s))
            if iou > best + 1e-6:
                best, at = iou, (int(i), int(j))
        return at

    assert not valid[1, 11] and _cell([2.5, 30.0], dur, valid) == brute(2.5, 30.0)  # clips 1..11: not a proposal
    assert valid[_cell([2.5, 30.0], dur, valid)]
    rng = np.random.default_rng(0)
    for s, e in np.sort(rng.uniform(0, dur, (50, 2)), axis=1):
        assert _cell([s, e], dur, valid) == brute(s, e), (s, e)
    assert _cell([4 * step, 12 * step, 0.9], dur, valid) == (4, 11) and valid[4, 11]
    assert _cell([0.0, 1.0], dur, np.zeros((n, n), bool)) is None


def test_t2v_ranks_are_the_metric_ranks():
    """The caption's rank in the figure title is the metric's (NaN similarities first, ties to the lower column),
    and the top-5 panels are drawn in the same order."""
    from jaxprvr.report.t2v import top_columns, true_ranks

    nan = float("nan")
    sim = np.array([[0.5, nan, 0.9, 0.5, 0.1],   # true column 3: beaten by 0.9, the NaN and the tie at column 0
                    [0.2, 0.3, nan, 0.1, 0.0],   # true column 2 is NaN: the metric drops the caption
                    [0.1, 0.2, 0.3, 0.4, 0.5]])
    assert true_ranks(sim, [3, 2, 4], [0, 1, 2]) == [4, None, 1]
    assert list(top_columns(sim[0])) == [1, 2, 0, 3, 4] and list(top_columns(sim[2], 2)) == [4, 3]
    rng = np.random.default_rng(0)  # random ties and NaNs: the rank is the true column's place in the drawn order
    sim = rng.integers(0, 4, (40, 12)).astype(float)
    sim[rng.random(sim.shape) < 0.1] = nan
    gt = rng.integers(0, 12, 40)
    ok = [i for i in range(40) if np.isfinite(sim[i, gt[i]])]
    assert true_ranks(sim, gt, ok) == [list(top_columns(sim[i], 12)).index(gt[i]) + 1 for i in ok]


def test_t2v_demo_without_a_run_config_is_a_note_not_an_abort(tmp_path):
    """--demo for text-video outputs outside a run (no config.json, no frames.json): the report is still written,
    the frames are placeholders counted as unreadable, and the page says why."""
    from jaxprvr.report import build_report

    d = tmp_path / "eval"
    d.mkdir()
    np.save(d / "sim.npy", np.array([[0.9, 0.1, 0.2], [0.3, 0.8, 0.1], [0.2, 0.4, 0.7]], np.float32))
    (d / "ids.json").write_text(json.dumps({"captions": ["a", "b", "c"], "video_ids": ["x", "y", "z"], "gt": [0, 1, 2]}))
    summary = build_report(out=tmp_path / "out", evals=[d], samples=2, seed=0, demo=True)
    (ev,) = summary["evals"]
    assert ev["kind"] == "t2v" and ev["unreadable"] == ["x", "y", "z"] and len(ev["figures"]) == 1
    assert any("video files not searched" in n and "a run config naming a text-video dataset" in n for n in ev["notes"])
    html = (tmp_path / "out" / "index.html").read_text()
    assert "video files not searched" in html and "3 video(s) could not be read" in html


def test_official_numbers_are_the_readme_table():
    from jaxprvr.report.runs import official_numbers

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| model | TVR | ActivityNet Captions | Charades-STA |"):].split("\n\n")[0]
    models = {"MS-SL": "ms_sl", "GMMFormer": "gmmformer", "GMMFormer v2": "gmmformer_v2", "MTM": "mtm"}
    checked = 0
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for ds, cell in zip(("tvr", "act", "cha"), cells[1:]):
            want = dict(zip(("r1", "r5", "r10", "r100", "sumr"), map(float, cell.split("/"))))
            assert official_numbers(models[cells[0]], ds)[0] == want, (cells[0], ds)
            checked += 1
    assert checked == 12
    assert official_numbers("clip_wti", "msrvtt")[0] == {"t2v/R1": 46.6, "t2v/R5": 73.4, "t2v/R10": 83.5,
                                                         "t2v/MdR": 2.0, "t2v/MnR": 13.0}
    assert official_numbers("mrnet", "activitynet") == ({}, "") and official_numbers("mesm", "charades") == ({}, "")


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    from jaxprvr.report.__main__ import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": {"name": "ms_sl"}, "data": {"dataset": "tvr"}}')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n')
    for argv, where in (([str(run)], "metrics.jsonl:2"), ([str(tmp_path / "none")], "none"),
                        (["--eval", str(tmp_path)], str(tmp_path)), ([], "at least one RUN")):
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and where in err[0], err


def test_metrics_jsonl_is_read_by_the_shared_reader(tmp_path):
    """runs.read_jsonl is metrics.moments.load_jsonl with an empty file allowed, plus the object check."""
    from jaxprvr.metrics.moments import load_jsonl
    from jaxprvr.report.runs import read_jsonl

    f = tmp_path / "metrics.jsonl"
    f.write_text("")
    assert read_jsonl(f) == [] and load_jsonl(f, allow_empty=True) == []
    with pytest.raises(JaxprvrError, match="an empty file"):  # the default stays: a submission needs rows
        load_jsonl(f)
    f.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n\n')
    assert read_jsonl(f) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    for text, where in (('{"step": 1}\n[1, 2]\n', ":2"), ('{"step": 1}\n\n{"step": 2}\n', ":2"),
                        ('{"step": 1}\n{"step": \n', ":2")):
        f.write_text(text)
        with pytest.raises(JaxprvrError, match=re.escape(f"{f}{where}")):
            read_jsonl(f)
    f.write_bytes(b'{"step": 1, "loss": "\xff"}\n')
    with pytest.raises(JaxprvrError, match="readable"):
        read_jsonl(f)


def test_without_matplotlib_one_line_with_the_install_hint(tmp_path, monkeypatch, capsys):
    from jaxprvr.report.__main__ import main

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install jaxprvr[report]" in err[0]


def _imports_matplotlib(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "matplotlib" or n.startswith("matplotlib.") for n in names):
            return True
    return False


def test_only_the_report_imports_matplotlib():
    pkg = REPO / "jaxprvr"
    texts = {p: p.read_text(encoding="utf-8") for p in sorted(pkg.rglob("*.py"))}
    users = [p.relative_to(REPO).as_posix() for p, t in texts.items() if "matplotlib" in t and _imports_matplotlib(t)]
    assert users and all(u.startswith("jaxprvr/report/") for u in users), users
    assert _imports_matplotlib("def f():\n    import matplotlib.pyplot as plt\n")  # the check sees nested imports
    assert not _imports_matplotlib("import jaxprvr.report  # matplotlib")
    assert re.search(r'report = \["matplotlib>=3\.7"\]', (REPO / "pyproject.toml").read_text())
