"""torch_ref.mrnet (the official MRNet ``RET`` twin), torch_ref.mrnet_loss and torch_ref.vmr_eval against
independent references: a hand-written official key list and an analytic parameter count, numpy re-computations
of the score formulas, of the retention layer (xPos, sine PE, decay and sparse masks, per-head softmax), of the
2-D map and of the mask-renormalisation weights, float64 brute-force loops of the losses and of the recall /
NMS protocol, and hand-computed totals. Tiny widths (joint space 32, 4 heads, N 16, pooling (7, 4), predictor
3x3 x 2) except for the construct-only official-size checks (built on the meta device)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jaxprvr.config import apply_overrides, load_config
from jaxprvr.errors import JaxprvrError
from torch_ref import dropout as TD
from torch_ref import mrnet as TM
from torch_ref import vmr_eval as TE
from torch_ref.mrnet_loss import BceLoss, ContrastiveLoss

TINY = ["model.joint_space=32", "model.n_heads=4", "model.num_clips=16", "model.num_pre_clips=32",
        "model.featpool_kernel=2", "model.pooling_counts=(7,4)", "model.predictor_kernel=3",
        "model.predictor_layers=2", "model.input_size=20", "model.text_dim=24", "model.featpool_hidden=24",
        "model.predictor_hidden=16", "model.ffn_dim=64", "train.batch_size=3"]


def tiny_cfg(dataset="activitynet", *extra):
    return apply_overrides(load_config(dataset), TINY + list(extra))


def np_mask2d(n, counts):
    """Valid cells by the rule of A2 step 5: group g (stride 2^g) covers offsets after the previous group's last,
    in steps of the stride, and only start indices that are multiples of the stride."""
    m = np.eye(n, dtype=bool)
    last, stride = 0, 1
    for c in counts:
        offs = [last + stride * (t + 1) for t in range(c)]
        for off in offs:
            for i in range(0, n - off):
                if i % stride == 0:
                    m[i, i + off] = True
        last, stride = offs[-1], stride * 2
    return m


def np_iou2d(moment, duration, n):
    s, e = np.float32(moment[0]), np.float32(moment[1])
    out = np.zeros((n, n), np.float32)
    for i in range(n):
        for j in range(n):
            cs, ce = np.float32(i * duration / n), np.float32((j + 1) * duration / n)
            inter = max(min(ce, e) - max(cs, s), 0.0)
            out[i, j] = inter / (max(ce, e) - min(cs, s))
    return out


def make_batch(cfg, nq=(2, 3, 1), seed=0, duration=16.0):
    rng = np.random.default_rng(seed)
    m = cfg.model
    moments = []
    for k in nq:
        a = np.sort(rng.uniform(0, duration, size=(k, 2)), axis=1).astype(np.float32)
        moments.append(a)
    return {"feats": torch.tensor(rng.normal(size=(len(nq), m.num_pre_clips, m.input_size)), dtype=torch.float32),
            "queries": [torch.tensor(rng.normal(size=(k, m.text_dim)), dtype=torch.float32) for k in nq],
            "all_iou2d": [torch.tensor(np.stack([np_iou2d(x, duration, m.num_clips) for x in mo])) for mo in moments],
            "moments": [torch.tensor(mo) for mo in moments]}


# ---------------------------------------------------------------------------------------------- keys and sizes


def expected_keys(mc) -> list[str]:
    """The official state_dict, in order, written from ret_model.py RET.__init__ (L478-501) and its parts."""
    wb = ("weight", "bias")
    keys = [f"featpool.conv.{p}" for p in wb]
    keys += [f"text_encoder.fc_out{i}.{p}" for i in (1, 2) for p in wb]
    keys += [f"text_out.fc_out{i}.{p}" for i in (1, 2) for p in wb] + [f"text_out.layernorm.{p}" for p in wb]
    n_lin = 4 if mc.ret_variant == "mha" else 1
    for i in range(mc.trans_layers):
        r = f"trans_ret.rets.{i}."
        if mc.ret_variant == "projected":
            keys += [r + f"W_{a}_{b}" for a in ("vid", "txt") for b in "QKV"]
        keys += [r + f"self_attn.linears.{j}.{p}" for j in range(n_lin) for p in wb]
        keys += [r + "xpos.scale", r + "learn_vid_ret.weight"]
    keys += [f"trans_ret.ffns.{i}.{j}.{p}" for i in range(mc.trans_layers) for j in (0, 2) for p in wb]
    for ln in ("layer_norms_1", "layer_norms_2"):
        keys += [f"trans_ret.{ln}.{i}.{p}" for i in range(mc.trans_layers) for p in wb]
    keys += [f"trans_ret.norm.{p}" for p in wb]
    keys += [f"proposal_conv.bn.{j}.{p}" for j in range(mc.predictor_layers)
             for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    keys += [f"proposal_conv.convs.{j}.{p}" for j in range(mc.predictor_layers) for p in wb]
    keys += [f"proposal_conv.conv1x1_{h}.{p}" for h in ("iou", "contrastive") for p in wb]
    keys += [f"input_vid_proj.{i}.{m}.{p}" for i in (0, 1) for m in ("LayerNorm", "net.1") for p in wb]
    return keys


def analytic_count(mc) -> int:
    d, h, k, L = mc.joint_space, mc.predictor_hidden, mc.predictor_kernel, mc.predictor_layers
    n, f, fp = mc.num_clips, mc.ffn_dim, mc.featpool_hidden
    total = mc.input_size * fp + fp  # featpool
    total += 2 * (mc.text_dim * d + d) + 2 * (d * d + d) + 2 * d  # text_encoder, text_out
    attn = 6 * d * d + d * d + d if mc.ret_variant == "projected" else 4 * (d * d + d)
    layer = attn + d // 2 + n * n + (d * f + f + f * d + d) + 4 * d
    total += mc.trans_layers * layer + 2 * d
    total += d * h * k * k + h + (L - 1) * (h * h * k * k + h) + L * (4 * h + 1) + 2 * (h * d + d)
    total += 2 * fp + fp * d + d + 2 * d + d * d + d  # input_vid_proj
    return total


@pytest.mark.parametrize("dataset,n_keys,millions", [("activitynet", 90, 77.5), ("tacos", 65, 18.4),
                                                      ("charades", 112, 119.1)])
def test_official_keys_and_sizes(dataset, n_keys, millions):
    cfg = load_config(dataset)
    with torch.device("meta"):
        model = TM.MRNet(cfg)
    sd = model.state_dict()
    assert list(sd) == expected_keys(cfg.model)
    assert len(sd) == n_keys
    total = sum(v.numel() for v in sd.values())
    assert total == analytic_count(cfg.model)
    assert abs(total / 1e6 - millions) < 0.06  # vmr.md A6 (truncated to 0.1 M)
    assert all(sd[k].dtype == torch.int64 for k in sd if k.endswith("num_batches_tracked"))
    assert TM.official_state_keys(cfg) == list(sd)
    if dataset == "activitynet":
        assert total == 77_551_876  # vmr.md A7
    n = cfg.model.num_clips
    mask, _ = TM.official_mask2d(cfg.model.pooling_counts, n)
    assert int(mask.sum()) == {64: 1104, 128: 2548}[n]  # vmr.md A1
    assert np.array_equal(mask.numpy(), np_mask2d(n, cfg.model.pooling_counts))


def test_init_buffers_and_clone_quirk():
    cfg = tiny_cfg("tacos")
    torch.manual_seed(0)
    model = TM.MRNet(cfg)
    d = cfg.model.joint_space
    scale = model.trans_ret.rets[0].xpos.scale
    assert np.allclose(scale.numpy(), [(2 * j + 0.4 * d) / (1.4 * d) for j in range(d // 2)], atol=1e-7)
    lins = model.trans_ret.rets[0].self_attn.linears
    assert len(lins) == 4 and all(torch.equal(lins[0].weight, m.weight) for m in lins)  # deepcopy of one Linear
    torch.manual_seed(1)
    w = TM.MRNet(tiny_cfg("activitynet")).trans_ret.rets[0].W_vid_Q.detach().numpy()
    assert abs(w.std() * d - 1) < 0.1  # randn / d


# ---------------------------------------------------------------------------------------------- eval forward


def test_eval_forward_deterministic_and_scores_from_maps():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TM.MRNet(cfg).eval()
    batch = make_batch(cfg)
    out1 = model(batch)
    last = dict(model.last)
    out2 = model(batch)
    for a, b in zip(out1[2] + out1[3], out2[2] + out2[3]):
        assert torch.equal(a, b)
    mask = np_mask2d(16, (7, 4))
    assert np.array_equal(model.mask2d.numpy(), mask)
    w1 = model.text_out.fc_out1.weight.detach().double().numpy()
    b1 = model.text_out.fc_out1.bias.detach().double().numpy()
    for i, (c, u) in enumerate(zip(out1[2], out1[3])):
        t = last["txt_feats"][i].detach().double().numpy()
        m2 = last["map2d"][i].detach().double().numpy().reshape(32, -1)
        mi = last["map2d_iou"][i].detach().double().numpy().reshape(32, -1)
        cos = lambda a, b: (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=0))
        want_c = cos(t, m2).reshape(-1, 16, 16) * mask
        want_u = 1 / (1 + np.exp(-10 * cos(t @ w1.T + b1, mi))).reshape(-1, 16, 16) * mask
        assert np.allclose(c.detach().numpy(), want_c, atol=2e-6)
        assert np.allclose(u.detach().numpy(), want_u, atol=2e-6)
        assert np.allclose(out1[1][i].detach().numpy(),
                           batch["queries"][i].numpy() @ model.text_encoder.fc_out1.weight.detach().numpy().T
                           + model.text_encoder.fc_out1.bias.detach().numpy(), atol=1e-5)
    # model.double() runs in float64 (the official .float() casts follow the weights) and agrees with float32
    m64 = TM.MRNet(cfg).double().eval()
    m64.load_state_dict(model.state_dict())
    _, _, c64, u64 = m64(batch)
    assert c64[0].dtype == torch.float64
    for a, b in zip(out1[2] + out1[3], c64 + u64):
        assert np.allclose(a.detach().numpy(), b.detach().numpy(), atol=2e-6)
    # the 2-D map: cell (i, j) = max over clips i..j on mask2d, 0 elsewhere (feat2d.py L31-38)
    v = last["vid_feats"].detach().numpy()
    fm = model.feat2d(last["vid_feats"]).detach().numpy()
    for i in range(16):
        for j in range(16):
            want = v[:, :, i:j + 1].max(axis=2) if mask[i, j] else np.zeros(v.shape[:2])
            assert np.array_equal(fm[:, :, i, j], want)


def test_proposal_conv_mask_weights_brute_force():
    cfg = tiny_cfg("activitynet", "model.predictor_kernel=5", "model.predictor_layers=3")
    pc = TM.MRNet(cfg).proposal_conv
    mask = np_mask2d(16, (7, 4)).astype(int)
    k, layers = 5, 3
    pad = (k - 1) * layers // 2
    for li, w in enumerate(pc.mask_weights()):
        p = pad if li == 0 else 0
        n_in = mask.shape[0]
        n_out = n_in + 2 * p - k + 1
        count = np.zeros((n_out, n_out))
        for a in range(n_out):
            for b in range(n_out):
                for da in range(k):
                    for db in range(k):
                        x, y = a + da - p, b + db - p
                        if 0 <= x < n_in and 0 <= y < n_in:
                            count[a, b] += mask[x, y]
        want = np.where(count > 0, 1.0 / np.maximum(count, 1), 0.0)
        assert np.allclose(w[0, 0].numpy(), want, atol=1e-7)
        mask = (count > 0).astype(int)
    assert mask.shape == (16, 16)


# ---------------------------------------------------------------------------------------------- retention layer


def np_xpos(x, down):
    n, d = x.shape
    out = np.empty_like(x)
    for t in range(n):
        for j in range(d // 2):
            s = ((2 * j + 0.4 * d) / (1.4 * d)) ** (t / 512)
            s = 1 / s if down else s
            th = t / 10000 ** (j / (d // 2))
            c, sn = math.cos(th) * s, math.sin(th) * s
            out[t, 2 * j] = x[t, 2 * j] * c - x[t, 2 * j + 1] * sn
            out[t, 2 * j + 1] = x[t, 2 * j + 1] * c + x[t, 2 * j] * sn
    return out


def np_sine(nq, d):
    out = np.empty((nq, d))
    for t in range(nq):
        p = (t + 1) / (nq + 1e-6) * 2 * math.pi
        for c in range(d):
            v = p / 10000 ** (2 * (c // 2) / d)
            out[t, c] = math.sin(v) if c % 2 == 0 else math.cos(v)
    return out


def np_retention(layer, x, nq, h):
    """RetLayer.forward in float64 numpy from the formulas of vmr.md A2.1."""
    P = {k: v.detach().double().numpy() for k, v in layer.state_dict().items()}
    n = x.shape[0] - nq
    d = x.shape[1]
    T, V = x[:nq], x[nq:]
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    D = np.where(ii == jj, 2.0, layer.gamma ** np.abs(ii - jj))
    sig = 1 / (1 + np.exp(-P["learn_vid_ret.weight"].reshape(n, n)))
    Lam = np.where(ii == jj, 1.0, sig)
    pe = np_sine(nq, d) + T
    proj = layer.variant == "projected"
    W = (lambda k: P[k]) if proj else (lambda k: np.eye(d))
    tq, tk, tv = pe @ W("W_txt_Q"), pe @ W("W_txt_K"), T @ W("W_txt_V")
    vq, vk, vv = np_xpos(V, False) @ W("W_vid_Q"), np_xpos(V, True) @ W("W_vid_K"), V @ W("W_vid_V")
    if layer.att_mode == "v":
        q, k, v, M = vq, vk, vv, D * Lam
    else:
        q, k, v = np.concatenate([tq, vq]), np.concatenate([tk, vk]), np.concatenate([tv, vv])
        M = np.ones((nq + n, nq + n))
        M[nq:, nq:] = D * Lam
    lin = lambda y, j: y @ P[f"self_attn.linears.{j}.weight"].T + P[f"self_attn.linears.{j}.bias"]
    if not proj:
        q, k, v = lin(q, 0), lin(k, 1), lin(v, 2)
    dk = d // h
    heads = []
    for hh in range(h):
        sl = slice(hh * dk, (hh + 1) * dk)
        logits = (q[:, sl] / math.sqrt(dk)) @ k[:, sl].T * M
        if layer.self_attn.att_softmax:
            a = np.exp(logits - logits.max(1, keepdims=True))
            a = a / a.sum(1, keepdims=True)
        else:
            a = logits if not proj else np.zeros_like(logits)
        heads.append(a @ v[:, sl])
    out = lin(np.concatenate(heads, axis=1), 3 if not proj else 0)
    if layer.att_mode == "v":
        out = np.concatenate([tv, out])
    return out, np.abs(np.where(ii == jj, 0.0, sig)).mean()


@pytest.mark.parametrize("dataset,extra", [("activitynet", ()), ("charades", ("model.att_softmax=true",)),
                                           ("charades", ()), ("activitynet", ("model.att_softmax=false",)),
                                           ("tacos", ()), ("tacos", ("model.att_softmax=false",))])
def test_retention_layer_against_numpy(dataset, extra):
    cfg = tiny_cfg(dataset, "model.att_dropout=0.0", *extra)
    torch.manual_seed(3)
    layer = TM.RetLayer(cfg.model).eval()
    with torch.no_grad():
        layer.learn_vid_ret.weight.normal_()
    nq = 3
    x = torch.randn(1, nq + 16, 32)
    out, lsp = layer(x, nq)
    want, want_sp = np_retention(layer, x[0].double().numpy(), nq, cfg.model.n_heads)
    assert np.allclose(out[0].detach().numpy(), want, atol=2e-5, rtol=1e-4)
    assert abs(float(lsp.detach()) - want_sp) < 1e-6


@pytest.mark.parametrize("att_mode", ["v", "all"])
def test_zero_attention_quirk(att_mode):
    """ret_model.py L145-157: att_softmax False -> zero attention: video tokens (all tokens in mode all) get the
    output Linear's bias; in mode v the query tokens are LN1(T) @ W_txt_V. No gradient reaches W_*_Q / W_*_K."""
    cfg = tiny_cfg("charades", f"model.att_mode={att_mode}", "model.att_softmax=false")
    torch.manual_seed(4)
    layer = TM.RetLayer(cfg.model)
    x = torch.randn(1, 2 + 16, 32)
    out, lsp = layer(x, 2)
    bias = layer.self_attn.linears[0].bias.detach().numpy()
    o = out[0].detach().numpy()
    if att_mode == "v":
        assert np.allclose(o[:2], x[0, :2].numpy() @ layer.W_txt_V.detach().numpy(), atol=1e-6)
        assert np.array_equal(o[2:], np.broadcast_to(bias, (16, 32)))
    else:
        assert np.array_equal(o, np.broadcast_to(bias, (18, 32)))
    (out.sum() + lsp).backward()
    for name in ("W_vid_Q", "W_vid_K", "W_txt_Q", "W_txt_K"):
        assert getattr(layer, name).grad is None
    assert layer.learn_vid_ret.weight.grad is not None  # through the sparsity loss only
    assert float(layer.W_vid_V.grad.abs().max()) == 0.0  # in the graph, zero gradient (then weight-decayed)


