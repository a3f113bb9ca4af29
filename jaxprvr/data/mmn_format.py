"""Moment-retrieval data in the MMN / MRNet layout (xian-sh/MRNet ``ret/data/datasets/``), as static-shape batches.

On disk (``ret/config/paths_catalog.py`` L8-55, re-rooted under ``--data-root``: docs/data.md, "MRNet")::

    <ann_dir>/{split}_audio_new.json         {vid: {duration | num_frames+fps, timestamps, sentences, audios}}
    <query_feat_dir>/<audio stem>.pt         one (1, 768) / (1, 1, 768) / (768,) tensor per query (torch zip)
    <video_feat>                             by data.video_mode:
        c3d_h5    <video_feat>/<vid>.h5, dataset 'feature', (T, 500)           (ActivityNet)
        c3d_hdf5  one hdf5 file, dataset '<vid>' (e.g. 's30-d52.avi'), (T, 500) (TACoS)
        i3d_npy   <video_feat>/<vid>.npy, (T, 1, 1, 1024) or (T, 1024)           (Charades-STA)

What a video becomes (``activitynet.py`` / ``charades.py`` / ``tacos.py`` ``__getitem__``, ``utils.py`` L42-63,
L94-123):

* features: every raw row divided by ``max(||x||_2, 1e-12)`` (``F.normalize``) **before** :func:`avgfeats`
  resamples the T rows to ``num_pre_clips``; ActivityNet is cast to float32 first (``utils.py`` L99), the
  others are normalised and averaged in their stored dtype (float16 is widened to float32 here) and become
  float32 at collation (``collate_batch.py`` L20);
* ground truth: ``[max(s, 0), min(e, duration)]`` in float64, stored as float32 (``activitynet.py`` L88;
  TACoS: frames / fps, ``tacos.py`` L80-90);
* queries: sorted by the clamped start (``activitynet.py`` L108-113). The official ``torch.argsort`` is not a
  stable sort, and tied starts are frequent in the real files (every TACoS video), so the order of tied
  queries there is implementation-defined; here the sort is **stable** (ties keep their JSON order). The
  rank is the query's text position in the model;
* ``iou2d``: the IoU of each query with the ``num_clips x num_clips`` candidates ``[i*dur/N, (j+1)*dur/N]``
  (``utils.py`` L42-46, float32, the duration as the JSON's float64).

Every check raises :class:`~jaxprvr.errors.JaxprvrError` naming the file, what was expected and what was
found, where the official code crashes with a ``KeyError`` or silently trains on garbage.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from jaxprvr.config import Config
from jaxprvr.data.pipeline import batch_workers, ordered_map
from jaxprvr.data.sampling import bin_edges
from jaxprvr.data.torch_pt import read_pt_tensor
from jaxprvr.errors import JaxprvrError

Batch = dict
VIDEO_MODES = ("c3d_h5", "c3d_hdf5", "i3d_npy")
NORMALIZE_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)
OPEN_FILES = 32  # the LRU of open hdf5 files


# ---------------------------------------------------------------------------------------------- pure functions


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    """``x / max(||x||_2, 1e-12)`` per row, in the dtype of ``x`` (``F.normalize(x, dim=1)``, ``utils.py`` L100)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, x.dtype.type(NORMALIZE_EPS))


