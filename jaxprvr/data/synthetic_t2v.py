"""Synthetic text-video retrieval datasets (MSR-VTT, MSVD, LSMDC) with real, tiny videos and a learnable signal.

The files are exactly those :func:`jaxprvr.data.t2v.open_t2v` reads from a real release, in its default layout
under ``--out`` (docs/data.md, "Text-video retrieval"):

* **MSR-VTT**: ``MSRVTT/msrvtt_data/`` with ``MSRVTT_data.json`` (``info``, ``videos``, ``sentences`` in shuffled
  order, captions of every video, test videos included), ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv``
  (one ``video_id`` column; 7k is a subset of 9k) and ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,
  sentence``, one caption per test video, shuffled rows); H.264 ``MSRVTT/MSRVTT/videos/all/video<N>.mp4``.
* **MSVD**: ``MSVD/msvd_data/{train,val,test}_list.txt`` and ``raw-captions.pkl`` (``{id: [[token, ...], ...]}``,
  2-6 captions per video); YouTube-like ids (``-4wsuPCjDBc_5_15``); MPEG-4 part 2 (some MJPEG) ``.avi`` in
  ``MSVD/MSVD_Videos/YouTubeClips/``.
* **LSMDC**: the three tab-separated 6-field CSVs in ``LSMDC/`` (sic ``..._publictect.csv``) and MPEG-4 ``.avi``
  clips in ``LSMDC/LSMDC_Videos/<movie>/<clip_id>.avi``. Like the real files: some train and val clips have two
  sentences, the three known-bad clip ids appear (two in train, one in test; one with an empty file, which the
  reader never opens), and 2 train rows + 1 val row name clips that have no file (the reader counts them).

The videos (written with PyAV) vary like real ones, tiny: sizes 48x64 to 97x61 (odd and portrait sizes), fps 3,
5, 10, 12, 15, 24, 25 and 30000/1001, 1 frame to 13.3 s. Every split has a 1-frame video, one longer than 12 s
(13.3 s at 3 fps), one at 30000/1001 fps and one of odd portrait size 61x97.

The planted signal: each video shows one solid shape (circle, square, triangle, star) in one colour (red,
green, blue, yellow) moving in one direction (left, right, up, down) across a grey background, plain or with
static noise; each caption names the colour, the shape (or a synonym) and the direction, in paraphrases ("a red
circle moves to the left", "the red disc slides leftward across the screen"). The (shape, colour, direction)
combinations of a split are drawn without repetition until all 64 are used, so small test splits have
distinct videos. ``jaxprvr_synthetic.json`` (written last, in ``<out>/<MSRVTT|MSVD|LSMDC>/``) holds a summary
and every video's labels.

    python -m jaxprvr.data.synthetic --dataset msrvtt --out /tmp/t2v [--train-videos 60] [--test-videos 20]

:func:`demo_root` creates (once, atomically) and returns a cached demo dataset.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from jaxprvr.cli import run_cli
from jaxprvr.data import t2v
from jaxprvr.errors import JaxprvrError

DATASETS = t2v.DATASETS
DATASET_DIRS = {"msrvtt": "MSRVTT", "msvd": "MSVD", "lsmdc": "LSMDC"}
MARKER = "jaxprvr_synthetic.json"  # in <out>/<DATASET_DIRS[dataset]>/, written last
DEMO_VERSION = 2
# (train, val, test) videos with files; MSR-VTT has no separate val split (val = test = the JSFusion CSV).
DEMO_SIZES = {"msrvtt": (60, 0, 20), "msvd": (80, 12, 20), "lsmdc": (240, 12, 20)}  # ~250 train pairs each
_DATASET_CODES = {"msrvtt": 11, "msvd": 12, "lsmdc": 13}
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (210, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (220, 200, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = ("plain", "noisy")
FPS_CHOICES = (Fraction(3), Fraction(5), Fraction(10), Fraction(12), Fraction(15), Fraction(24), Fraction(25),
               Fraction(30000, 1001))
SIZES = ((64, 48), (96, 60), (97, 61), (80, 60), (72, 56), (65, 49), (48, 64), (61, 97), (88, 50))
LONG_SECONDS = 13.3  # one video per split longer than 12 s (the 12-frame cap at 1 frame/s)
SHAPE_RADIUS = 0.22  # of min(width, height): the size of every shape

_SYNONYMS = {"circle": ("circle", "disc", "round shape", "ball"), "square": ("square", "box", "block", "square"),
             "triangle": ("triangle", "triangular shape", "triangle", "wedge"),
             "star": ("star", "star shape", "five-pointed star", "star")}
_TO = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
_WARD = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}
_TEMPLATES = (
    "a {c} {s} moves {to}",
    "a {c} {s} is moving {ward}",
    "the {c} {syn} slides {ward} across the screen",
    "a {syn} in {c} travels {to}",
    "{c} {s} drifting {to} on a {bg} background",
    "someone shows a {c} {syn} that moves {to}",
    "a small {c} {s} glides {ward}",
    "there is a {c} {syn} going {to}",
)
_LSMDC_TEMPLATES = (
    "SOMEONE watches a {c} {s} move {to}.",
    "A {c} {syn} slides {ward}.",
    "On the screen, a {c} {s} drifts {to}.",
    "SOMEONE's {c} {syn} glides {ward} across the frame.",
)


# --------------------------------------------------------------------------------------------- videos

@dataclass(frozen=True)
class VideoSpec:
    """What one synthetic video shows and how it is encoded."""

    video_id: str
    split: str
    shape: str
    colour: str
    direction: str
    background: str
    width: int
    height: int
    fps: Fraction
    n_frames: int
    codec: str
    seed: tuple

    def labels(self) -> dict:
        d = asdict(self)
        d["fps"] = f"{self.fps.numerator}/{self.fps.denominator}"
        d["seed"] = list(self.seed)
        return d


def _polygon_mask(px, py, verts) -> np.ndarray:
    """Even-odd point-in-polygon for pixel centres ``(px, py)`` and vertices ``verts`` ``[(x, y), ...]``."""
    inside = np.zeros(px.shape, bool)
    n = len(verts)
    for k in range(n):
        x1, y1 = verts[k]
        x2, y2 = verts[(k + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < xint)
    return inside


def _inside(shape: str, px, py, cx: float, cy: float, r: float) -> np.ndarray:
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= r * r
    if shape == "square":
        return np.maximum(np.abs(px - cx), np.abs(py - cy)) <= 0.75 * r
    if shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return _polygon_mask(px, py, [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles])
    if shape == "star":
        verts = []
        for k in range(10):
            a = np.deg2rad(-90.0 + 36.0 * k)
            rr = r if k % 2 == 0 else 0.4 * r
            verts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return _polygon_mask(px, py, verts)
    raise JaxprvrError("shape", f"one of {SHAPES}", repr(shape))


def shape_mask(shape: str, width: int, height: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean ``[height, width]``: the pixels whose centres lie in ``shape`` of size ``r`` centred on (cx, cy)
    (every shape lies within ``r`` of its centre, which is also its area centroid)."""
    out = np.zeros((height, width), bool)
    x0, x1 = max(0, int(np.floor(cx - r - 1))), min(width, int(np.ceil(cx + r + 1)))
    y0, y1 = max(0, int(np.floor(cy - r - 1))), min(height, int(np.ceil(cy + r + 1)))
    if shape not in SHAPES:
        raise JaxprvrError("shape", f"one of {SHAPES}", repr(shape))
    if x0 < x1 and y0 < y1:
        py, px = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        out[y0:y1, x0:x1] = _inside(shape, px, py, cx, cy, r)
    return out


