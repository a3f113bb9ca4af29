"""Text-video retrieval annotations (MSR-VTT, MSVD, LSMDC) in BackBone_tvr's on-disk formats.

The readers return the samples the official loaders build (``BackBone_tvr`` @5bb74ad,
``tvr/dataloaders/dataloader_{msrvtt,msvd,lsmdc}_retrieval.py`` ``_get_anns``; ``data_dataloaders.py``
``DATALOADER_DICT``): a list of ``(caption, video_id)`` pairs in the official sample order, and where each video
file is. Decoding and frame sampling are :mod:`jaxprvr.data.video`, tokenisation :mod:`jaxprvr.text.clip_bpe`.

Default layout under the data root (``--data-root ROOT``; ``anno_path`` / ``video_path`` override it, relative
to ROOT unless absolute)::

    ROOT/MSRVTT/msrvtt_data/       MSRVTT_data.json, MSRVTT_train.9k.csv, MSRVTT_train.7k.csv,
                                   MSRVTT_JSFUSION_test.csv                 (CLIP4Clip's msrvtt_data.zip)
    ROOT/MSRVTT/MSRVTT/videos/all/ video<N>.mp4                             (Frozen-in-Time's MSRVTT.zip)
    ROOT/MSVD/msvd_data/           train_list.txt, val_list.txt, test_list.txt, raw-captions.pkl
                                                                            (CLIP4Clip's msvd_data.zip)
    ROOT/MSVD/MSVD_Videos/         <id>.avi anywhere below (walked)        (YouTubeClips.tar)
    ROOT/LSMDC/                    LSMDC16_annos_training.csv, LSMDC16_annos_val.csv,
                                   LSMDC16_challenge_1000_publictect.csv    (MPII, sic "publictect")
    ROOT/LSMDC/LSMDC_Videos/       <clip_id>.avi anywhere below (walked)

The MSR-VTT paths are BackBone_tvr's defaults (``main_retrieval.py`` l.41-42, ``--anno_path
${DATA_PATH}/MSRVTT/msrvtt_data --video_path ${DATA_PATH}/MSRVTT/MSRVTT/videos/all`` in its README) with ROOT
as ``DATA_PATH``; MSVD and LSMDC follow CLIP4Clip's README (``--features_path ${DATA_PATH}/MSVD_Videos``,
``.../LSMDC_Videos``), BackBone_tvr giving none.

What each split is (official):

* **MSR-VTT.** ``train``: every sentence of ``MSRVTT_data.json`` whose video is listed in the train CSV, in
  the JSON's sentence order (the official hard-codes ``MSRVTT_train.9k.csv``; ``train_split="7k"`` reads
  ``MSRVTT_train.7k.csv``). ``val`` and ``test``: the rows of ``MSRVTT_JSFUSION_test.csv`` (the 1k-A set, one
  caption per video; the official val loader reads this same file). Videos ``<video_path>/<video_id>.mp4``.
* **MSVD.** The ids of ``{split}_list.txt`` in file order; each contributes all its captions from
  ``raw-captions.pkl`` (tokens joined with single spaces), so a video's captions are contiguous
  (``cut_off_points``, CLIP4Clip's multi-sentence protocol). Videos are found by walking ``video_path``; the
  id is the file name without its last extension.
* **LSMDC.** Each line of the split's CSV is ``clip_id, start_aligned, end_aligned, start_extracted,
  end_extracted, sentence``, tab-separated after ``strip()``; the times are ignored (the whole clip is used).
  The three known-bad clip ids are skipped; clips are found by walking ``video_path`` and pairs whose clip has
  no file are dropped. ``val`` is ``LSMDC16_annos_val.csv`` (clip ids may repeat), ``test`` the 1000-clip
  public test.

Nothing is dropped silently: :attr:`T2VSplit.skipped` counts what was left out and why (:attr:`T2VSplit.skipped_ids`
names the ids). Bad input raises one :class:`~jaxprvr.errors.JaxprvrError` naming the file: a missing
annotation file or video folder, a malformed row, a listed id without captions, a video listed but absent
(MSR-VTT, MSVD; LSMDC counts it, as officially), two files for one id in a walked folder, an empty split.
The raw-captions pickle is read by a restricted unpickler that only builds dicts, lists and strings.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from jaxprvr.errors import JaxprvrError

DATASETS = ("msrvtt", "msvd", "lsmdc")
SPLITS = ("train", "val", "test")
TRAIN_SPLITS = ("9k", "7k")  # MSR-VTT train CSVs

# (annotation folder, video folder) relative to the data root.
DEFAULT_LAYOUT = {
    "msrvtt": ("MSRVTT/msrvtt_data", "MSRVTT/MSRVTT/videos/all"),
    "msvd": ("MSVD/msvd_data", "MSVD/MSVD_Videos"),
    "lsmdc": ("LSMDC", "LSMDC/LSMDC_Videos"),
}

MSRVTT_JSON = "MSRVTT_data.json"
MSRVTT_TRAIN_CSV = {"9k": "MSRVTT_train.9k.csv", "7k": "MSRVTT_train.7k.csv"}
MSRVTT_TEST_CSV = "MSRVTT_JSFUSION_test.csv"
MSRVTT_TEST_COLUMNS = ("key", "vid_key", "video_id", "sentence")

MSVD_LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
MSVD_CAPTIONS = "raw-captions.pkl"

LSMDC_CSV = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv",
             "test": "LSMDC16_challenge_1000_publictect.csv"}  # sic: the official file name
LSMDC_FIELDS = ("clip_id", "start_aligned", "end_aligned", "start_extracted", "end_extracted", "sentence")
# dataloader_lsmdc_retrieval.py l.47-48: clips the official loader leaves out.
LSMDC_BAD_CLIPS = ("0017_Pianist_00.23.28.872-00.23.34.843", "0017_Pianist_00.30.36.767-00.30.38.009",
                   "3064_SPARKLE_2012_01.41.07.000-01.41.11.793")


# --------------------------------------------------------------------------------------------- the split

@dataclass(frozen=True)
class T2VSplit:
    """One split of a text-video retrieval dataset, as the official loader enumerates it.

    ``pairs``: ``(caption, video_id)`` in the official sample order (sample ``i`` of the official dataset).
    ``video_ids``: the split's videos, unique, in order of first appearance in ``pairs``.
    ``caption_video``: int64 ``[len(pairs)]``, the index into ``video_ids`` of each pair's video.
    ``n_captions_per_video``: int64 ``[len(video_ids)]``.
    ``skipped``: counts of what was left out, by reason (empty when nothing was); ``skipped_ids`` the ids.
    ``multi_sentence_per_video``: the official flag (True for MSVD only: its eval was meant to group captions).
    """

    dataset: str
    split: str
    root: Path
    anno_dir: Path
    video_dir: Path
    pairs: list
    video_ids: list
    caption_video: np.ndarray = field(repr=False)
    n_captions_per_video: np.ndarray = field(repr=False)
    skipped: dict = field(default_factory=dict)
    skipped_ids: dict = field(default_factory=dict, repr=False)
    multi_sentence_per_video: bool = False
    _paths: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def n_videos(self) -> int:
        return len(self.video_ids)

    @property
    def captions(self) -> list:
        return [c for c, _ in self.pairs]

    def video_path(self, vid: str) -> Path:
        """The file of video ``vid`` (``<video_dir>/<vid>.mp4`` for MSR-VTT, the walked file otherwise)."""
        try:
            return self._paths[vid]
        except KeyError:
            raise JaxprvrError(f"{self.dataset} {self.split}", "a video id of this split", repr(vid)) from None

    @property
    def cut_off_points(self) -> np.ndarray:
        """The index of each video's last pair (the official MSVD ``cut_off_points``), for the multi-sentence
        protocol. Only defined when every video's pairs are contiguous and in ``video_ids`` order."""
        cv = self.caption_video
        if len(cv) and not (cv[0] == 0 and np.all(np.diff(cv) >= 0) and np.all(np.diff(cv) <= 1)):
            raise JaxprvrError(f"{self.dataset} {self.split}", "each video's captions contiguous (cut_off_points)",
                               "captions of a video interleaved with others")
        return np.cumsum(self.n_captions_per_video) - 1


