"""The counter-hash dropout of :mod:`jaxprvr.ops.dropout` in PyTorch, so a twin in train mode can draw exactly
the masks of the Flax model.

The bits are the same function of the element's flat index ``i`` and of two uint32 seed words folded from the
JAX key data::

    seed0, seed1 = key_seeds(key data words)
    bits[i]      = fmix32(fmix32(i * 0x9E3779B9 ^ seed0) ^ seed1)        keep = bits >= round(rate * 2**32)

torch has no general uint32 arithmetic, so every word lives in an ``int64`` tensor (values in ``[0, 2**32)``)
and each product is reduced modulo 2**32 (:func:`mul32`, split in 16-bit halves so that nothing overflows
int64). It runs on the tensor's device, CUDA twins included. Kept values are multiplied by the reciprocal of
``1 - rate`` taken in the tensor's dtype, as the JAX op does, so float32 results are bit-identical.

:class:`HashDropout` is the twins' dropout module: an ``nn.Dropout`` (same ``p``, no parameters, so no
``state_dict`` key changes) that behaves exactly like ``nn.Dropout`` (torch RNG, the official behaviour)
unless it has been given a queue of :class:`Draw` s. :func:`shared_dropout` fills those queues from one Flax
forward:

    with shared_dropout(twin, flax_model, params, batch, key) as shared:
        scores, aux = twin(batch, train=True)          # the masks of
        # flax_model.apply({"params": params}, batch, train=True, rngs={"dropout": key})
        # (shared.flax_outputs holds that forward's (scores, aux))

How a Flax dropout call becomes a torch one (:func:`plan_draws`):

* Flax records the key of every train-mode ``layers.Dropout`` call with ``rate > 0`` (the ``dropout_keys``
  collection, :func:`jaxprvr.models.layers.sow_dropout_key`), per module path and in call order; the vmapped
  Gaussian branches (``model.branch_impl = "batched"``) record theirs under ``attn<k>`` as the loop form does.
* A Flax path names the torch module by the naming rule of the parameters (``/`` -> ``.``, ``net_0`` ->
  ``net.0``); Flax's auto-named ``Dropout_<j>`` is the torch parent's ``j``-th dropout (its direct children,
  then those of its ``nn.Sequential`` children: ``dropout1``/``dropout2`` of the v2 attention blocks,
  ``mlp.2`` of MTM's reconstructors). A parent with a single dropout gets all of them: MTM's TCN uses
  ``frame_tcn.dropout`` twice where Flax has ``Dropout_0`` and ``Dropout_1`` (their calls are interleaved,
  ``Dropout_0``'s first, then ``Dropout_1``'s first, ...).
* Where the frameworks lay a computation out differently, the draw says which Flax counters each torch
  element takes (:class:`Draw` ``index``): a DyGMMBlock's cross-attention ``ca`` reads the K branch outputs in
  one Flax call (branches folded, branch-major, into the batch axis) and in K torch calls, so torch call ``k``
  takes the ``k``-th consecutive slice of that draw; MTM's refiner attends the queries as one Flax sequence
  (probabilities ``(1, heads, Q, V)``) and as Q torch sequences of length 1 (``(Q, heads, 1, V)``), so its
  attention-probability mask is the Flax one transposed; MTM's TCN drops out ``(N, D, L)`` conv activations in
  torch and ``(N, L, D)`` ones in Flax.

Each armed HashDropout consumes its queue in call order; a call with an empty queue (more torch calls than Flax
draws) or a draw left over when the context exits raises :class:`SharedDropoutError` naming the module.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

GOLDEN = 0x9E3779B9
MASK32 = 0xFFFFFFFF
MAX_ELEMENTS = 2**32  # flat indices are uint32 counters
DROPOUT_KEYS = "dropout_keys"  # jaxprvr.models.layers.DROPOUT_KEYS (not imported: no JAX needed here)


class SharedDropoutError(RuntimeError):
    """The torch forward did not consume exactly the dropout draws of the Flax forward."""


# ---------------------------------------------------------------------------------------------- the hash


def mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``h * c mod 2**32`` for int64 ``h`` in ``[0, 2**32)`` and a uint32 constant ``c``, without int64 overflow
    (each partial product is below 2**48)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _fmix32_int(h: int) -> int:
    """:func:`fmix32` on one Python int (the per-layer seed fold is a handful of scalar operations)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def key_words(key) -> np.ndarray:
    """The uint32 words of a JAX key's data: a typed JAX key, a raw ``uint32`` key, a numpy array or a tensor."""
    if torch.is_tensor(key):
        key = key.detach().cpu().numpy()
    dtype = getattr(key, "dtype", None)
    if dtype is not None and "key<" in str(dtype):  # a typed JAX key (jax.random.key): its raw data
        import jax

        key = jax.random.key_data(key)
    words = np.asarray(key).reshape(-1)
    if words.dtype.kind not in "ui" or (words.size and (words.min() < 0 or words.max() > MASK32)):
        raise ValueError(f"key data must be uint32 words, got dtype {words.dtype}")
    return words.astype(np.uint32)