# ---------------------------------------------------------------------------------------------- losses


def brute_bce(scores, ious, mask, lo, hi):
    terms = []
    for q in range(scores.shape[0]):
        for i, j in zip(*np.nonzero(mask)):
            y = min(max((ious[q, i, j] - lo) / (hi - lo), 0.0), 1.0)
            p = scores[q, i, j]
            terms.append(-(y * max(math.log(p), -100) + (1 - y) * max(math.log(1 - p), -100)))
    return sum(terms) / len(terms)


def brute_contrastive(feat2ds, sents, ious, gts, mask, lc):
    cells = list(zip(*np.nonzero(mask)))
    B = feat2ds.shape[0]
    unit = lambda a: a / max(np.linalg.norm(a), 1e-12)
    f = [[unit(feat2ds[b, :, i, j]) for (i, j) in cells] for b in range(B)]
    owner = [(b, q) for b in range(B) for q in range(sents[b].shape[0])]
    s_all = [unit(sents[b][q]) for b, q in owner]

    def span_iou(a, c):
        inter = max(min(a[1], c[1]) - max(a[0], c[0]), 0.0)
        return inter / ((a[1] - a[0]) + (c[1] - c[0]) - inter)

    vid_terms, sent_terms = [], []
    for g, (b, q) in enumerate(owner):
        iou1d = np.array([ious[b][q, i, j] for (i, j) in cells])
        top = np.argsort(-iou1d, kind="stable")[:lc.num_pos_proposals]
        for p in top:
            pos = float(f[b][p] @ s_all[g]) - lc.margin
            den = 0.0
            for g2, (b2, q2) in enumerate(owner):
                c = float(f[b][p] @ s_all[g2])
                if g2 == g:
                    den += math.exp((c - lc.margin) / lc.tau_video)
                elif b2 == b and span_iou(gts[b][q], gts[b][q2]) >= lc.sent_removal_iou:
                    continue
                else:
                    den += math.exp(c / lc.tau_video)
            vid_terms.append(pos / lc.tau_video - math.log(den))
            den = math.exp(pos / lc.tau_sent)
            for pp in range(len(cells)):
                c = float(s_all[g] @ f[b][pp]) if iou1d[pp] < lc.neg_video_iou else 0.0
                den += math.exp(c / lc.tau_sent)
            for b2 in range(B):
                if b2 != b:
                    den += sum(math.exp(float(s_all[g] @ f[b2][pp]) / lc.tau_sent) for pp in range(len(cells)))
            sent_terms.append(pos / lc.tau_sent - math.log(den + 1e-6))
    return -np.mean(vid_terms), -np.mean(sent_terms)


