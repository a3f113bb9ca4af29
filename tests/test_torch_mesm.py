"""torch_ref.mesm / torch_ref.mesm_loss (the MESM twin) against independent references: the official key counts
(273 / 289, vmr.md B7) and a hand-written per-module key rule, numpy transcriptions of the head-major T2V mask,
of the T2V layer (post-norm quirk), of the decoder's custom attention, of the sine embeddings and of
inverse_sigmoid, scipy / brute-force matchings, numpy formulas of every loss term and of the AdamW + clip step,
transcriptions of the official samplers (torch.randperm / np.random.choice call order), and structural facts
(global token key-masked, reference appended before detach, query_scale skipped at layer 0). Every equality check
has a planted-bug mutant that fails it, and NaN never passes. Tiny widths (hidden 16, 2 heads), float64. The
comparison with the official code itself is a scratch script outside the repo (see the report)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from jaxprvr.config import MESMConfig, MESMLossConfig
from jaxprvr.errors import JaxprvrError
from torch_ref import dropout as TD
from torch_ref import mesm as TM
from torch_ref import mesm_loss as TL

TINY = dict(hidden_dim=16, nheads=2, dim_feedforward=32, v_feat_dim=10, t_feat_dim=12, vocab_size=20,
            max_words_l=6, max_video_l=12, num_queries=5, num_recss_layers=1, num_recfw_layers=1, t2v_layers=1,
            enc_layers=1)  # dec_layers 2: one aux output
NC = [2, 1, 2]  # rows per item
R = sum(NC)


def close(a, b, tol=1e-12):
    """Float64 equality at ``tol`` (relative to max(1, |b|)); NaN or a shape change never passes."""
    a = np.asarray(a.detach().cpu() if torch.is_tensor(a) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if torch.is_tensor(b) else b, dtype=np.float64)
    if a.shape != b.shape or not np.isfinite(a).all() or not np.isfinite(b).all():
        return False
    return bool(np.all(np.abs(a - b) <= tol * np.maximum(1.0, np.abs(b))))


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = TM.build_mesm(MESMConfig(**{**TINY, **kw}), MESMLossConfig()).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # no zero weights left (learned tokens, biases) that could hide a bug
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def tiny_batch(seed=0, qvh=False, words=TINY["max_words_l"], tdim=TINY["t_feat_dim"]):
    """An official collate dict: 3 items, rows of an item share the video (QVH: own windows), CLIP-style words."""
    rng = np.random.RandomState(seed)
    vlen = [7, 7, 9, 5, 5] if not qvh else [7, 8, 9, 5, 6]
    lmax = max(vlen)
    vm = np.zeros((R, lmax), bool)
    for i, l in enumerate(vlen):
        vm[i, :l] = True
    vf = rng.randn(R, lmax, TINY["v_feat_dim"] + 2) * vm[..., None]
    if not qvh:
        vf[1], vf[4] = vf[0], vf[3]
    wl = [6, 3, 5, 4, 3]
    wm = np.zeros((R, words), bool)
    for i, l in enumerate(wl):
        wm[i, :l] = True
    ww = np.where(wm, rng.randint(1, 3, (R, words)), 0)
    ww[:, 0] = 0
    ww[np.arange(R), np.array(wl) - 1] = 0
    cm = np.zeros((R, lmax), bool)
    mom = np.array([[0.1, 0.5], [0.1, 0.52], [0.2, 0.9], [0.3, 0.6], [0.0, 0.4]])
    for i, l in enumerate(vlen):
        cm[i, int(mom[i, 0] * l):max(int(mom[i, 1] * l), int(mom[i, 0] * l) + 1)] = True
    b = dict(video_feat=vf, video_mask=vm, words_id=wm.astype(np.int64) * 7, words_mask=wm, words_weight=ww,
             num_clips=np.array(NC), unknown_mask=wm & (rng.rand(R, words) < 0.3),
             words_label=rng.randint(0, TINY["vocab_size"] + 3, (R, words)), clip_mask=cm,
             pos_idx=np.stack([np.where(c)[0][[0, -1]] for c in cm]),
             neg_idx=np.stack([np.where(~c & v)[0][:2] for c, v in zip(cm, vm)]))
    if qvh:
        wins = [mom[i:i + 1] if i % 2 else np.stack([mom[i], mom[i] * 0.5 + 0.4]) for i in range(R)]
        b["norm_moment"] = [{"moments": torch.tensor(w)} for w in wins]
        b["norm_span"] = [{"spans": TL.span_xx_to_cxw(torch.tensor(w))} for w in wins]
        b["saliency_label"] = cm * rng.randint(1, 13, cm.shape).astype(np.float64)
    else:
        b["norm_moment"] = mom
        b["norm_span"] = TL.span_xx_to_cxw(torch.tensor(mom)).numpy()
    feats = rng.randn(R, words, tdim)
    return b, torch.tensor(feats)


# ---------------------------------------------------------------------------------------------- keys


OFFICIAL = {  # config -> (key count of vmr.md B7, MESMConfig overrides at the official structure)
    "charades_CSF": (273, {}),
    "charades_VGG_gloveplk": (273, dict(tokenizer_type="GloVeNLTK", load_vocab_pkl=True)),
    "tacos_C3D_GloVe": (289, dict(tokenizer_type="GloVeNLTK", share_MLP=False)),
    "qvh_CSF": (273, {}),
}


def hand_count(two_mlp: bool) -> int:
    """273 from the module rule: T2V layer 13 keys (+8 TwoMLP), encoder layer 13, decoder layer 35 (+2 for
    ca_qpos_proj in layer 0), decoder heads 20, MESM's own 49, SS-MESM 1 + 4x13 + 8."""
    t2v = 13 + (8 if two_mlp else 0)
    transformer = 2 * 13 + (37 + 35) + 20
    top = 4 + 3 + 6 + 3 + 16 + 4 + 6  # tokens, txt pos table, span_embed, class+query, input projs, saliency, MLM
    ss = 1 + 4 * 13 + 8
    return 2 * t2v + 2 * 13 + transformer + top + ss


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_state_keys_official_counts(name):
    n, kw = OFFICIAL[name]
    cfg = MESMConfig(**{**TINY, "num_queries": 10, "num_recss_layers": 4, "num_recfw_layers": 2, "t2v_layers": 2,
                        "enc_layers": 2, **kw})
    torch.manual_seed(0)
    keys = list(TM.build_mesm(cfg).state_dict())
    assert len(keys) == n == hand_count(not cfg.share_MLP) == len(set(keys))
    assert set(keys) == set(TM.official_state_keys(cfg))
    assert not any(k.startswith("text_encoder.") for k in keys)
    assert "transformer.decoder.layers.0.ca_qpos_proj.weight" in keys
    assert "transformer.decoder.layers.1.ca_qpos_proj.weight" not in keys


