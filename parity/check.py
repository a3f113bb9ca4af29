"""``python -m parity.check``: does jaxprvr compute what the PyTorch twin computes, with these weights?

Runs one model in both frameworks from the same weights (an official checkpoint with ``--ckpt``, otherwise the
official PyTorch init) and the same inputs, and prints one row per stage: the maximum absolute difference, the
maximum relative difference and PASS/FAIL against the stage's tolerance (docs/parity.md). ``--dtype float64`` runs
both frameworks in double precision (``jax_enable_x64``, ``twin.double()``, ``model.compute_dtype=float64``) on
the same weights and batches, where every stage must agree to rtol 1e-9.

==============  ================================================  ===============================  =====================
group           what is compared                                  float32                          float64
==============  ================================================  ===============================  =====================
``convert``     torch -> Flax -> torch round trip of every        bit-exact                        bit-exact
                tensor
``block``       each block alone, fed the same input (attention   ``|d| <= 1e-6 + 1e-5 |t|``, else  ``|d| <= 1e-12 +
                flavours, Gaussian attention, GMM/DyGMM blocks,   the bounded float64 arbiter       1e-9 |t|``
                Mamba, proposals, key-clip attention, pooling);
                again on perturbed weights (``--perturb``)
``model``       every score matrix and named ``aux`` stage,       ``|d| <= 1e-4 + 1e-4 |t|``        ``|d| <= 1e-12 +
                eval mode (and on perturbed weights)                                                1e-9 |t|``
``loss``        every loss term from the same scores and          ``|d| <= 1e-6 + 1e-5 |t|``        as ``block``
                injected negatives
``grad``        d(total loss)/d(parameter), train mode with       per tensor ``||d|| <= 1e-4        ``rel 1e-9``
                dropout off, each tensor against its own scale    ||g||``, else the bounded
                (:func:`compare_gradients`)                       arbiter
                listed analytically-zero gradients (the spec's    ``||d|| <= rel ||g|| + 100 x``    the same floor
                ``zero_gradients``)                               the tensor's float32 noise        x eps64/eps32
``train``       parameters after 5 BertAdam steps (and the EMA    per tensor ``||d|| <= 1e-5        ``rel 1e-9``
                weights) on the same batches and negatives        ||p||``, else the arbiter
                listed zero-gradient tensors                      ``|d| <=`` the Adam bound         the Adam bound
``dropout``     dropout ON, the same masks in both frameworks     as ``model`` / ``loss`` /         as float64 above
                (:mod:`torch_ref.dropout`): scores, aux, every    ``grad``
                loss term, gradients
``metrics``     R@1/5/10/100 and SumR: one score matrix through   identical; own evaluations       the same
                both metric codes; a full evaluation in each      identical up to what score ties
                framework on a synthetic gallery                  within 1e-6 explain
==============  ================================================  ===============================  =====================

**The bounded float64 arbiter** (float32 mode only): a block, gradient or trained tensor that misses the float32
criterion is recomputed by the twin in float64 on the same input; the row passes when JAX's error from float64 is
at most ``F64_FACTOR`` (10) times torch's own AND at most ``ARBITER_CEILING`` (10) times the strict tolerance in
absolute terms (for a gradient or trained tensor that the reference itself misses the strict tolerance by, i.e.
that float32 cannot resolve, torch's own error is the reachable tolerance; the note counts such tensors).
**Zero gradients**: a tensor whose gradient is zero in exact arithmetic (softmax shift-invariance) is float noise
in both frameworks; each family lists them by name pattern with the reason. The check verifies the list (float32
must not resolve such a gradient: ``||g_torch32 - g_torch64|| > 1e-3 ||g_torch64||``), judges the difference
against an absolute floor of 100x the float32 noise of that tensor's computation measured on the twin (the larger
of ``||g_torch32 - g_torch64||`` and ``||g_torch64|| eps32 / eps64``, two realizations of the rounding noise;
scaled by eps64/eps32 in float64 mode), and bounds their Adam updates by what BertAdam can do with any gradient
(``|m / sqrt(v)| <= (1 - b1) / sqrt(1 - b2) * sqrt(sum_k (b1^2 / b2)^k)`` per step, twice: one per framework).

A NaN or an Inf in any compared tensor, on either side, fails its row and the note names the tensor; a shape
mismatch is a final FAIL. ``max rel`` is ``max |jax - torch| / (|torch| + atol)`` elementwise (for ``grad`` /
``train``: the worst per-tensor ``||jax - torch|| / ||torch||``). Matmuls run at full float32 precision in both
frameworks unless ``--matmul-precision`` says otherwise (``jax.default_matmul_precision``; torch TF32 off on CUDA
and cuDNN); the header prints it. Exit status 0 when every row passes, 1 otherwise, 2 on bad input.

MTM (``--model mtm``) adds its Mamba / TCN / DyGMM-11 / pooling / refiner / reconstructor blocks, the video
scores, ten loss terms (negatives from MTM's torch sampler), and with ``train.use_ema`` an EMA-weights row in
``train``; see docs/parity.md (MTM).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jaxprvr.cli import add_compile_cache_args, enable_compile_cache
from jaxprvr.errors import JaxprvrError
from parity.base import Plain
from parity.rows import (BLOCK, EPS32, EPS64, MODEL, TOLERANCES, Row, Tolerances, as_numpy, close_row,  # noqa: F401
                         format_table, join_notes, missing_row, nonfinite)

F64_FACTOR = 10.0  # arbiter: JAX's error from float64 <= this x torch's ...
ARBITER_CEILING = 10.0  # ... and <= this x the strict tolerance, in absolute terms (grad/train: see _arbiter_ok)
ZERO_NOISE_FACTOR = 100.0  # listed zero gradients: ||d|| <= this x the tensor's float noise (_grad_rows)
ZERO_CHECK = 1e-3  # a listed (entirely zero) gradient that float32 resolves to this relative accuracy is real
GRAD_REL = TOLERANCES["float32"].grad_rel
TRAIN_REL = TOLERANCES["float32"].train_rel
GROUPS = ("convert", "block", "model", "loss", "grad", "train", "dropout", "metrics")
DTYPES = ("float32", "float64")
MATMUL_PRECISIONS = ("highest", "high", "default")
PERTURB_MODES = ("forward", "all", "none")
PERTURB_STD = 0.1
_np = as_numpy


def spec_of(cfg):
    """The parity spec of a config's family (its registry row's ``parity`` module, ``SPEC``)."""
    from jaxprvr import registry

    return registry.family_of(cfg).parity_module().SPEC


def make_batch(model_cfg, n_videos: int = 4, seed: int = 0, counts=None) -> dict:
    """A random, fully valid batch of the family's layout (:meth:`parity.prvr.PRVRSpec.make_batch`)."""
    return spec_of(model_cfg).make_batch(model_cfg, n_videos, seed, counts)


