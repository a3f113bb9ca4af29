"""The official BertAdam optimizer and its ``warmup_linear`` schedule, in PyTorch.

A reference for :mod:`jaxprvr.optim`. MS-SL (``method/optimization.py``), GMMFormer and GMMFormer_v2
(``src/Opts/optimization.py``) ship the same file; references are to GMMFormer ``src/Opts/optimization.py``:
``_LRSchedule`` ``:35-79`` (``t_total < 0`` -> multiplier 1; ``warmup = -1`` -> 0), ``WarmupLinearSchedule``
``:165-175``, ``BertAdam`` ``:223-343``. Per tensor, in ``step()`` (``:278-343``):

1. ``clip_grad_norm_(p, max_grad_norm)`` on that tensor alone (``:311-312``; skipped when ``max_grad_norm <= 0``);
2. ``next_m = b1 next_m + (1 - b1) g``, ``next_v = b2 next_v + (1 - b2) g^2`` (``:316-317``);
3. ``update = next_m / (sqrt(next_v) + e)``, no bias correction (``:318``, ``:338-341``);
4. ``update += weight_decay * p`` when the group's ``weight_decay > 0`` (decoupled, ``:327-328``);
5. ``p -= lr * schedule.get_lr(state['step']) * update``, then ``state['step'] += 1`` (``:330-336``): the schedule
   is read at the step count *before* the increment, so the first update of warmup_linear has lr 0.

Parameter groups (ms-sl ``method/train.py:138-142``; GMMFormer ``src/Opts/builder.py:5-9``): tensors whose name
contains ``"bias"``, ``"LayerNorm.bias"`` or ``"LayerNorm.weight"`` get ``weight_decay 0``, the others a
group value that overrides the optimizer's ``weight_decay`` argument (officially the literal ``0.01``, so the
configured ``wd`` is never used): :func:`official_param_groups`.
Nothing is device-specific: the state follows each parameter (CPU or CUDA).

MTM also keeps an exponential moving average of the weights: :class:`EMA`, MTM ``src/Opts/optimization.py:187-220``.
"""

from __future__ import annotations

import logging

import torch
from torch.nn.utils import clip_grad_norm_
from torch.optim import Optimizer

__all__ = ["NO_DECAY", "warmup_linear", "WarmupLinearSchedule", "ConstantLR", "BertAdam", "official_param_groups",
           "EMA"]

logger = logging.getLogger(__name__)

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")  # GMMFormer src/Opts/builder.py:6
OFFICIAL_DECAY = 0.01  # the literal group weight decay of the official builders


def warmup_linear(x: float, warmup: float = 0.002) -> float:
    """Multiplier at training progress ``x = step / t_total``: ``x / warmup`` during the warmup, then linear
    decay to 0 at ``x = 1`` (``WarmupLinearSchedule.get_lr_``, ``:172-175``)."""
    if x < warmup:
        return x / warmup
    return max((x - 1.) / (warmup - 1.), 0.)


class _Schedule:
    """``_LRSchedule`` (``:35-79``) without the logging side effects."""

    def __init__(self, warmup: float = 0.002, t_total: float = -1):
        if not 0.0 <= warmup < 1.0 and not warmup == -1:
            raise ValueError(f"Invalid warmup: {warmup} - should be in [0.0, 1.0[ or -1")
        self.warmup, self.t_total = float(max(warmup, 0.)), float(t_total)

    def get_lr(self, step) -> float:
        if self.t_total < 0:
            return 1.
        return self.get_lr_(float(step) / self.t_total)

    def get_lr_(self, progress: float) -> float:  # pragma: no cover - overridden
        return 1.


class ConstantLR(_Schedule):
    """Schedule ``None`` / ``"none"``: multiplier 1."""

    def get_lr_(self, progress: float) -> float:
        return 1.


class WarmupLinearSchedule(_Schedule):
    """Schedule ``"warmup_linear"``: :func:`warmup_linear` of ``step / t_total``."""

    def get_lr_(self, progress: float) -> float:
        return warmup_linear(progress, self.warmup)


SCHEDULES = {None: ConstantLR, "none": ConstantLR, "warmup_linear": WarmupLinearSchedule}


