"""MESM through the generic trainer, evaluator and CLIs (tiny widths, synthetic data in the official layout).

* a short Charades run (honest ``train.selection=val``) writes ``config.json``, ``metrics.jsonl``, ``ckpt/latest``
  and ``ckpt/best_val``; its loss falls; its test numbers are the metrics that ``python -m jaxprvr.metrics.moments``
  computes from the submission ``jaxprvr.evaluate`` writes (an independent path through files), and a brute-force
  R1/mIoU over that submission (plain python, the official definitions) agrees;
* ``--eval-batches`` replays a batch composition: the saved composition reproduces the submission exactly, and with
  the official head-major T2V mask another composition changes the predictions (the quirk is live);
* Charades-CG selects on two splits with one best checkpoint each (``ckpt/best_novel_composition``,
  ``ckpt/best_novel_word``) and reports each test split on its own best (the official protocol);
* tensors without an official gradient (``txt_position_embed``, SS-MESM's ``output_sent_proj``) never move.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxprvr.errors import JaxprvrError

TINY = ["data.feat_dims=(16,16)", "model.hidden_dim=16", "model.nheads=2", "model.dim_feedforward=32",
        "model.clip_width=16", "model.clip_layers=1", "model.clip_heads=2", "model.t_feat_dim=16",
        "model.num_recfw_layers=1", "model.t2v_layers=1", "model.enc_layers=1", "model.num_recss_layers=1",
        "data.pos_tagger=rule", "train.batch_size=4", "data.eval_batch_size=8", "data.prefetch=0",
        "train.log_every=1", "train.lr=1e-3",
        # one set of static shapes for every split and both datasets: one compiled train step, one evaluation
        "data.row_capacity=48", "data.video_capacity=194", "model.ss_slots=8"]
SIZES = {"charades": {"train": 16, "test": 8}, "charades_cg": {"train": 12, "novel_composition": 4, "novel_word": 4,
                                                               "test_trivial": 4}}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    from jaxprvr.data.synthetic_mesm import write

    out = {}
    for ds, sizes in SIZES.items():
        out[ds] = tmp_path_factory.mktemp(f"mesm-{ds}")
        write(ds, None, out[ds], sizes=sizes, feat_dims={"clip_image": 16, "slowfast": 16}, seed=1)
    return out


def _cfg(ds, extra=()):
    from jaxprvr.config import load_config

    return load_config(ds, "mesm", TINY + list(extra))


@pytest.fixture(scope="module")
def run(roots, tmp_path_factory):
    from jaxprvr.train import train

    out = tmp_path_factory.mktemp("run") / "charades"
    summary = train(_cfg("charades", ["train.selection=val", "train.n_epoch=3"]), roots["charades"], out,
                    progress=False)
    return out, summary


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_the_official_outputs_and_learns(run):
    out, summary = run
    assert (out / "config.json").is_file()
    assert {p.name for p in (out / "ckpt").iterdir()} == {"latest", "best_val"}
    steps = [r for r in _records(out) if "loss" in r and "split" not in r]
    assert all(np.isfinite(r["loss"]) for r in steps)
    first, last = steps[0]["loss"], np.mean([r["loss"] for r in steps[-3:]])
    assert last < first, (first, last)
    test = summary["test"]
    assert test["checkpoint"] == "best_val" and test["split"] == "test"
    for k in ("MR-full-R1@0.5", "MR-full-mAP", "MR-full-miou", "chance_R1@0.5"):
        assert np.isfinite(test[k])


def _iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def test_evaluate_cli_submission_and_metrics_cli_agree(run, roots, tmp_path):
    from jaxprvr.evaluate import main as evaluate
    from jaxprvr.metrics.moments import main as metrics_cli

    out, summary = run
    ev = tmp_path / "eval"
    argv = ["--config", "charades", "--model", "mesm", "--ckpt", str(out), "--data-root", str(roots["charades"]),
            "--split", "test", "--save-predictions", str(ev), "--no-progress"] + sum((["--set", s] for s in TINY), [])
    assert evaluate(argv) == 0
    sub = ev / "charades_test_submission.jsonl"
    rows = [json.loads(line) for line in sub.read_text().splitlines()]
    saved = json.loads((ev / "metrics.json").read_text())
    # the run's own test evaluation and the CLI's agree (same checkpoint, same data)
    for k, v in saved["brief"].items():
        assert summary["test"][k] == v, k
    # an independent path: the metrics CLI on the files (ground truth rebuilt from the annotation file)
    from jaxprvr.data.mesm import open_mesm

    gt = open_mesm("charades", None, roots["charades"], "test", text=False, feat_dims=(16, 16)).gt_rows()
    gt_file = tmp_path / "gt.jsonl"
    gt_file.write_text("\n".join(json.dumps(r) for r in gt))
    assert metrics_cli(["--dataset", "charades", "--submission", str(sub), "--gt", str(gt_file),
                        "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["brief"] == saved["brief"]
    # brute force: R1@t of the top-1 window and mIoU (single GT window per query)
    by_qid = {r["qid"]: r for r in gt}
    assert sorted(r["qid"] for r in rows) == sorted(by_qid)
    ious = [_iou(r["pred_relevant_windows"][0][:2], by_qid[r["qid"]]["relevant_windows"][0]) for r in rows]
    for t in (0.3, 0.5, 0.7):
        assert saved["brief"][f"MR-full-R1@{t}"] == pytest.approx(100 * np.mean(np.asarray(ious) >= t), abs=0.006)
    assert saved["brief"]["MR-full-miou"] == pytest.approx(100 * np.mean(ious), abs=0.006)
    for r in rows:  # the official submission rows: 10 windows sorted by score, integer seconds (clip_len 1)
        w = np.asarray(r["pred_relevant_windows"])
        assert w.shape == (10, 3) and np.all(np.diff(w[:, 2]) <= 0) and np.all(w[:, :2] == np.round(w[:, :2]))


def test_eval_batches_replay_and_the_head_major_quirk(run, roots, tmp_path):
    import dataclasses

    import jax

    from jaxprvr.checkpoint import load_params
    from jaxprvr.models import build_model
    from jaxprvr.tasks.vmr_detr import TASK
    from jaxprvr.train import init_variables

    out, _ = run
    cfg = _cfg("charades", ["train.selection=val"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ss_slots=8))
    model = build_model(cfg.model)
    abstract, _ = jax.eval_shape(lambda: init_variables(model, cfg, jax.random.PRNGKey(0)))
    params, _ = load_params(out / "ckpt" / "best_val", abstract)

    def submission(replay=None, mask="head_major"):
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, t2v_mask=mask),
                                data=dataclasses.replace(cfg.data, eval_batches=str(replay) if replay else ""))
        ds = TASK.open_split(c, roots["charades"], "test")
        res = TASK.evaluator(build_model(c.model), c).evaluate(params, ds, keep_outputs=True)
        comp = [[int(ds.ds.queries[r].qid) for it in items for r in it] for items in res["_batches"]]
        return {r["qid"]: r["pred_relevant_windows"] for r in res["_submission"]}, comp

    first, comp = submission()
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps(comp))
    assert submission(replay)[0] == first  # the saved composition reproduces the submission exactly
    # reversed row order inside each batch: the official head-major mask mixes rows' masks, so outputs move
    replay.write_text(json.dumps([list(reversed(b)) for b in comp]))
    moved = submission(replay)[0]
    assert any(moved[q] != first[q] for q in first)
    # the same replay through the CLI (--eval-batches, --out): the official submission file holds those windows
    from jaxprvr.evaluate import main as evaluate

    ev = tmp_path / "cli"
    assert evaluate(["--config", "charades", "--model", "mesm", "--ckpt", str(out / "ckpt" / "best_val"),
                     "--data-root", str(roots["charades"]), "--split", "test", "--eval-batches", str(replay),
                     "--out", str(ev), "--no-progress"] + sum((["--set", s] for s in TINY), [])) == 0
    rows = [json.loads(line) for line in (ev / "charades_test_submission.jsonl").read_text().splitlines()]
    assert {r["qid"]: r["pred_relevant_windows"] for r in rows} == moved
    # the corrected per-row mask: the composition changes nothing
    assert submission(replay, "per_row")[0] == submission(None, "per_row")[0]


def test_frozen_tensors_get_no_update(run):
    """The optimizer of the task never moves the tensors without an official gradient (torch's AdamW skips a
    ``grad is None`` tensor: no step, no decay), even given a gradient, and moves the others."""
    import jax

    from jaxprvr.checkpoint import load_params
    from jaxprvr.models import build_model
    from jaxprvr.tasks.vmr_detr import TASK
    from jaxprvr.train import init_variables

    out, _ = run
    cfg = _cfg("charades", ["train.selection=val"])
    model = build_model(cfg.model)
    abstract, _ = jax.eval_shape(lambda: init_variables(model, cfg, jax.random.PRNGKey(0)))
    params, _ = load_params(out / "ckpt" / "latest", abstract)
    tx = TASK.optimizer(cfg, params, 4)
    leaves, tree = jax.tree.flatten(params)
    grads = jax.tree.unflatten(tree, [np.full(np.shape(x), 0.01, np.float32) for x in leaves])
    upd, _ = tx.update(grads, tx.init(params), params)
    frozen = {"txt_position_embed": upd["txt_position_embed"],
              "output_sent_proj": {k: v for k, v in upd["ss_reconstructor"].items() if k.startswith("output_sent_proj")}}
    assert frozen["output_sent_proj"] and all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(frozen))
    assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(upd["class_embed"]))
    # and through training: the trained checkpoint still holds the official init of those tensors
    np.testing.assert_array_equal(np.asarray(params["txt_position_embed"]["LayerNorm"]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(params["txt_position_embed"]["LayerNorm"]["bias"]), 0.0)


def test_charades_cg_selects_on_two_splits(roots, tmp_path):
    from jaxprvr.train import train

    out = tmp_path / "cg"
    summary = train(_cfg("charades_cg", ["train.n_epoch=1"]), roots["charades_cg"], out, progress=False)
    assert {p.name for p in (out / "ckpt").iterdir()} == {"latest", "best_novel_composition", "best_novel_word"}
    tests = summary["tests"]
    assert tests["novel_composition"]["checkpoint"] == "best_novel_composition"
    assert tests["novel_word"]["checkpoint"] == "best_novel_word"
    assert tests["test_trivial"]["checkpoint"] == "best_novel_composition"
    vals = [r for r in _records(out) if r.get("split") == "val"]
    assert [r["eval_split"] for r in vals] == ["novel_composition", "novel_word"]
    saved = json.loads((out / "test_results.json").read_text())
    assert set(saved) == {"novel_composition", "novel_word", "test_trivial"}


def test_evaluation_needs_no_pos_tagger(roots, monkeypatch):
    """POS weights drive only training's MLM masking: with ``data.pos_tagger=nltk`` (the default) and NLTK's tagger
    data missing, an evaluation split opens (the official eval path needs no tagger) and training still refuses."""
    from jaxprvr.tasks.vmr_detr import TASK
    from jaxprvr.text import pos

    def missing():
        raise JaxprvrError("nltk data", "the NLTK POS tagger model", "it is not installed")

    monkeypatch.setattr(pos, "require_nltk", missing)
    cfg = _cfg("charades", ["data.pos_tagger=nltk"])
    assert len(TASK.open_split(cfg, roots["charades"], "test")) > 0
    with pytest.raises(JaxprvrError, match="NLTK POS tagger"):
        TASK.open_split(cfg, roots["charades"], "train")


def test_shape_buckets_change_shapes_not_outputs(run, roots):
    """``data.bucket_rows`` / ``bucket_frames``: each batch padded to multiples of its own rows and frames (never past
    the split's capacity; a given capacity fixes its axis), and the model's outputs on the real rows and frames equal
    those of the same batch at the full static capacities."""
    import jax

    from jaxprvr.checkpoint import load_params
    from jaxprvr.models import build_model
    from jaxprvr.tasks.vmr_detr import TASK
    from jaxprvr.train import init_variables

    out, _ = run
    base = [s for s in TINY if not s.startswith(("data.row_capacity", "data.video_capacity"))] + [
        "data.eval_batch_size=3"]
    from jaxprvr.config import load_config

    cfg = load_config("charades", "mesm", base + ["data.bucket_rows=8", "data.bucket_frames=16"])
    ds = TASK.open_split(cfg, roots["charades"], "test")
    full = ds.ds.capacities(False)
    fixed = TASK.open_split(load_config("charades", "mesm", base + [f"data.video_capacity={full.video}",
                                                                   f"data.row_capacity={full.rows}"]),
                            roots["charades"], "test")
    model = build_model(cfg.model)
    abstract, _ = jax.eval_shape(lambda: init_variables(model, cfg, jax.random.PRNGKey(0)))
    params, _ = load_params(out / "ckpt" / "best_val", abstract)
    fwd = jax.jit(lambda p, b: model.apply({"params": p}, b, train=False)[0])
    shapes = set()
    for (b, s), (bf, sf) in zip(ds.batches(None, False), fixed.batches(None, False)):
        n, lv = len(b.official["qid"]), np.shape(b.official["video_feat"])[1]
        r, v = np.shape(s["video_mask"])
        assert r == min(full.rows, -(-n // 8) * 8) and v == min(full.video, -(-lv // 16) * 16)
        assert np.shape(sf["video_mask"]) == (full.rows, full.video)
        shapes.add((r, v))
        o, of = fwd(params, s), fwd(params, sf)
        for k in ("pred_logits", "pred_spans"):
            np.testing.assert_allclose(np.asarray(o[k])[:n], np.asarray(of[k])[:n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(o["saliency_scores"])[:n, :lv], np.asarray(of["saliency_scores"])[:n, :lv],
                                   rtol=1e-5, atol=1e-6)
    assert any(sh != (full.rows, full.video) for sh in shapes)  # the buckets did cut something
