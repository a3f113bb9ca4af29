"""Synthetic moment-retrieval datasets in the exact MMN / MRNet layout, with a planted localisation signal.

The files are what :class:`jaxprvr.data.mmn_format.MMNDataset` reads from a real release, at the catalog paths of
``load_config(<dataset>)`` re-rooted under ``--out`` (docs/data.md, "MRNet"):

* annotations ``<ann_dir>/{split}_audio_new.json`` with ``duration`` (seconds; TACoS: ``num_frames`` + ``fps``
  and timestamps in frames, keys like ``s100-d21.avi``), ``timestamps``, ``sentences``, ``audios``; Charades has no
  val split;
* video features at the official widths: ActivityNet one ``<vid>.h5['feature']`` (T, 500) per video, TACoS one
  hdf5 of (T, 500) datasets keyed by video, Charades ``<vid>.npy`` (T, 1, 1, 1024);
* query features ``<query_feat_dir>/<audio stem>.pt``, (1, 768) float32 (every 7th one (1, 1, 768), as the AST
  extractor saves them), written by :func:`jaxprvr.data.torch_pt.write_pt_tensor` (``torch.load`` reads them).

Like the real files, the queries of a video are not sorted by start in the JSON, raw clip counts T spread
around ``num_pre_clips`` (every split has one video below and one above it), some ends lie past the duration
(clamped by the loader), and ``--ties`` adds queries that share a segment (tied starts, as in every TACoS video).

The planted signal. Each video has 1-4 non-overlapping segments (2-5 for TACoS), each with its own prototype
``z ~ N(0, I_16)``, and a background prototype. A raw clip whose centre lies inside a segment carries
``(z + 0.3 e) @ P_v + 0.5 n`` (background clips the same with the background prototype); a query of that
segment is ``(z + 0.3 e) @ P_q + 0.5 n``, its GT the segment's span. ``P_v`` (16 x Dv) and ``P_q`` (16 x Dq) are
fixed random projections (from the seed), so raw query and clip features are unrelated, while a learned
cross-modal map localises the query.

    python -m jaxprvr.data.synthetic --dataset activitynet --out /tmp/vmr [--train-videos 200] [--ties]

:func:`demo_root` creates (once, atomically) and returns a cached demo dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from jaxprvr.cli import run_cli
from jaxprvr.config import load_config
from jaxprvr.data.mmn_format import resolve
from jaxprvr.data.torch_pt import write_pt_tensor
from jaxprvr.errors import JaxprvrError

DATASETS = ("activitynet", "tacos", "charades")
SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
LATENT_DIM = 16
LATENT_NOISE = 0.3
FEATURE_NOISE = 0.5
MARKER = "jaxprvr_synthetic.json"  # in <ann_dir>/, written last
DEMO_VERSION = 1
# (train, val, test) videos; TACoS has the real split's video counts (75/27/25), Charades no val split.
DEMO_SIZES = {"activitynet": (200, 60, 60), "tacos": (75, 27, 25), "charades": (200, 0, 60)}

_WORDS = ("a person opens the door then walks to the table and picks up a cup while another man cuts "
          "vegetables on the board she washes her hands he turns on the stove").split()


@dataclass(frozen=True)
class _Profile:
    seconds: tuple[float, float]  # duration range (uniform)
    segments: tuple[int, int]  # segments per video (inclusive)
    fps: float | None  # TACoS: timestamps in frames


_PROFILES = {
    "activitynet": _Profile(seconds=(30.0, 200.0), segments=(1, 4), fps=None),
    "tacos": _Profile(seconds=(120.0, 360.0), segments=(2, 5), fps=29.4),
    "charades": _Profile(seconds=(15.0, 45.0), segments=(1, 4), fps=None),
}


def _video_id(dataset: str, split: str, i: int) -> str:
    code = SPLIT_CODES[split]
    if dataset == "activitynet":
        return f"v_syn{split[:2]}{i:06d}"  # v_ + 11 characters, like v_uqiMw7tQ1Cc
    if dataset == "tacos":
        return f"s{code}{i // 100:02d}-d{i % 100:02d}.avi"  # like s30-d52.avi
    return f"Y{code}{i:03d}"  # 5 characters like 3MSZA (from 1000 videos on, longer)


def _audio_name(dataset: str, vid: str, split: str, k: int) -> str:
    stem = vid[2:] if dataset == "activitynet" else vid.split(".")[0]
    return f"{stem}_{split}_{k + 1}.wav"  # like uqiMw7tQ1Cc_val_2_1.wav, s30-d52_test_1.wav, 3MSZA_test_1.wav


class _Generator:
    """The fixed projections and the per-video sampler of one synthetic dataset."""

    def __init__(self, seed: int, dataset: str, num_pre_clips: int, video_dim: int, query_dim: int):
        rng = np.random.default_rng([seed, 0])
        self.proj_v = (rng.standard_normal((LATENT_DIM, video_dim)) / np.sqrt(LATENT_DIM)).astype(np.float32)
        self.proj_q = (rng.standard_normal((LATENT_DIM, query_dim)) / np.sqrt(LATENT_DIM)).astype(np.float32)
        self.profile = _PROFILES[dataset]
        self.num_pre_clips = num_pre_clips

    def clip_counts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Raw clip counts around num_pre_clips (log-normal), one forced below and one above it."""
        base = self.num_pre_clips
        t = np.clip(np.rint(base * np.exp(0.35 * rng.standard_normal(n))), max(2, base // 4), 2 * base)
        t = t.astype(np.int64)
        forced = [int(rng.integers(max(2, base // 4), base // 2 + 1)), int(rng.integers(base + base // 4, 2 * base))]
        for pos, value in zip(rng.permutation(n)[:2], forced):
            t[pos] = value
        return t

    def video(self, rng: np.random.Generator, n_clips: int, ties: bool, past_end: bool):
        """One video: (duration or num_frames, JSON timestamps, clip features (T, Dv), query features [(Dq,)])."""
        p = self.profile
        seconds = float(rng.uniform(*p.seconds))
        if p.fps is not None:
            num_frames = int(round(seconds * p.fps))
            duration = num_frames / p.fps
        else:
            duration = round(seconds, 2)
        n_seg = int(rng.integers(p.segments[0], p.segments[1] + 1))
        lengths = rng.uniform(0.08, 0.4, n_seg)
        if lengths.sum() > 0.85:
            lengths *= 0.85 / lengths.sum()
        gaps = rng.dirichlet(np.ones(n_seg + 1)) * (1.0 - lengths.sum())
        if past_end:
            gaps[-1] = 0.0  # the last segment reaches the end; its JSON end lies past the duration
        starts = np.concatenate([[0.0], np.cumsum(lengths[:-1] + gaps[1:-1])]) + gaps[0]
        ends = starts + lengths
        spans, written = [], []  # (start, end) in seconds as the loader clamps them; the JSON values
        for k in range(n_seg):
            last = past_end and k == n_seg - 1
            if p.fps is not None:
                s_f = int(round(starts[k] * duration * p.fps))
                e_f = int(round(ends[k] * duration * p.fps))
                if last:
                    e_f = num_frames + int(rng.integers(10, 150))
                written.append([s_f, e_f])
                spans.append((s_f / p.fps, min(e_f / p.fps, duration)))
            else:
                s = round(float(starts[k] * duration), 2)
                e = round(float(ends[k] * duration), 2)
                if last:
                    e = round(duration + float(rng.uniform(0.5, 5.0)), 2)
                written.append([s, e])
                spans.append((s, min(e, duration)))

        # Queries: one per segment; with ties, 1-3 more on random segments (identical timestamps).
        segment_of_query = list(range(n_seg))
        if ties:
            segment_of_query += rng.integers(0, n_seg, int(rng.integers(1, 4))).tolist()
        segment_of_query = [segment_of_query[j] for j in rng.permutation(len(segment_of_query))]

        prototypes = rng.standard_normal((n_seg + 1, LATENT_DIM))  # the last row: background
        centres = (np.arange(n_clips) + 0.5) * duration / n_clips
        owner = np.full(n_clips, n_seg)
        for k, (s, e) in enumerate(spans):
            owner[(centres >= s) & (centres <= e)] = k
        clip_latents = prototypes[owner] + LATENT_NOISE * rng.standard_normal((n_clips, LATENT_DIM))
        clips = self._project(clip_latents, self.proj_v, rng)
        query_latents = (prototypes[segment_of_query]
                         + LATENT_NOISE * rng.standard_normal((len(segment_of_query), LATENT_DIM)))
        queries = self._project(query_latents, self.proj_q, rng)
        timestamps = [list(written[k]) for k in segment_of_query]
        length = dict(num_frames=num_frames, fps=p.fps) if p.fps is not None else dict(duration=duration)
        return length, timestamps, clips, list(queries)

    @staticmethod
    def _project(latents: np.ndarray, proj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = rng.standard_normal((latents.shape[0], proj.shape[1]), dtype=np.float32)
        out *= np.float32(FEATURE_NOISE)
        out += latents.astype(np.float32) @ proj
        return out


def write_synthetic_vmr(out_root: str | os.PathLike, dataset: str = "activitynet", n_train: int | None = None,
                        n_val: int | None = None, n_test: int | None = None, seed: int = 0, ties: bool = False,
                        video_dim: int | None = None, query_dim: int | None = None,
                        num_pre_clips: int | None = None) -> Path:
    """Writes a synthetic ``dataset`` (activitynet / tacos / charades) under ``out_root``; returns ``out_root``.

    Sizes default to :data:`DEMO_SIZES`; Charades has no val split (``n_val`` must be 0 or None). Dims and
    ``num_pre_clips`` (around which the raw clip counts spread) default to the config's. Video ``i`` of a split
    depends only on ``(seed, split, i)`` (and ``ties``).
    """
    if dataset not in DATASETS:
        raise JaxprvrError("--dataset", f"one of {list(DATASETS)}", repr(dataset))
    cfg = load_config(dataset)
    defaults = dict(zip(("train", "val", "test"), DEMO_SIZES[dataset]))
    given = {"train": n_train, "val": n_val, "test": n_test}
    counts = {}
    for split, n in given.items():
        n = defaults[split] if n is None else int(n)
        if split not in cfg.data.splits:
            if n:
                raise JaxprvrError(f"--{split}-videos", f"0 ({dataset} has no {split} split)", str(n))
            continue
        if n < 1:
            raise JaxprvrError(f"--{split}-videos", "at least 1 video per split", str(n))
        counts[split] = n
    video_dim = video_dim or cfg.model.input_size
    query_dim = query_dim or cfg.model.text_dim
    num_pre_clips = num_pre_clips or cfg.model.num_pre_clips
    out_root = Path(out_root).expanduser()
    ann_dir = resolve(out_root, cfg.data.ann_dir)
    video_feat = resolve(out_root, cfg.data.video_feat)
    query_dir = resolve(out_root, cfg.data.query_feat_dir)
    for folder in (ann_dir, query_dir) + ((video_feat,) if cfg.data.video_mode != "c3d_hdf5" else ()):
        if folder.exists():
            raise JaxprvrError(folder, "a folder that does not exist yet", "an existing folder",
                               hint="choose another --out or delete it")
    if video_feat.exists():
        raise JaxprvrError(video_feat, "a file that does not exist yet", "an existing file")
    ann_dir.mkdir(parents=True)
    query_dir.mkdir(parents=True)
    if cfg.data.video_mode == "c3d_hdf5":
        video_feat.parent.mkdir(parents=True, exist_ok=True)
        store = h5py.File(video_feat, "w")
    else:
        video_feat.mkdir(parents=True)
        store = None

    gen = _Generator(seed, dataset, num_pre_clips, video_dim, query_dim)
    n_queries, n_written = {}, 0
    try:
        for split, n in counts.items():
            code = SPLIT_CODES[split]
            split_rng = np.random.default_rng([seed, code])
            clip_counts = gen.clip_counts(split_rng, n)
            past_end = split_rng.random(n) < 0.25
            past_end[split_rng.integers(n)] = True  # at least one end past the duration per split
            annos = {}
            for i in range(n):
                vid = _video_id(dataset, split, i)
                length, timestamps, clips, queries = gen.video(np.random.default_rng([seed, code, i]),
                                                               int(clip_counts[i]), ties, bool(past_end[i]))
                audios = [_audio_name(dataset, vid, split, k) for k in range(len(queries))]
                for k, (audio, q) in enumerate(zip(audios, queries)):
                    shape = (1, 1, query_dim) if (n_written + k) % 7 == 6 else (1, query_dim)
                    write_pt_tensor(query_dir / f"{audio.split('.')[0]}.pt", q.reshape(shape))
                n_written += len(queries)
                if cfg.data.video_mode == "c3d_h5":
                    with h5py.File(video_feat / f"{vid}.h5", "w") as f:
                        f.create_dataset("feature", data=clips)
                elif cfg.data.video_mode == "c3d_hdf5":
                    store.create_dataset(vid, data=clips)
                else:
                    np.save(video_feat / f"{vid}.npy", clips[:, None, None, :])
                sentences = [" ".join(_WORDS[(i + k + w) % len(_WORDS)] for w in range(6)) + "."
                             for k in range(len(queries))]
                entry = dict(length, timestamps=timestamps, sentences=sentences, audios=audios)
                if dataset != "activitynet":
                    entry.update(speaker="cmu_us_syn_arctic-wav-arctic_a0001", speaker_id=int(i))
                annos[vid] = entry
            (ann_dir / f"{split}_audio_new.json").write_text(json.dumps(annos, indent=1), encoding="utf-8")
            n_queries[split] = sum(len(a["audios"]) for a in annos.values())
    finally:
        if store is not None:
            store.close()
    summary = dict(dataset=dataset, seed=seed, ties=ties, videos=counts, queries=n_queries, video_dim=video_dim,
                   query_dim=query_dim, num_pre_clips=num_pre_clips)
    (ann_dir / MARKER).write_text(json.dumps(summary) + "\n", encoding="utf-8")  # written last
    return out_root


def _cache_base(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("JAXPRVR_CACHE", "~/.cache/jaxprvr")).expanduser() / "demo"


def demo_root(dataset: str = "activitynet", cache_dir: str | os.PathLike | None = None) -> Path:
    """A demo dataset (:data:`DEMO_SIZES`, official dims, seed 0), created on first use; returns its
    ``--data-root``: ``<cache_dir>/mrnet-<dataset>-v1`` (``cache_dir`` defaulting to ``$JAXPRVR_CACHE/demo`` or
    ``~/.cache/jaxprvr/demo``). Written to a temporary folder beside it and renamed into place, so an interrupted
    or concurrent creation never leaves a half-written dataset under that name."""
    if dataset not in DATASETS:
        raise JaxprvrError("demo dataset", f"one of {list(DATASETS)}", repr(dataset))
    from jaxprvr.data.synthetic import create_once

    final = _cache_base(cache_dir) / f"mrnet-{dataset}-v{DEMO_VERSION}"
    marker = resolve(final, load_config(dataset).data.ann_dir) / MARKER
    return create_once(final, marker, lambda tmp: write_synthetic_vmr(tmp, dataset, seed=0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxprvr.data.synthetic",
                                     description="Write a synthetic moment-retrieval dataset in the MMN/MRNet "
                                                 "layout (annotations, video features, .pt query features).")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--out", required=True, help="data root to create (the catalog paths go under it)")
    parser.add_argument("--train-videos", type=int, default=None, help="default: DEMO_SIZES of --dataset")
    parser.add_argument("--val-videos", type=int, default=None, help="default: DEMO_SIZES (charades: no val)")
    parser.add_argument("--test-videos", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ties", action="store_true", help="add queries with tied starts (shared segments)")

    def run(args) -> dict:
        start = time.perf_counter()
        root = write_synthetic_vmr(args.out, args.dataset, args.train_videos, args.val_videos, args.test_videos,
                                   seed=args.seed, ties=args.ties)
        marker = resolve(root, load_config(args.dataset).data.ann_dir) / MARKER
        summary = dict(out=str(root), **json.loads(marker.read_text(encoding="utf-8")))
        summary["seconds"] = round(time.perf_counter() - start, 2)
        return summary

    return run_cli(parser, run, argv)


__all__ = ["write_synthetic_vmr", "demo_root", "main", "DATASETS", "DEMO_SIZES"]