@pytest.mark.parametrize("dataset", ["activitynet", "tacos"])
def test_losses_against_brute_force(dataset):
    cfg = tiny_cfg(dataset)
    lc = cfg.loss
    rng = np.random.default_rng(7)
    mask_np = np_mask2d(16, (7, 4))
    mask = torch.tensor(mask_np)
    nq = (2, 3, 1)
    feat2ds = rng.normal(size=(3, 8, 16, 16))
    sents = [rng.normal(size=(k, 8)) for k in nq]
    ious = [rng.uniform(0, 1, size=(k, 16, 16)) for k in nq]
    gts = [np.sort(rng.uniform(0, 10, size=(k, 2)), axis=1) for k in nq]
    gts[1][1] = gts[1][0] + [0.01, 0.0]  # a same-video pair with IoU >= 0.5: removed from L_vid
    lv, ls = ContrastiveLoss(lc, mask)(torch.tensor(feat2ds), [torch.tensor(s) for s in sents],
                                       [torch.tensor(x) for x in ious], [torch.tensor(g) for g in gts])
    wv, ws = brute_contrastive(feat2ds, sents, ious, gts, mask_np, lc)
    assert abs(float(lv) - wv) < 1e-9 * max(1, abs(wv)) and abs(float(ls) - ws) < 1e-9 * max(1, abs(ws))
    scores = rng.uniform(0.01, 0.99, size=(6, 16, 16))
    iou_all = np.concatenate(ious)
    got = BceLoss(lc.min_iou, lc.max_iou, mask)(torch.tensor(scores), torch.tensor(iou_all), 1)
    assert abs(float(got) - brute_bce(scores, iou_all, mask_np, lc.min_iou, lc.max_iou)) < 1e-10


