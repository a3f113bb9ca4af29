"""The synthetic moment-retrieval writer: the official layout read back through MMNDataset (durations, clamped GT,
stable rank order with ties), .pt files torch.load reads, the CLI dispatch, the demo cache, and a planted signal
that a linear cross-modal map localises far above chance on held-out videos."""

import json

import h5py
import numpy as np
import pytest

from jaxprvr.config import load_config
from jaxprvr.data import synthetic, synthetic_vmr
from jaxprvr.data.mmn_format import MMNDataset, annotation_file, resolve
from jaxprvr.data.synthetic_vmr import demo_root, write_synthetic_vmr
from jaxprvr.data.torch_pt import read_pt_tensor
from jaxprvr.errors import JaxprvrError

torch = pytest.importorskip("torch")

SIZES = {"activitynet": (6, 3, 4), "tacos": (4, 2, 3), "charades": (6, 0, 4)}


@pytest.fixture(scope="module", params=["activitynet", "tacos", "charades"])
def written(request, tmp_path_factory):
    dataset = request.param
    root = tmp_path_factory.mktemp(dataset)
    write_synthetic_vmr(root, dataset, *SIZES[dataset], seed=5, ties=True)
    return dataset, root, load_config(dataset)


def test_layout(written):
    dataset, root, cfg = written
    ann = resolve(root, cfg.data.ann_dir)
    splits = sorted(p.name for p in ann.glob("*_audio_new.json"))
    expected = ["test", "train"] + (["val"] if dataset != "charades" else [])
    assert splits == sorted(f"{s}_audio_new.json" for s in expected)
    video_feat = resolve(root, cfg.data.video_feat)
    annos = json.loads((ann / "train_audio_new.json").read_text())
    vid = next(iter(annos))
    if dataset == "activitynet":
        assert vid.startswith("v_") and len(vid) == 13
        with h5py.File(video_feat / f"{vid}.h5") as f:
            assert f["feature"].shape[1] == 500 and f["feature"].dtype == np.float32
        assert set(annos[vid]) == {"duration", "timestamps", "sentences", "audios"}
    elif dataset == "tacos":
        assert video_feat.is_file() and vid.endswith(".avi")
        with h5py.File(video_feat) as f:
            assert set(f) >= set(annos) and f[vid].shape[1] == 500
        assert {"num_frames", "fps"} <= set(annos[vid]) and "duration" not in annos[vid]
        assert all(isinstance(t, int) for ts in annos[vid]["timestamps"] for t in ts)  # frames
    else:
        x = np.load(video_feat / f"{vid}.npy")
        assert x.ndim == 4 and x.shape[1:] == (1, 1, 1024)
    assert all(a.startswith(vid.split(".")[0][2 if dataset == "activitynet" else 0:]) and a.endswith(".wav")
               for a in annos[vid]["audios"])
    summary = json.loads((ann / synthetic_vmr.MARKER).read_text())
    assert summary["videos"] == {s: n for s, n in zip(("train", "val", "test"), SIZES[dataset]) if n}


def test_round_trip_through_mmn_dataset(written):
    dataset, root, cfg = written
    unsorted = past_end = ties = below = above = 0
    for split in cfg.data.splits:
        ds = MMNDataset(root, cfg, split)
        annos = json.loads(annotation_file(root, cfg, split).read_text())
        assert ds.video_ids == list(annos)
        for i, (vid, a) in enumerate(annos.items()):
            fps = a.get("fps")
            dur = a["num_frames"] / fps if fps else a["duration"]
            ts = [(s / fps, e / fps) if fps else (s, e) for s, e in a["timestamps"]]
            clamped = [(max(s, 0.0), min(e, dur)) for s, e in ts]
            rank = sorted(range(len(ts)), key=lambda k: (np.float32(clamped[k][0]), k))  # stable by start
            r = ds.record(i)
            assert r.duration == dur
            np.testing.assert_array_equal(r.moments, np.array([clamped[k] for k in rank], np.float32))
            assert r.query_ids == tuple(a["audios"][k].split(".")[0] for k in rank)
            starts = [s for s, _ in ts]
            unsorted += starts != sorted(starts)
            past_end += any(e > dur for _, e in ts)
            ties += len(set(starts)) < len(starts)
            t = ds.raw_video(vid).shape[0]
            below += t < cfg.model.num_pre_clips
            above += t > cfg.model.num_pre_clips
            assert r.feats.shape == (cfg.model.num_pre_clips, cfg.model.input_size)
            assert r.queries.shape == (len(ts), 768)
    assert unsorted and past_end >= len(cfg.data.splits) and ties and below >= 2 and above >= 2


