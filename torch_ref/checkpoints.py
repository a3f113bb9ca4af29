"""Official PRVR checkpoint files: a restricted loader and writers of the official layouts.

Layouts, as the official code writes them (ms-sl ``method/train.py:164-165``; GMMFormer / GMMFormer v2
``src/Utils/utils.py:42-49``; MTM ``src/Utils/utils.py:33-43``):

* MS-SL ``model.ckpt``: ``{"model": state_dict, "model_cfg": easydict.EasyDict, "epoch": int}``.
* GMMFormer / GMMFormer v2 ``best.ckpt`` (``src/Utils/utils.py`` ``save_ckpt``):
  ``{"config", "epoch", "model_val", "state_dict", "optimizer"}``; the optimizer's param_groups hold a pickled
  ``Opts.optimization.WarmupLinearSchedule`` instance.
* MTM ``best.ckpt``: the GMMFormer layout, plus ``"ema_shadow"`` (``{name: tensor}`` over
  ``model.named_parameters()``) when the EMA is on (MTM ``src/Utils/utils.py:33-43``). Its state_dict holds
  the ``attns.K.*`` aliases of ``attnK.*`` (:mod:`torch_ref.mtm`), which ``named_parameters()`` -- and so the
  optimizer -- does not list: :func:`official_param_names`.

:func:`load_official` reads them with ``torch.load(..., pickle_module=RESTRICTED)``: globals are resolved from a
fixed allowlist (tensor rebuilding, ``OrderedDict``, plain builtins, numpy scalars/dtypes) without importing
anything; a global from the standard library or from torch/numpy outside the allowlist (``os.system``,
``builtins.eval``, ``subprocess.Popen``, ...) is refused with :class:`pickle.UnpicklingError`; any other class
(``easydict.EasyDict``, ``Opts.optimization.WarmupLinearSchedule``, ...) becomes an inert :class:`Placeholder`
that only records the state it is given. Neither easydict nor the official code is needed.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import dataclasses
import io
import pickle
import re
import sys
import types
from typing import Any, Optional

import torch

# ------------------------------------------------------------------------------------------ placeholders


class Placeholder(dict):
    """Inert stand-in for a class the loader does not know. Dict items (``SETITEMS``) and instance state
    (``BUILD``) are recorded; attributes read from either. Pickling it again writes the original class name."""

    _official_module = "?"
    _official_name = "?"

    def __init__(self, *args, **kwargs):  # REDUCE with arguments: record them, run nothing
        super().__init__()
        if args or kwargs:
            object.__setattr__(self, "_placeholder_args", (args, kwargs))

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                if part:
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            object.__setattr__(self, "_placeholder_state", state)

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __reduce_ex__(self, protocol):
        state = dict(self.__dict__) or None
        items = iter(self.items()) if len(self) else None
        return copyreg.__newobj__, (type(self),), state, None, items

    def to_dict(self) -> dict:
        """Items and attributes merged (attributes win), recursively converting nested placeholders."""
        out = {**dict(self), **{k: v for k, v in self.__dict__.items() if not k.startswith("_placeholder")}}
        return {k: (v.to_dict() if isinstance(v, Placeholder) else v) for k, v in out.items()}

    def __repr__(self):
        return f"Placeholder({self._official_module}.{self._official_name}, {self.to_dict()!r})"


_PLACEHOLDERS: dict[tuple[str, str], type] = {}


def placeholder_class(module: str, name: str) -> type:
    """The (cached) :class:`Placeholder` subclass standing for ``module.name``."""
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(name, (Placeholder,), {"_official_module": module, "_official_name": name,
                                                        "__module__": __name__})
    return _PLACEHOLDERS[key]


# ------------------------------------------------------------------------------------------ restricted unpickler


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import numpy as np

    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "scalar")] = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
        allowed[(mod, "_reconstruct")] = (np._core.multiarray._reconstruct if hasattr(np, "_core")
                                          else np.core.multiarray._reconstruct)
    for name in ("set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str", "bytes",
                 "bytearray", "slice"):
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = allowed[("builtins", name)]
    for dt in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
               "complex64", "complex128"):
        allowed[("torch", dt)] = getattr(torch, dt)
    return allowed


_ALLOWED: Optional[dict] = None
# Benign standard-library classes found in training configs: mapped to placeholders rather than refused.
_STDLIB_PLACEHOLDERS = {("argparse", "Namespace")}
_ALWAYS_REFUSED = {"torch", "numpy", "jax", "pickle", "_pickle", "os", "posix", "nt", "subprocess", "sys",
                   "builtins", "__builtin__", "importlib", "runpy", "shutil", "socket", "ctypes", "code",
                   "codeop", "types", "functools", "operator", "copyreg", "marshal", "pty", "webbrowser",
                   "multiprocessing", "io", "pathlib", "tempfile", "asyncio", "threading", "signal"}


def resolve_global(module: str, name: str):
    """The object a pickle's global ``module.name`` stands for, or :class:`pickle.UnpicklingError`."""
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _allowed_globals()
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if (module, name) in _STDLIB_PLACEHOLDERS:
        return placeholder_class(module, name)
    top = module.split(".")[0]
    if top in _ALWAYS_REFUSED or top in getattr(sys, "stdlib_module_names", ()) or top.startswith("_"):
        raise pickle.UnpicklingError(f"refused global {module}.{name} (not in the allowlist)")
    return placeholder_class(module, name)


