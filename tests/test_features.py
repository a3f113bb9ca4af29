"""python -m jaxprvr.features: the ``clip`` arrays command against OpenAI's own ``clip/model.py`` (eager fp32) and the
twin (``torch_ref.clip``), from a ``torch.save``-d state dict, a TorchScript archive and a clip2jax folder; the
``videos`` command on synthetic PyAV videos against the twin on the same preprocessed frames, resume, bad videos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("av")
h5py = pytest.importorskip("h5py")

from jaxprvr import features as F  # noqa: E402
from jaxprvr.data import video as V  # noqa: E402
from parity import clip as pc  # noqa: E402
from tests.openai_clip import random_clip_inputs  # noqa: E402
from tests.test_clip_model import openai_model_module, perturb  # noqa: E402
from tests.test_video import write_video  # noqa: E402
from torch_ref import clip as tc  # noqa: E402

DIMS = dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=16,
            context_length=77, vocab_size=500, transformer_width=64, transformer_heads=1, transformer_layers=2)
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def twin():
    return perturb(tc.tiny_clip(seed=0, vocab_size=500))


@pytest.fixture(scope="module")
def weights(twin, tmp_path_factory):
    """The same tiny CLIP as a state dict, a TorchScript archive and a clip2jax folder."""
    root = tmp_path_factory.mktemp("clip")
    torch.save(twin.state_dict(), root / "sd.pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        traced = torch.jit.trace(twin, (torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long)))
    traced.save(str(root / "jit.pt"))
    dims, params, dtypes = pc.load_clip_weights(root / "sd.pt")
    pc.save_clip_dir(root / "dir", dims, params, dtypes, "sd.pt")
    return {"sd": root / "sd.pt", "jit": root / "jit.pt", "dir": root / "dir"}


@pytest.fixture(scope="module")
def arrays():
    return random_clip_inputs(5)


@pytest.fixture(scope="module")
def references(twin, arrays):
    """OpenAI's model.py (the same weights) for the embeddings; the twin for tokens and hidden states."""
    pixels, ids = arrays
    openai = openai_model_module().CLIP(**DIMS).eval()
    openai.load_state_dict(twin.state_dict())
    x, t = torch.from_numpy(pixels), torch.from_numpy(ids)
    with torch.no_grad():
        ref = {"image_embeds": openai.encode_image(x).numpy(), "text_embeds": openai.encode_text(t).numpy()}
        _, tokens = twin.encode_image(x, return_hidden=True)
        ref["image_tokens"] = tokens.numpy()
        for n in (77, 32):
            eot, pre, tok = twin.encode_text_hidden(t[:, :n])
            ref[f"text_hidden_{n}"], ref[f"text_tokens_{n}"], ref[f"text_eot_{n}"] = pre.numpy(), tok.numpy(), eot
    return ref


def run_cli(capsys, *argv):
    rc = F.main([*map(str, argv), "--no-progress"])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else None), cap.err


# ------------------------------------------------------------------------------------------------ clip

def test_clip_arrays_state_dict_and_torchscript(tmp_path, capsys, weights, arrays, references):
    pixels, ids = arrays
    np.savez(tmp_path / "in.npz", pixel_values=pixels, input_ids=ids)
    outs = {}
    for kind in ("sd", "jit"):
        rc, res, err = run_cli(capsys, "clip", "--clip", weights[kind], "--inputs", tmp_path / "in.npz", "--out",
                               tmp_path / f"{kind}.npz", "--batch-size", 2)
        assert rc == 0, err
        assert res["n_images"] == 5 and res["n_texts"] == 3 and res["batch_size"] == 2
        with np.load(tmp_path / f"{kind}.npz") as z:
            outs[kind] = {k: z[k] for k in z.files}
    out = outs["sd"]
    assert {k: v.shape for k, v in out.items()} == {
        "image_embeds": (5, 32), "image_tokens": (5, 17, 32), "text_embeds": (3, 32), "text_hidden": (3, 77, 64),
        "text_tokens": (3, 77, 32)}
    assert all(v.dtype == np.float32 for v in out.values())
    np.testing.assert_allclose(out["image_embeds"], references["image_embeds"], **TOL)
    np.testing.assert_allclose(out["text_embeds"], references["text_embeds"], **TOL)
    np.testing.assert_allclose(out["image_tokens"], references["image_tokens"], **TOL)
    np.testing.assert_allclose(out["text_hidden"], references["text_hidden_77"], **TOL)
    np.testing.assert_allclose(out["text_tokens"], references["text_tokens_77"], **TOL)
    for k in out:  # the TorchScript archive holds the same weights
        np.testing.assert_array_equal(outs["jit"][k], out[k])


