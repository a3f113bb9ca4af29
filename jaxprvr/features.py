"""CLIP features from the command line: arrays of pixels / token ids, or the frames of a folder of videos.

    python -m jaxprvr.features clip --clip ViT-B-32.pt --inputs IN.npz --out OUT.npz [--batch-size N]
                                    [--precision fp32|bf16]
    python -m jaxprvr.features videos --clip ViT-B-32.pt --videos DIR --fps F --out clip_image.hdf5
                                      [--batch-size N] [--ext mp4,avi,...] [--on-bad-video error|skip]

``--clip``: an OpenAI CLIP file (the TorchScript archive OpenAI ships, or a ``torch.save``-d state dict; read
without torch) or a ``clip2jax`` directory (:func:`parity.clip.load_clip_weights`); the model is
:class:`jaxprvr.models.clip.CLIP` sized from the weights.

``clip``: ``IN.npz`` holds ``pixel_values`` ``[N, 3, R, R]`` float32 (already normalised with CLIP's mean/std, R the
model's resolution) and/or ``input_ids`` ``[M, L]`` int (SOT ... EOT, 0-padded after EOT, L <= the context length);
``OUT.npz`` gets ``image_embeds [N, D]``, ``image_tokens [N, G*G+1, D]`` (every token after ``ln_post`` and the
projection; token 0 = the embedding), ``text_embeds [M, D]`` (the token at ``argmax(ids)``), ``text_hidden [M, L,
W]`` (after ``ln_final``, before the projection) and ``text_tokens [M, L, D]``, all float32. Not L2-normalised.
Text outputs depend on L only through causality: the EOT embedding at L < 77 is OpenAI's at 77, up to rounding.

``videos``: one float32 ``(T, D)`` dataset per video id (the file stem) of CLIP image embeddings of the frames
sampled at ``--fps F``: ``stride = int(round(video_fps / F))`` (Python's round, half to even) over **all** frames,
frames ``0, stride, 2 stride, ...`` -- BackBone_tvr's ``_get_rawvideo_dec`` rule with ``F`` in place of
``video_framerate`` and **no** ``max_frames`` cap, so T = ceil(n_frames / stride). Frame numbers, fps and decoding
are :mod:`jaxprvr.data.video`'s (decord's semantics: frame count = video packets, fps = ``avg_frame_rate``); each
frame goes through the same Pillow preprocessing (short side to R, bicubic; centre crop; CLIP mean/std). A video
with ``stride < 1`` (fps below F / 2) or an unreadable file is a bad video. Each dataset carries the attributes
``frame_indices``, ``video_fps``, ``video_frames`` and ``source``; the file's root attribute
``jaxprvr_features`` (JSON) the settings, checked when the file is reopened.

Resumable: ids already in the file are skipped (counted); each video is written and the file flushed as soon as
all its frames are encoded, so an interrupted run keeps every finished video (a dataset left without its
``frame_indices`` attribute by a crash inside the write is rewritten). ``--on-bad-video error`` (default) stops
at the first bad video with one line naming the file (after writing the videos finished before it); ``skip``
counts it, names it in the JSON and goes on. Frames of consecutive videos are packed into fixed batches of
``--batch-size`` (the last one padded: one compilation), split over the devices of the ``data`` mesh
(:mod:`jaxprvr.sharding`) when there are several; videos are decoded and preprocessed up to two ahead on a
background thread. A video's native-size frames are held in memory while it is preprocessed.

Output: one JSON line (counts, shapes, seconds); progress bars on stderr; mistakes are one ``error: ...`` line and
exit status 2 (:mod:`jaxprvr.cli`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from jaxprvr.cli import add_compile_cache_args, enable_compile_cache, run_cli
from jaxprvr.errors import JaxprvrError

PRECISIONS = ("fp32", "bf16")
DEFAULT_BATCH = 128
DEFAULT_EXT = ("mp4", "avi", "mkv", "webm", "mov", "m4v", "mpg", "mpeg")
ON_BAD_VIDEO = ("error", "skip")
FORMAT = "jaxprvr-clip-video-features/1"
META_ATTR = "jaxprvr_features"

__all__ = ["ClipEncoder", "load_encoder", "extract_arrays", "extract_videos", "sample_indices", "list_videos",
           "build_parser", "main"]


def _bar(total, desc, progress, unit):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=not progress)


# --------------------------------------------------------------------------------------------- the encoder

class ClipEncoder:
    """Jitted CLIP towers over fixed batches: ``batch`` rows per call (a multiple of the mesh's data shards), the
    last batch zero-padded, inputs split over the ``data`` mesh, parameters replicated."""

    def __init__(self, dims, params, precision: str = "fp32", batch_size: int = DEFAULT_BATCH, mesh=None):
        import jax

        from jaxprvr import sharding as shd
        from jaxprvr.models.clip import CLIP

        if precision not in PRECISIONS:
            raise JaxprvrError("--precision", f"one of {list(PRECISIONS)}", repr(precision))
        if int(batch_size) < 1:
            raise JaxprvrError("--batch-size", "a positive batch size", repr(batch_size))
        self.dims, self.precision = dims, precision
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self.n_shards = shd.n_data_shards(self.mesh)
        self.batch = shd.round_up(int(batch_size), self.n_shards)
        self.params = shd.replicate(jax.tree.map(lambda a: np.asarray(a, np.float32), params), self.mesh)
        model = CLIP(dims, precision)
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))
        self._image_embeds = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image)["embeds"])
        self._text = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_text))

    def _run(self, fn, x: np.ndarray):
        """``fn`` on ``x`` (at most one batch of rows): padded to ``batch`` rows, sharded; float32 host arrays."""
        import jax

        from jaxprvr import sharding as shd

        n = x.shape[0]
        if n < self.batch:
            x = np.concatenate([x, np.zeros((self.batch - n,) + x.shape[1:], x.dtype)])
        out = fn(self.params, shd.shard_batch({"x": x}, self.mesh)["x"])
        return jax.tree.map(lambda a: np.asarray(shd.to_host(a), np.float32)[:n], out)

    def image_embeds(self, pixels: np.ndarray) -> np.ndarray:
        """``(n <= batch, 3, R, R)`` -> ``(n, D)``: only the class token is projected."""
        return self._run(self._image_embeds, np.asarray(pixels, np.float32))

    def _all(self, fn, x: np.ndarray, out: dict, names: dict, desc: str, unit: str, progress: bool) -> dict:
        """``fn`` over all rows of ``x`` in batches, written into the preallocated ``out`` (``names``: output key ->
        the tower's key)."""
        with _bar(len(x), desc, progress, unit) as bar:
            for s in range(0, len(x), self.batch):
                r = self._run(fn, x[s:s + self.batch])
                for k, src in names.items():
                    out[k][s:s + len(r[src])] = r[src]
                bar.update(len(r[src]))
        return out

    def images(self, pixels: np.ndarray, progress: bool = False) -> dict:
        """``{"image_embeds" (N, D), "image_tokens" (N, G*G+1, D)}`` of ``(N, 3, R, R)`` pixels."""
        d, n = self.dims, len(pixels)
        out = {"image_embeds": np.zeros((n, d.embed_dim), np.float32),
               "image_tokens": np.zeros((n, d.grid ** 2 + 1, d.embed_dim), np.float32)}
        return self._all(self._image, np.asarray(pixels, np.float32), out,
                         {"image_embeds": "embeds", "image_tokens": "tokens"}, "images", "image", progress)

    def texts(self, ids: np.ndarray, progress: bool = False) -> dict:
        """``{"text_embeds" (M, D), "text_hidden" (M, L, W), "text_tokens" (M, L, D)}`` of ``(M, L)`` ids."""
        d, (m, length) = self.dims, ids.shape
        out = {"text_embeds": np.zeros((m, d.embed_dim), np.float32),
               "text_hidden": np.zeros((m, length, d.text_width), np.float32),
               "text_tokens": np.zeros((m, length, d.embed_dim), np.float32)}
        return self._all(self._text, np.asarray(ids, np.int32), out,
                         {f"text_{k}": k for k in ("embeds", "hidden", "tokens")}, "texts", "text", progress)


def load_encoder(clip_path, precision: str = "fp32", batch_size: int = DEFAULT_BATCH, mesh=None) -> ClipEncoder:
    """:class:`ClipEncoder` of an OpenAI ``.pt`` file (TorchScript archive or state dict) or a clip2jax folder."""
    from parity.clip import load_clip_weights

    if precision not in PRECISIONS:
        raise JaxprvrError("--precision", f"one of {list(PRECISIONS)}", repr(precision))
    path = Path(clip_path)
    if not path.exists():
        raise JaxprvrError(path, "an OpenAI CLIP .pt file or a clip2jax directory", "no such file or directory")
    dims, params, _ = load_clip_weights(path)
    if "visual" not in params:
        raise JaxprvrError(path, "a CLIP with its image tower", "a text-only state dict")
    return ClipEncoder(dims, params, precision, batch_size, mesh)


# --------------------------------------------------------------------------------------------- clip: arrays

def _read_inputs(path, dims) -> dict:
    path = Path(path)
    if not path.is_file():
        raise JaxprvrError(path, "an .npz file with pixel_values and/or input_ids", "no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise JaxprvrError(path, "an .npz file (numpy.savez)", f"unreadable: {e}") from e
    out = {}
    r = dims.image_resolution
    if "pixel_values" in arrays:
        px = arrays["pixel_values"]
        if px.ndim != 4 or px.shape[1:] != (3, r, r) or not np.issubdtype(px.dtype, np.floating):
            raise JaxprvrError(f"{path}: pixel_values", f"float [N, 3, {r}, {r}] (the model's resolution)",
                               f"{px.dtype} {px.shape}")
        out["pixel_values"] = px.astype(np.float32, copy=False)
    if "input_ids" in arrays:
        ids = arrays["input_ids"]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or not 1 <= ids.shape[1] <= dims.context_length:
            raise JaxprvrError(f"{path}: input_ids", f"int [M, L] with 1 <= L <= {dims.context_length}",
                               f"{ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= dims.vocab_size):
            raise JaxprvrError(f"{path}: input_ids", f"token ids in [0, {dims.vocab_size})",
                               f"range [{ids.min()}, {ids.max()}]")
        out["input_ids"] = ids.astype(np.int32)
    if not out:
        raise JaxprvrError(path, "an array named pixel_values and/or input_ids", f"arrays {sorted(arrays)}")
    out["_ignored"] = sorted(set(arrays) - {"pixel_values", "input_ids"})
    return out


def _save_npz(path: Path, arrays: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def extract_arrays(clip_path, inputs, out, batch_size: int = DEFAULT_BATCH, precision: str = "fp32",
                   progress: bool = True, mesh=None) -> dict:
    """The ``clip`` command: ``inputs`` (.npz) -> ``out`` (.npz, written to a temporary name and renamed)."""
    t0 = time.perf_counter()
    out = Path(out)
    enc = load_encoder(clip_path, precision, batch_size, mesh)
    data = _read_inputs(inputs, enc.dims)
    result = {}
    if "pixel_values" in data:
        result.update(enc.images(data["pixel_values"], progress))
    if "input_ids" in data:
        result.update(enc.texts(data["input_ids"], progress))
    _save_npz(out, result)
    return {"command": "clip", "out": str(out), "arrays": {k: list(v.shape) for k, v in result.items()},
            "n_images": int(len(data.get("pixel_values", ()))), "n_texts": int(len(data.get("input_ids", ()))),
            "ignored": data["_ignored"], "embed_dim": enc.dims.embed_dim, "precision": precision,
            "batch_size": enc.batch, "devices": enc.n_shards, "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------------------------- videos

def sample_indices(n_frames: int, video_fps: float, fps: float, where="video") -> np.ndarray:
    """Frames sampled at ``fps`` per second: ``range(0, n_frames, int(round(video_fps / fps)))`` (no cap)."""
    if int(n_frames) < 1:
        raise JaxprvrError(where, "at least one frame", f"{n_frames} frames")
    if not math.isfinite(float(video_fps)):
        raise JaxprvrError(where, "a finite average frame rate", f"avg_frame_rate {video_fps} (unset, 0/0?)")
    stride = int(round(float(video_fps) / float(fps)))
    if stride < 1:
        raise JaxprvrError(where, f"an average frame rate above {0.5 * fps:g} fps (stride round(fps / {fps:g}) "
                           ">= 1)", f"{float(video_fps):g} fps, stride {stride}")
    return np.arange(0, int(n_frames), stride, dtype=np.int64)


def _parse_ext(ext) -> tuple:
    if isinstance(ext, str):
        ext = ext.split(",")
    out = tuple(sorted({e.strip().lower().lstrip(".") for e in ext if e.strip()}))
    if not out:
        raise JaxprvrError("--ext", "a comma-separated list of file extensions (mp4,avi,...)", repr(ext))
    return out


def list_videos(folder, ext=DEFAULT_EXT) -> list[tuple[str, Path]]:
    """``(video id = stem, path)`` of the files of ``folder`` with one of the extensions (case-insensitive), sorted
    by name; hidden files are left out; two files with one stem are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise JaxprvrError(folder, "a folder of videos", "no such directory")
    exts = _parse_ext(ext)
    found, seen = [], {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower().lstrip(".") not in exts:
            continue
        if p.stem in seen:
            raise JaxprvrError(folder, "one file per video id (file stem)",
                               f"{seen[p.stem].name} and {p.name}")
        seen[p.stem] = p
        found.append((p.stem, p))
    if not found:
        raise JaxprvrError(folder, f"video files with extension {'|'.join(exts)}", "none")
    return found


def _load_video(vid, path, fps, size):
    """Decode and preprocess one video: ``(vid, path, frames | None, info | None, error | None)``."""
    from jaxprvr.data import video as V

    try:
        info = V.probe(path)
        idx = sample_indices(info.n_frames, info.fps, fps, where=path)
        frames = V.preprocess(V.decode_frames(path, idx), size)
        return vid, path, frames, {"indices": idx, "fps": info.fps, "n_frames": info.n_frames}, None
    except JaxprvrError as e:
        return vid, path, None, None, e


class _Entry:
    __slots__ = ("vid", "path", "frames", "info", "out", "fed", "done")

    def __init__(self, vid, path, frames, info, dim):
        self.vid, self.path, self.frames, self.info = vid, path, frames, info
        self.out = np.empty((len(frames), dim), np.float32)
        self.fed = self.done = 0


class _Packer:
    """Frames of consecutive videos packed into full batches; a video is handed to ``write`` (in order) once all
    its frames are encoded."""

    def __init__(self, enc: ClipEncoder, write):
        self.enc, self.write = enc, write
        self.queue: deque[_Entry] = deque()
        self.buffered = 0

    def add(self, entry: _Entry):
        self.queue.append(entry)
        self.buffered += len(entry.frames)
        while self.buffered >= self.enc.batch:
            self._step()

    def drain(self):
        while self.buffered:
            self._step()

    def _step(self):
        pieces, parts, n = [], [], 0
        for e in self.queue:
            if n == self.enc.batch:
                break
            if e.fed == len(e.frames):
                continue
            k = min(len(e.frames) - e.fed, self.enc.batch - n)
            pieces.append((e, e.fed, e.fed + k))
            parts.append(e.frames[e.fed:e.fed + k])
            e.fed += k
            n += k
        emb = self.enc.image_embeds(np.concatenate(parts))
        pos = 0
        for e, a, b in pieces:
            e.out[a:b] = emb[pos:pos + b - a]
            e.done += b - a
            pos += b - a
        self.buffered -= n
        while self.queue and self.queue[0].done == len(self.queue[0].out):
            e = self.queue.popleft()
            e.frames = None
            self.write(e)


def _open_h5(out: Path, meta: dict):
    import h5py

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        f = h5py.File(out, "a")
    except OSError as e:
        raise JaxprvrError(out, "an HDF5 file that can be opened for appending", f"{e}") from e
    found = f.attrs.get(META_ATTR)
    if found is None:
        if len(f.keys()):
            f.close()
            raise JaxprvrError(out, f"a feature file written by jaxprvr.features (root attribute {META_ATTR})",
                               f"{len(f.keys())} datasets without it", hint="write to another --out")
        f.attrs[META_ATTR] = json.dumps(meta, sort_keys=True)
    else:
        old = json.loads(found)
        keys = ("format", "fps", "precision", "embed_dim", "image_resolution")
        if any(old.get(k) != meta[k] for k in keys):
            f.close()
            raise JaxprvrError(out, f"a feature file made with {({k: meta[k] for k in keys})}",
                               f"{({k: old.get(k) for k in keys})}", hint="use another --out for other settings")
    return f


def extract_videos(clip_path, videos, fps: float, out, batch_size: int = DEFAULT_BATCH, ext=DEFAULT_EXT,
                   on_bad_video: str = "error", precision: str = "fp32", progress: bool = True, mesh=None) -> dict:
    """The ``videos`` command (see the module docstring); returns the JSON summary."""
    from jaxprvr.data import prefetch

    t0 = time.perf_counter()
    if on_bad_video not in ON_BAD_VIDEO:
        raise JaxprvrError("--on-bad-video", f"one of {list(ON_BAD_VIDEO)}", repr(on_bad_video))
    fps = float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise JaxprvrError("--fps", "a positive number of frames per second", repr(fps))
    files = list_videos(videos, ext)
    out = Path(out)
    enc = load_encoder(clip_path, precision, batch_size, mesh)
    dims = enc.dims
    meta = {"format": FORMAT, "fps": fps, "precision": precision, "embed_dim": dims.embed_dim,
            "image_resolution": dims.image_resolution, "clip": str(clip_path),
            "sampling": "stride = int(round(video_fps / fps)) over all frames (jaxprvr.data.video decoding)"}
    counts = {"written": 0, "skipped_existing": 0, "rewritten_incomplete": 0, "bad": 0, "frames": 0}
    bad = []
    with _open_h5(out, meta) as f:
        todo = []
        for vid, path in files:
            if vid in f:
                if "frame_indices" in f[vid].attrs:
                    counts["skipped_existing"] += 1
                    continue
                del f[vid]  # a write cut short by a crash: redo it
                counts["rewritten_incomplete"] += 1
            todo.append((vid, path))

        bar = _bar(len(todo), "videos", progress, "video")

        def write(e: _Entry):
            ds = f.create_dataset(e.vid, data=e.out)
            ds.attrs["video_fps"] = float(e.info["fps"])
            ds.attrs["video_frames"] = int(e.info["n_frames"])
            ds.attrs["source"] = e.path.name
            ds.attrs["frame_indices"] = e.info["indices"]  # last: its presence marks a complete dataset
            f.flush()
            counts["written"] += 1
            counts["frames"] += len(e.out)
            bar.update(1)

        packer = _Packer(enc, write)
        loads = (_load_video(vid, path, fps, dims.image_resolution) for vid, path in todo)
        with bar, prefetch(loads, 2) as it:
            for vid, path, frames, info, err in it:
                if err is not None:
                    if on_bad_video == "error":
                        packer.drain()  # the videos before it are kept
                        raise err
                    counts["bad"] += 1
                    bad.append({"id": vid, "file": str(path), "error": str(err)})
                    bar.update(1)
                    continue
                packer.add(_Entry(vid, path, frames, info, dims.embed_dim))
            packer.drain()
        n_datasets = len(f.keys())
    return {"command": "videos", "out": str(out), "videos": len(files), **counts, "bad_videos": bad,
            "datasets": n_datasets, "embed_dim": dims.embed_dim, "fps": fps, "precision": precision,
            "batch_size": enc.batch, "devices": enc.n_shards, "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxprvr.features",
        description="CLIP features with the Flax CLIP (jaxprvr.models.clip): of arrays of pixels / token ids "
                    "(clip), or of the frames of a folder of videos (videos). Prints one JSON line.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{clip,videos}")
    c = sub.add_parser(
        "clip", help="image / text features of the arrays of an .npz file",
        description="IN.npz: pixel_values [N,3,R,R] float32 (CLIP-normalised, R the model's resolution) and/or "
                    "input_ids [M,L] int (SOT...EOT, 0-padded after EOT, L <= context length). OUT.npz: "
                    "image_embeds [N,D], image_tokens [N,G*G+1,D], text_embeds [M,D] (at argmax(ids)), "
                    "text_hidden [M,L,W] (after ln_final, before the projection), text_tokens [M,L,D]; float32, "
                    "not L2-normalised.")
    c.add_argument("--inputs", required=True, metavar="IN.npz")
    c.add_argument("--out", required=True, metavar="OUT.npz")
    v = sub.add_parser(
        "videos", help="per-video CLIP image embeddings of frames sampled at --fps, into one HDF5 file",
        description="One float32 (T, D) dataset per video id (file stem): CLIP image embeddings (not "
                    "L2-normalised) of the frames sampled at F frames per second, stride = int(round(video fps / "
                    "F)) over ALL frames (frames 0, stride, 2*stride, ...; no 12-frame cap), decoded as "
                    "jaxprvr.data.video decodes (decord's frame numbering and fps) and preprocessed with CLIP's "
                    "Pillow transform (short side to the model's resolution, bicubic, centre crop, mean/std). "
                    "Resumable: ids already in the file are skipped; each video is written and flushed when done.")
    v.add_argument("--videos", required=True, metavar="DIR", help="folder of video files (not recursive)")
    v.add_argument("--fps", required=True, type=float, metavar="F", help="frames sampled per second of video")
    v.add_argument("--out", required=True, metavar="FILE.hdf5", help="HDF5 file to create or complete")
    v.add_argument("--ext", default=",".join(DEFAULT_EXT),
                   help=f"comma-separated file extensions to take (default {','.join(DEFAULT_EXT)})")
    v.add_argument("--on-bad-video", default="error", choices=ON_BAD_VIDEO,
                   help="error (default): stop with one line naming the unreadable file; skip: count it and go on")
    for s in (c, v):
        s.add_argument("--clip", required=True, metavar="PT_OR_DIR",
                       help="OpenAI CLIP weights: ViT-*.pt (TorchScript archive or state dict) or a clip2jax folder")
        s.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                       help=f"images / texts / frames per device call, rounded up to a multiple of the device "
                            f"count (default {DEFAULT_BATCH})")
        s.add_argument("--precision", default="fp32", choices=PRECISIONS,
                       help="fp32 (default) or bf16 (matmuls in bfloat16, LayerNorm and softmax in float32)")
        s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
        add_compile_cache_args(s)
    return p


def run(args) -> dict:
    enable_compile_cache(args)
    if args.command == "clip":
        return extract_arrays(args.clip, args.inputs, args.out, args.batch_size, args.precision,
                              progress=not args.no_progress)
    return extract_videos(args.clip, args.videos, args.fps, args.out, args.batch_size, args.ext, args.on_bad_video,
                          args.precision, progress=not args.no_progress)


def main(argv=None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