def cast_batch(batch: dict, dtype: str) -> dict:
    """``batch`` with its float arrays in ``dtype`` (float64: the float32 draws, exactly, in double precision)."""
    if dtype == "float32":
        return batch
    return {k: (np.asarray(v, np.float64) if np.issubdtype(np.asarray(v).dtype, np.floating) else v)
            for k, v in batch.items()}


def with_compute_dtype(cfg, dtype: str):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=dtype))


# ------------------------------------------------------------------------------------------ contexts


def _is_f64(twin) -> bool:
    import torch

    return next(twin.parameters()).dtype == torch.float64


@contextlib.contextmanager
def twin_mode(spec, twin):
    """Where a twin runs: a float64 twin with torch's default dtype float64 (so the constants its forward builds,
    e.g. the Gaussian masks' ``torch.arange(L) / L`` and ``linspace``, are double too) and the family's float64
    scans (``spec.scans()``: MTM's Mamba)."""
    import torch

    old = torch.get_default_dtype()
    if _is_f64(twin):
        torch.set_default_dtype(torch.float64)
    try:
        with spec.scans():
            yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def matmul_precision(precision: str = "highest"):
    """``highest``: full float32 matmuls in both frameworks (``jax.default_matmul_precision("highest")``; torch
    TF32 off for CUDA matmuls and cuDNN); ``high``: TF32-class in both; ``default``: each framework's default (on a
    GPU: JAX TF32-class, torch full float32 matmuls and TF32 cuDNN convolutions)."""
    import jax
    import torch

    if precision not in MATMUL_PRECISIONS:
        raise JaxprvrError("--matmul-precision", f"one of {list(MATMUL_PRECISIONS)}", repr(precision))
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    if precision != "default":
        tf32 = precision == "high"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)
    try:
        if precision == "default":
            yield
        else:
            with jax.default_matmul_precision(precision):
                yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def describe_precision(precision: str) -> str:
    import jax
    import torch

    with matmul_precision(precision):
        jp = jax.config.jax_default_matmul_precision or "default"
        return (f"matmuls {precision}: jax {jp}, torch allow_tf32 matmul={torch.backends.cuda.matmul.allow_tf32} "
                f"cudnn={torch.backends.cudnn.allow_tf32}")


# ------------------------------------------------------------------------------------------ weights


def perturb_twin(twin, seed: int = 0, std: float = PERTURB_STD):
    """A copy of ``twin`` whose weights are moved off the official init: every tensor initialised to a constant
    (biases 0, LayerNorm scale 1 and shift 0, Mamba ``D``, the TCN's ``alpha``) gets ``+ N(0, std^2)``, every other
    tensor is scaled elementwise by ``1 + N(0, std^2)``. Biases and LayerNorm parameters then matter."""
    import torch

    out = copy.deepcopy(twin)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, p in out.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype).to(p.device)
            flat = p.reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                p.add_(std * noise)
            else:
                p.mul_(1.0 + std * noise)
    return out


def _params_of(tab, twin) -> dict:
    import jax

    from parity.convert import torch_to_flax

    return jax.tree.map(np.asarray, torch_to_flax(tab, {k: v.detach().cpu() for k, v in twin.state_dict().items()}))


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
    dt = str(next(iter(sd.values())).dtype).replace("torch.", "")
    return [Row("convert", f"torch -> flax -> torch ({len(sd)} tensors, {dt})", worst, worst, "bit-exact", exact)]


def _arbitrable(row: Row, j_out) -> bool:
    """A failed row the float64 arbiter may look at: same shape, finite, float."""
    return (not row.passed and row.tolerance != "same shape" and not row.note.startswith("non-finite")
            and np.issubdtype(np.asarray(j_out).dtype, np.floating))


def compare_blocks(spec, cfg, model, params, twin, batch, tol: Tolerances = TOLERANCES["float32"],
                   suffix: str = "") -> list[Row]:
    """Each block alone on the same (torch-computed) input, at ``tol.block``. In float32 mode a block outside it is
    judged against float64 (the bounded arbiter): the twin is re-run in double precision on the same input, and the
    row passes when the JAX float32 error is at most ``F64_FACTOR`` times PyTorch's own float32 error and never
    above ``ARBITER_CEILING`` times the strict tolerance (elementwise, in absolute terms). Long reductions at the
    official sizes need it: XLA:CPU's float32 matmul accumulates a 3072-long dot with ~5x the error of MKL's
    (measured 7.4e-6 vs 1.4e-6 max abs on unit-variance inputs; docs/parity.md), which the following LayerNorm
    magnifies."""
    import jax
    import torch

    rtol, atol = tol.block
    arbiter = tol.dtype == "float32"
    with torch.no_grad(), twin_mode(spec, twin):
        _, taux = twin(batch, train=False)
        specs = spec.block_specs(cfg, twin, taux, batch)
        t_outs = [tfn(*inputs) for _, _, tfn, inputs in specs]
    twin64 = specs64 = None
    rows = []
    for i, ((stage, ffn, _, inputs), t_out) in enumerate(zip(specs, t_outs)):
        j_in = [None if x is None else _np(x) for x in inputs]
        if isinstance(ffn, Plain):
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
        row = close_row("block", stage + suffix, j_out, t_out, rtol, atol)
        if arbiter and _arbitrable(row, j_out):
            with torch.no_grad():
                if twin64 is None:  # built once, on the first block that needs the arbiter
                    twin64 = copy.deepcopy(twin).double().eval()
                    with twin_mode(spec, twin64):
                        specs64 = spec.block_specs(cfg, twin64, taux, batch)
                with twin_mode(spec, twin64):
                    t64 = _np(specs64[i][2](*[x.double() if x is not None and torch.is_floating_point(x) else x
                                               for x in inputs]))
            row = _arbitrate(row, j_out, _np(t_out), t64, rtol, atol)
        rows.append(row)
    return rows


def _arbitrate(row: Row, j_out, t_out, t64, rtol, atol) -> Row:
    """The bounded float64 arbiter on one elementwise row (see :func:`compare_blocks`)."""
    t64 = np.asarray(t64, np.float64)
    e_j = np.abs(np.asarray(j_out, np.float64) - t64)
    e_t = np.abs(np.asarray(t_out, np.float64) - t64)
    bad = nonfinite("float64 twin", torch64=t64)
    ceiling = float((e_j / (ARBITER_CEILING * (atol + rtol * np.abs(t64)))).max()) if e_j.size else 0.0
    ratio = float(e_j.max()) / max(float(e_t.max()), 1e-300) if e_j.size else 0.0
    row.passed = not bad and float(e_j.max()) <= F64_FACTOR * float(e_t.max()) + atol * 1e-3 and ceiling <= 1.0
    row.tolerance += f" or float64 arbiter (<= {F64_FACTOR:g}x torch's error, <= {ARBITER_CEILING:g}x tolerance)"
    row.note = join_notes(bad, f"float64 arbiter: |jax-f64| {e_j.max():.1e}, |torch-f64| {e_t.max():.1e} "
                               f"(ratio {ratio:.2f}); |jax-f64| / ({ARBITER_CEILING:g} x tolerance) {ceiling:.2f}")
    return row


