"""Raw-video decoding, frame sampling and CLIP preprocessing for text-video retrieval (BackBone_tvr).

What the official loader does (``BackBone_tvr`` @5bb74ad, ``tvr/dataloaders/dataloader_retrieval.py``
``_get_rawvideo_dec`` l.232-301) and how it is reproduced here:

* **Decoding.** The official code opens the file with decord 0.6.0 (``VideoReader(path, ctx=cpu(0))``); here
  PyAV decodes it. decord's frame count is the number of packets of the video stream (``IndexKeyframes`` reads
  every packet at open and ``GetFrameCount`` returns their number, ``src/video/video_reader.cc`` l.255-273,
  466-513), not the header's ``nb_frames``; frame *i* is the packet with the *i*-th smallest pts. Its fps is
  ``avg_frame_rate.num / avg_frame_rate.den`` (l.538-544), NaN for 0/0. :func:`probe` reproduces both;
  :func:`decode_frames` decodes sequentially and keeps the frames whose pts are those of the wanted packets. A
  packet that yields no frame (a zero-size "dropped frame" packet, or one the decoder rejects) repeats the last
  decoded frame, as decord's ``FetchCachedFrame`` does.
* **Sampling** (l.264-277). ``stride = int(round(fps / int(video_framerate)))`` (Python ``round``, half to
  even), candidates ``range(0, n, stride)``; more than ``max_frames`` (12) candidates keep
  ``cand[np.linspace(0, len - 1, 12, dtype=int)]``. No random jitter, in training or test. An fps that gives
  stride 0 (fps <= 0.5 at 1 frame/s) is a ``ValueError`` from ``range`` officially and a
  :class:`~jaxprvr.errors.JaxprvrError` here.
* **Per-frame transform** (l.57-64): torchvision's PIL path, i.e. Pillow: ``Resize(224, BICUBIC)`` (short side
  224, long side ``int(224 * long / short)``, an image already that size unchanged), ``CenterCrop(224)``
  (offsets ``int(round((h - 224) / 2))``), ``ToTensor`` (uint8 / 255 in float32), ``Normalize`` with CLIP's mean
  and std (openai/CLIP ``clip/clip.py`` l.79-86). :func:`preprocess` does the same with Pillow and NumPy.
* **Training augmentation** (l.88-92, l.280-282): :mod:`jaxprvr.data.rand_augment`, on the native-size frames
  before the resize, the same draws for every frame of a clip, seeded by the caller's ``numpy`` Generator.
* **Output**: ``video`` float32 ``[max_frames, 3, 224, 224]`` zero-padded, ``mask`` int32 ``[max_frames]``
  (1 for real frames). The official array is float64, converted back to float32 in the model: the same values.

Bad inputs. Officially a missing file raises ``FileNotFoundError``, an unreadable one makes the loader return
``None`` (a ``TypeError`` in the worker), and fps < 0.5 a ``ValueError``. Here each raises a
:class:`~jaxprvr.errors.JaxprvrError` naming the file, unless ``on_bad_video="zeros"``: then the clip is all
zeros with mask 0 and :attr:`Clip.error` holds the error, so the caller can count such videos.

Beyond decord 0.6.0: frames are converted to RGB by PyAV's FFmpeg (8.x) instead of decord's bundled FFmpeg 4.1.
They are bit-identical for even widths (checked for H.264, MPEG-4 part 2 and MJPEG, yuv420p/yuvj420p/yuv444p);
for yuv420p with an *odd* width the chroma upsampling of the two swscale versions differs (a few levels). A
display-matrix rotation is applied like decord's filter graph (180 degrees: rotated, as decord does; 90/270:
rotated upright, where decord 0.6.0's ``get_batch`` fails with a size-mismatch error).

:class:`FrameStore` keeps, per video id, the decoded native-size frames of the sampled indices (lossless
``.npz``) so a training run decodes every video once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxprvr.errors import JaxprvrError

log = logging.getLogger(__name__)

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)
MAX_FRAMES = 12
FRAMERATE = 1
IMAGE_SIZE = 224
ON_BAD_VIDEO = ("error", "zeros")


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - PyAV is a dependency of the video path
        raise JaxprvrError("jaxprvr.data.video", "PyAV installed (pip install av)", "no module named 'av'") from e
    return av


def _image():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise JaxprvrError("jaxprvr.data.video", "Pillow installed (pip install Pillow)", "no module PIL") from e
    return Image


# --------------------------------------------------------------------------------------------- probing

@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` reads without decoding.

    ``n_frames`` is decord's count (video packets); ``fps`` is ``avg_frame_rate`` as a float (NaN when the
    container leaves it unset); ``width``/``height`` are the coded size (before any display rotation);
    ``header_frames`` is the container's ``nb_frames`` (0 when unknown), for information only.
    """

    path: str
    n_frames: int
    fps: float
    avg_frame_rate: Fraction | None
    width: int
    height: int
    codec: str
    header_frames: int