def test_model_train_forward_uses_the_loss_objects():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TM.MRNet(cfg).train()
    batch = make_batch(cfg)
    for m in TD.hash_dropouts(model).values():
        m.p = 0.0
    lv, ls, li, lsp = model(batch, cur_epoch=1)
    last = model.last
    wv, ws = brute_contrastive(last["map2d"].detach().double().numpy(),
                               [t.detach().double().numpy() for t in last["txt_feats"]],
                               [x.double().numpy() for x in batch["all_iou2d"]],
                               [m.double().numpy() for m in batch["moments"]], np_mask2d(16, (7, 4)), cfg.loss)
    assert abs(float(lv.detach()) - wv) < 1e-4 and abs(float(ls.detach()) - ws) < 1e-4
    scores = torch.cat(last["iou_scores"]).detach().double().numpy()
    want = brute_bce(scores, torch.cat(batch["all_iou2d"]).double().numpy(), np_mask2d(16, (7, 4)),
                     cfg.loss.min_iou, cfg.loss.max_iou)
    assert abs(float(li.detach()) - want) < 1e-5
    per_video = sum(float(torch.sigmoid(r.learn_vid_ret.weight.detach().reshape(16, 16))[~torch.eye(16, dtype=bool)]
                          .sum() / 256) for r in model.trans_ret.rets)
    assert abs(float(lsp.detach()) - 3 * per_video) < 1e-5  # summed over layers and the 3 videos (ret_model.py L540)