def test_torch_loads_the_query_files(written):
    dataset, root, cfg = written
    files = sorted(resolve(root, cfg.data.query_feat_dir).glob("*.pt"))[:8]
    shapes = set()
    for f in files:
        t = torch.load(f, weights_only=True)
        assert t.dtype == torch.float32
        shapes.add(tuple(t.shape))
        assert t.numpy().tobytes() == read_pt_tensor(f).tobytes()
    assert shapes == {(1, 768), (1, 1, 768)}


def test_without_ties_no_tied_starts(tmp_path):
    write_synthetic_vmr(tmp_path, "charades", 12, None, 3, seed=1)
    cfg = load_config("charades")
    annos = json.loads(annotation_file(tmp_path, cfg, "train").read_text())
    for a in annos.values():
        starts = [s for s, _ in a["timestamps"]]
        assert len(set(starts)) == len(starts)


def test_deterministic(tmp_path):
    cfg = load_config("activitynet")
    a = write_synthetic_vmr(tmp_path / "a", "activitynet", 3, 2, 2, seed=3)
    b = write_synthetic_vmr(tmp_path / "b", "activitynet", 3, 2, 2, seed=3)
    c = write_synthetic_vmr(tmp_path / "c", "activitynet", 3, 2, 2, seed=4)
    ja, jb, jc = (annotation_file(r, cfg, "val").read_text() for r in (a, b, c))
    assert ja == jb and ja != jc
    vid = next(iter(json.loads(ja)))
    h5 = resolve(a, cfg.data.video_feat) / f"{vid}.h5"
    with h5py.File(h5) as f, h5py.File(resolve(b, cfg.data.video_feat) / f"{vid}.h5") as g:
        np.testing.assert_array_equal(f["feature"][()], g["feature"][()])


def test_cli_dispatch_and_errors(tmp_path, capsys):
    assert synthetic.main(["--dataset", "tacos", "--out", str(tmp_path / "t"), "--train-videos", "2",
                           "--val-videos", "1", "--test-videos", "1", "--seed", "2", "--ties"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "tacos" and out["ties"] and out["videos"] == {"train": 2, "val": 1, "test": 1}
    MMNDataset(tmp_path / "t", load_config("tacos"), "val")
    # Charades has no val split; an existing target is refused.
    assert synthetic.main(["--dataset", "charades", "--out", str(tmp_path / "c"), "--val-videos", "3"]) == 2
    assert "charades has no val split" in capsys.readouterr().err
    assert synthetic.main(["--dataset", "tacos", "--out", str(tmp_path / "t"), "--train-videos", "1"]) == 2
    assert "does not exist yet" in capsys.readouterr().err


def test_demo_root_cached(tmp_path, monkeypatch):
    monkeypatch.setitem(synthetic_vmr.DEMO_SIZES, "charades", (3, 0, 2))
    root = demo_root("charades", cache_dir=tmp_path)
    cfg = load_config("charades")
    marker = resolve(root, cfg.data.ann_dir) / synthetic_vmr.MARKER
    stamp = marker.stat().st_mtime_ns
    assert demo_root("charades", cache_dir=tmp_path) == root and marker.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind
    assert len(MMNDataset(root, cfg, "test")) == 2
    marker.unlink()
    with pytest.raises(JaxprvrError, match="complete demo dataset"):
        demo_root("charades", cache_dir=tmp_path)


def test_planted_signal_is_learnable(tmp_path):
    """Ridge regression from query features to the (resampled) clip features of their GT span, fitted on train
    videos; on held-out videos the best-matching clip falls inside the GT span far more often than chance (the
    span's share of the video)."""
    dv, dq, npre = 48, 40, 64
    write_synthetic_vmr(tmp_path, "activitynet", 60, 1, 30, seed=7, video_dim=dv, query_dim=dq, num_pre_clips=npre)
    cfg = load_config("activitynet", overrides=[f"model.input_size={dv}", f"model.text_dim={dq}",
                                                f"model.num_pre_clips={npre}"])

    def pairs(split):
        ds = MMNDataset(tmp_path, cfg, split)
        for i in range(len(ds)):
            r = ds.record(i)
            centres = (np.arange(npre) + 0.5) * r.duration / npre
            for q, (s, e) in zip(r.queries, r.moments):
                yield q, r.feats, (centres >= s) & (centres <= e)

    xs, ys = [], []
    for q, feats, inside in pairs("train"):
        xs += [q] * int(inside.sum())
        ys += list(feats[inside])
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    w = np.linalg.solve(x.T @ x + 1.0 * np.eye(dq), x.T @ y)

    hits, chance, n = 0.0, 0.0, 0
    for q, feats, inside in pairs("test"):
        hits += inside[np.argmax(feats @ (q @ w))]
        chance += inside.mean()
        n += 1
    assert n >= 40
    assert hits / n > 0.9 and hits / n > 2.5 * chance / n, (hits / n, chance / n)
