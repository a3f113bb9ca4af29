"""Raw-video decoding, frame sampling, CLIP preprocessing and RandAugment (jaxprvr.data.video / rand_augment).

Synthetic videos are written with PyAV into a temporary directory. Every frame encodes its own index in a 3x3
grid of bright/dark blocks, so a test can tell which frame was decoded after lossy coding.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")
PIL = pytest.importorskip("PIL")
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from jaxprvr.data import video as V  # noqa: E402
from jaxprvr.data.rand_augment import (DEFAULT_OPS, INCREASING_OPS, OFFICIAL_CONFIG, SIGNED_OPS, OpDraw,  # noqa: E402
                                       RandAugment, apply_op, op_args)
from jaxprvr.errors import JaxprvrError  # noqa: E402

FILL = (128, 128, 128)
BICUBIC = Image.Resampling.BICUBIC
AFFINE = Image.Transform.AFFINE


# ------------------------------------------------------------------------------------------ synthetic videos

def frame_image(i: int, w: int, h: int) -> np.ndarray:
    """Frame ``i``: 9 bits of ``i`` as bright/dark blocks of a 3x3 grid, plus a frame-dependent texture."""
    yy, xx = np.mgrid[0:h, 0:w]
    block = np.minimum(yy * 3 // h, 2) * 3 + np.minimum(xx * 3 // w, 2)
    on = (i >> block) & 1
    base = np.where(on == 1, 205, 50)
    tex = (xx * 5 + yy * 3 + i * 11) % 31 - 15
    img = np.stack([base + tex, base - tex, base + (i * 7) % 21 - 10], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def read_index(frame: np.ndarray) -> int:
    """The index :func:`frame_image` wrote, read from the centres of the blocks."""
    h, w = frame.shape[:2]
    i = 0
    for b in range(9):
        by, bx = divmod(b, 3)
        y0, y1, x0, x1 = by * h // 3, (by + 1) * h // 3, bx * w // 3, (bx + 1) * w // 3
        dy, dx = (y1 - y0) // 4, (x1 - x0) // 4
        if frame[y0 + dy:y1 - dy, x0 + dx:x1 - dx].mean() > 128:
            i |= 1 << b
    return i


def write_video(path, n, w, h, rate, codec, pix_fmt, *, drop=(), corrupt=(), rotation=None):
    """Encode frames 0..n-1; ``drop``: zero-size packets instead; ``corrupt``: garbage packets instead."""
    c = av.open(str(path), "w")
    s = c.add_stream(codec, rate=rate, options={"crf": "12"} if codec == "libx264" else {})
    s.width, s.height, s.pix_fmt = w, h, pix_fmt
    if codec != "libx264":
        s.bit_rate = 4_000_000
    if rotation is not None:
        s.set_display_rotation(rotation)
    tb = Fraction(1, 1) / Fraction(rate)
    for i in range(n):
        if i in drop:
            p = av.Packet(b"")
            p.stream, p.pts, p.dts, p.time_base = s, i, i, tb
            c.mux(p)
            continue
        f = av.VideoFrame.from_ndarray(frame_image(i, w, h), format="rgb24")
        f.pts, f.time_base = i, tb
        for p in s.encode(f):
            if p.pts in corrupt:
                q = av.Packet(b"\x00" * 50)
                q.stream, q.pts, q.dts, q.time_base = s, p.pts, p.dts, p.time_base
                p = q
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


# name: (frames, width, height, rate, codec, pix_fmt, extra)
SPECS = {
    "h264_long.mp4": (400, 128, 72, Fraction(30000, 1001), "libx264", "yuv420p", {}),  # 13.3 s, B-frames
    "h264_odd.mp4": (30, 97, 61, 25, "libx264", "yuv444p", {}),
    "mpeg4_portrait.avi": (40, 62, 98, 3, "mpeg4", "yuv420p", {}),  # 13.3 s at 3 fps
    "mjpeg_one.avi": (1, 97, 61, 25, "mjpeg", "yuvj444p", {}),
    "dropped.avi": (30, 64, 48, 25, "mpeg4", "yuv420p", {"drop": {3, 4, 17}}),
    "corrupt_packets.avi": (30, 64, 48, 25, "mjpeg", "yuvj420p", {"corrupt": {3, 17}}),
    "slow.mp4": (3, 64, 48, Fraction(1, 3), "libx264", "yuv420p", {}),
    "plain.mp4": (3, 64, 48, 25, "libx264", "yuv420p", {}),
    "rot90.mp4": (3, 64, 48, 25, "libx264", "yuv420p", {"rotation": 90}),
    "rot180.mp4": (3, 64, 48, 25, "libx264", "yuv420p", {"rotation": 180}),
}
GOOD = ("h264_long.mp4", "h264_odd.mp4", "mpeg4_portrait.avi", "mjpeg_one.avi", "dropped.avi")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, (n, w, h, rate, codec, fmt, extra) in SPECS.items():
        out[name] = write_video(root / name, n, w, h, rate, codec, fmt, **extra)
    return out


def kept_frames(name):
    n, *_, extra = SPECS[name]
    return [i for i in range(n) if i not in extra.get("drop", ())]


def official_indices(n, fps, max_frames=12, video_framerate=1):
    """``_get_rawvideo_dec`` l.264-277, transcribed (no start/end times)."""
    f_start = 0
    f_end = int(min(1000000000, n - 1))
    sample_fps = int(video_framerate)
    t_stride = int(round(float(fps) / sample_fps))
    all_pos = list(range(f_start, f_end + 1, t_stride))
    if len(all_pos) > max_frames:
        return [all_pos[_] for _ in np.linspace(0, len(all_pos) - 1, num=max_frames, dtype=int)]
    return all_pos


# ------------------------------------------------------------------------------------------ probe / indices

@pytest.mark.parametrize("name", GOOD)
def test_probe_count_fps_size(videos, name):
    n, w, h, rate, codec, _, extra = SPECS[name]
    info = V.probe(videos[name])
    assert info.n_frames == len(kept_frames(name))
    assert info.avg_frame_rate == Fraction(rate)
    assert info.fps == Fraction(rate).numerator / Fraction(rate).denominator
    assert (info.width, info.height) == (w, h)
    if extra.get("drop"):
        assert info.header_frames == n != info.n_frames  # packets, not the header's nb_frames


def test_h264_packets_are_reordered(videos):
    """The H.264 clip has B-frames: packets come in decode order, so frame i needs the pts sort."""
    with av.open(str(videos["h264_long.mp4"])) as c:
        pts = [p.pts for p in c.demux(video=0) if p.pts is not None]
    assert pts != sorted(pts)


def test_frame_indices_match_official_formula():
    fps_values = [0.51, 0.7, 1, 1.5, 2.5, 3, 3.5, 12.5, 23.976023976023978, 24, 25, 29.97002997002997, 30, 59.94, 60]
    for n in list(range(1, 700)) + [1000, 5000, 100000]:
        for fps in fps_values:
            for framerate in (1, 2):
                if round(fps / framerate) < 1:
                    continue
                got = V.frame_indices(n, fps, 12, framerate)
                assert got.dtype == np.int64 and got.tolist() == official_indices(n, fps, 12, framerate), (n, fps)
    for max_frames in (1, 5, 64):
        for n in (1, 37, 400, 3001):
            assert V.frame_indices(n, 29.97, max_frames).tolist() == official_indices(n, 29.97, max_frames)
    assert V.frame_indices(400, 30000 / 1001).tolist() == [0, 30, 60, 90, 120, 150, 210, 240, 270, 300, 330, 390]


@pytest.mark.parametrize("fps", [0.5, 0.3, 0.0, math.nan])
def test_frame_indices_reject_low_fps(fps):
    with pytest.raises(JaxprvrError, match="clip.mp4"):
        V.frame_indices(100, fps, where="clip.mp4")


def test_frame_indices_reject_bad_arguments():
    with pytest.raises(JaxprvrError):
        V.frame_indices(100, 25, framerate=0)
    with pytest.raises(JaxprvrError):
        V.frame_indices(0, 25)
    assert V.frame_indices(100, 2.5, framerate=1.9).tolist() == official_indices(100, 2.5, 12, 1.9)  # int(1.9)


# ------------------------------------------------------------------------------------------ decoding

@pytest.mark.parametrize("name", GOOD)
def test_decode_sampled_frames_identity(videos, name):
    info = V.probe(videos[name])
    idx = V.frame_indices(info.n_frames, info.fps)
    frames = V.decode_frames(videos[name], idx)
    n, w, h, *_ = SPECS[name]
    assert frames.dtype == np.uint8 and frames.shape == (len(idx), h, w, 3)
    kept = kept_frames(name)
    assert [read_index(f) for f in frames] == [kept[i] for i in idx]


def test_decode_any_order_with_repeats(videos):
    idx = [399, 0, 5, 5, 200, 1, 398]
    frames = V.decode_frames(videos["h264_long.mp4"], idx)
    assert [read_index(f) for f in frames] == idx


def test_decode_all_frames_of_dropped_avi(videos):
    frames = V.decode_frames(videos["dropped.avi"], range(27))
    assert [read_index(f) for f in frames] == kept_frames("dropped.avi")


def test_corrupt_packets_repeat_previous_frame(videos):
    path = videos["corrupt_packets.avi"]
    assert V.probe(path).n_frames == 30
    frames = V.decode_frames(path, range(30))
    expect = [i - 1 if i in (3, 17) else i for i in range(30)]
    assert [read_index(f) for f in frames] == expect
    clip = V.load_clip(path, max_frames=30, framerate=1)  # 25 fps -> stride 25 -> frames 0, 25
    assert clip.ok and clip.failed_packets == 2 and clip.indices.tolist() == [0, 25]


def test_display_rotation(videos):
    plain = V.decode_frames(videos["plain.mp4"], [0, 2])
    assert (V.decode_frames(videos["rot180.mp4"], [0, 2]) == plain[:, ::-1, ::-1]).all()
    r90 = V.decode_frames(videos["rot90.mp4"], [0, 2])
    assert r90.shape == (2, 64, 48, 3)
    assert (r90 == np.rot90(plain, 1, axes=(1, 2))).all()  # 90 degrees counter-clockwise, as displayed


# ------------------------------------------------------------------------------------------ preprocessing

def reference_transform(frame: np.ndarray, size: int = 224) -> np.ndarray:
    """torchvision Resize(224, BICUBIC) / CenterCrop / ToTensor / Normalize written out with Pillow + NumPy."""
    img = Image.fromarray(frame)
    w, h = img.size
    if min(w, h) != size:
        new = (size, int(size * h / w)) if w < h else (int(size * w / h), size)
        img = img.resize(new, Image.BICUBIC)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img).astype(np.float32) / np.float32(255)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("hw", [(61, 97), (97, 61), (224, 300), (300, 224), (224, 224), (240, 320), (225, 401),
                                (100, 100), (360, 480), (1080, 1920)])
def test_preprocess_bit_exact(hw):
    rng = np.random.default_rng(sum(hw))
    frames = rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    out = V.preprocess(frames)
    assert out.dtype == np.float32 and out.shape == (2, 3, 224, 224)
    for t in range(2):
        np.testing.assert_array_equal(out[t], reference_transform(frames[t]))
    if min(hw) == 224:  # already at size: no resampling, a pure crop
        h, w = hw
        top, left = int(round((h - 224) / 2)), int(round((w - 224) / 2))
        crop = frames[0, top:top + 224, left:left + 224].astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(out[0], ((crop - V.CLIP_MEAN) / V.CLIP_STD).transpose(2, 0, 1))
    assert V.preprocess(list(Image.fromarray(f) for f in frames)).tobytes() == out.tobytes()


def test_to_tensor_normalize_match_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    t = torch.from_numpy(x).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    t = t.sub_(torch.tensor(V.CLIP_MEAN.tolist())[:, None, None]).div_(torch.tensor(V.CLIP_STD.tolist())[:, None, None])
    np.testing.assert_array_equal(V.preprocess(x[None])[0], t.numpy())


# ------------------------------------------------------------------------------------------ RandAugment

def _direct(name, img, m, neg):
    """The official op for magnitude ``m`` and sign ``neg``, as a direct Pillow call (``rand_augment.py``)."""
    s = -1.0 if neg else 1.0
    geo = dict(resample=BICUBIC, fillcolor=FILL)

    def posterize(bits):  # older Pillow kept 0 bits as all black (mask ~255); Pillow 13 raises for bits < 1
        return ImageOps.posterize(img, bits) if bits >= 1 else Image.new(img.mode, img.size, (0, 0, 0))
    direct = {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Equalize": lambda: ImageOps.equalize(img),
        "Invert": lambda: ImageOps.invert(img),
        "Rotate": lambda: img.rotate(s * (m / 10.0 * 30.0), **geo),
        "Posterize": lambda: posterize(int(m / 10.0 * 4)),
        "PosterizeIncreasing": lambda: posterize(4 - int(m / 10.0 * 4)),
        "Solarize": lambda: ImageOps.solarize(img, int(m / 10.0 * 256)),
        "SolarizeIncreasing": lambda: ImageOps.solarize(img, 256 - int(m / 10.0 * 256)),
        "SolarizeAdd": lambda: img.point([min(255, v + int(m / 10.0 * 110)) if v < 128 else v
                                          for v in range(256)] * 3),
        "Color": lambda: ImageEnhance.Color(img).enhance(m / 10.0 * 1.8 + 0.1),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(m / 10.0 * 1.8 + 0.1),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(m / 10.0 * 1.8 + 0.1),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(m / 10.0 * 1.8 + 0.1),
        "ColorIncreasing": lambda: ImageEnhance.Color(img).enhance(1.0 + s * (m / 10.0 * 0.9)),
        "ContrastIncreasing": lambda: ImageEnhance.Contrast(img).enhance(1.0 + s * (m / 10.0 * 0.9)),
        "BrightnessIncreasing": lambda: ImageEnhance.Brightness(img).enhance(1.0 + s * (m / 10.0 * 0.9)),
        "SharpnessIncreasing": lambda: ImageEnhance.Sharpness(img).enhance(1.0 + s * (m / 10.0 * 0.9)),
        "ShearX": lambda: img.transform(img.size, AFFINE, (1, s * (m / 10.0 * 0.3), 0, 0, 1, 0), **geo),
        "ShearY": lambda: img.transform(img.size, AFFINE, (1, 0, 0, s * (m / 10.0 * 0.3), 1, 0), **geo),
        "TranslateXRel": lambda: img.transform(img.size, AFFINE, (1, 0, s * (m / 10.0 * 0.45) * img.size[0], 0, 1, 0),
                                               **geo),
        "TranslateYRel": lambda: img.transform(img.size, AFFINE, (1, 0, 0, 0, 1, s * (m / 10.0 * 0.45) * img.size[1]),
                                               **geo),
    }
    return direct[name]()


@pytest.fixture(scope="module")
def test_image():
    rng = np.random.default_rng(1)
    base = frame_image(77, 56, 40).astype(np.int16) + rng.integers(-30, 30, (40, 56, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", sorted(set(INCREASING_OPS) | set(DEFAULT_OPS)))
def test_each_op_matches_direct_pillow_call(test_image, name):
    for m, neg in ((7.3, False), (6.4, True), (10.0, True), (0.0, False)):
        got = np.asarray(apply_op(test_image, name, m, neg))
        want = np.asarray(_direct(name, test_image, m, neg))
        np.testing.assert_array_equal(got, want, err_msg=f"{name} m={m} neg={neg}")
    assert not np.array_equal(np.asarray(apply_op(test_image, name, 7.3, False)), np.asarray(test_image))


def test_op_argument_ranges():
    assert op_args("PosterizeIncreasing", 7) == (2,) and op_args("PosterizeIncreasing", 10.0) == (0,)
    assert op_args("SolarizeIncreasing", 7) == (256 - 179,) and op_args("SolarizeIncreasing", 0) == (256,)
    assert op_args("SolarizeAdd", 7) == (77,)
    assert op_args("Rotate", 7, True) == (-21.0,)
    assert op_args("TranslateXRel", 10, False) == (0.45,)
    assert op_args("ColorIncreasing", 10, True) == (1.0 - 0.9,)
    assert op_args("Invert", 3) == ()
    assert op_args("Posterize", 2.4) == (0,)
    with pytest.raises(JaxprvrError):
        op_args("Cutout", 5)


def test_config_parsing():
    ra = RandAugment.from_config(OFFICIAL_CONFIG)
    assert (ra.magnitude, ra.num_layers, ra.magnitude_std, ra.ops, ra.prob) == (7, 4, 0.5, INCREASING_OPS, 0.5)
    assert RandAugment.from_config("rand-m9-n3-mstd0.5").ops == DEFAULT_OPS
    assert RandAugment.from_config("rand-m7-inc0").ops == INCREASING_OPS  # the official parser tests bool("0")
    with pytest.raises(JaxprvrError):
        RandAugment.from_config("rand-m7-w0")


def test_clip_consistency(test_image):
    clip = np.stack([np.roll(np.asarray(test_image), 7 * t, axis=1) for t in range(4)])
    draws = (OpDraw("Rotate", True, 6.5, True), OpDraw("Equalize", False), OpDraw("TranslateXRel", True, 7.0, False),
             OpDraw("SolarizeAdd", True, 8.2, False), OpDraw("ContrastIncreasing", True, 7.4, True))
    out = RandAugment().apply(clip, draws)
    for t in range(4):
        img = Image.fromarray(clip[t])
        for d in draws:
            if d.applied:
                img = _direct(d.name, img, d.magnitude, d.negate)
        np.testing.assert_array_equal(out[t], np.asarray(img))
    same = np.repeat(clip[:1], 3, axis=0)
    ra = RandAugment.from_config(OFFICIAL_CONFIG)
    for seed in range(10):
        o = ra(same, np.random.default_rng(seed))
        assert (o == o[:1]).all()  # identical frames stay identical: one draw for the whole clip


def test_determinism_and_seeds(test_image):
    clip = np.stack([np.asarray(test_image)] * 2)
    ra = RandAugment.from_config(OFFICIAL_CONFIG)
    a = ra(clip, np.random.default_rng(123))
    b = ra(clip, np.random.default_rng(123))
    assert a.tobytes() == b.tobytes()
    outs = {ra(clip, np.random.default_rng(s)).tobytes() for s in range(12)}
    assert len(outs) > 6
    assert ra.sample(np.random.default_rng(9)) == ra.sample(np.random.default_rng(9))
    draws = ra.sample(np.random.default_rng(123))
    assert ra.apply(clip, draws).tobytes() == a.tobytes()
    with pytest.raises(JaxprvrError):
        ra.sample(np.random.RandomState(0))


def test_draw_distribution():
    ra = RandAugment.from_config(OFFICIAL_CONFIG)
    rng = np.random.default_rng(0)
    draws = [d for _ in range(4000) for d in ra.sample(rng)]
    assert len(draws) == 16000
    counts = np.array([sum(d.name == op for d in draws) for op in INCREASING_OPS])
    assert counts.min() > 0.85 * 16000 / 15 and counts.max() < 1.15 * 16000 / 15  # uniform, with replacement
    fired = [d for d in draws if d.applied]
    assert abs(len(fired) / len(draws) - 0.5) < 0.02
    mags = np.array([d.magnitude for d in fired])
    assert mags.min() >= 0 and mags.max() <= 10
    assert abs(mags.mean() - 7) < 0.02 and abs(mags.std() - 0.5) < 0.02
    signed = [d.negate for d in fired if d.name in SIGNED_OPS]
    assert abs(np.mean(signed) - 0.5) < 0.03
    assert not any(d.negate for d in fired if d.name not in SIGNED_OPS)


# ------------------------------------------------------------------------------------------ clips

def test_load_clip_long_video(videos):
    path = videos["h264_long.mp4"]
    clip = V.load_clip(path)
    video, mask = clip
    assert video.shape == (12, 3, 224, 224) and video.dtype == np.float32
    assert mask.dtype == np.int32 and mask.tolist() == [1] * 12 and clip.ok
    idx = V.frame_indices(400, 30000 / 1001)
    np.testing.assert_array_equal(clip.indices, idx)
    np.testing.assert_array_equal(video, V.preprocess(V.decode_frames(path, idx)))


def test_load_clip_pads_and_augments(videos):
    path = videos["mjpeg_one.avi"]
    video, mask = V.load_clip(path)
    assert mask.tolist() == [1] + [0] * 11
    assert not video[1:].any() and video[0].any()
    plain = V.preprocess(V.decode_frames(path, [0]))
    np.testing.assert_array_equal(video[0], plain[0])
    for off in (None, "none"):
        np.testing.assert_array_equal(V.load_clip(path, augment=off).video, video)
    aug = [V.load_clip(path, augment=np.random.default_rng(s)) for s in range(6)]
    assert all(a.mask.tolist() == mask.tolist() and not a.video[1:].any() for a in aug)
    assert any(not np.array_equal(a.video, video) for a in aug)
    again = V.load_clip(path, augment=np.random.default_rng(3))
    np.testing.assert_array_equal(again.video, aug[3].video)
    # augmentation runs on the native-size frames, before the resize
    frames = V.decode_frames(path, [0])
    ra = RandAugment.from_config(OFFICIAL_CONFIG)
    expect = V.preprocess(ra(frames, np.random.default_rng(4)))
    np.testing.assert_array_equal(aug[4].video[:1], expect)
    with pytest.raises(JaxprvrError):
        V.load_clip(path, augment=7)


# ------------------------------------------------------------------------------------------ bad inputs

def _bad_files(tmp_path, videos):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(videos["h264_long.mp4"].read_bytes()[:300])
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    return {"missing": tmp_path / "missing.mp4", "garbage": garbage, "truncated": truncated, "empty": empty,
            "slow": videos["slow.mp4"], "directory": tmp_path}


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated", "empty", "slow", "directory"])
def test_bad_videos(tmp_path, videos, kind):
    path = _bad_files(tmp_path, videos)[kind]
    with pytest.raises(JaxprvrError) as e:
        V.load_clip(path)
    assert str(path) in str(e.value)
    if kind == "slow":
        assert "fps" in str(e.value)
    clip = V.load_clip(path, on_bad_video="zeros")
    assert not clip.ok and isinstance(clip.error, JaxprvrError)
    assert clip.video.shape == (12, 3, 224, 224) and not clip.video.any() and not clip.mask.any()
    with pytest.raises(JaxprvrError):
        V.load_clip(path, on_bad_video="skip")


# ------------------------------------------------------------------------------------------ frame store

def test_frame_store_roundtrip(tmp_path, videos, monkeypatch):
    store = V.FrameStore(tmp_path / "cache")
    calls = []
    real = V._decode_selected
    monkeypatch.setattr(V, "_decode_selected", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    path = videos["mpeg4_portrait.avi"]
    rec = store.ensure("video7/a b", path)
    again = store.ensure("video7/a b", path)
    assert len(calls) == 1  # decoded once
    idx = V.frame_indices(40, 3.0)
    assert rec.indices.tolist() == again.indices.tolist() == idx.tolist()
    assert (rec.n_frames, rec.fps, rec.ok) == (40, 3.0, True)
    np.testing.assert_array_equal(again.frames, V.decode_frames(path, idx))  # lossless, native size
    assert again.frames.shape == (12, 98, 62, 3)
    for aug in (None, 11):
        rng = None if aug is None else np.random.default_rng(aug)
        rng2 = None if aug is None else np.random.default_rng(aug)
        a, b = store.load_clip("video7/a b", augment=rng), V.load_clip(path, augment=rng2)
        np.testing.assert_array_equal(a.video, b.video)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert "other" not in store
    with pytest.raises(JaxprvrError):
        store.get("other")
    with pytest.raises(JaxprvrError):
        V.FrameStore(tmp_path / "cache", max_frames=8)
    with pytest.raises(JaxprvrError):
        store.put("bad", tmp_path / "missing.mp4")
    bad = store.put("bad", tmp_path / "missing.mp4", on_bad_video="zeros")
    assert not bad.ok and not store.get("bad").ok
    clip = store.load_clip("bad", on_bad_video="zeros")
    assert not clip.ok and not clip.mask.any()
    with pytest.raises(JaxprvrError):
        store.load_clip("bad")


# ------------------------------------------------------------------------------------------ decord (optional)

@pytest.mark.parametrize("name", GOOD + ("rot180.mp4",))
def test_matches_decord(videos, name):
    decord = pytest.importorskip("decord")
    path = str(videos[name])
    vr = decord.VideoReader(path, ctx=decord.cpu(0))
    info = V.probe(path)
    assert len(vr) == info.n_frames and vr.get_avg_fps() == info.fps
    idx = official_indices(len(vr), vr.get_avg_fps())
    np.testing.assert_array_equal(vr.get_batch(idx).asnumpy(), V.decode_frames(path, idx))
