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

MTM (``--model mtm``) adds its Mamba / TCN / DyGMM-11 / pooling / refiner / reconstructor blocks, the video
scores, ten loss terms (negatives from MTM's torch sampler), and with ``train.use_ema`` an EMA-weights row in
``train``; see docs/parity.md (MTM).

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

from jaxprvr.cli import add_compile_cache_args, enable_compile_cache
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


def make_batch(model_cfg, n_videos: int = 4, seed: int = 0, counts=None) -> dict:
    """A fully valid random batch at the config's dims: 1-3 queries per video (one video with 1, so the
    single-query branches of the losses run), frame counts from 1 to ``max_ctx_l``. ``counts``: the queries per
    video instead (the training stage's second batch takes the first's, so both have the same shapes)."""
    rng = np.random.default_rng(seed)
    c = model_cfg
    drawn = [1] + [int(rng.integers(2, 4)) for _ in range(n_videos - 1)]
    counts = drawn if counts is None else [int(n) for n in counts]
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


def compare_conversion(name, twin, tab=None) -> list[Row]:
    """``tab``: the key table argument of :mod:`parity.convert` (default ``name``;
    :func:`parity.convert.model_table`)."""
    from parity.convert import flax_to_torch, torch_to_flax

    tab = tab or name
    sd = twin.state_dict()
    back = flax_to_torch(tab, torch_to_flax(tab, sd))
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
    attn_kind = "v2 (FFN, norm1/norm2)" if name in ("gmmformer_v2", "mtm") else "v1"
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
    elif name == "mtm":
        specs += _mtm_block_specs(cfg, twin, taux, T)
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


class _Plain:
    """A block spec's JAX side that is a plain function of the inputs (no Flax parameters)."""

    def __init__(self, fn):
        self.fn = fn


def _mamba_simple():
    import sys

    from torch_ref.mamba import load

    load()
    return sys.modules["mamba_ssm.modules.mamba_simple"]


def selective_scan_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """mamba_ssm's ``selective_scan_ref`` (real ``A``, ``B``/``C`` of shape ``(b, N, L)``), transcribed without
    its casts to float32: the float64 arbiter's scan. (``selective_scan_ref`` runs in float32 whatever its
    input dtype, so a ``.double()`` twin would otherwise still scan in float32.)"""
    import torch
    import torch.nn.functional as F

    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros((u.shape[0], A.shape[0], A.shape[1]))
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        out = out * F.silu(z.double())
    return (out, x) if return_last_state else out


class _MambaScan:
    """While active, the twin's Mamba layers (``mamba_simple.selective_scan_fn``) scan float64 inputs in float64
    (:func:`selective_scan_f64`) and, with ``record``, keep the inputs of every scan call in ``calls``; float32
    calls go to the official function unchanged. With the CUDA ``causal_conv1d`` (float32/16 only) float64 inputs
    take mamba_ssm's own fallback, the depthwise ``F.conv1d`` + SiLU. A no-op for the models without Mamba."""

    def __init__(self, name, record: bool = False):
        self.active = name == "mtm"
        self.record = record
        self.calls: list = []

    def __enter__(self):
        if self.active:
            import torch

            self.simple = _mamba_simple()
            self.orig = orig = self.simple.selective_scan_fn

            def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     return_last_state=False):
                if self.record:
                    self.calls.append(tuple(None if t is None else t.detach()
                                            for t in (u, delta, A, B, C, D, z, delta_bias)))
                fn = selective_scan_f64 if u.dtype == torch.float64 else orig
                return fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          return_last_state=return_last_state)

            self.simple.selective_scan_fn = scan
            self.orig_conv = orig_conv = getattr(self.simple, "causal_conv1d_fn", None)
            if orig_conv is not None:
                import torch.nn.functional as F

                def conv(x, weight, bias=None, *args, activation=None, **kw):
                    if x.dtype != torch.float64:
                        return orig_conv(x, weight, bias, *args, activation=activation, **kw)
                    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1,
                                 groups=weight.shape[0])[..., :x.shape[-1]]
                    return F.silu(y) if activation in ("silu", "swish") else y

                self.simple.causal_conv1d_fn = conv
        return self

    def __exit__(self, *exc):
        if self.active:
            self.simple.selective_scan_fn = self.orig
            if self.orig_conv is not None:
                self.simple.causal_conv1d_fn = self.orig_conv
        return False


