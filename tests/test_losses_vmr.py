"""MRNet losses (jaxprvr/losses/vmr.py) against a float64 numpy transcription of the official loops.

The reference walks the official code (xian-sh/MRNet ``ret/modeling/ret_model/loss.py`` L6-115,
``ret/engine/trainer.py`` L90-106) sentence by sentence and proposal by proposal on the UNPADDED lists (each
valid video's real queries only, proposals gathered in ``masked_select`` order), in float64; the JAX losses run on
the padded batch. Planted mutants of the reference show that the comparison sees each quirk.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprvr.config import MRNetLossConfig
from jaxprvr.losses.vmr import box_iou, contrastive_losses, iou_bce_loss, mrnet_loss

N = 8
POOLING = (3, 2)
C = 32
Q = 4
RTOL = 2e-5  # float32 JAX vs the float64 reference


def np_mask2d(n, pooling_counts):
    """feat2d.py L6-19 written out: the diagonal, then per group c diagonals at offset += stride (stride doubling)."""
    m = np.zeros((n, n), bool)
    for i in range(n):
        m[i, i] = True
    stride, offset = 1, 0
    for c in pooling_counts:
        for _ in range(c):
            offset += stride
            for i in range(0, n - offset, stride):
                m[i, i + offset] = True
        stride *= 2
    return m


MASK = np_mask2d(N, POOLING)


def np_iou2d(moment, duration, n):
    """utils.py L42-46 in float64: IoU of [i dur/n, (j+1) dur/n] with the GT span."""
    out = np.zeros((n, n))
    s, e = moment
    for i in range(n):
        for j in range(n):
            cs, ce = i * duration / n, (j + 1) * duration / n
            inter = min(ce, e) - max(cs, s)
            union = max(ce, e) - min(cs, s)
            out[i, j] = max(inter, 0.0) / union
    return out


def make_batch(seed, n_q=(3, 4, 2), valid=(1, 1, 0)):
    """B = len(n_q) videos, Q = 4 slots; garbage in the padded slots and the padded video."""
    rng = np.random.default_rng(seed)
    b = len(n_q)
    qm = (np.arange(Q)[None] < np.asarray(n_q)[:, None]).astype(np.float32)
    duration = rng.uniform(20, 60, size=b)
    moments = np.zeros((b, Q, 2), np.float32)
    iou2d = np.zeros((b, Q, N, N), np.float32)
    for v in range(b):
        for q in range(Q):
            if q < n_q[v]:
                # grid-aligned starts/ends make equal IoUs (ties) and same-video overlaps likely
                s = rng.integers(0, N - 2) * duration[v] / N
                e = min(s + rng.integers(1, N // 2 + 1) * duration[v] / N * rng.choice([1.0, 0.9]), duration[v])
                if q == 1:  # a near copy of query 0: removed from each other's L_vid denominators
                    s, e = moments[v, 0, 0] + 0.01, moments[v, 0, 1]
                moments[v, q] = (s, e)
                iou2d[v, q] = np_iou2d(moments[v, q], duration[v], N)
            else:
                moments[v, q] = rng.uniform(0, 5, size=2)  # garbage
                iou2d[v, q] = rng.uniform(size=(N, N))
    iou_scores = (1.0 / (1.0 + np.exp(-10 * rng.uniform(-1, 1, size=(b, Q, N, N))))) * MASK
    batch = {"query_mask": qm, "video_valid": np.asarray(valid, np.float32), "moments": moments, "iou2d": iou2d,
             "n_queries": np.asarray(n_q, np.int32)}
    outputs = {"iou_scores": iou_scores.astype(np.float32),
               "map2d": rng.normal(size=(b, N, N, C)).astype(np.float32),
               "txt_mem": rng.normal(size=(b, Q, C)).astype(np.float32)}
    return batch, outputs


def normalize(x):
    return x / max(np.linalg.norm(x), 1e-12)


def ref_bce(batch, outputs, cfg):
    """BceLoss L16-22: masked_select over the concatenated real queries, BCELoss(reduction='none').mean()."""
    vals = []
    for v in range(len(batch["video_valid"])):
        if not batch["video_valid"][v]:
            continue
        for q in range(int(batch["n_queries"][v])):
            for i in range(N):
                for j in range(N):
                    if MASK[i, j]:
                        p = float(outputs["iou_scores"][v, q, i, j])
                        y = min(max((float(batch["iou2d"][v, q, i, j]) - cfg.min_iou) / (cfg.max_iou - cfg.min_iou),
                                    0.0), 1.0)
                        vals.append(-(y * max(math.log(p), -100) + (1 - y) * max(math.log(1 - p), -100)))
    return float(np.mean(vals))


def topk_stable(values, k):
    """Indices of the k largest, the lower index first among equal values (the documented tie rule)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order[:k]