def shape_centres(spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    """``[n_frames, 2]`` (x, y): the shape moves along its direction across half the frame (1 frame: the middle)."""
    w, h = spec.width, spec.height
    dx, dy = DIRECTIONS[spec.direction]
    amp = 0.28 * (w if dx else h)
    perp = rng.uniform(-0.1, 0.1) * (h if dx else w)
    t = np.linspace(-1.0, 1.0, spec.n_frames) if spec.n_frames > 1 else np.zeros(1)
    x = w / 2 + dx * amp * t + (0 if dx else perp)
    y = h / 2 + dy * amp * t + (perp if dx else 0)
    return np.stack([x, y], axis=1)


def render_frames(spec: VideoSpec) -> np.ndarray:
    """The video's frames, uint8 ``[n_frames, height, width, 3]`` RGB."""
    rng = np.random.default_rng(list(spec.seed))
    w, h = spec.width, spec.height
    grey = rng.integers(60, 181)
    tint = rng.integers(-6, 7, size=3)
    base = np.clip(grey + tint, 0, 255).astype(np.float32)
    centres = shape_centres(spec, rng)
    r = SHAPE_RADIUS * min(w, h)
    colour = np.array(COLOURS[spec.colour], np.uint8)
    if spec.background == "noisy":  # static: luminance noise with a little chroma, cycling through 5 fields
        k = min(spec.n_frames, 5)
        lum = rng.standard_normal(size=(k, h, w, 1), dtype=np.float32) * 20.0
        chroma = rng.standard_normal(size=(k, h, w, 3), dtype=np.float32) * 4.0
        backgrounds = np.clip(base + lum + chroma, 0, 255).astype(np.uint8)
    else:
        backgrounds = np.broadcast_to(base.astype(np.uint8), (1, h, w, 3))
    frames = np.empty((spec.n_frames, h, w, 3), np.uint8)
    for i, (cx, cy) in enumerate(centres):
        frames[i] = backgrounds[i % len(backgrounds)]
        frames[i][shape_mask(spec.shape, w, h, cx, cy, r)] = colour
    return frames


def encode_video(path: Path, frames: np.ndarray, fps: Fraction, codec: str) -> Path:
    """Write ``frames`` (uint8 ``[n, h, w, 3]``) with PyAV: ``libx264`` (yuv420p; yuv444p for odd sizes),
    ``mpeg4`` (yuv420p) or ``mjpeg`` (yuvj420p), one packet per frame, pts 0..n-1 in units of 1/fps."""
    import av

    n, h, w, _ = frames.shape
    if codec == "libx264":
        options = {"crf": "16", "preset": "superfast", "threads": "1"}
        pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"  # libx264's 4:2:0 needs even sizes
    elif codec == "mpeg4":
        options, pix_fmt = {"threads": "1"}, "yuv420p"
    elif codec == "mjpeg":
        options, pix_fmt = {"threads": "1"}, "yuvj420p"
    else:
        raise JaxprvrError("codec", "libx264, mpeg4 or mjpeg", repr(codec))
    path.parent.mkdir(parents=True, exist_ok=True)
    time_base = 1 / Fraction(fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec != "libx264":
            stream.bit_rate = 2_000_000
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts, frame.time_base = i, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --------------------------------------------------------------------------------------------- specs, captions

def _combos(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """``n`` (shape, colour, direction) triples: all 64 in a random order, then again in another, ..."""
    every = [(s, c, d) for s in SHAPES for c in COLOURS for d in DIRECTIONS]
    out = []
    while len(out) < n:
        out.extend(every[k] for k in rng.permutation(len(every)))
    return out[:n]


def make_specs(dataset: str, split: str, ids: list[str], seed: int, codec_of) -> list[VideoSpec]:
    """The videos of one split. Videos 0-3 are the special cases: 1 frame; > 12 s at 3 fps; 30000/1001 fps;
    odd portrait 61x97. ``codec_of(i)`` picks each video's codec."""
    rng = np.random.default_rng([seed, _DATASET_CODES[dataset], _SPLIT_CODES[split]])
    combos = _combos(rng, len(ids))
    specs = []
    for i, vid in enumerate(ids):
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        fps = FPS_CHOICES[int(rng.integers(len(FPS_CHOICES)))]
        n = int(round(float(rng.uniform(1.4, 4.0)) * float(fps)))  # >= 2 frames at 1 frame/s
        if i == 0:
            n = 1
        elif i == 1:
            fps, n = Fraction(3), int(np.ceil(LONG_SECONDS * 3))
        elif i == 2:
            fps, n = Fraction(30000, 1001), 45
        elif i == 3:
            w, h = 61, 97
        shape, colour, direction = combos[i]
        background = BACKGROUNDS[int(rng.integers(2))]
        specs.append(VideoSpec(vid, split, shape, colour, direction, background, w, h, fps, n, codec_of(i),
                               (seed, _DATASET_CODES[dataset], _SPLIT_CODES[split], i)))
    return specs


def captions(spec: VideoSpec, k: int, rng: np.random.Generator, lsmdc: bool = False) -> list[str]:
    """``k`` distinct paraphrases naming the colour, the shape (or a synonym) and the direction."""
    templates = _LSMDC_TEMPLATES if lsmdc else _TEMPLATES
    order = rng.permutation(len(templates))
    out = []
    for j in range(k):
        syn = _SYNONYMS[spec.shape][int(rng.integers(len(_SYNONYMS[spec.shape])))]
        out.append(templates[order[j % len(templates)]].format(
            c=spec.colour, s=spec.shape, syn=syn, to=_TO[spec.direction], ward=_WARD[spec.direction],
            bg="plain grey" if spec.background == "plain" else "noisy"))
    return out


def _write_videos(specs: list[VideoSpec], path_of) -> None:
    for spec in specs:
        encode_video(path_of(spec), render_frames(spec), spec.fps, spec.codec)


def _timestamp(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}.{ms // 60_000 % 60:02d}.{ms // 1000 % 60:02d}.{ms % 1000:03d}"


# --------------------------------------------------------------------------------------------- writers

def _write_msrvtt(ds_dir: Path, sizes: dict, seed: int) -> dict:
    anno = ds_dir / "msrvtt_data"
    videos = ds_dir / "MSRVTT" / "videos" / "all"
    anno.mkdir(parents=True, exist_ok=True)
    n_train, n_test = sizes["train"], sizes["test"]
    train_ids = [f"video{i}" for i in range(n_train)]
    test_ids = [f"video{n_train + i}" for i in range(n_test)]
    specs = {"train": make_specs("msrvtt", "train", train_ids, seed, lambda i: "libx264"),
             "test": make_specs("msrvtt", "test", test_ids, seed, lambda i: "libx264")}
    rng = np.random.default_rng([seed, _DATASET_CODES["msrvtt"], 0])
    n_7k = int(round(n_train * 7 / 9))
    sentences, video_entries, test_rows = [], [], []
    for split, split_specs in specs.items():
        for i, spec in enumerate(split_specs):
            k = int(rng.integers(3, 7)) if split == "train" else int(rng.integers(2, 5))
            caps = captions(spec, k, rng)
            sentences.extend({"caption": c, "video_id": spec.video_id} for c in caps)
            official_split = "test" if split == "test" else ("train" if i < n_7k else "validate")
            video_entries.append({"category": int(rng.integers(20)), "url": f"https://example.invalid/{spec.video_id}",
                                  "video_id": spec.video_id, "start time": 0.0,
                                  "end time": round(spec.n_frames / float(spec.fps), 2), "split": official_split,
                                  "id": int(spec.video_id[5:])})
            if split == "test":
                test_rows.append((spec.video_id, caps[0]))
    sentences = [sentences[j] for j in rng.permutation(len(sentences))]
    for j, s in enumerate(sentences):
        s["sen_id"] = j
    data = {"info": {"contributor": "jaxprvr synthetic", "data_created": "2016-04-01 12:00:00", "version": "1.0",
                     "year": "2016"}, "videos": video_entries, "sentences": sentences}
    (anno / t2v.MSRVTT_JSON).write_text(json.dumps(data), encoding="utf-8")
    for name, ids in ((t2v.MSRVTT_TRAIN_CSV["9k"], train_ids), (t2v.MSRVTT_TRAIN_CSV["7k"], train_ids[:n_7k])):
        with open(anno / name, "w", newline="", encoding="utf-8") as f:
            wr = csv.writer(f)
            wr.writerow(["video_id"])
            wr.writerows([v] for v in ids)
    with open(anno / t2v.MSRVTT_TEST_CSV, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(t2v.MSRVTT_TEST_COLUMNS)
        for row, j in enumerate(rng.permutation(len(test_rows))):
            vid, sentence = test_rows[j]
            wr.writerow([f"ret{row}", f"msr{vid[5:]}", vid, sentence])
    for split_specs in specs.values():
        _write_videos(split_specs, lambda s: videos / f"{s.video_id}.mp4")
    return {"videos": {"train": n_train, "val": n_test, "test": n_test}, "sentences": len(sentences),
            "train_7k": n_7k, "labels": {s.video_id: s.labels() for ss in specs.values() for s in ss}}


_YT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _youtube_ids(rng: np.random.Generator, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        stem = "".join(_YT_CHARS[int(j)] for j in rng.integers(len(_YT_CHARS), size=11))
        start = int(rng.integers(0, 300))
        vid = f"{stem}_{start}_{start + int(rng.integers(3, 20))}"
        if vid not in out:
            out.append(vid)
    return out


def _write_msvd(ds_dir: Path, sizes: dict, seed: int) -> dict:
    anno = ds_dir / "msvd_data"
    videos = ds_dir / "MSVD_Videos" / "YouTubeClips"
    anno.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _DATASET_CODES["msvd"], 0])
    ids = _youtube_ids(rng, sum(sizes.values()))
    specs, raw, at = {}, {}, 0
    for split in ("train", "val", "test"):
        split_ids = ids[at:at + sizes[split]]
        at += sizes[split]
        specs[split] = make_specs("msvd", split, split_ids, seed, lambda i: "mjpeg" if i % 5 == 4 else "mpeg4")
        (anno / t2v.MSVD_LISTS[split]).write_text("".join(f"{v}\n" for v in split_ids), encoding="utf-8")
        for spec in specs[split]:
            raw[spec.video_id] = [c.split(" ") for c in captions(spec, int(rng.integers(2, 7)), rng)]
    order = rng.permutation(len(raw))
    keys = list(raw)
    with open(anno / t2v.MSVD_CAPTIONS, "wb") as f:
        pickle.dump({keys[j]: raw[keys[j]] for j in order}, f, protocol=2)
    for split_specs in specs.values():
        _write_videos(split_specs, lambda s: videos / f"{s.video_id}.avi")
    return {"videos": dict(sizes), "captions": sum(len(c) for c in raw.values()),
            "labels": {s.video_id: s.labels() for ss in specs.values() for s in ss}}


def _write_lsmdc(ds_dir: Path, sizes: dict, seed: int) -> dict:
    videos = ds_dir / "LSMDC_Videos"
    ds_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _DATASET_CODES["lsmdc"], 0])
    movies = {"train": ("0001_Shape_Parade", "0002_Colour_Field", "0003_The_Moving_Star", "0004_Grey_Days"),
              "val": ("1001_Triangles_at_Dawn", "1002_Blue_Motion"),
              "test": ("3001_SQUARE_DANCE_2016", "3002_Circles_Again")}
    specs, rows, extra = {}, {}, {"missing": 0, "bad": 0}
    for split in ("train", "val", "test"):
        # Clip ids like the real ones: <movie>_<start>-<end>, consecutive clips of a movie later in time.
        pre = make_specs("lsmdc", split, [str(i) for i in range(sizes[split])], seed, lambda i: "mpeg4")
        specs[split], clock = [], {}
        for i, spec in enumerate(pre):
            movie = movies[split][i % len(movies[split])]
            start = clock.get(movie, float(rng.uniform(30, 90)))
            end = start + spec.n_frames / float(spec.fps)
            clock[movie] = end + float(rng.uniform(5, 40))
            cid = f"{movie}_{_timestamp(start)}-{_timestamp(end)}"
            specs[split].append(VideoSpec(**{**asdict(spec), "video_id": cid}))
        split_rows = []
        for i, spec in enumerate(specs[split]):
            k = 2 if (split == "train" and i % 7 == 3) or (split == "val" and i % 4 == 1) else 1
            for cap in captions(spec, k, rng, lsmdc=True):
                split_rows.append((spec.video_id, cap))
        # Rows whose clips have no file (counted by the reader) and the official known-bad ids.
        n_missing = {"train": 2, "val": 1, "test": 0}[split]
        for j in range(n_missing):
            movie = movies[split][0]
            split_rows.insert(int(rng.integers(len(split_rows) + 1)),
                              (f"{movie}_02.{10 + j:02d}.00.000-02.{10 + j:02d}.04.500",
                               "SOMEONE looks at something that was never filmed."))
        extra["missing"] += n_missing
        bad = {"train": t2v.LSMDC_BAD_CLIPS[:2], "val": (), "test": t2v.LSMDC_BAD_CLIPS[2:]}[split]
        for cid in bad:
            split_rows.insert(int(rng.integers(len(split_rows) + 1)), (cid, "SOMEONE plays the piano."))
        extra["bad"] += len(bad)
        rows[split] = split_rows
        with open(ds_dir / t2v.LSMDC_CSV[split], "w", encoding="utf-8", newline="") as f:
            for cid, sentence in split_rows:
                start, end = cid.rsplit("_", 1)[1].split("-")
                f.write("\t".join([cid, start, end, start, end, sentence]) + "\n")
    # A known-bad clip whose file exists but is empty: the reader must skip it without opening it.
    bad_file = videos / "0017_Pianist" / f"{t2v.LSMDC_BAD_CLIPS[0]}.avi"
    bad_file.parent.mkdir(parents=True, exist_ok=True)
    bad_file.write_bytes(b"")
    for split_specs in specs.values():
        _write_videos(split_specs, lambda s: videos / s.video_id.rsplit("_", 1)[0] / f"{s.video_id}.avi")
    return {"videos": dict(sizes), "rows": {k: len(v) for k, v in rows.items()},
            "rows_missing_clip": extra["missing"], "rows_known_bad": extra["bad"],
            "labels": {s.video_id: s.labels() for ss in specs.values() for s in ss}}


def write_synthetic_t2v(out_root: str | os.PathLike, dataset: str = "msrvtt", n_train: int | None = None,
                        n_val: int | None = None, n_test: int | None = None, seed: int = 0) -> Path:
    """Writes a synthetic ``dataset`` (msrvtt/msvd/lsmdc) under ``out_root`` in the default layout of
    :func:`jaxprvr.data.t2v.open_t2v`; returns ``out_root``. Sizes default to :data:`DEMO_SIZES` (videos with
    files; MSR-VTT has no val split of its own, ``n_val`` must be 0 or None)."""
    if dataset not in DATASETS:
        raise JaxprvrError("--dataset", f"one of {list(DATASETS)}", repr(dataset))
    d_train, d_val, d_test = DEMO_SIZES[dataset]
    sizes = {"train": d_train if n_train is None else n_train, "val": d_val if n_val is None else n_val,
             "test": d_test if n_test is None else n_test}
    if dataset == "msrvtt" and sizes["val"]:
        raise JaxprvrError("--val-videos", "0 for msrvtt (its val split is the JSFusion test file)",
                           str(sizes["val"]))
    minimum = {"train": 4, "val": 0 if dataset == "msrvtt" else 4, "test": 4}
    for split, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum[split]:
            raise JaxprvrError(f"--{split}-videos", f"an integer >= {minimum[split]} (the special-case videos)",
                               repr(n))
    out_root = Path(out_root)
    ds_dir = out_root / DATASET_DIRS[dataset]
    if (ds_dir / MARKER).exists():
        raise JaxprvrError(ds_dir, "a folder without a synthetic dataset (not overwritten)", f"{MARKER} there")
    start = time.perf_counter()
    writer = {"msrvtt": _write_msrvtt, "msvd": _write_msvd, "lsmdc": _write_lsmdc}[dataset]
    summary = writer(ds_dir, sizes, int(seed))
    summary = {"dataset": dataset, "seed": int(seed), **summary,
               "write_seconds": round(time.perf_counter() - start, 2)}
    (ds_dir / MARKER).write_text(json.dumps(summary) + "\n", encoding="utf-8")  # written last
    return out_root


def read_labels(root, dataset: str) -> dict:
    """The per-video labels the writer stored (``{video_id: {shape, colour, direction, ...}}``)."""
    path = Path(root) / DATASET_DIRS[dataset] / MARKER
    if not path.is_file():
        raise JaxprvrError(path, "a synthetic dataset's marker", "no such file")
    return json.loads(path.read_text(encoding="utf-8"))["labels"]


def _cache_base(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("JAXPRVR_CACHE", "~/.cache/jaxprvr")).expanduser() / "demo"


def demo_root(dataset: str = "msrvtt", cache_dir: str | os.PathLike | None = None) -> Path:
    """A demo dataset (:data:`DEMO_SIZES`, seed 0), created on first use; returns its ``--data-root``:
    ``<cache_dir>/t2v-<dataset>-v<DEMO_VERSION>`` (``cache_dir`` defaulting to ``$JAXPRVR_CACHE/demo`` or
    ``~/.cache/jaxprvr/demo``). Written to a temporary folder beside it and renamed into place, so an interrupted
    or concurrent creation never leaves a half-written dataset under that name."""
    if dataset not in DATASETS:
        raise JaxprvrError("demo dataset", f"one of {list(DATASETS)}", repr(dataset))
    from jaxprvr.data.synthetic import create_once

    final = _cache_base(cache_dir) / f"t2v-{dataset}-v{DEMO_VERSION}"
    return create_once(final, final / DATASET_DIRS[dataset] / MARKER,
                       lambda tmp: write_synthetic_t2v(tmp, dataset, seed=0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxprvr.data.synthetic",
                                     description="Write a synthetic text-video retrieval dataset (real tiny videos, "
                                                 "BackBone_tvr's annotation files) in jaxprvr.data.t2v's layout.")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--out", required=True, help="data root to create (it gets a MSRVTT/, MSVD/ or LSMDC/ folder)")
    parser.add_argument("--train-videos", type=int, default=None, help="default: DEMO_SIZES of --dataset")
    parser.add_argument("--val-videos", type=int, default=None, help="msvd/lsmdc (msrvtt: val is the test file)")
    parser.add_argument("--test-videos", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)

    def run(args) -> dict:
        root = write_synthetic_t2v(args.out, args.dataset, args.train_videos, args.val_videos, args.test_videos,
                                   seed=args.seed)
        marker = root / DATASET_DIRS[args.dataset] / MARKER
        summary = json.loads(marker.read_text(encoding="utf-8"))
        summary.pop("labels")
        return dict(out=str(root), **summary)

    return run_cli(parser, run, argv)


__all__ = ["write_synthetic_t2v", "demo_root", "read_labels", "main", "render_frames", "encode_video",
           "shape_mask", "VideoSpec", "DATASETS", "DEMO_SIZES", "SHAPES", "COLOURS", "DIRECTIONS"]
