"""BertAdam and its ``warmup_linear`` schedule, as optax transformations (official PRVR optimizer).

The official MS-SL / GMMFormer / GMMFormer v2 / MTM repos all train with the same ``BertAdam``
(GMMFormer ``src/Opts/optimization.py:223-343``; ms-sl ``method/optimization.py``, same maths). Per
parameter tensor, in this order (``step()`` at ``:289-336``):

1. **per-tensor** gradient clipping ``clip_grad_norm_(p, max_grad_norm)`` (``:311-312``): the gradient is
   scaled by ``min(1, max_grad_norm / (||g|| + 1e-6))`` (torch's ``clip_grad_norm_``), tensor by tensor;
   this is not global-norm clipping;
2. ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2`` (``:316-317``);
3. ``u = m / (sqrt(v) + eps)`` with eps outside the sqrt and **no bias correction** (``:318, 338-341``);
4. ``u += wd p`` for the tensors of the decayed group (``:327-328``);
5. ``p -= lr * warmup_linear(step / t_total) * u`` with ``step`` counted from 0 (``:330-336``), so the first
   update has learning rate 0 (the moments still move).

Parameter groups (GMMFormer ``src/Opts/builder.py:5-9``; ms-sl ``method/train.py:138-142``): decay 0.01
for torch parameter names containing none of ``"bias"``, ``"LayerNorm.bias"``, ``"LayerNorm.weight"``,
else 0. :func:`official_weight_decay_mask` reproduces that rule on Flax parameter paths.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprvr.errors import JaxprvrError

__all__ = ["warmup_linear", "warmup_cosine", "SCHEDULES", "clamp_max", "official_weight_decay_mask",
           "torch_style_name", "BertAdamState", "bert_adam", "EmaState", "ema_decay_at", "ema_update", "with_ema",
           "bert_adam_state_of", "eval_params"]

# Substrings of the official no-decay rule (GMMFormer src/Opts/builder.py:6).
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")
# Flax leaf names -> torch parameter names, for the name rule.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _float_dtype(tree):
    """float64 if ``tree`` has a float64 leaf (a float64 parity check, x64 enabled), else float32: the dtype of
    the schedule and EMA arithmetic, which torch does in Python doubles on float64 tensors."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.float64 if any(getattr(x, "dtype", None) == jnp.float64 for x in leaves) else jnp.float32


def _warmup_then(after_py, after_jnp):
    """A BertAdam schedule of ``progress = step / t_total``: ``progress / warmup`` during the warmup, then
    ``after(progress)`` (``_LRSchedule``: ``t_total < 0`` gives a constant 1, ``warmup = -1`` means 0). Works on
    Python numbers and jax arrays; ``dtype``: of a traced ``step``'s schedule (float64 only with x64)."""

    def schedule(step, warmup: float, t_total: float, dtype=jnp.float32):
        _check_warmup(warmup)
        warmup = max(float(warmup), 0.0)
        t_total = float(t_total)
        if t_total < 0:
            return jnp.ones_like(jnp.asarray(step, dtype)) if isinstance(step, jax.Array) else 1.0
        if isinstance(step, (int, float)):
            progress = step / t_total
            return progress / warmup if progress < warmup else after_py(progress, warmup)
        progress = jnp.asarray(step, dtype) / t_total
        during = progress / (warmup if warmup > 0 else 1.0)
        return jnp.where(progress < warmup, during, after_jnp(progress, warmup))

    return schedule


# Official ``WarmupLinearSchedule`` (GMMFormer ``Opts/optimization.py:172-175``): after the warmup,
# ``max((progress - 1) / (warmup - 1), 0)``.
warmup_linear = _warmup_then(lambda x, w: max((x - 1.0) / (w - 1.0), 0.0),
                             lambda x, w: jnp.maximum((x - 1.0) / (w - 1.0), 0.0))
# BackBone_tvr / DRL ``warmup_cosine`` (``optimization.py`` L26-29): after the warmup, ``0.5 (1 + cos(pi
# progress))`` over the **whole** run (not re-normalised: the factor drops from ~1 to 0.976 at 10 %).
warmup_cosine = _warmup_then(lambda x, w: 0.5 * (1.0 + math.cos(math.pi * x)),
                             lambda x, w: 0.5 * (1.0 + jnp.cos(jnp.pi * x)))