def _make_split(dataset, split, root, anno_dir, video_dir, pairs, paths, skipped, skipped_ids, where,
                multi=False) -> T2VSplit:
    if not pairs:
        detail = ", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "nothing skipped"
        raise JaxprvrError(where, f"at least one (caption, video) pair in the {dataset} {split} split",
                           f"none ({detail})")
    index: dict[str, int] = {}
    caption_video = np.empty(len(pairs), np.int64)
    for i, (_, vid) in enumerate(pairs):
        caption_video[i] = index.setdefault(vid, len(index))
    video_ids = list(index)
    counts = np.bincount(caption_video, minlength=len(video_ids)).astype(np.int64)
    return T2VSplit(dataset=dataset, split=split, root=Path(root), anno_dir=anno_dir, video_dir=video_dir,
                    pairs=pairs, video_ids=video_ids, caption_video=caption_video, n_captions_per_video=counts,
                    skipped=dict(skipped), skipped_ids={k: tuple(v) for k, v in skipped_ids.items()},
                    multi_sentence_per_video=multi, _paths={v: Path(paths[v]) for v in video_ids})


# --------------------------------------------------------------------------------------------- paths

def _resolve(root: Path, path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def layout(dataset: str, root, anno_path=None, video_path=None) -> tuple[Path, Path]:
    """``(annotation folder, video folder)`` of ``dataset`` under ``root``: :data:`DEFAULT_LAYOUT` unless
    ``anno_path`` / ``video_path`` are given (relative to ``root`` unless absolute; empty = default)."""
    _check_dataset(dataset)
    root = Path(root).expanduser()
    anno_default, video_default = DEFAULT_LAYOUT[dataset]
    return _resolve(root, anno_path or anno_default), _resolve(root, video_path or video_default)


def _check_dataset(dataset):
    if dataset not in DATASETS:
        raise JaxprvrError("t2v dataset", f"one of {list(DATASETS)}", repr(dataset))


def _check_split(dataset, split):
    if split not in SPLITS:
        raise JaxprvrError(f"{dataset} split", f"one of {list(SPLITS)}", repr(split))


def _annotation(path: Path, dataset: str) -> Path:
    if not path.is_file():
        found = "a folder" if path.is_dir() else "no such file"
        raise JaxprvrError(path, f"the {dataset} annotation file {path.name}", found,
                           hint="see docs/data.md for the layout, or pass anno_path / data.anno_path")
    return path


def _video_dir(path: Path, dataset: str) -> Path:
    if not path.is_dir():
        raise JaxprvrError(path, f"the {dataset} video folder", "no such folder",
                           hint="see docs/data.md for the layout, or pass video_path / data.video_path")
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise JaxprvrError(path, "UTF-8 text", f"undecodable bytes at offset {e.start}") from e
    except OSError as e:
        raise JaxprvrError(path, "a readable file", f"{type(e).__name__}: {e}") from e


def _lines(path: Path) -> list[str]:
    """The file's lines as ``for line in open(path)`` gives them (universal newlines, ends kept), UTF-8."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return list(f)
    except UnicodeDecodeError as e:
        raise JaxprvrError(path, "UTF-8 text", f"undecodable bytes at offset {e.start}") from e
    except OSError as e:
        raise JaxprvrError(path, "a readable file", f"{type(e).__name__}: {e}") from e


def official_stem(name: str) -> str:
    """The video id of a file name as the official MSVD/LSMDC loaders take it: ``".".join(name.split(".")[:-1])``
    (everything before the last dot; ``""`` for a name without a dot)."""
    return ".".join(name.split(".")[:-1])


def walk_videos(video_dir: Path, wanted: Iterable[str]) -> dict[str, Path]:
    """The files below ``video_dir`` whose :func:`official_stem` is in ``wanted`` (``os.walk``, as the official
    MSVD/LSMDC loaders; sorted, so the result does not depend on the file system's order). Two files with one
    wanted id are an error: officially the one ``os.walk`` meets last would silently win."""
    wanted = set(wanted)
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(video_dir):
        dirnames.sort()
        for name in sorted(filenames):
            vid = official_stem(name)
            if vid not in wanted:
                continue
            path = Path(dirpath) / name
            if vid in found:
                raise JaxprvrError(video_dir, f"one file for video id {vid!r}", f"{found[vid]} and {path}")
            found[vid] = path
    return found


# --------------------------------------------------------------------------------------------- MSR-VTT

def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """Rows of a comma-separated file with a header, as ``(line number, {column: value})``. Blank lines are
    skipped (as ``pandas.read_csv`` does); a row with a different number of fields than the header is an error
    (pandas fails on more fields and pads fewer with NaN, which the official code cannot use)."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise JaxprvrError(path, f"a CSV header with columns {list(required)}", "an empty file") from None
    except csv.Error as e:
        raise JaxprvrError(f"{path}:1", "a CSV header", str(e)) from e
    missing = [c for c in required if c not in header]
    if missing:
        raise JaxprvrError(f"{path}:1", f"a CSV header with columns {list(required)}", f"header {header}")
    rows = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise JaxprvrError(f"{path}:{reader.line_num}", "a well-formed CSV row", str(e)) from e
        if not row:
            continue
        if len(row) != len(header):
            raise JaxprvrError(f"{path}:{reader.line_num}", f"{len(header)} comma-separated fields "
                               f"({','.join(header)})", f"{len(row)} fields: {row!r}"[:300])
        rows.append((reader.line_num, dict(zip(header, row))))
    return rows


def _msrvtt_sentences(path: Path) -> list[tuple[str, str]]:
    """``(video_id, caption)`` of every entry of ``MSRVTT_data.json``'s ``sentences``, in file order."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise JaxprvrError(path, "valid JSON", f"{e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise JaxprvrError(path, "a JSON object with a 'sentences' list",
                           f"keys {sorted(data)[:8]}" if isinstance(data, dict) else type(data).__name__)
    out = []
    for k, item in enumerate(data["sentences"]):
        if not (isinstance(item, dict) and isinstance(item.get("video_id"), str)
                and isinstance(item.get("caption"), str)):
            raise JaxprvrError(f"{path} sentences[{k}]", "an object with string 'video_id' and 'caption'",
                               repr(item)[:200])
        out.append((item["video_id"], item["caption"]))
    return out


def read_msrvtt(root, split: str, *, train_split: str = "9k", anno_path=None, video_path=None) -> T2VSplit:
    """MSR-VTT ``split`` (``dataloader_msrvtt_retrieval.py`` ``_get_anns`` l.23-56)."""
    _check_split("msrvtt", split)
    root = Path(root).expanduser()
    anno_dir, video_dir = layout("msrvtt", root, anno_path, video_path)
    if train_split not in TRAIN_SPLITS:
        raise JaxprvrError("msrvtt train_split", f"one of {list(TRAIN_SPLITS)}", repr(train_split))
    skipped: dict[str, int] = {}
    if split == "train":
        csv_path = _annotation(anno_dir / MSRVTT_TRAIN_CSV[train_split], "msrvtt")
        json_path = _annotation(anno_dir / MSRVTT_JSON, "msrvtt")
        listed = [row["video_id"] for _, row in _read_csv(csv_path, ("video_id",))]
        members = set(listed)
        pairs, other = [], 0
        for vid, caption in _msrvtt_sentences(json_path):
            if vid in members:
                pairs.append((caption, vid))
            else:
                other += 1
        skipped["sentences_of_other_videos"] = other  # JSON sentences of videos not in the train CSV (by design)
        have = {v for _, v in pairs}
        lacking = [v for v in dict.fromkeys(listed) if v not in have]
        if lacking:
            raise JaxprvrError(csv_path, f"captions in {MSRVTT_JSON} for every listed video",
                               f"{len(lacking)} listed video(s) without any, e.g. {lacking[:3]}")
        where = csv_path
    else:
        csv_path = _annotation(anno_dir / MSRVTT_TEST_CSV, "msrvtt")
        pairs = []
        for line, row in _read_csv(csv_path, ("video_id", "sentence")):
            if not row["video_id"] or not row["sentence"]:
                raise JaxprvrError(f"{csv_path}:{line}", "a non-empty video_id and sentence", repr(row)[:200])
            pairs.append((row["sentence"], row["video_id"]))
        where = csv_path
    if pairs:
        _video_dir(video_dir, "msrvtt")
    paths = {}
    for _, vid in pairs:
        if vid not in paths:
            p = video_dir / f"{vid}.mp4"
            if not p.is_file():
                raise JaxprvrError(p, f"the video of {vid!r} (listed in {where.name})", "no such file")
            paths[vid] = p
    return _make_split("msrvtt", split, root, anno_dir, video_dir, pairs, paths, skipped, {}, where)


# --------------------------------------------------------------------------------------------- MSVD

class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds only what needs no import (containers, strings, numbers); every global is refused, so no code runs.
    The result is then checked to be dict/list/str only."""

    def find_class(self, module, name):
        raise _RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("a persistent id")


def load_raw_captions(path) -> dict[str, list[list[str]]]:
    """``raw-captions.pkl``: ``{video_id: [[token, ...], ...]}``, read without running any code.

    Only dicts, lists and strings are accepted; a global (a class, a function), a persistent id, or any other type
    anywhere in the structure is a :class:`~jaxprvr.errors.JaxprvrError` naming the file.
    """
    path = Path(path)
    expected = "a pickle of only dict/list/str: {video_id: [[token, ...], ...]}"
    try:
        with open(path, "rb") as f:
            obj = _DataOnlyUnpickler(f).load()
    except _RefusedGlobal as e:
        raise JaxprvrError(path, expected, f"a reference to the global {e} (refused: it could run code)") from None
    except OSError as e:
        raise JaxprvrError(path, "a readable file", f"{type(e).__name__}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt pickle fails in many ways
        raise JaxprvrError(path, expected, f"an unreadable pickle ({type(e).__name__}: {e})"[:300]) from None
    if type(obj) is not dict:
        raise JaxprvrError(path, expected, f"a top-level {type(obj).__name__}")
    for vid, caps in obj.items():
        if type(vid) is not str:
            raise JaxprvrError(path, expected, f"a {type(vid).__name__} key {vid!r}"[:200])
        if type(caps) is not list:
            raise JaxprvrError(f"{path} [{vid!r}]", "a list of captions", type(caps).__name__)
        for k, cap in enumerate(caps):
            if type(cap) is not list or any(type(t) is not str for t in cap):
                raise JaxprvrError(f"{path} [{vid!r}][{k}]", "a caption as a list of str tokens",
                                   repr(cap)[:200])
    return obj


def _read_id_list(path: Path) -> list[str]:
    """One video id per line, stripped (``itm.strip() for itm in fp.readlines()``)."""
    ids = []
    for n, line in enumerate(_lines(path), 1):
        vid = line.strip()
        if not vid:
            raise JaxprvrError(f"{path}:{n}", "one video id per line", "a blank line (the official assert fails)")
        ids.append(vid)
    return ids


def read_msvd(root, split: str, *, anno_path=None, video_path=None) -> T2VSplit:
    """MSVD ``split`` (``dataloader_msvd_retrieval.py`` ``_get_anns`` l.25-72)."""
    _check_split("msvd", split)
    root = Path(root).expanduser()
    anno_dir, video_dir = layout("msvd", root, anno_path, video_path)
    list_path = _annotation(anno_dir / MSVD_LISTS[split], "msvd")
    cap_path = _annotation(anno_dir / MSVD_CAPTIONS, "msvd")
    ids = _read_id_list(list_path)
    dup = [v for v, c in Counter(ids).items() if c > 1]
    if dup:
        raise JaxprvrError(list_path, "each video id once", f"{len(dup)} repeated, e.g. {dup[:3]}")
    captions = load_raw_captions(cap_path)
    pairs = []
    for vid in ids:
        caps = captions.get(vid)
        if not caps:
            raise JaxprvrError(cap_path, f"captions for every id of {list_path.name}",
                               f"{'none' if caps is None else 'an empty list'} for {vid!r}")
        pairs.extend((" ".join(cap), vid) for cap in caps)
    paths = {}
    if ids:
        paths = walk_videos(_video_dir(video_dir, "msvd"), ids)
        absent = [v for v in ids if v not in paths]
        if absent:
            raise JaxprvrError(video_dir, f"a video file for every id of {list_path.name} (<id>.<ext> anywhere below)",
                               f"{len(absent)} missing, e.g. {absent[:3]}")
    return _make_split("msvd", split, root, anno_dir, video_dir, pairs, paths, {}, {}, list_path, multi=True)


# --------------------------------------------------------------------------------------------- LSMDC

def read_lsmdc(root, split: str, *, anno_path=None, video_path=None) -> T2VSplit:
    """LSMDC ``split`` (``dataloader_lsmdc_retrieval.py`` ``_get_anns`` l.24-72)."""
    _check_split("lsmdc", split)
    root = Path(root).expanduser()
    anno_dir, video_dir = layout("lsmdc", root, anno_path, video_path)
    csv_path = _annotation(anno_dir / LSMDC_CSV[split], "lsmdc")
    rows: list[tuple[str, str]] = []
    bad_rows: list[str] = []
    for n, line in enumerate(_lines(csv_path), 1):
        fields = line.strip().split("\t")
        if len(fields) != len(LSMDC_FIELDS):
            raise JaxprvrError(f"{csv_path}:{n}", f"{len(LSMDC_FIELDS)} tab-separated fields "
                               f"({', '.join(LSMDC_FIELDS)})", f"{len(fields)}: {line!r}"[:300])
        clip_id, sentence = fields[0], fields[5]
        if clip_id in LSMDC_BAD_CLIPS:
            bad_rows.append(clip_id)
            continue
        rows.append((sentence, clip_id))
    listed = list(dict.fromkeys(v for _, v in rows))
    paths = walk_videos(_video_dir(video_dir, "lsmdc"), listed) if listed else {}
    pairs = [(s, v) for s, v in rows if v in paths]
    missing = [v for v in listed if v not in paths]
    skipped = {"known_bad_clip_pairs": len(bad_rows), "missing_clip_pairs": len(rows) - len(pairs),
               "missing_clips": len(missing)}
    skipped_ids = {"known_bad_clips": list(dict.fromkeys(bad_rows)), "missing_clips": missing}
    return _make_split("lsmdc", split, root, anno_dir, video_dir, pairs, paths, skipped, skipped_ids, csv_path)


# --------------------------------------------------------------------------------------------- dispatch

def open_t2v(dataset: str, root, split: str, *, train_split: str = "9k", anno_path=None,
             video_path=None) -> T2VSplit:
    """Split ``split`` (train/val/test) of ``dataset`` (msrvtt/msvd/lsmdc) under the data root ``root``.

    ``train_split`` picks MSR-VTT's train CSV (``"9k"``, the official, or ``"7k"``); the other datasets ignore
    it. ``anno_path`` / ``video_path`` override :data:`DEFAULT_LAYOUT` (relative to ``root`` unless absolute).
    """
    _check_dataset(dataset)
    _check_split(dataset, split)
    if train_split not in TRAIN_SPLITS:
        raise JaxprvrError("train_split", f"one of {list(TRAIN_SPLITS)}", repr(train_split))
    root_p = Path(root).expanduser()
    if not root_p.is_dir():
        raise JaxprvrError(root_p, "an existing data root folder", "no such folder")
    kw = dict(anno_path=anno_path, video_path=video_path)
    if dataset == "msrvtt":
        return read_msrvtt(root_p, split, train_split=train_split, **kw)
    if dataset == "msvd":
        return read_msvd(root_p, split, **kw)
    return read_lsmdc(root_p, split, **kw)


__all__ = ["T2VSplit", "open_t2v", "read_msrvtt", "read_msvd", "read_lsmdc", "load_raw_captions", "layout",
           "walk_videos", "official_stem", "DATASETS", "SPLITS", "TRAIN_SPLITS", "DEFAULT_LAYOUT",
           "LSMDC_BAD_CLIPS", "LSMDC_CSV", "MSVD_LISTS", "MSVD_CAPTIONS", "MSRVTT_JSON", "MSRVTT_TRAIN_CSV",
           "MSRVTT_TEST_CSV"]