def avgfeats(feats: np.ndarray, num_pre_clips: int) -> np.ndarray:
    """``avgfeats`` (``utils.py`` L49-63): ``feats (T, D)`` -> ``(num_pre_clips, D)`` in the dtype of ``feats``.

    Bin edges ``round(arange(0, N+1)/N*T)`` computed in float32 with round-half-to-even and clamped to T-1
    (:func:`jaxprvr.data.sampling.bin_edges` with float32); row ``i`` is the mean over ``[s, e)``, or row ``s``
    when ``s >= e`` (so short videos repeat rows; when T > N the last raw row never enters a mean, only a last
    bin that starts on it).
    """
    feats = np.asarray(feats)
    edges = bin_edges(feats.shape[0], num_pre_clips, np.float32)
    start = edges[:-1]
    length = np.maximum(edges[1:] - start, 1)  # s >= e: the single row s
    out = np.empty((num_pre_clips, feats.shape[1]), feats.dtype)
    # Vectorised over the bins of each length: rows added left to right in the features' dtype, then divided by
    # the count, which is what ``feats[s:e].mean(axis=0)`` computes (tested equal).
    for n in np.unique(length):
        bins = np.flatnonzero(length == n)
        acc = feats[start[bins]].copy()
        for k in range(1, int(n)):
            acc += feats[start[bins] + k]
        out[bins] = acc / acc.dtype.type(n) if n > 1 else acc
    return out


def _moment_to_iou2d(moments: np.ndarray, duration: float, n: int) -> np.ndarray:
    """``(Q, 2)`` clamped GT -> ``(Q, n, n)`` float32 IoU maps, as ``moment_to_iou2d`` (``utils.py`` L42-46, L11-17).

    The candidate of cell (i, j) is ``[i*dur/n, (j+1)*dur/n]`` computed as torch does for an int64 grid times a
    Python float: ``float32(i) * float32(dur)``, then ``/ n``, in float32. IoU = ``clamp(inter, 0) / union``
    with ``inter = min(end, e) - max(start, s)``, ``union = max(end, e) - min(start, s)``, all float32, for every
    cell (i > j included: their IoU is 0).
    """
    moments = np.asarray(moments, np.float32).reshape(-1, 2)
    grid = np.arange(n + 1, dtype=np.float32) * np.float32(duration) / np.float32(n)
    start = grid[:n][None, :, None]  # (1, n, 1): row i
    end = grid[1:][None, None, :]  # (1, 1, n): column j -> (j + 1) * dur / n
    s = moments[:, 0][:, None, None]
    e = moments[:, 1][:, None, None]
    inter = np.minimum(end, e) - np.maximum(start, s)
    union = np.maximum(end, e) - np.minimum(start, s)
    return (np.maximum(inter, np.float32(0)) / union).astype(np.float32)


def _iou2d_fn():
    """The shared ``jaxprvr.ops.proposals.moment_to_iou2d`` when it exists, else the local transcription."""
    try:
        from jaxprvr.ops.proposals import moment_to_iou2d
    except ImportError:
        return _moment_to_iou2d

    def iou2d(moments, duration, n):
        return np.asarray(moment_to_iou2d(np.asarray(moments, np.float32).reshape(-1, 2), duration, n), np.float32)

    return iou2d


def clamp_moments(timestamps, duration: float, fps: float | None = None) -> np.ndarray:
    """``[max(s, 0), min(e, duration)]`` per query in float64, then float32 (``torch.Tensor``); with ``fps``
    the timestamps are frames and are divided by it first (``tacos.py`` L89-90)."""
    rows = []
    for s, e in timestamps:
        if fps is not None:
            s, e = s / fps, e / fps
        rows.append((max(s, 0), min(e, duration)))
    return np.asarray(rows, np.float64).reshape(-1, 2).astype(np.float32)


def rank_order(moments: np.ndarray) -> np.ndarray:
    """The query order: by clamped start, **stable** (ties keep the JSON order). The official
    ``torch.argsort(start_time)`` (``activitynet.py`` L108-110) does not promise any order for ties."""
    return np.argsort(np.asarray(moments)[:, 0], kind="stable")


# ---------------------------------------------------------------------------------------------- paths


def resolve(root: str | os.PathLike | None, path: str) -> Path:
    """A config path under the data root: absolute paths as they are, relative ones under ``root`` (or the
    working directory when ``root`` is None). ``~`` is expanded."""
    p = Path(path).expanduser()
    if p.is_absolute() or root is None:
        return p
    return Path(root).expanduser() / p