@pytest.mark.parametrize("epoch", [6, 7])
@pytest.mark.parametrize("raw_sp", [1.7, 1.9])
def test_official_total_doubling(epoch, raw_sp):
    cfg = apply_overrides(load_config("activitynet"), [])  # loss_ratio 0.15, batch 12, w_sparse 10 -> thr 18
    vid, sent, iou = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.5)
    loss, terms = TM.official_total(vid, sent, iou, torch.tensor(raw_sp), cfg, epoch)
    sp = 10 * raw_sp
    rest = 0.1 * 3.0 + 0.1 * 2.0 + sp
    extra = sp if sp >= 18 else 0.0
    want = 0.5 + rest + extra if epoch <= 6 else 0.5 + 0.01 * rest + 0.01 * extra
    assert abs(float(loss) - want) < 1e-5
    assert abs(float(terms["loss_sp"]) - sp) < 1e-5 and abs(float(terms["loss_vid"]) - 0.2) < 1e-6
    # the threshold uses the configured batch size, not the actual one; Charades' loss_ratio 0 always doubles
    small, _ = TM.official_total(vid, sent, iou, torch.tensor(raw_sp), cfg, 1, batch_size=1)
    assert abs(float(small) - (0.5 + rest + sp)) < 1e-5
    cha = load_config("charades")
    got, _ = TM.official_total(vid, sent, iou, torch.tensor(0.0), cha, 1)
    assert abs(float(got) - (0.5 + 0.05 * 5.0)) < 1e-6


