"""MMN-format moment-retrieval data: the torch-free .pt reader (against torch.load), avgfeats / normalisation /
moment_to_iou2d (against transcriptions of the official torch code), annotation handling (clamping, TACoS frames,
stable rank order), batches, and one test per named error."""

import json
import pickletools
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from jaxprvr.config import load_config
from jaxprvr.data import mmn_format as mmn
from jaxprvr.data.mmn_format import (MMNDataset, avgfeats, collate, eval_batches, l2_normalize_rows, q_slots,
                                     train_batches)
from jaxprvr.data.torch_pt import read_pt_tensor, write_pt_tensor
from jaxprvr.errors import JaxprvrError

torch = pytest.importorskip("torch")

DV, DQ, NPRE, NCLIPS = 8, 6, 8, 4


# ---------------------------------------------------------------------------------------------- .pt reader


@pytest.mark.parametrize("make", [
    lambda: torch.randn(1, 768),
    lambda: torch.randn(1, 1, 768),
    lambda: torch.randn(768),
    lambda: torch.randn(1, 768).half(),
    lambda: torch.randn(2, 5).double(),
    lambda: torch.randn(3, 4)[:, 1],  # non-contiguous view: offset 1, stride 4
    lambda: torch.randn(5, 6).t(),  # transposed
    lambda: torch.randn(10)[3:7],  # offset into a larger storage
    lambda: torch.tensor(2.5),  # 0-d
], ids=["1x768", "1x1x768", "768", "f16", "f64", "slice", "transposed", "offset", "scalar"])
def test_pt_reader_equals_torch_load(tmp_path, make):
    x = make()
    torch.save(x, tmp_path / "q.pt")
    ref = torch.load(tmp_path / "q.pt", weights_only=True).numpy()
    got = read_pt_tensor(tmp_path / "q.pt")
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert got.tobytes() == np.ascontiguousarray(ref).tobytes()


@pytest.mark.parametrize("shape,dtype", [((1, 768), np.float32), ((1, 1, 7), np.float16), ((4,), np.float64),
                                         ((), np.float32), ((2, 40000), np.float32)])
def test_pt_writer_read_by_torch(tmp_path, shape, dtype):
    a = np.asarray(np.random.default_rng(0).standard_normal(shape)).astype(dtype)
    write_pt_tensor(tmp_path / "w.pt", a)
    t = torch.load(tmp_path / "w.pt", weights_only=True)
    assert tuple(t.shape) == shape and t.numpy().dtype == dtype and t.numpy().tobytes() == a.tobytes()
    assert read_pt_tensor(tmp_path / "w.pt").tobytes() == a.tobytes()