def ref_contrastive(batch, outputs, cfg, mutant=None):
    """ContrastiveLoss L44-115 as loops over the unpadded lists of the valid videos."""
    vids = [v for v in range(len(batch["video_valid"])) if batch["video_valid"][v]]
    if mutant == "padded_video_included":
        vids = list(range(len(batch["video_valid"])))
    cells = [(i, j) for i in range(N) for j in range(N) if MASK[i, j]]  # masked_select order
    feats = {v: [normalize(outputs["map2d"][v, i, j].astype(np.float64)) for i, j in cells] for v in vids}
    sents, owner = [], []
    for v in vids:
        for q in range(int(batch["n_queries"][v])):
            sents.append(normalize(outputs["txt_mem"][v, q].astype(np.float64)))
            owner.append((v, q))
    k = cfg.num_pos_proposals
    vid_terms, sent_terms = [], []

    def gt_iou(a, b):
        inter = max(min(a[1], b[1]) - max(a[0], b[0]), 0.0)
        union = (a[1] - a[0]) + (b[1] - b[0]) - inter
        return inter / union if union != 0 else float("nan")

    for si, (v, q) in enumerate(owner):
        s = sents[si]
        iou1d = [float(batch["iou2d"][v, q, i, j]) for i, j in cells]
        for p_idx in topk_stable(iou1d, k):
            pf = feats[v][p_idx]
            pos = float(pf @ s) - cfg.margin
            # L_vid: every sentence of the batch, margin on the positive, same-video high-IoU ones removed
            terms = []
            for sj, (v2, q2) in enumerate(owner):
                logit = float(pf @ sents[sj])
                if sj == si:
                    logit -= 0 if mutant == "no_margin_denominator" else cfg.margin
                elif v2 == v:
                    iou = gt_iou(batch["moments"][v, q].astype(np.float64), batch["moments"][v2, q2].astype(np.float64))
                    if not iou < cfg.sent_removal_iou:
                        continue
                terms.append(math.exp(logit / cfg.tau_video))
            vid_terms.append(pos / cfg.tau_video - math.log(sum(terms)))
            # L_sent: the positive, the same video's cells (IoU >= neg_video_iou as exp(0)), other videos' cells
            den = math.exp(pos / cfg.tau_sent)
            for c_idx in range(len(cells)):
                cos = float(s @ feats[v][c_idx])
                if iou1d[c_idx] < cfg.neg_video_iou:
                    den += math.exp(cos / cfg.tau_sent)
                elif mutant != "exp0_dropped":
                    den += math.exp(0.0)
            for v2 in vids:
                if v2 != v:
                    for c_idx in range(len(cells)):
                        den += math.exp(float(s @ feats[v2][c_idx]) / cfg.tau_sent)
            sent_terms.append(pos / cfg.tau_sent - math.log(den + 1e-6))
    return -float(np.mean(vid_terms)), -float(np.mean(sent_terms))