# ---------------------------------------------------------------------------------------------- recipe


NO_GRAD_ALWAYS = ("text_encoder.fc_out1.weight", "text_encoder.fc_out1.bias", "text_out.fc_out2.weight",
                  "text_out.fc_out2.bias", "text_out.layernorm.weight", "text_out.layernorm.bias")


ZERO_ATT = tuple(f"trans_ret.rets.{i}.W_{m}_{x}" for i in (0, 1) for m in ("txt", "vid") for x in "QK")
ZERO_GRAD = tuple(f"trans_ret.rets.{i}.{n}" for i in (0, 1) for n in ("W_vid_V", "self_attn.linears.0.weight"))


@pytest.mark.parametrize("extra,frozen,zero", [
    ((), NO_GRAD_ALWAYS, ()),
    (("model.att_mode=v",), NO_GRAD_ALWAYS + tuple(f"trans_ret.rets.{i}.W_txt_{x}" for i in (0, 1) for x in "QK"),
     ()),
    (("model.att_mode=v", "model.att_softmax=false"), NO_GRAD_ALWAYS + ZERO_ATT, ZERO_GRAD),
])
def test_train_step_leaves_gradless_params(extra, frozen, zero):
    """Params whose grad is None are skipped by clip_grad_norm_ and AdamW. Params with an all-zero gradient
    (the zero-attention config) are in the optimizer state, but stay bit-identical too: AdamW's decoupled decay
    multiplies by 1 - lr * wd = 1 - 8e-9, which rounds to 1.0 in float32."""
    cfg = tiny_cfg("activitynet", *extra)
    torch.manual_seed(0)
    model = TM.MRNet(cfg)
    opt, sched = TM.official_optimizer(model, cfg)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == []
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["weight_decay"] == 1e-5
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for step in range(2):
        log = TM.official_train_step(model, opt, make_batch(cfg, seed=step), 1, cfg)
        assert np.isfinite(log["loss"]) and log["grad_norm"] > 0
    params = dict(model.named_parameters())
    for k in frozen:
        assert torch.equal(params[k], before[k]), k
        assert params[k].grad is None and params[k] not in opt.state
    for k in zero:
        assert torch.equal(params[k], before[k]) and float(params[k].grad.abs().max()) == 0 and params[k] in opt.state
    changed = [k for k in params if not torch.equal(params[k], before[k])]
    assert sorted(changed) == sorted(set(params) - set(frozen) - set(zero))
    assert model.proposal_conv.bn[0].num_batches_tracked.item() == 2


def test_checkpoint_round_trip_strict(tmp_path):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TM.MRNet(cfg)
    opt, sched = TM.official_optimizer(model, cfg)
    for epoch in (1, 2):
        TM.official_train_epoch(model, opt, sched, [make_batch(cfg, seed=epoch)], epoch, cfg)
    path = TM.save_official_checkpoint(tmp_path / "pool_model_2e.pth", model, opt, sched, epoch=2)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["model", "optimizer", "scheduler", "epoch"] and raw["epoch"] == 2
    assert len(raw["optimizer"]["param_groups"]) == 2 and raw["optimizer"]["param_groups"][1]["params"] == []
    assert len(raw["optimizer"]["state"]) == len(list(model.parameters())) - len(NO_GRAD_ALWAYS)
    assert raw["scheduler"]["last_epoch"] == 2
    torch.manual_seed(1)
    fresh = TM.MRNet(cfg)
    opt2, sched2 = TM.official_optimizer(fresh, cfg)
    obj = TM.load_official_checkpoint(path, fresh, opt2, sched2)
    assert obj["epoch"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) and fresh.state_dict()[k].dtype == v.dtype
    assert sched2.last_epoch == 2 and len(opt2.state) == len(opt.state)
    # a bare state_dict (checkpoint.py L114-118) and a module.-prefixed one load too
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "bare.pth")
    TM.load_official_checkpoint(tmp_path / "bare.pth", TM.MRNet(cfg))
    # strict: a missing or an extra key, or a wrong shape, is an error naming it
    sd = dict(model.state_dict())
    sd.pop("trans_ret.rets.0.xpos.scale")
    torch.save({"model": sd}, tmp_path / "missing.pth")
    with pytest.raises(JaxprvrError, match="xpos.scale"):
        TM.load_official_checkpoint(tmp_path / "missing.pth", TM.MRNet(cfg))
    with pytest.raises(JaxprvrError, match="unexpected"):
        TM.load_official_checkpoint(path, TM.MRNet(tiny_cfg("activitynet", "model.trans_layers=1")))
    # ... while the official loader keeps the missing key's initial value silently
    target = TM.MRNet(cfg)
    init = target.state_dict()["trans_ret.rets.0.xpos.scale"].clone()
    with torch.no_grad():
        target.trans_ret.rets[0].xpos.scale.mul_(2)
    kept = TM.official_lenient_load(target, sd)
    assert kept == ["trans_ret.rets.0.xpos.scale"]
    assert torch.equal(target.trans_ret.rets[0].xpos.scale, init * 2)
    assert torch.equal(target.featpool.conv.weight, model.featpool.conv.weight)


