"""Text-video retrieval data (jaxprvr.data.t2v) and its synthetic writer (jaxprvr.data.synthetic_t2v).

Tiny synthetic datasets are written for MSR-VTT, MSVD and LSMDC and read back. The readers are compared with a
transcription of the official ``_get_anns`` (BackBone_tvr @5bb74ad, ``tvr/dataloaders/dataloader_*_retrieval.py``)
written below; ``csv.DictReader`` stands in for ``pandas.read_csv`` (the same rows for these files). Then: the
restricted unpickler, one error per kind of bad input, the videos decoded by ``jaxprvr.data.video``, and the
planted signal (colour, direction and shape measured in decoded frames agree with the captions).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")

from jaxprvr.data import synthetic, synthetic_t2v, t2v  # noqa: E402
from jaxprvr.data.synthetic_t2v import COLOURS, DIRECTIONS, SHAPES, read_labels, write_synthetic_t2v  # noqa: E402
from jaxprvr.data.t2v import open_t2v  # noqa: E402
from jaxprvr.data.video import decode_frames, frame_indices, load_clip, probe  # noqa: E402
from jaxprvr.errors import JaxprvrError  # noqa: E402

SIZES = {"msrvtt": (7, 0, 5), "msvd": (5, 4, 5), "lsmdc": (6, 4, 5)}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    out = {}
    for dataset, (n_train, n_val, n_test) in SIZES.items():
        root = tmp_path_factory.mktemp(dataset)
        write_synthetic_t2v(root, dataset, n_train, n_val if dataset != "msrvtt" else None, n_test, seed=3)
        out[dataset] = root
    return out


# ------------------------------------------------------------------------------- the official logic, transcribed

def official_msrvtt(anno_path, video_path, subset, train_csv="MSRVTT_train.9k.csv"):
    """dataloader_msrvtt_retrieval.py l.28-56 (``train_csv`` is hard-coded to the 9k file officially)."""
    join = os.path.join
    csv_path = {"train": join(anno_path, train_csv), "val": join(anno_path, "MSRVTT_JSFUSION_test.csv"),
                "test": join(anno_path, "MSRVTT_JSFUSION_test.csv")}[subset]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))  # pd.read_csv(csv_path)
    video_id_list = [r["video_id"] for r in rows]
    video_dict = OrderedDict()
    sentences_dict = OrderedDict()
    if subset == "train":
        data = json.load(open(join(anno_path, "MSRVTT_data.json"), "r"))
        for itm in data["sentences"]:
            if itm["video_id"] in video_id_list:
                sentences_dict[len(sentences_dict)] = (itm["video_id"], (itm["caption"], None, None))
                video_dict[itm["video_id"]] = join(video_path, "{}.mp4".format(itm["video_id"]))
    else:
        for itm in rows:  # csv.iterrows()
            sentences_dict[len(sentences_dict)] = (itm["video_id"], (itm["sentence"], None, None))
            video_dict[itm["video_id"]] = join(video_path, "{}.mp4".format(itm["video_id"]))
    return video_dict, sentences_dict


def official_msvd(anno_path, video_path, subset):
    """dataloader_msvd_retrieval.py l.25-72."""
    cut_off_points = []
    video_id_path_dict = {s: os.path.join(anno_path, f"{s}_list.txt") for s in ("train", "val", "test")}
    caption_file = os.path.join(anno_path, "raw-captions.pkl")
    with open(video_id_path_dict[subset], "r") as fp:
        video_ids = [itm.strip() for itm in fp.readlines()]
    with open(caption_file, "rb") as f:
        captions = pickle.load(f)  # trusted: written by this test's fixture
    video_dict = OrderedDict()
    sentences_dict = OrderedDict()
    for root, dub_dir, video_files in os.walk(video_path):
        for video_file in video_files:
            video_id_ = ".".join(video_file.split(".")[:-1])
            if video_id_ not in video_ids:
                continue
            video_dict[video_id_] = os.path.join(root, video_file)
    for video_id in video_ids:
        assert video_id in captions
        for cap in captions[video_id]:
            sentences_dict[len(sentences_dict)] = (video_id, (" ".join(cap), None, None))
        cut_off_points.append(len(sentences_dict) - 1)
    return video_dict, sentences_dict, cut_off_points


def official_lsmdc(anno_path, video_path, subset):
    """dataloader_lsmdc_retrieval.py l.29-72."""
    paths = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
             "test": "LSMDC16_challenge_1000_publictect.csv"}
    video_id_list = []
    caption_dict = {}
    with open(os.path.join(anno_path, paths[subset]), "r") as fp:
        for line in fp:
            line = line.strip()
            line_split = line.split("\t")
            assert len(line_split) == 6
            clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence = line_split
            if clip_id not in ["0017_Pianist_00.23.28.872-00.23.34.843", "0017_Pianist_00.30.36.767-00.30.38.009",
                               "3064_SPARKLE_2012_01.41.07.000-01.41.11.793"]:
                caption_dict[len(caption_dict)] = (clip_id, (sentence, None, None))
                if clip_id not in video_id_list:
                    video_id_list.append(clip_id)
    video_dict = OrderedDict()
    sentences_dict = OrderedDict()
    for root, dub_dir, video_files in os.walk(video_path):
        for video_file in video_files:
            video_id_ = ".".join(video_file.split(".")[:-1])
            if video_id_ not in video_id_list:
                continue
            video_dict[video_id_] = os.path.join(root, video_file)
    for clip_id, sentence in caption_dict.values():
        if clip_id not in video_dict:
            continue
        sentences_dict[len(sentences_dict)] = (clip_id, sentence)
    return video_dict, sentences_dict


def _compare(split, video_dict, sentences_dict):
    assert split.pairs == [(cap[0], vid) for vid, cap in sentences_dict.values()]
    assert set(split.video_ids) == set(video_dict)
    assert {v: str(split.video_path(v)) for v in split.video_ids} == {v: str(Path(p)) for v, p in video_dict.items()}
    assert [split.video_ids[i] for i in split.caption_video] == [vid for vid, _ in sentences_dict.values()]
    assert list(split.video_ids) == list(dict.fromkeys(vid for vid, _ in sentences_dict.values()))
    assert split.n_captions_per_video.tolist() == [
        sum(1 for vid, _ in sentences_dict.values() if vid == v) for v in split.video_ids]
    assert len(split) == len(sentences_dict)


# ------------------------------------------------------------------------------- readers vs the official logic

@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_msrvtt_matches_official(roots, split):
    root = roots["msrvtt"]
    anno, videos = t2v.layout("msrvtt", root)
    assert anno == root / "MSRVTT" / "msrvtt_data" and videos == root / "MSRVTT" / "MSRVTT" / "videos" / "all"
    s = open_t2v("msrvtt", root, split)
    _compare(s, *official_msrvtt(str(anno), str(videos), split))
    assert list(s.video_ids) == list(official_msrvtt(str(anno), str(videos), split)[0])  # insertion order too
    if split == "train":
        assert s.skipped["sentences_of_other_videos"] > 0 and max(s.n_captions_per_video) > 1
        with pytest.raises(JaxprvrError, match="contiguous"):
            s.cut_off_points  # the JSON interleaves the videos' sentences
        s7 = open_t2v("msrvtt", root, "train", train_split="7k")
        _compare(s7, *official_msrvtt(str(anno), str(videos), "train", "MSRVTT_train.7k.csv"))
        assert 0 < s7.n_videos < s.n_videos and set(s7.video_ids) < set(s.video_ids)
    else:
        assert s.skipped == {} and (s.n_captions_per_video == 1).all()
        assert s.pairs == open_t2v("msrvtt", root, "test" if split == "val" else "val").pairs  # val IS test
    assert not s.multi_sentence_per_video


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_msvd_matches_official(roots, split):
    root = roots["msvd"]
    anno, videos = t2v.layout("msvd", root)
    s = open_t2v("msvd", root, split)
    video_dict, sentences_dict, cut = official_msvd(str(anno), str(videos), split)
    _compare(s, video_dict, sentences_dict)
    assert s.cut_off_points.tolist() == cut
    assert s.multi_sentence_per_video and s.skipped == {}
    listed = (anno / f"{split}_list.txt").read_text().split()
    assert s.video_ids == listed  # list order
    assert all(p.suffix == ".avi" and p.parent.name == "YouTubeClips" for p in map(s.video_path, s.video_ids))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_lsmdc_matches_official(roots, split):
    root = roots["lsmdc"]
    anno, videos = t2v.layout("lsmdc", root)
    s = open_t2v("lsmdc", root, split)
    _compare(s, *official_lsmdc(str(anno), str(videos), split))
    n_bad = {"train": 2, "val": 0, "test": 1}[split]
    n_missing = {"train": 2, "val": 1, "test": 0}[split]
    assert s.skipped == {"known_bad_clip_pairs": n_bad, "missing_clip_pairs": n_missing, "missing_clips": n_missing}
    assert len(s.skipped_ids["known_bad_clips"]) == n_bad and len(s.skipped_ids["missing_clips"]) == n_missing
    assert not set(s.video_ids) & set(t2v.LSMDC_BAD_CLIPS)
    lines = (anno / t2v.LSMDC_CSV[split]).read_text().splitlines()
    assert len(lines) == len(s) + n_bad + n_missing  # every row accounted for
    if split == "train":  # the empty file of a known-bad clip exists, and is never looked at
        assert (videos / "0017_Pianist" / f"{t2v.LSMDC_BAD_CLIPS[0]}.avi").is_file()
    if split == "test":
        assert (s.n_captions_per_video == 1).all()
    else:
        assert s.n_captions_per_video.max() == 2  # repeated clip ids, as in LSMDC16 val


def test_video_path_and_dispatch_errors(roots):
    s = open_t2v("msvd", roots["msvd"], "test")
    with pytest.raises(JaxprvrError, match="video id of this split"):
        s.video_path("nope")
    for args, match in ((("webvid", roots["msvd"], "test"), "msrvtt"), (("msvd", roots["msvd"], "dev"), "train"),
                        (("msvd", roots["msvd"] / "absent", "test"), "data root")):
        with pytest.raises(JaxprvrError, match=match):
            open_t2v(*args)
    with pytest.raises(JaxprvrError, match="7k"):
        open_t2v("msrvtt", roots["msrvtt"], "train", train_split="8k")


def test_path_overrides(roots, tmp_path):
    root = roots["msvd"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "MSVD" / "msvd_data", moved / "annos")
    s = open_t2v("msvd", tmp_path, "val", anno_path="elsewhere/annos", video_path=root / "MSVD" / "MSVD_Videos")
    assert s.pairs == open_t2v("msvd", root, "val").pairs and s.anno_dir == moved / "annos"


# ------------------------------------------------------------------------------- restricted unpickler

class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_raw_captions_unpickler_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "raw-captions.pkl"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps({"vid": [["a", "b"]], "x": _Evil(target)}, protocol=protocol))
        with pytest.raises(JaxprvrError, match="global") as e:
            t2v.load_raw_captions(path)
        assert str(path) in str(e.value)
        assert not target.exists()
    bad = {"not a dict": [["a"]], "tuple caption": {"v": [("a", "b")]}, "int token": {"v": [["a", 3]]},
           "str caption": {"v": ["a man"]}, "int key": {1: [["a"]]}, "set": {"v": {"a"}},
           "ordered dict": OrderedDict(v=[["a"]])}
    for name, obj in bad.items():
        path.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(JaxprvrError, match="raw-captions.pkl"):
            t2v.load_raw_captions(path)
    path.write_bytes(pickle.dumps({"v": [["a", "b"]]})[:-3])
    with pytest.raises(JaxprvrError, match="unreadable pickle"):
        t2v.load_raw_captions(path)
    path.write_bytes(pickle.dumps({"v": [["a", "man"], ["x"]], "w": []}, protocol=0))
    assert t2v.load_raw_captions(path) == {"v": [["a", "man"], ["x"]], "w": []}


# ------------------------------------------------------------------------------- bad input: one error each

def _copy(roots, dataset, tmp_path):
    dst = tmp_path / "root"
    shutil.copytree(roots[dataset], dst)
    return dst


def _edit_lines(path, fn):
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(fn(lines)), encoding="utf-8")


def _raises(dataset, root, split, where, match=None):
    with pytest.raises(JaxprvrError) as e:
        open_t2v(dataset, root, split)
    assert where in e.value.where, (e.value.where, where)
    if match:
        assert match in str(e.value), str(e.value)
    return e.value


def test_msrvtt_bad_input(roots, tmp_path):
    root = _copy(roots, "msrvtt", tmp_path)
    anno = root / "MSRVTT" / "msrvtt_data"
    test_csv = anno / t2v.MSRVTT_TEST_CSV
    text = test_csv.read_text()
    # a malformed row: one field too many
    _edit_lines(test_csv, lambda ls: ls[:2] + [ls[2].rstrip("\n") + ",extra\n"] + ls[3:])
    _raises("msrvtt", root, "test", f"{t2v.MSRVTT_TEST_CSV}:3", "4 comma-separated fields")
    # an empty sentence (pandas would give NaN)
    test_csv.write_text(text.replace(text.splitlines()[1].rsplit(",", 1)[1], "", 1))
    _raises("msrvtt", root, "test", f"{t2v.MSRVTT_TEST_CSV}:2", "non-empty")
    # an empty split
    test_csv.write_text(text.splitlines()[0] + "\n")
    _raises("msrvtt", root, "val", t2v.MSRVTT_TEST_CSV, "at least one")
    # a video listed but absent
    test_csv.write_text(text)
    vid = next(csv.DictReader(text.splitlines()))["video_id"]
    (root / "MSRVTT" / "MSRVTT" / "videos" / "all" / f"{vid}.mp4").unlink()
    _raises("msrvtt", root, "test", f"{vid}.mp4", "no such file")
    # a train id without captions in the JSON
    nine_k = anno / t2v.MSRVTT_TRAIN_CSV["9k"]
    _edit_lines(nine_k, lambda ls: ls + ["video9999\n"])
    _raises("msrvtt", root, "train", t2v.MSRVTT_TRAIN_CSV["9k"], "video9999")
    # a wrong header
    nine_k.write_text("vid\nvideo0\n")
    _raises("msrvtt", root, "train", t2v.MSRVTT_TRAIN_CSV["9k"], "video_id")
    # missing annotation files and a missing video folder
    (anno / t2v.MSRVTT_JSON).unlink()
    _raises("msrvtt", root, "train", t2v.MSRVTT_JSON, "no such file")
    (anno / t2v.MSRVTT_TEST_CSV).unlink()
    _raises("msrvtt", root, "test", t2v.MSRVTT_TEST_CSV, "no such file")
    with pytest.raises(JaxprvrError, match="video folder"):
        open_t2v("msrvtt", roots["msrvtt"], "test", video_path="nowhere")


def test_msvd_bad_input(roots, tmp_path):
    root = _copy(roots, "msvd", tmp_path)
    anno, videos = t2v.layout("msvd", root)
    lst = anno / "test_list.txt"
    text = lst.read_text()
    lst.write_text(text + "\n")  # a blank line: the official assert fails
    _raises("msvd", root, "test", "test_list.txt:", "blank line")
    lst.write_text(text + "notAVideo_1_2\n")  # an id without captions
    _raises("msvd", root, "test", "raw-captions.pkl", "notAVideo_1_2")
    lst.write_text(text + text.splitlines()[0] + "\n")  # an id listed twice
    _raises("msvd", root, "test", "test_list.txt", "repeated")
    lst.write_text("")
    _raises("msvd", root, "test", "test_list.txt", "at least one")
    lst.write_text(text)
    vid = text.split()[1]
    path = next(videos.rglob(f"{vid}.avi"))
    shutil.copy(path, videos / f"{vid}.mp4")  # two files for one id
    _raises("msvd", root, "test", str(videos), "one file for video id")
    (videos / f"{vid}.mp4").unlink()
    path.unlink()  # a video listed but absent
    _raises("msvd", root, "test", str(videos), vid)
    (anno / "raw-captions.pkl").unlink()
    _raises("msvd", root, "val", "raw-captions.pkl", "no such file")
    shutil.rmtree(videos)
    with pytest.raises(JaxprvrError, match="video folder"):
        open_t2v("msvd", roots["msvd"], "test", video_path=videos)


def test_lsmdc_bad_input(roots, tmp_path):
    root = _copy(roots, "lsmdc", tmp_path)
    anno, videos = t2v.layout("lsmdc", root)
    val = anno / t2v.LSMDC_CSV["val"]
    text = val.read_text()
    val.write_text(text.replace("\t", " ", 1))  # 5 fields on line 1
    _raises("lsmdc", root, "val", f"{t2v.LSMDC_CSV['val']}:1", "6 tab-separated fields")
    val.write_text(text + "\n")  # a blank line
    _raises("lsmdc", root, "val", f"{t2v.LSMDC_CSV['val']}:{len(text.splitlines()) + 1}", "6 tab-separated")
    # every clip missing: counted, then the split is empty
    val.write_text(text)
    shutil.rmtree(videos / "1001_Triangles_at_Dawn")
    shutil.rmtree(videos / "1002_Blue_Motion")
    err = _raises("lsmdc", root, "val", t2v.LSMDC_CSV["val"], "at least one")
    assert "missing_clip_pairs=" in err.found
    # one clip missing: counted, not an error
    s = open_t2v("lsmdc", root, "test")
    gone = s.video_ids[2]
    s.video_path(gone).unlink()
    s2 = open_t2v("lsmdc", root, "test")
    assert gone not in s2.video_ids and s2.skipped["missing_clips"] == 1 and len(s2) == len(s) - 1
    assert s2.skipped_ids["missing_clips"] == (gone,)
    (anno / t2v.LSMDC_CSV["test"]).unlink()
    _raises("lsmdc", root, "test", "LSMDC16_challenge_1000_publictect.csv", "no such file")


# ------------------------------------------------------------------------------- the videos and the signal

def _parse_caption(caption: str) -> dict:
    words = caption.lower().replace(".", "").replace("'s", "").split()
    colour = [w for w in words if w in COLOURS]
    direction = [d for d in DIRECTIONS if any(w.startswith(d) for w in words)]
    shape = [s for s in SHAPES if any(syn in caption.lower() for syn in synthetic_t2v._SYNONYMS[s])]
    return {"colour": colour, "direction": direction, "shape": shape}


def _measure(frame: np.ndarray):
    """From the saturated pixels: the nearest palette colour to their mean, their centroid, and the shape whose
    ideal mask (at that centroid, the writer's size) overlaps them best (IoU)."""
    f = frame.astype(np.int32)
    mask = (f.max(-1) - f.min(-1)) > 90
    assert mask.sum() >= 12
    mean = f[mask].mean(0)
    colour = min(COLOURS, key=lambda c: np.sum((np.array(COLOURS[c]) - mean) ** 2))
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # every shape's area centroid is its centre
    h, w = mask.shape

    def iou(shape):
        ideal = synthetic_t2v.shape_mask(shape, w, h, cx, cy, synthetic_t2v.SHAPE_RADIUS * min(w, h))
        return (mask & ideal).sum() / (mask | ideal).sum()

    return colour, np.array([cx, cy]), max(SHAPES, key=iou)


@pytest.mark.parametrize("dataset", list(SIZES))
def test_videos_decode_and_carry_the_signal(roots, dataset):
    root = roots[dataset]
    labels = read_labels(root, dataset)
    seen = set()
    n_checked = 0
    for split in ("train", "val", "test"):
        s = open_t2v(dataset, root, split)
        for caption, vid in s.pairs:  # every caption names its video's colour, shape and direction
            lab, got = labels[vid], _parse_caption(caption)
            assert got == {"colour": [lab["colour"]], "direction": [lab["direction"]], "shape": [lab["shape"]]}, \
                (caption, lab)
        for vid in s.video_ids:
            if vid in seen:
                continue
            seen.add(vid)
            lab, path = labels[vid], s.video_path(vid)
            info = probe(path)
            assert (info.n_frames, info.width, info.height) == (lab["n_frames"], lab["width"], lab["height"])
            assert info.avg_frame_rate == Fraction(lab["fps"])
            assert info.codec == {"libx264": "h264"}.get(lab["codec"], lab["codec"])
            first_last = decode_frames(path, [0, lab["n_frames"] - 1])
            m0, m1 = _measure(first_last[0]), _measure(first_last[1])
            assert m0[0] == m1[0] == lab["colour"], (vid, lab)
            assert m0[2] == m1[2] == lab["shape"], (vid, lab)
            if lab["n_frames"] > 1:
                move = m1[1] - m0[1]
                want = np.array(DIRECTIONS[lab["direction"]])
                assert move @ want > 0.35 * (lab["width"] if want[0] else lab["height"]), (vid, lab, move)
                assert abs(move @ want[::-1]) < 2.0, (vid, lab, move)  # no sideways drift
            n_checked += 1
    assert n_checked == sum(SIZES[dataset])  # every video with a file (MSR-VTT: val is test)


@pytest.mark.parametrize("dataset", list(SIZES))
def test_special_videos_load_as_the_official_sampler_says(roots, dataset):
    """Each split's videos 0-3 are 1 frame, 13.3 s at 3 fps, 30000/1001 fps and 61x97: load_clip gives the
    official frame count (range(0, n, round(fps)), at most 12) and the mask."""
    labels = read_labels(roots[dataset], dataset)
    s = open_t2v(dataset, roots[dataset], "test")
    special = {tuple(lab["seed"])[-1]: (vid, lab) for vid, lab in labels.items() if lab["split"] == "test"}
    assert special[0][1]["n_frames"] == 1
    assert special[1][1]["fps"] == "3/1" and special[1][1]["n_frames"] / 3 > 12
    assert special[2][1]["fps"] == "30000/1001"
    assert (special[3][1]["width"], special[3][1]["height"]) == (61, 97)
    for k in range(4):
        vid, lab = special[k]
        clip = load_clip(s.video_path(vid), size=32)
        n, fps = lab["n_frames"], float(Fraction(lab["fps"]))
        want = frame_indices(n, fps)
        assert clip.ok and clip.indices.tolist() == want.tolist()
        assert int(clip.mask.sum()) == len(want) == min(12, len(range(0, n, int(round(fps)))))
        assert clip.video.shape == (12, 3, 32, 32) and not clip.video[len(want):].any()
    assert len(frame_indices(special[1][1]["n_frames"], 3.0)) == 12  # the > 12 s video hits the cap


def test_sizes_and_rates_vary(roots):
    labs = [lab for d in SIZES for lab in read_labels(roots[d], d).values()]
    assert len({(lab["width"], lab["height"]) for lab in labs}) >= 5
    assert any(lab["width"] % 2 for lab in labs) and any(lab["height"] > lab["width"] for lab in labs)
    assert {"3/1", "30000/1001"} <= {lab["fps"] for lab in labs}
    assert {lab["background"] for lab in labs} == {"plain", "noisy"}
    assert {lab["codec"] for lab in labs} >= {"libx264", "mpeg4", "mjpeg"}


# ------------------------------------------------------------------------------- writer: files, CLI, demo

def test_written_files_look_official(roots):
    anno = roots["msrvtt"] / "MSRVTT" / "msrvtt_data"
    data = json.loads((anno / "MSRVTT_data.json").read_text())
    assert set(data) == {"info", "videos", "sentences"}
    assert set(data["sentences"][0]) == {"caption", "video_id", "sen_id"}
    assert set(data["videos"][0]) == {"category", "url", "video_id", "start time", "end time", "split", "id"}
    header = (anno / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()[0]
    assert header == "key,vid_key,video_id,sentence"
    assert (anno / "MSRVTT_train.9k.csv").read_text().startswith("video_id\n")
    with open(roots["msvd"] / "MSVD" / "msvd_data" / "raw-captions.pkl", "rb") as f:
        raw = pickle.load(f)
    assert all(isinstance(c, list) and all(isinstance(t, str) for t in c) for cs in raw.values() for c in cs)
    lines = (roots["lsmdc"] / "LSMDC" / "LSMDC16_challenge_1000_publictect.csv").read_text().splitlines()
    assert all(len(line.split("\t")) == 6 for line in lines)


def test_deterministic_and_refuses_overwrite(tmp_path):
    write_synthetic_t2v(tmp_path / "a", "msvd", 4, 4, 4, seed=1)
    write_synthetic_t2v(tmp_path / "b", "msvd", 4, 4, 4, seed=1)
    a, b = open_t2v("msvd", tmp_path / "a", "test"), open_t2v("msvd", tmp_path / "b", "test")
    assert a.pairs == b.pairs
    fa, fb = (decode_frames(x.video_path(x.video_ids[1]), [0, 5]) for x in (a, b))
    np.testing.assert_array_equal(fa, fb)
    with pytest.raises(JaxprvrError, match="not overwritten"):
        write_synthetic_t2v(tmp_path / "a", "msvd", 4, 4, 4, seed=1)
    with pytest.raises(JaxprvrError, match="val-videos"):
        write_synthetic_t2v(tmp_path / "c", "msrvtt", 4, 3, 4)
    with pytest.raises(JaxprvrError, match="train-videos"):
        write_synthetic_t2v(tmp_path / "c", "lsmdc", 2, 4, 4)


def test_cli_dispatch(tmp_path, capsys):
    assert synthetic.main(["--dataset", "lsmdc", "--out", str(tmp_path / "x"), "--train-videos", "4",
                           "--val-videos", "4", "--test-videos", "4", "--seed", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["dataset"] == "lsmdc" and out["videos"] == {"train": 4, "val": 4, "test": 4} and "labels" not in out
    assert len(open_t2v("lsmdc", tmp_path / "x", "val").video_ids) == 4
    assert synthetic.main(["--dataset", "msrvtt", "--out", str(tmp_path / "y"), "--val-videos", "2"]) == 2
    assert "error:" in capsys.readouterr().err


def test_demo_root_cached(tmp_path, monkeypatch):
    root = synthetic_t2v.demo_root("msrvtt", cache_dir=tmp_path)
    assert root == tmp_path / f"t2v-msrvtt-v{synthetic_t2v.DEMO_VERSION}"
    n_train, n_val, n_test = synthetic_t2v.DEMO_SIZES["msrvtt"]
    assert open_t2v("msrvtt", root, "train").n_videos == n_train
    assert open_t2v("msrvtt", root, "test").n_videos == n_test
    monkeypatch.setattr(synthetic_t2v, "write_synthetic_t2v", lambda *a, **k: pytest.fail("rewritten"))
    assert synthetic_t2v.demo_root("msrvtt", cache_dir=tmp_path) == root
    with pytest.raises(JaxprvrError):
        synthetic_t2v.demo_root("webvid", cache_dir=tmp_path)
