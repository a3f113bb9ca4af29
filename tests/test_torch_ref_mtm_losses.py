"""torch_ref MTM pieces against transcriptions of the official MTM code (tianxinlin666/MTM):
the triplet sampler and loss (``src/Losses/loss.py:103-162``), the full ``loss.forward`` (``:51-101``) with the
optimal-matching block of ``src/Models/MTM/model.py:246-270``, the reconstruction term, ``EMA``
(``src/Opts/optimization.py:187-220``) and the ``best.ckpt`` layout with ``ema_shadow`` (``src/Utils/utils.py:33-43``).

The ``official_*`` functions below are the official text with ``.cuda()`` dropped and ``self.cfg`` passed in;
they draw from the global torch RNG (seeded with ``torch.manual_seed``), torch_ref from a seeded
``torch.Generator``.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from jaxprvr.config import MTMLossConfig
from torch_ref import checkpoints as ckpt
from torch_ref import losses as TL
from torch_ref.optim import EMA, official_param_groups


# ---------------------------------------------------------------------------------------------- official text
def official_get_clip_triplet_loss(cfg, query_context_scores, labels, record=None):
    """MTM ``loss.get_clip_triplet_loss`` (``loss.py:103-162``); ``record`` collects the sampled negative scores
    (``("v2t", i, score)`` / ``("t2v", i, score)``)."""
    record = [] if record is None else record
    v2t_scores = query_context_scores.t()
    t2v_scores = query_context_scores
    labels = np.array(labels)

    # cal_v2t_loss
    v2t_loss = 0
    for i in range(v2t_scores.shape[0]):
        pos_indices_v2t = np.where(labels == i)[0]
        if len(pos_indices_v2t) == 0:
            continue
        pos_pair_scores = torch.mean(v2t_scores[i][pos_indices_v2t])

        neg_indices_v2t = np.where(labels != i)[0]
        if len(neg_indices_v2t) == 0:
            sample_neg_pair_scores = pos_pair_scores
        else:
            neg_pair_scores, _ = torch.sort(v2t_scores[i][neg_indices_v2t], descending=True)
            if cfg['use_hard_negative']:
                sample_idx_end = min(cfg['hard_pool_size'], neg_pair_scores.shape[0])
                sample_neg_pair_scores = neg_pair_scores[torch.randint(0, sample_idx_end, size=(1,)).to(v2t_scores.device)]
            else:
                v2t_sample_max_idx = neg_pair_scores.shape[0]
                sample_neg_pair_scores = neg_pair_scores[torch.randint(0, v2t_sample_max_idx, size=(1,)).to(v2t_scores.device)]
            record.append(("v2t", i, float(sample_neg_pair_scores.detach().reshape(-1)[0])))

        v2t_loss += (cfg['margin'] + sample_neg_pair_scores - pos_pair_scores).clamp(min=0).sum()

    # cal_t2v_loss
    text_indices = torch.arange(t2v_scores.shape[0]).to(t2v_scores.device)
    t2v_pos_scores = t2v_scores[text_indices, labels]

    mask_score = t2v_scores.data
    mask_score[text_indices, labels] = -float('inf')
    _, sorted_scores_indices = torch.sort(mask_score, descending=True, dim=1)

    t2v_neg_scores_list = []
    for i in range(t2v_scores.shape[0]):
        valid_neg_indices = [idx.item() for idx in sorted_scores_indices[i] if idx.item() != labels[i]]

        if len(valid_neg_indices) == 0:
            t2v_neg_scores_list.append(t2v_pos_scores[i])
        else:
            if cfg['use_hard_negative']:
                num_to_sample = min(cfg['hard_pool_size'], len(valid_neg_indices))
                chosen_idx_in_valid = torch.randint(0, num_to_sample, (1,)).item()
                chosen_global_idx = valid_neg_indices[chosen_idx_in_valid]
            else:
                chosen_idx_in_valid = torch.randint(0, len(valid_neg_indices), (1,)).item()
                chosen_global_idx = valid_neg_indices[chosen_idx_in_valid]
            t2v_neg_scores_list.append(t2v_scores[i, chosen_global_idx])
            record.append(("t2v", i, float(t2v_scores[i, chosen_global_idx].detach())))

    if not t2v_neg_scores_list:
        t2v_loss = torch.tensor(0.0, device=t2v_scores.device)
    else:
        t2v_neg_scores = torch.stack(t2v_neg_scores_list)
        t2v_loss = (cfg['margin'] + t2v_neg_scores - t2v_pos_scores).clamp(min=0)
    total_v2t_samples = v2t_scores.shape[0] if v2t_scores.shape[0] > 0 else 1
    total_t2v_samples = t2v_scores.shape[0] if t2v_scores.shape[0] > 0 else 1

    return t2v_loss.sum() / total_t2v_samples + v2t_loss / total_v2t_samples


def official_clip_nce(labels, label_dict, q2ctx_scores):
    """MTM ``model_components.clip_nce.forward`` (``model_components.py:11-27``)."""
    query_bsz = q2ctx_scores.shape[0]
    vid_bsz = q2ctx_scores.shape[1]
    diagnoal = torch.arange(query_bsz).to(q2ctx_scores.device)
    t2v_nominator = q2ctx_scores[diagnoal, labels]
    t2v_nominator = torch.logsumexp(t2v_nominator.unsqueeze(1), dim=1)
    t2v_denominator = torch.logsumexp(q2ctx_scores, dim=1)
    v2t_nominator = torch.zeros(vid_bsz).to(q2ctx_scores)
    v2t_denominator = torch.zeros(vid_bsz).to(q2ctx_scores)
    for i, label in label_dict.items():
        v2t_nominator[i] = torch.logsumexp(q2ctx_scores[label, i], dim=0)
        v2t_denominator[i] = torch.logsumexp(q2ctx_scores[:, i], dim=0)
    return torch.mean(t2v_denominator - t2v_nominator) + torch.mean(v2t_denominator - v2t_nominator)


def official_qdl(cfg, x, label_dict):
    """MTM ``query_diverse_loss.forward`` (``loss.py:15-32``)."""
    mrg, alpha, lamda = cfg['neg_factor']
    bs = x.shape[0]
    x = F.normalize(x, dim=-1)
    cos = torch.matmul(x, x.t())
    N_one_hot = torch.zeros((bs, bs))
    for i, label in label_dict.items():
        N_one_hot[label[0]:(label[-1] + 1), label[0]:(label[-1] + 1)] = torch.ones((len(label), len(label)))
    N_one_hot = N_one_hot - torch.eye(bs)
    neg_exp = torch.exp(alpha * (cos + mrg))
    N_sim_sum = torch.where(N_one_hot == 1, neg_exp, torch.zeros_like(neg_exp))
    focal = torch.where(N_one_hot == 1, cos, torch.zeros_like(cos))
    return (((1 + focal) ** lamda) * torch.log(1 + N_sim_sum)).sum(dim=0).sum() / bs


def official_ot(vid_proposal_feat, video_query, query_labels):
    """MTM ``MTM_Net.forward`` ``model.py:246-270`` (label_dict and the optimal matching ``total_sim``)."""
    label_dict = {}
    for idx, label in enumerate(query_labels):
        if label in label_dict:
            label_dict[label].append(idx)
        else:
            label_dict[label] = [idx]
    total_sim = []
    for vid_idx, idx_list in label_dict.items():
        temp_clip_emb = vid_proposal_feat[vid_idx]
        temp_text_emb = video_query[idx_list]
        if temp_text_emb.shape[0] == 1:
            continue
        sim = -1.0 * torch.matmul(F.normalize(temp_text_emb, dim=-1), F.normalize(temp_clip_emb, dim=-1).t())
        indices = linear_sum_assignment(sim.detach().cpu())
        q_idx, c_idx = indices
        for i in range(q_idx.shape[0]):
            total_sim.append(sim[q_idx[i], c_idx[i]])
    if len(total_sim) > 0:
        total_sim = 1 + torch.stack(total_sim).mean()
    else:
        total_sim = torch.tensor(1.0, device=vid_proposal_feat.device)
    return label_dict, total_sim


def official_loss_forward(cfg, input_list, batch):
    """MTM ``loss.forward`` (``loss.py:51-101``), ``nn.MSELoss(reduction='sum')`` and the factors of ``:43-49``."""
    mse_loss = nn.MSELoss(reduction='sum')
    lambda_recon = cfg.get('lambda_recon', 0.0)
    lambda_clip_trip, lambda_frame_trip, lambda_video_trip = cfg.get('triplet_loss_factor', [1.0, 1.0, 1.0])
    query_labels = batch['text_labels']
    original_text_feat = batch['text_feat']
    original_frame_video_feat = batch['frame_video_features']
    text_mask = batch['text_mask']
    video_mask = batch['videos_mask']
    clip_scale_scores, clip_scale_scores_, label_dict, frame_scale_scores, frame_scale_scores_ = input_list[:5]
    video_scale_scores, video_scale_scores_unnormalized = input_list[5], input_list[6]
    query, ot_loss, reconstructed_text_feat, reconstructed_video_feat = input_list[-4:]

    clip_nce_loss = cfg['loss_factor'][0] * official_clip_nce(query_labels, label_dict, clip_scale_scores_)
    clip_trip_loss = lambda_clip_trip * official_get_clip_triplet_loss(cfg, clip_scale_scores, query_labels)
    frame_nce_loss = cfg['loss_factor'][1] * official_clip_nce(query_labels, label_dict, frame_scale_scores_)
    frame_trip_loss = lambda_frame_trip * official_get_clip_triplet_loss(cfg, frame_scale_scores, query_labels)
    video_nce_loss = cfg['loss_factor'][4] * official_clip_nce(query_labels, label_dict,
                                                               video_scale_scores_unnormalized)
    video_trip_loss = lambda_video_trip * official_get_clip_triplet_loss(cfg, video_scale_scores, query_labels)
    qdl_loss = cfg['loss_factor'][2] * official_qdl(cfg, query, label_dict)
    reconstructed_text_feat_norm = F.normalize(reconstructed_text_feat, dim=-1)
    text_reconstruction_loss = mse_loss(reconstructed_text_feat_norm * text_mask.unsqueeze(-1),
                                        original_text_feat * text_mask.unsqueeze(-1))
    num_text_elements = text_mask.sum() * original_text_feat.shape[-1]
    text_reconstruction_loss = text_reconstruction_loss / (num_text_elements + 1e-6)
    reconstructed_video_feat_norm = F.normalize(reconstructed_video_feat, dim=-1)
    video_reconstruction_loss = mse_loss(reconstructed_video_feat_norm * video_mask.unsqueeze(-1),
                                         original_frame_video_feat * video_mask.unsqueeze(-1))
    num_video_elements = video_mask.sum() * original_frame_video_feat.shape[-1]
    video_reconstruction_loss = video_reconstruction_loss / (num_video_elements + 1e-6)
    total_reconstruction_loss = text_reconstruction_loss + video_reconstruction_loss
    return clip_nce_loss + clip_trip_loss + frame_nce_loss + frame_trip_loss + video_nce_loss + video_trip_loss + \
        qdl_loss + cfg['loss_factor'][3] * ot_loss + lambda_recon * total_reconstruction_loss


# ---------------------------------------------------------------------------------------------- helpers
# (labels, number of videos): videos 1 and 3 without queries; one video; a video whose queries have no negative
LABELS = [((0, 0, 1, 2, 2, 2, 3), 4), ((0, 0, 2, 2, 2), 4), ((0, 0, 0), 1), ((0, 0), 2), ((0, 1, 1, 2, 3, 4, 4, 4), 5)]
CASES = [(lab, b, hard, pool) for lab, b in LABELS for hard, pool in ((False, 20), (True, 2), (True, 20))]


def rand_scores(q, b, seed, ties=False):
    s = torch.rand((q, b), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    return torch.round(s * 2) / 2 if ties else s  # ties: values in {-1, -0.5, 0, 0.5, 1}


def ours_record(scores, labels, t2v, v2t):
    """Our sampled negative scores in the official record format (skipping -1: no official draw)."""
    rec = []
    for i, j in enumerate(v2t.tolist()):
        if j >= 0:
            rec.append(("v2t", i, float(scores[j, i])))
    for i, j in enumerate(t2v.tolist()):
        if j >= 0:
            rec.append(("t2v", i, float(scores[i, j])))
    return rec


# ---------------------------------------------------------------------------------------------- (a) sampler
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("labels,b,hard,pool", CASES)
def test_sampler_reproduces_official_draws(labels, b, hard, pool, ties):
    cfg = {"use_hard_negative": hard, "hard_pool_size": pool, "margin": 0.1}
    for seed in range(3):
        scores = rand_scores(len(labels), b, seed + 10 * b, ties)
        official = []
        torch.manual_seed(seed)
        official_get_clip_triplet_loss(cfg, scores.clone(), list(labels), official)
        after_official = torch.rand(4)  # the global RNG consumed as many draws as ours must
        gen = torch.Generator().manual_seed(seed)
        t2v, v2t = TL.sample_mtm_triplet_negatives(scores, labels, hard=hard, hard_pool_size=pool, generator=gen)
        assert ours_record(scores, labels, t2v, v2t) == official
        torch.testing.assert_close(torch.rand(4, generator=gen), after_official, rtol=0, atol=0)
        lab = np.asarray(labels)
        for i, j in enumerate(t2v.tolist()):  # -1 exactly where no other video exists
            assert (j == -1) == (b == 1) and j != lab[i]
        for i, j in enumerate(v2t.tolist()):  # -1 for a video without queries or with no negative query
            assert (j == -1) == (not (lab == i).any() or (lab == i).all())
            assert j == -1 or lab[j] != i


def test_sampler_hard_pool_is_the_hardest_negatives():
    labels, b = (0, 0, 1, 2, 2, 2, 3), 4
    scores = rand_scores(len(labels), b, 3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        t2v, v2t = TL.sample_mtm_triplet_negatives(scores, labels, hard=True, hard_pool_size=1, generator=gen)
        for q, v in enumerate(t2v.tolist()):  # pool 1: always the highest-scoring other video
            others = [j for j in range(b) if j != labels[q]]
            assert v == max(others, key=lambda j: float(scores[q, j]))
        for v, q in enumerate(v2t.tolist()):
            others = [j for j in range(len(labels)) if labels[j] != v]
            assert q == max(others, key=lambda j: float(scores[j, v]))


def test_sample_negatives_order_clip_frame_video():
    labels, b = (0, 0, 1, 2, 2, 3), 4
    mats = {k: rand_scores(len(labels), b, s) for s, k in enumerate(("clip", "frame", "video"))}
    cfg = {"use_hard_negative": False, "hard_pool_size": 20, "margin": 0.1}
    torch.manual_seed(5)
    official = []
    for k in ("clip", "frame", "video"):  # loss.py:71, :74, :77
        official.append([])
        official_get_clip_triplet_loss(cfg, mats[k].clone(), list(labels), official[-1])
    neg = TL.sample_negatives("mtm", mats, labels, hard=False, hard_pool_size=20,
                              generator=torch.Generator().manual_seed(5))
    assert set(neg) == set(TL.negative_keys("mtm"))
    for k, rec in zip(("clip", "frame", "video"), official):
        assert ours_record(mats[k], labels, neg[f"{k}_t2v"], neg[f"{k}_v2t"]) == rec


# ---------------------------------------------------------------------------------------------- (b) triplet loss
@pytest.mark.parametrize("labels,b,hard,pool", CASES)
def test_triplet_loss_matches_official(labels, b, hard, pool):
    cfg = {"use_hard_negative": hard, "hard_pool_size": pool, "margin": 0.3}
    for seed in range(2):
        base = rand_scores(len(labels), b, seed + 100)
        theirs = base.clone().requires_grad_(True)
        torch.manual_seed(seed)
        official = official_get_clip_triplet_loss(cfg, theirs, list(labels))
        official.backward()
        ours_in = base.clone().requires_grad_(True)
        t2v, v2t = TL.sample_mtm_triplet_negatives(ours_in, labels, hard=hard, hard_pool_size=pool,
                                                   generator=torch.Generator().manual_seed(seed))
        ours = TL.mtm_triplet_loss(ours_in, labels, margin=0.3, t2v_negatives=t2v, v2t_negatives=v2t)
        ours.backward()
        torch.testing.assert_close(ours, official.to(ours.dtype), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours_in.grad, theirs.grad, rtol=1e-12, atol=1e-12)


def test_triplet_loss_one_video_is_the_margin():
    scores = rand_scores(3, 1, 0)
    t2v, v2t = TL.sample_mtm_triplet_negatives(scores, (0, 0, 0), hard=False, hard_pool_size=20)
    assert t2v.tolist() == [-1, -1, -1] and v2t.tolist() == [-1]
    loss = TL.mtm_triplet_loss(scores, (0, 0, 0), margin=0.2, t2v_negatives=t2v, v2t_negatives=v2t)
    torch.testing.assert_close(loss, torch.tensor(0.4, dtype=scores.dtype))  # 3 * 0.2 / 3 + 0.2 / 1


# ---------------------------------------------------------------------------------------------- (c) reconstruction
def test_reconstruction_loss_numpy():
    rng = np.random.default_rng(0)
    recon = rng.standard_normal((3, 5, 4))
    target = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = (rng.random((3, 5)) > 0.4).astype(np.float32)
    rn = recon / np.maximum(np.linalg.norm(recon, axis=-1, keepdims=True), 1e-12)
    want = np.sum((rn * mask[..., None] - target * mask[..., None]) ** 2) / (mask.sum() * 4 + 1e-6)
    got = TL.reconstruction_loss(torch.tensor(recon), target, torch.tensor(mask))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.item(), want, rtol=1e-6)
    empty = TL.reconstruction_loss(torch.tensor(recon), target, np.zeros((3, 5)))
    assert empty.item() == 0.0


# ---------------------------------------------------------------------------------------------- total loss
def _mtm_inputs(labels, b, seed, d=8, n_clips=5, lq=4, lv=6, dq=3, dv=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = len(labels)
    scores = {"clip": torch.tanh(r(q, b)), "clip_raw": r(q, b), "frame": torch.tanh(r(q, b)), "frame_raw": r(q, b),
              "video": torch.tanh(r(q, b)), "video_raw": r(q, b)}
    aux = {"query2": r(q, d), "clip_feats": r(b, n_clips, d), "recon_text": r(q, lq, dq), "recon_video": r(b, lv, dv)}
    batch = {"query_labels": np.asarray(labels, np.int32), "query_feats": r(q, lq, dq).numpy(),
             "query_mask": (torch.rand(q, lq, generator=g) > 0.3).double().numpy(), "frame_feats": r(b, lv, dv),
             "frame_mask": (torch.rand(b, lv, generator=g) > 0.3).double()}
    return scores, aux, batch


LOSS_CFG = MTMLossConfig(margin=0.1, w_clip_nce=0.05, w_frame_nce=0.04, w_qdl=8e-5, w_ot=0.09, w_video_nce=0.3,
                         qdl_margin=0.15, qdl_alpha=32.0, qdl_lambda=1.0, hard_pool_size=2, w_clip_trip=1.0,
                         w_frame_trip=0.5, w_video_trip=2.0, w_recon=0.7)


@pytest.mark.parametrize("labels,b", [((0, 0, 1, 2, 2, 2, 3), 4), ((0, 1, 2), 3), ((0, 0, 0), 1)])
@pytest.mark.parametrize("hard", [False, True])
def test_total_loss_matches_official_forward(labels, b, hard):
    scores, aux, batch = _mtm_inputs(labels, b, seed=len(labels) + b)
    cfg = {"use_hard_negative": hard, "hard_pool_size": LOSS_CFG.hard_pool_size, "margin": LOSS_CFG.margin,
           "loss_factor": [LOSS_CFG.w_clip_nce, LOSS_CFG.w_frame_nce, LOSS_CFG.w_qdl, LOSS_CFG.w_ot, LOSS_CFG.w_video_nce],
           "neg_factor": [LOSS_CFG.qdl_margin, LOSS_CFG.qdl_alpha, LOSS_CFG.qdl_lambda],
           "triplet_loss_factor": [LOSS_CFG.w_clip_trip, LOSS_CFG.w_frame_trip, LOSS_CFG.w_video_trip],
           "lambda_recon": LOSS_CFG.w_recon}
    label_dict, ot = official_ot(aux["clip_feats"], aux["query2"], list(labels))
    input_list = [scores["clip"].clone(), scores["clip_raw"], label_dict, scores["frame"].clone(), scores["frame_raw"],
                  scores["video"].clone(), scores["video_raw"], aux["query2"], ot, aux["recon_text"],
                  aux["recon_video"]]
    obatch = {"text_labels": list(labels), "text_feat": torch.tensor(batch["query_feats"]),
              "text_mask": torch.tensor(batch["query_mask"]), "frame_video_features": batch["frame_feats"],
              "videos_mask": batch["frame_mask"]}
    torch.manual_seed(11)
    official = official_loss_forward(cfg, input_list, obatch)
    loss, terms = TL.total_loss("mtm", scores, aux, batch, LOSS_CFG, hard=hard,
                                generator=torch.Generator().manual_seed(11))
    assert list(terms) == ["clip_nce", "clip_trip", "frame_nce", "frame_trip", "video_nce", "video_trip", "qdl", "ot",
                           "recon_text", "recon_video"]
    # atol: the official 1.0 OT guard is a float32 tensor (0.09 * 1.0 rounds at 3.6e-9); all else is float64
    torch.testing.assert_close(loss, official.to(loss.dtype), rtol=1e-12, atol=1e-8)
    torch.testing.assert_close(sum(terms.values()), loss, rtol=1e-12, atol=1e-12)
    if all(labels.count(v) == 1 for v in set(labels)):  # no video with >= 2 queries: MTM's 1.0 guard
        assert float(terms["ot"]) == pytest.approx(LOSS_CFG.w_ot)
        with pytest.raises(ValueError):  # GMMFormer v2 keeps raising
            TL.optimal_matching_loss(aux["clip_feats"], aux["query2"], labels)


# ---------------------------------------------------------------------------------------------- (d) EMA
def test_ema_matches_numpy_recurrence_and_assign_resume():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model[1].bias.requires_grad_(False)  # frozen: neither registered nor averaged
    ema = EMA.from_model(model, decay=0.8)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.weight"}
    shadow = {n: p.detach().numpy().astype(np.float64).copy() for n, p in model.named_parameters() if p.requires_grad}
    frozen = model[1].bias.detach().clone()
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g))
        ema(model, step)
        d = min(0.8, (1 + step) / (10 + step))  # 0.1, 0.1818, 0.25, 0.3077, 0.3571: the warm-up rules
        for n, p in model.named_parameters():
            if p.requires_grad:
                shadow[n] = (1 - d) * p.detach().numpy() + d * shadow[n]
    for n in shadow:
        np.testing.assert_allclose(ema.shadow[n].numpy(), shadow[n], rtol=1e-5, atol=1e-6)
    assert ema.decay_at(100) == 0.8
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema.assign(model)
    for n, p in model.named_parameters():
        want = ema.shadow[n] if n in ema.shadow else current[n]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)
    torch.testing.assert_close(model[1].bias.detach(), frozen, rtol=0, atol=0)
    ema.resume(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), current[n], rtol=0, atol=0)
    for n in shadow:  # resume leaves the shadow as it was
        np.testing.assert_allclose(ema.shadow[n].numpy(), shadow[n], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- (e) checkpoints
@pytest.fixture(scope="module")
def tiny_mtm():
    from jaxprvr.config import model_config
    import torch_ref  # the MTM twin needs mamba_ssm, which scripts/setup.sh installs (CI runs these tests)

    torch.manual_seed(0)
    cfg = model_config("mtm", hidden_size=32, n_heads=4, q_feat_size=16, visual_feat_dim=24, max_desc_l=6,
                      max_ctx_l=16, map_size=8, num_mamba_layers=1)
    return cfg, torch_ref.build_model(cfg)


@pytest.mark.parametrize("module_prefix", [False, True])
def test_mtm_best_ckpt_with_ema_shadow(tmp_path, tiny_mtm, module_prefix):
    cfg, twin = tiny_mtm
    import torch_ref

    sd = twin.state_dict()
    assert any(".attns." in k for k in sd)
    ema = EMA.from_model(twin, 0.9995)
    for v in ema.shadow.values():
        v.add_(0.5)  # distinct from the weights
    path = tmp_path / "best.ckpt"
    ckpt.save_official(path, "mtm", sd, epoch=4, model_val=77.0, config={"use_ema": True}, ema_shadow=ema.shadow,
                       module_prefix=module_prefix)
    raw = torch.load(path, map_location="cpu", pickle_module=ckpt.RESTRICTED, weights_only=False)
    assert set(raw) == {"config", "epoch", "model_val", "state_dict", "optimizer", "ema_shadow"}
    assert all(k.startswith("module.") == module_prefix for k in raw["ema_shadow"])
    ck = ckpt.load_official(path)
    assert ck.model_name == "mtm" and ck.layout == "gmmformer" and ck.epoch == 4 and ck.model_val == 77.0
    assert list(ck.ema_shadow) == list(ema.shadow)
    assert all(torch.equal(ck.ema_shadow[k], v) for k, v in ema.shadow.items())
    # the optimizer: exactly the parameters of the official get_opts (named_parameters, aliases dropped)
    groups = official_param_groups(twin)
    expected = groups[0]["names"] + groups[1]["names"]
    assert len(expected) == len(list(twin.parameters())) < len(sd)
    pg = ck.optimizer["param_groups"]
    assert [len(g["params"]) for g in pg] == [len(groups[0]["names"]), len(groups[1]["names"])]
    assert pg[0]["params"] + pg[1]["params"] == list(range(len(expected)))
    assert [g["weight_decay"] for g in pg] == [0.01, 0.0]
    fresh = torch_ref.build_model(cfg)
    fresh.load_state_dict(ck.state_dict, strict=True)
    fresh_sd = fresh.state_dict()
    assert all(torch.equal(fresh_sd[k], v) for k, v in sd.items())


def test_official_param_names_alias_free(tiny_mtm):
    _, twin = tiny_mtm
    names = [n for n, _ in twin.named_parameters()]
    sd = twin.state_dict()
    assert ckpt.official_param_names("mtm", sd) == names
    copies = {k: v.clone() for k, v in sd.items()}  # e.g. a state_dict converted from Flax: no shared storage
    assert ckpt.official_param_names("mtm", copies) == names
    assert ckpt.official_param_names("gmmformer_v2", sd) == list(sd)  # other models: unchanged


def test_ema_shadow_absent_is_none_and_other_models_refuse_it(tmp_path):
    sd = {"weight_token": torch.zeros(1, 1, 4), "clip_encoder.bias": torch.zeros(4)}
    path = tmp_path / "best.ckpt"
    ckpt.save_official(path, "gmmformer_v2", sd)
    ck = ckpt.load_official(path)
    assert ck.ema_shadow is None and ck.model_name == "gmmformer_v2" and "ema_shadow" not in ck.raw
    with pytest.raises(ValueError, match="ema_shadow"):
        ckpt.save_official(path, "gmmformer_v2", sd, ema_shadow={"weight_token": torch.ones(1, 1, 4)})