def test_state_keys_mutant_and_strict_roundtrip():
    cfg = MESMConfig(**TINY)
    m = tiny_model(0)
    m.transformer.decoder.layers[1].ca_qpos_proj = nn.Linear(16, 16)  # the planted bug: keep_query_pos
    assert set(m.state_dict()) != set(TM.official_state_keys(cfg))
    a, b2 = tiny_model(1), tiny_model(2)
    b2.load_state_dict(a.state_dict(), strict=True)
    batch, wf = tiny_batch()
    oa = a.eval()(batch, words_feat=wf, dataset_name="charades", is_training=False, neg_index=[2, 3, 0, 1, 1])
    ob = b2.eval()(batch, words_feat=wf, dataset_name="charades", is_training=False, neg_index=[2, 3, 0, 1, 1])
    assert close(oa["pred_spans"], ob["pred_spans"]) and close(oa["saliency_scores"], ob["saliency_scores"])


def test_init_facts():
    """Official init facts (B9): xavier overwrote bbox_embed's zero last weight (bias 0), SS-MESM's layers start
    identical (deep copies, no re-init), T2V/transformer layers differ, learned tokens zero, PReLU 0.25."""
    two = dict(TINY, num_recss_layers=2, num_recfw_layers=2)
    torch.manual_seed(0)
    m = TM.build_mesm(MESMConfig(**two))
    last = m.transformer.decoder.bbox_embed.layers[-1]
    assert last.weight.abs().sum() > 0 and last.bias.abs().sum() == 0
    ss = m.ss_reconstructor.recon_trans.layers
    assert torch.equal(ss[0].linear1.weight, ss[1].linear1.weight)
    enc = m.enhance_encoder.t2v_encoder.layers
    assert not torch.equal(enc[0].linear1.weight, enc[1].linear1.weight)
    assert m.masked_token.abs().sum() == 0 and m.ss_reconstructor.masked_sent_token.abs().sum() == 0
    assert enc[0].activation.weight.item() == 0.25
    bound = math.sqrt(6.0 / (16 + 32))  # xavier_uniform on linear1 (32 x 16)
    assert enc[0].linear1.weight.abs().max() <= bound
    # same seed, same weights (the official construction order is deterministic)
    torch.manual_seed(0)
    m2 = TM.build_mesm(MESMConfig(**two))
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())


def test_options_from_opt_and_errors():
    import torch_ref

    twin = torch_ref.build_model(MESMConfig(**TINY))  # the registry's call: the twin class on the model config
    assert isinstance(twin, TM.MESM) and len(twin.state_dict()) == len(TM.STATE_DICT_KEYS(MESMConfig(**TINY)))
    opt = {**TINY, "use_tef": True, "tokenizer_type": "CLIP", "dataset_name": "charades", "lr": 2e-4, "exp_id": "x"}
    m = TM.MESM.from_opt(opt)
    assert m.input_vid_proj[0].net[1].in_features == TINY["v_feat_dim"] + 2  # opt.json's v_feat_dim is pre-TEF
    assert m.output_txt_proj[1].out_features == TINY["vocab_size"] + 3
    g = TM.MESM.from_opt({**opt, "tokenizer_type": "GloVeNLTK"})
    assert g.output_txt_proj[1].out_features == TINY["vocab_size"] + 1
    for bad in (dict(pre_norm=True), dict(t2v_mask="bogus"), dict(span_loss_type="ce"), dict(nheads=3)):
        with pytest.raises(JaxprvrError):
            TM.MESM.from_opt({**opt, **bad})
    with pytest.raises(JaxprvrError):
        TM.MESMOptions.from_opt(opt, no_such_field=1)


# ---------------------------------------------------------------------------------------------- T2V mask and layer


def np_head_major(vpad, tpad, nhead):
    """The official construction literally: M.repeat(nhead, 1, 1) (head-major), read at b * nhead + h."""
    m = vpad[:, :, None] & tpad[:, None, :]
    rep = np.concatenate([m] * nhead, axis=0)
    b = m.shape[0]
    return np.stack([np.stack([rep[bb * nhead + h] for h in range(nhead)]) for bb in range(b)])


def test_head_major_mask_numpy():
    rng = np.random.RandomState(0)
    for b, h in ((3, 2), (5, 8), (2, 4), (1, 3)):
        vpad, tpad = rng.rand(b, 4) < 0.4, rng.rand(b, 3) < 0.4
        got = TM.t2v_head_masks(torch.tensor(vpad), torch.tensor(tpad), h, "head_major").numpy()
        assert np.array_equal(got, np_head_major(vpad, tpad, h))
        per = TM.t2v_head_masks(torch.tensor(vpad), torch.tensor(tpad), h, "per_row").numpy()
        assert np.array_equal(per, np.repeat((vpad[:, :, None] & tpad[:, None, :])[:, None], h, axis=1))
    # mutant: reading the repeated mask head-major (h * B + b) is the per-row mask, not the official one
    vpad, tpad = rng.rand(3, 4) < 0.5, rng.rand(3, 3) < 0.5
    m = vpad[:, :, None] & tpad[:, None, :]
    rep = np.concatenate([m] * 2, axis=0)
    wrong = np.stack([np.stack([rep[hh * 3 + bb] for hh in range(2)]) for bb in range(3)])
    assert not np.array_equal(wrong, np_head_major(vpad, tpad, 2))


