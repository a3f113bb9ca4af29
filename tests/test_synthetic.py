"""The synthetic writer: its files parse with the readers, it has the promised structure, and its signal is
learnable by a linear cross-modal map but not by raw nearest neighbour."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxprvr.config import load_config
from jaxprvr.data import open_splits, synthetic
from jaxprvr.data.msl_format import read_video2frames
from jaxprvr.data.synthetic import demo_root, main, write_synthetic
from jaxprvr.errors import JaxprvrError


def cfg_for(dataset, q_dim):
    return load_config(dataset, model="ms_sl", overrides=[f"model.q_feat_size={q_dim}"])


@pytest.fixture(scope="module")
def act(tmp_path_factory):
    """ActivityNet-style data with equal visual and query dims, so raw nearest neighbour is possible."""
    root = write_synthetic(tmp_path_factory.mktemp("act"), "act", n_train=150, n_val=10, n_test=60, seed=1,
                           visual_dim=24, query_dim=24)
    return open_splits(root, cfg_for("act", 24))


@pytest.mark.parametrize("dataset,per_video", [("tvr", (5, 5)), ("act", (1, 8)), ("cha", (1, 4))])
def test_structure(tmp_path, dataset, per_video):
    root = write_synthetic(tmp_path, dataset, n_train=40, n_val=8, n_test=8, seed=2, visual_dim=16, query_dim=12)
    splits = open_splits(root, cfg_for(dataset, 12))
    all_videos = []
    for split, ds in splits.items():
        assert ds.visual_dim == 16 and ds.query_dim == 12
        assert ds.num_videos == {"train": 40, "val": 8, "test": 8}[split]
        assert all(re.fullmatch(rf"syn_{split}_\d{{5}}", v) for v in ds.video_ids)
        assert all(re.fullmatch(r"syn_\w+#enc#\d+", c) for c in ds.cap_ids)
        low, high = per_video
        assert low <= ds.query_counts.min() and ds.query_counts.max() <= high
        # Edge cases: a 1-frame video, one shorter than map_size, one longer than max_ctx_l;
        # a 1-token query and one longer than max_desc_l.
        assert 1 in ds.num_frames and (ds.num_frames < 32).sum() >= 2 and (ds.num_frames > 128).any()
        tokens = [ds.queries.file[c].shape[0] for c in ds.cap_ids]
        assert 1 in tokens and max(tokens) > 30
        for i in range(ds.num_videos):
            clip, frames = ds.video_item(i)
            assert clip.shape == (32, 16) and frames.shape == (min(ds.num_frames[i], 128), 16)
        all_videos += ds.video_ids
    assert len(all_videos) == len(set(all_videos))  # disjoint splits
    table = read_video2frames(root / splits["train"].videos.feature_dir / "video2frames.txt")
    assert table["syn_val_00003"] == [f"syn_val_00003_{t}" for t in range(len(table["syn_val_00003"]))]
    summary = json.loads((splits["train"].videos.feature_dir.parents[1] / synthetic.MARKER).read_text())
    assert summary["videos"] == {"train": 40, "val": 8, "test": 8}


def test_official_dims_by_default(tmp_path):
    root = write_synthetic(tmp_path, "tvr", n_train=2, n_val=1, n_test=1)
    ds = open_splits(root, cfg_for("tvr", 768))["test"]
    assert (ds.visual_dim, ds.query_dim) == (3072, 768)


def test_deterministic_and_independent_of_other_splits(tmp_path):
    a = write_synthetic(tmp_path / "a", "cha", 5, 2, 2, seed=3, visual_dim=8, query_dim=8)
    b = write_synthetic(tmp_path / "b", "cha", 5, 2, 2, seed=3, visual_dim=8, query_dim=8)
    c = write_synthetic(tmp_path / "c", "cha", 5, 4, 2, seed=3, visual_dim=8, query_dim=8)
    d = write_synthetic(tmp_path / "d", "cha", 5, 2, 2, seed=4, visual_dim=8, query_dim=8)
    feature = "charades/FeatureData/i3d_rgb_lgi/feature.bin"
    assert (a / feature).read_bytes() == (b / feature).read_bytes()
    assert (a / feature).read_bytes() != (d / feature).read_bytes()
    train = [open_splits(r, cfg_for("cha", 8), ["train"])["train"] for r in (a, c)]
    for i in range(5):
        np.testing.assert_array_equal(train[0].video_item(i)[1], train[1].video_item(i)[1])


def _ranks(scores, gt):
    positive = scores[np.arange(len(gt)), gt]
    return 1 + (scores > positive[:, None]).sum(axis=1)


def _pooled(ds):
    videos = np.stack([ds.video_item(i)[1].mean(axis=0) for i in range(ds.num_videos)])
    queries = np.stack([ds.query_item(j).mean(axis=0) for j in range(ds.num_queries)])
    return videos, queries


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_signal_is_learnable_but_not_raw(act):
    train, test = act["train"], act["test"]
    v_train, q_train = _pooled(train)
    v_test, q_test = _pooled(test)
    # Closed-form ridge map, pooled query -> pooled video, fit on the train split only.
    target = v_train[train.query_video_index]
    w = np.linalg.solve(q_train.T @ q_train + np.eye(q_train.shape[1]), q_train.T @ target)
    learned = _ranks(_unit(q_test @ w) @ _unit(v_test).T, test.query_video_index)
    raw = _ranks(_unit(q_test) @ _unit(v_test).T, test.query_video_index)
    n = test.num_videos  # chance: R@1 = 1/60, R@10 = 1/6
    assert (learned <= 1).mean() > 0.3 and (learned <= 10).mean() > 0.6
    assert (raw <= 1).mean() < 0.1 and (raw <= 10).mean() < 0.35
    assert abs(np.median(raw) - (n + 1) / 2) < n / 4 and np.median(learned) <= 2


def test_refuses_existing_collection(tmp_path):
    write_synthetic(tmp_path, "cha", 1, 1, 1, visual_dim=4, query_dim=4)
    with pytest.raises(JaxprvrError, match="charades: expected a folder that does not exist yet"):
        write_synthetic(tmp_path, "cha", 1, 1, 1, visual_dim=4, query_dim=4)


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--train-videos" in capsys.readouterr().out
    assert main(["--dataset", "cha", "--out", str(tmp_path / "x"), "--train-videos", "3", "--val-videos", "2",
                 "--test-videos", "2", "--visual-dim", "8", "--query-dim", "6"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["out"] == str(tmp_path / "x") and line["videos"] == {"train": 3, "val": 2, "test": 2}
    assert line["frames"] == sum(len(f) for f in read_video2frames(
        tmp_path / "x/charades/FeatureData/i3d_rgb_lgi/video2frames.txt").values())
    # As a module, and a user error is one line on stderr with a non-zero exit.
    args = [sys.executable, "-m", "jaxprvr.data.synthetic", "--dataset", "cha", "--out", str(tmp_path / "x")]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "error:" in proc.stderr


def _small_demo(monkeypatch):
    monkeypatch.setitem(synthetic.DEMO_SIZES, "cha", (3, 2, 2))


def test_demo_root_creates_once(tmp_path, monkeypatch):
    _small_demo(monkeypatch)
    monkeypatch.setenv("JAXPRVR_CACHE", str(tmp_path / "cache"))
    root = demo_root("cha")
    assert root == tmp_path / "cache" / "demo" / "cha-v1"
    assert open_splits(root, cfg_for("cha", 1024), ["train"])["train"].num_videos == 3
    calls = []
    monkeypatch.setattr(synthetic, "write_synthetic", lambda *a, **k: calls.append(a))
    assert demo_root("cha") == root and calls == []
    assert os.listdir(root.parent) == ["cha-v1"]  # no temporary folder left behind


def test_demo_root_interrupted_leaves_nothing(tmp_path, monkeypatch):
    _small_demo(monkeypatch)
    real = synthetic.write_synthetic

    def interrupted(out_root, *args, **kwargs):
        real(out_root, *args, **kwargs)
        (out_root / "charades" / synthetic.MARKER).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_synthetic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_root("cha", cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(synthetic, "write_synthetic", real)
    assert (demo_root("cha", cache_dir=tmp_path) / "charades" / synthetic.MARKER).is_file()


def test_demo_root_concurrent_creator_wins(tmp_path, monkeypatch):
    _small_demo(monkeypatch)
    real = synthetic.write_synthetic
    final = tmp_path / "cha-v1"

    def racing(out_root, *args, **kwargs):
        real(out_root, *args, **kwargs)
        real(final, *args, **kwargs)  # another process finishes first and renames its copy into place
        (final / "winner").touch()

    monkeypatch.setattr(synthetic, "write_synthetic", racing)
    assert demo_root("cha", cache_dir=tmp_path) == final
    assert (final / "winner").exists() and os.listdir(tmp_path) == ["cha-v1"]


def test_demo_root_rejects_incomplete_folder(tmp_path):
    (tmp_path / "cha-v1").mkdir()
    with pytest.raises(JaxprvrError, match="without it"):
        demo_root("cha", cache_dir=tmp_path)