def ref_total(batch, outputs, aux_sp, cfg, epoch, batch_size):
    """trainer.py L90-106."""
    l_iou = ref_bce(batch, outputs, cfg)
    l_vid, l_sent = ref_contrastive(batch, outputs, cfg)
    l_vid, l_sent = l_vid * cfg.w_contrastive, l_sent * cfg.w_contrastive
    l_sp = aux_sp * cfg.w_sparse
    thr = cfg.loss_ratio * batch_size * cfg.w_sparse
    f = 1.0 if epoch <= cfg.only_iou_epoch else 0.01
    loss = l_iou + (l_sent + l_vid + l_sp) * f
    if l_sp >= thr:
        loss += l_sp * f
    return loss, {"loss_iou": l_iou, "loss_vid": l_vid, "loss_sent": l_sent, "loss_sp": l_sp}


ANET = MRNetLossConfig()  # min/max IoU 0.5/1.0, top-1, margin 0.3
TACOS = MRNetLossConfig(min_iou=0.3, max_iou=0.7, num_pos_proposals=3, margin=0.1, w_sparse=20.0, loss_ratio=0.0,
                        only_iou_epoch=100)


@functools.partial(jax.jit, static_argnames="cfg")
def _contrastive_jit(outputs, batch, cfg):
    real = batch["query_mask"] * batch["video_valid"][:, None]
    return contrastive_losses(outputs["map2d"], outputs["txt_mem"], batch["iou2d"], batch["moments"], MASK, real,
                              batch["video_valid"], cfg)


