"""The MS-SL release readers on a hand-written release, and one JaxprvrError per kind of bad input."""

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from jaxprvr.config import load_config
from jaxprvr.data import PRVRDataset, open_splits
from jaxprvr.errors import JaxprvrError
from tests.test_data_sampling import (ref_average_to_fixed_length, ref_l2_normalize,
                                      ref_uniform_feature_sampling)

DV, DQ = 16, 12

# split -> caption lines as (video_id, k, n_tokens); videos' frame counts below. The caption order interleaves
# videos, so the gallery order (first appearance) differs from the order of the first lines' video names.
CAPTIONS = {
    "train": [("vb", 0, 5), ("va", 0, 35), ("vb", 1, 1), ("vc", 0, 30), ("vd", 0, 8), ("va", 1, 12),
              ("ve", 0, 3), ("vf", 0, 31), ("vf", 1, 2), ("vf", 2, 4), ("vg", 0, 6)],
    "val": [("wa", 0, 4), ("wb", 0, 40), ("wa", 1, 2)],
    "test": [("xa", 0, 7), ("xb", 0, 3), ("xb", 1, 33)],
}
FRAMES = {"va": 1, "vb": 40, "vc": 140, "vd": 32, "ve": 129, "vf": 20, "vg": 128,
          "wa": 33, "wb": 2, "xa": 300, "xb": 64}


def cfg_for(q_dim=DQ):
    return load_config("tvr", model="ms_sl", overrides=[f"model.q_feat_size={q_dim}"])


