"""The text-video retrieval task on tiny synthetic MSR-VTT / MSVD data (real videos): the batches (drop_last, seeded
order and augmentation, file order with data.shuffle=false), the evaluator against a brute-force forward over every
(text, video) pair with the metrics recomputed from it (pairs and grouped protocols, blocking does not matter), the
train and evaluate CLIs (metrics.jsonl fields, the --save-scores / --save-features / --save-inputs files)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxprvr.config import load_config
from jaxprvr.data.synthetic_t2v import write_synthetic_t2v
from jaxprvr.metrics.t2v import t2v_metrics
from jaxprvr.models import build_model
from jaxprvr.tasks import t2v as T
from jaxprvr.train import init_variables

TINY = ["model.image_resolution=32", "model.vision_patch_size=16", "model.vision_width=64", "model.vision_layers=1",
        "model.text_width=32", "model.text_layers=1", "model.embed_dim=32", "model.num_hidden_layers=1",
        "model.vision_heads=2", "model.text_heads=2", "model.max_frames=4", "model.max_words=16",
        "train.batch_size=4", "data.eval_batch_size=4", "data.prefetch=1", "data.workers=1"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("t2v")
    write_synthetic_t2v(base / "msrvtt", "msrvtt", n_train=6, n_test=6, seed=1)
    write_synthetic_t2v(base / "msvd", "msvd", n_train=4, n_val=4, n_test=4, seed=2)
    return {"msrvtt": base / "msrvtt", "msvd": base / "msvd"}


def _cfg(dataset, extra=()):
    return load_config(dataset, "clip_wti", TINY + list(extra))


@pytest.fixture(scope="module")
def model_params():
    cfg = _cfg("msrvtt")
    model = build_model(cfg.model)
    params, _ = jax.jit(lambda k: init_variables(model, cfg, k))(jax.random.PRNGKey(0))
    return model, T.TASK.initial_params(cfg, params)


def test_batches_drop_last_seeded_and_file_order(roots):
    cfg = _cfg("msrvtt")
    ds = T.TASK.open_split(cfg, roots["msrvtt"], "train")
    n = len(ds)
    assert ds.augment and n >= 8
    b1 = list(T.train_batches(ds, cfg, epoch=0))
    b2 = list(T.train_batches(ds, cfg, epoch=0))
    assert len(b1) == n // 4  # drop_last
    for x, y in zip(b1, b2):  # same seed, same epoch: same pairs and the same augmented pixels
        assert np.array_equal(x["pairs"], y["pairs"]) and np.array_equal(x["video"], y["video"])
    other = list(T.train_batches(ds, cfg, epoch=1))
    assert not all(np.array_equal(x["pairs"], y["pairs"]) for x, y in zip(b1, other))
    order = np.concatenate([b["pairs"] for b in b1])
    assert np.array_equal(order, np.random.default_rng([cfg.train.seed, 0]).permutation(n)[:len(order)])
    for b in b1:  # the ids are clip_sequences of the pairs' captions, the video the pair's
        assert np.array_equal(b["text_ids"], ds.text_ids[b["pairs"]])
        assert b["video"].shape == (4, 4, 3, 32, 32) and b["video_mask"].dtype == np.int32
    fixed = _cfg("msrvtt", ["data.shuffle=false", "data.augment=none"])
    ds2 = T.TASK.open_split(fixed, roots["msrvtt"], "train")
    f = list(T.train_batches(ds2, fixed, epoch=3))
    assert np.array_equal(np.concatenate([b["pairs"] for b in f]), np.arange(len(f) * 4))
    # without augmentation a training video equals the evaluation one (same frames, same preprocessing)
    v, m = ds2.video(int(ds2.caption_video[0]))
    assert np.array_equal(f[0]["video"][0], v) and np.array_equal(f[0]["video_mask"][0], m)


@pytest.mark.parametrize("dataset,block", [("msrvtt", 4), ("msvd", 3)])
def test_evaluator_matches_a_brute_force_forward(roots, model_params, dataset, block):
    cfg = _cfg(dataset, [f"data.sim_block={block}"])
    model, params = model_params
    ds = T.TASK.open_split(cfg, roots[dataset], "test")
    res = T.TASK.evaluator(model, cfg).evaluate(params, ds, keep_outputs=True)
    # brute force: every caption against every unique video in one forward, no padding, no blocks
    videos = [ds.video(i) for i in range(ds.n_videos)]
    v = np.stack([a for a, _ in videos])
    vm = np.stack([b for _, b in videos]).astype(np.int32)
    fwd = jax.jit(lambda p, ids, tm, v, vm: model.apply({"params": p}, model.apply(
        {"params": p}, ids, method="text_features"), tm, model.apply({"params": p}, v, vm, method="video_features"),
        vm, method="similarity"))
    sim = np.asarray(fwd(params, ds.text_ids.astype(np.int32), ds.text_mask.astype(np.int32), v, vm))
    protocol = "pairs" if dataset == "msrvtt" else "grouped"
    assert res["protocol"] == protocol
    if protocol == "pairs":
        sim = sim[:, ds.caption_video]
    np.testing.assert_allclose(res["_sim"], sim, rtol=1e-5, atol=1e-6)
    ref = t2v_metrics(res["_sim"], protocol, None if protocol == "pairs" else ds.caption_video)
    for k in ("t2v/R1", "t2v/R5", "t2v/MnR", "v2t/R1", "v2t/MdR"):
        assert res[k] == ref[k], k
    assert res["n_text"] == len(ds) and res["n_video"] == ds.n_videos


def test_msvd_official_pairs_protocol_expands_the_columns(roots, model_params):
    cfg = _cfg("msvd", ["data.protocol=pairs"])
    model, params = model_params
    ds = T.TASK.open_split(cfg, roots["msvd"], "test")
    res = T.TASK.evaluator(model, cfg).evaluate(params, ds, keep_outputs=True)
    assert res["_sim"].shape == (len(ds), len(ds))
    # a video's columns are identical (the official matrix encodes each video once per caption)
    cv = ds.caption_video
    for j in range(1, len(ds)):
        same = np.flatnonzero(cv == cv[j])
        assert all(np.array_equal(res["_sim"][:, j], res["_sim"][:, k]) for k in same)


def test_train_and_evaluate_clis(roots, tmp_path):
    from jaxprvr import evaluate, train

    run = tmp_path / "run"
    sets = [f"--set={s}" for s in TINY + ["train.n_epoch=1", "train.log_every=1"]]
    rc = train.main(["--config", "msrvtt", "--data-root", str(roots["msrvtt"]), "--out", str(run), "--no-progress",
                     *sets])
    assert rc == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in recs if "loss" in r]
    assert step and {"loss", "grad_norm", "lr", "lr_clip", "lr_head", "logit_scale"} <= set(step[0])
    assert step[0]["lr"] == 0.0  # warmup_cosine's first step
    assert step[-1]["lr_clip"] == pytest.approx(step[-1]["lr"] * 1e-3)
    out = tmp_path / "scores"
    rc = evaluate.main(["--config", "msrvtt", "--ckpt", str(run), "--data-root", str(roots["msrvtt"]),
                        "--save-scores", str(out), "--save-features", "--save-inputs", "--no-progress"])
    assert rc == 0
    sim = np.load(out / "sim.npy")
    ids = json.loads((out / "ids.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    feats = np.load(out / "features.npz")
    inputs = np.load(out / "inputs.npz")
    frames = json.loads((out / "frames.json").read_text())
    assert sim.shape == (len(ids["captions"]), len(ids["video_ids"])) and ids["gt"] == list(range(len(sim)))
    assert metrics["t2v/R1"] == t2v_metrics(sim, "pairs")["t2v/R1"]
    assert feats["text"].shape[1:] == (16, 32) and feats["video"].shape[1:] == (4, 32)
    assert inputs["video"].shape[1:] == (4, 3, 32, 32) and set(frames) == set(ids["video_ids"])
    test = json.loads((run / "test_results.json").read_text())
    assert test["chance_t2v/R1"] == pytest.approx(100.0 / len(sim))


def test_frames_cli_fills_the_store_the_task_reads(roots, tmp_path):
    """``python -m jaxprvr.data.frames`` decodes each video once; a second run finds them all; the task then reads
    the same videos from that store as decoding the files directly gives (jaxprvr.data.video.load_clip)."""
    from jaxprvr.data import frames
    from jaxprvr.data.video import load_clip

    store = tmp_path / "store"
    args = ["--config", "msrvtt", "--data-root", str(roots["msrvtt"]), "--split", "test", "--out", str(store),
            "--no-progress", *[f"--set={s}" for s in TINY]]
    first = frames.run(frames.build_parser().parse_args(args))
    again = frames.run(frames.build_parser().parse_args(args))
    assert first["decoded"] == first["videos"] > 0 and again["already_stored"] == first["videos"]
    assert again["decoded"] == 0
    cfg = _cfg("msrvtt", [f"data.frame_cache={store}"])
    ds = T.TASK.open_split(cfg, roots["msrvtt"], "test")
    assert str(ds.store.root).startswith(str(store))
    for i in range(ds.n_videos):
        v, m = ds.video(i)
        ref = load_clip(ds.data.video_path(ds.video_ids[i]), max_frames=4, size=32)
        assert np.array_equal(v, ref.video) and np.array_equal(m, ref.mask)
    assert frames.main(["--config", "tvr", "--data-root", str(tmp_path)]) == 2
