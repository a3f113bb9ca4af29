"""BackBone_tvr's model (``jaxprvr.models.clip_wti``) against its twin (``torch_ref.clip_wti``) on a tiny random CLIP
with perturbed biases and LayerNorms: text and video features, WTI logits, the loss and its gradients (float32 and
float64); WTI and the loss against numpy loops; the initialisation trick; the 359-key checkpoint both ways."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprvr.config import ClipWTIConfig
from jaxprvr.errors import JaxprvrError
from jaxprvr.models import clip_wti as mw
from parity import clip_wti as pw
from torch_ref import clip_wti as tw
from torch_ref.clip import tiny_clip

B, T, L = 3, 4, 12


def _perturb(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "ln_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        model.clip.logit_scale.fill_(2.0)
    return model


@pytest.fixture(scope="module")
def twin():
    clip = tiny_clip(embed_dim=64, vocab_size=500)
    return _perturb(tw.official_init(clip.state_dict(), num_hidden_layers=2)), clip


@pytest.fixture(scope="module")
def converted(twin):
    return pw.torch_to_params(ClipWTIConfig(num_hidden_layers=2, max_frames=T), twin[0].state_dict(), "twin")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    video = rng.standard_normal((B, T, 3, 64, 64)).astype(np.float32)
    vm = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.int64)
    ids, tm = np.zeros((B, L), np.int64), np.zeros((B, L), np.int64)
    for b, n in enumerate((4, 7, 12)):
        ids[b, 0], ids[b, n - 1] = 498, 499
        ids[b, 1:n - 1] = rng.integers(1, 497, n - 2)
        tm[b, :n] = 1
    return ids, tm, video, vm


def _twin_outputs(m, batch, dtype=torch.float32):
    ids, tm, video, vm = (torch.from_numpy(a) for a in batch)
    video = video.to(dtype)
    with torch.no_grad():
        tf, _ = m.get_text_feat(ids, tm)
        vf = m.get_video_feat(video, vm)
        lg, _ = m.get_similarity_logits(tf, tm, vf, vm)
    return tf.numpy(), vf.numpy(), lg.numpy()


def test_forward_matches_the_twin_float32(twin, converted, batch):
    cfg, params, _ = converted
    tf, vf, lg = _twin_outputs(twin[0], batch)
    out, aux = jax.jit(lambda p: mw.ClipWTI(cfg).apply({"params": p}, *batch, method="forward"))(params)
    np.testing.assert_allclose(np.asarray(aux["text_feat"]), tf, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["video_feat"]), vf, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["logits"]), lg, rtol=1e-5, atol=1e-6)


def test_loss_and_gradients_match_the_twin_float64(twin, converted, batch):
    m = tw.official_init(twin[1].state_dict(), num_hidden_layers=2)
    m.load_state_dict(twin[0].state_dict())
    m = m.double()
    ids, tm, video, vm = batch
    loss = m(torch.from_numpy(ids), torch.from_numpy(tm), torch.from_numpy(video).double(), torch.from_numpy(vm))
    loss.backward()
    cfg = dataclasses.replace(converted[0], precision="fp64")
    with jax.enable_x64(True):
        _, params, _ = pw.torch_to_params(cfg, {k: v.double() for k, v in m.state_dict().items()})
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)

        def f(p):
            out, _ = mw.ClipWTI(cfg).apply({"params": p}, ids, tm, video.astype(np.float64), vm, method="forward")
            return mw.symmetric_ce(out["logits"], out["logit_scale"])

        jl, jg = jax.value_and_grad(f)(p64)
        assert abs(float(jl) - float(loss)) <= 1e-12 * abs(float(loss))
        back = pw.params_to_torch(cfg, jax.tree.map(np.asarray, jg), {})
        worst, key = 0.0, ""
        for name, p in m.named_parameters():
            g = p.grad.numpy()
            d = np.linalg.norm(back[name] - g) / max(np.linalg.norm(g), 1e-300)
            d = d if np.linalg.norm(g) > 1e-12 else np.abs(back[name]).max()
            worst, key = max((worst, key), (d, name))
        assert worst < 1e-9, (worst, key)


def test_wti_against_numpy_loops():
    rng = np.random.default_rng(1)
    a, b, nt, nv, d = 3, 4, 5, 3, 6
    t = rng.standard_normal((a, nt, d))
    v = rng.standard_normal((b, nv, d))
    v[1] = -np.abs(v[1]) * np.sign(t[0, 0])  # rows whose real cosines are all negative: the max is the masked 0
    tm = (rng.random((a, nt)) < 0.7).astype(np.float64)
    tm[:, 0] = 1
    vm = (rng.random((b, nv)) < 0.6).astype(np.float64)
    vm[:, 0] = 1
    wt, wv = rng.standard_normal((a, nt)), rng.standard_normal((b, nv))
    ref = np.zeros((a, b))
    for i in range(a):
        et = np.where(tm[i] > 0, np.exp(wt[i] - wt[i][tm[i] > 0].max()), 0.0)
        et /= et.sum()
        for j in range(b):
            ev = np.where(vm[j] > 0, np.exp(wv[j] - wv[j][vm[j] > 0].max()), 0.0)
            ev /= ev.sum()
            s = np.zeros((nt, nv))
            for x in range(nt):
                for y in range(nv):
                    s[x, y] = (t[i, x] @ v[j, y] / np.linalg.norm(t[i, x]) / np.linalg.norm(v[j, y])
                               * tm[i, x] * vm[j, y])
            ref[i, j] = (sum(et[x] * s[x].max() for x in range(nt)) + sum(ev[y] * s[:, y].max()
                                                                          for y in range(nv))) / 2
    with jax.enable_x64(True):
        got = np.asarray(mw.wti_logits(jnp.asarray(t), jnp.asarray(tm), jnp.asarray(v), jnp.asarray(vm),
                                       jnp.asarray(wt), jnp.asarray(wv)))
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    # mutant: the maxima over the real entries only (masked similarities -inf instead of 0) change the pairs with
    # video 1, whose real cosines with text 0's first token are negative: the check above would catch it
    with jax.enable_x64(True):
        s = jnp.einsum("atd,bvd->abtv", jnp.asarray(t / np.linalg.norm(t, axis=-1, keepdims=True)),
                       jnp.asarray(v / np.linalg.norm(v, axis=-1, keepdims=True)))
        m = (tm[:, None, :, None] * vm[None, :, None, :]) > 0
        bad = jnp.where(m, s, -jnp.inf)
        wt_, wv_ = jax.nn.softmax(jnp.where(tm > 0, wt, -9e15), -1), jax.nn.softmax(jnp.where(vm > 0, wv, -9e15), -1)
        t2v = jnp.einsum("abt,at->ab", jnp.where(tm[:, None, :] > 0, bad.max(-1), 0.0), wt_)
        v2t = jnp.einsum("abv,bv->ab", jnp.where(vm[None, :, :] > 0, bad.max(-2), 0.0), wv_)
    assert not np.allclose(np.asarray((t2v + v2t) / 2), ref, rtol=1e-6, atol=1e-9)


def test_symmetric_ce_against_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 5))
    s = np.exp(1.3)

    def ce(m):
        m = m - m.max(axis=1, keepdims=True)
        return -np.mean(np.diag(m - np.log(np.exp(m).sum(axis=1, keepdims=True))))

    with jax.enable_x64(True):
        got = float(mw.symmetric_ce(jnp.asarray(x), jnp.asarray(1.3)))
    assert abs(got - (ce(s * x) + ce(s * x.T)) / 2) < 1e-12


def test_init_trick_copies_the_text_tower(twin):
    clip = twin[1]
    cfg = mw.with_clip_dims(ClipWTIConfig(num_hidden_layers=3), pw.torch_to_params(
        ClipWTIConfig(num_hidden_layers=2), twin[0].state_dict())[0])
    model = mw.ClipWTI(dataclasses.replace(cfg, num_hidden_layers=3))
    params = jax.jit(lambda k: model.init(k, np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32),
                                          np.zeros((1, 2, 3, 64, 64), np.float32), np.ones((1, 2), np.int32),
                                          method="forward"))(jax.random.key(0))["params"]
    from parity.clip import state_dict_to_params

    _, clip_params, _ = state_dict_to_params(clip.state_dict())
    params = dict(params, clip=clip_params)
    out = mw.init_from_clip(params, 3)
    ref = tw.official_init(clip.state_dict(), num_hidden_layers=3)
    sd = ref.state_dict()
    np.testing.assert_array_equal(out["frame_position_embeddings"]["embedding"],
                                  sd["frame_position_embeddings.weight"].numpy())
    for i in (0, 1):  # CLIP's text tower has 2 blocks: blocks 0 and 1 copied
        np.testing.assert_array_equal(out["transformerClip"][f"resblocks_{i}"]["c_fc"]["kernel"],
                                      sd[f"transformerClip.resblocks.{i}.mlp.c_fc.weight"].numpy().T)
    # block 2 keeps its init (BERT-style: zero biases, unit LayerNorm)
    assert np.array_equal(out["transformerClip"]["resblocks_2"]["ln_1"]["scale"], np.ones(64))
    assert np.array_equal(sd["transformerClip.resblocks.2.ln_1.weight"].numpy(), np.ones(64))


def test_checkpoint_both_ways_fp16_and_errors(twin):
    m = twin[0]
    sd = {k: (v.half() if k.startswith("clip.") and k != "clip.logit_scale" else v) for k, v in
          m.state_dict().items()}
    sd = {f"module.{k}": v for k, v in sd.items()}  # a DDP save
    cfg, params, dtypes = pw.torch_to_params(ClipWTIConfig(num_hidden_layers=2), sd)
    back = pw.params_to_torch(cfg, params, dtypes)
    assert list(back) == list(m.state_dict()) and len(back) == len(tw.backbone_keys(
        {**__import__("torch_ref.clip", fromlist=["dims_of"]).dims_of(m.clip.state_dict())}, num_hidden_layers=2))
    for k, v in sd.items():
        assert back[k[7:]].dtype == v.numpy().dtype and np.array_equal(back[k[7:]], v.numpy()), k
    bad = dict(m.state_dict())
    bad.pop("video_weight_fc.2.bias")
    with pytest.raises(JaxprvrError, match="video_weight_fc.2.bias"):
        pw.torch_to_params(ClipWTIConfig(num_hidden_layers=2), bad, "ckpt.bin")
    with pytest.raises(JaxprvrError, match="transformerClip.resblocks.2"):  # 2 blocks saved, 3 configured
        pw.torch_to_params(ClipWTIConfig(num_hidden_layers=3), m.state_dict(), "ckpt.bin")


def test_official_b32_key_count():
    dims = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
    keys = tw.backbone_keys(dims)
    assert len(keys) == 359
    assert [e.torch for e in pw.make_table(ClipWTIConfig())] == keys


def test_padded_frames_mask_is_caught(twin, converted, batch):
    """Mutant: seqTransf without the key mask: the videos with padded frames (1 and 2) move; the full one too
    (it attends to nothing padded, so it stays) -- the comparison fails."""
    cfg, params, _ = converted
    _, vf, _ = _twin_outputs(twin[0], batch)
    orig = mw.ClipWTI.aggregate

    def no_mask(self, frames, video_mask):
        return orig(self, frames, jnp.ones_like(video_mask))

    mw.ClipWTI.aggregate = no_mask
    try:
        _, aux = jax.jit(lambda p: mw.ClipWTI(cfg).apply({"params": p}, *batch, method="forward"))(params)
    finally:
        mw.ClipWTI.aggregate = orig
    got = np.asarray(aux["video_feat"])
    assert not np.allclose(got[1], vf[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[0], vf[0], rtol=1e-4, atol=1e-5)