def test_pt_legacy_format_is_named(tmp_path):
    torch.save(torch.randn(1, 4), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(JaxprvrError, match=r"old\.pt.*legacy.*torch >= 1\.6"):
        read_pt_tensor(tmp_path / "old.pt")


def test_pt_refuses_other_pickles(tmp_path):
    torch.save({"a": torch.randn(2)}, tmp_path / "dict.pt")
    with pytest.raises(JaxprvrError, match="one tensor.*dict"):
        read_pt_tensor(tmp_path / "dict.pt")
    torch.save(torch.zeros(3, dtype=torch.int64), tmp_path / "long.pt")
    with pytest.raises(JaxprvrError, match="LongStorage"):
        read_pt_tensor(tmp_path / "long.pt")
    # A pickle that would call os.system is refused before anything runs.
    evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R."
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", evil)
    with pytest.raises(JaxprvrError, match="os.system"):
        read_pt_tensor(tmp_path / "evil.pt")
    # The payload is a pickle that plain pickle would run (the refusal is the reader's).
    assert pickletools_globals(evil) == [("os", "system")]


def pickletools_globals(data):
    return [tuple(arg.split(" ")) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]


# ---------------------------------------------------------------------------------------------- pure functions


def _avgfeats_reference(feats, n):
    """Direct numpy transcription of utils.py L49-63."""
    t = feats.shape[0]
    idxs = np.arange(0, n + 1, 1.0, dtype=np.float32) / np.float32(n) * np.float32(t)
    idxs = np.minimum(np.round(idxs).astype(np.int64), t - 1)
    rows = []
    for i in range(n):
        s, e = idxs[i], idxs[i + 1]
        rows.append(feats[s:e].mean(axis=0) if s < e else feats[s])
    return np.stack(rows)


def _avgfeats_torch(feats, n):
    """utils.py L49-63 in torch (the official function, transcribed)."""
    x = torch.from_numpy(feats)
    num_src = x.size(0)
    idxs = torch.arange(0, n + 1, 1.0) / n * num_src
    idxs = idxs.round().long().clamp(max=num_src - 1)
    out = []
    for i in range(n):
        s, e = idxs[i], idxs[i + 1]
        out.append(x[s:e].mean(dim=0) if s < e else x[s])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("t", [1, 3, 7, 24, 54, 64, 65, 100, 331])  # T < N, T = N, T > N (N = 24 and 64)
@pytest.mark.parametrize("n", [24, 64])
def test_avgfeats(t, n):
    feats = np.random.default_rng(t * n).standard_normal((t, 5)).astype(np.float32)
    got = avgfeats(feats, n)
    assert got.shape == (n, 5) and got.dtype == np.float32
    np.testing.assert_array_equal(got, _avgfeats_reference(feats, n))
    np.testing.assert_allclose(got, _avgfeats_torch(feats, n), rtol=1e-6, atol=1e-7)
    if t > n:  # the clamp: the last raw row never enters a mean, only a bin that starts on it (s >= e)
        changed = feats.copy()
        changed[-1] += 100.0
        idxs = np.minimum(np.round(np.arange(n + 1, dtype=np.float32) / np.float32(n) * np.float32(t)), t - 1)
        differs = (avgfeats(changed, n) != got).any(axis=1)
        assert differs.tolist() == (idxs[:-1] == t - 1).tolist()


def test_avgfeats_edges_float32():
    # 24 bins of 54 clips: bin 14's edge is 31.499998 in float32 (-> 31), 31.5 in float64 (-> 32).
    feats = np.arange(54, dtype=np.float64)[:, None]
    assert avgfeats(feats, 24)[13, 0] == np.mean(np.arange(29, 31))


def test_l2_normalize_rows_like_f_normalize():
    x = np.random.default_rng(1).standard_normal((6, 9)).astype(np.float32)
    x[2] = 0.0
    x[3] = 1e-14
    ref = torch.nn.functional.normalize(torch.from_numpy(x), dim=1).numpy()
    np.testing.assert_allclose(l2_normalize_rows(x), ref, rtol=1e-6, atol=0)
    assert (l2_normalize_rows(x)[2] == 0).all()
    np.testing.assert_allclose(l2_normalize_rows(x)[3], x[3] / 1e-12, rtol=1e-6)  # max(norm, eps)


def _iou2d_torch(moment, num_clips, duration):
    """utils.py L11-17, L34-46 (the official functions, transcribed)."""
    iou2d = torch.ones(num_clips, num_clips)
    grids = iou2d.nonzero()
    grids[:, 1] += 1
    cand = grids * duration / num_clips
    start, end = cand[:, 0], cand[:, 1]
    s, e = moment[0].float(), moment[1].float()
    inter = end.min(e) - start.max(s)
    union = end.max(e) - start.min(s)
    return (inter.clamp(min=0) / union).reshape(num_clips, num_clips).numpy()


@pytest.mark.parametrize("duration,n", [(82.73, 64), (333.5374149659864, 128), (30.96, 16), (9.57, 7)])
def test_moment_to_iou2d_matches_official(duration, n):
    rng = np.random.default_rng(n)
    s = rng.uniform(0, duration * 0.8, 5)
    e = np.minimum(s + rng.uniform(0.1, duration * 0.5, 5), duration)
    moments = np.stack([s, e], 1).astype(np.float32)
    moments[0] = (0.0, duration)  # the whole video
    ref = np.stack([_iou2d_torch(torch.from_numpy(m), n, duration) for m in moments])
    got = mmn._moment_to_iou2d(moments, duration, n)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    shared = mmn._iou2d_fn()  # jaxprvr.ops.proposals.moment_to_iou2d when it exists
    np.testing.assert_array_equal(shared(moments, duration, n), ref)


def test_rank_order_is_stable():
    starts = np.array([5.0, 1.0, 5.0, 0.0, 1.0, 5.0], np.float32)
    moments = np.stack([starts, starts + 1], 1)
    expected = sorted(range(6), key=lambda k: (starts[k], k))
    assert mmn.rank_order(moments).tolist() == expected


# ---------------------------------------------------------------------------------------------- a tiny dataset


def _cfg(dataset="activitynet", *extra):
    return load_config(dataset, overrides=[f"model.input_size={DV}", f"model.text_dim={DQ}",
                                           f"model.num_pre_clips={NPRE}", f"model.num_clips={NCLIPS}",
                                           "train.batch_size=3", "data.eval_batch_size=2",
                                           "data.query_capacity_multiple=4", "data.workers=1", *extra])


def _videos(rng, n):
    """n videos: (vid, duration, timestamps, T), with ties, an end past the duration and a negative start."""
    out = []
    for i in range(n):
        dur = float(np.round(rng.uniform(20, 90), 2))
        k = 1 + i % 4
        ts = [[float(np.round(rng.uniform(-2, dur * 0.6), 2)), 0.0] for _ in range(k)]
        if k >= 3:
            ts[2][0] = ts[0][0]  # a tie
        for t in ts:
            t[1] = float(np.round(max(t[0], 0) + rng.uniform(1, dur * 0.5), 2))
        if i == 1:
            ts[0][1] = dur + 3.0  # past the end
        out.append((f"v_vid{i:03d}", dur, ts, int(rng.integers(3, 20))))
    return out


def write_tiny(root: Path, dataset="activitynet", n_videos=5, splits=("train", "val", "test"), seed=0,
               query_shapes=((1, DQ), (1, 1, DQ), (DQ,))):
    """A hand-written MMN dataset at the config's catalog paths under root (small dims)."""
    cfg = _cfg(dataset)
    rng = np.random.default_rng(seed)
    ann = mmn.resolve(root, cfg.data.ann_dir)
    qdir = mmn.resolve(root, cfg.data.query_feat_dir)
    vfeat = mmn.resolve(root, cfg.data.video_feat)
    ann.mkdir(parents=True)
    qdir.mkdir(parents=True)
    (vfeat.parent if cfg.data.video_mode == "c3d_hdf5" else vfeat).mkdir(parents=True, exist_ok=True)
    truth = {}
    for code, split in enumerate(splits):
        annos = {}
        for vid, dur, ts, t in _videos(rng, n_videos):
            vid = f"{vid}_{split}" if dataset != "tacos" else f"s{code}{vid[-3:]}-d1.avi"
            feats = rng.standard_normal((t, DV)).astype(np.float32)
            audios = [f"{vid.split('.')[0]}_{split}_{k}.wav" for k in range(len(ts))]
            for k, a in enumerate(audios):
                q = rng.standard_normal(DQ).astype(np.float32)
                write_pt_tensor(qdir / f"{a.split('.')[0]}.pt", q.reshape(query_shapes[k % len(query_shapes)]))
            if cfg.data.video_mode == "c3d_h5":
                with h5py.File(vfeat / f"{vid}.h5", "w") as f:
                    f.create_dataset("feature", data=feats.astype(np.float64))
            elif cfg.data.video_mode == "c3d_hdf5":
                with h5py.File(vfeat, "a") as f:
                    f.create_dataset(vid, data=feats)
            else:
                np.save(vfeat / f"{vid}.npy", feats[:, None, None, :])
            entry = dict(timestamps=ts, sentences=["s"] * len(ts), audios=audios)
            if dataset == "tacos":
                entry.update(num_frames=int(round(dur * 25)), fps=25.0,
                             timestamps=[[int(round(s * 25)), int(round(e * 25))] for s, e in ts])
            else:
                entry["duration"] = dur
            annos[vid] = entry
            truth[vid] = feats
        (ann / f"{split}_audio_new.json").write_text(json.dumps(annos))
    return cfg, truth


@pytest.fixture(scope="module")
def anet(tmp_path_factory):
    root = tmp_path_factory.mktemp("anet")
    cfg, truth = write_tiny(root, n_videos=7)
    return root, cfg, truth


def _json(root, cfg, split):
    return json.loads(mmn.annotation_file(root, cfg, split).read_text())


@pytest.mark.parametrize("dataset", ["activitynet", "tacos", "charades"])
def test_dataset_round_trip(tmp_path, dataset):
    splits = ("train", "test") if dataset == "charades" else ("train", "val", "test")
    cfg, truth = write_tiny(tmp_path, dataset, n_videos=5, splits=splits)
    ds = MMNDataset(tmp_path, cfg, "test")
    annos = _json(tmp_path, cfg, "test")
    assert ds.video_ids == list(annos)  # file order
    assert ds.n_queries_total == sum(len(a["audios"]) for a in annos.values())
    assert ds.max_queries == 4 and q_slots(ds, cfg) == 4
    for i, (vid, a) in enumerate(annos.items()):
        r = ds.record(i)
        fps = a.get("fps")
        dur = a["num_frames"] / fps if fps else a["duration"]
        assert r.duration == dur and r.vid == vid and r.index == i
        # GT: clamped in float64, stored as float32, ranked by start (stable: JSON order among ties).
        clamped = [(max(s / (fps or 1), 0), min(e / (fps or 1), dur)) for s, e in a["timestamps"]]
        rank = sorted(range(len(clamped)), key=lambda k: (np.float32(clamped[k][0]), k))
        np.testing.assert_array_equal(r.moments, np.array([clamped[k] for k in rank], np.float32))
        assert r.query_ids == tuple(a["audios"][k].split(".")[0] for k in rank)
        for k, qid in zip(rank, r.query_ids):
            ref = torch.load(ds.query_path(qid), weights_only=True).reshape(-1).numpy()
            np.testing.assert_array_equal(r.queries[rank.index(k)], ref)
        raw = truth[vid].astype(np.float32)
        ref = _avgfeats_torch(torch.nn.functional.normalize(torch.from_numpy(raw), dim=1).numpy(), NPRE)
        assert r.feats.shape == (NPRE, DV) and r.feats.dtype == np.float32
        np.testing.assert_allclose(r.feats, ref, rtol=1e-5, atol=1e-7)


def test_absolute_paths_and_overrides(anet, tmp_path):
    root, cfg, _ = anet
    d = cfg.data
    cfg2 = _cfg("activitynet", f"data.ann_dir={root / d.ann_dir}", f"data.video_feat={root / d.video_feat}",
                f"data.query_feat_dir={root / d.query_feat_dir}")
    a = MMNDataset(tmp_path / "elsewhere", cfg2, "val")  # every path absolute: the root is not used
    b = MMNDataset(root, cfg, "val")
    assert a.video_ids == b.video_ids
    np.testing.assert_array_equal(a.record(2).feats, b.record(2).feats)


def test_speech_switches_the_query_folder(anet, tmp_path):
    root, cfg, _ = anet
    speech = tmp_path / "audio_wav2vec2_feat"
    speech.mkdir()
    ds = MMNDataset(root, cfg, "val")
    for qid in ds.annotations[0].query_ids:
        write_pt_tensor(speech / f"{qid}.pt", np.full((1, DQ), 7.0, np.float32))
    cfg_s = _cfg("activitynet", "data.query_modality=speech", f"data.speech_feat_dir={speech}")
    sp = MMNDataset(root, cfg_s, "val", check_files=False)
    assert sp.query_dir == speech
    assert (sp.record(0).queries == 7.0).all()
    with pytest.raises(JaxprvrError, match="speech_feat_dir"):
        MMNDataset(root, _cfg("activitynet", "data.query_modality=speech"), "val")


# ---------------------------------------------------------------------------------------------- batches


def test_collate_layout(anet):
    root, cfg, _ = anet
    ds = MMNDataset(root, cfg, "train")
    recs = [ds.record(i) for i in (4, 0)]
    b = collate(recs, 3, q_slots(ds, cfg), NCLIPS)
    assert b["feats"].shape == (3, NPRE, DV) and b["queries"].shape == (3, 4, DQ)
    assert b["iou2d"].shape == (3, 4, NCLIPS, NCLIPS) and b["moments"].shape == (3, 4, 2)
    assert b["video_valid"].tolist() == [1, 1, 0] and b["index"].tolist() == [4, 0, -1]
    assert b["n_queries"].tolist() == [len(recs[0].query_ids), len(recs[1].query_ids), 0]
    for j, r in enumerate(recs):
        n = len(r.query_ids)
        assert b["query_mask"][j].tolist() == [1.0] * n + [0.0] * (4 - n)
        np.testing.assert_array_equal(b["queries"][j, :n], r.queries)
        assert not b["queries"][j, n:].any() and not b["iou2d"][j, n:].any()
        np.testing.assert_array_equal(b["iou2d"][j, :n], mmn._moment_to_iou2d(r.moments, r.duration, NCLIPS))
        assert b["duration"][j] == np.float32(r.duration) and b["vid"][j] == r.vid
        assert b["query_ids"][j] == list(r.query_ids)
    assert not b["feats"][2].any() and b["vid"][2] == "" and b["query_ids"][2] == []
    for v in b.values():
        if isinstance(v, np.ndarray):
            assert v.dtype in (np.float32, np.int32)


def test_train_batches_order_skip_and_padding(anet):
    root, cfg, _ = anet
    ds = MMNDataset(root, cfg, "train")  # 7 videos, batch 3 -> 3 batches, the last with 1 video
    batches = list(train_batches(ds, cfg, epoch=3))
    order = np.random.default_rng([cfg.train.seed, 3]).permutation(7)
    assert len(batches) == 3
    got = np.concatenate([b["index"] for b in batches])
    assert got[:7].tolist() == order.tolist() and got[7:].tolist() == [-1, -1]
    assert batches[-1]["video_valid"].tolist() == [1, 0, 0]
    assert all(b["feats"].shape == (3, NPRE, DV) for b in batches)
    other = np.concatenate([b["index"] for b in train_batches(ds, cfg, epoch=4)])
    assert other.tolist() != got.tolist()
    resumed = list(train_batches(ds, cfg, epoch=3, skip=1))
    assert len(resumed) == 2
    for a, b in zip(batches[1:], resumed):
        for k in ("feats", "queries", "iou2d", "index", "moments"):
            np.testing.assert_array_equal(a[k], b[k])
    evals = list(eval_batches(ds, cfg))
    assert np.concatenate([b["index"] for b in evals]).tolist() == [0, 1, 2, 3, 4, 5, 6, -1]


# ---------------------------------------------------------------------------------------------- errors


def _edit(root, cfg, split, fn):
    path = mmn.annotation_file(root, cfg, split)
    annos = json.loads(path.read_text())
    fn(annos)
    path.write_text(json.dumps(annos))


@pytest.fixture
def fresh(tmp_path):
    cfg, truth = write_tiny(tmp_path, n_videos=3)
    return tmp_path, cfg


def _first(annos):
    return annos[next(iter(annos))]


@pytest.mark.parametrize("edit,match", [
    (lambda a: _first(a).pop("audios"), r"test_audio_new\.json.*'audios'.*plain MMN"),
    (lambda a: _first(a)["audios"].pop(), r"lists of one length.*timestamps \d+, audios \d+"),
    (lambda a: _first(a)["sentences"].append("x"), r"lists of one length.*sentences"),
    (lambda a: _first(a).update(timestamps=[], audios=[], sentences=[]), "a video without queries"),
    (lambda a: _first(a).update(timestamps=[[10.0, 5.0]], audios=["x.wav"], sentences=["s"]),
     r"non-empty span after clamping.*\[10\.0, 5\.0\]"),
    (lambda a: _first(a).update(timestamps=[[-4.0, -1.0]], audios=["x.wav"], sentences=["s"]),
     "non-empty span after clamping"),
    (lambda a: _first(a).pop("duration"), "'duration'"),
    (lambda a: a.clear(), "an empty split"),
])
def test_annotation_errors(fresh, edit, match):
    root, cfg = fresh
    _edit(root, cfg, "test", edit)
    with pytest.raises(JaxprvrError, match=match):
        MMNDataset(root, cfg, "test", empty_spans="error")  # the ActivityNet config keeps them (official)


def test_activitynet_config_keeps_empty_spans(fresh):
    """configs/mrnet/activitynet.py sets data.empty_spans=keep (MMN's train file has 4): the dataset follows it."""
    root, cfg = fresh
    assert cfg.data.empty_spans == "keep"
    _edit(root, cfg, "test", lambda a: _first(a)["timestamps"].__setitem__(0, [10.0, 5.0]))
    assert MMNDataset(root, cfg, "test").record(0).moments.shape[0] >= 1


def test_empty_span_keep_is_official(fresh):
    root, cfg = fresh
    _edit(root, cfg, "test", lambda a: _first(a)["timestamps"].__setitem__(0, [10.0, 5.0]))
    ds = MMNDataset(root, cfg, "test", empty_spans="keep")
    r = ds.record(0)
    k = list(r.moments[:, 0]).index(10.0)
    assert r.moments[k].tolist() == [10.0, 5.0]
    assert not collate([r], 1, 4, NCLIPS)["iou2d"][0, k].any()  # the official all-zero target


def test_split_not_in_config(tmp_path):
    cfg, _ = write_tiny(tmp_path, "charades", n_videos=2, splits=("train", "test"))
    with pytest.raises(JaxprvrError, match=r"one of data.splits \['train', 'test'\].*'val'"):
        MMNDataset(tmp_path, cfg, "val")


def test_missing_annotation_file(tmp_path):
    with pytest.raises(JaxprvrError, match=r"val_audio_new\.json.*no such file"):
        MMNDataset(tmp_path, _cfg(), "val")


def _vid_and_query(root, cfg):
    a = _json(root, cfg, "test")
    vid = next(iter(a))
    return vid, a[vid]["audios"][0].split(".")[0]


@pytest.mark.parametrize("check", [True, False])
def test_missing_query_pt(fresh, check):
    root, cfg = fresh
    _, q = _vid_and_query(root, cfg)
    (mmn.resolve(root, cfg.data.query_feat_dir) / f"{q}.pt").unlink()
    with pytest.raises(JaxprvrError, match=rf"{q}\.pt.*no such file"):
        MMNDataset(root, cfg, "test", check_files=check).record(0)


@pytest.mark.parametrize("check", [True, False])
def test_missing_h5(fresh, check):
    root, cfg = fresh
    vid, _ = _vid_and_query(root, cfg)
    (mmn.resolve(root, cfg.data.video_feat) / f"{vid}.h5").unlink()
    with pytest.raises(JaxprvrError, match=rf"{vid}\.h5.*no such file"):
        MMNDataset(root, cfg, "test", check_files=check).record(0)


@pytest.mark.parametrize("check", [True, False])
def test_missing_hdf5_key(tmp_path, check):
    cfg, _ = write_tiny(tmp_path, "tacos", n_videos=3)
    vid, _ = _vid_and_query(tmp_path, cfg)
    with h5py.File(mmn.resolve(tmp_path, cfg.data.video_feat), "a") as f:
        del f[vid]
    with pytest.raises(JaxprvrError, match=rf"tall_c3d_features_pca\.hdf5.*{vid}"):
        MMNDataset(tmp_path, cfg, "test", check_files=check).record(0)


@pytest.mark.parametrize("check", [True, False])
def test_missing_npy(tmp_path, check):
    cfg, _ = write_tiny(tmp_path, "charades", n_videos=3, splits=("train", "test"))
    vid, _ = _vid_and_query(tmp_path, cfg)
    (mmn.resolve(tmp_path, cfg.data.video_feat) / f"{vid}.npy").unlink()
    with pytest.raises(JaxprvrError, match=rf"{vid}\.npy.*no such file"):
        MMNDataset(tmp_path, cfg, "test", check_files=check).record(0)


def _rewrite_video(root, cfg, data):
    vid, _ = _vid_and_query(root, cfg)
    path = mmn.resolve(root, cfg.data.video_feat) / f"{vid}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("feature", data=data)


@pytest.mark.parametrize("data,match", [
    (np.ones((5, DV + 1), np.float32), rf"of width {DV}.*shape \(5, {DV + 1}\)"),
    (np.zeros((0, DV), np.float32), "T = 0"),
    (np.where(np.arange(5 * DV).reshape(5, DV) == 17, np.nan, 1.0), "NaN/Inf in row 2"),
    (np.where(np.arange(5 * DV).reshape(5, DV) == 3, np.inf, 1.0), "NaN/Inf in row 0"),
    (np.ones((5, 2, DV), np.float32), r"shape \(5, 2, 8\)"),
])
def test_bad_video_features(fresh, data, match):
    root, cfg = fresh
    _rewrite_video(root, cfg, data)
    ds = MMNDataset(root, cfg, "test")
    with pytest.raises(JaxprvrError, match=r"\.h5 \['feature'\].*" + match):
        ds.record(0)


@pytest.mark.parametrize("value,match", [
    (np.ones((1, DQ + 2), np.float32), rf"\(1, {DQ}\).*model.text_dim.*shape \(1, {DQ + 2}\)"),
    (np.ones((2, DQ), np.float32), rf"shape \(2, {DQ}\)"),
    (np.full((1, DQ), np.nan, np.float32), "NaN/Inf"),
])
def test_bad_query_features(fresh, value, match):
    root, cfg = fresh
    _, q = _vid_and_query(root, cfg)
    write_pt_tensor(mmn.resolve(root, cfg.data.query_feat_dir) / f"{q}.pt", value)
    with pytest.raises(JaxprvrError, match=rf"{q}\.pt.*" + match):
        MMNDataset(root, cfg, "test").record(0)


def test_legacy_query_pt_named(fresh):
    root, cfg = fresh
    _, q = _vid_and_query(root, cfg)
    torch.save(torch.randn(1, DQ), mmn.resolve(root, cfg.data.query_feat_dir) / f"{q}.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(JaxprvrError, match=rf"{q}\.pt.*legacy"):
        MMNDataset(root, cfg, "test").record(0)


def test_video_mode_and_modality_checked(fresh):
    root, cfg = fresh
    with pytest.raises(JaxprvrError, match="data.video_mode"):
        MMNDataset(root, _cfg("activitynet", "data.video_mode=c3d"), "test")
    with pytest.raises(JaxprvrError, match="data.query_modality"):
        MMNDataset(root, _cfg("activitynet", "data.query_modality=video"), "test")