def write_release(root, captions=CAPTIONS, frames=FRAMES, seed=0):
    """Writes a tiny TVR-layout release by hand; returns the raw features it wrote (the ground truth).

    feature.bin rows are stored in a shuffled order, and id.txt mixes newlines and spaces, so a reader that
    relied on row order or on one separator would fail.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    text = root / "tvr" / "TextData"
    feat = root / "tvr" / "FeatureData" / "i3d_resnet"
    text.mkdir(parents=True)
    feat.mkdir(parents=True)
    video_feats = {v: rng.standard_normal((n, DV)).astype(np.float32) for v, n in frames.items()}
    query_feats = {}
    with h5py.File(text / "roberta_tvr_query_feat.hdf5", "w") as h5:
        for split, lines in captions.items():
            rows = []
            for video, k, n_tokens in lines:
                cap_id = f"{video}#enc#{k}"
                query_feats[cap_id] = rng.standard_normal((n_tokens, DQ)).astype(np.float32)
                h5[cap_id] = query_feats[cap_id]
                rows.append(f"{cap_id} someone does something number {k}\n")
            (text / f"tvr{split}.caption.txt").write_text("".join(rows))
    ids = [f"{v}_{t}" for v, n in frames.items() for t in range(n)]
    table = np.concatenate([video_feats[v] for v in frames])
    order = rng.permutation(len(ids))
    (feat / "feature.bin").write_bytes(table[order].astype("<f4").tobytes())
    (feat / "id.txt").write_text("".join(ids[i] + ("\n" if i % 3 else " ") for i in order))
    (feat / "shape.txt").write_text(f"{len(ids)} {DV}\n")
    (feat / "video2frames.txt").write_text(repr({v: [f"{v}_{t}" for t in range(n)] for v, n in frames.items()}))
    return video_feats, query_feats


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    video_feats, query_feats = write_release(root)
    return root, video_feats, query_feats


def test_index_structure(release):
    root, _, _ = release
    ds = PRVRDataset(root, cfg_for(), "train")
    lines = CAPTIONS["train"]
    assert ds.cap_ids == [f"{v}#enc#{k}" for v, k, _ in lines]
    assert ds.video_ids == ["vb", "va", "vc", "vd", "ve", "vf", "vg"]
    assert ds.query_video_index.dtype == np.int32
    assert [ds.video_ids[i] for i in ds.query_video_index] == [v for v, _, _ in lines]
    for v, video_id in enumerate(ds.video_ids):
        assert ds.video_query_index[v].tolist() == [j for j, (w, _, _) in enumerate(lines) if w == video_id]
    assert ds.visual_dim == DV and ds.query_dim == DQ  # visual dim from shape.txt, not cfg (3072)
    assert ds.num_frames.tolist() == [FRAMES[v] for v in ds.video_ids]
    assert ds.frame_lengths.tolist() == [min(FRAMES[v], 128) for v in ds.video_ids]


def test_items_match_reference(release):
    root, video_feats, query_feats = release
    splits = open_splits(root, cfg_for())
    for split, ds in splits.items():
        for i, video_id in enumerate(ds.video_ids):
            raw = video_feats[video_id].astype(np.float64)
            clip, frames = ds.video_item(i)
            assert clip.dtype == frames.dtype == np.float32
            assert clip.shape == (32, DV) and frames.shape == (min(len(raw), 128), DV)
            np.testing.assert_allclose(clip, ref_l2_normalize(ref_average_to_fixed_length(raw, 32)), rtol=1e-6)
            np.testing.assert_allclose(frames, ref_l2_normalize(ref_uniform_feature_sampling(raw, 128)), rtol=1e-6)
        for j, cap_id in enumerate(ds.cap_ids):
            tokens = ds.query_item(j)
            expected = ref_l2_normalize(query_feats[cap_id])[:30]
            assert tokens.dtype == np.float32 and tokens.shape == (min(len(query_feats[cap_id]), 30), DQ)
            np.testing.assert_allclose(tokens, expected, rtol=1e-6)
    assert splits["train"].videos is splits["test"].videos  # one frame store for all splits


def test_query_capacity(release):
    root, _, _ = release
    ds = PRVRDataset(root, cfg_for(), "train")
    counts = sorted((sum(1 for w, _, _ in CAPTIONS["train"] if w == v) for v in ds.video_ids), reverse=True)
    for batch_size in (1, 2, 3, 7, 50):
        for multiple in (1, 4, 8):
            expected = math.ceil(sum(counts[:batch_size]) / multiple) * multiple
            assert ds.query_capacity(batch_size, multiple) == expected


def _rewrite(path: Path, edit):
    path.write_text(edit(path.read_text()))


def _h5_edit(path, edit):
    with h5py.File(path, "a") as h5:
        edit(h5)


TEXT = Path("tvr/TextData")
FEAT = Path("tvr/FeatureData/i3d_resnet")

# (name, corruption of the release root, file named in the message, words expected in the message)
CORRUPTIONS = [
    ("missing collection", lambda r: (r / "tvr").rename(r / "tvx"), "", "tvx"),
    ("missing caption file", lambda r: (r / TEXT / "tvrtrain.caption.txt").unlink(), "tvrtrain.caption.txt",
     "no such file"),
    ("missing hdf5", lambda r: (r / TEXT / "roberta_tvr_query_feat.hdf5").unlink(), "roberta_tvr_query_feat.hdf5",
     "no such file"),
    ("missing feature.bin", lambda r: (r / FEAT / "feature.bin").unlink(), "feature.bin", "no such file"),
    ("missing feature folder", lambda r: (r / FEAT).rename(r / FEAT.with_name("i3d")), "i3d_resnet", "no such folder"),
    ("malformed caption line", lambda r: _rewrite(r / TEXT / "tvrtrain.caption.txt", lambda s: s + "vz#enc#0\n"),
     "tvrtrain.caption.txt:12", "vz#enc#0"),
    ("empty split", lambda r: (r / TEXT / "tvrtrain.caption.txt").write_text(""), "tvrtrain.caption.txt",
     "empty split"),
    ("cap id absent from hdf5", lambda r: _h5_edit(r / TEXT / "roberta_tvr_query_feat.hdf5",
                                                   lambda h: h.__delitem__("vc#enc#0")),
     "roberta_tvr_query_feat.hdf5", "vc#enc#0"),
    ("video absent from video2frames",
     lambda r: _rewrite(r / FEAT / "video2frames.txt", lambda s: s.replace("'vd':", "'vd_renamed':")),
     "video2frames.txt", "'vd'"),
    ("empty frame list",
     lambda r: _rewrite(r / FEAT / "video2frames.txt", lambda s: s.replace("'va': ['va_0']", "'va': []")),
     "video2frames.txt", "empty frame list"),
    ("frame id absent from id.txt", lambda r: _rewrite(r / FEAT / "id.txt", lambda s: s.replace("vd_5", "vd_x")),
     "id.txt", "vd_5"),
    ("id count disagrees with shape.txt", lambda r: _rewrite(r / FEAT / "id.txt", lambda s: s + " extra"),
     "id.txt", "shape.txt"),
    ("malformed shape.txt", lambda r: (r / FEAT / "shape.txt").write_text("nine 16\n"), "shape.txt", "nine"),
    ("feature.bin size disagrees with shape.txt",
     lambda r: (r / FEAT / "feature.bin").write_bytes((r / FEAT / "feature.bin").read_bytes()[:-4]),
     "feature.bin", "bytes"),
    ("video2frames is code", lambda r: (r / FEAT / "video2frames.txt").write_text(
        "__import__('pathlib').Path('PWNED').touch() or {}"), "video2frames.txt", "dict literal"),
    ("video2frames is not a dict", lambda r: (r / FEAT / "video2frames.txt").write_text("['va']"),
     "video2frames.txt", "list"),
]


@pytest.mark.parametrize("name,corrupt,file,words", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_bad_release_raises_one_error(tmp_path, monkeypatch, name, corrupt, file, words):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    write_release(root)
    corrupt(root)
    with pytest.raises(JaxprvrError) as info:
        PRVRDataset(root, cfg_for(), "train")
    message = str(info.value)
    assert file in message and words in message, message
    assert not (tmp_path / "PWNED").exists()


def test_missing_root_and_bad_split(tmp_path):
    with pytest.raises(JaxprvrError, match="no such folder"):
        PRVRDataset(tmp_path / "nowhere", cfg_for(), "train")
    write_release(tmp_path)
    with pytest.raises(JaxprvrError, match="'dev'"):
        PRVRDataset(tmp_path, cfg_for(), "dev")


def test_query_dim_mismatch(release):
    root, _, _ = release
    with pytest.raises(JaxprvrError, match=r"roberta_tvr_query_feat.hdf5.*width 10 \(model.q_feat_size\).*width 12"):
        PRVRDataset(root, cfg_for(q_dim=10), "train")


def test_non_finite_features_raise_when_read(tmp_path):
    write_release(tmp_path)
    feat = tmp_path / FEAT
    ids = (feat / "id.txt").read_text().split()
    table = np.fromfile(feat / "feature.bin", dtype="<f4").reshape(len(ids), DV)
    table[ids.index("vc_77"), 3] = np.nan
    table[ids.index("vd_0"), 0] = np.inf
    table.tofile(feat / "feature.bin")
    with h5py.File(tmp_path / TEXT / "roberta_tvr_query_feat.hdf5", "a") as h5:
        h5["vf#enc#1"][0, 0] = np.nan
    ds = PRVRDataset(tmp_path, cfg_for(), "train")  # checked lazily, per item
    for video_id in ("vc", "vd"):
        with pytest.raises(JaxprvrError, match=f"feature.bin: expected finite features for video '{video_id}'"):
            ds.video_item(ds.video_ids.index(video_id))
    with pytest.raises(JaxprvrError, match="hdf5: expected finite features for cap_id 'vf#enc#1'"):
        ds.query_item(ds.cap_ids.index("vf#enc#1"))
    ds.video_item(ds.video_ids.index("va"))  # the healthy items still read
    ds.query_item(0)
