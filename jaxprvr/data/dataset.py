"""The video-centric PRVR dataset and its static-shape batches.

:class:`PRVRDataset` turns one split of an MS-SL release into model inputs exactly as the official
``Dataset4MS_SL`` / ``VisDataSet4MS_SL`` / ``TxtDataSet4MS_SL`` do (ms-sl ``method/data_provider.py:169-316``;
GMMFormer ``src/Datasets/data_provider.py:168-315``). The batch functions then pad every batch to the same
shapes, so a jitted step compiles once:

* :func:`train_batches`: shuffled videos, each with *all* its queries (official ``collate_train``);
* :func:`video_batches` / :func:`query_batches`: the evaluation gallery and queries, in caption-file order;
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from jaxprvr.config import Config
from jaxprvr.data.msl_format import (BIGFILE_FILES, SPLITS, QueryFeatures, VideoFeatures, read_captions,
                                     release_paths, unique_in_order, video_id_of)
from jaxprvr.data.pipeline import ordered_map
from jaxprvr.data.sampling import average_to_fixed_length, l2_normalize_rows, uniform_feature_sampling

Batch = dict[str, np.ndarray]


class PRVRDataset:
    """One split (``train``/``val``/``test``) of a PRVR collection in the MS-SL release layout.

    Attributes:
      video_ids: the videos of the split, in order of first appearance in the caption file (the gallery).
      cap_ids: the queries, in caption-file order.
      query_video_index: ``(Nq,)`` int32, the index into ``video_ids`` of each query's video (ground truth).
      video_query_index: per video, the int64 indices into ``cap_ids`` of its queries, in caption order.
      query_counts: ``(Nv,)`` int64, the number of queries of each video.
      num_frames: ``(Nv,)`` int64 raw frame counts; ``frame_lengths``: ``min(num_frames, max_ctx_l)``.
      visual_dim: from ``shape.txt``; query_dim: ``cfg.model.q_feat_size`` (checked against the hdf5).

    The splits of one release share their opened frame store and query file (see :func:`_video_store`),
    so ``video2frames.txt`` is parsed once per process.
    """

    def __init__(self, root: str | os.PathLike, cfg: Config, split: str):
        paths = release_paths(root, cfg.data.collection, cfg.data.visual_feature)
        self.split = split
        self.caption_file = paths.caption_file(split)
        self.map_size = cfg.data.map_size
        self.max_ctx_l = cfg.data.max_ctx_l
        self.max_desc_l = cfg.data.max_desc_l
        self.videos = _video_store(str(paths.feature_dir), _signature(paths.feature_dir, BIGFILE_FILES))
        self.queries = _query_store(str(paths.query_feat_file), cfg.model.q_feat_size,
                                    _signature(paths.text_dir, (paths.query_feat_file.name,)))

        self.cap_ids = read_captions(self.caption_file)
        self.video_ids = unique_in_order(video_id_of(c) for c in self.cap_ids)
        position = {v: i for i, v in enumerate(self.video_ids)}
        self.query_video_index = np.array([position[video_id_of(c)] for c in self.cap_ids], dtype=np.int32)
        # Official vid_caps (data_provider.py:190-194): each video's cap_ids in caption order.
        self.query_counts = np.bincount(self.query_video_index, minlength=len(self.video_ids)).astype(np.int64)
        grouped = np.argsort(self.query_video_index, kind="stable")
        self.video_query_index = np.split(grouped, np.cumsum(self.query_counts)[:-1])

        self.queries.check(self.cap_ids, self.caption_file)
        self.num_frames = self.videos.index(self.video_ids, self.caption_file)
        self.frame_lengths = np.minimum(self.num_frames, self.max_ctx_l)
        self.visual_dim = self.videos.dim
        self.query_dim = self.queries.q_dim

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_queries(self) -> int:
        return len(self.cap_ids)

    def video_item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(clip (map_size, Dv), frames (min(n, max_ctx_l), Dv))``, both float32 and row-L2-normalised.

        As ``Dataset4MS_SL.__getitem__`` (ms-sl ``data_provider.py:219-232``): both are computed in float64 from
        the same raw frames and become float32 when collated (``.float()`` / copy into a float32 tensor).
        """
        feats = self.videos.read(self.video_ids[i])
        clip = l2_normalize_rows(average_to_fixed_length(feats, self.map_size))
        frames = l2_normalize_rows(uniform_feature_sampling(feats, self.max_ctx_l))
        return clip.astype(np.float32), frames.astype(np.float32)

    def query_item(self, j: int) -> np.ndarray:
        """``(min(T, max_desc_l), Dq)`` float32: per-token L2 normalisation (eps 1e-5) in the stored dtype,
        then truncation to the first ``max_desc_l`` tokens (ms-sl ``data_provider.py:238-240``)."""
        tokens = l2_normalize_rows(self.queries.read(self.cap_ids[j]))[: self.max_desc_l]
        return tokens.astype(np.float32)

    def query_capacity(self, batch_size: int, multiple: int = 8) -> int:
        """A static bound on the queries of any training batch: the sum of the ``batch_size`` largest
        per-video query counts, rounded up to ``multiple`` (``cfg.data.query_capacity_multiple``)."""
        largest = np.sort(self.query_counts)[::-1][:batch_size].sum()
        return int(-(-largest // multiple) * multiple)


def open_splits(root: str | os.PathLike, cfg: Config, splits: Iterable[str] = SPLITS) -> dict[str, PRVRDataset]:
    """``{split: PRVRDataset(root, cfg, split)}`` for several splits."""
    return {s: PRVRDataset(root, cfg, s) for s in splits}


def _signature(folder: Path, names: Iterable[str]) -> tuple:
    """(name, mtime, size) of files, so a rewritten file is opened afresh rather than served from the cache."""
    out = []
    for name in names:
        try:
            st = (folder / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _video_store(feature_dir: str, signature: tuple) -> VideoFeatures:
    """One opened :class:`VideoFeatures` per feature folder (and file signature), shared by the splits."""
    return VideoFeatures(feature_dir)


@functools.lru_cache(maxsize=4)
def _query_store(path: str, q_dim: int, signature: tuple) -> QueryFeatures:
    """One opened :class:`QueryFeatures` per hdf5 file, query width (and file signature)."""
    return QueryFeatures(path, q_dim)


def _video_block(ds: PRVRDataset, rows: np.ndarray, batch_size: int) -> Batch:
    """Video arrays of a batch whose first ``len(rows)`` rows are the videos ``rows``, the rest padding."""
    if len(rows) > batch_size:
        raise AssertionError(f"{len(rows)} videos do not fit a batch of {batch_size}")
    dv, ctx = ds.visual_dim, ds.max_ctx_l
    out = dict(
        clip_feats=np.zeros((batch_size, ds.map_size, dv), np.float32),
        frame_feats=np.zeros((batch_size, ctx, dv), np.float32),
        frame_mask=np.zeros((batch_size, ctx), np.float32),
        frame_len=np.zeros((batch_size,), np.int32),
        video_valid=np.zeros((batch_size,), np.float32),
        video_index=np.full((batch_size,), -1, np.int32),
    )
    for b, v in enumerate(rows):
        clip, frames = ds.video_item(int(v))
        n = frames.shape[0]
        out["clip_feats"][b] = clip
        out["frame_feats"][b, :n] = frames
        out["frame_mask"][b, :n] = 1.0
        out["frame_len"][b] = n
        out["video_valid"][b] = 1.0
        out["video_index"][b] = v
    return out


def _query_block(ds: PRVRDataset, queries: np.ndarray, capacity: int) -> Batch:
    """Query arrays of a batch whose first ``len(queries)`` rows are the queries ``queries``, the rest padding."""
    if len(queries) > capacity:
        raise AssertionError(f"{len(queries)} queries exceed the static query capacity {capacity}")
    out = dict(
        query_feats=np.zeros((capacity, ds.max_desc_l, ds.query_dim), np.float32),
        query_mask=np.zeros((capacity, ds.max_desc_l), np.float32),
        query_valid=np.zeros((capacity,), np.float32),
        query_index=np.full((capacity,), -1, np.int32),
    )
    for r, j in enumerate(queries):
        tokens = ds.query_item(int(j))
        out["query_feats"][r, : len(tokens)] = tokens
        out["query_mask"][r, : len(tokens)] = 1.0
        out["query_valid"][r] = 1.0
        out["query_index"][r] = j
    return out


def train_batches(ds: PRVRDataset, batch_size: int, epoch: int, seed: int, query_capacity: int,
                  skip: int = 0, *, slice_size: int | None = None, slices: Sequence[int] = (0,),
                  workers: int = 1) -> Iterator[Batch]:
    """One epoch of training batches, ``ceil(Nv / batch_size)`` of them, all of the same shapes.

    The video order is a permutation drawn from ``np.random.default_rng([seed, epoch])`` (the official
    DataLoader shuffles with ``drop_last=False``). Within a batch the videos are sorted by frame count,
    descending and stable (``collate_train``: ``data.sort(key=lambda x: len(x[1]), reverse=True)``,
    ms-sl ``data_provider.py:78-79``); padded videos come last. Each video brings all its queries, in
    caption order, contiguous and in video order (``data_provider.py:101-104``); ``query_labels`` is the
    batch row of each query's video. ``skip`` leaves out the first batches of the epoch without reading
    their features (a resumed run starts where it stopped; the order does not change).

    Keys and shapes (B = batch_size, Q = query_capacity, L = max_ctx_l, M = map_size, T = max_desc_l):
    ``clip_feats (B,M,Dv)``, ``frame_feats (B,L,Dv)``, ``frame_mask (B,L)``, ``frame_len (B,)``,
    ``video_valid (B,)``, ``video_index (B,)`` (-1 = pad), ``query_feats (Q,T,Dq)``, ``query_mask (Q,T)``,
    ``query_valid (Q,)``, ``query_labels (Q,)`` (0 for pads), ``query_index (Q,)`` (-1 = pad).

    Sliced layout (multi-host, see :mod:`jaxprvr.distributed`): with ``slice_size``, the sorted videos of a
    batch are cut into consecutive slices of ``slice_size`` video slots (slice ``s``: sorted rows
    ``s*slice_size ...``, padded; slices past the batch's videos are all padding), each with its videos'
    queries in its own block of ``query_capacity`` slots (the capacity is per slice). The global batch is
    the concatenation of all slices (``ceil(batch_size / slice_size)`` or more); what is yielded is the
    concatenation of the slices ``slices`` only (a process's rows), so only their features are read.
    ``query_labels`` are rows of the global batch (``s*slice_size + row in slice``); the extra scalars
    ``n_videos`` and ``n_queries`` count the valid videos and queries of the whole global batch.

    ``workers > 1`` builds up to that many batches at once on a thread pool (reading memory-mapped frames
    and normalising them is numpy work that releases the GIL); batches still come in order and are
    identical to ``workers=1``'s.
    """
    order = np.random.default_rng([seed, epoch]).permutation(ds.num_videos)

    def build(rows: np.ndarray) -> Batch:
        if slice_size is not None:
            return _sliced_batch(ds, rows, slice_size, slices, query_capacity)
        queries = np.concatenate([ds.video_query_index[v] for v in rows])
        labels = np.repeat(np.arange(len(rows), dtype=np.int32), ds.query_counts[rows])
        batch = _video_block(ds, rows, batch_size)
        batch.update(_query_block(ds, queries, query_capacity))
        batch["query_labels"] = np.zeros((query_capacity,), np.int32)
        batch["query_labels"][: len(labels)] = labels
        return batch

    def plans() -> Iterator[np.ndarray]:
        for start in range(skip * batch_size, ds.num_videos, batch_size):
            chunk = order[start:start + batch_size]
            yield chunk[np.argsort(-ds.frame_lengths[chunk], kind="stable")]

    yield from ordered_map(build, plans(), workers)


def _sliced_batch(ds: PRVRDataset, rows: np.ndarray, slice_size: int, slices: Sequence[int],
                  query_capacity: int) -> Batch:
    """The slices ``slices`` of one sorted batch ``rows`` (see :func:`train_batches`), concatenated."""
    parts = []
    for s in slices:
        mine = rows[s * slice_size:(s + 1) * slice_size]
        queries = (np.concatenate([ds.video_query_index[v] for v in mine]) if len(mine)
                   else np.zeros((0,), np.int64))
        labels = s * slice_size + np.repeat(np.arange(len(mine), dtype=np.int32), ds.query_counts[mine])
        part = _video_block(ds, mine, slice_size)
        part.update(_query_block(ds, queries, query_capacity))
        part["query_labels"] = np.zeros((query_capacity,), np.int32)
        part["query_labels"][: len(labels)] = labels
        parts.append(part)
    batch = {k: np.concatenate([p[k] for p in parts], 0) for k in parts[0]}
    batch["n_videos"] = np.int64(len(rows))
    batch["n_queries"] = np.int64(ds.query_counts[rows].sum())
    return batch


def video_batches(ds: PRVRDataset, batch_size: int) -> Iterator[Batch]:
    """The gallery in ``video_ids`` order (unshuffled, unsorted), padded to ``batch_size`` videos.

    Keys: ``clip_feats, frame_feats, frame_mask, frame_len, video_valid, video_index`` (as in
    :func:`train_batches`).
    """
    for start in range(0, ds.num_videos, batch_size):
        yield _video_block(ds, np.arange(start, min(start + batch_size, ds.num_videos)), batch_size)


def query_batches(ds: PRVRDataset, batch_size: int) -> Iterator[Batch]:
    """The queries in caption-file order, padded to ``batch_size``. Unlike the official ``collate_text_val``,
    a batch is not sorted by length: rows stay in ``cap_ids`` order (``query_index``).

    Keys: ``query_feats (B,T,Dq), query_mask (B,T), query_valid (B,), query_index (B,)``.
    """
    for start in range(0, ds.num_queries, batch_size):
        yield _query_block(ds, np.arange(start, min(start + batch_size, ds.num_queries)), batch_size)


__all__ = ["PRVRDataset", "open_splits", "train_batches", "video_batches", "query_batches", "Batch"]