def _mtm_block_specs(cfg, twin, taux, T):
    """MTM's blocks: the selective scan (inputs recorded from ``frame_mamba.0``) against mamba_ssm's
    ``selective_scan_ref``, one Mamba layer, the clip branch's residual Mamba stack, the TCN, a Gaussian branch
    and the three 11-branch DyGMMBlocks, the attention pooling, the video-guided text refiner and the
    reconstructors."""
    import torch

    from jaxprvr.models import build_model
    from jaxprvr.models import layers as fl
    from jaxprvr.models.mtm import mamba_residual as j_mamba_residual
    from jaxprvr.ops.selective_scan import selective_scan
    from torch_ref.mamba import load as load_mamba
    from torch_ref.mtm import mamba_residual as t_mamba_residual

    c = cfg.model
    d, h = c.hidden_size, c.n_heads
    fmask = T("frame_mask")
    method = build_model(c).scan
    with _MambaScan("mtm", record=True) as rec:  # (the float64 arbiter's twin records its own float64 call)
        twin.frame_mamba[0](taux["frame_feats_1"].to(next(twin.parameters()).dtype))
    scan_in = rec.calls[0]
    t_scan = selective_scan_f64 if scan_in[0].dtype == torch.float64 else load_mamba().selective_scan_ref
    n_state = scan_in[2].shape[1]
    wk = len(fl.MTM_WIDTHS) - 1
    return [
        (f"selective scan ({method}) vs mamba_ssm selective_scan_ref (frame_mamba.0 inputs: d_inner "
         f"{scan_in[0].shape[1]}, L {scan_in[0].shape[2]}, N {n_state})",
         _Plain(lambda *a: selective_scan(*a, delta_softplus=True, method=method)),
         lambda *a: t_scan(*a, delta_softplus=True), scan_in),
        ("Mamba layer (frame_mamba.0, official mamba_ssm.Mamba)", lambda m, x: m.frame_mamba[0](x),
         lambda x: twin.frame_mamba[0](x), (taux["frame_feats_1"],)),
        (f"clip_mamba (h + LN(Mamba(...)), {c.num_mamba_layers} layers)",
         lambda m, x: j_mamba_residual(m.clip_mamba, x), lambda x: t_mamba_residual(twin.clip_mamba, x),
         (taux["clip_feats_1"],)),
        ("frame_tcn (TCN, eval)", lambda m, x: m.frame_tcn(x), lambda x: twin.frame_tcn(x), (taux["frame_embed"],)),
        (f"Gaussian attention v2 (clip_encoder.attn{wk}, width {fl.MTM_WIDTHS[wk]})",
         (fl.BertAttentionV2(d, h, 0.0, fl.MTM_WIDTHS[wk]), ("clip_encoder", f"attn{wk}"), lambda x: (x, None)),
         lambda x: getattr(twin.clip_encoder, f"attn{wk}")(x, None), (taux["clip_embed"],)),
        (f"clip_encoder (DyGMMBlock, {len(fl.MTM_WIDTHS)} widths + weight_token, logits sliced)",
         lambda m, x: m.clip_encoder(x, None, m.weight_token),
         lambda x: twin.clip_encoder(x, None, twin.weight_token), (taux["clip_embed"],)),
        ("frame_encoder_1 (DyGMMBlock, masked)", lambda m, x, k: m.frame_encoder_1(x, k, m.weight_token),
         lambda x, k: twin.frame_encoder_1(x, k, twin.weight_token), (taux["frame_tcn"], fmask)),
        ("video input_proj + pos_embed", lambda m, x: m.video_pos_embed(m.video_input_proj(x)),
         lambda x: twin.video_pos_embed(twin.video_input_proj(x)), (T("frame_feats"),)),
        ("video_encoder (DyGMMBlock, masked)", lambda m, x, k: m.video_encoder(x, k, m.weight_token),
         lambda x, k: twin.video_encoder(x, k, twin.weight_token), (taux["video_embed"], fmask)),
        ("video_pooling (AttentionPooling, masked)", lambda m, x, k: m.video_pooling(x, k),
         lambda x, k: twin.video_pooling(x, k), (taux["video_seq"], fmask)),
        ("video-guided text refiner (cross-attention over every video)",
         lambda m, q, v: m.video_guided_text_refinement(q, v),
         lambda q, v: twin.video_guided_text_refinement(q, v), (taux["query"], taux["video_feats"])),
        ("text_reconstructor (MLP, from query2)", lambda m, x: m.text_reconstructor(x),
         lambda x: twin.text_reconstructor(x), (taux["query2"],)),
        ("video_reconstructor (MLP, from the pooled video)", lambda m, x: m.video_reconstructor(x),
         lambda x: twin.video_reconstructor(x), (taux["video_feats"],)),
    ]


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
            j_in = [None if x is None else _np(x) for x in inputs]
            if isinstance(ffn, _Plain):
                j_out = ffn.fn(*j_in)
            elif isinstance(ffn, tuple):  # a standalone module on a parameter subtree
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
                    with _MambaScan(name):
                        specs64 = _block_specs(name, cfg, twin64, taux, batch)
                tfn64 = specs64[i][2]
                with _MambaScan(name):
                    t64 = _np(tfn64(*[x.double() if x is not None and torch.is_floating_point(x) else x
                                      for x in inputs]))
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
    """Negatives drawn once and injected into both frameworks; v2 and MTM also get the torch Hungarian
    assignment so both optimise the same matching. MS-SL / GMMFormer / v2: the JAX sampler. MTM: the torch
    sampler (:func:`torch_ref.losses.sample_negatives`, MTM's own triplet sampler, seeded from ``key``), whose
    ``-1`` ("no negative") entries JAX reads the same way."""
    import jax

    if name == "mtm":
        import torch

        from torch_ref.losses import sample_negatives as torch_sample_negatives

        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        tnegs = torch_sample_negatives(name, {k: torch.from_numpy(_np(v)) for k, v in scores.items()},
                                       [int(x) for x in np.asarray(batch["query_labels"])], hard=False,
                                       hard_pool_size=cfg.loss.hard_pool_size,
                                       generator=torch.Generator().manual_seed(seed))
        negs = {k: _np(v).astype(np.int32) for k, v in tnegs.items()}
    else:
        from jaxprvr.losses.prvr import sample_negatives

        negs = jax.device_get(sample_negatives(name, {k: _np(v) for k, v in scores.items()}, batch, key,
                                               hard=False, hard_pool_size=cfg.loss.hard_pool_size))
        negs = {k: np.asarray(v) for k, v in negs.items()}
    if name in ("gmmformer_v2", "mtm") and twin_out is not None:
        from torch_ref.losses import optimal_matching_assignment

        _, taux = twin_out
        negs["ot_assignment"] = _np(optimal_matching_assignment(taux["clip_feats"], taux["query2"],
                                                                batch["query_labels"])).astype(np.int32)
    return negs


