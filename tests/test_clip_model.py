"""The Flax CLIP (``jaxprvr.models.clip``) against OpenAI's own code (``clip/model.py`` of the ``clip-anytorch``
wheel, whose ViT path is openai/CLIP's at 77 tokens) and against the twin (``torch_ref.clip``, BackBone_tvr's
``module_clip.py``) on a tiny random CLIP with every bias and LayerNorm perturbed; the OpenAI key table both ways,
the torch-free reading of TorchScript archives and fp16 state dicts, and the size inference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprvr.data.torch_pt import read_state_dict
from jaxprvr.errors import JaxprvrError
from jaxprvr.models.clip import CLIP, CLIPDims, TextTower
from parity import clip as pc
from tests.openai_clip import openai_clip_module, random_clip_inputs
from torch_ref import clip as tc

DIMS = dict(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=128, vision_patch_size=16,
            context_length=77, vocab_size=500, transformer_width=64, transformer_heads=1, transformer_layers=2)


def openai_model_module():
    """openai/CLIP's ``clip/model.py`` as shipped in the ``clip-anytorch`` wheel (:mod:`tests.openai_clip`)."""
    return openai_clip_module("model")


def perturb(model, seed=1):
    """Random biases and LayerNorm scales/shifts (the official init leaves them 0 / 1: a swapped or dropped one
    would go unseen) and a non-trivial logit scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        model.logit_scale.fill_(2.5)
    return model


@pytest.fixture(scope="module")
def openai():
    mod = openai_model_module()
    torch.manual_seed(0)
    return mod, perturb(mod.CLIP(**DIMS).eval())


@pytest.fixture(scope="module")
def inputs():
    return random_clip_inputs(3)


@pytest.fixture(scope="module")
def converted(openai):
    _, m = openai
    return pc.state_dict_to_params(m.state_dict(), "openai tiny")


def _apply(dims, params, method, x, dtype=np.float32):
    model = CLIP(dims)
    fn = jax.jit(lambda p, a: model.apply({"params": p}, a, method=method))
    return jax.tree.map(np.asarray, fn(jax.tree.map(lambda a: jnp.asarray(a, dtype), params), x))


def test_sizes_from_the_weights(openai, converted):
    dims, _, dtypes = converted
    assert dims == CLIPDims(embed_dim=32, image_resolution=64, vision_layers=2, vision_width=128,
                            vision_patch_size=16, context_length=77, vocab_size=500, text_width=64, text_layers=2)
    assert (dims.v_heads, dims.t_heads, dims.grid) == (2, 1, 4)
    assert len(dtypes) == len(openai[1].state_dict())


def test_image_tower_matches_openai_and_the_twin(openai, converted, inputs):
    _, m = openai
    dims, params, _ = converted
    pixels, _ = inputs
    out = _apply(dims, params, CLIP.encode_image, pixels)
    with torch.no_grad():
        ref = m.encode_image(torch.from_numpy(pixels)).numpy()
        twin = tc.CLIP(**DIMS)
        twin.load_state_dict(m.state_dict())
        _, tokens = twin.encode_image(torch.from_numpy(pixels), return_hidden=True)
    np.testing.assert_allclose(out["embeds"], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["tokens"], tokens.numpy(), rtol=1e-4, atol=1e-5)
    assert out["tokens"].shape == (3, 17, 32)


def test_text_tower_matches_openai_at_77_and_the_twin_at_32(openai, converted, inputs):
    _, m = openai
    dims, params, _ = converted
    _, ids = inputs
    with torch.no_grad():
        ref77 = m.encode_text(torch.from_numpy(ids)).numpy()
        twin = tc.CLIP(**DIMS)
        twin.load_state_dict(m.state_dict())
        eot, pre, tokens = twin.encode_text_hidden(torch.from_numpy(ids[:, :32]))
    out77 = _apply(dims, params, CLIP.encode_text, ids.astype(np.int32))
    out32 = _apply(dims, params, CLIP.encode_text, ids[:, :32].astype(np.int32))
    np.testing.assert_allclose(out77["embeds"], ref77, rtol=1e-4, atol=1e-5)
    # causality: the EOT feature at L = 32 (BackBone_tvr's max_words) is OpenAI's at 77, up to rounding
    np.testing.assert_allclose(out32["embeds"], ref77, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out32["hidden"], pre.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out32["tokens"], tokens.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out32["embeds"], eot.numpy(), rtol=1e-4, atol=1e-5)


def test_text_tower_runs_alone_on_the_text_params(converted, inputs):
    dims, params, _ = converted
    _, ids = inputs
    both = _apply(dims, params, CLIP.encode_text, ids[:, :32].astype(np.int32))
    alone = jax.jit(lambda p, a: TextTower(dims).apply({"params": p}, a))(params["text"], ids[:, :32])
    for k in ("embeds", "hidden", "tokens"):
        np.testing.assert_array_equal(np.asarray(alone[k]), both[k])


def test_zero_shot_logits_match_openai(openai, converted, inputs):
    _, m = openai
    dims, params, _ = converted
    pixels, ids = inputs
    with torch.no_grad():
        li, lt = m(torch.from_numpy(pixels), torch.from_numpy(ids))
    out, _ = jax.jit(lambda p: CLIP(dims).apply({"params": p}, pixels, ids))(params)
    np.testing.assert_allclose(np.asarray(out["logits_per_image"]), li.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["logits_per_text"]), lt.numpy(), rtol=1e-4, atol=1e-4)


def test_float64_matches_the_twin_to_1e9(openai, inputs):
    """Both in float64 (the twin's LayerNorm keeps float64; OpenAI's casts to float32, so the twin is the
    float64 reference)."""
    _, m = openai
    pixels, ids = inputs
    twin = tc.CLIP(**DIMS).double()
    twin.load_state_dict(m.state_dict())
    with torch.no_grad():
        img, img_tokens = twin.encode_image(torch.from_numpy(pixels).double(), return_hidden=True)
        eot, pre, tokens = twin.encode_text_hidden(torch.from_numpy(ids[:, :32]))
    with jax.enable_x64(True):
        dims, params, _ = pc.state_dict_to_params({k: v.double() for k, v in twin.state_dict().items()})
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        model = CLIP(dims, precision="fp64")
        oi = model.apply({"params": p64}, pixels.astype(np.float64), method=CLIP.encode_image)
        ot = model.apply({"params": p64}, ids[:, :32], method=CLIP.encode_text)
        assert oi["embeds"].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(oi["embeds"]), img.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(np.asarray(oi["tokens"]), img_tokens.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(np.asarray(ot["hidden"]), pre.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(np.asarray(ot["tokens"]), tokens.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(np.asarray(ot["embeds"]), eot.numpy(), rtol=1e-9, atol=1e-11)


def test_a_transposed_in_proj_is_caught(openai, converted, inputs):
    """Mutant: the fused in_proj converted without its transpose-by-blocks (q/k/v rows read as columns) -- the
    outputs move far outside the tolerance (the check can fail)."""
    _, m = openai
    dims, params, _ = converted
    pixels, _ = inputs
    bad = jax.tree.map(lambda a: a, params)
    k = bad["visual"]["transformer"]["resblocks_0"]["in_proj"]["kernel"]
    bad["visual"]["transformer"]["resblocks_0"]["in_proj"]["kernel"] = k.reshape(3, 128, 128).transpose(
        0, 2, 1).reshape(128, 384)
    out = _apply(dims, bad, CLIP.encode_image, pixels)
    with torch.no_grad():
        ref = m.encode_image(torch.from_numpy(pixels)).numpy()
    assert not np.allclose(out["embeds"], ref, rtol=1e-4, atol=1e-5)
    nan = jax.tree.map(lambda a: a, params)
    nan["visual"]["ln_post"]["bias"] = nan["visual"]["ln_post"]["bias"].copy()
    nan["visual"]["ln_post"]["bias"][0] = np.nan
    out = _apply(dims, nan, CLIP.encode_image, pixels)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(out["embeds"], ref, rtol=1e-4, atol=1e-5)


def test_round_trip_keeps_keys_order_and_fp16(openai, tmp_path):
    _, m = openai
    sd16 = {k: v.half() for k, v in m.state_dict().items()}
    sd16["logit_scale"] = sd16["logit_scale"].float()  # convert_weights leaves it float32
    torch.save(sd16, tmp_path / "sd16.pt")
    dims, params, dtypes = pc.load_clip_weights(tmp_path / "sd16.pt")
    back = pc.params_to_state_dict(dims, params, dtypes)
    assert list(back) == list(m.state_dict())
    for k, v in sd16.items():
        assert back[k].dtype == v.numpy().dtype and np.array_equal(back[k], v.numpy()), k
    # through a clip2jax directory too
    pc.save_clip_dir(tmp_path / "dir", dims, params, dtypes, "sd16.pt")
    d2, p2, t2 = pc.load_clip_weights(tmp_path / "dir")
    back2 = pc.params_to_state_dict(d2, p2, t2)
    assert d2 == dims and all(np.array_equal(back2[k], back[k]) for k in back)


def test_torchscript_archive_is_read_without_torch(openai, tmp_path, inputs):
    """A TorchScript archive (``torch.jit.trace`` + ``save``, OpenAI's distribution format) with the three scalar
    entries OpenAI's archives carry: the restricted reader gives ``torch.jit.load(...).state_dict()``."""
    _, m = openai
    pixels, ids = inputs

    class WithScalars(torch.nn.Module):  # OpenAI's JIT CLIP carries input_resolution etc. as attributes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("input_resolution", torch.tensor(64))
            self.register_buffer("context_length", torch.tensor(77))
            self.register_buffer("vocab_size", torch.tensor(500))

        def forward(self, image, text):
            return self.inner(image, text)

    traced = torch.jit.trace(m, (torch.from_numpy(pixels), torch.from_numpy(ids)))
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    ours = read_state_dict(tmp_path / "ViT-tiny.pt")
    ref = torch.jit.load(str(tmp_path / "ViT-tiny.pt")).state_dict()
    assert list(ours) == list(ref) and all(np.array_equal(ours[k], ref[k].numpy()) for k in ref)
    # with the scalar entries, as a flat state dict under no prefix
    w = WithScalars(m)
    sd = {k.replace("inner.", ""): v for k, v in w.state_dict().items()}
    torch.save(sd, tmp_path / "scalars.pt")
    dims, params, dtypes = pc.load_clip_weights(tmp_path / "scalars.pt")
    assert "input_resolution" not in dtypes and dims.image_resolution == 64


def test_bad_files_give_one_error(openai, tmp_path):
    _, m = openai
    sd = dict(m.state_dict())
    sd.pop("visual.ln_post.bias")
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(JaxprvrError, match=r"missing.pt.*visual.ln_post.bias"):
        pc.load_clip_weights(tmp_path / "missing.pt")
    sd = dict(m.state_dict())
    sd["visual.proj"] = sd["visual.proj"].t().contiguous()
    torch.save(sd, tmp_path / "transposed.pt")
    with pytest.raises(JaxprvrError, match="transposed.pt.*visual/proj"):
        pc.load_clip_weights(tmp_path / "transposed.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"a": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(JaxprvrError, match=r"names (__builtin__|builtins)\.print"):
        read_state_dict(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(JaxprvrError, match="junk.pt"):
        read_state_dict(tmp_path / "junk.pt")


def test_key_table_is_the_twin_state_dict_order():
    twin = tc.tiny_clip(vision_layers=3, transformer_layers=2)
    dims = CLIPDims(embed_dim=32, image_resolution=64, vision_layers=3, vision_width=128, vision_patch_size=16,
                    text_width=64, text_layers=2)
    assert [e.torch for e in pc.clip_table(dims)] == list(twin.state_dict())
    b32 = pc.clip_table(CLIPDims())
    assert len(b32) == 302  # OpenAI ViT-B/32: 302 tensors


def test_float64_matches_openai_code_to_1e9(openai, inputs, monkeypatch):
    """openai/CLIP's own model.py in float64 -- with its LayerNorm's float32 cast removed (the only float32 step:
    ``LayerNorm.forward`` casts to float32 and back) -- against the Flax CLIP at fp64: 1e-9."""
    mod, m = openai
    monkeypatch.setattr(mod.LayerNorm, "forward", torch.nn.LayerNorm.forward)
    m64 = mod.CLIP(**DIMS).double().eval()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    pixels, ids = inputs
    with torch.no_grad():
        img = m64.encode_image(torch.from_numpy(pixels).double()).numpy()
        txt = m64.encode_text(torch.from_numpy(ids)).numpy()
    with jax.enable_x64(True):
        dims, params, _ = pc.state_dict_to_params(m64.state_dict(), dtype=np.float64)
        model = CLIP(dims, precision="fp64")
        oi = model.apply({"params": params}, pixels.astype(np.float64), method=CLIP.encode_image)
        ot = model.apply({"params": params}, ids, method=CLIP.encode_text)
        np.testing.assert_allclose(np.asarray(oi["embeds"]), img, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(np.asarray(ot["embeds"]), txt, rtol=1e-9, atol=1e-11)