def np_ln(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def np_mha(q_in, k_in, v_in, w_in, b_in, w_out, b_out, nhead, masked):
    """Batch-first multi-head attention; ``masked`` (B, H, Lq, Lk) True = not attended."""
    e = q_in.shape[-1]
    hd = e // nhead
    wq, wk, wv = w_in[:e], w_in[e:2 * e], w_in[2 * e:]
    bq, bk, bv = b_in[:e], b_in[e:2 * e], b_in[2 * e:]

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], nhead, hd).transpose(0, 2, 1, 3)

    q, k, v = heads(q_in @ wq.T + bq), heads(k_in @ wk.T + bk), heads(v_in @ wv.T + bv)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    s = np.where(masked, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(q_in.shape[0], q_in.shape[1], e)
    return o @ w_out.T + b_out


def np_t2v_layer(layer, txt, vid, tpad, ptxt, vpad, pvid, masks, mlm=False):
    """``x = vid + attn(vid + pvid -> txt + ptxt, txt)``; ``out = LN2(x + W2 PReLU(W1 LN1(x)))`` (the residual
    adds the un-normalised x)."""
    P = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
    masked = tpad[:, None, None, :] | masks
    x = vid + np_mha(vid + pvid, txt + ptxt, txt, P["self_attn.in_proj_weight"], P["self_attn.in_proj_bias"],
                     P["self_attn.out_proj.weight"], P["self_attn.out_proj.bias"], layer.nhead, masked)
    sfx = "_1" if mlm else ""
    h = np_ln(x, P[f"norm1{sfx}.weight"], P[f"norm1{sfx}.bias"]) @ P[f"linear1{sfx}.weight"].T + P[f"linear1{sfx}.bias"]
    h = np.where(h >= 0, h, P["activation.weight"][0] * h)
    y = x + h @ P[f"linear2{sfx}.weight"].T + P[f"linear2{sfx}.bias"]
    return np_ln(y, P[f"norm2{sfx}.weight"], P[f"norm2{sfx}.bias"])


@pytest.mark.parametrize("two_mlp,mlm", [(False, False), (True, True), (True, False)])
def test_t2v_layer_numpy(two_mlp, mlm):
    torch.manual_seed(0)
    layer = TM.T2VLayer(16, 2, 32, 0.1, two_mlp=two_mlp).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rng = np.random.RandomState(1)
    b, lt, lv = 3, 4, 5
    txt, vid = rng.randn(b, lt, 16), rng.randn(b, lv, 16)
    ptxt, pvid = rng.randn(b, lt, 16), rng.randn(b, lv, 16)
    tpad = np.array([[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1]], bool)
    vpad = np.array([[0, 0, 0, 0, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    T = lambda x: torch.tensor(x).permute(1, 0, 2)  # noqa: E731  (sequence-first)
    got = layer(T(txt), T(vid), torch.tensor(tpad), T(ptxt), torch.tensor(vpad), T(pvid), is_MLM=mlm)
    got = got.permute(1, 0, 2)
    ref = np_t2v_layer(layer, txt, vid, tpad, ptxt, vpad, pvid, np_head_major(vpad, tpad, 2), mlm=mlm and two_mlp)
    assert close(got, ref)
    # the head-major mask matters on this batch: the per-row reference is a different result
    per = np_t2v_layer(layer, txt, vid, tpad, ptxt, vpad, pvid,
                       np.repeat((vpad[:, :, None] & tpad[:, None, :])[:, None], 2, axis=1), mlm=mlm and two_mlp)
    assert not close(got, per)
    layer.t2v_mask = "per_row"
    assert close(layer(T(txt), T(vid), torch.tensor(tpad), T(ptxt), torch.tensor(vpad), T(pvid),
                       is_MLM=mlm).permute(1, 0, 2), per)


def test_t2v_layer_mutant_plain_post_norm():
    """The official residual adds the un-normalised x; a textbook post-norm (FFN residual on LN1(x)) fails."""
    torch.manual_seed(0)
    layer = TM.T2VLayer(16, 2, 32, 0.0).double().eval()
    rng = np.random.RandomState(2)
    txt, vid = rng.randn(2, 3, 16), rng.randn(2, 4, 16)
    z3, z4 = np.zeros((2, 3, 16)), np.zeros((2, 4, 16))
    tpad, vpad = np.zeros((2, 3), bool), np.zeros((2, 4), bool)
    ref = np_t2v_layer(layer, txt, vid, tpad, z3, vpad, z4, np.zeros((2, 2, 4, 3), bool))

    class Textbook(TM.T2VLayer):
        def forward(self, src_txt, src_vid, txt_pad, pos_txt, vid_pad, pos_vid, is_MLM=False, record=None):
            x = src_vid + self.self_attn(src_vid, src_txt, src_txt, key_padding_mask=txt_pad)
            x = self.norm1(x)
            return self.norm2(x + self.linear2(self.activation(self.linear1(x))))

    bad = Textbook(16, 2, 32, 0.0).double().eval()
    bad.load_state_dict(layer.state_dict())
    T = lambda x: torch.tensor(x).permute(1, 0, 2)  # noqa: E731
    args = (T(txt), T(vid), torch.tensor(tpad), T(z3), torch.tensor(vpad), T(z4))
    assert close(layer(*args).permute(1, 0, 2), ref)
    assert not close(bad(*args).permute(1, 0, 2), ref)


# ---------------------------------------------------------------------------------------------- decoder pieces


def test_inverse_sigmoid_numpy():
    x = torch.tensor([-0.5, 0.0, 1e-4, 1e-3, 0.3, 0.5, 0.999, 1.0, 1.7], dtype=torch.float64)
    xs = np.clip(x.numpy(), 0, 1)
    ref = np.log(np.maximum(xs, 1e-3) / np.maximum(1 - xs, 1e-3))
    assert close(TM.inverse_sigmoid(x), ref)
    assert not close(TM.inverse_sigmoid(x, eps=1e-5), ref)  # mutant: DETR's eps
    assert not close(TM.inverse_sigmoid(x) * np.nan, ref)


def np_sine(x, n):
    dim_t = 10000.0 ** (2 * (np.arange(n) // 2) / n)
    out = np.empty(x.shape + (n,))
    out[..., 0::2] = np.sin(x[..., None] / dim_t[0::2])
    out[..., 1::2] = np.cos(x[..., None] / dim_t[1::2])
    return out


def test_sine_embeddings_numpy():
    """float32 positions (officially built in float32 whatever the model dtype): compared at 1e-6."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = TM.sine_position(mask, 16)
    assert got.dtype == torch.float32
    x = np.cumsum(mask.numpy(), 1).astype(np.float64)
    x = x / (x[:, -1:] + 1e-6) * 2 * np.pi
    assert close(got, np_sine(x, 16), tol=1e-6)
    assert not close(got, np_sine(x, 8).repeat(2, -1), tol=1e-6)  # mutant: half the frequencies
    ref = torch.rand(4, 3, 2, dtype=torch.float64)
    g = TM.gen_sineembed_for_position(ref, 16)
    c, w = ref[..., 0].numpy(), ref[..., 1].numpy()
    want = np.concatenate([np_sine(c * 2 * np.pi, 8), np_sine(w * 2 * np.pi, 8)], -1)
    assert g.dtype == torch.float64 and close(g, want, tol=1e-6)
    assert not close(g, np.concatenate([want[..., 8:], want[..., :8]], -1), tol=1e-6)  # mutant: (w, c) order


def np_decoder_mha(mha, q, k, v, kpm):
    """The custom attention (attention.py): per-head slices of q/k (embed_dim / H) and v (vdim / H),
    scale (embed_dim / H)^-1/2, key padding, softmax, out_proj. Sequence-first inputs."""
    e, h, vd = q.shape[-1], mha.num_heads, v.shape[-1]
    hd, vhd = e // h, vd // h
    lq, b = q.shape[:2]
    qh = (q * hd ** -0.5).reshape(lq, b, h, hd).transpose(1, 2, 0, 3)
    kh = k.reshape(-1, b, h, hd).transpose(1, 2, 0, 3)
    vh = v.reshape(-1, b, h, vhd).transpose(1, 2, 0, 3)
    s = qh @ kh.transpose(0, 1, 3, 2)
    s = np.where(kpm[:, None, None, :], -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ vh).transpose(2, 0, 1, 3).reshape(lq, b, vd)
    return o @ mha.out_proj.weight.detach().numpy().T + mha.out_proj.bias.detach().numpy()


def test_decoder_mha_numpy():
    torch.manual_seed(0)
    mha = TM.DecoderMHA(32, 2, dropout=0.1, vdim=16).double().eval()
    assert mha.out_proj.bias.abs().sum() == 0  # attention.py L113-114
    rng = np.random.RandomState(0)
    q, k, v = rng.randn(3, 2, 32), rng.randn(5, 2, 32), rng.randn(5, 2, 16)
    kpm = np.array([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], bool)
    got = mha(torch.tensor(q), torch.tensor(k), torch.tensor(v), key_padding_mask=torch.tensor(kpm))
    ref = np_decoder_mha(mha, q, k, v, kpm)
    assert close(got, ref)
    # mutant: scaling by the value head width (16 / 2) instead of embed_dim / heads
    assert not close(got, np_decoder_mha(mha, q * np.sqrt(16 / 8), k, v, kpm))


def test_decoder_structure_and_detach():
    """query_scale skipped at layer 0, ca_qpos_proj only in layer 0, the layer-1 head's reference not detached
    (gradient into bbox_embed), the reference fed to layer 1 detached (hs does not depend on bbox_embed)."""
    torch.manual_seed(0)
    tr = TM.Transformer(16, 2, 5, 2, 2, 32, 0.0).double().eval()
    calls = {"query_scale": 0, "ref_point_head": 0, "ca_qpos_proj": 0}
    for name in calls:
        mod = getattr(tr.decoder, name, None) or tr.decoder.layers[0].ca_qpos_proj
        mod.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    assert tr.decoder.layers[1].ca_qpos_proj is None
    src = torch.randn(3, 6, 16, dtype=torch.float64)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True
    pos = torch.randn(3, 6, 16, dtype=torch.float64)
    g = torch.randn(3, 1, 16, dtype=torch.float64)
    qe = torch.randn(5, 2, dtype=torch.float64)
    hs, refs, mem, mg = tr(src, mask, qe, pos, g, g)
    assert calls == {"query_scale": 1, "ref_point_head": 2, "ca_qpos_proj": 1}
    assert close(refs[0], torch.sigmoid(qe)[None].expand(3, 5, 2))
    w = tr.decoder.bbox_embed.layers[0].weight
    (gr,) = torch.autograd.grad(refs[1].sum(), w, allow_unused=True)
    assert gr is not None and gr.abs().sum() > 0
    (gh,) = torch.autograd.grad(hs.sum(), w, allow_unused=True)
    assert gh is None

    class DetachFirst(TM.TransformerDecoder):  # mutant: the reference detached before it is appended
        def forward(self, tgt, memory, kpm, pos, refpoints_unsigmoid, record=None):
            hs_, refs_ = super().forward(tgt, memory, kpm, pos, refpoints_unsigmoid, record)
            return hs_, refs_.detach()

    bad = DetachFirst(TM.TransformerDecoderLayer(16, 2, 32, 0.0), 2, nn.LayerNorm(16), 16).double()
    bad.load_state_dict(tr.decoder.state_dict())
    tr.decoder = bad
    _, refs_bad, _, _ = tr(src, mask, qe, pos, g, g)
    assert not refs_bad.requires_grad


def test_global_token_is_key_masked():
    """No token attends to the global token (mask True, transformer.py L185-186): the video memory does not
    depend on it; the global output does. A QD-DETR-style valid global token (mutant) changes the memory."""
    torch.manual_seed(0)
    tr = TM.Transformer(16, 2, 5, 2, 2, 32, 0.0).double().eval()
    src, pos = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 5] = True
    qe = torch.randn(5, 2, dtype=torch.float64)
    g1, g2 = torch.randn(2, 1, 16, dtype=torch.float64), torch.randn(2, 1, 16, dtype=torch.float64)
    _, _, m1, mg1 = tr(src, mask, qe, pos, g1, g1)
    _, _, m2, mg2 = tr(src, mask, qe, pos, g2, g2)
    assert close(m1, m2) and not close(mg1, mg2)
    enc = tr.encoder

    def memory_valid_global(g):
        full = torch.cat([torch.zeros(2, 1, dtype=torch.bool), mask], 1)
        x = torch.cat([g, src], 1).permute(1, 0, 2)
        p = torch.cat([g, pos], 1).permute(1, 0, 2)
        return enc(x, src_key_padding_mask=full, pos=p)[1:].transpose(0, 1)

    assert not close(memory_valid_global(g1), memory_valid_global(g2))


# ---------------------------------------------------------------------------------------------- model-level facts


def test_forward_structure_single_and_qvh():
    m = tiny_model(0).eval()
    b, wf = tiny_batch()
    out = m(b, words_feat=wf, dataset_name="charades", is_training=False, neg_index=[2, 2, 0, 1, 0])
    aux = m.aux
    assert out["pred_spans"].shape == (R, 5, 2) and len(out["aux_outputs"]) == 1
    assert "recfw_words_logit" not in out  # eval: no MLM pass
    # SS-MESM: each row's own slot holds masked_sent_token, the others the item's projected sentences
    loc = aux["ss_sent_loc"]
    assert loc.sum() == R and torch.equal(loc.float().argmax(1), torch.tensor([0, 1, 0, 0, 1]))
    tok = m.ss_reconstructor.masked_sent_token
    assert close(aux["ss_masked_sent"][loc], tok.expand(R, -1))
    assert close(aux["ss_masked_sent"][0, 1], aux["ss_projed_sent"][0, 1])
    # recon prepended to the words, always valid; the neg branch reads other rows
    assert close(out["expanded_words_feat"][:, 0], out["recon_feat"])
    assert bool(out["expanded_words_mask"][:, 0].all())
    assert close(out["recon_feat"].norm(dim=-1), np.ones(R))
    # QVH: every row of a group gets the concatenated valid frames of the group's rows
    m2 = tiny_model(0).eval()
    bq, wf = tiny_batch(qvh=True)
    m2(bq, words_feat=wf, dataset_name="qvhighlights", is_training=False, neg_index=[2, 2, 0, 1, 0])
    vf, vm = bq["video_feat"], bq["video_mask"]
    rows = np.split(np.arange(R), np.cumsum(NC)[:-1])
    for grp in rows:
        cat = np.concatenate([vf[r][vm[r]] for r in grp])
        for r in grp:
            sv, svm = m2.aux["ss_batched_vid"][r].numpy(), m2.aux["ss_batched_vid_mask"][r].numpy()
            assert svm.sum() == len(cat) and close(sv[svm], cat)
    with pytest.raises(JaxprvrError):
        m2(bq, words_feat=wf, dataset_name="activitynet", is_training=False)


def test_mlm_branch_replacements():
    m = tiny_model(0).train()
    for mod in m.modules():  # no dropout: the replaced vectors are exactly the projected tokens
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    b, wf = tiny_batch()
    masked = np.zeros((R, 6), bool)
    masked[0, [1, 4]] = True
    masked[2, 2] = True
    out = m(b, words_feat=wf, dataset_name="charades", is_training=True, neg_index=[2, 2, 0, 1, 0],
            masked_words=masked)
    aux = m.aux
    unk, msk = aux["unknown_token_proj"][0, 0], aux["masked_token_proj"][0, 0]
    um = torch.tensor(b["unknown_mask"])
    assert close(aux["unknowned_words_feat"][um], unk.expand(int(um.sum()), -1))
    assert close(aux["unknowned_words_feat"][~um], aux["projed_words_feat"][~um])
    mk = torch.tensor(masked)
    assert close(aux["masked_words_feat"][mk], msk.expand(int(mk.sum()), -1))
    assert close(aux["masked_words_feat"][~mk], aux["unknowned_words_feat"][~mk])
    cm = torch.tensor(b["clip_mask"])
    for r in range(R):  # GT frames (with their sine positions) are the MLM keys
        n = int(cm[r].sum())
        assert close(aux["merged_clip_feat"][r, :n], aux["projed_video_feat"][r][cm[r]])
        assert close(aux["merged_clip_position"][r, :n], aux["vid_position"][r][cm[r]])
    assert out["recfw_words_logit"].shape == (R, 6, TINY["vocab_size"] + 3)


def test_train_without_dropout_equals_eval():
    """Dropout placements only: with every dropout at 0 the train-mode forward (no MLM) is the eval one."""
    m = tiny_model(0, dropout=0.0, input_dropout=0.0)
    b, wf = tiny_batch()
    kw = dict(words_feat=wf, dataset_name="charades", is_training=False, neg_index=[2, 2, 0, 1, 0])
    o_tr = m.train()(b, **kw)
    o_ev = m.eval()(b, **kw)
    assert close(o_tr["pred_spans"], o_ev["pred_spans"]) and close(o_tr["saliency_scores"], o_ev["saliency_scores"])
    m2 = tiny_model(0)  # official rates: train-mode outputs differ
    assert not close(m2.train()(b, **kw)["pred_spans"], m2.eval()(b, **kw)["pred_spans"])


def test_seq_dropout_armed_counts_batch_first():
    d = TM.SeqDropout(0.3).train()
    x = torch.randn(4, 3, 5, dtype=torch.float64)  # (L, B, D)
    seeds = (123, 456)
    with TD.arm(nn.ModuleDict({"d": d}), {"d": [TD.Draw(seeds)]}):
        got = d(x)
    ref = TD.dropout(x.transpose(0, 1), 0.3, seeds).transpose(0, 1)  # the Flax (B, L, D) counters
    assert torch.equal(got, ref)
    assert not torch.equal(got, TD.dropout(x, 0.3, seeds))  # mutant: counters on the sequence-first layout


# ---------------------------------------------------------------------------------------------- samplers


def transcribed_outclass_neg(nc):
    """utils/data_utils.py L113-124 transcribed: one torch.randperm per row, in row order."""
    ends = np.cumsum(nc)
    out = []
    for g, n in enumerate(nc):
        cand = [r for r in range(ends[-1]) if not ends[g] - n <= r < ends[g]]
        for _ in range(n):
            out.append(cand[int(torch.randperm(len(cand))[0])])
    return out


def test_sample_outclass_neg_transcription_and_hook():
    nc = torch.tensor(NC)
    torch.manual_seed(3)
    got = TM.sample_outclass_neg(nc).tolist()
    torch.manual_seed(3)
    assert got == transcribed_outclass_neg(NC)
    item = np.repeat(np.arange(len(NC)), NC)
    assert all(item[g] != item[r] for r, g in enumerate(got))
    torch.manual_seed(3)
    mutant = [int(torch.randperm(R)[0]) for _ in range(R)]  # ignoring the item exclusion
    assert got != mutant
    with pytest.raises(JaxprvrError):
        TM.sample_outclass_neg(torch.tensor([3]))
    # the hook: eval forward (no dropout draws before it) samples exactly this under the same seed
    m = tiny_model(0).eval()
    b, wf = tiny_batch()
    torch.manual_seed(3)
    m(b, words_feat=wf, dataset_name="charades", is_training=False)
    assert m.aux["neg_index"].tolist() == got
    # injecting another negative changes only the negative branch
    o1 = m(b, words_feat=wf, dataset_name="charades", is_training=False, neg_index=got)
    o2 = m(b, words_feat=wf, dataset_name="charades", is_training=False, neg_index=[3, 4, 4, 0, 1])
    assert close(o1["saliency_scores"], o2["saliency_scores"])
    assert not close(o1["neg_saliency_scores"], o2["neg_saliency_scores"])
    with pytest.raises(JaxprvrError):
        m(b, words_feat=wf, dataset_name="charades", is_training=False, neg_index=[0, 1, 2, 3, 9])


def transcribed_mask_words(words_mask, weight):
    """model.py L366-378 transcribed: float32 L1-normalised weights, np.random.choice per row with l > 1."""
    out = np.zeros_like(words_mask)
    w = weight.astype(np.float32)
    w = w / np.maximum(np.abs(w).sum(1, keepdims=True), np.float32(1e-12))
    for i, l in enumerate(words_mask.sum(1)):
        if l <= 1:
            continue
        c = np.random.choice(np.arange(l), max(l // 3, 1), replace=False, p=w[i, :l])
        out[i, c] = True
    return out


def test_mask_words_transcription():
    b, _ = tiny_batch()
    wm = b["words_mask"].copy()
    wm[4, 1:] = False  # a one-word row: nothing masked
    np.random.seed(5)
    got = TM.official_mask_words(torch.tensor(wm), torch.tensor(b["words_weight"])).numpy()
    np.random.seed(5)
    assert np.array_equal(got, transcribed_mask_words(wm, b["words_weight"]))
    lengths = wm.sum(1)
    assert list(got.sum(1)) == [0 if l <= 1 else max(l // 3, 1) for l in lengths]
    assert not (got & (b["words_weight"] == 0)).any()  # SOT/EOT (weight 0) are never drawn
    np.random.seed(5)
    uniform = transcribed_mask_words(wm, wm.astype(np.float64))  # mutant: weights ignored
    assert not np.array_equal(got, uniform)
    # the hook: a train forward under the same numpy seed draws exactly this (dropout draws are torch's)
    m = tiny_model(0).train()
    np.random.seed(5)
    bb = dict(b, words_mask=wm)
    m(bb, words_feat=tiny_batch()[1], dataset_name="charades", is_training=True, neg_index=[2, 2, 0, 1, 0])
    assert np.array_equal(m.aux["masked_words"].numpy(), got)


# ---------------------------------------------------------------------------------------------- matcher


def np_giou(a, b):
    inter = np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None] - inter
    encl = np.maximum(a[:, None, 1], b[None, :, 1]) - np.minimum(a[:, None, 0], b[None, :, 0])
    return inter / union - (encl - union) / encl


def np_cost(logits, spans, tgt_spans, tgt_moments, wc=4.0, ws=10.0, wg=1.0):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    l1 = np.abs(spans[:, None, :] - tgt_spans[None]).sum(-1)
    xx = np.stack([spans[:, 0] - spans[:, 1] / 2, spans[:, 0] + spans[:, 1] / 2], 1)
    return ws * l1 - wg * np_giou(xx, tgt_moments) - wc * p[:, [0]]


def matcher_case(seed, multi):
    rng = np.random.RandomState(seed)
    logits = rng.randn(4, 6, 2)
    spans = np.stack([rng.uniform(0.2, 0.8, (4, 6)), rng.uniform(0.05, 0.4, (4, 6))], -1)
    if multi:
        mom = [np.sort(rng.uniform(0, 1, (k, 2)), 1) for k in (1, 3, 2, 3)]
        tg = dict(norm_moment=[{"moments": torch.tensor(x)} for x in mom],
                  norm_span=[{"spans": TL.span_xx_to_cxw(torch.tensor(x))} for x in mom])
    else:
        mom = np.sort(rng.uniform(0, 1, (4, 2)), 1)
        tg = dict(norm_moment=torch.tensor(mom), norm_span=TL.span_xx_to_cxw(torch.tensor(mom)))
    return dict(pred_logits=torch.tensor(logits), pred_spans=torch.tensor(spans)), tg, mom


def brute_force(cost):
    """min over injective query assignments of the summed cost (rows = queries, columns = targets)."""
    q, t = cost.shape
    return min(sum(cost[p[j], j] for j in range(t)) for p in itertools.permutations(range(q), t))


def matcher_agrees(matcher, seed, multi) -> bool:
    out, tg, mom = matcher_case(seed, multi)
    ind = matcher(out, tg)
    logits, spans = out["pred_logits"].numpy(), out["pred_spans"].numpy()
    for b in range(4):
        if multi:
            c = np_cost(logits[b], spans[b], TL.span_xx_to_cxw(torch.tensor(mom[b])).numpy(), mom[b])
            qi, ti = ind[b][0].numpy(), ind[b][1].numpy()
            if not np.isclose(c[qi, ti].sum(), brute_force(c), rtol=1e-6, atol=1e-6):
                return False
        else:
            c = np_cost(logits[b], spans[b], TL.span_xx_to_cxw(torch.tensor(mom[b:b + 1])).numpy(), mom[b:b + 1])
            if int(ind[b, 0]) != int(np.argmin(c[:, 0])) or int(ind[b, 1]) != 0:
                return False
    return True


@pytest.mark.parametrize("multi", [False, True])
def test_matcher_brute_force(multi, monkeypatch):
    m = TL.HungarianMatcher(cost_class=4, cost_span=10, cost_giou=1, multi_clip=multi)
    assert all(matcher_agrees(m, s, multi) for s in range(4))
    out, tg, _ = matcher_case(0, False)
    ind = m(out, tg) if not multi else None
    if not multi:  # the official (B, 2) [query, 0] tensor, linear_sum_assignment on the 10x1 column
        c = m.cost_matrix(out, tg)
        assert ind.shape == (4, 2) and all(int(ind[i, 0]) == linear_sum_assignment(c[i, :, i:i + 1].numpy())[0][0]
                                           for i in range(4))
    # mutant: a GIoU with the wrong sign makes the matcher disagree with the reference
    monkeypatch.setattr(TL, "generalized_temporal_iou", lambda a, b, f=True: -TL.temporal_iou(a, b)[0])
    assert not all(matcher_agrees(m, s, multi) for s in range(4))


def test_giou_float32_quirk():
    a = torch.tensor([[0.1, 0.4], [0.2, 0.9]], dtype=torch.float64)
    b = torch.tensor([[0.15, 0.5]], dtype=torch.float64)
    assert TL.generalized_temporal_iou(a, b).dtype == torch.float32
    assert close(TL.generalized_temporal_iou(a, b, float32=False), np_giou(a.numpy(), b.numpy()))
    assert close(TL.generalized_temporal_iou(a, b), np_giou(a.numpy(), b.numpy()), tol=1e-6)
    with pytest.raises(JaxprvrError):
        TL.generalized_temporal_iou(torch.tensor([[0.5, 0.1]]), b)


# ---------------------------------------------------------------------------------------------- losses


def np_saliency(s, sn, vm, label, rank_coef, triplet=None, margin=0.2):
    vm = vm.astype(np.float64)
    neg_pair = (-np.log(1 - 1 / (1 + np.exp(-sn))) * vm).sum(1).mean()
    sc = np.concatenate([s, sn], 1)
    lab = np.concatenate([label, np.zeros_like(label)], 1)
    m2 = np.concatenate([vm, vm], 1)
    sc = m2 * sc + (1 - m2) * -1e3
    total = 0.0
    for r in range(1, 12):
        pos = lab >= r
        if pos.sum() == 0:
            continue
        lg = sc / 0.5
        lg = lg - lg.max(1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(1, keepdims=True) + 1e-6)
        mean_pos = (pos * lp * m2).sum(1) / (pos.sum(1) + 1e-6)
        total += (-mean_pos * (pos.sum(1) > 0)).mean()
    loss = total / rank_coef + neg_pair
    if triplet is not None:
        pi, ni = triplet
        rows = np.arange(len(s))[:, None]
        loss += np.clip(margin + s[rows, ni] - s[rows, pi], 0, None).sum() / (pi.size) * 2
    return loss


def np_rec_ss(proj_vid, clip_mask, words, words_mask, moments, nc, gamma=0.9, tau=0.5):
    g = np.zeros((len(moments), len(moments)))
    s = 0
    for n in nc:
        g[s:s + n, s:s + n] = np_giou(moments[s:s + n], moments[s:s + n])
        s += n
    pos = g >= gamma
    cm = clip_mask[..., None]
    a = (proj_vid * cm).sum(1) / cm.sum(1)
    wm = words_mask[..., None]
    t = (words * wm).sum(1) / wm.sum(1)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    c = a @ t.T / tau
    c = c - c.max(1, keepdims=True)
    lp = c - np.log(np.exp(c).sum(1, keepdims=True) + 1e-6)
    return (-(pos * lp).sum(1) / (pos.sum(1) + 1e-6)).mean()


def np_rec_fw(logit, label, mask, eps=0.1):
    lp = logit - logit.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp, label[..., None], -1)[..., 0]
    nll = (1 - eps) * nll + eps / logit.shape[-1] * (-lp.sum(-1))
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def np_labels(logits, matched_q, eos=0.1):
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    tgt = np.ones(logits.shape[:2], int)
    for b, q in enumerate(matched_q):
        tgt[b, q] = 0
    w = np.where(tgt == 0, 1.0, eos)
    return (-np.take_along_axis(lp, tgt[..., None], -1)[..., 0] * w).mean()


@pytest.mark.parametrize("qvh", [False, True])
def test_criterion_terms_numpy(qvh):
    ds = "qvhighlights" if qvh else "charades"
    m = tiny_model(0).train()
    b, wf = tiny_batch(qvh=qvh)
    out = m(b, words_feat=wf, dataset_name=ds, is_training=True, neg_index=[2, 2, 0, 1, 0])
    loss_cfg = MESMLossConfig(use_triplet=qvh, rank_coef=12.0)
    crit = TL.build_criterion(m, loss_cfg, dataset_name=ds, giou_float32=False)
    losses, total = crit(out, b, is_training=True)
    n = lambda t: t.detach().numpy()  # noqa: E731
    vm = b["video_mask"]
    label = b["saliency_label"] if qvh else b["clip_mask"].astype(np.float64)
    trip = (b["pos_idx"], b["neg_idx"]) if qvh else None
    assert close(losses["loss_saliency"], np_saliency(n(out["saliency_scores"]), n(out["neg_saliency_scores"]), vm,
                                                      label, 12.0, trip))
    ind = crit.last_indices["main"]
    spans = n(out["pred_spans"])
    if qvh:
        mom = [x["moments"].numpy() for x in b["norm_moment"]]
        src = np.concatenate([spans[i][ind[i][0].numpy()] for i in range(R)])
        tgt_xx = np.concatenate([mom[i][ind[i][1].numpy()] for i in range(R)])
        merged = np.stack([[x.min(), x.max()] for x in mom])
        mq = [ind[i][0].numpy() for i in range(R)]
    else:
        src = spans[np.arange(R), ind[:, 0].numpy()]
        tgt_xx = b["norm_moment"]
        merged = b["norm_moment"]
        mq = [[int(q)] for q in ind[:, 0]]
    tgt_cxw = np.stack([tgt_xx.sum(1) / 2, tgt_xx[:, 1] - tgt_xx[:, 0]], 1)
    src_xx = np.stack([src[:, 0] - src[:, 1] / 2, src[:, 0] + src[:, 1] / 2], 1)
    assert close(losses["loss_span"], np.abs(src - tgt_cxw).mean())
    assert close(losses["loss_giou"], (1 - np.diag(np_giou(src_xx, tgt_xx))).mean())
    assert close(losses["loss_label"], np_labels(n(out["pred_logits"]), mq))
    assert close(losses["loss_rec_ss"], np_rec_ss(n(out["projed_video_feat"]), b["clip_mask"],
                                                  n(out["expanded_words_feat"]), n(out["expanded_words_mask"]),
                                                  merged, NC))
    assert close(losses["loss_rec_fw"], np_rec_fw(n(out["recfw_words_logit"]), b["words_label"], b["words_mask"]))
    wd = {"loss_span": 10, "loss_giou": 1, "loss_label": 4, "loss_saliency": 4, "loss_span_0": 10, "loss_giou_0": 1,
          "loss_label_0": 4, "loss_rec_fw": 0.1, "loss_rec_ss": 0.1}  # runner.py L309-327 with the C+SF values
    assert crit.weight_dict == wd
    assert close(total, sum(losses[k].item() * w for k, w in wd.items()))
    # injected matchings: the matcher's own give the same losses; another matching changes the span terms
    l2, _ = crit(out, b, indices=ind, aux_indices=crit.last_indices["aux"])
    assert close(l2["loss_span"], losses["loss_span"])
    if not qvh:
        l3, _ = crit(out, b, indices=(ind[:, 0] + 1) % 5)
        assert not close(l3["loss_span"], losses["loss_span"])
    # eval: no MLM term
    le, _ = crit(m.eval()(b, words_feat=wf, dataset_name=ds, is_training=False, neg_index=[2, 2, 0, 1, 0]), b,
                 is_training=False)
    assert "loss_rec_fw" not in le and "loss_rec_ss" in le


def test_loss_mutants_and_nan():
    """Planted bugs in the loss terms fail their numpy checks; NaN scores never pass."""
    rng = np.random.RandomState(0)
    s, sn = rng.randn(3, 5), rng.randn(3, 5)
    vm = np.ones((3, 5), bool)
    vm[0, 3:] = False
    lab = (rng.rand(3, 5) < 0.4).astype(np.float64) * vm
    crit = TL.build_criterion(MESMConfig(**TINY), MESMLossConfig(), dataset_name="charades")
    o = {"saliency_scores": torch.tensor(s), "neg_saliency_scores": torch.tensor(sn)}
    t = {"video_mask": torch.tensor(vm), "clip_mask": torch.tensor(lab > 0)}
    good = crit.loss_saliency(o, t)["loss_saliency"]
    assert close(good, np_saliency(s, sn, vm, lab, 12.0))
    assert not close(good, np_saliency(s, sn, vm, lab, 1.0))  # mutant: rank_coef ignored
    o_nan = {"saliency_scores": torch.tensor(s) * np.nan, "neg_saliency_scores": torch.tensor(sn)}
    assert not close(crit.loss_saliency(o_nan, t)["loss_saliency"], np_saliency(s, sn, vm, lab, 12.0))
    logits = rng.randn(3, 4, 2)
    lab_loss = crit.loss_labels({"pred_logits": torch.tensor(logits)}, {}, torch.tensor([[1, 0], [3, 0], [0, 0]]))
    assert close(lab_loss["loss_label"], np_labels(logits, [[1], [3], [0]]))
    # mutant: DETR's weighted mean instead of MESM's plain mean
    w = np.where(np.arange(4)[None] == np.array([1, 3, 0])[:, None], 1.0, 0.1)
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    tgt = np.where(w == 1.0, 0, 1)
    weighted = (-np.take_along_axis(lp, tgt[..., None], -1)[..., 0] * w).sum() / w.sum()
    assert not close(lab_loss["loss_label"], weighted)
    logit, label = rng.randn(2, 4, 7), rng.randint(0, 7, (2, 4))
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    fw = crit.loss_rec_fw({"recfw_words_logit": torch.tensor(logit), "words_mask": torch.tensor(mask)},
                          {"words_label": torch.tensor(label)})["loss_rec_fw"]
    assert close(fw, np_rec_fw(logit, label, mask)) and not close(fw, np_rec_fw(logit, label, mask, eps=0.0))


# ---------------------------------------------------------------------------------------------- recipe


def test_official_step_adamw_and_clip():
    m = tiny_model(0)
    b, wf = tiny_batch()
    crit = TL.build_criterion(m, dataset_name="charades")
    opt, sched = TL.official_optimizer(m, lr=2e-4, wd=1e-4, lr_drop=400, gamma=0.1)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(dict(m.named_parameters())[n]) for n in names]
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and sched.step_size == 400 and sched.gamma == 0.1
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    torch.manual_seed(0)
    np.random.seed(0)
    TL.official_step(m, crit, b, opt, 0.1, dataset_name="charades", words_feat=wf, neg_index=[2, 2, 0, 1, 0])
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    gnorm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert abs(gnorm - 0.1) < 1e-6  # the raw norm is far above 0.1: clipped to it
    for n, p in m.named_parameters():
        if n not in grads:  # no gradient (txt_position_embed, output_sent_proj): AdamW skips it
            assert torch.equal(p.detach(), before[n])
            continue
        g = grads[n].numpy()
        want = before[n].numpy() * (1 - 2e-4 * 1e-4) - 2e-4 * g / (np.abs(g) + 1e-8)  # first AdamW step
        assert close(p.detach(), want, tol=1e-10), n


def test_prepare_batch_formats():
    b, _ = tiny_batch()
    out = TM.prepare_batch(dict(b, num_clips=np.array(NC + [0, 0])), dtype=torch.float64)
    assert out["num_clips"].tolist() == NC and out["video_mask"].dtype == torch.bool
    with pytest.raises(JaxprvrError):
        TM.prepare_batch(dict(b, num_clips=np.array([2, 0, 3])))
    mom = np.array([[1.0, 3.0], [2.0, 4.0]])
    o = TM.prepare_batch({"moment": mom, "duration": np.array([4.0, 8.0])}, dtype=torch.float64)
    assert close(o["norm_moment"], mom / np.array([[4.0], [8.0]]))
    assert close(o["norm_span"], [[0.5, 0.5], [0.375, 0.25]])
    pad = np.zeros((2, 3, 2))
    pad[0, :2] = [[0.1, 0.2], [0.5, 0.6]]
    pad[1, :1] = [[0.3, 0.9]]
    sm = np.array([[1, 1, 0], [1, 0, 0]], bool)
    q = TM.prepare_batch({"norm_moment": pad, "norm_span": pad, "span_mask": sm}, dtype=torch.float64,
                         multi_clip=True)
    assert [x["moments"].shape[0] for x in q["norm_moment"]] == [2, 1]
    assert close(q["norm_moment"][1]["moments"], [[0.3, 0.9]])
