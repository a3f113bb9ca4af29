"""``python -m parity.check``: does jaxprvr compute what the PyTorch twin computes, with these weights?

Runs one model in both frameworks from the same weights (an official checkpoint with ``--ckpt``, otherwise the
official PyTorch init) and the same inputs, and prints one row per stage: the maximum absolute difference, the
maximum relative difference and PASS/FAIL against the stage's tolerance (docs/parity.md):

==============  ==================================================================  =========================
group           what is compared                                                    tolerance (float32)
==============  ==================================================================  =========================
``convert``     torch -> Flax -> torch round trip of every tensor                   bit-exact
``block``       each block alone, fed the same input (attention flavours,          ``|d| <= 1e-6 + 1e-5 |t|``,
                Gaussian attention, GMM/DyGMM blocks, proposals, key-clip          else judged vs float64
                attention, pooling)                                                (:func:`compare_blocks`)
``model``       every score matrix and every named ``aux`` stage, eval mode         ``|d| <= 1e-4 + 1e-4 |t|``
``loss``        every loss term from the same scores and injected negatives         ``|d| <= 1e-6 + 1e-5 |t|``
``grad``        d(total loss)/d(parameter), train mode with dropout off, per        ``||d|| <= 1e-4 ||g||``
                tensor (worst shown) + eps32 x the largest ``||g||``
``train``       parameters after 5 BertAdam steps on the same batches and           ``||d|| <= 1e-5 ||p||``,
                negatives (per tensor; see :func:`compare_training`)               else judged vs float64
``metrics``     R@1/5/10/100 and SumR: one score matrix through both metric         identical / ``<= 0.1``
                codes; a full evaluation on a synthetic gallery in each framework
==============  ==================================================================  =========================

``max rel`` is ``max |jax - torch| / (|torch| + atol)`` elementwise (for ``grad``/``train``: the worst
per-tensor ``||jax - torch|| / ||torch||``). Exit status 0 when every row passes, 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jaxprvr.errors import JaxprvrError

BLOCK = (1e-5, 1e-6)  # rtol, atol
MODEL = (1e-4, 1e-4)
F64_FACTOR = 10.0  # a block outside BLOCK passes if its error vs float64 is <= this x torch's (compare_blocks)
GRAD_REL = 1e-4
TRAIN_REL = 1e-5
METRIC_ABS = 0.1
METRIC_KEYS = ("r1", "r5", "r10", "r100", "sumr")


@dataclasses.dataclass
class Row:
    group: str
    stage: str
    max_abs: float
    max_rel: float
    tolerance: str
    passed: bool
    note: str = ""


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def close_row(group, stage, jax_value, torch_value, rtol, atol, note="") -> Row:
    """An elementwise ``|jax - torch| <= atol + rtol |torch|`` row (integers must be equal)."""
    a, t = _np(jax_value), _np(torch_value)
    if a.shape != t.shape:
        return Row(group, stage, float("inf"), float("inf"), "same shape", False, f"shapes {a.shape} vs {t.shape}")
    if np.issubdtype(t.dtype, np.integer) or np.issubdtype(a.dtype, np.integer):
        d = np.abs(a.astype(np.int64) - t.astype(np.int64))
        m = float(d.max()) if d.size else 0.0
        return Row(group, stage, m, m, "equal", m == 0, note)
    a64, t64 = a.astype(np.float64), t.astype(np.float64)
    d = np.abs(a64 - t64)
    if d.size == 0:
        return Row(group, stage, 0.0, 0.0, f"rtol {rtol:g} atol {atol:g}", True, note)
    ok = bool(np.all(d <= atol + rtol * np.abs(t64)) and np.all(np.isfinite(a64)) and np.all(np.isfinite(t64)))
    return Row(group, stage, float(d.max()), float((d / (np.abs(t64) + atol)).max()),
               f"rtol {rtol:g} atol {atol:g}", ok, note)


# ------------------------------------------------------------------------------------------ inputs


def make_batch(model_cfg, n_videos: int = 4, seed: int = 0) -> dict:
    """A fully valid random batch at the config's dims: 1-3 queries per video (one video with 1, so the
    single-query branches of the losses run), frame counts from 1 to ``max_ctx_l``."""
    rng = np.random.default_rng(seed)
    c = model_cfg
    counts = [1] + [int(rng.integers(2, 4)) for _ in range(n_videos - 1)]
    lens = [1, c.max_ctx_l] + [int(rng.integers(2, c.max_ctx_l)) for _ in range(n_videos - 2)]
    b, q = n_videos, sum(counts)
    frames = np.zeros((b, c.max_ctx_l, c.visual_feat_dim), np.float32)
    fmask = np.zeros((b, c.max_ctx_l), np.float32)
    for i, n in enumerate(lens):
        frames[i, :n] = rng.standard_normal((n, c.visual_feat_dim))
        fmask[i, :n] = 1
    qf = np.zeros((q, c.max_desc_l, c.q_feat_size), np.float32)
    qm = np.zeros((q, c.max_desc_l), np.float32)
    for i, n in enumerate(rng.integers(1, c.max_desc_l + 1, q)):
        qf[i, :n] = rng.standard_normal((n, c.q_feat_size))
        qm[i, :n] = 1
    labels = np.repeat(np.arange(b), counts).astype(np.int32)
    return dict(clip_feats=rng.standard_normal((b, c.map_size, c.visual_feat_dim)).astype(np.float32),
                frame_feats=frames, frame_mask=fmask, frame_len=np.asarray(lens, np.int32),
                video_valid=np.ones(b, np.float32), query_feats=qf, query_mask=qm,
                query_valid=np.ones(q, np.float32), query_labels=labels)


def no_dropout(cfg):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, input_drop=0.0, drop=0.0))


# ------------------------------------------------------------------------------------------ stages


def compare_conversion(name, twin) -> list[Row]:
    from parity.convert import flax_to_torch, torch_to_flax

    sd = twin.state_dict()
    back = flax_to_torch(name, torch_to_flax(name, sd))
    worst, exact = 0.0, list(back) == list(sd)
    for k, v in sd.items():
        d = float((back[k].double() - v.detach().cpu().double()).abs().max()) if v.numel() else 0.0
        worst = max(worst, d)
        exact = exact and bool(back[k].dtype == v.dtype and (back[k] == v.detach().cpu()).all())
    return [Row("convert", f"torch -> flax -> torch ({len(sd)} tensors)", worst, worst, "bit-exact", exact)]


def _block_specs(name, cfg, twin, taux, batch):
    """(stage, flax fn(module, *inputs) or (module class instance, params path), torch fn(*inputs), inputs)."""
    import jax.numpy as jnp
    import torch

    from jaxprvr.models import layers as fl
    from torch_ref import layers as tl

    c = cfg.model
    d, h = c.hidden_size, c.n_heads
    dev = next(twin.parameters()).device
    T = lambda k: torch.from_numpy(np.asarray(batch[k])).to(dev)  # noqa: E731
    qmask, fmask = T("query_mask"), T("frame_mask")
    attn_kind = "v2 (FFN, norm1/norm2)" if name == "gmmformer_v2" else "v1"
    specs = [
        ("query input_proj + pos_embed (LinearLayer, positional encoding)",
         lambda m, x: m.query_pos_embed(m.query_input_proj(x)),
         lambda x: twin.query_pos_embed(twin.query_input_proj(x)), (T("query_feats"),)),
        (f"query_encoder (self-attention {attn_kind}, masked)", lambda m, x, k: m.query_encoder(x, k),
         lambda x, k: twin.query_encoder(x, k), (taux["query_embed"], qmask)),
        ("query pooling (masked attention pooling)",
         lambda m, x, k: fl.attention_pool(m.modular_vector_mapping(x), k, x),
         lambda x, k: tl.attention_pool(twin.modular_vector_mapping, x, k), (taux["query_tokens"], qmask)),
        ("clip input_proj + pos_embed", lambda m, x: m.clip_pos_embed(m.clip_input_proj(x)),
         lambda x: twin.clip_pos_embed(twin.clip_input_proj(x)), (T("clip_feats"),)),
        ("frame input_proj + pos_embed", lambda m, x: m.frame_pos_embed(m.frame_input_proj(x)),
         lambda x: twin.frame_pos_embed(twin.frame_input_proj(x)), (T("frame_feats"),)),
    ]
    if name == "ms_sl":
        from jaxprvr.models.ms_sl import encode_feat_map, key_clip_attention_inference

        specs += [
            ("clip_encoder (self-attention v1)", lambda m, x: m.clip_encoder(x, None),
             lambda x: twin.clip_encoder(x, None), (taux["clip_embed"],)),
            ("frame_encoder (self-attention v1, masked)", lambda m, x, k: m.frame_encoder(x, k),
             lambda x, k: twin.frame_encoder(x, k), (taux["frame_embed"], fmask)),
            (f"proposal generation ({c.map_size * (c.map_size + 1) // 2} windows)",
             lambda m, x: encode_feat_map(x), lambda x: twin.encode_feat_map(x), (taux["clip_feats"],)),
            ("key-clip guided attention (every video, every query)",
             lambda m, f, p, k, i: key_clip_attention_inference(m.mapping_linear[0](f), m.mapping_linear[1](f),
                                                                p, k, i),
             lambda f, p, k, i: twin.key_clip_attention_inference(f, p, k, i),
             (taux["frame_feats"], taux["proposals"], fmask, taux["key_clip_index"])),
        ]
    elif name == "gmmformer":
        gl = taux["gmm_length"]
        specs += [
            (f"Gaussian attention (clip_encoder.attn1, width {fl.GMM_WIDTHS[1]})",
             (fl.BertAttention(d, h, 0.0, fl.GMM_WIDTHS[1]), ("clip_encoder", "attn1"), lambda x: (x, None)),
             lambda x: twin.clip_encoder.attn1(x, None), (taux["clip_embed"],)),
            ("clip_encoder (GMMBlock, 4 widths)", lambda m, x: m.clip_encoder(x, None),
             lambda x: twin.clip_encoder(x, None), (taux["clip_embed"],)),
            ("clip_encoder_2 (GMMBlock)", lambda m, x: m.clip_encoder_2(x, None),
             lambda x: twin.clip_encoder_2(x, None), (taux["clip_feats_1"],)),
            (f"frame_encoder_1 (GMMBlock, masked, Gaussian grid {int(gl)})",
             lambda m, x, k: m.frame_encoder_1(x, k, gmm_length=jnp.asarray(int(gl))),
             lambda x, k: twin.frame_encoder_1(x, k, int(gl)), (taux["frame_embed"], fmask)),
            ("frame_encoder_2 (GMMBlock, masked)",
             lambda m, x, k: m.frame_encoder_2(x, k, gmm_length=jnp.asarray(int(gl))),
             lambda x, k: twin.frame_encoder_2(x, k, int(gl)), (taux["frame_feats_1"], fmask)),
            ("frame pooling (masked attention pooling)",
             lambda m, x, k: fl.attention_pool(m.modular_vector_mapping_2(x), k, x),
             lambda x, k: tl.attention_pool(twin.modular_vector_mapping_2, x, k), (taux["frame_feats"], fmask)),
        ]
    else:
        specs += [
            (f"Gaussian attention v2 (clip_encoder.attn1, width {fl.DYGMM_WIDTHS[1]})",
             (fl.BertAttentionV2(d, h, 0.0, fl.DYGMM_WIDTHS[1]), ("clip_encoder", "attn1"), lambda x: (x, None)),
             lambda x: twin.clip_encoder.attn1(x, None), (taux["clip_embed"],)),
            ("clip_encoder (DyGMMBlock, 8 widths + weight_token)",
             lambda m, x: m.clip_encoder(x, None, m.weight_token),
             lambda x: twin.clip_encoder(x, None, twin.weight_token), (taux["clip_embed"],)),
            ("frame_encoder_1 (DyGMMBlock, masked)",
             lambda m, x, k: m.frame_encoder_1(x, k, m.weight_token),
             lambda x, k: twin.frame_encoder_1(x, k, twin.weight_token), (taux["frame_embed"], fmask)),
        ]
    return specs


def compare_blocks(name, cfg, model, params, twin, batch) -> list[Row]:
    """Each block alone on the same (torch-computed) input. A block outside ``rtol 1e-5 / atol 1e-6`` is judged
    against float64: the twin is re-run in double precision on the same input, and the row passes when the JAX
    float32 error is at most ``F64_FACTOR`` times PyTorch's own float32 error. Long reductions at the official
    sizes need it: XLA:CPU's float32 matmul accumulates a 3072-long dot with ~5x the error of MKL's (measured
    7.4e-6 vs 1.4e-6 max abs on unit-variance inputs; docs/parity.md), which the following LayerNorm magnifies."""
    import copy

    import jax
    import torch

    twin64 = None
    with torch.no_grad():
        _, taux = twin(batch, train=False)
        rows = []
        specs = _block_specs(name, cfg, twin, taux, batch)
        for i, (stage, ffn, tfn, inputs) in enumerate(specs):
            t_out = tfn(*inputs)
            j_in = [_np(x) for x in inputs]
            if isinstance(ffn, tuple):  # a standalone module on a parameter subtree
                module, path, args = ffn
                sub = params
                for p in path:
                    sub = sub[p]
                j_out = module.apply({"params": sub}, *args(*j_in))
            else:
                j_out = model.apply({"params": params}, *j_in, method=ffn)
            j_out = np.asarray(jax.device_get(j_out))
            row = close_row("block", stage, j_out, t_out, *BLOCK)
            if not row.passed and np.issubdtype(j_out.dtype, np.floating):
                if twin64 is None:  # built once, on the first block that needs the arbiter
                    twin64 = copy.deepcopy(twin).double().eval()
                    specs64 = _block_specs(name, cfg, twin64, taux, batch)
                tfn64 = specs64[i][2]
                t64 = _np(tfn64(*[x.double() if torch.is_floating_point(x) else x for x in inputs]))
                e_jax = float(np.abs(j_out.astype(np.float64) - t64).max())
                e_torch = float(np.abs(_np(t_out).astype(np.float64) - t64).max())
                row.passed = e_jax <= F64_FACTOR * e_torch + BLOCK[1] * 1e-3
                row.tolerance += f" or <= {F64_FACTOR:g}x torch's f32 error vs f64"
                row.note = f"vs float64: jax {e_jax:.1e}, torch {e_torch:.1e}"
            rows.append(row)
    return rows


def compare_model(name, model, params, twin, batch) -> list[Row]:
    import torch

    scores, aux = model.apply({"params": params}, batch, train=False)
    with torch.no_grad():
        tscores, taux = twin(batch, train=False)
    rows = []
    for k in sorted(set(scores) | set(tscores)):
        if k not in scores or k not in tscores:
            rows.append(Row("model", f"scores[{k}]", float("inf"), float("inf"), "present in both", False))
        else:
            rows.append(close_row("model", f"scores[{k}]", scores[k], tscores[k], *MODEL))
    for k in sorted(set(aux) | set(taux)):
        if k not in aux or k not in taux:
            rows.append(Row("model", f"aux[{k}]", float("inf"), float("inf"), "present in both", False))
        else:
            rows.append(close_row("model", f"aux[{k}]", aux[k], taux[k], *MODEL))
    return rows


def _negatives(name, cfg, scores, batch, key, twin_out=None):
    """Negatives drawn once (JAX sampler) and injected into both frameworks; v2 also gets the torch Hungarian
    assignment so both optimise the same matching."""
    import jax

    from jaxprvr.losses.prvr import sample_negatives

    negs = jax.device_get(sample_negatives(name, {k: _np(v) for k, v in scores.items()}, batch, key, hard=False,
                                           hard_pool_size=cfg.loss.hard_pool_size))
    negs = {k: np.asarray(v) for k, v in negs.items()}
    if name == "gmmformer_v2" and twin_out is not None:
        from torch_ref.losses import optimal_matching_assignment

        _, taux = twin_out
        negs["ot_assignment"] = _np(optimal_matching_assignment(taux["clip_feats"], taux["query2"],
                                                                batch["query_labels"])).astype(np.int32)
    return negs


def compare_losses(name, cfg, twin, batch, key) -> list[Row]:
    import torch

    from jaxprvr.losses.prvr import total_loss
    from torch_ref.losses import total_loss as torch_total_loss

    with torch.no_grad():
        tscores, taux = twin(batch, train=False)
    negs = _negatives(name, cfg, tscores, batch, key)
    s_np = {k: _np(v) for k, v in tscores.items()}
    a_np = {k: _np(v) for k, v in taux.items()}
    jl, jterms = total_loss(name, s_np, a_np, batch, cfg.loss, key, hard=False, negatives=negs)
    tl_, tterms = torch_total_loss(name, tscores, taux, batch, cfg.loss, {k: torch.from_numpy(np.array(v)) for k, v in negs.items()})
    rows = [close_row("loss", f"term {k}", jterms[k], tterms[k], *BLOCK) for k in sorted(tterms)]
    rows.append(close_row("loss", "total", jl, tl_, *BLOCK))
    return rows


def _tensor_rel(a: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    d = a.astype(np.float64) - t.astype(np.float64)
    nt = float(np.linalg.norm(t.astype(np.float64)))
    return float(np.abs(d).max()) if d.size else 0.0, float(np.linalg.norm(d)) / max(nt, 1e-30)


def _grad_of(p) -> np.ndarray:
    return np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.detach().cpu().numpy()


def _grads(name, cfg, model, params, twin, batch, negs):
    import jax
    import torch

    from jaxprvr.losses.prvr import total_loss
    from parity.convert import flatten, table
    from parity.keys import to_torch
    from torch_ref.losses import total_loss as torch_total_loss

    def loss_fn(p, b, n):
        scores, aux = model.apply({"params": p}, b, train=True, rngs={"dropout": jax.random.key(0)})
        return total_loss(name, scores, aux, b, cfg.loss, None, hard=False, negatives=n)[0]

    jl, jg = jax.jit(jax.value_and_grad(loss_fn))(params, batch, negs)
    twin.zero_grad(set_to_none=True)
    scores, aux = twin(batch, train=True)
    tl_, _ = torch_total_loss(name, scores, aux, batch, cfg.loss, {k: torch.from_numpy(np.array(v)) for k, v in negs.items()})
    tl_.backward()
    named = dict(twin.named_parameters())
    jflat = flatten(jax.device_get(jg))
    out = {}
    for e in table(name):
        out[e.torch] = (to_torch(e.kind, np.asarray(jflat[e.flax])), _grad_of(named[e.torch]))
    return float(jl), float(tl_.detach()), out


EPS32 = float(np.finfo(np.float32).eps)  # grad atol: EPS32 x the largest tensor gradient norm


def compare_gradients(name, cfg, model, params, twin, batch, key) -> list[Row]:
    """Per tensor ``||g_jax - g_torch|| <= GRAD_REL ||g_torch|| + EPS32 G``, ``G`` the largest tensor gradient
    norm (``max rel`` = ``||d|| / (||g|| + EPS32 G / GRAD_REL)``). The atol is float32's resolution for the whole
    backward pass: analytically zero gradients (attention key biases, the DyGMM ``layer2`` bias, whose softmax
    over branches is shift-invariant) come out as noise of ~1e-8 G in both frameworks, and so do the tiny
    gradients of the DyGMM weighting path at the official v2 init."""
    import torch

    with torch.no_grad():
        out = twin(batch, train=True)
    negs = _negatives(name, cfg, out[0], batch, key, out)
    jl, tl_, grads = _grads(name, cfg, model, params, twin, batch, negs)
    top = max(float(np.linalg.norm(t)) for _, t in grads.values())
    floor = EPS32 * top / GRAD_REL
    worst_abs, worst_rel, worst_key, n_floor = 0.0, 0.0, "", 0
    for k, (a, t) in grads.items():
        d = a.astype(np.float64) - t
        nt = float(np.linalg.norm(t))
        n_floor += nt < floor
        rel = float(np.linalg.norm(d)) / (nt + floor)
        worst_abs = max(worst_abs, float(np.abs(d).max()) if d.size else 0.0)
        if rel >= worst_rel:
            worst_rel, worst_key = rel, k
    loss_row = close_row("grad", "training loss (train mode, dropout off)", jl, tl_, *BLOCK)
    note = f"worst: {worst_key}; the atol term dominates for {n_floor} tensors"
    return [loss_row, Row("grad", f"d loss / d param ({len(grads)} tensors)", worst_abs, worst_rel,
                          f"rel {GRAD_REL:g} + eps32 x max", worst_rel <= GRAD_REL, note)]


def compare_training(name, cfg, model, params, twin, batches, key, steps: int = 5, t_total: int = 100) -> list[Row]:
    """``steps`` BertAdam steps in each framework (official lr and warmup, ``t_total`` steps so the rate is
    non-zero after the first step, per-tensor clipping, weight-decay groups). Negatives (and v2's matching) are
    drawn once per step from the torch scores and injected into both.

    A tensor passes at ``||p_jax - p_torch|| <= 1e-5 ||p_torch||``, or, when not, if JAX is as close to a
    float64 run of the twin (same batches and negatives) as PyTorch's float32 run is: ``||p_jax - p_64|| <=
    F64_FACTOR ||p_torch - p_64||``. The second test is needed where float32 cannot resolve the gradient:
    Adam turns gradient noise into steps of ``~lr`` in a float-dependent direction (analytically zero gradients
    such as attention key biases, the DyGMM ``layer2`` bias, DyGMM ``layer1.bias`` units active on every
    branch), and at the official sizes the 3072-wide input projections accumulate with XLA:CPU's less accurate
    matmul (docs/parity.md)."""
    import copy

    import jax
    import optax
    import torch

    from jaxprvr.losses.prvr import total_loss
    from jaxprvr.optim import bert_adam, official_weight_decay_mask
    from parity.convert import flatten, table
    from parity.keys import to_torch
    from torch_ref.losses import total_loss as torch_total_loss
    from torch_ref.optim import BertAdam, official_param_groups

    tc = cfg.train
    tx = bert_adam(lr=tc.lr, warmup=tc.lr_warmup_proportion, t_total=t_total, weight_decay=tc.wd,
                   weight_decay_mask=official_weight_decay_mask(params), max_grad_norm=tc.max_grad_norm)
    twin64 = copy.deepcopy(twin).double()
    opts = [BertAdam(official_param_groups(tw, 0.01), lr=tc.lr, warmup=tc.lr_warmup_proportion, t_total=t_total,
                     max_grad_norm=tc.max_grad_norm) for tw in (twin, twin64)]
    state = tx.init(params)

    @jax.jit
    def jstep(p, s, b, negs):
        def loss_fn(p_):
            scores, aux = model.apply({"params": p_}, b, train=True, rngs={"dropout": jax.random.key(0)})
            return total_loss(name, scores, aux, b, cfg.loss, None, hard=False, negatives=negs)[0]

        u, s = tx.update(jax.grad(loss_fn)(p), s, p)
        return optax.apply_updates(p, u), s

    for i in range(steps):
        batch = batches[i % len(batches)]
        with torch.no_grad():
            out = twin(batch, train=True)
        negs = _negatives(name, cfg, out[0], batch, jax.random.fold_in(key, i), out)
        tnegs = {k: torch.from_numpy(np.array(v)) for k, v in negs.items()}
        for tw, opt in zip((twin, twin64), opts):
            opt.zero_grad(set_to_none=True)
            scores, aux = tw(batch, train=True)
            torch_total_loss(name, scores, aux, batch, cfg.loss, tnegs)[0].backward()
            opt.step()
        params, state = jstep(params, state, batch, negs)
    jflat = flatten(jax.device_get(params))
    named, named64 = dict(twin.named_parameters()), dict(twin64.named_parameters())
    worst_rel, worst_key, worst_abs, n_f64, worst_ratio, passed = 0.0, "", 0.0, 0, 0.0, True
    failing: list[str] = []
    for e in table(name):
        a = to_torch(e.kind, np.asarray(jflat[e.flax])).astype(np.float64)
        t = named[e.torch].detach().cpu().numpy().astype(np.float64)
        ab, rel = _tensor_rel(a, t)
        worst_abs = max(worst_abs, ab)
        if rel >= worst_rel:
            worst_rel, worst_key = rel, e.torch
        if rel > TRAIN_REL:
            t64 = named64[e.torch].detach().cpu().numpy()
            e_j, e_t = float(np.linalg.norm(a - t64)), float(np.linalg.norm(t - t64))
            n_f64 += 1
            worst_ratio = max(worst_ratio, e_j / max(e_t, 1e-30))
            if e_j > F64_FACTOR * e_t:
                passed = False
                failing.append(f"{e.torch} (rel {rel:.1e}, ||jax-f64|| {e_j:.1e}, ||torch-f64|| {e_t:.1e})")
    note = f"worst: {worst_key}"
    if n_f64:
        note += (f"; {n_f64} tensors above rel 1e-5 judged vs float64: worst ||jax-f64|| / ||torch-f64|| = "
                 f"{worst_ratio:.2f}")
    if failing:
        note += "; failing: " + ", ".join(failing[:4]) + (" ..." if len(failing) > 4 else "")
    return [Row("train", f"params after {steps} BertAdam steps", worst_abs, worst_rel,
                f"rel {TRAIN_REL:g} or <= {F64_FACTOR:g}x torch's f32 error vs f64", passed, note)]


def compare_metrics(name, cfg, params, twin, data_root, split="test") -> list[Row]:
    import torch

    from jaxprvr.data import PRVRDataset
    from jaxprvr.evaluate import Evaluator
    from jaxprvr.metrics.prvr import eval_q2m
    from jaxprvr.models import build_model
    from torch_ref.evaluate import TorchEvaluator, eval_q2m as torch_eval_q2m

    ds = PRVRDataset(data_root, cfg, split)
    t_res = TorchEvaluator(twin.eval(), cfg).evaluate(ds, keep_scores=True)
    j_res = Evaluator(build_model(cfg.model), cfg).evaluate(params, ds, keep_scores=True)
    gt = np.asarray(ds.query_video_index)
    same_j, same_t = eval_q2m(t_res["_scores"], gt), torch_eval_q2m(torch.from_numpy(t_res["_scores"]), gt)
    d_same = max(abs(same_j[k] - same_t[k]) for k in METRIC_KEYS)
    d_eval = max(abs(j_res[k] - t_res[k]) for k in METRIC_KEYS)
    return [
        close_row("metrics", f"fused score matrix ({len(gt)} x {len(ds.video_ids)})", j_res["_scores"],
                  t_res["_scores"], *MODEL),
        Row("metrics", "R@1/5/10/100, SumR from one score matrix", d_same, d_same, "identical", d_same == 0.0),
        Row("metrics", f"R@1/5/10/100, SumR of a full evaluation ({split})", d_eval, d_eval / 100.0,
            f"abs {METRIC_ABS:g}", d_eval <= METRIC_ABS,
            f"jax SumR {j_res['sumr']:.2f}, torch SumR {t_res['sumr']:.2f}"),
    ]


# ------------------------------------------------------------------------------------------ driver


def run_check(cfg, *, ckpt=None, data_root=None, seed: int = 0, n_videos: int = 4, steps: int = 5,
              groups=("convert", "block", "model", "loss", "grad", "train", "metrics"), device=None,
              progress: Callable[[str], None] | None = None) -> list[Row]:
    """All stages for ``cfg.model.name``; returns the rows. ``ckpt``: an official checkpoint file."""
    import jax
    import torch

    import torch_ref
    from jaxprvr.models import build_model
    from parity.convert import torch_to_flax
    from torch_ref.checkpoints import load_official

    name = cfg.model.name
    say = progress or (lambda s: None)
    torch.manual_seed(seed)
    twin = torch_ref.build_model(cfg.model)
    if ckpt is not None:
        ck = load_official(ckpt)
        try:
            twin.load_state_dict(ck.state_dict, strict=True)
        except RuntimeError as e:
            raise JaxprvrError(ckpt, f"a {name} checkpoint matching the config", str(e).splitlines()[0]) from None
    if device is not None:
        twin = twin.to(device)
    sd = {k: v.detach().cpu() for k, v in twin.state_dict().items()}
    params = jax.tree.map(np.asarray, torch_to_flax(name, sd))
    model = build_model(cfg.model)
    batch = make_batch(cfg.model, n_videos, seed)
    key = jax.random.key(seed)
    rows: list[Row] = []
    if "convert" in groups:
        rows += compare_conversion(name, twin)
    if "block" in groups:
        say("blocks")
        rows += compare_blocks(name, cfg, model, params, twin, batch)
    if "model" in groups:
        say("whole model")
        rows += compare_model(name, model, params, twin, batch)
    if "loss" in groups:
        say("losses")
        rows += compare_losses(name, cfg, twin, batch, key)
    if "grad" in groups or "train" in groups:
        tcfg = no_dropout(cfg)
        ttwin = torch_ref.build_model(tcfg.model)
        ttwin.load_state_dict(twin.state_dict())
        tmodel = build_model(tcfg.model)
        if "grad" in groups:
            say("gradients")
            rows += compare_gradients(name, tcfg, tmodel, params, ttwin, batch, key)
        if "train" in groups:
            say(f"{steps} training steps")
            batches = [batch, make_batch(cfg.model, n_videos, seed + 1)]
            rows += compare_training(name, tcfg, tmodel, params, ttwin, batches, key, steps=steps)
    if "metrics" in groups:
        say("evaluation")
        if data_root is None:
            from jaxprvr.data.synthetic import write_synthetic

            with tempfile.TemporaryDirectory() as tmp:
                write_synthetic(tmp, cfg.data.dataset, n_train=4, n_val=4, n_test=100, seed=seed,
                                visual_dim=cfg.model.visual_feat_dim, query_dim=cfg.model.q_feat_size, progress=False)
                rows += compare_metrics(name, cfg, params, twin, tmp)
        else:
            rows += compare_metrics(name, cfg, params, twin, data_root)
    return rows


def format_table(rows: list[Row], title: str = "") -> str:
    lines = [title] if title else []
    lines += ["| group | stage | max abs | max rel | tolerance | result |", "|---|---|---:|---:|---|---|"]
    for r in rows:
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.group} | {r.stage}{note} | {r.max_abs:.2e} | {r.max_rel:.2e} | {r.tolerance} | "
                     f"{'PASS' if r.passed else 'FAIL'} |")
    n_fail = sum(not r.passed for r in rows)
    lines.append(f"\n{len(rows) - n_fail}/{len(rows)} PASS" + (f", {n_fail} FAIL" if n_fail else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity.check",
                                description="Compare jaxprvr with its PyTorch twin stage by stage (float32) and "
                                            "print max abs / rel differences with PASS/FAIL.")
    p.add_argument("--model", required=True, choices=("ms_sl", "gmmformer", "gmmformer_v2"))
    p.add_argument("--config", required=True, help="dataset (tvr|act|cha) or <model>/<dataset>")
    p.add_argument("--ckpt", default=None, help="official checkpoint file (model.ckpt / best.ckpt); default: the "
                                                "official init")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.hidden_size=32 for a quick check")
    p.add_argument("--data-root", default=None, help="evaluate on this dataset's test split (default: a synthetic "
                                                     "100-video gallery at the config's dims)")
    p.add_argument("--groups", default="convert,block,model,loss,grad,train,metrics",
                   help="comma-separated subset of the stage groups")
    p.add_argument("--videos", type=int, default=4, help="videos per batch (1-3 queries each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the twin (cpu, cuda); JAX uses its default")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    return p


def main(argv=None) -> int:
    import jax

    from configs import load_config

    args = build_parser().parse_args(argv)
    groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    known = {"convert", "block", "model", "loss", "grad", "train", "metrics"}
    try:
        if not set(groups) <= known:
            raise JaxprvrError("--groups", f"a subset of {sorted(known)}", ",".join(sorted(set(groups) - known)))
        if args.videos < 2:
            raise JaxprvrError("--videos", "at least 2 (a triplet needs a negative video)", str(args.videos))
        cfg = load_config(args.config, args.model, list(args.overrides))
        if args.ckpt is not None and not Path(args.ckpt).is_file():
            raise JaxprvrError(args.ckpt, "an official checkpoint file", "no such file")
        t0 = time.perf_counter()
        rows = run_check(cfg, ckpt=args.ckpt, data_root=args.data_root, seed=args.seed, n_videos=args.videos,
                         groups=groups, device=args.device,
                         progress=lambda s: print(f"parity.check: {s} ...", file=sys.stderr, flush=True))
    except JaxprvrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    dev = f"JAX {jax.devices()[0].device_kind} vs torch {args.device or 'cpu'} ({torch.__version__})"
    m = cfg.model
    title = (f"parity.check {args.model} / {cfg.data.dataset}: hidden {m.hidden_size}, heads {m.n_heads}, "
             f"visual {m.visual_feat_dim}, query {m.q_feat_size}; {dev}; "
             f"{'checkpoint ' + args.ckpt if args.ckpt else 'official init'}; {time.perf_counter() - t0:.0f} s\n")
    print(format_table(rows, title))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "config": args.config, "device": dev,
                                               "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