class RestrictedUnpickler(pickle.Unpickler):
    """Never imports: allowlisted globals, inert placeholders for unknown classes, refusal otherwise."""

    def find_class(self, module, name):
        return resolve_global(module, name)


class _OfficialPickler(pickle._Pickler):
    """A pickler that writes placeholders (and classes it cannot import) under their original names."""

    def save_global(self, obj, name=None):
        if isinstance(obj, type) and issubclass(obj, Placeholder) and obj is not Placeholder:
            module, qual = obj._official_module, obj._official_name
        else:
            try:
                return super().save_global(obj, name)
            except pickle.PicklingError:
                module, qual = getattr(obj, "__module__", None), name or getattr(obj, "__qualname__", None)
                if not module or not qual:
                    raise
        if self.proto >= 4:
            self.save(module)
            self.save(qual)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qual}\n".encode("utf-8"))
        self.memoize(obj)


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data, **kwargs):
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


RESTRICTED = types.ModuleType("torch_ref_restricted_pickle")
RESTRICTED.Unpickler = RestrictedUnpickler
RESTRICTED.Pickler = _OfficialPickler
RESTRICTED.load = _restricted_load
RESTRICTED.loads = _restricted_loads
RESTRICTED.UnpicklingError = pickle.UnpicklingError
RESTRICTED.__version__ = getattr(pickle, "format_version", "4.0")

# ------------------------------------------------------------------------------------------ loaders


@dataclasses.dataclass
class OfficialCheckpoint:
    """``layout``: ``"ms_sl"`` (model.ckpt) or ``"gmmformer"`` (best.ckpt: v1, v2 and MTM). ``ema_shadow``: MTM's
    ``'ema_shadow'`` entry (``module.``-stripped like the state_dict), ``None`` when absent."""

    state_dict: "collections.OrderedDict[str, torch.Tensor]"
    layout: str
    model_name: Optional[str]
    epoch: Any = None
    model_val: Any = None
    config: Any = None  # MS-SL model_cfg (as a plain dict) or the GMMFormer config
    optimizer: Any = None
    raw: Any = None
    ema_shadow: Any = None