# ---------------------------------------------------------------------------------------------- evaluation


def f32_iou(a, b):
    a0, a1, b0, b1 = (np.float32(v) for v in (a[0], a[1], b[0], b[1]))
    inter = max(np.float32(min(a1, b1) - max(a0, b0)), np.float32(0))
    return np.float32(inter / np.float32(max(a1, b1) - min(a0, b0)))


def brute_eval(records, preds, nms_thresh, thetas, pw):
    n = preds[0]["iou"].shape[-1]
    hits = np.zeros((2, len(thetas)), int)
    miou, count = 0.0, 0
    for rec, pr in zip(records, preds):
        score = np.power(pr["contrastive"] * np.float32(0.5) + np.float32(0.5), np.float32(pw)) * pr["iou"]
        for q, gt in enumerate(rec["moments"]):
            count += 1
            cands = [((np.float32(np.float32(i * np.float32(rec["duration"])) / n),
                       np.float32(np.float32((j + 1) * np.float32(rec["duration"])) / n)), score[q, i, j])
                     for i in range(n) for j in range(n) if score[q, i, j] != 0]
            cands.sort(key=lambda c: -c[1])
            kept = []
            for span, _ in cands:
                if all(not (f32_iou(span, k) > np.float32(nms_thresh)) for k in kept):
                    kept.append(span)
            for ri, r in enumerate((1, 5)):
                for ti, t in enumerate(thetas):
                    hits[ri, ti] += any(f32_iou(s, gt) >= np.float32(t) for s in kept[:r])
            miou += float(f32_iou(kept[0], gt))
    rec1 = [np.float32(h) / np.float32(count) for h in hits[0]]
    rec5 = [np.float32(h) / np.float32(count) for h in hits[1]]
    out = {}
    for r, vals in ((1, rec1), (5, rec5)):
        for t, v in zip(thetas, vals):
            out[f"R@{r},IoU@{t:.1f}"] = float(v)
    out["R@{1},mIoU"] = miou / count
    out["Best_R1"] = float((np.float32(0) + rec1[0] + rec1[1] + rec1[2]) / np.float32(3))
    out["Best_R5"] = float((np.float32(0) + rec5[0] + rec5[1] + rec5[2]) / np.float32(3))
    return out


@pytest.mark.parametrize("thetas,nms_thresh,pw", [((0.3, 0.5, 0.7), 0.5, 0.5), ((0.1, 0.3, 0.5), 0.4, 0.3)])
def test_official_evaluate_against_brute_force(thetas, nms_thresh, pw):
    rng = np.random.default_rng(11)
    mask = np_mask2d(16, (7, 4))
    records, preds = [], []
    for v, nq in enumerate((3, 1, 4, 2)):
        dur = 16.0 if v % 2 == 0 else 23.7  # 16: grid spans are integers, IoUs hit thresholds exactly
        gts = np.sort(rng.integers(0, 17, size=(nq, 2)), axis=1).astype(np.float32)
        gts[:, 1] = np.maximum(gts[:, 1], gts[:, 0] + 1)
        if v % 2:
            gts = np.sort(rng.uniform(0, dur, size=(nq, 2)), axis=1).astype(np.float32)
        records.append({"duration": dur, "moments": gts})
        preds.append({"contrastive": (rng.uniform(-1, 1, (nq, 16, 16)) * mask).astype(np.float32),
                      "iou": (rng.uniform(0, 1, (nq, 16, 16)) * mask).astype(np.float32)})
    got = TE.official_evaluate(records, preds, nms_thresh, thetas, pw)
    want = brute_eval(records, preds, nms_thresh, thetas, pw)
    assert list(got) == TE.official_keys(thetas)
    assert list(got) == list(want)
    for k in got:
        assert got[k] == pytest.approx(want[k], abs=1e-12) if k == "R@{1},mIoU" else got[k] == want[k], k