class BertAdam(Optimizer):
    """The official ``BertAdam`` (see the module docstring): per-tensor clipping, Adam moments without bias
    correction, decoupled weight decay, ``lr * schedule(step)`` with the step counted from 0.

    ``schedule``: ``"warmup_linear"`` (default), ``None``/``"none"``, or a schedule object with ``get_lr(step)``.
    The state of each parameter has the official keys ``step``, ``next_m``, ``next_v``.
    """

    def __init__(self, params, lr: float, warmup: float = -1, t_total: float = -1, schedule="warmup_linear",
                 b1: float = 0.9, b2: float = 0.999, e: float = 1e-6, weight_decay: float = 0.01,
                 max_grad_norm: float = 1.0):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        if not hasattr(schedule, "get_lr") and schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule parameter: {schedule}")
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"Invalid b1 parameter: {b1} - should be in [0.0, 1.0[")
        if not 0.0 <= b2 < 1.0:
            raise ValueError(f"Invalid b2 parameter: {b2} - should be in [0.0, 1.0[")
        if not e >= 0.0:
            raise ValueError(f"Invalid epsilon value: {e} - should be >= 0.0")
        if not hasattr(schedule, "get_lr"):
            schedule = SCHEDULES[schedule](warmup=warmup, t_total=t_total)
        defaults = dict(lr=lr, schedule=schedule, b1=b1, b2=b2, e=e, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def get_lr(self) -> list[float]:
        """The scheduled learning rate of every parameter (``[0]`` before the first step), as officially."""
        lr = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    return [0]
                lr.append(group["lr"] * group["schedule"].get_lr(state["step"]))
        return lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p)
                    state["next_v"] = torch.zeros_like(p)
                next_m, next_v = state["next_m"], state["next_v"]
                beta1, beta2 = group["b1"], group["b2"]
                if group["max_grad_norm"] > 0:
                    clip_grad_norm_(p, group["max_grad_norm"])  # scales p.grad (== grad) in place
                next_m.mul_(beta1).add_(grad, alpha=1 - beta1)
                next_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = next_m / (next_v.sqrt() + group["e"])
                if group["weight_decay"] > 0.0:
                    update += group["weight_decay"] * p
                lr_scheduled = group["lr"] * group["schedule"].get_lr(state["step"])
                p.add_(-(lr_scheduled * update))
                state["step"] += 1
        return loss


def official_param_groups(model: torch.nn.Module, weight_decay: float = OFFICIAL_DECAY) -> list[dict]:
    """The two official parameter groups of ``model.named_parameters()``: names containing none of
    :data:`NO_DECAY` with ``weight_decay`` (officially 0.01), the others with 0. Each group also carries
    ``"names"`` (ignored by the optimizer) for inspection."""
    named = list(model.named_parameters())
    decay = [(n, p) for n, p in named if not any(nd in n for nd in NO_DECAY)]
    no_decay = [(n, p) for n, p in named if any(nd in n for nd in NO_DECAY)]
    return [{"params": [p for _, p in decay], "weight_decay": weight_decay, "names": [n for n, _ in decay]},
            {"params": [p for _, p in no_decay], "weight_decay": 0.0, "names": [n for n, _ in no_decay]}]


class EMA:
    """MTM's ``EMA`` (``src/Opts/optimization.py:187-220``, after QANet-PyTorch): a ``shadow`` dict
    ``name -> tensor`` over ``model.named_parameters()``.

    * ``register(name, val)``: ``shadow[name] = val.clone()`` (``:197-198``);
    * ``__call__(model, step)`` (``:200-207``): ``decay_t = min(decay, (1 + step) / (10 + step))``, then for every
      parameter with ``requires_grad``: ``shadow = (1 - decay_t) * p + decay_t * shadow`` (it must be registered);
    * ``assign(model)`` (``:209-214``): keeps a copy of each trainable parameter in ``original`` and sets
      ``param.data = shadow[name]`` (the parameter then *shares storage* with the shadow tensor, as officially);
    * ``resume(model)`` (``:216-220``): ``param.data = original[name]``.

    ``save_ckpt`` writes ``shadow`` under ``'ema_shadow'`` (MTM ``src/Utils/utils.py:41-42``;
    :func:`torch_ref.checkpoints.save_official`).
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.original: dict[str, torch.Tensor] = {}

    @classmethod
    def from_model(cls, model: torch.nn.Module, decay: float) -> "EMA":
        """An EMA with every trainable ``named_parameters()`` entry registered (the QANet-PyTorch pattern the
        official class cites: ``if param.requires_grad: ema.register(name, param.data)``)."""
        ema = cls(decay)
        for name, param in model.named_parameters():
            if param.requires_grad:
                ema.register(name, param.data)
        return ema

    def register(self, name: str, val: torch.Tensor) -> None:
        self.shadow[name] = val.detach().clone()

    def decay_at(self, step) -> float:
        """The decay used at ``step``: ``min(decay, (1 + step) / (10 + step))`` (``:201``)."""
        return min(self.decay, (1 + step) / (10.0 + step))

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step) -> None:
        decay = self.decay_at(step)
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert name in self.shadow, name
                new_average = (1.0 - decay) * param.data + decay * self.shadow[name]
                self.shadow[name] = new_average.clone()

    def assign(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert name in self.shadow, name
                self.original[name] = param.data.clone()
                param.data = self.shadow[name]

    def resume(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert name in self.shadow, name
                param.data = self.original[name]