def compare_model(model, params, twin, batch, tol: Tolerances = TOLERANCES["float32"], spec=None, suffix="",
                  group="model") -> list[Row]:
    import torch

    scores, aux = model.apply({"params": params}, batch, train=False)
    with torch.no_grad(), (twin_mode(spec, twin) if spec is not None else contextlib.nullcontext()):
        tscores, taux = twin(batch, train=False)
    return _output_rows(group, scores, aux, tscores, taux, tol.model, suffix)


def _output_rows(group, scores, aux, tscores, taux, rtol_atol, suffix="") -> list[Row]:
    rows = []
    for kind, j, t in (("scores", scores, tscores), ("aux", aux, taux)):
        for k in sorted(set(j) | set(t)):
            if k not in j or k not in t:
                rows.append(missing_row(group, f"{kind}[{k}]{suffix}"))
            else:
                rows.append(close_row(group, f"{kind}[{k}]{suffix}", j[k], t[k], *rtol_atol))
    return rows


def compare_losses(spec, cfg, twin, batch, key, tol: Tolerances = TOLERANCES["float32"]) -> list[Row]:
    """Every loss term from the same (torch) scores and the same injected negatives."""
    import torch

    with torch.no_grad(), twin_mode(spec, twin):
        tscores, taux = twin(batch, train=False)
    negs = spec.negatives(cfg, tscores, batch, key, (tscores, taux) if spec.loss_negatives_need_twin() else None)
    s_np = {k: _np(v) for k, v in tscores.items()}
    a_np = {k: _np(v) for k, v in taux.items()}
    jl, jterms = spec.jax_loss(cfg, s_np, a_np, batch, negs)
    with twin_mode(spec, twin):
        tl_, tterms = spec.torch_loss(cfg, tscores, taux, batch, negs)
    return _loss_rows("loss", jl, jterms, tl_, tterms, tol.loss)


def _loss_rows(group, jl, jterms, tl_, tterms, rtol_atol, suffix="") -> list[Row]:
    rows = [close_row(group, f"term {k}{suffix}", jterms[k], tterms[k], *rtol_atol) for k in sorted(tterms)
            if k in jterms]
    rows += [missing_row(group, f"term {k}{suffix} (torch only)") for k in sorted(set(tterms) - set(jterms))]
    missing = sorted(set(jterms) - set(tterms))
    if missing:
        rows.append(missing_row(group, f"terms only in JAX: {', '.join(missing)}{suffix}"))
    rows.append(close_row(group, f"total{suffix}", jl, tl_, *rtol_atol))
    return rows


def _grad_of(p) -> np.ndarray:
    return np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.detach().cpu().numpy()


def make_grad_fn(name, cfg, model, compiler_options=None):
    """``fn(params, batch, negatives) -> (loss, grads)`` of the training loss (train mode, dropout off), jitted (with
    ``compiler_options``, e.g. XLA's cheap CPU pipeline, if given); the ``grad`` and ``train`` stages share it."""
    import jax

    spec = spec_of(cfg)

    def loss_fn(p, b, n):
        scores, aux = model.apply({"params": p}, b, train=spec.jax_train, rngs={"dropout": jax.random.key(0)})
        return spec.jax_loss(cfg, scores, aux, b, n)[0]

    # jit caches one executable per input signature; the second training batch has the first one's shapes
    return jax.jit(jax.value_and_grad(loss_fn), compiler_options=compiler_options or None)


def _jax_grads(spec, cfg, params, batch, negs, grad_fn) -> tuple[float, dict]:
    """JAX loss and gradients by torch parameter name (alias rows once, in the torch layout)."""
    import jax

    from parity.convert import flatten, table
    from parity.keys import to_torch

    jl, jg = grad_fn(params, batch, negs)
    jflat = flatten(jax.device_get(jg))
    return float(jl), {e.torch: to_torch(e.kind, np.asarray(jflat[e.flax]))
                       for e in table(spec.table_for(cfg.model)) if not e.alias}


def _torch_grads(spec, cfg, twin, batch, negs, train=True) -> tuple[float, dict, dict, dict]:
    """The twin's loss, gradients by ``named_parameters`` name, and its (scores, aux) of that forward."""
    twin.zero_grad(set_to_none=True)
    with twin_mode(spec, twin):
        scores, aux = twin(batch, train=train)
        tl_, tterms = spec.torch_loss(cfg, scores, aux, batch, negs)
        tl_.backward()
    return float(tl_.detach()), {n: _grad_of(p) for n, p in twin.named_parameters()}, (scores, aux), tterms


def _norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64).ravel()))


class ZeroList:
    """The family's analytically-zero gradients (:meth:`parity.prvr.PRVRSpec.zero_gradients`) by torch name."""

    def __init__(self, entries):
        self.entries = tuple(entries)
        self._re = [(re.compile(z.pattern), z) for z in self.entries]

    def __call__(self, name: str):
        for rx, z in self._re:
            if rx.fullmatch(name):
                return z
        return None


def _arbiter_ok(e_jax: float, e_torch: float, strict: float) -> bool:
    """The bounded float64 arbiter of one tensor: JAX's distance from float64 at most ``F64_FACTOR`` times torch's,
    and at most ``ARBITER_CEILING`` times the strict tolerance ``strict`` (``rel ||t_64||``). Where the reference
    itself is farther from float64 than ``strict`` (a tensor float32 cannot resolve to the strict tolerance, e.g.
    near-cancelling gradients at an init where the branches are almost equal), torch's own error is the tolerance
    float32 can reach, and the ceiling is ``ARBITER_CEILING`` times that; such tensors are counted in the note."""
    return e_jax <= F64_FACTOR * e_torch and e_jax <= ARBITER_CEILING * max(strict, e_torch)