def strip_module_prefix(state_dict):
    """Remove the ``module.`` prefix ``nn.DataParallel`` adds (only if every key has it)."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return collections.OrderedDict((k[len("module."):], v) for k, v in state_dict.items())
    return collections.OrderedDict(state_dict)


def guess_model_name(state_dict) -> Optional[str]:
    keys = set(state_dict)
    if any(k.startswith(("clip_mamba.", "frame_tcn.", "video_encoder.")) for k in keys):
        return "mtm"
    if "weight_token" in keys:
        return "gmmformer_v2"
    if any(k.startswith("mapping_linear.") for k in keys):
        return "ms_sl"
    if any(k.startswith("clip_encoder_2.") for k in keys):
        return "gmmformer"
    return None


def _plain(x):
    return x.to_dict() if isinstance(x, Placeholder) else x


def load_official(path, map_location="cpu") -> OfficialCheckpoint:
    """Read an official ``model.ckpt`` / ``best.ckpt`` with the restricted unpickler."""
    obj = torch.load(path, map_location=map_location, pickle_module=RESTRICTED, weights_only=False)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not an official checkpoint (top level is {type(obj).__name__})")
    if "model" in obj and "state_dict" not in obj:
        sd = strip_module_prefix(obj["model"])
        return OfficialCheckpoint(sd, "ms_sl", guess_model_name(sd), epoch=obj.get("epoch"),
                                  config=_plain(obj.get("model_cfg")), raw=obj)
    if "state_dict" in obj:
        sd = strip_module_prefix(obj["state_dict"])
        ema = obj.get("ema_shadow")
        return OfficialCheckpoint(sd, "gmmformer", guess_model_name(sd), epoch=obj.get("epoch"),
                                  model_val=obj.get("model_val"), config=_plain(obj.get("config")),
                                  optimizer=obj.get("optimizer"), raw=obj,
                                  ema_shadow=None if ema is None else strip_module_prefix(ema))
    raise ValueError(f"{path}: unknown checkpoint layout with keys {sorted(obj)}")


def load_state_dict(path, map_location="cpu"):
    """The (prefix-stripped) model state_dict of an official checkpoint."""
    return load_official(path, map_location).state_dict


def load_into(model: torch.nn.Module, path, map_location="cpu") -> OfficialCheckpoint:
    """Load an official checkpoint into a twin with ``strict=True``; returns the checkpoint."""
    ck = load_official(path, map_location)
    model.load_state_dict(ck.state_dict, strict=True)
    return ck


# ------------------------------------------------------------------------------------------ writers


def warmup_linear_schedule(warmup: float = 0.01, t_total: float = -1) -> Placeholder:
    """An inert ``Opts.optimization.WarmupLinearSchedule`` with the official instance state."""
    sched = placeholder_class("Opts.optimization", "WarmupLinearSchedule")()
    sched.__dict__.update(warmup=float(max(warmup, 0.0)), t_total=float(t_total), warned_for_t_total_at_progress=-1)
    return sched


def bert_adam_state(names, lr=3e-4, warmup=0.01, t_total=-1, moments=None) -> dict:
    """An official ``BertAdam.state_dict()`` for the parameters ``names`` (state_dict order) with the two
    weight-decay groups of ``Opts/builder.py``. Parameter ids are numbered consecutively across the groups, as
    ``torch.optim.Optimizer.state_dict`` does. ``moments`` maps a name to ``(step, next_m, next_v)``; without it
    the state is empty (an optimizer that never stepped)."""
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    names = list(names)
    decay = [n for n in names if not any(nd in n for nd in no_decay)]
    plain = [n for n in names if any(nd in n for nd in no_decay)]
    ids = {n: i for i, n in enumerate(decay + plain)}
    sched = warmup_linear_schedule(warmup, t_total)

    def group(wd, members):  # key order of torch Optimizer.state_dict() with BertAdam's defaults
        return dict(lr=lr, schedule=sched, b1=0.9, b2=0.999, e=1e-6, weight_decay=wd, max_grad_norm=1.0,
                    params=[ids[n] for n in members])

    state = {}
    for n, (step, m, v) in (moments or {}).items():
        state[ids[n]] = {"step": int(step), "next_m": m, "next_v": v}
    state = dict(sorted(state.items()))
    return {"state": state, "param_groups": [group(0.01, decay), group(0.0, plain)]}


_MTM_ALIAS = re.compile(r"(^|\.)attns\.(\d+)\.")


def official_param_names(model_name: str, state_dict) -> list[str]:
    """The names of ``model.named_parameters()`` as far as a state_dict tells them (state_dict order): every key,
    except for MTM the ``attns.K.*`` aliases of an ``attnK.*`` key present in ``state_dict`` and any key whose
    tensor shares storage with an earlier key (``named_parameters()`` drops duplicates). Other models: all keys,
    as before."""
    names = list(state_dict)
    if model_name != "mtm":
        return names
    keys, out, seen = set(names), [], set()
    for k in names:
        canonical = _MTM_ALIAS.sub(lambda m: f"{m.group(1)}attn{m.group(2)}.", k)
        if canonical != k and canonical in keys:
            continue
        t = state_dict[k]
        if torch.is_tensor(t) and t.numel() > 0 and t.device.type != "meta":
            ident = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident in seen:
                continue
            seen.add(ident)
        out.append(k)
    return out


def easydict(d: dict) -> Placeholder:
    """An inert ``easydict.EasyDict`` (items and attributes both set, as EasyDict does)."""
    ed = placeholder_class("easydict", "EasyDict")()
    for k, v in d.items():
        v = easydict(v) if isinstance(v, dict) and not isinstance(v, Placeholder) else v
        dict.__setitem__(ed, k, v)
        ed.__dict__[k] = v
    return ed


def save_official(path, model_name: str, state_dict, *, epoch: int = 0, model_cfg=None, config=None,
                  model_val: float = 0.0, optimizer=None, module_prefix: bool = False,
                  ema_shadow: Optional[dict] = None) -> None:
    """Write ``state_dict`` in the official layout of ``model_name`` (``ms_sl`` | ``gmmformer`` | ``gmmformer_v2``
    | ``mtm``).

    MS-SL: ``model_cfg`` (a dict becomes an ``easydict.EasyDict``; any other object is pickled as it is, under
    its own class name). GMMFormer/v2/MTM: ``config`` (default ``{}``) and ``optimizer`` (default
    :func:`bert_adam_state` over :func:`official_param_names` -- for MTM without the ``attns`` aliases -- which
    holds a ``WarmupLinearSchedule``). MTM only: ``ema_shadow`` (``{name: tensor}``, e.g. ``EMA.shadow``) is
    written under ``'ema_shadow'`` when given. ``module_prefix`` adds ``module.`` (to the ``ema_shadow`` names
    too) as ``nn.DataParallel`` does.
    """
    if ema_shadow is not None and model_name != "mtm":
        raise ValueError(f"ema_shadow is an MTM checkpoint entry, not one of {model_name!r}")
    sd = collections.OrderedDict(((f"module.{k}" if module_prefix else k), v.detach().cpu())
                                 for k, v in state_dict.items())
    if model_name == "ms_sl":
        cfg = easydict(model_cfg or {}) if (model_cfg is None or type(model_cfg) is dict) else model_cfg
        obj = {"model": sd, "model_cfg": cfg, "epoch": epoch}
    elif model_name in ("gmmformer", "gmmformer_v2", "mtm"):
        if optimizer is None:
            optimizer = bert_adam_state(official_param_names(model_name, state_dict))
        obj = {"config": {} if config is None else config, "epoch": epoch, "model_val": model_val,
               "state_dict": sd, "optimizer": optimizer}
        if ema_shadow is not None:
            obj["ema_shadow"] = {(f"module.{k}" if module_prefix else k): v.detach().cpu()
                                 for k, v in ema_shadow.items()}
    else:
        raise ValueError(f"model_name must be ms_sl, gmmformer, gmmformer_v2 or mtm, got {model_name!r}")
    torch.save(obj, path, pickle_module=RESTRICTED)


__all__ = ["Placeholder", "placeholder_class", "resolve_global", "RestrictedUnpickler", "RESTRICTED",
           "OfficialCheckpoint", "strip_module_prefix", "guess_model_name", "load_official", "load_state_dict",
           "load_into", "warmup_linear_schedule", "bert_adam_state", "official_param_names", "easydict",
           "save_official"]