def key_seeds(key) -> tuple[int, int]:
    """The two seed words of :func:`jaxprvr.ops.dropout.key_seeds` (as Python ints): the key data folded word by
    word, ``h = fmix32(h ^ w_i) + i + 1`` from ``0x9E3779B9``, then ``fmix32(h)`` and ``fmix32(h ^ 0x85EBCA6B)``."""
    h = GOLDEN
    for i, w in enumerate(key_words(key)):
        h = (_fmix32_int(h ^ int(w)) + i + 1) & MASK32
    return _fmix32_int(h), _fmix32_int(h ^ 0x85EBCA6B)


def flat_index(shape: Sequence[int], device=None, offset: int = 0) -> torch.Tensor:
    """The counters ``offset + (flat index)`` of an array of ``shape`` (int64)."""
    n = math.prod(shape)
    return (torch.arange(n, dtype=torch.int64, device=device) + offset).reshape(tuple(shape))


def hash_bits(seeds: tuple[int, int], shape: Sequence[int], *, index: Optional[torch.Tensor] = None,
              device=None) -> torch.Tensor:
    """The uint32 bits (in an int64 tensor) of :func:`jaxprvr.ops.dropout.hash_bits` for an array of ``shape``:
    element ``i`` hashes counter ``i``, or ``index[i]`` when given (the counters of the Flax draw this tensor is
    a slice or a transpose of)."""
    shape = tuple(int(d) for d in shape)
    if index is None:
        if math.prod(shape) > MAX_ELEMENTS:
            raise ValueError(f"hash_bits: {math.prod(shape)} elements do not fit a uint32 counter (at most 2**32)")
        index = flat_index(shape, device)
    elif tuple(index.shape) != shape:
        raise ValueError(f"hash_bits: index of shape {tuple(index.shape)} for an array of shape {shape}")
    s0, s1 = (int(s) & MASK32 for s in seeds)
    return fmix32(fmix32(mul32(index, GOLDEN) ^ s0) ^ s1)


def keep_threshold(rate: float) -> int:
    """``t`` with ``P(bits >= t) = 1 - rate`` (:func:`jaxprvr.ops.dropout.keep_threshold`, same rounding)."""
    return min(int(round(rate * 2.0**32)), MASK32)


def keep_mask(seeds: tuple[int, int], shape: Sequence[int], rate: float, *, index: Optional[torch.Tensor] = None,
              device=None) -> torch.Tensor:
    """Boolean mask, True (kept) with probability ``1 - rate``."""
    return hash_bits(seeds, shape, index=index, device=device) >= keep_threshold(rate)


def keep_scale(rate: float, dtype: torch.dtype) -> torch.Tensor:
    """The multiplier of kept values (:func:`jaxprvr.ops.dropout.keep_scale`): the reciprocal of ``1 - rate``
    rounded to ``dtype``, taken in ``dtype`` (a CPU scalar)."""
    return torch.tensor(1.0 - rate, dtype=dtype).reciprocal()


