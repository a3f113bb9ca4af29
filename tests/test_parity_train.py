"""Training parity between the JAX stack and the official-form PyTorch stack (torch_ref).

Per model (MS-SL, GMMFormer, GMMFormer v2):

1. the loss terms of :mod:`torch_ref.losses` (official form, unpadded) equal :mod:`jaxprvr.losses.prvr` on the
   same score matrices / aux features and the same injected negatives (and OT assignment); the torch sampler
   draws as the official code does (checked against a transcription using the global RNG) and its indices can
   be injected;
2. the gradient of the full training loss w.r.t. every parameter, from the same weights (the twin's init plus
   noise, converted with :mod:`parity.convert`), dropout rates 0 in train mode, same negatives and OT assignment,
   is the same in both frameworks;
3. five BertAdam steps (:class:`torch_ref.optim.BertAdam` vs :func:`jaxprvr.optim.bert_adam`) on the same
   batches end at the same parameters.

Parameters are compared by their official torch name. Tolerances are stated where they are used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxprvr.config import GMMFormerV2LossConfig, model_config
from parity import convert
from jaxprvr.losses import prvr as JL
from jaxprvr.models import build_model as build_flax
from jaxprvr.optim import bert_adam, official_weight_decay_mask
import torch_ref
from tests.test_torch_ref import make_batch as torch_ref_batch
from torch_ref import losses as TL
from torch_ref.layers import DyGMMBlock
from torch_ref.optim import BertAdam, official_param_groups
from tests.conftest import FAST_COMPILE

NAMES = ("ms_sl", "gmmformer", "gmmformer_v2")
LABELS = (0, 0, 1, 2, 2, 2, 3, 3)  # 4 videos with 2, 1, 3, 2 queries (contiguous, as the official collate)
N_VIDEOS = 4
# Larger QDL / OT weights and a focal exponent != 1 than the official (0.05, 0.04, 8e-5, 0.09) / (0.15, 32, 1),
# so that every term contributes visibly to the gradients compared below.
LOSS_CFG = GMMFormerV2LossConfig(margin=0.2, w_clip_nce=0.05, w_frame_nce=0.04, w_qdl=0.02, w_ot=0.5, qdl_margin=0.15,
                                 qdl_alpha=8.0, qdl_lambda=2.0, hard_pool_size=2)
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
GRAD_RTOL = 1e-4  # per tensor: ||g_torch - g_jax|| <= GRAD_RTOL * ||g_jax||
STEP_RTOL = 1e-5  # per tensor: ||p_torch - p_jax|| <= STEP_RTOL * ||p_jax||
LR, WARMUP, T_TOTAL, N_STEPS = 1e-3, 0.2, 10, 5  # schedule over the 5 steps: 0, .5, 1, .875, .75


def tiny_cfg(name):
    return model_config(name, hidden_size=32, n_heads=2, q_feat_size=16, visual_feat_dim=12, input_drop=0.0,
                       drop=0.0, max_ctx_l=32, map_size=8, max_desc_l=12)


def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


# ----------------------------------------------------------------------------------------------------
# Official code, transcribed with the global torch RNG (to check the draws of torch_ref.losses)
# ----------------------------------------------------------------------------------------------------

def official_clip_triplet(scores, labels, margin, hard, pool):
    """ms-sl method/model.py:282-320 (GMMFormer src/Losses/loss.py:80-116), the global RNG."""
    v2t_scores, t2v_scores, labels = scores.t(), scores, np.array(labels)
    v2t_loss = 0
    for i in range(v2t_scores.shape[0]):
        pos = torch.mean(v2t_scores[i][np.where(labels == i)])
        neg, _ = torch.sort(v2t_scores[i][np.where(labels != i)[0]], descending=True)
        sample = neg[0] if hard else neg[torch.randint(0, neg.shape[0], size=(1,))]
        v2t_loss += (margin + sample - pos).clamp(min=0).sum()
    idx = torch.arange(t2v_scores.shape[0])
    pos = t2v_scores[idx, labels]
    masked = t2v_scores.data.clone()
    masked[idx, labels] = 999
    _, order = torch.sort(masked, descending=True, dim=1)
    hi = min(1 + pool, t2v_scores.shape[1]) if hard else t2v_scores.shape[1]
    neg = t2v_scores[idx, order[idx, torch.randint(1, hi, size=(t2v_scores.shape[0],))]]
    return (margin + neg - pos).clamp(min=0).sum() / len(t2v_scores) + v2t_loss / len(v2t_scores)


def official_frame_triplet(scores, margin, hard, pool):
    """ms-sl method/model.py:322-375, the global RNG."""
    n = len(scores)
    idx = torch.arange(n)
    pos = scores[idx, idx]
    masked = scores.data.clone()
    masked[idx, idx] = 999

    def neg_scores(s, sm):
        _, order = torch.sort(sm, descending=True, dim=1)
        hi = min(1 + pool, n) if hard else n
        return s[idx, order[idx, torch.randint(1, hi, size=(n,))]]

    a = neg_scores(scores, masked)
    b = neg_scores(scores.t(), masked.t())
    return (torch.clamp(margin + a - pos, min=0).sum() + torch.clamp(margin + b - pos, min=0).sum()) / n


# ----------------------------------------------------------------------------------------------------
# 1. Losses on given score matrices
# ----------------------------------------------------------------------------------------------------

def _random_inputs(name, seed):
    rng = np.random.default_rng(seed)
    n_q = len(LABELS)
    f_cols = n_q if name == "ms_sl" else N_VIDEOS
    scores = {"clip": rng.uniform(-1, 1, (n_q, N_VIDEOS)), "clip_raw": rng.normal(0, 3, (n_q, N_VIDEOS)),
              "frame": rng.uniform(-1, 1, (n_q, f_cols)), "frame_raw": rng.normal(0, 3, (n_q, f_cols))}
    aux = {"query2": rng.normal(size=(n_q, 8)), "clip_feats": rng.normal(size=(N_VIDEOS, 6, 8))}
    scores = {k: v.astype(np.float32) for k, v in scores.items()}
    aux = {k: v.astype(np.float32) for k, v in aux.items()}
    batch = {"query_labels": np.asarray(LABELS, np.int32), "query_valid": np.ones(n_q, np.float32),
             "video_valid": np.ones(N_VIDEOS, np.float32)}
    return scores, aux, batch


def _jax_total(name, scores, aux, batch, negatives):
    negs = {k: jnp.asarray(_np(v), jnp.int32) for k, v in negatives.items()} if negatives is not None else None
    return JL.total_loss(name, {k: jnp.asarray(v) for k, v in scores.items()},
                         {k: jnp.asarray(v) for k, v in aux.items()}, batch, LOSS_CFG, jax.random.key(0),
                         hard=False, negatives=negs)


def _assert_terms_equal(t_terms, j_terms, msg=""):
    assert set(t_terms) == set(j_terms), (sorted(t_terms), sorted(j_terms))
    for k in j_terms:
        np.testing.assert_allclose(_np(t_terms[k]), np.asarray(j_terms[k]), rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   err_msg=f"{msg} {k}")


def _check_negatives(name, negs, scores, hard):
    """Sampled indices are valid negatives, from the top pool when ``hard``."""
    lab = np.asarray(LABELS)
    pool = LOSS_CFG.hard_pool_size
    pairs = [("clip", "clip_t2v", "clip_v2t")]
    if name != "ms_sl":
        pairs.append(("frame", "frame_t2v", "frame_v2t"))
    for sk, t2v_k, v2t_k in pairs:
        s = scores[sk]
        t2v, v2t = _np(negs[t2v_k]), _np(negs[v2t_k])
        assert t2v.shape == (len(lab),) and v2t.shape == (N_VIDEOS,)
        assert np.all(t2v != lab) and np.all(lab[v2t] != np.arange(N_VIDEOS))
        if hard:
            for q in range(len(lab)):  # among the `pool` highest-scoring other videos
                others = sorted((v for v in range(N_VIDEOS) if v != lab[q]), key=lambda v: -s[q, v])
                assert t2v[q] in others[:pool]
            for v in range(N_VIDEOS):  # v2t: the single hardest other-video query
                others = np.where(lab != v)[0]
                assert v2t[v] == others[np.argmax(s[others, v])]
    if name == "ms_sl":
        n = len(lab)
        row, col = _np(negs["frame_row"]), _np(negs["frame_col"])
        assert np.all(row != np.arange(n)) and np.all(col != np.arange(n))
        if hard:
            s = scores["frame"]
            for i in range(n):
                assert row[i] in [j for j in np.argsort(-s[i]) if j != i][:pool]
                assert col[i] in [j for j in np.argsort(-s[:, i]) if j != i][:pool]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("hard", [False, True])
def test_losses_match_jax_with_injected_negatives(name, hard):
    for seed in range(3):
        scores, aux, batch = _random_inputs(name, seed)
        t_scores = {k: torch.from_numpy(v) for k, v in scores.items()}
        t_aux = {k: torch.from_numpy(v) for k, v in aux.items()}
        negs = TL.sample_negatives(name, t_scores, batch["query_labels"], hard=hard,
                                   hard_pool_size=LOSS_CFG.hard_pool_size,
                                   generator=torch.Generator().manual_seed(seed))
        assert set(negs) == set(JL.negative_keys(name)) == set(TL.negative_keys(name))
        _check_negatives(name, negs, scores, hard)
        # sampling inside total_loss == sampling outside + injection (same generator state)
        loss_s, terms_s = TL.total_loss(name, t_scores, t_aux, batch, LOSS_CFG, hard=hard,
                                        generator=torch.Generator().manual_seed(seed))
        loss_t, terms_t = TL.total_loss(name, t_scores, t_aux, batch, LOSS_CFG, negs)
        for k in terms_t:
            assert torch.equal(terms_s[k], terms_t[k]), k
        # torch (official form, Hungarian by scipy) vs JAX (masked form, its own Hungarian)
        loss_j, terms_j = _jax_total(name, scores, aux, batch, negs)
        _assert_terms_equal(terms_t, terms_j, f"{name} seed {seed}")
        np.testing.assert_allclose(_np(loss_t), np.asarray(loss_j), rtol=LOSS_RTOL, atol=LOSS_ATOL)
        if name == "gmmformer_v2":  # an injected assignment, equal to neither framework's own matching
            assign = np.full(len(LABELS), -1, np.int64)
            for v, qs in TL.label_dict(LABELS).items():
                if len(qs) > 1:
                    assign[qs] = np.random.default_rng(seed).permutation(aux["clip_feats"].shape[1])[:len(qs)]
            negs_ot = {**negs, "ot_assignment": torch.from_numpy(assign)}
            _, terms_t2 = TL.total_loss(name, t_scores, t_aux, batch, LOSS_CFG, negs_ot)
            _, terms_j2 = _jax_total(name, scores, aux, batch, negs_ot)
            _assert_terms_equal(terms_t2, terms_j2, f"{name} injected OT seed {seed}")
            # the Hungarian matching minimises the matched cost: an arbitrary assignment is not lower
            assert float(terms_t2["ot"]) >= float(terms_t["ot"]) - 1e-6
            own = TL.optimal_matching_assignment(t_aux["clip_feats"], t_aux["query2"], LABELS)
            _, terms_t3 = TL.total_loss(name, t_scores, t_aux, batch, LOSS_CFG, {**negs, "ot_assignment": own})
            assert torch.equal(terms_t3["ot"], terms_t["ot"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("hard", [False, True])
def test_sampler_reproduces_official_global_rng_draws(name, hard):
    """With no generator the draws use the global RNG in the official order: the triplet terms equal a
    transcription of the official functions run after the same ``torch.manual_seed``."""
    scores, aux, batch = _random_inputs(name, 5)
    t_scores = {k: torch.from_numpy(v) for k, v in scores.items()}
    t_aux = {k: torch.from_numpy(v) for k, v in aux.items()}
    pool, m = LOSS_CFG.hard_pool_size, LOSS_CFG.margin
    for seed in range(3):
        torch.manual_seed(seed)
        want_clip = official_clip_triplet(t_scores["clip"], LABELS, m, hard, pool)
        if name == "ms_sl":
            want_frame = official_frame_triplet(t_scores["frame"], m, hard, pool)
        else:
            want_frame = official_clip_triplet(t_scores["frame"], LABELS, m, hard, pool)
        torch.manual_seed(seed)
        _, terms = TL.total_loss(name, t_scores, t_aux, batch, LOSS_CFG, hard=hard)
        torch.testing.assert_close(terms["clip_trip"], want_clip, rtol=0, atol=0)
        torch.testing.assert_close(terms["frame_trip"], want_frame, rtol=0, atol=0)


def test_single_query_batch_matching_raises_as_officially():
    x = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="no video"):
        TL.optimal_matching_loss(x, torch.randn(3, 4), [0, 1, 2])


# ----------------------------------------------------------------------------------------------------
# Shared model setup: one init converted both ways (parity.convert), batches, one compiled JAX loss+grad
# ----------------------------------------------------------------------------------------------------


def by_torch_name(name, tree) -> dict[str, np.ndarray]:
    """A Flax-layout tree (params, grads) -> ``{official torch name: numpy array in torch layout}``."""
    return dict(convert.flax_to_arrays(name, tree))


def load_into_twin(name, twin, params):
    twin.load_state_dict(convert.flax_to_torch(name, params), strict=True)
    return twin


def decay_by_torch_name(name, mask_tree) -> dict[str, bool]:
    flat = convert.flatten(mask_tree)
    return {e.torch: bool(flat[e.flax]) for e in convert.table(name)}


def make_batch(cfg, seed):
    # frame padding inside the batch (frame_mask), no padded videos or queries; 3-11 tokens per query
    return torch_ref_batch(cfg, lens=(20, 9, 32, 5), labels=LABELS, seed=seed, max_tokens=11)


@functools.lru_cache(maxsize=None)
def setup(name):
    """``(cfg, params, batches, grad_fn)``: the twin's init + noise, converted to Flax; ``grad_fn(params, batch,
    negatives) -> ((loss, terms), grads)`` compiled on its first call."""
    cfg = tiny_cfg(name)
    model = build_flax(cfg)
    batches = [make_batch(cfg, 100 + s) for s in range(N_STEPS)]
    torch.manual_seed(0)
    init = torch_ref.build_model(cfg).state_dict()  # the official init (N(0, 0.02^2) Linear/Embedding, LN (1, 0))
    # + N(0, 0.1^2) on every tensor: non-trivial biases / LayerNorms, and weights well above the official init. At
    # that init the DyGMM branch weighting (layer1/layer2, weight_token) is nearly flat and its gradients are
    # float32 cancellation residues (weight_token's at ~1e-4 relative precision), which no float32 comparison can
    # pin down to 1e-4.
    rng = np.random.default_rng(1)
    noisy = {k: v.numpy() + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()}
    params = jax.tree_util.tree_map(jnp.asarray, convert.torch_to_flax(name, noisy))

    def loss_fn(p, batch, negatives):
        scores, aux = model.apply({"params": p}, batch, train=True, rngs={"dropout": jax.random.key(1)})
        return JL.total_loss(name, scores, aux, batch, LOSS_CFG, jax.random.key(2), hard=False, negatives=negatives)

    jitted = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    compiled = []

    def grad_fn(p, batch, negatives):
        if not compiled:
            compiled.append(jitted.lower(p, batch, negatives).compile(FAST_COMPILE))
        return compiled[0](p, batch, negatives)

    return cfg, params, batches, grad_fn


def torch_loss_and_negatives(name, twin, batch, step, negatives=None):
    """Forward + official loss on the twin; negatives drawn by torch_ref (hard on odd steps), OT assignment
    by scipy, unless given."""
    scores, aux = twin(batch, train=True)
    if negatives is None:
        negatives = TL.sample_negatives(name, scores, batch["query_labels"], hard=bool(step % 2),
                                        hard_pool_size=LOSS_CFG.hard_pool_size,
                                        generator=torch.Generator().manual_seed(step))
        if name == "gmmformer_v2":
            negatives["ot_assignment"] = TL.optimal_matching_assignment(aux["clip_feats"], aux["query2"],
                                                                        batch["query_labels"])
    loss, terms = TL.total_loss(name, scores, aux, batch, LOSS_CFG, negatives)
    return loss, terms, negatives


def _jnegs(negatives):
    return {k: jnp.asarray(_np(v), jnp.int32) for k, v in negatives.items()}


ZERO_GRAD_FLOOR = 1e-6  # of the largest gradient norm: analytically zero tensor gradients measure <= 1e-7 of it
# here, the smallest genuine ones >= 1e-5 (Gaussian-branch key biases)


def _zero_grad_leaves(t_grads, j_grads):
    """Names whose gradient is float noise in *both* frameworks: norm below ZERO_GRAD_FLOOR x the largest
    gradient norm."""
    top = max(np.linalg.norm(g) for g in j_grads.values())
    return {k for k in j_grads
            if np.linalg.norm(j_grads[k]) < ZERO_GRAD_FLOOR * top and np.linalg.norm(t_grads[k]) < ZERO_GRAD_FLOOR * top}


def expected_zero_grad(name: str) -> bool:
    """Tensors whose gradient is zero analytically: the key bias of every attention whose softmax is shift
    invariant along the keys (plain attention, GMM branch ``attn0``, the DyGMM cross attention ``ca``; the
    Gaussian branches ``attn1..`` multiply the scores by a mask, which breaks the invariance), and the DyGMM
    ``layer2.bias`` (the same logit offset for every branch of the softmax over branches)."""
    parts = name.split(".")
    if name.endswith("self.key.bias"):
        return not any(p.startswith("attn") and p != "attn0" for p in parts)
    return len(parts) == 3 and parts[1:] == ["layer2", "bias"]  # <DyGMM block>.layer2.bias


class DyGMMProbe:
    """Finds the *elements* of a DyGMM ``layer1.bias`` whose gradient is zero analytically.

    The branch weights are ``softmax_k(layer2(relu(layer1(C_k))) / T)`` over the branches ``k``. For a unit
    ``j`` of ``layer1`` that is active for every branch of a video (or inactive for all), ``layer1.bias[j]``
    shifts all branch logits of that video by the same ``layer2.weight[:, j] * db``, to which the softmax is
    invariant; when that holds for every video of the batch, ``d loss / d layer1.bias[j] = 0``. Records the
    pre-activations ``layer1(C)`` ``(N, K, D)`` of the last forward with hooks."""

    def __init__(self, twin):
        self.pre = {}
        for mod_name, mod in twin.named_modules():
            if isinstance(mod, DyGMMBlock):
                mod.layer1.register_forward_hook(functools.partial(self._hook, f"{mod_name}.layer1.bias"))

    def _hook(self, key, module, inputs, output):
        self.pre[key] = output.detach().cpu().numpy()

    def zero_elements(self) -> dict[str, np.ndarray]:
        out = {}
        for key, pre in self.pre.items():
            active = pre > 0
            uniform = active.all(axis=1) | (~active).all(axis=1)  # (N, D): same pattern on every branch
            out[key] = uniform.all(axis=0)
        return out


def zero_grad_masks(t_grads, j_grads, probe=None) -> dict[str, np.ndarray]:
    """Boolean masks of the gradient entries that are zero analytically, by torch name (only non-empty ones):
    whole tensors (:func:`expected_zero_grad`) and the DyGMM ``layer1.bias`` entries (:class:`DyGMMProbe`).
    Checks that each masked entry is float noise in both frameworks (|g| < ZERO_GRAD_FLOOR x the largest
    gradient norm) and that the tensors found by that floor are exactly the expected ones."""
    top = max(np.linalg.norm(g) for g in j_grads.values())
    masks = {k: np.ones(j_grads[k].shape, bool) for k in j_grads if expected_zero_grad(k)}
    assert set(masks) == _zero_grad_leaves(t_grads, j_grads), sorted(_zero_grad_leaves(t_grads, j_grads))
    if probe is not None:
        for k, m in probe.zero_elements().items():
            masks[k] = masks.get(k, np.zeros(j_grads[k].shape, bool)) | m
    for k, m in masks.items():
        for g in (t_grads[k], j_grads[k]):
            assert np.all(np.abs(g[m]) < ZERO_GRAD_FLOOR * top), k
    return {k: m for k, m in masks.items() if m.any()}


# ----------------------------------------------------------------------------------------------------
# 2. Gradients of the full training loss
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_training_gradients_match(name):
    cfg, params, batches, grad_fn = setup(name)
    twin = load_into_twin(name, torch_ref.build_model(cfg), params)
    probe = DyGMMProbe(twin)
    batch = batches[1]  # step 1 draws hard negatives
    loss_t, terms_t, negs = torch_loss_and_negatives(name, twin, batch, 1)
    twin.zero_grad()
    loss_t.backward()
    t_grads = {n: _np(p.grad) for n, p in twin.named_parameters()}
    (loss_j, terms_j), grads = grad_fn(params, batch, _jnegs(negs))
    _assert_terms_equal(terms_t, terms_j, name)
    for k, v in terms_j.items():  # every term is present and non-trivial
        assert abs(float(v)) > 1e-4, k
    j_grads = by_torch_name(name, grads)
    assert set(t_grads) == set(j_grads) == set(twin.state_dict())
    zero = zero_grad_masks(t_grads, j_grads, probe)  # asserts: masked entries are noise in both
    worst = 0.0
    for k in sorted(j_grads):
        t, j = t_grads[k], j_grads[k]
        assert t.shape == j.shape, k
        keep = ~zero.get(k, np.zeros(j.shape, bool))
        if not keep.any():
            continue
        t, j = t[keep], j[keep]
        rel = np.linalg.norm(t - j) / np.linalg.norm(j)
        worst = max(worst, rel)
        assert rel <= GRAD_RTOL, f"{k}: norm-relative difference {rel:.2e}"
        # elementwise: 1e-4 relative, with an absolute floor of 1e-4 x the tensor's largest entry: entries
        # that are small sums of cancelling terms carry float32 errors at the scale of the tensor (measured up
        # to ~2e-5 of its largest entry), not at their own
        np.testing.assert_allclose(t, j, rtol=GRAD_RTOL, atol=GRAD_RTOL * np.abs(j).max(), err_msg=k)
    print(f"{name}: max norm-relative gradient difference {worst:.2e}; analytically zero: "
          f"{ {k: int(m.sum()) for k, m in zero.items()} }")


# ----------------------------------------------------------------------------------------------------
# 3. Five BertAdam steps
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_five_bert_adam_steps_match(name):
    cfg, params, batches, grad_fn = setup(name)
    twin = load_into_twin(name, torch_ref.build_model(cfg), params)
    groups = official_param_groups(twin)
    # the torch substring rule and the Flax mask agree on every tensor
    decay_t = {n: g["weight_decay"] > 0 for g in groups for n in g["names"]}
    assert decay_t == decay_by_torch_name(name, official_weight_decay_mask(params))
    opt_t = BertAdam(groups, lr=LR, warmup=WARMUP, t_total=T_TOTAL, schedule="warmup_linear", weight_decay=0.01,
                     max_grad_norm=1.0)
    tx = bert_adam(LR, WARMUP, T_TOTAL, weight_decay=0.01, weight_decay_mask=official_weight_decay_mask(params),
                   max_grad_norm=1.0)

    def apply_update(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p_j, state_j = params, tx.init(params)
    update = None
    probe = DyGMMProbe(twin)
    zero: dict[str, np.ndarray] = {}  # entries with an analytically zero gradient at some step
    for step, batch in enumerate(batches):
        loss_t, _, negs = torch_loss_and_negatives(name, twin, batch, step)
        opt_t.zero_grad()
        loss_t.backward()
        (loss_j, _), g_j = grad_fn(p_j, batch, _jnegs(negs))
        np.testing.assert_allclose(_np(loss_t), np.asarray(loss_j), rtol=1e-5, err_msg=f"loss at step {step}")
        for k, m in zero_grad_masks({n: _np(p.grad) for n, p in twin.named_parameters()},
                                    by_torch_name(name, g_j), probe).items():
            zero[k] = zero.get(k, np.zeros(m.shape, bool)) | m
        opt_t.step()
        if update is None:
            update = jax.jit(apply_update).lower(g_j, state_j, p_j).compile(FAST_COMPILE)
        p_j, state_j = update(g_j, state_j, p_j)
    p_t = {n: _np(p) for n, p in twin.named_parameters()}
    p_jt = by_torch_name(name, p_j)
    p0 = by_torch_name(name, params)
    # Entries whose gradient is analytically zero get float noise as gradient, different in each framework; Adam
    # turns it into steps of arbitrary sign: m / (sqrt(v) + 1e-6) is about 0.1 g / 1e-6 for noise g << 1e-6, and
    # up to about +-3 once the noise exceeds eps (no bias correction: m = 0.1 g, sqrt(v) = 0.03 |g| at the
    # first noisy step), times the scheduled lr. The weight decay of these (bias) entries is 0. They are
    # compared with an absolute tolerance of a few lr (measured here: < 0.1 lr).
    noise_atol = 3 * LR
    worst, worst_noise = 0.0, 0.0
    for k in sorted(p_jt):
        t, j = p_t[k], p_jt[k]
        mask = zero.get(k, np.zeros(j.shape, bool))
        assert np.any(j[~mask] != p0[k][~mask]) or mask.all(), f"{k} did not move"
        if mask.any():
            worst_noise = max(worst_noise, float(np.abs(t[mask] - j[mask]).max()))
            assert np.abs(t[mask] - j[mask]).max() <= noise_atol, k
        if mask.all():
            continue
        t, j = t[~mask], j[~mask]
        rel = np.linalg.norm(t - j) / np.linalg.norm(j)
        worst = max(worst, rel)
        assert rel <= STEP_RTOL, f"{k}: norm-relative difference {rel:.2e} after {N_STEPS} steps"
    print(f"{name}: max norm-relative parameter difference after {N_STEPS} steps {worst:.2e}; zero-gradient "
          f"entries { {k: int(m.sum()) for k, m in zero.items()} } moved apart by <= {worst_noise / LR:.3f} lr")


def test_bert_adam_schedule_and_official_groups():
    """torch_ref.optim schedule vs jaxprvr.optim.warmup_linear; group weight decay as officially."""
    from jaxprvr.optim import warmup_linear as jax_warmup_linear
    from torch_ref.optim import ConstantLR, WarmupLinearSchedule, warmup_linear

    for warmup in (0.3, 0.01, -1):
        sched = WarmupLinearSchedule(warmup=warmup, t_total=10)
        for step in range(13):
            np.testing.assert_allclose(sched.get_lr(step), jax_warmup_linear(step, warmup, 10), rtol=1e-12)
            np.testing.assert_allclose(warmup_linear(step / 10, max(warmup, 0.0)), sched.get_lr(step), rtol=1e-12)
    assert WarmupLinearSchedule(warmup=0.1, t_total=-1).get_lr(5) == 1.0 == ConstantLR().get_lr(3)
    with pytest.raises(ValueError):
        WarmupLinearSchedule(warmup=1.0, t_total=10)
    # The group's weight_decay (officially the literal 0.01) overrides the optimizer argument: with zero gradients
    # and a constant lr of 1, a decayed tensor becomes 0.99 p and a no-decay tensor stays.
    model = torch.nn.Sequential()
    model.add_module("dense", torch.nn.Linear(3, 2))
    model.add_module("LayerNorm", torch.nn.LayerNorm(2))
    groups = official_param_groups(model)
    assert groups[0]["names"] == ["dense.weight"]
    assert groups[1]["names"] == ["dense.bias", "LayerNorm.weight", "LayerNorm.bias"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = BertAdam(groups, lr=1.0, schedule=None, weight_decay=0.5)
    assert opt.get_lr() == [0]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.get_lr() == [1.0] * 4
    for n, p in model.named_parameters():
        want = before[n] * (0.99 if n == "dense.weight" else 1.0)
        torch.testing.assert_close(p.detach(), want, rtol=1e-7, atol=0)