class AdamWReplay:
    """The float32 AdamW-conditioning arbiter's evidence. Adam divides each entry's update by ``sqrt(v_hat)``, so an
    entry whose gradient is near zero at some step turns float32 gradient rounding (well inside the gradient
    tolerance) into a visible parameter difference, and two float32 frameworks whose reductions round differently
    end up farther apart than ``rel`` after a few steps. This replays ``torch.optim.AdamW`` (after
    ``clip_grad_norm_``) in float64 numpy on **JAX's own per-step gradients** from the common start, and records, at
    each step, how far JAX's gradient **at the float64 twin's parameters of that step** is from the float64 twin's
    (and the float32 twin's gradient, for the arbiter): the gradient function's accuracy along the trajectory,
    without the drift the amplification itself causes.

    A tensor outside ``rel`` and the bounded float64 arbiter then passes only if both hold (:meth:`judge`):
    (1) JAX's parameters are float64 AdamW of JAX's gradients to float32 rounding, elementwise (``|p_jax -
    p_replay| <= 2 t eps32 (|p_replay| + 4 max lr)`` after ``t`` steps: the optimizer -- clipping, moments, bias
    correction, eps, decoupled decay, lr schedule -- is exact), and (2) at every
    step JAX's gradient of that tensor at the float64 parameters is within the gradient tolerance of the float64
    twin's (``grad_rel``, or the bounded arbiter against the float32 twin's distance). What is left between the frameworks is then Adam's
    amplification of in-tolerance gradient rounding, nothing else."""

    def __init__(self, start: dict, b1: float, b2: float, eps: float, weight_decay: float, max_grad_norm: float,
                 grad_rel: float):
        self.p = {k: np.asarray(v, np.float64).copy() for k, v in start.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.b1, self.b2, self.eps, self.wd, self.max_norm, self.grad_rel = b1, b2, eps, weight_decay, max_grad_norm, \
            grad_rel
        self.t, self.max_lr = 0, 0.0
        self.grad_log: dict[str, list] = {k: [] for k in self.p}

    def _clip(self, grads: dict, names) -> dict:
        g = {k: np.asarray(grads[k], np.float64) for k in names}
        if self.max_norm > 0:
            total = float(np.sqrt(sum(float(np.sum(x * x)) for x in g.values())))
            coef = min(1.0, self.max_norm / (total + 1e-6))
            g = {k: x * coef for k, x in g.items()}
        return g

    def step(self, jax_grads: dict, lr: float, g64: dict, g32: dict | None, jax_grads_at64: dict) -> None:
        """One step: ``jax_grads`` (torch name -> JAX's raw gradient on its own trajectory, torch layout) of the
        updated tensors (the others keep their start, as torch skips ``grad is None``); ``g64`` / ``g32`` the twins'
        gradients as their optimizers used them (clipped); ``jax_grads_at64`` JAX's raw gradient at the float64
        twin's parameters before this step."""
        self.t += 1
        names = [k for k in self.p if k in jax_grads]
        g = self._clip(jax_grads, names)
        g_at = self._clip(jax_grads_at64, names)
        bc1, bc2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        for k in names:
            self.max_lr = max(self.max_lr, lr)
            self.p[k] *= 1.0 - lr * self.wd
            self.m[k] = self.b1 * self.m[k] + (1.0 - self.b1) * g[k]
            self.v[k] = self.b2 * self.v[k] + (1.0 - self.b2) * g[k] * g[k]
            self.p[k] -= (lr / bc1) * self.m[k] / (np.sqrt(self.v[k]) / np.sqrt(bc2) + self.eps)
            t64 = np.asarray(g64[k], np.float64)
            e32 = None if g32 is None else _norm(np.asarray(g32[k], np.float64) - t64)
            self.grad_log[k].append((_norm(g_at[k] - t64), _norm(t64), e32))

    def judge(self, name: str, a: np.ndarray) -> tuple[bool, str]:
        """Conditions (1) and (2) of the class docstring for tensor ``name`` with JAX's final value ``a``."""
        if name not in self.p or not self.grad_log.get(name):
            return False, "not replayed"
        r = self.p[name]
        # float32 rounding of `t` steps, elementwise: each rounds p and p - lr u (|u| <= a few) to float32
        room = 2.0 * self.t * EPS32 * (np.abs(r) + 4.0 * self.max_lr)
        ratio = np.abs(np.asarray(a, np.float64) - r) / room
        worst_opt = float(np.max(ratio)) if ratio.size else 0.0
        if not worst_opt <= 1.0:  # NaN fails
            return False, (f"not AdamW of its own gradients (max |jax - replay| / float32 rounding of {self.t} steps "
                           f"{worst_opt:.1f})")
        worst = 0.0
        for t, (e_j, n64, e_t) in enumerate(self.grad_log[name], 1):
            strict = self.grad_rel * n64
            ok = e_j <= strict or (e_t is not None and _arbiter_ok(e_j, e_t, strict))
            worst = max(worst, e_j / max(n64, 1e-300))
            if not ok:
                return False, f"step {t} gradient off float64 by rel {e_j / max(n64, 1e-300):.1e}"
        return True, f"|jax - replay| <= {worst_opt:.2f} x rounding, gradients within rel {worst:.1e}"


def _ill_note(ill: list) -> str:
    if not ill:
        return ""
    return (f", {len(ill)} of them float32-ill-conditioned (torch's own error above the strict tolerance, up to "
            f"{max(ill):.1e} of the tensor)")


def _grad_rows(spec, cfg, jl, jg, tl_, tg, g32, g64, tol: Tolerances, stage: str, group="grad",
               loss_stage="training loss (train mode, dropout off)") -> list[Row]:
    """``||g_jax - g_torch|| <= rel ||g_torch||`` per tensor, each against its own scale; listed zero gradients
    against ``rel ||g|| + floor``, ``floor = ZERO_NOISE_FACTOR * (eps / eps32) * ||g_torch32 - g_torch64||``; in
    float32 mode a failing tensor may pass by the bounded arbiter (:func:`compare_gradients`)."""
    zero = ZeroList(spec.zero_gradients(cfg))
    rel, arbiter, scale = tol.grad_rel, tol.dtype == "float32", tol.eps / EPS32
    worst_abs = worst_rel = 0.0
    worst_key, failing, n_arb, worst_ratio, worst_floor, n_zero, n_own = "", [], 0, 0.0, 0.0, 0, 0
    ill: list[float] = []
    for k, t in tg.items():
        a = np.asarray(jg[k], np.float64)
        t = np.asarray(t, np.float64)
        bad = nonfinite(k, jax=a, torch=t)
        if bad:
            failing.append(f"non-finite {bad}")
            worst_abs = worst_rel = float("inf")
            worst_key = k
            continue
        if a.shape != t.shape:
            failing.append(f"{k}: shapes {a.shape} vs {t.shape}")
            continue
        d, nt = _norm(a - t), _norm(t)
        worst_abs = max(worst_abs, float(np.abs(a - t).max()) if a.size else 0.0)
        z = zero(k)
        if z is not None:
            n_zero += 1
            n64 = _norm(g64[k])
            noise = _norm(np.asarray(g32[k], np.float64) - np.asarray(g64[k], np.float64))
            # the float32 noise of this tensor's computation: torch's float32 error; for an entirely zero tensor
            # also its float64 value (float64 noise) scaled to float32 by eps32 / eps64, two realizations of the
            # rounding noise (one may happen to cancel, e.g. to exactly 0); then scaled to the mode's epsilon
            noise32 = noise if z.partial else max(noise, n64 * EPS32 / EPS64)
            floor = ZERO_NOISE_FACTOR * scale * noise32
            worst_floor = max(worst_floor, d / max(rel * nt + floor, 1e-300))
            if d > rel * nt + floor:
                failing.append(f"{k} (listed zero gradient: ||d|| {d:.1e} > floor {rel * nt + floor:.1e})")
            if not z.partial and noise <= ZERO_CHECK * n64:
                failing.append(f"{k} is listed as zero ({z.reason}) but float32 resolves its gradient: ||g64|| = "
                               f"{n64:.1e}, ||g32 - g64|| = {noise:.1e}")
            continue
        r = d / nt if nt > 0 else (0.0 if d == 0 else float("inf"))
        if r >= worst_rel:
            worst_rel, worst_key = r, k
        if d <= rel * nt:
            n_own += 1
            continue
        if arbiter:
            t64 = np.asarray(g64[k], np.float64)
            e_j, e_t, n64 = _norm(a - t64), _norm(t - t64), _norm(t64)
            n_arb += 1
            worst_ratio = max(worst_ratio, e_j / max(e_t, 1e-300))
            if e_t > rel * n64:
                ill.append(e_t / max(n64, 1e-300))
            if _arbiter_ok(e_j, e_t, rel * n64):
                continue
            failing.append(f"{k} (rel {r:.1e}; ||jax-f64|| {e_j:.1e}, ||torch-f64|| {e_t:.1e})")
        else:
            failing.append(f"{k} (rel {r:.1e})")
    note = f"worst: {worst_key} ({worst_rel:.1e}); own scale decides {n_own} of {len(tg)} tensors"
    if arbiter:
        note += f", float64 arbiter {n_arb}" + (f" (worst ||jax-f64|| / ||torch-f64|| {worst_ratio:.2f})"
                                                 if n_arb else "") + _ill_note(ill)
    note += f", listed zero gradients {n_zero} (worst ||d|| / floor {worst_floor:.2f})"
    if failing:
        note += "; failing: " + ", ".join(failing[:4]) + (f" ... ({len(failing)})" if len(failing) > 4 else "")
    tolerance = (f"||d|| <= {rel:g} ||g||" + (" or f64 arbiter" if arbiter else "")
                 + f"; zero list + {ZERO_NOISE_FACTOR:g}x f32 noise" + (" x eps64/eps32" if not arbiter else ""))
    return [close_row(group, loss_stage, jl, tl_, *tol.loss),
            Row(group, stage, worst_abs, worst_rel, tolerance, not failing, note)]


def _dropout_off_twins(spec, cfg, twin32, device=None) -> tuple:
    """The float32 and float64 twins of the grad/train stages: dropout off (config rates and the twin-only ones)."""
    import torch_ref

    tcfg = spec.no_dropout(cfg)
    t32 = spec.dropout_off(torch_ref.build_model(tcfg.model))
    t32.load_state_dict(twin32.state_dict())
    if device is not None:
        t32 = t32.to(device)
    return t32, copy.deepcopy(t32).double()


def compare_gradients(spec, cfg, model, params, twins, batch, key, tol: Tolerances = TOLERANCES["float32"],
                      grad_fn=None) -> list[Row]:
    """Per tensor ``||g_jax - g_torch|| <= rel ||g_torch||`` (rel 1e-4 in float32, 1e-9 in float64): each tensor
    against its own scale. ``twins``: ``(float32 twin, float64 twin)``, dropout off; the one of ``tol.dtype`` is
    compared, the other gives each tensor's float32 noise ``||g_torch32 - g_torch64||``.

    The tensors whose gradient is zero in exact arithmetic (``spec.zero_gradients(cfg)``, by name pattern, with
    the reason; e.g. attention key biases, by softmax shift-invariance) are float noise in both frameworks and are
    judged against ``||d|| <= rel ||g|| + ZERO_NOISE_FACTOR * (eps / eps32) * noise32``: 100x the float32 noise of
    that tensor's own computation, measured on the twin (``noise32``: the larger of ``||g_torch32 - g_torch64||``
    and, for an entirely zero tensor, ``||g_torch64|| eps32 / eps64``), scaled to the mode's epsilon (rounding noise
    scales with the unit roundoff of the same computation). Two implementations' rounding of one cancelling sum
    differ by up to ~20x in our runs, hence 100x. The check also verifies the list: float32 must not resolve such
    a gradient (``noise32 > ZERO_CHECK ||g_torch64||``; not asked of the partially-zero ones).

    In float32 mode a tensor outside the criterion passes by the bounded arbiter (:func:`_arbiter_ok`):
    ``||g_jax - g_64|| <= F64_FACTOR ||g_torch - g_64||`` and ``<= ARBITER_CEILING * rel * ||g_64||``, or, where
    torch itself is farther than ``rel ||g_64||`` from float64, ``<= ARBITER_CEILING ||g_torch - g_64||``."""
    import torch

    t32, t64 = twins
    cmp = t64 if tol.dtype == "float64" else t32
    with torch.no_grad(), twin_mode(spec, cmp):
        out = cmp(batch, train=True)
    negs = spec.negatives(cfg, out[0], batch, key, out)
    grad_fn = grad_fn or make_grad_fn(spec.name, cfg, model)
    jl, jg = _jax_grads(spec, cfg, params, batch, negs, grad_fn)
    b32, b64 = cast_batch(batch, "float32"), cast_batch(batch, "float64")
    tl32, g32, _, _ = _torch_grads(spec, cfg, t32, b32, negs)
    tl64, g64, _, _ = _torch_grads(spec, cfg, t64, b64, negs)
    tl_, tg = (tl64, g64) if tol.dtype == "float64" else (tl32, g32)
    return _grad_rows(spec, cfg, jl, jg, tl_, tg, g32, g64, tol, f"d loss / d param ({len(tg)} tensors)")


def _compare_trained(stage, tab, jtree, named, named64, tol: Tolerances, zero: ZeroList, bound: float,
                     replay: AdamWReplay | None = None) -> Row:
    """Per tensor (by torch name, alias rows skipped) ``||jax - torch|| <= rel ||torch||``; else (float32, with
    ``named64``) the bounded arbiter (:func:`_arbiter_ok`), and, given ``replay``, the AdamW-conditioning arbiter
    (:class:`AdamWReplay`). Listed zero-gradient tensors: ``max |jax - torch| <= bound`` (the Adam bound)."""
    from parity.convert import flatten, table
    from parity.keys import to_torch

    rel = tol.train_rel
    jflat = flatten(jtree)
    worst_rel, worst_key, worst_abs, n_f64, worst_ratio, n_zero, worst_zero = 0.0, "", 0.0, 0, 0.0, 0, 0.0
    failing: list[str] = []
    adam: list[str] = []
    ill: list[float] = []
    for e in table(tab):
        if e.alias:
            continue
        a = to_torch(e.kind, np.asarray(jflat[e.flax])).astype(np.float64)
        t = _np(named[e.torch]).astype(np.float64)
        bad = nonfinite(e.torch, jax=a, torch=t)
        if bad:
            failing.append(f"non-finite {bad}")
            worst_abs = worst_rel = float("inf")
            worst_key = e.torch
            continue
        dmax = float(np.abs(a - t).max()) if a.size else 0.0
        worst_abs = max(worst_abs, dmax)
        if zero(e.torch) is not None:
            n_zero += 1
            worst_zero = max(worst_zero, dmax / bound if bound > 0 else (0.0 if dmax == 0 else float("inf")))
            if dmax > bound:
                failing.append(f"{e.torch} (listed zero gradient: max |d| {dmax:.1e} > Adam bound {bound:.1e})")
            continue
        d, nt = _norm(a - t), _norm(t)
        r = d / nt if nt > 0 else (0.0 if d == 0 else float("inf"))
        if r >= worst_rel:
            worst_rel, worst_key = r, e.torch
        if d <= rel * nt:
            continue
        if named64 is None:
            failing.append(f"{e.torch} (rel {r:.1e})")
            continue
        t64 = _np(named64[e.torch]).astype(np.float64)
        e_j, e_t, n64 = _norm(a - t64), _norm(t - t64), _norm(t64)
        n_f64 += 1
        worst_ratio = max(worst_ratio, e_j / max(e_t, 1e-300))
        if e_t > rel * n64:
            ill.append(e_t / max(n64, 1e-300))
        if _arbiter_ok(e_j, e_t, rel * n64):
            continue
        why = ""
        if replay is not None:
            ok, why = replay.judge(e.torch, a)
            if ok:
                adam.append(f"{e.torch} ({why})")
                continue
            why = f", AdamW replay: {why}"
        failing.append(f"{e.torch} (rel {r:.1e}, ||jax-f64|| {e_j:.1e}, ||torch-f64|| {e_t:.1e}{why})")
    note = f"worst: {worst_key}"
    if n_f64:
        note += (f"; {n_f64} tensors above rel {rel:g} judged vs float64: worst ||jax-f64|| / ||torch-f64|| = "
                 f"{worst_ratio:.2f}{_ill_note(ill)}")
    note += f"; listed zero-gradient tensors {n_zero} (worst max|d| / Adam bound {worst_zero:.2f})"
    if adam:
        note += (f"; {len(adam)} passed by the AdamW-conditioning arbiter (= float64 AdamW of JAX's own gradients, "
                 f"which are in gradient tolerance at every step): " + ", ".join(adam[:3])
                 + (f" ... ({len(adam)})" if len(adam) > 3 else ""))
    if failing:
        note += "; failing: " + ", ".join(failing[:4]) + (f" ... ({len(failing)})" if len(failing) > 4 else "")
    tolerance = (f"rel {rel:g}" + (" or f64 arbiter" if named64 is not None else "")
                 + (" or AdamW replay" if replay is not None else "")
                 + f"; zero list |d| <= Adam bound {bound:.1e}")
    return Row("train", stage, worst_abs, worst_rel, tolerance, not failing, note)


def compare_training(spec, cfg, model, params, twins, batches, key, steps: int = 5, t_total: int = 100,
                     grad_fn=None, tol: Tolerances = TOLERANCES["float32"]) -> list[Row]:
    """``steps`` BertAdam steps in each framework (official lr and warmup, ``t_total`` steps so the rate is
    non-zero after the first step, per-tensor clipping, weight-decay groups). Negatives (and v2's / MTM's
    matching) are drawn once per step from the compared twin's scores and injected into both. With
    ``cfg.train.use_ema`` (MTM) the EMA of the weights is compared too: :func:`jaxprvr.optim.with_ema` against the
    official :class:`torch_ref.optim.EMA` called after the ``i``-th torch step (0-based) with ``step=i``.

    A tensor passes at ``||p_jax - p_torch|| <= rel ||p_torch||`` (1e-5 in float32, 1e-9 in float64). In float32
    mode a float64 twin trains alongside on the same batches and negatives, and a tensor outside the criterion
    passes by the bounded arbiter (:func:`_arbiter_ok`: within ``F64_FACTOR`` times torch's distance from float64
    and ``ARBITER_CEILING`` times the strict tolerance, or torch's own error where that is larger) (at the official
    sizes the 3072-wide input projections accumulate with XLA:CPU's less accurate matmul;
    docs/parity.md). The listed zero-gradient tensors (``spec.zero_gradients``) are moved by Adam from gradient
    noise, in a float-dependent direction; they pass within ``spec.adam_step_bound`` elementwise (what BertAdam can
    move a tensor whatever its gradients, twice). (The float64 twin's Mamba layers scan in float64,
    :class:`parity.mtm.MambaScan`.)"""
    import jax
    import optax
    import torch

    tc = cfg.train
    f64 = tol.dtype == "float64"
    t32, t64 = (copy.deepcopy(t) for t in twins)
    trained = [t64] if f64 else [t32, t64]  # the compared twin first
    tx = spec.jax_optimizer(cfg, params, t_total)
    opts = [spec.torch_optimizer(cfg, tw, t_total) for tw in trained]
    emas = None
    if tc.use_ema:
        from torch_ref.optim import EMA

        emas = [EMA.from_model(tw, tc.ema_decay) for tw in trained]
    state = tx.init(params)
    grad_fn = grad_fn or make_grad_fn(spec.name, cfg, model)

    @jax.jit
    def update(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(steps):
        batch = batches[i % len(batches)]
        with torch.no_grad(), twin_mode(spec, trained[0]):
            out = trained[0](cast_batch(batch, tol.dtype), train=True)
        negs = spec.negatives(cfg, out[0], batch, jax.random.fold_in(key, i), out)
        for j, (tw, opt) in enumerate(zip(trained, opts)):
            b = cast_batch(batch, "float64" if _is_f64(tw) else "float32")
            with twin_mode(spec, tw):
                opt.zero_grad(set_to_none=True)
                scores, aux = tw(b, train=True)
                spec.torch_loss(cfg, scores, aux, b, negs)[0].backward()
            opt.step()
            if emas is not None:
                emas[j](tw, i)
        params, state = update(grad_fn(params, cast_batch(batch, tol.dtype), negs)[1], state, params)
    tab = spec.table_for(cfg.model)
    zero = ZeroList(spec.zero_gradients(cfg))
    bound = spec.adam_step_bound(cfg, t_total, steps)
    ref = None if f64 else dict(t64.named_parameters())
    rows = [_compare_trained(f"params after {steps} BertAdam steps", tab, jax.device_get(params),
                             dict(trained[0].named_parameters()), ref, tol, zero, bound)]
    if emas is not None:
        rows.append(_compare_trained(f"EMA weights after {steps} steps (decay {tc.ema_decay:g}, "
                                     "torch_ref.optim.EMA(step=i))", tab, jax.device_get(state.shadow),
                                     emas[0].shadow, None if f64 else emas[1].shadow, tol, zero, bound))
    return rows


def compare_dropout(spec, cfg, model, params, twins, batch, key, tol: Tolerances = TOLERANCES["float32"]
                    ) -> list[Row]:
    """Dropout ON (the config's rates and the twin-only ones, e.g. MTM's TCN), the same masks in both frameworks
    (:func:`torch_ref.dropout.shared_dropout`): every score and ``aux`` stage, every loss term and the gradients,
    at the ``model`` / ``loss`` / ``grad`` criteria. ``twins``: the float32 and float64 twins (train mode); the one
    of ``tol.dtype`` is compared, the pair gives the zero gradients' float32 noise (same masks: the masks are a
    function of the Flax dropout keys and the shapes only)."""
    from torch_ref.dropout import SharedDropoutError

    try:
        return _compare_dropout(spec, cfg, model, params, twins, batch, key, tol)
    except SharedDropoutError as e:  # the frameworks do not make the same dropout calls: a dropout added or removed
        return [Row("dropout", "the same dropout calls in both frameworks", float("inf"), float("inf"),
                    "every Flax draw consumed by the twin, and only those", False, str(e))]


def _compare_dropout(spec, cfg, model, params, twins, batch, key, tol):
    import jax
    import torch

    from torch_ref.dropout import shared_dropout

    t32, t64 = twins
    cmp = t64 if tol.dtype == "float64" else t32
    dkey = jax.random.fold_in(key, 7)
    with torch.no_grad(), shared_dropout(cmp, model, params, batch, dkey) as shared, twin_mode(spec, cmp):
        tscores, taux = cmp(batch, train=True)
    jscores, jaux = shared.flax_outputs
    rows = _output_rows("dropout", jscores, jaux, tscores, taux, tol.model, " [train, dropout on]")
    negs = spec.negatives(cfg, tscores, batch, key, (tscores, taux))

    def loss_fn(p):
        s, a = model.apply({"params": p}, batch, train=True, rngs={"dropout": dkey})
        return spec.jax_loss(cfg, s, a, batch, negs)

    (jl, jterms), jg = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    from parity.convert import flatten, table
    from parity.keys import to_torch

    jflat = flatten(jax.device_get(jg))
    jg = {e.torch: to_torch(e.kind, np.asarray(jflat[e.flax])) for e in table(spec.table_for(cfg.model))
          if not e.alias}
    grads, losses = {}, {}
    for tw in (t32, t64):
        b = cast_batch(batch, "float64" if _is_f64(tw) else "float32")
        tw.zero_grad(set_to_none=True)
        with shared_dropout(tw, model, params, batch, dkey), twin_mode(spec, tw):
            s, a = tw(b, train=True)
            tl_, tterms = spec.torch_loss(cfg, s, a, b, negs)
            tl_.backward()
        grads[_is_f64(tw)] = {n: _grad_of(q) for n, q in tw.named_parameters()}
        losses[_is_f64(tw)] = (float(tl_.detach()), tterms)
    tl_, tterms = losses[_is_f64(cmp)]
    rows += _loss_rows("dropout", jl, jterms, tl_, tterms, tol.loss, " [dropout on]")[:-1]
    rows += _grad_rows(spec, cfg, jl, jg, tl_, grads[_is_f64(cmp)], grads[False], grads[True], tol,
                       f"d loss / d param, dropout on ({len(jg)} tensors)", group="dropout",
                       loss_stage="training loss, dropout on")
    return rows


# ------------------------------------------------------------------------------------------ driver


def run_check(cfg, *, ckpt=None, data_root=None, seed: int = 0, n_videos: int = 4, steps: int = 5,
              groups=("convert", "block", "model", "loss", "grad", "train", "metrics"), device=None,
              progress: Callable[[str], None] | None = None, compiler_options=None, dtype: str = "float32",
              matmul: str = "highest", perturb: str = "forward") -> list[Row]:
    """All stages for ``cfg.model.name``; returns the rows. ``ckpt``: an official checkpoint file.
    ``compiler_options``: XLA options for the compiled training gradient (e.g. a cheaper CPU pipeline in tests;
    the default is XLA's own). ``dtype``: ``float32`` or ``float64`` (needs ``jax_enable_x64``). ``matmul``: the
    matmul precision (:func:`matmul_precision`). ``perturb``: ``forward`` (default) runs ``block`` and ``model``
    again on perturbed weights (:func:`perturb_twin`), ``all`` runs every group on perturbed weights instead of
    the given ones, ``none`` neither."""
    import jax

    if dtype not in DTYPES:
        raise JaxprvrError("--dtype", f"one of {list(DTYPES)}", repr(dtype))
    if perturb not in PERTURB_MODES:
        raise JaxprvrError("--perturb", f"one of {list(PERTURB_MODES)}", repr(perturb))
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise JaxprvrError("--dtype float64", "jax_enable_x64 on (python -m parity.check turns it on; in Python: "
                                              "jax.config.update('jax_enable_x64', True))", "x64 disabled")
    with matmul_precision(matmul):
        return _run(cfg, ckpt, data_root, seed, n_videos, steps, tuple(groups), device, progress or (lambda s: None),
                    compiler_options, TOLERANCES[dtype], perturb)


def _run(cfg, ckpt, data_root, seed, n_videos, steps, groups, device, say, compiler_options, tol, perturb):
    import jax
    import torch

    import torch_ref
    from jaxprvr.models import build_model
    from torch_ref.checkpoints import load_official

    name = cfg.model.name
    spec = spec_of(cfg)
    if spec.check_rows is not None:  # a family with its own stages (parity.base.FamilySpec.check_rows)
        return spec.check_rows(cfg, ckpt=ckpt, data_root=data_root, seed=seed, n_videos=n_videos, steps=steps,
                               groups=groups, device=device, say=say, compiler_options=compiler_options, tol=tol,
                               perturb=perturb)
    tab = spec.table_for(cfg.model)
    f64 = tol.dtype == "float64"
    torch.manual_seed(seed)
    twin32 = torch_ref.build_model(cfg.model)
    if ckpt is not None:
        ck = load_official(ckpt)
        try:
            twin32.load_state_dict(ck.state_dict, strict=True)
        except RuntimeError as e:
            raise JaxprvrError(ckpt, f"a {name} checkpoint matching the config", str(e).splitlines()[0]) from None
    if perturb == "all":
        twin32 = perturb_twin(twin32, seed)
    if device is not None:
        twin32 = twin32.to(device)
    if f64:
        cfg = with_compute_dtype(cfg, "float64")
    twin = copy.deepcopy(twin32).double() if f64 else twin32
    params = _params_of(tab, twin)
    model = build_model(cfg.model)
    batch = cast_batch(spec.make_batch(cfg.model, n_videos, seed), tol.dtype)
    key = jax.random.key(seed)
    rows: list[Row] = []
    if "convert" in groups:
        rows += compare_conversion(name, twin, tab)
    forward = [(twin, params, "")]
    if perturb == "forward" and ("block" in groups or "model" in groups):
        tp = perturb_twin(twin, seed)
        forward.append((tp, _params_of(tab, tp), " [perturbed]"))
    if "block" in groups:
        say("blocks")
        for tw, p, suffix in forward:
            rows += compare_blocks(spec, cfg, model, p, tw, batch, tol, suffix)
    if "model" in groups:
        say("whole model")
        for tw, p, suffix in forward:
            rows += compare_model(model, p, tw, batch, tol, spec, suffix)
    if "loss" in groups:
        say("losses")
        rows += compare_losses(spec, cfg, twin, batch, key, tol)
    if "grad" in groups or "train" in groups:
        tcfg = spec.no_dropout(cfg)
        twins = _dropout_off_twins(spec, cfg, twin32, device)
        tmodel = build_model(tcfg.model)
        grad_fn = make_grad_fn(name, tcfg, tmodel, compiler_options)
        if "grad" in groups:
            say("gradients")
            rows += compare_gradients(spec, tcfg, tmodel, params, twins, batch, key, tol, grad_fn=grad_fn)
        if "train" in groups:
            say(f"{steps} training steps")
            batches = [batch, spec.second_batch(cfg.model, batch, n_videos, seed)]
            rows += compare_training(spec, tcfg, tmodel, params, twins, batches, key, steps=steps, grad_fn=grad_fn,
                                     tol=tol)
    if "dropout" in groups:
        say("dropout on")
        t32 = twin32.train()
        rows += compare_dropout(spec, cfg, model, params, (t32, copy.deepcopy(t32).double()), batch, key, tol)
    if "metrics" in groups:
        say("evaluation")
        rows += spec.compare_metrics(cfg, params, twin, data_root, seed, tol=tol,
                                     twin_context=lambda: twin_mode(spec, twin))
    return rows


def build_parser() -> argparse.ArgumentParser:
    from jaxprvr import registry

    p = argparse.ArgumentParser(prog="python -m parity.check",
                                description="Compare jaxprvr with its PyTorch twin stage by stage (float32 or "
                                            "float64) and print max abs / rel differences with PASS/FAIL.")
    p.add_argument("--model", required=True, choices=registry.names())
    p.add_argument("--config", required=True, help="dataset (tvr|act|cha) or <model>/<dataset>")
    p.add_argument("--ckpt", default=None, help="official checkpoint file (model.ckpt / best.ckpt); default: the "
                                                "official init")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.hidden_size=32 for a quick check")
    p.add_argument("--data-root", default=None, help="evaluate on this dataset's test split (default: a synthetic "
                                                     "100-video gallery at the config's dims)")
    p.add_argument("--groups", default=None,
                   help=f"comma-separated subset of {','.join(GROUPS)} (default: all; 'dropout' needs "
                        "torch_ref.dropout)")
    p.add_argument("--videos", type=int, default=4, help="videos per batch (1-3 queries each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="float64: both frameworks in double precision (jax_enable_x64, twin.double()), rtol 1e-9")
    p.add_argument("--matmul-precision", default="highest", choices=MATMUL_PRECISIONS,
                   help="highest (default): full float32 matmuls in both frameworks (no TF32 on a GPU); high: "
                        "TF32-class in both; default: each framework's own default")
    p.add_argument("--perturb", default="forward", choices=PERTURB_MODES,
                   help="forward (default): block and model again on perturbed weights (random biases, LayerNorm "
                        "scale/shift); all: every group on perturbed weights only; none")
    p.add_argument("--device", default=None, help="torch device for the twin (cpu, cuda); JAX uses its default")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    return add_compile_cache_args(p)


def default_groups() -> tuple:
    """Every group; ``dropout`` only when :mod:`torch_ref.dropout` can share the masks."""
    try:
        import torch_ref.dropout  # noqa: F401
    except ImportError:
        return tuple(g for g in GROUPS if g != "dropout")
    return GROUPS


def main(argv=None) -> int:
    import jax

    from jaxprvr.config import load_config

    args = build_parser().parse_args(argv)
    enable_compile_cache(args)
    groups = default_groups() if args.groups is None else tuple(g.strip() for g in args.groups.split(",")
                                                                  if g.strip())
    try:
        if not set(groups) <= set(GROUPS):
            raise JaxprvrError("--groups", f"a subset of {sorted(GROUPS)}", ",".join(sorted(set(groups) - set(GROUPS))))
        if args.videos < 2:
            raise JaxprvrError("--videos", "at least 2 (a triplet needs a negative video)", str(args.videos))
        cfg = load_config(args.config, args.model, list(args.overrides))
        if args.ckpt is not None and not Path(args.ckpt).is_file():
            raise JaxprvrError(args.ckpt, "an official checkpoint file", "no such file")
        if args.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        t0 = time.perf_counter()
        rows = run_check(cfg, ckpt=args.ckpt, data_root=args.data_root, seed=args.seed, n_videos=args.videos,
                         groups=groups, device=args.device, dtype=args.dtype, matmul=args.matmul_precision,
                         perturb=args.perturb,
                         progress=lambda s: print(f"parity.check: {s} ...", file=sys.stderr, flush=True))
    except JaxprvrError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    dev = f"JAX {jax.devices()[0].device_kind} vs torch {args.device or 'cpu'} ({torch.__version__})"
    title = (f"parity.check {args.model} / {cfg.data.dataset}: {spec_of(cfg).describe(cfg)}; {args.dtype}; "
             f"{describe_precision(args.matmul_precision)}"
             f"; {dev}; {'checkpoint ' + args.ckpt if args.ckpt else 'official init'}"
             f"{'' if args.perturb == 'none' else ', perturbed: ' + args.perturb}; "
             f"{time.perf_counter() - t0:.0f} s\n")
    print(format_table(rows, title))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "config": args.config, "device": dev,
                                               "dtype": args.dtype, "matmul_precision": args.matmul_precision,
                                               "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