def test_clip_arrays_from_a_clip2jax_dir_and_short_ids(tmp_path, capsys, weights, arrays, references):
    pixels, ids = arrays
    np.savez(tmp_path / "in.npz", pixel_values=pixels[:3], input_ids=ids[:, :32].astype(np.int32), other=np.ones(2))
    rc, res, err = run_cli(capsys, "clip", "--clip", weights["dir"], "--inputs", tmp_path / "in.npz", "--out",
                           tmp_path / "out.npz", "--batch-size", 4)
    assert rc == 0, err
    assert res["ignored"] == ["other"] and res["arrays"]["text_hidden"] == [3, 32, 64]
    with np.load(tmp_path / "out.npz") as z:
        out = {k: z[k] for k in z.files}
    np.testing.assert_allclose(out["image_embeds"], references["image_embeds"][:3], **TOL)
    np.testing.assert_allclose(out["image_tokens"], references["image_tokens"][:3], **TOL)
    np.testing.assert_allclose(out["text_embeds"], references["text_embeds"], **TOL)  # causality: 32 == 77
    np.testing.assert_allclose(out["text_hidden"], references["text_hidden_32"], **TOL)
    np.testing.assert_allclose(out["text_tokens"], references["text_tokens_32"], **TOL)
    # bf16 runs and stays near float32 (texts only: one more compilation)
    np.savez(tmp_path / "ids.npz", input_ids=ids[:, :32])
    rc, res, err = run_cli(capsys, "clip", "--clip", weights["dir"], "--inputs", tmp_path / "ids.npz", "--out",
                           tmp_path / "bf16.npz", "--batch-size", 4, "--precision", "bf16")
    assert rc == 0, err
    with np.load(tmp_path / "bf16.npz") as z:
        assert set(z.files) == {"text_embeds", "text_hidden", "text_tokens"}
        np.testing.assert_allclose(z["text_embeds"], out["text_embeds"], atol=0.1)


def test_clip_bad_inputs_are_one_line(tmp_path, capsys, weights, arrays):
    pixels, ids = arrays
    cases = {
        "px": dict(pixel_values=pixels[:, :, :32, :32]),
        "ids": dict(input_ids=np.full((2, 5), 600)),
        "long": dict(input_ids=np.zeros((2, 78), np.int64)),
        "none": dict(x=np.zeros(3)),
    }
    for name, content in cases.items():
        np.savez(tmp_path / f"{name}.npz", **content)
        rc, _, err = run_cli(capsys, "clip", "--clip", weights["sd"], "--inputs", tmp_path / f"{name}.npz", "--out",
                             tmp_path / "o.npz")
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and f"{name}.npz" in err, err
    rc, _, err = run_cli(capsys, "clip", "--clip", tmp_path / "missing.pt", "--inputs", tmp_path / "px.npz",
                         "--out", tmp_path / "o.npz")
    assert rc == 2 and "missing.pt" in err and err.count("\n") == 1
    assert not (tmp_path / "o.npz").exists()