def dropout(x: torch.Tensor, rate: float, seeds: tuple[int, int], *, index: Optional[torch.Tensor] = None):
    """Inverted dropout of ``x`` with the hash mask: kept values times :func:`keep_scale` (``1 / (1 - rate)``
    in ``x``'s dtype, as :func:`jaxprvr.ops.dropout.dropout`), dropped ones zero. Differentiable in ``x``; the
    gradient is the incoming one times the same mask and scale, as in JAX."""
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return torch.zeros_like(x)
    keep = keep_mask(seeds, x.shape, rate, index=None if index is None else index.to(x.device), device=x.device)
    return torch.where(keep, x * keep_scale(rate, x.dtype).to(x.device), torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------- the module

IndexFn = Callable[[Sequence[int], torch.device], torch.Tensor]


@dataclass(frozen=True)
class Draw:
    """One mask a torch dropout call takes: the Flax call's ``seeds``, and ``index(shape, device)`` -> the Flax
    counters of the torch elements (``None``: the torch tensor is the Flax one, counters ``0..n-1``).
    ``source`` names the Flax call (path and call number) for error messages."""

    seeds: tuple[int, int]
    index: Optional[IndexFn] = None
    source: str = ""


class HashDropout(nn.Dropout):
    """``nn.Dropout`` that can draw given hash masks (a drop-in: same ``p``/``inplace``, no parameters).

    In eval mode, or with ``p == 0``, it is the identity. In train mode it is ``nn.Dropout`` (torch's RNG, the
    official behaviour) unless :func:`shared_dropout` (or :func:`arm`) has given it a queue of :class:`Draw` s;
    then each call takes the next draw and applies :func:`dropout` with it."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__(p, inplace)
        self._draws: Optional[deque] = None  # armed: the draws still to take, in call order
        self._draw_name = ""  # the module's name in the twin, for errors

    def forward(self, x):
        if self._draws is None or not self.training or self.p == 0.0:
            return super().forward(x)
        if not self._draws:
            raise SharedDropoutError(
                f"dropout {self._draw_name or '<unnamed>'}: called more often than the Flax forward drew masks for "
                "it (was the Flax model run with train=True on the same batch, and the twin called once?)")
        draw = self._draws.popleft()
        index = None if draw.index is None else draw.index(tuple(x.shape), x.device)
        return dropout(x, self.p, draw.seeds, index=index)


def hash_dropouts(twin: nn.Module) -> dict[str, HashDropout]:
    """The twin's :class:`HashDropout` modules by name (a module reachable under several names, like MTM's
    ``attns`` aliases, once under its first name)."""
    return {name: m for name, m in twin.named_modules() if isinstance(m, HashDropout)}


@contextlib.contextmanager
def arm(twin: nn.Module, draws: Mapping[str, Sequence[Draw]]) -> Iterator[dict[str, deque]]:
    """While active, every HashDropout of ``twin`` (with ``p > 0``) takes its masks from ``draws[name]``
    (none: any train-mode call is an error). Yields the queues (``name -> deque``; a test may edit them before
    the forward). On a normal exit every queue must be empty; the modules are disarmed in any case."""
    modules = hash_dropouts(twin)
    unknown = sorted(set(draws) - set(modules))
    if unknown:
        raise SharedDropoutError(f"draws for modules that are not HashDropouts of the twin: {unknown}")
    queues = {name: deque(draws.get(name, ())) for name, m in modules.items() if m.p > 0.0 or name in draws}
    for name, m in modules.items():
        if m._draws is not None:
            raise SharedDropoutError(f"dropout {name} is already armed (nested shared_dropout on one twin)")
    try:
        for name, q in queues.items():
            modules[name]._draws, modules[name]._draw_name = q, name
        yield queues
        left = {name: len(q) for name, q in queues.items() if q}  # not reached when the body raised
        if left:
            detail = ", ".join(f"{name} ({n} left, next from {queues[name][0].source})" for name, n in left.items())
            raise SharedDropoutError(f"dropout masks of the Flax forward not used by the twin: {detail}")
    finally:
        for name in queues:
            modules[name]._draws = None


# ---------------------------------------------------------------------------------------------- Flax -> torch


def collect_keys(sown: Mapping) -> dict[str, list[np.ndarray]]:
    """The ``dropout_keys`` collection -> ``{"flax/module/path": [key data of call 0, call 1, ...]}``.

    A Dropout records a tuple of keys under its variable ``key`` (the path is its module's); the vmapped branches
    record a tuple of such trees under ``attn<k>`` (part of the path)."""
    out: dict[str, list[np.ndarray]] = {}

    def walk(node: Mapping, path: tuple):
        for name, value in node.items():
            if isinstance(value, tuple) and value and all(isinstance(v, Mapping) for v in value):
                for v in value:
                    walk(v, path + (name,))
            elif isinstance(value, tuple):
                out.setdefault("/".join(path), []).extend(np.asarray(v) for v in value)
            elif isinstance(value, Mapping):
                walk(value, path + (name,))
            else:
                raise SharedDropoutError(f"unexpected entry {'/'.join(path + (name,))} in {DROPOUT_KEYS}")

    walk(sown, ())
    return out


def _dropout_slots(module: nn.Module) -> list[str]:
    """``module``'s dropouts in order: its HashDropout children, then those of its ``nn.Sequential`` children."""
    slots = [name for name, m in module.named_children() if isinstance(m, HashDropout)]
    for name, m in module.named_children():
        if isinstance(m, nn.Sequential):
            slots += [f"{name}.{i}" for i, sub in m.named_children() if isinstance(sub, HashDropout)]
    return slots


def _child(module: nn.Module, part: str) -> Optional[tuple[str, nn.Module]]:
    """The torch child for one Flax path component: same name, or ``name_<k>`` -> ``name.<k>`` (a list)."""
    if part in module._modules:
        return part, module._modules[part]
    m = re.fullmatch(r"(.+)_(\d+)", part)
    if m and isinstance(module._modules.get(m.group(1)), (nn.Sequential, nn.ModuleList)):
        container = module._modules[m.group(1)]
        if m.group(2) in container._modules:
            return f"{m.group(1)}.{m.group(2)}", container._modules[m.group(2)]
    return None


def torch_dropout_name(twin: nn.Module, flax_path: str) -> str:
    """The name in ``twin`` of the HashDropout that plays the Flax dropout at ``flax_path`` (``a/b/Dropout_0``)."""
    return ".".join(_resolve(twin, flax_path)[0])


def _resolve(twin: nn.Module, flax_path: str) -> tuple[list[str], list[nn.Module]]:
    """The torch names (one per Flax path component: ``net.0`` is one) and modules (the twin first) of the
    HashDropout that plays the Flax dropout at ``flax_path``."""
    parts = flax_path.split("/")
    module, names, chain = twin, [], [twin]
    for i, part in enumerate(parts):
        found = _child(module, part)
        auto = re.fullmatch(r"Dropout_(\d+)", part)
        if found is None and auto and i == len(parts) - 1:
            slots = _dropout_slots(module)
            j = int(auto.group(1))
            if j < len(slots):
                found = slots[j], module.get_submodule(slots[j])
            elif len(slots) == 1:  # one torch module used for every Flax dropout of this parent (MTM's TCN)
                found = slots[0], module.get_submodule(slots[0])
            else:
                raise SharedDropoutError(f"Flax dropout {flax_path}: {type(module).__name__} "
                                         f"{'.'.join(names) or '<twin>'} has dropouts {slots}, none for {part}")
        if found is None:
            raise SharedDropoutError(f"Flax dropout {flax_path}: no torch module for {part!r} under "
                                     f"{'.'.join(names) or '<twin>'} ({type(module).__name__})")
        names.append(found[0])
        module = found[1]
        chain.append(module)
    if not isinstance(module, HashDropout):
        raise SharedDropoutError(f"Flax dropout {flax_path} maps to {'.'.join(names)}, a {type(module).__name__} "
                                 "(not a HashDropout)")
    return names, chain


def heads_first_index(shape: Sequence[int], device) -> torch.Tensor:
    """Counters of a torch ``(Q, heads, 1, V)`` attention-probability tensor drawn by Flax as ``(1, heads, Q, V)``
    (MTM's refiner: Flax attends the Q queries as one sequence, torch as Q sequences of length 1)."""
    q, h, one, v = shape
    if one != 1:
        raise SharedDropoutError(f"the refiner's attention probabilities should be (Q, heads, 1, V), got {shape}")
    return flat_index((1, h, q, v), device).permute(2, 1, 0, 3)


def channels_first_index(shape: Sequence[int], device) -> torch.Tensor:
    """Counters of a torch ``(N, D, L)`` tensor drawn by Flax as ``(N, L, D)`` (MTM's TCN: ``nn.Conv1d`` works
    channels-first, Flax's ``nn.Conv`` channels-last)."""
    n, d, length = shape
    return flat_index((n, length, d), device).permute(0, 2, 1)


def _part_index(k: int) -> IndexFn:
    """Torch call ``k`` of a Flax draw split into equal consecutive parts: counters ``k * n .. (k + 1) * n - 1``."""

    def part_index(shape, device):
        return flat_index(shape, device, offset=k * math.prod(shape))

    return part_index


def _layout(names: list[str], chain: list[nn.Module]) -> tuple[int, Optional[IndexFn]]:
    """``(parts, index)`` of one Flax draw of the torch dropout reached by ``names``/``chain`` (``names[i]`` is
    the name of ``chain[i + 1]`` in ``chain[i]``): the number of torch calls that split it, and the counter
    layout of an unsplit one."""
    kinds = [type(m).__name__ for m in chain]
    parts = 1
    for i, m in enumerate(chain[:-1]):
        if hasattr(m, "n_branches") and names[i] == "ca" and kinds[i].endswith("DyGMMBlock"):
            parts = m.n_branches  # the shared cross-attention: one Flax call over K branches, K torch calls
    for i, kind in enumerate(kinds[:-1]):
        if kind == "VideoGuidedTextRefiner" and names[i:] == ["cross_attention", "self", "dropout"]:
            return parts, heads_first_index
        if kind == "TCN" and names[i:] == ["dropout"]:
            return parts, channels_first_index
    return parts, None


def _path_order(path: str):
    """Natural order of Flax paths (``Dropout_2`` before ``Dropout_10``)."""
    return [(int(t) if t.isdigit() else t) for t in re.split(r"(\d+)", path)]


def plan_draws(twin: nn.Module, keys: Mapping[str, Sequence]) -> dict[str, list[Draw]]:
    """Flax keys by path (:func:`collect_keys`) -> the draws each HashDropout of ``twin`` takes, in call order."""
    grouped: dict[str, list[tuple[str, list[Draw]]]] = {}
    for path in sorted(keys, key=_path_order):
        names, chain = _resolve(twin, path)
        torch_name = ".".join(names)
        parts, index = _layout(names, chain)
        draws = []
        for c, k in enumerate(keys[path]):
            seeds, source = key_seeds(k), f"{path} call {c}"
            if parts == 1:
                draws.append(Draw(seeds, index, source))
            else:
                draws += [Draw(seeds, _part_index(p), f"{source} part {p}/{parts}") for p in range(parts)]
        grouped.setdefault(torch_name, []).append((path, draws))
    plan = {}
    for torch_name, sources in grouped.items():
        if len(sources) == 1:
            plan[torch_name] = sources[0][1]
        else:  # one torch dropout used once per Flax dropout of its parent: their calls alternate
            lengths = {len(d) for _, d in sources}
            if len(lengths) != 1:
                raise SharedDropoutError(f"dropout {torch_name} plays {[p for p, _ in sources]} whose call counts "
                                         f"differ ({[len(d) for _, d in sources]}): their order is ambiguous")
            plan[torch_name] = [d for group in zip(*(d for _, d in sources)) for d in group]
    return plan


# ---------------------------------------------------------------------------------------------- the Flax side

_CAPTURE = {}  # flax model -> its jitted capturing forward (reused by later shared_dropout calls)


def capture_keys(flax_model, params, batch, key):
    """Runs ``flax_model.apply({"params": params}, batch, train=True, rngs={"dropout": key})`` (jitted; compiled
    once per model and shapes) with the ``dropout_keys`` collection mutable. Returns the forward's outputs and
    the keys by Flax path (:func:`collect_keys`)."""
    import jax

    def forward(p, b, k):
        return flax_model.apply({"params": p}, b, train=True, rngs={"dropout": k}, mutable=[DROPOUT_KEYS])

    try:
        fn = _CAPTURE.setdefault(flax_model, jax.jit(forward))
    except TypeError:  # an unhashable model: compiled for this call only
        fn = jax.jit(forward)
    outputs, state = fn(params, batch, key)
    return outputs, collect_keys(jax.device_get(state.get(DROPOUT_KEYS, {})))


@dataclass
class SharedDropout:
    """What :func:`shared_dropout` yields: the Flax forward's outputs, its keys by Flax path, the planned draws
    by torch module and the live queues (``queues[name]`` is consumed by the twin's forward)."""

    flax_outputs: object
    keys: dict
    draws: dict
    queues: dict


@contextlib.contextmanager
def shared_dropout(twin: nn.Module, flax_model, params, batch, key) -> Iterator[SharedDropout]:
    """While active, ``twin(batch, train=True)`` draws the dropout masks of
    ``flax_model.apply({"params": params}, batch, train=True, rngs={"dropout": key})``.

    The Flax model is run once here (its outputs: ``.flax_outputs`` of the yielded :class:`SharedDropout`); the
    comparison is meaningful only for that call: the same ``train=True`` flag, batch and key, and params equal to
    the twin's weights. ``twin`` must be called once in train mode (its HashDropouts consume their queues in call
    order); a dropout called more often than Flax drew for it, or a draw left unused at exit, raises
    :class:`SharedDropoutError` naming the module. Works for every twin (MS-SL, GMMFormer, GMMFormer v2, MTM) and
    either ``branch_impl`` of the Flax model."""
    outputs, keys = capture_keys(flax_model, params, batch, key)
    draws = plan_draws(twin, keys)
    with arm(twin, draws) as queues:
        yield SharedDropout(outputs, keys, draws, queues)


__all__ = ["Draw", "HashDropout", "SharedDropout", "SharedDropoutError", "arm", "capture_keys", "collect_keys",
           "dropout", "fmix32", "hash_bits", "hash_dropouts", "keep_mask", "keep_scale", "keep_threshold",
           "key_seeds", "mul32", "plan_draws", "shared_dropout", "torch_dropout_name"]