def _torch_negs(negs):
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in negs.items()}


def compare_losses(name, cfg, twin, batch, key) -> list[Row]:
    import torch

    from jaxprvr.losses.prvr import total_loss
    from torch_ref.losses import total_loss as torch_total_loss

    with torch.no_grad():
        tscores, taux = twin(batch, train=False)
    negs = _negatives(name, cfg, tscores, batch, key, (tscores, taux) if name == "mtm" else None)
    s_np = {k: _np(v) for k, v in tscores.items()}
    a_np = {k: _np(v) for k, v in taux.items()}
    jl, jterms = total_loss(name, s_np, a_np, batch, cfg.loss, key, hard=False, negatives=negs)
    tl_, tterms = torch_total_loss(name, tscores, taux, batch, cfg.loss, _torch_negs(negs))
    rows = [close_row("loss", f"term {k}", jterms[k], tterms[k], *BLOCK) for k in sorted(tterms)]
    missing = sorted(set(jterms) - set(tterms))
    if missing:
        rows.append(Row("loss", f"terms only in JAX: {', '.join(missing)}", float("inf"), float("inf"),
                        "present in both", False))
    rows.append(close_row("loss", "total", jl, tl_, *BLOCK))
    return rows


def _tensor_rel(a: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    d = a.astype(np.float64) - t.astype(np.float64)
    nt = float(np.linalg.norm(t.astype(np.float64)))
    return float(np.abs(d).max()) if d.size else 0.0, float(np.linalg.norm(d)) / max(nt, 1e-30)


def _grad_of(p) -> np.ndarray:
    return np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.detach().cpu().numpy()


def make_grad_fn(name, cfg, model, compiler_options=None):
    """``fn(params, batch, negatives) -> (loss, grads)`` of the training loss (train mode, dropout off), jitted (with
    ``compiler_options``, e.g. XLA's cheap CPU pipeline, if given); the ``grad`` and ``train`` stages share it."""
    import jax

    from jaxprvr.losses.prvr import total_loss

    def loss_fn(p, b, n):
        scores, aux = model.apply({"params": p}, b, train=_jax_train(name), rngs={"dropout": jax.random.key(0)})
        return total_loss(name, scores, aux, b, cfg.loss, None, hard=False, negatives=n)[0]

    # jit caches one executable per input signature; the second training batch has the first one's shapes
    return jax.jit(jax.value_and_grad(loss_fn), compiler_options=compiler_options or None)


def _grads(name, cfg, model, params, twin, batch, negs, grad_fn=None):
    import jax

    from parity.convert import flatten, model_table, table
    from parity.keys import to_torch
    from torch_ref.losses import total_loss as torch_total_loss

    grad_fn = grad_fn or make_grad_fn(name, cfg, model)
    jl, jg = grad_fn(params, batch, negs)
    twin.zero_grad(set_to_none=True)
    scores, aux = twin(batch, train=True)
    tl_, _ = torch_total_loss(name, scores, aux, batch, cfg.loss, _torch_negs(negs))
    tl_.backward()
    named = dict(twin.named_parameters())
    jflat = flatten(jax.device_get(jg))
    out = {}
    for e in table(model_table(cfg.model)):
        if not e.alias:  # MTM's attns.K.* name the attnK.* tensors again; named_parameters() lists them once
            out[e.torch] = (to_torch(e.kind, np.asarray(jflat[e.flax])), _grad_of(named[e.torch]))
    return float(jl), float(tl_.detach()), out


def _jax_train(name) -> bool:
    """The Flax ``train`` flag of the ``grad`` and ``train`` stages (train mode, dropout off). MTM's TCN dropout is
    hard-coded 0.1 in both frameworks (official), out of the config's reach: there the twin runs in train mode
    with that one dropout set to 0 (:func:`_dropout_off`) and the Flax model in eval mode, which with every
    other rate at 0 is the same computation (MTM has no other train/eval difference)."""
    return name != "mtm"


def _dropout_off(name, twin):
    """Sets the dropouts the config does not control to 0 (MTM's TCN: the twin's ``frame_tcn.dropout``)."""
    if name == "mtm":
        twin.frame_tcn.dropout.p = 0.0
    return twin


EPS32 = float(np.finfo(np.float32).eps)  # grad atol: EPS32 x the largest tensor gradient norm


def compare_gradients(name, cfg, model, params, twin, batch, key, grad_fn=None) -> list[Row]:
    """Per tensor ``||g_jax - g_torch|| <= GRAD_REL ||g_torch|| + EPS32 G``, ``G`` the largest tensor gradient
    norm (``max rel`` = ``||d|| / (||g|| + EPS32 G / GRAD_REL)``). The atol is float32's resolution for the whole
    backward pass: analytically zero gradients (attention key biases, the DyGMM ``layer2`` bias, whose softmax
    over branches is shift-invariant) come out as noise of ~1e-8 G in both frameworks, and so do the tiny
    gradients of the DyGMM weighting path at the official v2 init."""
    import torch

    with torch.no_grad():
        out = twin(batch, train=True)
    negs = _negatives(name, cfg, out[0], batch, key, out)
    jl, tl_, grads = _grads(name, cfg, model, params, twin, batch, negs, grad_fn)
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


def _compare_trained(stage, tab, jtree, named, named64) -> Row:
    """Per tensor (by torch name, alias rows skipped) ``||jax - torch|| <= TRAIN_REL ||torch||``, else the
    float64 arbiter ``||jax - f64|| <= F64_FACTOR ||torch - f64||``."""
    from parity.convert import flatten, table
    from parity.keys import to_torch

    jflat = flatten(jtree)
    worst_rel, worst_key, worst_abs, n_f64, worst_ratio, passed = 0.0, "", 0.0, 0, 0.0, True
    failing: list[str] = []
    for e in table(tab):
        if e.alias:
            continue
        a = to_torch(e.kind, np.asarray(jflat[e.flax])).astype(np.float64)
        t = _np(named[e.torch]).astype(np.float64)
        ab, rel = _tensor_rel(a, t)
        worst_abs = max(worst_abs, ab)
        if rel >= worst_rel:
            worst_rel, worst_key = rel, e.torch
        if rel > TRAIN_REL:
            t64 = _np(named64[e.torch])
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
    return Row("train", stage, worst_abs, worst_rel,
               f"rel {TRAIN_REL:g} or <= {F64_FACTOR:g}x torch's f32 error vs f64", passed, note)


def compare_training(name, cfg, model, params, twin, batches, key, steps: int = 5, t_total: int = 100,
                     grad_fn=None) -> list[Row]:
    """``steps`` BertAdam steps in each framework (official lr and warmup, ``t_total`` steps so the rate is
    non-zero after the first step, per-tensor clipping, weight-decay groups). Negatives (and v2's / MTM's
    matching) are drawn once per step from the torch scores and injected into both. With ``cfg.train.use_ema``
    (MTM) the EMA of the weights is compared too: :func:`jaxprvr.optim.with_ema` against the official
    :class:`torch_ref.optim.EMA` called after the ``i``-th torch step (0-based) with ``step=i``.

    A tensor passes at ``||p_jax - p_torch|| <= 1e-5 ||p_torch||``, or, when not, if JAX is as close to a
    float64 run of the twin (same batches and negatives) as PyTorch's float32 run is: ``||p_jax - p_64|| <=
    F64_FACTOR ||p_torch - p_64||``. The second test is needed where float32 cannot resolve the gradient:
    Adam turns gradient noise into steps of ``~lr`` in a float-dependent direction (analytically zero gradients
    such as attention key biases, the DyGMM ``layer2`` bias, DyGMM ``layer1.bias`` units active on every
    branch), and at the official sizes the 3072-wide input projections accumulate with XLA:CPU's less accurate
    matmul (docs/parity.md). (The float64 twin's Mamba layers scan in float64, :func:`selective_scan_f64`.)"""
    import copy

    import jax
    import optax
    import torch

    from jaxprvr.optim import bert_adam, official_weight_decay_mask, with_ema
    from torch_ref.losses import total_loss as torch_total_loss
    from torch_ref.optim import BertAdam, official_param_groups

    tc = cfg.train
    use_ema = bool(getattr(tc, "use_ema", False))
    tx = bert_adam(lr=tc.lr, warmup=tc.lr_warmup_proportion, t_total=t_total, weight_decay=tc.wd,
                   weight_decay_mask=official_weight_decay_mask(params), max_grad_norm=tc.max_grad_norm)
    if use_ema:
        tx = with_ema(tx, tc.ema_decay)
    twin64 = copy.deepcopy(twin).double()
    opts = [BertAdam(official_param_groups(tw, 0.01), lr=tc.lr, warmup=tc.lr_warmup_proportion, t_total=t_total,
                     max_grad_norm=tc.max_grad_norm) for tw in (twin, twin64)]
    emas = None
    if use_ema:
        from torch_ref.optim import EMA

        emas = [EMA.from_model(tw, tc.ema_decay) for tw in (twin, twin64)]
    state = tx.init(params)
    grad_fn = grad_fn or make_grad_fn(name, cfg, model)

    @jax.jit
    def update(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(steps):
        batch = batches[i % len(batches)]
        with torch.no_grad():
            out = twin(batch, train=True)
        negs = _negatives(name, cfg, out[0], batch, jax.random.fold_in(key, i), out)
        tnegs = _torch_negs(negs)
        for j, (tw, opt) in enumerate(zip((twin, twin64), opts)):
            with _MambaScan(name):  # float64 scans for twin64
                opt.zero_grad(set_to_none=True)
                scores, aux = tw(batch, train=True)
                torch_total_loss(name, scores, aux, batch, cfg.loss, tnegs)[0].backward()
            opt.step()
            if emas is not None:
                emas[j](tw, i)
        params, state = update(grad_fn(params, batch, negs)[1], state, params)
    from parity.convert import model_table

    tab = model_table(cfg.model)
    rows = [_compare_trained(f"params after {steps} BertAdam steps", tab, jax.device_get(params),
                             dict(twin.named_parameters()), dict(twin64.named_parameters()))]
    if emas is not None:
        rows.append(_compare_trained(f"EMA weights after {steps} steps (decay {tc.ema_decay:g}, "
                                     "torch_ref.optim.EMA(step=i))", tab, jax.device_get(state.shadow),
                                     emas[0].shadow, emas[1].shadow))
    return rows


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
              progress: Callable[[str], None] | None = None, compiler_options=None) -> list[Row]:
    """All stages for ``cfg.model.name``; returns the rows. ``ckpt``: an official checkpoint file.
    ``compiler_options``: XLA options for the compiled training gradient (e.g. a cheaper CPU pipeline in tests;
    the default is XLA's own)."""
    import jax
    import torch

    import torch_ref
    from jaxprvr.models import build_model
    from parity.convert import model_table, torch_to_flax
    from torch_ref.checkpoints import load_official

    name = cfg.model.name
    tab = model_table(cfg.model)
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
    params = jax.tree.map(np.asarray, torch_to_flax(tab, sd))
    model = build_model(cfg.model)
    batch = make_batch(cfg.model, n_videos, seed)
    key = jax.random.key(seed)
    rows: list[Row] = []
    if "convert" in groups:
        rows += compare_conversion(name, twin, tab)
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
        ttwin = _dropout_off(name, torch_ref.build_model(tcfg.model))
        ttwin.load_state_dict(twin.state_dict())
        if device is not None:
            ttwin = ttwin.to(device)
        tmodel = build_model(tcfg.model)
        grad_fn = make_grad_fn(name, tcfg, tmodel, compiler_options)
        if "grad" in groups:
            say("gradients")
            rows += compare_gradients(name, tcfg, tmodel, params, ttwin, batch, key, grad_fn=grad_fn)
        if "train" in groups:
            say(f"{steps} training steps")
            counts = np.bincount(np.asarray(batch["query_labels"]), minlength=n_videos)
            batches = [batch, make_batch(cfg.model, n_videos, seed + 1, counts=counts)]
            rows += compare_training(name, tcfg, tmodel, params, ttwin, batches, key, steps=steps, grad_fn=grad_fn)
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
    p.add_argument("--model", required=True, choices=("ms_sl", "gmmformer", "gmmformer_v2", "mtm"))
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
    return add_compile_cache_args(p)


def main(argv=None) -> int:
    import jax

    from configs import load_config

    args = build_parser().parse_args(argv)
    enable_compile_cache(args)
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