def test_help_runs_without_jax():
    r = subprocess.run([sys.executable, "-c", "import sys, jaxprvr.features as f; f.build_parser();"
                        "print('jax' in sys.modules)"], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
    r = subprocess.run([sys.executable, "-m", "jaxprvr.features", "videos", "--help"], capture_output=True, text=True,
                       check=True)
    assert "no 12-frame cap" in " ".join(r.stdout.split())


# ------------------------------------------------------------------------------------------------ videos

# name: (frames, width, height, rate, codec, pix_fmt); sampled at 2 frames/s
VIDEOS = {"a.mp4": (50, 96, 64, 25, "libx264", "yuv420p"),   # stride round(12.5) = 12 -> 5 frames
          "b.avi": (30, 80, 60, 10, "mpeg4", "yuv420p"),     # stride 5 -> 6 frames
          "c.mp4": (12, 64, 48, 3, "libx264", "yuv420p")}    # stride round(1.5) = 2 -> 6 frames
FPS = 2.0


def expected_indices(name):
    n, _, _, rate, _, _ = VIDEOS[name]
    return list(range(0, n, int(round(rate / FPS))))


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for name, spec in VIDEOS.items():
        write_video(root / name, *spec)
    (root / "notes.txt").write_text("not a video")
    return root


def test_sample_indices_are_the_official_rule_without_cap():
    for n, rate, f in ((400, 29.97, 1), (50, 25, 2), (7, 3, 1), (100, 30, 0.5)):
        np.testing.assert_array_equal(F.sample_indices(n, rate, f), np.arange(0, n, int(round(rate / f))))
        if float(f).is_integer():  # video.py's rule with a cap above the count
            np.testing.assert_array_equal(F.sample_indices(n, rate, f), V.frame_indices(n, rate, n, f))
    with pytest.raises(F.JaxprvrError, match="stride"):
        F.sample_indices(10, 0.9, 2)


def test_videos_match_the_twin_and_resume(tmp_path, capsys, weights, twin, video_dir):
    out = tmp_path / "clip_image.hdf5"
    args = ("videos", "--clip", weights["sd"], "--videos", video_dir, "--fps", FPS, "--out", out, "--batch-size", 4)
    rc, res, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert (res["videos"], res["written"], res["skipped_existing"], res["bad"], res["frames"]) == (3, 3, 0, 0, 17)
    with h5py.File(out, "r") as f:
        assert sorted(f.keys()) == ["a", "b", "c"]
        assert json.loads(f.attrs["jaxprvr_features"])["fps"] == FPS
        got = {k: f[k][()] for k in f}
        for name in VIDEOS:
            vid = name.split(".")[0]
            idx = expected_indices(name)
            assert got[vid].shape == (len(idx), 32) and got[vid].dtype == np.float32
            np.testing.assert_array_equal(f[vid].attrs["frame_indices"], idx)
            frames = V.preprocess(V.decode_frames(video_dir / name, idx), 64)
            with torch.no_grad():
                ref = twin.encode_image(torch.from_numpy(frames)).numpy()
            np.testing.assert_allclose(got[vid], ref, **TOL)
    # resume: finished ids are skipped; a lost one and one cut short (no frame_indices) are written again
    with h5py.File(out, "a") as f:
        del f["c"]
        data = f["b"][()]
        del f["b"]
        f.create_dataset("b", data=np.zeros_like(data))
    rc, res, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert (res["written"], res["skipped_existing"], res["rewritten_incomplete"], res["frames"]) == (2, 1, 1, 12)
    with h5py.File(out, "r") as f:
        for k in got:
            np.testing.assert_array_equal(f[k][()], got[k])
    rc, res, err = run_cli(capsys, *args)
    assert (res["written"], res["skipped_existing"]) == (0, 3)
    # other settings on the same file: one error
    rc, _, err = run_cli(capsys, *args[:6], 1.0, *args[7:])
    assert rc == 2 and "clip_image.hdf5" in err and err.count("\n") == 1


def test_bad_video_error_or_skip(tmp_path, capsys, weights, video_dir):
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(video_dir / "a.mp4", d / "a.mp4")
    shutil.copy(video_dir / "c.mp4", d / "c.mp4")
    (d / "b_bad.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    base = ("videos", "--clip", weights["dir"], "--videos", d, "--fps", FPS, "--batch-size", 4)
    rc, _, err = run_cli(capsys, *base, "--out", tmp_path / "err.hdf5")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "b_bad.mp4" in err, err
    with h5py.File(tmp_path / "err.hdf5", "r") as f:
        assert list(f.keys()) == ["a"] and f["a"].shape == (5, 32)  # the video before it was kept
    rc, res, err = run_cli(capsys, *base, "--out", tmp_path / "skip.hdf5", "--on-bad-video", "skip")
    assert rc == 0, err
    assert (res["written"], res["bad"], res["datasets"]) == (2, 1, 2)
    assert res["bad_videos"][0]["id"] == "b_bad" and "b_bad.mp4" in res["bad_videos"][0]["error"]
    with h5py.File(tmp_path / "skip.hdf5", "r") as f:
        assert sorted(f.keys()) == ["a", "c"] and f["c"].shape == (6, 32)
    # the error run's file is completed by a skip run: 'a' is not encoded again
    rc, res, _ = run_cli(capsys, *base, "--out", tmp_path / "err.hdf5", "--on-bad-video", "skip")
    assert (res["written"], res["skipped_existing"], res["bad"]) == (1, 1, 1)


def test_videos_sharded_over_two_devices(tmp_path, weights, video_dir):
    """Two simulated CPU devices (a subprocess): the frame batch (3, rounded up to 4) split over the data mesh;
    the same numbers as one device (in this process)."""
    one = F.extract_videos(weights["jit"], video_dir, FPS, tmp_path / "1.hdf5", batch_size=3, progress=False)
    assert (one["devices"], one["batch_size"], one["written"]) == (1, 3, 3)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "jaxprvr.features", "videos", "--clip", str(weights["jit"]),
                        "--videos", str(video_dir), "--fps", str(FPS), "--out", str(tmp_path / "2.hdf5"),
                        "--batch-size", "3", "--no-progress", "--no-compile-cache"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    two = json.loads(r.stdout)
    assert (two["devices"], two["batch_size"], two["written"], two["frames"]) == (2, 4, 3, 17)
    with h5py.File(tmp_path / "1.hdf5", "r") as f1, h5py.File(tmp_path / "2.hdf5", "r") as f2:
        assert sorted(f1) == sorted(f2) == ["a", "b", "c"]
        for k in f1:
            np.testing.assert_allclose(f2[k][()], f1[k][()], rtol=1e-6, atol=1e-6)