def query_dir(root, cfg: Config) -> Path:
    """``data.query_feat_dir``, or ``data.speech_feat_dir`` when ``data.query_modality == "speech"`` (the same
    model reads speech features: ``preprocess/audio_encode.py`` L168-174)."""
    d = cfg.data
    if d.query_modality == "text":
        return resolve(root, d.query_feat_dir)
    if d.query_modality == "speech":
        if not d.speech_feat_dir:
            raise JaxprvrError("data.speech_feat_dir", "a folder of speech query features (data.query_modality="
                               "speech)", "an empty setting", hint="--set data.speech_feat_dir=PATH")
        return resolve(root, d.speech_feat_dir)
    raise JaxprvrError("data.query_modality", "'text' or 'speech'", repr(d.query_modality))


def annotation_file(root, cfg: Config, split: str) -> Path:
    """``<ann_dir>/{split}_audio_new.json`` (the only files the official loaders can read: ``paths_catalog.py``
    L11-51), after checking that ``split`` is one of ``data.splits``."""
    if split not in cfg.data.splits:
        raise JaxprvrError("split", f"one of data.splits {list(cfg.data.splits)} of {cfg.data.dataset}",
                           repr(split))
    return resolve(root, cfg.data.ann_dir) / f"{split}_audio_new.json"


def audio_stem(audio: str) -> str:
    """``audio.split(".")[0]``: the query feature file is ``<stem>.pt`` (``activitynet.py`` L99-101)."""
    return audio.split(".")[0]


# ---------------------------------------------------------------------------------------------- annotations


@dataclass(frozen=True)
class VideoAnnotation:
    """One video of an annotation file; query arrays in rank order."""

    vid: str
    duration: float  # float64 seconds (TACoS: num_frames / fps)
    moments: np.ndarray  # (n_q, 2) float32, clamped, rank order
    json_index: np.ndarray  # (n_q,) the JSON position of each ranked query
    query_ids: tuple[str, ...]  # audio stems, rank order


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def read_annotations(path: str | os.PathLike, frames: bool, empty_spans: str = "error") -> list[VideoAnnotation]:
    """The videos of ``{split}_audio_new.json`` in file order.

    ``frames``: TACoS (``num_frames``, ``fps``, timestamps in frames); otherwise ``duration`` in seconds.
    ``empty_spans``: what to do with a query whose clamped span is empty (e <= s): ``"error"`` (default) or
    ``"keep"`` (the official behaviour: its iou2d target is all zeros). MMN's ActivityNet ``train.json`` has
    four such queries (e.g. ``v_0bosp4-pyTM``: [61.29, 60.71]), so real ActivityNet training needs ``"keep"``.
    """
    path = Path(path)
    if not path.is_file():
        raise JaxprvrError(path, "an annotation file {split}_audio_new.json", "no such file",
                           hint="--data-root or --set data.ann_dir=")
    try:
        annos = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JaxprvrError(path, "a JSON object {vid: {...}}", f"unreadable JSON ({e})") from None
    if not isinstance(annos, dict):
        raise JaxprvrError(path, "a JSON object {vid: {...}}", f"a JSON {type(annos).__name__}")
    if not annos:
        raise JaxprvrError(path, "at least one video", "an empty split")
    if empty_spans not in ("error", "keep"):
        raise JaxprvrError("empty_spans", "'error' or 'keep'", repr(empty_spans))
    videos = []
    for vid, a in annos.items():
        where = f"{path} [{vid!r}]"
        if not isinstance(a, dict):
            raise JaxprvrError(where, "an object with timestamps and audios", f"a JSON {type(a).__name__}")
        if "audios" not in a:
            raise JaxprvrError(where, "an 'audios' list (the *_audio_new.json files; the plain MMN JSONs lack it)",
                               f"keys {sorted(a)}")
        if "timestamps" not in a:
            raise JaxprvrError(where, "a 'timestamps' list", f"keys {sorted(a)}")
        fps = None
        if frames:
            for key in ("num_frames", "fps"):
                if not _number(a.get(key)) or a[key] <= 0:
                    raise JaxprvrError(where, f"a positive number {key!r} (TACoS: frames / fps)",
                                       repr(a.get(key)))
            fps = a["fps"]
            duration = a["num_frames"] / fps
        else:
            if not _number(a.get("duration")) or a["duration"] <= 0:
                raise JaxprvrError(where, "a positive number 'duration'", repr(a.get("duration")))
            duration = float(a["duration"])
        timestamps, audios = a["timestamps"], a["audios"]
        lengths = {"timestamps": len(timestamps), "audios": len(audios)}
        if "sentences" in a:
            lengths["sentences"] = len(a["sentences"])
        if len(set(lengths.values())) != 1:
            raise JaxprvrError(where, "lists of one length (one entry per query)",
                               ", ".join(f"{k} {n}" for k, n in lengths.items()))
        if not timestamps:
            raise JaxprvrError(where, "at least one query", "a video without queries")
        for k, ts in enumerate(timestamps):
            if not (isinstance(ts, (list, tuple)) and len(ts) == 2 and all(_number(t) for t in ts)):
                raise JaxprvrError(where, f"timestamps[{k}] = [start, end] (numbers)", repr(ts)[:80])
        for k, au in enumerate(audios):
            if not isinstance(au, str) or not audio_stem(au):
                raise JaxprvrError(where, f"audios[{k}] = a file name", repr(au)[:80])
        moments = clamp_moments(timestamps, duration, fps)
        empty = np.flatnonzero(moments[:, 1] <= moments[:, 0])
        if len(empty) and empty_spans == "error":
            k = int(empty[0])
            raise JaxprvrError(where, f"a non-empty span after clamping to [0, {duration:g}] (timestamps[{k}])",
                               f"{timestamps[k]} -> [{moments[k, 0]:g}, {moments[k, 1]:g}]",
                               hint="the official code trains on an all-zero target; pass empty_spans='keep'")
        order = rank_order(moments)
        videos.append(VideoAnnotation(vid=str(vid), duration=duration, moments=moments[order],
                                      json_index=order, query_ids=tuple(audio_stem(audios[k]) for k in order)))
    return videos


