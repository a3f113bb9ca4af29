"""Readers for the MS-SL feature release, the on-disk format shared by MS-SL, GMMFormer, GMMFormer v2 and MTM.

Layout (ms-sl ``method/train.py:193-221``; GMMFormer ``src/Datasets/builder.py:10-60``)::

    $ROOT/<collection>/TextData/<collection>{train,val,test}.caption.txt
    $ROOT/<collection>/TextData/roberta_<collection>_query_feat.hdf5
    $ROOT/<collection>/FeatureData/<visual_feature>/{feature.bin,id.txt,shape.txt,video2frames.txt}

Each reader checks what it reads and raises :class:`~jaxprvr.errors.JaxprvrError` naming the file, what was
expected and what was found, where the official code would crash with a bare ``KeyError``/``IndexError`` or
silently read garbage. Nothing is skipped: a bad item stops the run.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from jaxprvr.errors import JaxprvrError

SPLITS = ("train", "val", "test")
BIGFILE_FILES = ("feature.bin", "id.txt", "shape.txt", "video2frames.txt")


@dataclass(frozen=True)
class ReleasePaths:
    """Where the files of one collection live under a data root."""

    root: Path
    collection: str
    visual_feature: str

    @property
    def collection_dir(self) -> Path:
        return self.root / self.collection

    @property
    def text_dir(self) -> Path:
        return self.collection_dir / "TextData"

    @property
    def feature_dir(self) -> Path:
        return self.collection_dir / "FeatureData" / self.visual_feature

    @property
    def query_feat_file(self) -> Path:
        return self.text_dir / f"roberta_{self.collection}_query_feat.hdf5"

    def caption_file(self, split: str) -> Path:
        if split not in SPLITS:
            raise JaxprvrError("split", f"one of {list(SPLITS)}", repr(split))
        return self.text_dir / f"{self.collection}{split}.caption.txt"


def release_paths(root: str | os.PathLike, collection: str, visual_feature: str) -> ReleasePaths:
    """Checks that ``root/<collection>/{TextData,FeatureData/<visual_feature>}`` exist and returns the paths."""
    paths = ReleasePaths(Path(root).expanduser(), collection, visual_feature)
    if not paths.root.is_dir():
        raise JaxprvrError(paths.root, "a data root folder (containing tvr/, activitynet/ or charades/)",
                           "no such folder")
    if not paths.collection_dir.is_dir():
        present = sorted(p.name for p in paths.root.iterdir() if p.is_dir())
        raise JaxprvrError(paths.root, f"a folder {collection}/ (the MS-SL release layout)",
                           f"only {present}" if present else "no sub-folders",
                           hint="--data-root must be the folder that contains the unzipped collections")
    for folder in (paths.text_dir, paths.feature_dir):
        if not folder.is_dir():
            raise JaxprvrError(folder, "a folder of the MS-SL release layout", "no such folder")
    return paths


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise JaxprvrError(path, "a file of the MS-SL release layout", "no such file")
    return path


def video_id_of(cap_id: str) -> str:
    """``cap_id.split('#')[0]`` (``getVideoId``, ms-sl ``method/data_provider.py:9-11``)."""
    return cap_id.split("#")[0]


def read_captions(path: str | os.PathLike) -> list[str]:
    """The cap_ids of a caption file, in file order.

    Each line is ``<cap_id> <caption text>``, parsed as ``line.strip().split(' ', 1)`` (ms-sl
    ``method/data_provider.py:184``); the text is never used. A line without both parts is an error, as is
    a file without any line.
    """
    path = _require_file(Path(path))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise JaxprvrError(path, "UTF-8 text", f"undecodable bytes at offset {e.start}") from None
    cap_ids = []
    for number, line in enumerate(lines, start=1):
        parts = line.strip().split(" ", 1)
        if len(parts) != 2 or not parts[0]:
            raise JaxprvrError(f"{path}:{number}", "a line '<cap_id> <caption text>'", repr(line[:80]))
        cap_ids.append(parts[0])
    if not cap_ids:
        raise JaxprvrError(path, "at least one caption line", "an empty split")
    return cap_ids


def unique_in_order(items) -> list[str]:
    """The distinct items in order of first appearance (``read_video_ids``, ms-sl ``data_provider.py:17-25``)."""
    return list(dict.fromkeys(items))


def read_video2frames(path: str | os.PathLike) -> dict[str, list[str]]:
    """``video2frames.txt``: a Python dict literal ``{video_id: [frame_id, ...]}`` in temporal order.

    The official ``read_dict`` runs ``eval()`` on it (ms-sl ``utils/basic_utils.py:133-138``);
    ``ast.literal_eval`` reads the same literals and cannot run code.
    """
    path = _require_file(Path(path))
    try:
        table = ast.literal_eval(path.read_text(encoding="utf-8"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError) as e:
        raise JaxprvrError(path, "a Python dict literal {video_id: [frame_id, ...]}",
                           f"unparsable text ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(table, dict):
        raise JaxprvrError(path, "a Python dict literal {video_id: [frame_id, ...]}", type(table).__name__)
    for video_id, frames in table.items():
        if not (isinstance(video_id, str) and isinstance(frames, (list, tuple))
                and all(isinstance(f, str) for f in frames)):
            raise JaxprvrError(path, "string video ids mapped to lists of string frame ids",
                               f"{video_id!r}: {str(frames)[:80]}")
    return table


class BigFile:
    """The dense frame-feature store: ``shape.txt``, ``id.txt``, ``feature.bin`` (ms-sl ``utils/basic_utils.py:9-68``).

    ``feature.bin`` is raw little-endian float32, row ``i`` belonging to the ``i``-th id of ``id.txt``; it is
    memory-mapped, never loaded whole (the releases are tens of GB).
    """

    def __init__(self, feature_dir: str | os.PathLike):
        feature_dir = Path(feature_dir)
        shape_file = _require_file(feature_dir / "shape.txt")
        id_file = _require_file(feature_dir / "id.txt")
        self.binary_file = _require_file(feature_dir / "feature.bin")

        first_line = shape_file.read_text(encoding="utf-8").splitlines()[:1]
        fields = first_line[0].split() if first_line else []
        if len(fields) != 2 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise JaxprvrError(shape_file, "one line '<num_frames> <dim>' of two positive integers",
                               repr(first_line[0][:80] if first_line else ""))
        self.num_rows, self.dim = int(fields[0]), int(fields[1])

        # Whitespace-separated ids, decoded ISO-8859-1 (basic_utils.py:15-17).
        self.names = [n.decode("ISO-8859-1") for n in id_file.read_bytes().strip().split()]
        if len(self.names) != self.num_rows:  # the official code asserts this (basic_utils.py:22)
            raise JaxprvrError(id_file, f"{self.num_rows} frame ids (shape.txt)", f"{len(self.names)}")
        # dict(zip(...)) as in basic_utils.py:23: a repeated id maps to its last row.
        self.name2index = dict(zip(self.names, range(self.num_rows)))

        expected = self.num_rows * self.dim * 4
        found = self.binary_file.stat().st_size
        if found != expected:
            raise JaxprvrError(self.binary_file, f"{expected} bytes ({self.num_rows} x {self.dim} float32, shape.txt)",
                               f"{found} bytes")
        self.features = np.memmap(self.binary_file, dtype="<f4", mode="r", shape=(self.num_rows, self.dim))

    def rows_of(self, frame_ids, where: str) -> np.ndarray:
        """The feature-row indices of ``frame_ids``; ``where`` names the item asking (for the error)."""
        try:
            return np.fromiter((self.name2index[f] for f in frame_ids), dtype=np.int64, count=len(frame_ids))
        except KeyError as e:
            raise JaxprvrError(self.binary_file.with_name("id.txt"), f"frame id {e.args[0]!r} ({where})",
                               "no such id") from None


class VideoFeatures:
    """Raw frame matrices ``F (n, dim)`` of videos, from a BigFile folder and its ``video2frames.txt``."""

    def __init__(self, feature_dir: str | os.PathLike):
        feature_dir = Path(feature_dir)
        self.feature_dir = feature_dir
        self.store = BigFile(feature_dir)
        self.video2frames_file = feature_dir / "video2frames.txt"
        self.video2frames = read_video2frames(self.video2frames_file)
        self._rows: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.store.dim

    def index(self, video_ids, caption_file: Path) -> np.ndarray:
        """Resolves the frames of ``video_ids`` (checking that every one of them exists) and returns their
        raw frame counts ``(len(video_ids),)`` int64."""
        counts = np.zeros(len(video_ids), dtype=np.int64)
        for i, video_id in enumerate(video_ids):
            if video_id not in self._rows:
                frames = self.video2frames.get(video_id)
                if frames is None:
                    raise JaxprvrError(self.video2frames_file, f"an entry for video {video_id!r} "
                                       f"(captioned in {caption_file.name})", "none")
                if len(frames) == 0:
                    raise JaxprvrError(self.video2frames_file, f"at least one frame for video {video_id!r}",
                                       "an empty frame list")
                self._rows[video_id] = self.store.rows_of(frames, f"video {video_id!r} in video2frames.txt")
            counts[i] = len(self._rows[video_id])
        return counts

    def read(self, video_id: str) -> np.ndarray:
        """``F (n, dim)`` as float64, the dtype the official loaders compute in: ``BigFile.read`` returns
        Python floats (``array('f').tolist()``) and ``np.array(frame_vecs)`` makes them float64
        (ms-sl ``data_provider.py:222-226``). Non-finite values are an error naming the video."""
        feats = np.asarray(self.store.features[self._rows[video_id]])
        if not np.isfinite(feats).all():
            raise JaxprvrError(self.store.binary_file, f"finite features for video {video_id!r}",
                               f"{int(np.size(feats) - np.isfinite(feats).sum())} NaN/Inf values")
        return feats.astype(np.float64)


class QueryFeatures:
    """Token features ``(num_tokens, q_dim)`` per cap_id, from ``roberta_<collection>_query_feat.hdf5``.

    One root-level dataset per cap_id, read lazily (``self.text_feat[cap_id][...]``, ms-sl
    ``data_provider.py:238``).
    """

    def __init__(self, path: str | os.PathLike, q_dim: int):
        self.path = _require_file(Path(path))
        self.q_dim = q_dim
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise JaxprvrError(self.path, "an HDF5 file", f"unreadable ({e})") from None
        self._keys: set[str] | None = None

    def check(self, cap_ids, caption_file: Path) -> None:
        """Every cap_id has a dataset; the first one's width matches ``q_dim`` (each is checked when read)."""
        if self._keys is None:
            self._keys = set(self.file.keys())
        missing = [c for c in cap_ids if c not in self._keys]
        if missing:
            raise JaxprvrError(self.path, f"a dataset for every cap_id of {caption_file.name}",
                               f"{len(missing)} missing, e.g. {missing[0]!r}")
        self._dataset(cap_ids[0])

    def _dataset(self, cap_id: str):
        ds = self.file[cap_id]
        if not isinstance(ds, h5py.Dataset) or len(ds.shape) != 2 or ds.shape[0] < 1:
            raise JaxprvrError(self.path, f"a 2-D (num_tokens >= 1, {self.q_dim}) dataset for cap_id {cap_id!r}",
                               f"shape {getattr(ds, 'shape', type(ds).__name__)}")
        if ds.shape[1] != self.q_dim:
            raise JaxprvrError(self.path, f"query features of width {self.q_dim} (model.q_feat_size) "
                               f"for cap_id {cap_id!r}", f"width {ds.shape[1]}",
                               hint="set model.q_feat_size to the feature width, or use the matching config")
        if not np.issubdtype(ds.dtype, np.floating):
            raise JaxprvrError(self.path, f"floating-point features for cap_id {cap_id!r}", f"dtype {ds.dtype}")
        return ds

    def read(self, cap_id: str) -> np.ndarray:
        """The raw token matrix, in its stored dtype; non-finite values are an error naming the cap_id."""
        feats = self._dataset(cap_id)[...]
        if not np.isfinite(feats).all():
            raise JaxprvrError(self.path, f"finite features for cap_id {cap_id!r}",
                               f"{int(feats.size - np.isfinite(feats).sum())} NaN/Inf values")
        return feats