def _jax_contrastive(batch, outputs, cfg):
    return _contrastive_jit(outputs, batch, cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size"))
def _total_jit(outputs, batch, sp, epoch, cfg, batch_size):
    return mrnet_loss(outputs, {"loss_sparsity": sp, "mask2d": MASK}, batch, cfg, epoch, batch_size)


@pytest.mark.parametrize("cfg", [ANET, TACOS], ids=["anet", "tacos"])
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_official_loops(cfg, seed):
    batch, outputs = make_batch(seed)
    l_vid, l_sent = _jax_contrastive(batch, outputs, cfg)
    r_vid, r_sent = ref_contrastive(batch, outputs, cfg)
    np.testing.assert_allclose(float(l_vid), r_vid, rtol=RTOL)
    np.testing.assert_allclose(float(l_sent), r_sent, rtol=RTOL)
    real = batch["query_mask"] * batch["video_valid"][:, None]
    l_iou = iou_bce_loss(jnp.asarray(outputs["iou_scores"]), jnp.asarray(batch["iou2d"]), MASK, jnp.asarray(real),
                         cfg.min_iou, cfg.max_iou)
    np.testing.assert_allclose(float(l_iou), ref_bce(batch, outputs, cfg), rtol=RTOL)


def test_planted_mutants_are_caught():
    """Each mutant of the reference (a quirk dropped, or padding counted) moves a term by more than 20x the
    comparison's tolerance (measured: 1.9e-3, 2.7e-2 and 4.5e-2 relative at this seed)."""
    batch, outputs = make_batch(0)
    l_vid, l_sent = (float(x) for x in _jax_contrastive(batch, outputs, ANET))
    m_vid, _ = ref_contrastive(batch, outputs, ANET, mutant="no_margin_denominator")
    assert abs(m_vid - l_vid) > 20 * RTOL * abs(l_vid)
    _, m_sent = ref_contrastive(batch, outputs, ANET, mutant="exp0_dropped")
    assert abs(m_sent - l_sent) > 20 * RTOL * abs(l_sent)
    m_vid, m_sent = ref_contrastive(batch, outputs, ANET, mutant="padded_video_included")
    assert abs(m_sent - l_sent) > 20 * RTOL * abs(l_sent) and abs(m_vid - l_vid) > 20 * RTOL * abs(l_vid)


def test_padding_contributes_nothing():
    """Garbage in the padded video and slots changes neither the losses nor the gradients of the real entries,
    and the padded entries get zero gradient."""
    batch, outputs = make_batch(2)
    rng = np.random.default_rng(9)
    outputs2 = {k: v.copy() for k, v in outputs.items()}
    outputs2["map2d"][2] = rng.normal(size=outputs2["map2d"][2].shape) * 5
    outputs2["txt_mem"][0, 3] = rng.normal(size=C) * 5
    outputs2["iou_scores"][0, 3] = rng.uniform(0.01, 0.99, size=(N, N)) * MASK

    def f(o):
        loss, _ = mrnet_loss(o, {"loss_sparsity": jnp.float32(0.3), "mask2d": MASK}, batch, ANET, 1, 3)
        return loss

    g = jax.jit(jax.value_and_grad(f))
    (l1, g1), (l2, g2) = g(outputs), g(outputs2)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for k in outputs:
        np.testing.assert_allclose(np.asarray(g1[k]), np.asarray(g2[k]), rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(g1["map2d"][2]) == 0) and np.all(np.asarray(g1["txt_mem"][0, 3]) == 0)
    assert np.all(np.asarray(g1["iou_scores"][0, 3]) == 0)
    assert np.all(np.isfinite(np.asarray(g1["iou_scores"])))


@pytest.mark.parametrize("epoch,loss_ratio", [(1, 0.0), (6, 0.15), (7, 0.15), (7, 0.0), (100, 1e3)])
def test_total_both_sides_of_threshold_and_only_iou(epoch, loss_ratio):
    """trainer.py L90-106 at ONLY_IOU 6: epochs 1/6 (full) and 7/100 (x0.01); the sparsity doubling on and off
    (aux 0.5 x w_sparse 10 = 5 vs thresholds 0, 0.15 x 3 x 10 = 4.5 and 3e4), with the CONFIGURED batch 3."""
    cfg = MRNetLossConfig(loss_ratio=loss_ratio)
    batch, outputs = make_batch(3)
    sp = 0.5
    loss, terms = _total_jit(outputs, batch, jnp.float32(sp), jnp.int32(epoch), cfg, 3)
    want, want_terms = ref_total(batch, outputs, sp, cfg, epoch, 3)
    np.testing.assert_allclose(float(loss), want, rtol=RTOL)
    for k, v in want_terms.items():
        np.testing.assert_allclose(float(terms[k]), v, rtol=RTOL, err_msg=k)
    # the configured batch, not the number of valid videos: 0.15 x 2 x 10 = 3 would double at every epoch here
    doubled = 5.0 >= loss_ratio * 3 * 10
    f = 1.0 if epoch <= 6 else 0.01
    base = want_terms["loss_iou"] + f * (want_terms["loss_vid"] + want_terms["loss_sent"] + 5.0)
    np.testing.assert_allclose(float(loss), base + (f * 5.0 if doubled else 0.0), rtol=RTOL)


def test_top_k_tie_rule():
    """Equal IoUs: the positive is the lower flat cell index (the documented rule), seen through L_vid."""
    batch, outputs = make_batch(4, n_q=(1, 1), valid=(1, 1))
    batch["iou2d"][:] = 0.0
    cells = np.argwhere(MASK)
    (i0, j0), (i1, j1) = cells[3], cells[7]
    batch["iou2d"][0, 0, i0, j0] = batch["iou2d"][0, 0, i1, j1] = 0.8  # tie between cells 3 and 7
    l_vid, _ = _jax_contrastive(batch, outputs, ANET)
    np.testing.assert_allclose(float(l_vid), ref_contrastive(batch, outputs, ANET)[0], rtol=RTOL)
    # the other choice gives another value: the rule is observable
    batch2 = {k: v.copy() for k, v in batch.items()}
    batch2["iou2d"][0, 0, i0, j0] = 0.7
    assert abs(ref_contrastive(batch2, outputs, ANET)[0] - float(l_vid)) > 1e-4


def test_box_iou_known_values():
    a = jnp.asarray([[0.0, 2.0], [1.0, 3.0], [5.0, 5.0]])
    got = np.asarray(box_iou(a, a))
    np.testing.assert_allclose(got[0, 1], 1 / 3)
    np.testing.assert_allclose(got[0, 0], 1.0)
    assert got[0, 2] == 0.0 and np.isnan(got[2, 2])  # 0/0 as in utils.box_iou