def _open(path):
    """Open ``path`` and pick its video stream (FFmpeg's best one, as decord does)."""
    p = Path(path)
    if not p.exists():
        raise JaxprvrError(p, "an existing video file", "no such file")
    if not p.is_file():
        raise JaxprvrError(p, "a video file", "not a regular file")
    av = _av()
    try:
        container = av.open(str(p))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise JaxprvrError(p, "a video file FFmpeg can open", f"{type(e).__name__}: {e}") from e
    try:
        stream = container.streams.best("video")
    except Exception:  # noqa: BLE001 - a broken header can fail here too
        stream = None
    if stream is None:
        kinds = [s.type for s in container.streams]
        container.close()
        raise JaxprvrError(p, "a video stream", f"none (streams: {kinds or 'none'})")
    return container, stream


def _scan(path) -> tuple[VideoInfo, list | None]:
    """Read every packet of the video stream: the frame count, fps, and the packets' pts in ascending order.

    The sorted pts are the frame index -> timestamp map (decord sorts its packet list by pts, l.503-505). When
    some packet carries neither pts nor dts the map is ``None`` and frames are matched by decode order.
    """
    av = _av()
    container, stream = _open(path)
    with container:
        keys, complete = [], True
        try:
            for packet in container.demux(stream):
                if packet.size == 0 and packet.pts is None and packet.dts is None:
                    continue  # PyAV's trailing flush marker, not a packet of the file
                key = packet.pts if packet.pts is not None else packet.dts
                complete = complete and key is not None
                keys.append(key)
        except av.FFmpegError as e:
            raise JaxprvrError(path, "a readable video stream", f"read error after {len(keys)} packets: {e}") from e
        rate = stream.average_rate  # None for 0/0 (and for 0/x)
        ctx = stream.codec_context
        info = VideoInfo(
            path=str(path), n_frames=len(keys),
            fps=(rate.numerator / rate.denominator) if rate is not None else math.nan,
            avg_frame_rate=rate, width=int(ctx.width or 0), height=int(ctx.height or 0),
            codec=ctx.name, header_frames=int(stream.frames or 0))
    if not keys:
        raise JaxprvrError(path, "at least one video packet", "an empty video stream")
    return info, (sorted(keys) if complete else None)


def probe(path) -> VideoInfo:
    """Frame count (video packets, as decord counts), fps (``avg_frame_rate``) and size of ``path``."""
    return _scan(path)[0]


# --------------------------------------------------------------------------------------------- sampling

def frame_indices(n_frames: int, fps: float, max_frames: int = MAX_FRAMES, framerate: float = FRAMERATE,
                  where: str | os.PathLike = "frame_indices") -> np.ndarray:
    """The official sampled frame indices (``_get_rawvideo_dec`` l.264-277), int64 ``[<= max_frames]``.

    ``where`` names the video in errors.
    """
    sample_fps = int(framerate)
    if sample_fps < 1:
        raise JaxprvrError(where, "video_framerate >= 1 (it is cast to int)", repr(framerate))
    if int(max_frames) < 1:
        raise JaxprvrError(where, "max_frames >= 1", repr(max_frames))
    if int(n_frames) < 1:
        raise JaxprvrError(where, "at least one frame", f"{n_frames} frames")
    if not math.isfinite(float(fps)):
        raise JaxprvrError(where, "a finite average frame rate", f"avg_frame_rate {fps} (unset, 0/0?)")
    stride = int(round(float(fps) / sample_fps))
    if stride < 1:
        raise JaxprvrError(where, f"an average frame rate above {0.5 * sample_fps:g} fps (stride round(fps / "
                           f"{sample_fps}) >= 1; the official loader fails in range())",
                           f"{float(fps):g} fps, stride {stride}")
    cand = np.arange(0, int(n_frames), stride, dtype=np.int64)
    if len(cand) > max_frames:
        cand = cand[np.linspace(0, len(cand) - 1, num=int(max_frames), dtype=int)]
    return cand