# ---------------------------------------------------------------------------------------------- features


class _OpenFiles:
    """An LRU of open read-only hdf5 files, safe to use from the batch threads (reads run under its lock)."""

    def __init__(self, maxsize: int = OPEN_FILES):
        self.maxsize = maxsize
        self._files: OrderedDict[str, h5py.File] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, path: Path, what: str) -> h5py.File:
        """The open file ``path`` (opened on first use, the least recently used one closed); call under the lock."""
        f = self._files.get(str(path))
        if f is None:
            if not path.is_file():
                raise JaxprvrError(path, what, "no such file")
            try:
                f = h5py.File(path, "r")
            except OSError as e:
                raise JaxprvrError(path, "a readable hdf5 file", str(e)) from None
            self._files[str(path)] = f
            while len(self._files) > self.maxsize:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(str(path))
        return f

    def read(self, path: Path, key: str, what: str) -> np.ndarray:
        with self._lock:
            f = self._get(path, what)
            if key not in f:
                raise JaxprvrError(path, f"a dataset {key!r}", "none" if len(f) > 20 else f"only {sorted(f)}")
            return np.asarray(f[key][()])

    def has(self, path: Path, keys: Sequence[str]) -> list[str]:
        """The keys of ``keys`` missing from the hdf5 file ``path``."""
        with self._lock:
            if not path.is_file():
                raise JaxprvrError(path, "the video feature hdf5 file (data.video_feat)", "no such file")
            with h5py.File(path, "r") as f:
                return [k for k in keys if k not in f]

    def close(self) -> None:
        with self._lock:
            while self._files:
                self._files.popitem()[1].close()