SCHEDULES = {"warmup_linear": warmup_linear, "warmup_cosine": warmup_cosine}


def _check_warmup(warmup: float) -> None:
    # _LRSchedule.__init__ (Opts/optimization.py:48-49)
    if not (0.0 <= warmup < 1.0) and warmup != -1:
        raise JaxprvrError("bert_adam warmup", "a proportion in [0, 1) or -1", repr(warmup))


def torch_style_name(path) -> str:
    """The dotted torch-style name of a Flax parameter path (``kernel``/``scale``/``embedding`` -> ``weight``)."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        else:
            parts.append(str(entry))
    if parts and parts[0] == "params":  # a full variables dict
        parts = parts[1:]
    if parts:
        parts[-1] = _LEAF_TO_TORCH.get(parts[-1], parts[-1])
    return ".".join(parts)


def official_weight_decay_mask(params) -> Any:
    """Pytree of bools, True where the official code applies weight decay.

    The official rule is a substring test on the torch name: no decay iff it contains ``"bias"``,
    ``"LayerNorm.bias"`` or ``"LayerNorm.weight"``. Flax names mirror the torch attribute names (a torch
    ``LayerNorm`` is a Flax module named ``LayerNorm`` with ``scale``/``bias``; ``norm1``/``norm2`` keep
    their names), so in practice: no decay iff the leaf is ``bias`` or its module is ``LayerNorm``;
    ``norm1.scale``, ``weight_token``, position embeddings, Mamba ``A_log``/``D`` are decayed, as officially.
    """
    def decide(path, _leaf):
        name = torch_style_name(path)
        return not any(nd in name for nd in NO_DECAY)

    return jax.tree_util.tree_map_with_path(decide, params)


class BertAdamState(NamedTuple):
    count: jax.Array  # step counter, from 0 (the official per-tensor ``state['step']``)
    m: Any  # ``next_m``
    v: Any  # ``next_v``


def bert_adam(lr: float, warmup: float, t_total: int, weight_decay: float = 0.01,
              weight_decay_mask: Any | Callable[[Any], Any] = official_weight_decay_mask,
              max_grad_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-6, schedule: str = "warmup_linear",
              lr_scale: Any | Callable[[Any], Any] = None) -> optax.GradientTransformation:
    """Official BertAdam with the ``warmup_linear`` (PRVR) or ``warmup_cosine`` (BackBone_tvr) schedule, as one
    optax transformation.

    ``weight_decay_mask``: a pytree of bools like the params, or a function of the params returning one
    (default :func:`official_weight_decay_mask`); ``None`` decays every tensor. ``max_grad_norm <= 0``
    disables the per-tensor clipping, as officially. ``t_total = steps_per_epoch * n_epoch``. ``lr_scale``: a
    pytree of floats (or a function of the params returning one), each tensor's group learning rate as a
    multiple of ``lr`` (BackBone_tvr's ``lr * coef_lr`` for the CLIP tensors); ``None``: 1 everywhere.
    The updates are meant for ``optax.apply_updates`` (``p + update = p - lr_t * u``).
    """
    if schedule not in SCHEDULES:
        raise JaxprvrError("bert_adam schedule", f"one of {sorted(SCHEDULES)}", repr(schedule))
    sched_fn = SCHEDULES[schedule]
    if lr < 0.0:
        raise JaxprvrError("bert_adam lr", "a learning rate >= 0", repr(lr))
    _check_warmup(warmup)
    if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
        raise JaxprvrError("bert_adam betas", "b1, b2 in [0, 1)", repr((b1, b2)))
    if eps < 0.0:
        raise JaxprvrError("bert_adam eps", "eps >= 0", repr(eps))

    def init_fn(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return BertAdamState(count=jnp.zeros((), jnp.int32), m=zeros,
                             v=jax.tree_util.tree_map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("bert_adam needs params (weight decay): call update(grads, state, params)")
        if weight_decay_mask is None:
            mask = jax.tree_util.tree_map(lambda _: True, params)
        elif callable(weight_decay_mask):
            mask = weight_decay_mask(params)
        else:
            mask = weight_decay_mask

        def clip(g):
            if max_grad_norm <= 0:
                return g
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.promote_types(g.dtype, jnp.float32)))))
            coef = jnp.minimum(max_grad_norm / (norm + 1e-6), 1.0)  # torch clip_grad_norm_
            return (g * coef).astype(g.dtype)

        grads = jax.tree_util.tree_map(clip, updates)
        m = jax.tree_util.tree_map(lambda m_, g: b1 * m_ + (1.0 - b1) * g, state.m, grads)
        v = jax.tree_util.tree_map(lambda v_, g: b2 * v_ + (1.0 - b2) * g * g, state.v, grads)
        factor = sched_fn(state.count, warmup, t_total, dtype=_float_dtype(params))
        if lr_scale is None:
            scales = jax.tree_util.tree_map(lambda _: 1.0, params)
        else:
            scales = lr_scale(params) if callable(lr_scale) else lr_scale

        def step(m_, v_, p, decay, scale):
            u = m_ / (jnp.sqrt(v_) + eps)
            if weight_decay > 0.0:
                if isinstance(decay, (bool, np.bool_)):
                    if decay:
                        u = u + weight_decay * p
                else:  # a traced/array mask
                    u = u + weight_decay * p * jnp.asarray(decay, u.dtype)
            # the group's lr (a Python float: lr * coef_lr) times the schedule, as BertAdam computes lr_scheduled
            return (-(lr * float(scale)) * factor * u).astype(p.dtype)

        new_updates = jax.tree_util.tree_map(step, m, v, params, mask, scales)
        return new_updates, BertAdamState(count=state.count + 1, m=m, v=v)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------------
# EMA of the weights (MTM)
# ----------------------------------------------------------------------------------------------------

class EmaState(NamedTuple):
    inner: Any  # the wrapped optimizer's state (BertAdamState)
    shadow: Any  # the averaged parameters (official ``EMA.shadow``), same tree as the params


def ema_decay_at(step, decay: float, dtype=jnp.float32):
    """Official warm decay ``min(decay, (1 + step) / (10 + step))`` (MTM ``Opts/optimization.py:201``), in
    ``dtype`` (float32; float64 for float64 parameters)."""
    step = jnp.asarray(step, dtype)
    return jnp.minimum(jnp.asarray(decay, dtype), (1.0 + step) / (10.0 + step))


def ema_update(shadow, params, step, decay: float):
    """One official EMA update: ``shadow = (1 - d) p + d shadow`` with ``d = ema_decay_at(step, decay)``
    (MTM ``Opts/optimization.py:200-206``)."""
    dt = _float_dtype(shadow)
    d = ema_decay_at(step, decay, dt)
    # 1 - d as torch gets it (a Python double rounded once to float32, or kept for float64 tensors):
    # max(1 - decay, 9 / (10 + step)).
    one_minus = jnp.maximum(jnp.asarray(1.0 - decay, dt), 9.0 / (10.0 + jnp.asarray(step, dt)))
    return jax.tree_util.tree_map(lambda s, p: (one_minus * p + d * s).astype(s.dtype), shadow, params)


def with_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """``tx`` plus an EMA of the parameters it produces, kept in the optimizer state (so checkpoints, resume and
    sharding carry it unchanged).

    The official MTM ``EMA`` registers the initial weights and is called after each optimizer step; its training
    script is missing, so the step passed is our choice: the 0-based index of the update just made (the wrapped
    state's ``count`` before the update), which the official ``__call__(model, step)`` signature suggests
    (docs/quirks.md, MTM). The shadow tracks ``params + updates``, i.e. the weights after the step.
    """
    if not 0.0 <= decay <= 1.0:
        raise JaxprvrError("ema_decay", "a decay in [0, 1]", repr(decay))

    def init_fn(params):
        return EmaState(inner=tx.init(params), shadow=jax.tree_util.tree_map(jnp.array, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("with_ema needs params: call update(grads, state, params)")
        new_updates, inner = tx.update(updates, state.inner, params)
        step = state.inner.count
        new_params = optax.apply_updates(params, new_updates)
        return new_updates, EmaState(inner=inner, shadow=ema_update(state.shadow, new_params, step, decay))

    return optax.GradientTransformation(init_fn, update_fn)


def bert_adam_state_of(opt_state) -> BertAdamState:
    """The BertAdam state inside ``opt_state`` (itself, or the ``inner`` of an :class:`EmaState`)."""
    return opt_state.inner if isinstance(opt_state, EmaState) else opt_state


def eval_params(params, opt_state, use_ema: bool):
    """The weights to evaluate: the EMA shadow when ``use_ema`` (and the state has one), else ``params``."""
    if use_ema and isinstance(opt_state, EmaState):
        return opt_state.shadow
    return params


# ---------------------------------------------------------------------------------------------- AdamW recipe
# Moment retrieval (MRNet train_net.py L50-52, trainer.py L109-110, L141): torch AdamW, MultiStepLR stepped per
# epoch, clip_grad_norm_ over the whole model.


def multistep_lr(lr: float, milestones, gamma: float, steps_per_epoch: int) -> Callable:
    """The learning rate of global step ``step`` (0-based) under ``MultiStepLR(milestones, gamma)`` stepped after
    every epoch: epoch ``e = step // steps_per_epoch + 1`` (1-based, as the official loop counts) runs at
    ``lr * gamma ** #{m in milestones: m < e}``."""
    ms = sorted(int(m) for m in milestones)
    # The rates as torch's scheduler computes them (successive products in Python floats), cast once.
    rates = [float(lr)]
    for _ in ms:
        rates.append(rates[-1] * gamma)

    def schedule(step):
        epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch + 1
        n = sum((jnp.int32(m) < epoch).astype(jnp.int32) for m in ms) if ms else jnp.int32(0)
        return jnp.asarray(np.asarray(rates), jnp.result_type(float))[n]

    return schedule


def clamp_max(select: Callable[[Any], Any], max_value: float) -> optax.GradientTransformation:
    """Updates that leave ``p + u <= max_value`` on the parameters ``select(params)`` marks (a pytree of bools):
    ``torch.clamp_(p, max=max_value)`` after the step (BackBone_tvr clamps ``logit_scale`` at ln 100,
    ``main_retrieval.py`` L262-268). ``u' = min(p + u, c) - p``, so ``p + u'`` is exactly ``c`` whenever ``c - p``
    is exact (``p`` within a factor 2 of ``c``, where the clamp can act)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("clamp_max needs params: call update(grads, state, params)")
        marks = select(params)

        def one(u, p, on):
            if not on:
                return u
            c = jnp.asarray(max_value, p.dtype)
            return jnp.minimum(p + u, c) - p

        return jax.tree.map(one, updates, params, marks), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def clip_grad_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: ``g * min(1, max_norm / (||g||_2 + 1e-6))`` with the norm over every
    gradient (optax's ``clip_by_global_norm`` has no 1e-6 and divides instead)."""

    def update(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32 if g.dtype != jnp.float64 else g.dtype)))
                            for g in leaves))
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def torch_adamw(schedule, b1: float, b2: float, weight_decay: float, max_grad_norm: float, trainable=None,
                eps: float = 1e-8) -> optax.GradientTransformation:
    """``clip_grad_norm_`` then ``torch.optim.AdamW`` (bias-corrected moments, eps outside the square root,
    decoupled decay ``p -= lr * wd * p``) at ``schedule(step)``. ``trainable`` (a pytree of bools) marks the
    parameters the official model gives a gradient: the others (``grad is None`` in torch) are neither
    updated nor decayed and hold no moments worth converting (their moments stay 0)."""
    inner = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    if trainable is not None:
        labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
        inner = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
    return optax.chain(clip_grad_norm_torch(max_grad_norm), inner) if max_grad_norm > 0 else inner


__all__ += ["multistep_lr", "clip_grad_norm_torch", "torch_adamw"]