def test_nms_strict_and_inference_order():
    moments = torch.tensor([[0., 4.], [0., 2.], [1., 4.], [8., 9.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    kept = TE.nms(moments, scores, 0.5)  # IoU([0,2],[0,4]) = 0.5 is not > 0.5: kept; [1,4] (0.75) suppressed
    assert kept.tolist() == [[0., 4.], [0., 2.], [8., 9.]]
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = TM.MRNet(cfg)
    b = make_batch(cfg, nq=(2, 3, 1))
    first = {k: (v[:2] if isinstance(v, list) else v[:2]) for k, v in b.items()}
    first["idxs"] = [2, 0]
    second = {k: (v[2:] if isinstance(v, list) else v[2:]) for k, v in b.items()}
    second["idxs"] = [1]
    preds = TE.official_inference(model, [first, second])
    assert not model.training and len(preds) == 3
    _, _, c, u = model(b)
    for pos, vid in ((0, 1), (1, 2), (2, 0)):
        assert torch.allclose(preds[pos]["iou"], u[vid], atol=1e-6)
        assert torch.allclose(preds[pos]["contrastive"], c[vid], atol=1e-6)


# ---------------------------------------------------------------------------------------------- batches, dropout


def test_official_batch_from_padded_and_hash_dropout():
    cfg = tiny_cfg()
    b = make_batch(cfg, nq=(2, 1))
    Q = 4
    padded = {"feats": b["feats"].numpy(), "video_valid": np.array([1, 1, 0], np.float32),
              "queries": np.zeros((3, Q, 24), np.float32), "n_queries": np.array([2, 1, 0], np.int32),
              "moments": np.zeros((3, Q, 2), np.float32), "iou2d": np.zeros((3, Q, 16, 16), np.float32),
              "index": np.array([5, 3, -1])}
    padded["feats"] = np.concatenate([padded["feats"], padded["feats"][:1]])
    for v in range(2):
        k = b["queries"][v].shape[0]
        padded["queries"][v, :k] = b["queries"][v].numpy()
        padded["moments"][v, :k] = b["moments"][v].numpy()
        padded["iou2d"][v, :k] = b["all_iou2d"][v].numpy()
    ob = TM.official_batch(padded)
    assert ob["idxs"] == [5, 3] and [q.shape[0] for q in ob["queries"]] == [2, 1]
    torch.manual_seed(0)
    model = TM.MRNet(cfg).eval()
    _, _, c1, _ = model(ob)
    _, _, c2, _ = model(b)
    assert all(torch.equal(x, y) for x, y in zip(c1, c2))
    # armed HashDropouts: one draw per call, B calls per forward for the per-video modules
    model.train()
    names = TD.hash_dropouts(model)
    assert sorted(n for n, m in names.items() if m.p > 0) == sorted(
        ["input_vid_proj.0.net.0", "input_vid_proj.1.net.0"]
        + [f"trans_ret.dropout_{a}.{i}" for a in (1, 2) for i in (0, 1)])

    def run():
        draws = {n: [TD.Draw((17 + v, hash(n) & 0xFFFF)) for v in range(2)] for n, m in names.items() if m.p > 0}
        with TD.arm(model, draws):
            return [float(x.detach()) for x in model(ob, cur_epoch=1)]

    r1, r2 = run(), run()
    assert r1 == r2
    idx = TM.flax_counters((3, Q + 16, 32), 1, list(range(1)) + list(range(Q, Q + 16)))((1, 17, 32), "cpu")
    assert idx[0, 0, 0].item() == (Q + 16) * 32 and idx[0, 1, 0].item() == (Q + 16) * 32 + Q * 32


def test_construction_rng_order():
    """``torch.manual_seed(s); MRNet(cfg)`` draws as RET.__init__ does: featpool, text_encoder, text_out, the
    RetLayers (six randn/d, one Linear, Embedding N(0,1)), the FFNs, ProposalConv (conv0, conv1.., heads iou then
    contrastive), input_vid_proj and a third, discarded LinearLayer (ret_model.py L495-501)."""
    cfg = tiny_cfg("activitynet", "model.trans_layers=1")
    mc = cfg.model
    torch.manual_seed(5)
    model = TM.MRNet(cfg)
    after = torch.rand(3)
    torch.manual_seed(5)
    d = mc.joint_space
    conv1 = torch.nn.Conv1d(mc.input_size, mc.featpool_hidden, 1)
    torch.nn.Linear(mc.text_dim, d), torch.nn.Linear(mc.text_dim, d)
    torch.nn.Linear(d, d), torch.nn.Linear(d, d)
    w = [torch.randn(d, d) / d for _ in range(6)]
    lin0 = torch.nn.Linear(d, d)
    emb = torch.nn.Embedding(mc.num_clips ** 2, 1)
    torch.nn.Linear(d, mc.ffn_dim), torch.nn.Linear(mc.ffn_dim, d)
    k = mc.predictor_kernel
    torch.nn.Conv2d(d, mc.predictor_hidden, k), torch.nn.Conv2d(mc.predictor_hidden, mc.predictor_hidden, k)
    torch.nn.Conv2d(mc.predictor_hidden, d, 1)
    head_c = torch.nn.Conv2d(mc.predictor_hidden, d, 1)
    torch.nn.Linear(mc.featpool_hidden, d)
    last = torch.nn.Linear(d, d)
    torch.nn.Linear(d, d)
    r = model.trans_ret.rets[0]
    assert torch.equal(model.featpool.conv.weight, conv1.weight)
    assert torch.equal(r.W_txt_V, w[5]) and torch.equal(r.W_vid_Q, w[0])
    assert torch.equal(r.self_attn.linears[0].weight, lin0.weight) and torch.equal(r.learn_vid_ret.weight, emb.weight)
    assert torch.equal(model.proposal_conv.conv1x1_contrastive.weight, head_c.weight)
    assert torch.equal(model.input_vid_proj[1].net[1].weight, last.weight)
    assert torch.equal(torch.rand(3), after)