def _check_features(x: np.ndarray, where, width: int, what: str) -> None:
    if x.ndim != 2:
        raise JaxprvrError(where, f"{what} of shape (T, {width})", f"shape {x.shape}")
    if x.shape[0] == 0:
        raise JaxprvrError(where, f"{what} with at least one row", "T = 0")
    if x.shape[1] != width:
        raise JaxprvrError(where, f"{what} of width {width} (the config's width)", f"shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise JaxprvrError(where, f"floating-point {what}", str(x.dtype))
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise JaxprvrError(where, f"finite {what}", f"NaN/Inf in row {bad}")


# ---------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class VMRRecord:
    """One video with all its queries, rank order."""

    index: int  # position in the split
    vid: str
    feats: np.ndarray  # (num_pre_clips, input_size) float32
    queries: np.ndarray  # (n_q, text_dim) float32
    moments: np.ndarray  # (n_q, 2) float32 seconds, clamped
    duration: float  # float64 seconds
    query_ids: tuple[str, ...]


class MMNDataset:
    """One split of an MMN-format moment-retrieval dataset (annotations read at once, features lazily).

    ``MMNDataset(root, cfg, split)``: ``root`` is the ``--data-root`` under which the relative paths of
    ``cfg.data`` (``ann_dir``, ``video_feat``, ``query_feat_dir`` / ``speech_feat_dir``) are resolved. Videos are
    in annotation-file order. ``check_files`` (default) verifies at construction that every video feature and
    query file exists (and every hdf5 key), so a wrong path fails before training rather than hours in.
    ``empty_spans``: see :func:`read_annotations` (default: ``cfg.data.empty_spans`` if the config has it, else
    ``"error"``).
    """

    def __init__(self, root: str | os.PathLike | None, cfg: Config, split: str, *, check_files: bool = True,
                 empty_spans: str | None = None):
        d = cfg.data
        if d.video_mode not in VIDEO_MODES:
            raise JaxprvrError("data.video_mode", f"one of {list(VIDEO_MODES)}", repr(d.video_mode))
        self.split = split
        self.dataset = d.dataset
        self.video_mode = d.video_mode
        self.num_pre_clips = int(cfg.model.num_pre_clips)
        self.input_size = int(cfg.model.input_size)
        self.text_dim = int(cfg.model.text_dim)
        self.ann_file = annotation_file(root, cfg, split)
        self.video_feat = resolve(root, d.video_feat)
        self.query_dir = query_dir(root, cfg)
        if empty_spans is None:
            empty_spans = getattr(d, "empty_spans", "error")
        self.annotations = read_annotations(self.ann_file, frames=d.dataset == "tacos", empty_spans=empty_spans)
        self.video_ids = [a.vid for a in self.annotations]
        self.query_counts = np.array([len(a.query_ids) for a in self.annotations], np.int64)
        self._files = _OpenFiles()
        if check_files:
            self.check_files()

    # -- sizes
    def __len__(self) -> int:
        return len(self.annotations)

    @property
    def max_queries(self) -> int:
        return int(self.query_counts.max())

    @property
    def n_queries_total(self) -> int:
        return int(self.query_counts.sum())

    def durations(self) -> np.ndarray:
        return np.array([a.duration for a in self.annotations], np.float64)

    # -- files
    def video_path(self, vid: str) -> Path:
        if self.video_mode == "c3d_h5":
            return self.video_feat / f"{vid}.h5"
        if self.video_mode == "i3d_npy":
            return self.video_feat / f"{vid}.npy"
        return self.video_feat

    def query_path(self, query_id: str) -> Path:
        return self.query_dir / f"{query_id}.pt"

    def check_files(self) -> None:
        """Every video feature file (hdf5 key) and query ``.pt`` exists; the first missing one is an error."""
        if self.video_mode == "c3d_hdf5":
            missing = self._files.has(self.video_feat, self.video_ids)
            if missing:
                raise JaxprvrError(self.video_feat, f"a dataset per video of {self.ann_file.name}",
                                   f"{len(missing)} missing, e.g. {missing[0]!r}")
        else:
            if not self.video_feat.is_dir():
                raise JaxprvrError(self.video_feat, "the video feature folder (data.video_feat)", "no such folder")
            for vid in self.video_ids:
                if not self.video_path(vid).is_file():
                    raise JaxprvrError(self.video_path(vid), f"the features of video {vid!r}", "no such file")
        if not self.query_dir.is_dir():
            raise JaxprvrError(self.query_dir, "the query feature folder", "no such folder")
        for a in self.annotations:
            for q in a.query_ids:
                if not self.query_path(q).is_file():
                    raise JaxprvrError(self.query_path(q), f"the features of a query of {a.vid!r}", "no such file")

    def raw_video(self, vid: str) -> np.ndarray:
        """The stored ``(T, D)`` features of ``vid`` (c3d_h5: as float32; others: their stored dtype, float16
        widened to float32), checked (shape, width, T >= 1, finite)."""
        path = self.video_path(vid)
        if self.video_mode == "c3d_h5":
            x = self._files.read(path, "feature", f"the features of video {vid!r}").astype(np.float32)  # utils L99
            where = f"{path} ['feature']"
        elif self.video_mode == "c3d_hdf5":
            x = self._files.read(path, vid, "the video feature hdf5 file (data.video_feat)")
            where = f"{path} [{vid!r}]"
        else:
            if not path.is_file():
                raise JaxprvrError(path, f"the features of video {vid!r}", "no such file")
            try:
                x = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise JaxprvrError(path, "a .npy array", str(e)) from None
            if x.ndim == 4 and x.shape[1:3] == (1, 1):  # (T, 1, 1, D): squeeze(1).squeeze(1), utils.py L104
                x = x[:, 0, 0]
            where = path
        if x.dtype == np.float16:
            x = x.astype(np.float32)
        _check_features(x, where, self.input_size, "video features")
        return x

    def video_features(self, vid: str) -> np.ndarray:
        """``(num_pre_clips, input_size)`` float32: rows L2-normalised, then :func:`avgfeats`."""
        return avgfeats(l2_normalize_rows(self.raw_video(vid)), self.num_pre_clips).astype(np.float32)

    def query_features(self, query_id: str) -> np.ndarray:
        """``(text_dim,)`` float32 from ``<query_dir>/<query_id>.pt``, stored as (1, D), (1, 1, D) or (D,)."""
        path = self.query_path(query_id)
        x = read_pt_tensor(path)
        if x.shape not in ((1, self.text_dim), (1, 1, self.text_dim), (self.text_dim,)):
            raise JaxprvrError(path, f"a query feature of shape (1, {self.text_dim}), (1, 1, {self.text_dim}) or "
                               f"({self.text_dim},) (model.text_dim)", f"shape {x.shape}")
        x = x.reshape(self.text_dim).astype(np.float32)
        if not np.isfinite(x).all():
            raise JaxprvrError(path, "a finite query feature", "NaN/Inf")
        return x

    def record(self, i: int) -> VMRRecord:
        a = self.annotations[i]
        queries = np.stack([self.query_features(q) for q in a.query_ids])
        return VMRRecord(index=int(i), vid=a.vid, feats=self.video_features(a.vid), queries=queries,
                         moments=a.moments, duration=a.duration, query_ids=a.query_ids)

    def close(self) -> None:
        self._files.close()


# ---------------------------------------------------------------------------------------------- batches


def q_slots(ds: MMNDataset, cfg: Config) -> int:
    """Query slots per video: the split's largest query count rounded up to ``data.query_capacity_multiple``."""
    m = max(1, int(cfg.data.query_capacity_multiple))
    return int(-(-ds.max_queries // m) * m)


def collate(records: Sequence[VMRRecord], batch_size: int, q_slots: int, num_clips: int) -> Batch:
    """The contract's batch of ``batch_size`` videos (the records, then padding videos with ``video_valid`` 0 and
    ``index`` -1), each with ``q_slots`` query slots (real queries first, rank order)."""
    if len(records) > batch_size:
        raise ValueError(f"{len(records)} videos do not fit a batch of {batch_size}")
    iou2d_of = _iou2d_fn()
    r0 = records[0]
    n_pre, dv = r0.feats.shape
    dq = r0.queries.shape[1]
    out = dict(
        feats=np.zeros((batch_size, n_pre, dv), np.float32),
        video_valid=np.zeros((batch_size,), np.float32),
        queries=np.zeros((batch_size, q_slots, dq), np.float32),
        query_mask=np.zeros((batch_size, q_slots), np.float32),
        n_queries=np.zeros((batch_size,), np.int32),
        moments=np.zeros((batch_size, q_slots, 2), np.float32),
        duration=np.zeros((batch_size,), np.float32),
        iou2d=np.zeros((batch_size, q_slots, num_clips, num_clips), np.float32),
        vid=[""] * batch_size,
        query_ids=[[] for _ in range(batch_size)],
        index=np.full((batch_size,), -1, np.int32),
    )
    for b, r in enumerate(records):
        n = r.queries.shape[0]
        if n > q_slots:
            raise ValueError(f"video {r.vid!r} has {n} queries, more than the {q_slots} query slots")
        out["feats"][b] = r.feats
        out["video_valid"][b] = 1.0
        out["queries"][b, :n] = r.queries
        out["query_mask"][b, :n] = 1.0
        out["n_queries"][b] = n
        out["moments"][b, :n] = r.moments
        out["duration"][b] = r.duration
        out["iou2d"][b, :n] = iou2d_of(r.moments, r.duration, num_clips)
        out["vid"][b] = r.vid
        out["query_ids"][b] = list(r.query_ids)
        out["index"][b] = r.index
    return out


def _batches(ds: MMNDataset, order: np.ndarray, batch_size: int, slots: int, num_clips: int,
             workers: int) -> Iterator[Batch]:
    def build(rows: np.ndarray) -> Batch:
        return collate([ds.record(int(i)) for i in rows], batch_size, slots, num_clips)

    plans = (order[s:s + batch_size] for s in range(0, len(order), batch_size))
    yield from ordered_map(build, plans, workers)


def train_batches(ds: MMNDataset, cfg: Config, epoch: int, skip: int = 0) -> Iterator[Batch]:
    """One epoch: ``ceil(len(ds) / train.batch_size)`` batches (``drop_last=False``, ``ret/data/__init__.py``
    L47-52), videos in the permutation of ``np.random.default_rng([train.seed, epoch])``, the last batch padded.
    ``skip`` leaves out the first batches without reading them (exact resume). ``data.workers`` threads build
    batches (same batches, same order); wrap in :class:`jaxprvr.data.prefetch` to overlap with the step."""
    bs = int(cfg.train.batch_size)
    order = np.random.default_rng([cfg.train.seed, epoch]).permutation(len(ds))
    return _batches(ds, order[skip * bs:], bs, q_slots(ds, cfg), cfg.model.num_clips,
                    batch_workers(cfg.data.workers))


def eval_batches(ds: MMNDataset, cfg: Config) -> Iterator[Batch]:
    """The split in file order, ``data.eval_batch_size`` videos per batch, the last one padded."""
    return _batches(ds, np.arange(len(ds)), int(cfg.data.eval_batch_size), q_slots(ds, cfg),
                    cfg.model.num_clips, batch_workers(cfg.data.workers))


def num_batches(ds: MMNDataset, batch_size: int) -> int:
    return -(-len(ds) // batch_size)


__all__ = ["MMNDataset", "VMRRecord", "VideoAnnotation", "read_annotations", "collate", "q_slots",
           "train_batches", "eval_batches", "num_batches", "avgfeats", "l2_normalize_rows", "clamp_moments",
           "rank_order", "resolve", "annotation_file", "query_dir", "audio_stem", "VIDEO_MODES"]
