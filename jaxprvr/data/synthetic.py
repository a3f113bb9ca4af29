"""Synthetic PRVR datasets written in the MS-SL release layout, with a planted partial-relevance signal.

The files are exactly what :mod:`jaxprvr.data.msl_format` reads from a real release (caption files, a
RoBERTa-style hdf5 of token features, a BigFile of frame features), so everything downstream runs unchanged.

The planted signal. Each video is a sequence of 1-4 segments; segment ``s`` has a latent vector
``z_s = c_s + 0.8 r_s`` (``c_s`` one of 48 shared "concepts", so different videos share content, and ``r_s``
its own random part). Frames are ``(z_seg(t) + 0.3 e_t) @ P_v + 0.8 n_t``. Each query describes a random span
of one or two consecutive segments: its tokens are ``(mean_span(z) + 0.5 e_k) @ P_q + 0.8 n_k``. ``P_v`` and
``P_q`` are two independent fixed random projections, so raw query and video features are unrelated (nearest
neighbour on them is at chance), while a learned cross-modal map retrieves the right video; a query matches
only part of its video (partial relevance), and the shared concepts make videos with the same content hard
negatives.

    python -m jaxprvr.data.synthetic --dataset tvr --out /tmp/syn --train-videos 600

:func:`demo_root` creates (once, atomically) and returns a cached demo dataset for the quickstart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from jaxprvr.config import DATASETS as _TASK_DATASETS

DATASETS = _TASK_DATASETS["prvr"]  # the MS-SL release facts of tvr / act / cha
from jaxprvr.data.msl_format import SPLITS
from jaxprvr.cli import run_cli
from jaxprvr.errors import JaxprvrError

LATENT_DIM = 16
N_CONCEPTS = 48
MAX_SEGMENTS = 4
RESIDUAL_SCALE = 0.8  # weight of a segment's own random part next to its concept
FRAME_LATENT_NOISE = 0.3
TOKEN_LATENT_NOISE = 0.5
FEATURE_NOISE = 0.8  # per-dimension noise added after projection, both modalities
MAX_FRAMES = 300
MAX_TOKENS = 45

DEMO_VERSION = 1
DEMO_SIZES = {"tvr": (600, 300, 300), "act": (600, 300, 300), "cha": (600, 300, 300)}
MARKER = "jaxprvr_synthetic.json"  # in <collection>/, written last: what was generated

_WORDS = ("a person walks into the room and opens door while another man sits on couch holding cup then "
          "she turns around talks to her friend who laughs at something on screen he picks up phone").split()


@dataclass(frozen=True)
class _Profile:
    """Per-dataset statistics imitating the real splits (queries per video from the split sizes in ms-sl
    ``dataset/readme.md:15-33``; listed in docs/data.md, "Synthetic data")."""

    frames_median: float  # log-normal frame counts
    queries: tuple[int, int, float]  # 1 + Binomial(n, p) queries per video, as (low, n, p)


_PROFILES = {
    "tvr": _Profile(frames_median=24.0, queries=(5, 0, 0.0)),  # 5 queries per video
    "act": _Profile(frames_median=40.0, queries=(1, 7, 0.385)),  # 1-8, mean ~3.7
    "cha": _Profile(frames_median=16.0, queries=(1, 3, 0.4)),  # 1-4, mean ~2.2
}


def _caption_text(start: int, n_tokens: int) -> str:
    """Some words for the caption line (the official code never uses the text)."""
    return " ".join(_WORDS[(start + w) % len(_WORDS)] for w in range(max(1, n_tokens - 2)))


class _Generator:
    """The fixed parts of one synthetic dataset (projections, concepts) and the per-video sampler."""

    def __init__(self, seed: int, visual_dim: int, query_dim: int, profile: _Profile):
        rng = np.random.default_rng([seed, 0])
        self.proj_v = (rng.standard_normal((LATENT_DIM, visual_dim)) / np.sqrt(LATENT_DIM)).astype(np.float32)
        self.proj_q = (rng.standard_normal((LATENT_DIM, query_dim)) / np.sqrt(LATENT_DIM)).astype(np.float32)
        self.concepts = rng.standard_normal((N_CONCEPTS, LATENT_DIM))
        self.profile = profile

    def sizes(self, rng: np.random.Generator, n_videos: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame counts and query counts of a split; a few positions are forced to the edge cases
        (1 frame, fewer than ``map_size`` frames, more than ``max_ctx_l`` frames)."""
        frames = np.rint(self.profile.frames_median * np.exp(0.7 * rng.standard_normal(n_videos)))
        frames = np.clip(frames, 1, MAX_FRAMES).astype(np.int64)
        forced = [1, int(rng.integers(2, 32)), int(rng.integers(129, MAX_FRAMES + 1))]
        positions = rng.permutation(n_videos)[: len(forced)]
        frames[positions] = forced[: len(positions)]
        low, n, p = self.profile.queries
        queries = low + rng.binomial(n, p, size=n_videos)
        return frames, queries

    def video(self, rng: np.random.Generator, n_frames: int, n_queries: int, force_tokens: int | None):
        """One video's frames ``(n_frames, Dv)`` and its queries' tokens ``[(T_k, Dq)]`` (float32)."""
        n_seg = min(n_frames, int(rng.integers(1, MAX_SEGMENTS + 1)))
        cuts = np.sort(rng.choice(np.arange(1, n_frames), n_seg - 1, replace=False)) if n_seg > 1 else []
        segment_of_frame = np.searchsorted(cuts, np.arange(n_frames), side="right")
        latents = (self.concepts[rng.integers(N_CONCEPTS, size=n_seg)]
                   + RESIDUAL_SCALE * rng.standard_normal((n_seg, LATENT_DIM)))
        frame_latents = latents[segment_of_frame] + FRAME_LATENT_NOISE * rng.standard_normal((n_frames, LATENT_DIM))
        frames = self._project(frame_latents, self.proj_v, rng)

        queries = []
        for k in range(n_queries):
            span = int(rng.integers(1, min(n_seg, 2) + 1))
            first = int(rng.integers(0, n_seg - span + 1))
            target = latents[first:first + span].mean(axis=0)
            n_tokens = int(np.clip(np.rint(14.0 * np.exp(0.45 * rng.standard_normal())), 2, MAX_TOKENS))
            if k == 0 and force_tokens is not None:
                n_tokens = force_tokens
            token_latents = target + TOKEN_LATENT_NOISE * rng.standard_normal((n_tokens, LATENT_DIM))
            queries.append(self._project(token_latents, self.proj_q, rng))
        return frames, queries

    @staticmethod
    def _project(latents: np.ndarray, proj: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``latents @ proj + FEATURE_NOISE * noise`` in float32. einsum rather than ``@``: these products are
        tiny, and a multi-threaded BLAS call per video is slower than the plain loop on a busy machine."""
        out = rng.standard_normal((latents.shape[0], proj.shape[1]), dtype=np.float32)
        out *= np.float32(FEATURE_NOISE)
        out += np.einsum("nk,kd->nd", latents.astype(np.float32), proj)
        return out


def write_synthetic(out_root: str | os.PathLike, dataset: str = "tvr", n_train: int = 600, n_val: int = 300,
                    n_test: int = 300, seed: int = 0, visual_dim: int | None = None, query_dim: int | None = None,
                    progress: bool | None = None) -> Path:
    """Writes a synthetic ``dataset`` (tvr/act/cha) under ``out_root`` in the MS-SL release layout.

    Dims default to the official ones (TVR 3072/768, act and cha 1024/1024). Video ids are
    ``syn_<split>_<i>``, cap ids ``<video_id>#enc#<k>``, frame ids ``<video_id>_<t>``; the splits have disjoint
    videos, and one frame store holds them all, as in the real release. Every split with enough videos has a
    1-frame video, one shorter than 32 frames and one longer than 128; one query of 1 token and one longer
    than 30 tokens. Video ``i`` of a split depends only on ``(seed, split, i)``. ``progress`` (default: for
    200 videos or more) shows a tqdm bar. Returns ``out_root`` (the ``--data-root``).
    """
    if dataset not in DATASETS:
        raise JaxprvrError("--dataset", f"one of {sorted(DATASETS)}", repr(dataset))
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if n < 1:
            raise JaxprvrError(f"--{split}-videos", "at least 1 video per split", str(n))
    facts = DATASETS[dataset]
    visual_dim = visual_dim or facts["visual_feat_dim"]
    query_dim = query_dim or facts["q_feat_size"]
    out_root = Path(out_root).expanduser()
    collection_dir = out_root / facts["collection"]
    if collection_dir.exists():
        raise JaxprvrError(collection_dir, "a folder that does not exist yet", "an existing folder",
                           hint="choose another --out or delete it")
    text_dir = collection_dir / "TextData"
    feature_dir = collection_dir / "FeatureData" / facts["visual_feature"]
    text_dir.mkdir(parents=True)
    feature_dir.mkdir(parents=True)

    gen = _Generator(seed, visual_dim, query_dim, _PROFILES[dataset])
    total = sum(counts.values())
    frame_ids: list[str] = []
    video2frames: dict[str, list[str]] = {}
    n_queries = {}
    bar = tqdm(total=total, unit="video", desc=f"synthetic {dataset}",
               disable=not (total >= 200 if progress is None else progress))
    with open(feature_dir / "feature.bin", "wb") as binary, \
            h5py.File(text_dir / f"roberta_{facts['collection']}_query_feat.hdf5", "w") as h5:
        for code, split in enumerate(SPLITS, start=1):
            split_rng = np.random.default_rng([seed, code])
            frames_per_video, queries_per_video = gen.sizes(split_rng, counts[split])
            token_edge_cases = dict(zip(split_rng.permutation(counts[split])[:2].tolist(), (1, 31 + code)))
            lines = []
            for i in range(counts[split]):
                video_id = f"syn_{split}_{i:05d}"
                frames, queries = gen.video(np.random.default_rng([seed, code, i]), int(frames_per_video[i]),
                                            int(queries_per_video[i]), token_edge_cases.get(i))
                binary.write(frames.astype("<f4").tobytes())
                ids = [f"{video_id}_{t}" for t in range(len(frames))]
                frame_ids.extend(ids)
                video2frames[video_id] = ids
                for k, tokens in enumerate(queries):
                    cap_id = f"{video_id}#enc#{k}"
                    h5.create_dataset(cap_id, data=tokens)
                    lines.append(f"{cap_id} {_caption_text(i + k, len(tokens))}\n")
                bar.update()
            (text_dir / f"{facts['collection']}{split}.caption.txt").write_text("".join(lines), encoding="utf-8")
            n_queries[split] = len(lines)
    bar.close()
    (feature_dir / "id.txt").write_text(" ".join(frame_ids), encoding="ISO-8859-1")
    (feature_dir / "shape.txt").write_text(f"{len(frame_ids)} {visual_dim}\n", encoding="utf-8")
    (feature_dir / "video2frames.txt").write_text(repr(video2frames), encoding="utf-8")
    summary = dict(dataset=dataset, collection=facts["collection"], seed=seed,
                   videos=counts, queries=n_queries, frames=len(frame_ids), visual_dim=visual_dim,
                   query_dim=query_dim)
    (collection_dir / MARKER).write_text(json.dumps(summary) + "\n", encoding="utf-8")  # written last
    return out_root


def _cache_base(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("JAXPRVR_CACHE", "~/.cache/jaxprvr")).expanduser() / "demo"


def demo_root(dataset: str = "tvr", cache_dir: str | os.PathLike | None = None) -> Path:
    """A demo dataset (``DEMO_SIZES``, official dims), created on first use; returns its ``--data-root``.

    It lives in ``<cache_dir>/<dataset>-v1``, ``cache_dir`` defaulting to ``$JAXPRVR_CACHE/demo`` or
    ``~/.cache/jaxprvr/demo``. It is written to a temporary folder next to it and renamed into place, so an
    interrupted or concurrent creation never leaves a half-written dataset under that name; of two
    concurrent creators one wins the rename and the other discards its copy.
    """
    if dataset not in DEMO_SIZES:
        raise JaxprvrError("demo dataset", f"one of {sorted(DEMO_SIZES)}", repr(dataset))
    final = _cache_base(cache_dir) / f"{dataset}-v{DEMO_VERSION}"
    n_train, n_val, n_test = DEMO_SIZES[dataset]
    return create_once(final, final / DATASETS[dataset]["collection"] / MARKER,
                       lambda tmp: write_synthetic(tmp, dataset, n_train, n_val, n_test, seed=0, progress=True))


def create_once(final: Path, marker: Path, write) -> Path:
    """``final``, created by ``write(tmp)`` on first use: written to a temporary folder beside it and renamed into
    place, so an interrupted or concurrent creation never leaves a half-written dataset under that name (of two
    concurrent creators one wins the rename and the other discards its copy); ``marker`` (written last by
    ``write``) proves a folder complete."""
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would become the dataset's mode
        try:
            write(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not marker.is_file():  # not a concurrent creator's finished copy
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not marker.is_file():
        raise JaxprvrError(final, f"a complete demo dataset (with {marker.name})", "a folder without it",
                           hint="delete the folder to have it recreated")
    return final


def main(argv=None) -> int:
    # Moment-retrieval datasets (activitynet, tacos, charades) have their own writer and options.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset")
    pre.add_argument("--model")
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    from jaxprvr.data import synthetic_mesm, synthetic_vmr

    # MESM's layout (the official working directory of lntzm/MESM): --model mesm, or a dataset only MESM reads
    if known.model == "mesm" or (known.dataset in synthetic_mesm.DATASETS and known.dataset not in synthetic_vmr.DATASETS):
        return synthetic_mesm.main(argv)
    if known.dataset in synthetic_vmr.DATASETS:
        return synthetic_vmr.main(argv)
    if known.dataset in ("msrvtt", "msvd", "lsmdc"):  # text-video retrieval: real videos, jaxprvr.data.synthetic_t2v
        from jaxprvr.data import synthetic_t2v

        return synthetic_t2v.main(argv)
    parser = argparse.ArgumentParser(prog="python -m jaxprvr.data.synthetic",
                                     description="Write a synthetic PRVR dataset in the MS-SL release layout "
                                                 "(--dataset activitynet|tacos|charades: a moment-retrieval "
                                                 "dataset in the MMN layout, jaxprvr.data.synthetic_vmr; "
                                                 "--model mesm with charades|charades_cg|charades_cd|qvhighlights|"
                                                 "tacos: MESM's layout, jaxprvr.data.synthetic_mesm; "
                                                 "--dataset msrvtt|msvd|lsmdc: text-video retrieval with real "
                                                 "videos, jaxprvr.data.synthetic_t2v).")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="tvr")
    parser.add_argument("--out", required=True, help="data root to create (it gets a <collection>/ folder)")
    parser.add_argument("--train-videos", type=int, default=600)
    parser.add_argument("--val-videos", type=int, default=300)
    parser.add_argument("--test-videos", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--visual-dim", type=int, default=None, help="default: the official dim of --dataset")
    parser.add_argument("--query-dim", type=int, default=None, help="default: the official dim of --dataset")

    def run(args) -> dict:
        start = time.perf_counter()
        root = write_synthetic(args.out, args.dataset, args.train_videos, args.val_videos, args.test_videos,
                               seed=args.seed, visual_dim=args.visual_dim, query_dim=args.query_dim)
        marker = root / DATASETS[args.dataset]["collection"] / MARKER
        summary = dict(out=str(root), **json.loads(marker.read_text(encoding="utf-8")))
        summary["seconds"] = round(time.perf_counter() - start, 2)
        return summary

    return run_cli(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