# --------------------------------------------------------------------------------------------- decoding

def _to_rgb(frame, size) -> np.ndarray:
    """One decoded frame as uint8 ``[H, W, 3]`` at the stream's coded ``size`` (w, h), display rotation applied."""
    w, h = size
    if (w and h) and (frame.width, frame.height) != (w, h):
        arr = frame.to_ndarray(format="rgb24", width=w, height=h)  # decord scales every frame to the coded size
    else:
        arr = frame.to_ndarray(format="rgb24")
    rot = int(getattr(frame, "rotation", 0) or 0)  # counter-clockwise degrees of the display matrix
    if rot % 90 == 0 and rot % 360:
        arr = np.rot90(arr, (rot // 90) % 4)  # decord: transpose=2 for 90 ccw, transpose=1 for 90 cw
    return np.ascontiguousarray(arr)


def _decode_selected(path, indices: Sequence[int], pts: list | None, n: int) -> tuple[np.ndarray, int]:
    """Decode ``path`` sequentially; return the frames at ``indices`` and how many packets failed to decode.

    ``pts`` is the sorted packet pts from :func:`_scan` (``None``: match frames by decode order), ``n`` the
    frame count. A frame is the decoded frame at its packet's pts; a pts without a decoded frame gets the last
    frame decoded before it.
    """
    av = _av()
    wanted = sorted({int(i) for i in indices})
    if not wanted:
        raise JaxprvrError(path, "at least one frame index", "none")
    if wanted[0] < 0 or wanted[-1] >= n:
        raise JaxprvrError(path, f"frame indices in [0, {n})", f"{wanted[0]}..{wanted[-1]}")
    keys = pts if pts is not None else list(range(n))
    target_keys = [keys[i] for i in wanted]
    got: dict[int, np.ndarray] = {}
    failed = 0
    container, stream = _open(path)
    with container:
        size = (int(stream.codec_context.width or 0), int(stream.codec_context.height or 0))
        st = {"t": 0, "count": 0, "prev": None, "prev_rgb": None}

        def prev_rgb():
            if st["prev_rgb"] is None:
                st["prev_rgb"] = _to_rgb(st["prev"], size)
            return st["prev_rgb"]

        def take(frame) -> bool:
            """Give ``frame`` (or the previous one) to the targets up to its key; True once all are given."""
            if pts is None or frame.pts is None:
                key = keys[min(st["count"], n - 1)]
            else:
                key = frame.pts
            st["count"] += 1
            cur, t = None, st["t"]
            while t < len(wanted) and target_keys[t] <= key:
                if target_keys[t] == key or st["prev"] is None:
                    if cur is None:
                        cur = _to_rgb(frame, size)
                    got[wanted[t]] = cur
                else:
                    got[wanted[t]] = prev_rgb()  # nothing decoded at this pts: repeat the last frame
                t += 1
            st["t"] = t
            st["prev"], st["prev_rgb"] = frame, cur
            return t == len(wanted)

        done = False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # a dropped-frame packet, or PyAV's flush marker: nothing to decode
                try:
                    frames = stream.decode(packet)
                except av.FFmpegError:
                    failed += 1
                    continue
                for frame in frames:
                    if take(frame):
                        done = True
                        break
                if done:
                    break
            if not done:
                try:
                    for frame in stream.decode(None):  # drain the frames the decoder still holds
                        if take(frame):
                            break
                except av.FFmpegError:
                    failed += 1
        except av.FFmpegError as e:
            raise JaxprvrError(path, "a readable video stream", f"read error: {e}") from e
        if st["prev"] is None:
            raise JaxprvrError(path, "a decodable video", f"no frame decoded from {n} packets ({failed} failed)")
        for t in range(st["t"], len(wanted)):  # targets past the last decoded frame repeat it
            got[wanted[t]] = prev_rgb()
    if failed:
        log.warning("%s: %d packet(s) failed to decode; their frames repeat the previous frame", path, failed)
    return np.stack([got[int(i)] for i in indices]), failed


def decode_frames(path, indices: Sequence[int]) -> np.ndarray:
    """The frames at ``indices`` (decord's numbering, see :func:`probe`) as uint8 ``[T, H, W, 3]`` RGB.

    Indices may repeat and come in any order; the file is decoded once, sequentially, up to the last one.
    """
    info, pts = _scan(path)
    return _decode_selected(path, indices, pts, info.n_frames)[0]


# --------------------------------------------------------------------------------------------- preprocessing

def _resize_short_side(img, size: int):
    """torchvision ``Resize(size, BICUBIC)`` on a PIL image (its PIL path: ``Image.resize``)."""
    Image = _image()
    w, h = img.size
    if (w <= h and w == size) or (h <= w and h == size):
        return img
    if w < h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    return img.resize((ow, oh), Image.Resampling.BICUBIC)


def preprocess(frames, size: int = IMAGE_SIZE) -> np.ndarray:
    """CLIP's frame transform (``dataloader_retrieval.py`` l.57-64): float32 ``[T, 3, size, size]``.

    ``frames``: uint8 ``[T, H, W, 3]`` RGB or a list of RGB PIL images. Resize (short side ``size``, bicubic,
    Pillow), centre crop at ``int(round((h - size) / 2))``, ``/ 255`` and ``(x - mean) / std`` in float32.
    """
    Image = _image()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise JaxprvrError("preprocess frames", "uint8 [T, H, W, 3]", f"{frames.dtype} {frames.shape}")
        images = [Image.fromarray(f) for f in frames]
    else:
        images = [img if img.mode == "RGB" else img.convert("RGB") for img in frames]
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for t, img in enumerate(images):
        arr = np.asarray(_resize_short_side(img, size), dtype=np.uint8)
        h, w = arr.shape[:2]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        crop = arr[top:top + size, left:left + size]  # resize leaves both sides >= size: no padding
        x = crop.astype(np.float32) / np.float32(255.0)
        out[t] = ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    return out


# --------------------------------------------------------------------------------------------- clips

class Clip(tuple):
    """``(video, mask)``, unpackable as a pair, with what the loader knows about the clip.

    ``video`` float32 ``[max_frames, 3, S, S]``, ``mask`` int32 ``[max_frames]``; ``error`` is the
    :class:`~jaxprvr.errors.JaxprvrError` of a bad video loaded with ``on_bad_video="zeros"`` (else ``None``);
    ``indices`` the sampled frame indices; ``failed_packets`` how many packets failed to decode (their frames
    repeat the previous frame).
    """

    def __new__(cls, video, mask, *, error=None, indices=None, failed_packets=0):
        self = super().__new__(cls, (video, mask))
        self.error = error
        self.indices = indices
        self.failed_packets = failed_packets
        return self

    @property
    def video(self) -> np.ndarray:
        return self[0]

    @property
    def mask(self) -> np.ndarray:
        return self[1]

    @property
    def ok(self) -> bool:
        return self.error is None


def _check_augment(augment):
    if augment is None or (isinstance(augment, str) and augment == "none"):
        return None
    if isinstance(augment, np.random.Generator):
        return augment
    raise JaxprvrError("augment", "None, 'none' or a numpy.random.Generator (training RandAugment)",
                       type(augment).__name__)


def _check_on_bad(on_bad_video):
    if on_bad_video not in ON_BAD_VIDEO:
        raise JaxprvrError("on_bad_video", f"one of {ON_BAD_VIDEO}", repr(on_bad_video))


def empty_clip(max_frames: int = MAX_FRAMES, size: int = IMAGE_SIZE, error=None) -> Clip:
    """All-zero video, mask 0: what a bad video becomes under ``on_bad_video="zeros"``."""
    return Clip(np.zeros((max_frames, 3, size, size), np.float32), np.zeros(max_frames, np.int32), error=error)


def clip_from_frames(frames: np.ndarray, max_frames: int = MAX_FRAMES, augment=None,
                     size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Augment (training) and preprocess the sampled native-size frames, zero-pad to ``max_frames``.

    ``augment``: ``None``/``"none"`` (evaluation) or a ``numpy.random.Generator`` that seeds the official
    ``rand-m7-n4-mstd0.5-inc1`` RandAugment, drawn once for the clip.
    """
    rng = _check_augment(augment)
    if len(frames) > max_frames:
        raise JaxprvrError("clip frames", f"at most max_frames={max_frames} frames", f"{len(frames)}")
    video = np.zeros((max_frames, 3, size, size), np.float32)
    mask = np.zeros(max_frames, np.int32)
    if len(frames):
        if rng is not None:
            from jaxprvr.data.rand_augment import OFFICIAL_CONFIG, RandAugment

            frames = RandAugment.from_config(OFFICIAL_CONFIG)(frames, rng)
        video[:len(frames)] = preprocess(frames, size)
        mask[:len(frames)] = 1
    return video, mask


def _sample_and_decode(path, max_frames, framerate):
    info, pts = _scan(path)
    indices = frame_indices(info.n_frames, info.fps, max_frames, framerate, where=path)
    frames, failed = _decode_selected(path, indices, pts, info.n_frames)
    return info, indices, frames, failed


def load_clip(path, max_frames: int = MAX_FRAMES, framerate: float = FRAMERATE, augment=None,
              on_bad_video: str = "error", size: int = IMAGE_SIZE) -> Clip:
    """One video as BackBone_tvr's ``_get_rawvideo_dec`` gives it: ``(video, mask)`` (a :class:`Clip`).

    ``augment``: ``None``/``"none"``, or a ``numpy.random.Generator`` for the training RandAugment.
    ``on_bad_video``: ``"error"`` raises :class:`~jaxprvr.errors.JaxprvrError` for a missing or unreadable
    file or an fps below 0.5 x ``framerate``; ``"zeros"`` returns :func:`empty_clip` with the error attached.
    """
    _check_on_bad(on_bad_video)
    _check_augment(augment)
    try:
        _, indices, frames, failed = _sample_and_decode(path, max_frames, framerate)
    except JaxprvrError as e:
        if on_bad_video == "error":
            raise
        log.warning("bad video, using zeros: %s", e)
        return empty_clip(max_frames, size, error=e)
    video, mask = clip_from_frames(frames, max_frames, augment, size)
    return Clip(video, mask, indices=indices, failed_packets=failed)


# --------------------------------------------------------------------------------------------- frame store

@dataclass(frozen=True)
class StoredFrames:
    """One video's entry in a :class:`FrameStore`.

    ``frames`` uint8 ``[T, H, W, 3]`` (native size, ``T = 0`` for a recorded bad video), ``indices`` int64
    ``[T]``, ``n_frames`` and ``fps`` as :func:`probe` read them, ``error`` the message of a bad video ("" if
    none).
    """

    video_id: str
    frames: np.ndarray
    indices: np.ndarray
    n_frames: int
    fps: float
    source: str
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class FrameStore:
    """Decoded frames of the sampled indices, one lossless ``<quoted id>.npz`` per video id under ``root``.

    The sampling parameters are fixed per store (``frame_store.json``); opening a store with other values is an
    error. Writes are atomic (temporary file, then rename), so several processes may fill one store.
    """

    META = "frame_store.json"
    FORMAT = 1

    def __init__(self, root, max_frames: int = MAX_FRAMES, framerate: float = FRAMERATE, compress: bool = True):
        self.root = Path(root)
        self.max_frames = int(max_frames)
        self.framerate = int(framerate)
        self.compress = compress
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"format": self.FORMAT, "max_frames": self.max_frames, "framerate": self.framerate}
        meta_path = self.root / self.META
        if meta_path.exists():
            try:
                found = json.loads(meta_path.read_text())
            except (OSError, ValueError) as e:
                raise JaxprvrError(meta_path, "a frame-store description (JSON)", f"unreadable: {e}") from e
            if found != meta:
                raise JaxprvrError(meta_path, f"a store made with {meta}", f"{found}",
                                   hint="use another cache directory for other sampling parameters")
        else:
            self._atomic_write(meta_path, lambda f: f.write(json.dumps(meta, sort_keys=True).encode()))

    # -- names
    def path_for(self, video_id: str) -> Path:
        vid = str(video_id)
        if vid in ("", ".", ".."):
            raise JaxprvrError("video id", "a non-empty id other than '.' and '..'", repr(vid))
        name = urllib.parse.quote(vid, safe="") + ".npz"
        if len(name.encode()) > 255:
            raise JaxprvrError("video id", "an id whose quoted file name fits in 255 bytes", repr(vid))
        return self.root / name

    def __contains__(self, video_id) -> bool:
        return self.path_for(video_id).exists()

    # -- writing
    def _atomic_write(self, path: Path, write):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _write(self, rec: StoredFrames):
        arrays = dict(frames=rec.frames, indices=rec.indices.astype(np.int64), n_frames=np.int64(rec.n_frames),
                      fps=np.float64(rec.fps), source=np.str_(rec.source), error=np.str_(rec.error),
                      video_id=np.str_(rec.video_id), format=np.int64(self.FORMAT))
        saver = np.savez_compressed if self.compress else np.savez
        self._atomic_write(self.path_for(rec.video_id), lambda f: saver(f, **arrays))

    def put(self, video_id: str, video_path, on_bad_video: str = "error") -> StoredFrames:
        """Decode ``video_path`` once (probe, sample, decode the sampled frames) and store the frames.

        With ``on_bad_video="zeros"`` a bad video is recorded (no frames, the error message) instead of raising.
        """
        _check_on_bad(on_bad_video)
        try:
            info, indices, frames, _ = _sample_and_decode(video_path, self.max_frames, self.framerate)
            rec = StoredFrames(str(video_id), frames, indices, info.n_frames, info.fps, str(video_path))
        except JaxprvrError as e:
            if on_bad_video == "error":
                raise
            log.warning("bad video, recorded as empty: %s", e)
            rec = StoredFrames(str(video_id), np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.int64), 0,
                               math.nan, str(video_path), error=str(e))
        self._write(rec)
        return rec

    # -- reading
    def get(self, video_id: str) -> StoredFrames:
        path = self.path_for(video_id)
        if not path.exists():
            raise JaxprvrError(path, f"stored frames of video {video_id!r}", "no file",
                               hint="decode it first (FrameStore.put / ensure)")
        try:
            with np.load(path, allow_pickle=False) as z:
                rec = StoredFrames(video_id=str(z["video_id"]), frames=z["frames"], indices=z["indices"],
                                   n_frames=int(z["n_frames"]), fps=float(z["fps"]), source=str(z["source"]),
                                   error=str(z["error"]))
                fmt = int(z["format"])
        except (OSError, ValueError, KeyError) as e:
            raise JaxprvrError(path, "a frame-store .npz entry", f"unreadable: {e}") from e
        if fmt != self.FORMAT or rec.video_id != str(video_id):
            raise JaxprvrError(path, f"format {self.FORMAT} frames of {video_id!r}",
                               f"format {fmt} frames of {rec.video_id!r}")
        if rec.frames.dtype != np.uint8 or rec.frames.ndim != 4 or len(rec.frames) != len(rec.indices):
            raise JaxprvrError(path, "uint8 frames [T, H, W, 3] with T indices",
                               f"{rec.frames.dtype} {rec.frames.shape}, {len(rec.indices)} indices")
        return rec

    def ensure(self, video_id: str, video_path, on_bad_video: str = "error") -> StoredFrames:
        """The stored entry, decoding ``video_path`` first if there is none."""
        if video_id in self:
            return self.get(video_id)
        return self.put(video_id, video_path, on_bad_video)

    def load_clip(self, video_id: str, augment=None, on_bad_video: str = "error", size: int = IMAGE_SIZE) -> Clip:
        """:func:`load_clip` from the stored frames (augmentation and preprocessing run here, per call)."""
        _check_on_bad(on_bad_video)
        _check_augment(augment)
        rec = self.get(video_id)
        if not rec.ok:
            err = JaxprvrError(rec.source, "a good video (recorded bad in the frame store)", rec.error)
            if on_bad_video == "error":
                raise err
            return empty_clip(self.max_frames, size, error=err)
        video, mask = clip_from_frames(rec.frames, self.max_frames, augment, size)
        return Clip(video, mask, indices=rec.indices)
