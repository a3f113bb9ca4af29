"""Checkpoint conversion between the official PyTorch code and jaxprvr, both ways, bit-exact.

Library::

    from parity.convert import torch_to_flax, flax_to_torch
    params = torch_to_flax(model_name, state_dict)      # nested dict of numpy arrays (Flax layout)
    state_dict = flax_to_torch(model_name, params)       # OrderedDict in the official key order

Each model has one explicit key table (``parity/<model>.py``; rows :class:`parity.keys.Entry`: torch key,
Flax path, kind). The kind decides the transform (Linear weights are transposed, everything else is copied),
never the shape. A key the table does not know, or a key it expects and does not find, raises
:class:`ConversionError` listing them. A ``module.`` prefix (``nn.DataParallel``) is stripped.
The BertAdam state converts too (``next_m``/``next_v`` take the same transforms as their parameters).

Command line (``--help`` for all options)::

    python -m parity.convert torch2jax --model gmmformer_v2 --config tvr best.ckpt runs/converted
    python -m jaxprvr.evaluate --config tvr --ckpt runs/converted --data-root DATA
    python -m parity.convert jax2torch --model gmmformer_v2 --config tvr runs/mine out/best.ckpt

CLIP weights, model-independent (BackBone_tvr / ``clip_wti``'s ``model.clip``)::

    python -m parity.convert clip2jax ViT-B-32.pt clip-b32       # TorchScript or state dict -> params.npz + clip.json
    python -m parity.convert jax2clip clip-b32 ViT-B-32.state.pt  # back: OpenAI's keys, the stored dtypes (fp16 kept)

``torch2jax`` writes ``OUT_DIR/ckpt/best`` (parameters + the config, for ``jaxprvr.evaluate`` and
``jaxprvr.train --init-from``) and, when the file carries BertAdam moments (GMMFormer/v2/MTM ``best.ckpt``),
``OUT_DIR/ckpt/latest`` with the optimizer state and the epoch, so ``jaxprvr.train --out OUT_DIR --resume``
continues the official run (as the official ``main.py --resume`` does). ``jax2torch`` writes the official
file of the model: MS-SL ``model.ckpt`` (``{"model", "model_cfg", "epoch"}``) or GMMFormer/v2/MTM ``best.ckpt``
(``{"config", "epoch", "model_val", "state_dict", "optimizer"}``, with the moments when the JAX checkpoint has
them), which the official code loads with its own ``torch.load`` + ``load_state_dict``.

MTM's EMA (``train.use_ema``). The official MTM ``best.ckpt`` may carry ``'ema_shadow'`` (``EMA.shadow``:
``{named_parameters name: tensor}``, so without the ``attns.K`` aliases). With ``--set train.use_ema=true``
(ActivityNet's official setting) ``torch2jax`` stores the optimizer state as
:class:`jaxprvr.optim.EmaState` (``inner`` = the BertAdam moments, ``shadow`` = ``ema_shadow`` converted
through the key table) in ``ckpt/best`` (``jaxprvr.evaluate`` then evaluates the EMA weights, as training
does) and ``ckpt/latest``; a file without ``ema_shadow`` gets the shadow initialised from its parameters, and
the JSON says so (``"ema_shadow"``). ``jax2torch`` writes ``ema_shadow`` from an ``EmaState``. Both directions
are bit-exact. An MTM with other than 2 Mamba layers per branch converts with the table built for its
``model.num_mamba_layers`` (:func:`model_table`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxprvr.errors import JaxprvrError
from parity.keys import Entry, to_flax, to_torch

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")  # official weight-decay groups (Opts/builder.py)


class ConversionError(JaxprvrError):
    """Keys missing from / unexpected in a checkpoint, or a tensor of the wrong shape."""

    def __init__(self, where, expected, found, missing=(), unexpected=(), hint=None):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        super().__init__(where, expected, found, hint)


def spec(model_name: str):
    """The parity spec of ``model_name`` (its registry row's ``parity`` module: key table, official files)."""
    from jaxprvr import registry

    return registry.get(model_name).parity_module().SPEC


def table(model_name) -> tuple[Entry, ...]:
    """The key table of ``model_name``, in the official ``state_dict`` order. A sequence of
    :class:`parity.keys.Entry` (e.g. ``keys.mamba_layer("")`` for one layer) is used as the table itself."""
    if not isinstance(model_name, str):
        return tuple(model_name)
    return spec(model_name).table


def model_table(model_cfg):
    """The key-table argument for a model config: its family's (``spec.table_for``: e.g. MTM with other than the
    official 2 Mamba layers per branch gets the table built for that count)."""
    return spec(model_cfg.name).table_for(model_cfg)


# ------------------------------------------------------------------------------------------ arrays


def to_numpy(x) -> np.ndarray:
    """A numpy copy of a torch tensor / jax or numpy array, dtype kept (bfloat16 via ml_dtypes)."""
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return x.numpy().copy()
    return np.array(x, copy=True)


def to_tensor(a: np.ndarray):
    import torch

    a = np.array(a, order="C", copy=True)  # (np.ascontiguousarray would turn a 0-d scalar into shape (1,))
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def flatten(params: Mapping) -> dict[str, Any]:
    """Nested Flax params -> ``{"a/b/kernel": array}``."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", params)
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _strip_module(keys_to_values: Mapping) -> "collections.OrderedDict":
    keys = list(keys_to_values)
    if keys and all(k.startswith("module.") for k in keys):
        return collections.OrderedDict((k[len("module."):], v) for k, v in keys_to_values.items())
    return collections.OrderedDict(keys_to_values)


def _check_keys(where, expected_keys, found_keys, what: str) -> None:
    exp, got = list(expected_keys), set(found_keys)
    missing = [k for k in exp if k not in got]
    unexpected = sorted(got - set(exp))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        raise ConversionError(where, f"exactly the {len(exp)} {what}", "; ".join(parts), missing, unexpected,
                              hint="is --model right?")


def _check_rank(where, e: Entry, a: np.ndarray) -> None:
    from parity.keys import KINDS

    want = KINDS[e.kind]
    if want is not None and a.ndim != want:
        raise ConversionError(where, f"{e.torch} of rank {want} ({e.kind})", f"shape {tuple(a.shape)}")


# ------------------------------------------------------------------------------------------ parameters


def torch_to_flax(model_name: str, state_dict: Mapping, where="state_dict") -> dict:
    """Official ``state_dict`` (tensors or arrays; ``module.`` prefix allowed) -> nested Flax params (numpy)."""
    tab = table(model_name)
    sd = _strip_module(state_dict)
    _check_keys(where, [e.torch for e in tab], sd, f"{_label(model_name)} state_dict keys")
    flat = {}
    for e in tab:
        a = to_numpy(sd[e.torch])
        _check_rank(where, e, a)
        if e.alias:  # the same tensor under a second official name: must be identical
            if not np.array_equal(to_flax(e.kind, a), flat[e.flax]):
                raise ConversionError(where, f"{e.torch} equal to its alias of Flax path {e.flax}", "a different tensor")
            continue
        flat[e.flax] = to_flax(e.kind, a)
    return unflatten(flat)


def _label(model_name) -> str:
    return model_name if isinstance(model_name, str) else "the given table's"


def flax_to_arrays(model_name: str, params: Mapping, where="params") -> "collections.OrderedDict[str, np.ndarray]":
    """Flax params -> official ``state_dict`` as numpy arrays, in the official key order."""
    tab = table(model_name)
    flat = flatten(params)
    _check_keys(where, [e.flax for e in tab if not e.alias], flat, f"{_label(model_name)} Flax parameters")
    out = collections.OrderedDict()
    for e in tab:
        a = to_torch(e.kind, to_numpy(flat[e.flax]))
        _check_rank(where, e, a)
        out[e.torch] = a
    return out


def flax_to_torch(model_name: str, params: Mapping, where="params") -> "collections.OrderedDict":
    """Flax params -> official ``state_dict`` (CPU torch tensors, official key order)."""
    return collections.OrderedDict((k, to_tensor(a)) for k, a in flax_to_arrays(model_name, params, where).items())


def check_shapes(params: Mapping, reference: Mapping, where, model_name: str | None = None) -> None:
    """Every leaf of ``params`` has the shape of ``reference`` (arrays or ``ShapeDtypeStruct``); the error
    names the official key."""
    flat, ref = flatten(params), flatten(reference)
    _check_keys(where, list(ref), flat, "parameters of the configured model")
    names = {e.flax: e.torch for e in table(model_name)} if model_name else {p: p for p in ref}
    bad = [p for p in names if tuple(np.shape(flat[p])) != tuple(ref[p].shape)]  # official order
    if bad:
        p = bad[0]
        raise ConversionError(where, f"{names[p]} of shape {tuple(ref[p].shape)} (Flax layout) for the configured "
                              "model", f"shape {tuple(np.shape(flat[p]))}"
                              + (f" (and {len(bad) - 1} more tensors of other shapes)" if len(bad) > 1 else ""),
                              hint="the config's dims differ from the checkpoint's: match them with --set, e.g. "
                                   "model.hidden_size, model.visual_feat_dim, model.q_feat_size")


# ------------------------------------------------------------------------------------------ optimizer


def official_groups(model_name: str) -> tuple[list[str], list[str]]:
    """The official BertAdam parameter groups (decay, no decay) as torch names, in ``named_parameters`` order."""
    names = [e.torch for e in table(model_name) if not e.alias]  # named_parameters() lists a shared tensor once
    decay = [n for n in names if not any(nd in n for nd in NO_DECAY)]
    plain = [n for n in names if any(nd in n for nd in NO_DECAY)]
    return decay, plain


def optimizer_to_jax(model_name: str, optimizer_state: Mapping, params: Mapping, where="optimizer"):
    """An official ``BertAdam.state_dict()`` -> :class:`jaxprvr.optim.BertAdamState` (numpy), or ``None``
    when the optimizer never stepped. Parameter ids are matched to names through the official groups."""
    from jaxprvr.optim import BertAdamState

    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, Mapping) else None
    if not groups or len(groups) != 2:
        raise ConversionError(where, "a BertAdam state_dict with the two official parameter groups",
                              f"{type(optimizer_state).__name__} with {len(groups or [])} groups")
    decay, plain = official_groups(model_name)
    id_to_name = {}
    for g, names in zip(groups, (decay, plain)):
        if len(g["params"]) != len(names):
            raise ConversionError(where, f"{len(names)} parameters in a group", f"{len(g['params'])}")
        id_to_name.update(zip(g["params"], names))
    state = optimizer_state.get("state") or {}
    if not state:
        return None
    by_name = {id_to_name[i]: s for i, s in state.items() if i in id_to_name}
    _check_keys(where, decay + plain, by_name, "per-parameter optimizer states")
    steps = {int(s["step"]) for s in by_name.values()}
    if len(steps) != 1:
        raise ConversionError(where, "one step count shared by every parameter", f"steps {sorted(steps)}")
    tab = {e.torch: e for e in table(model_name) if not e.alias}
    m = {tab[n].flax: to_flax(tab[n].kind, to_numpy(s["next_m"])) for n, s in by_name.items()}
    v = {tab[n].flax: to_flax(tab[n].kind, to_numpy(s["next_v"])) for n, s in by_name.items()}
    check_shapes(unflatten(m), params, where, model_name)
    return BertAdamState(count=np.asarray(steps.pop(), np.int32), m=unflatten(m), v=unflatten(v))


def optimizer_to_torch(model_name: str, opt_state, *, lr: float, warmup: float, t_total: float) -> dict:
    """:class:`jaxprvr.optim.BertAdamState` -> an official ``BertAdam.state_dict()`` (two groups, the moments)."""
    from torch_ref.checkpoints import bert_adam_state

    m = flax_to_torch(model_name, opt_state.m, "opt_state.m")
    v = flax_to_torch(model_name, opt_state.v, "opt_state.v")
    step = int(np.asarray(opt_state.count))
    names = [e.torch for e in table(model_name) if not e.alias]  # optimizer groups list each tensor once
    moments = {k: (step, m[k], v[k]) for k in names}
    return bert_adam_state(names, lr=lr, warmup=warmup, t_total=t_total, moments=moments)


# ------------------------------------------------------------------------------------------ EMA (MTM)


def parameter_table(model_name) -> tuple[Entry, ...]:
    """The key table without its alias rows: the names of ``model.named_parameters()`` (what the official
    optimizer and MTM's ``EMA.shadow`` / ``ema_shadow`` are keyed by), in that order."""
    return tuple(e for e in table(model_name) if not e.alias)


def shadow_to_jax(model_name, ema_shadow: Mapping, params: Mapping | None = None, where="ema_shadow") -> dict:
    """MTM's ``ema_shadow`` (``{named_parameters name: tensor}``, ``module.`` prefix allowed) -> a Flax params
    tree (numpy), bit-exact; shapes checked against ``params`` when given."""
    tab = parameter_table(model_name)
    shadow = torch_to_flax(tab, ema_shadow, where)
    if params is not None:
        check_shapes(shadow, params, where, tab)
    return shadow


def shadow_to_torch(model_name, shadow: Mapping, where="ema_shadow") -> "collections.OrderedDict":
    """A Flax params tree -> MTM's ``ema_shadow`` dict (CPU tensors, ``named_parameters`` order), bit-exact."""
    return flax_to_torch(parameter_table(model_name), shadow, where)


def zero_bert_adam_state(params):
    """:class:`jaxprvr.optim.BertAdamState` of an optimizer that never stepped (``bert_adam().init``)."""
    from jaxprvr.optim import BertAdamState

    def zeros():
        return unflatten({p: np.zeros_like(np.asarray(a)) for p, a in flatten(params).items()})

    return BertAdamState(count=np.asarray(0, np.int32), m=zeros(), v=zeros())


# ------------------------------------------------------------------------------------------ official files


def official_config(cfg) -> dict:
    """The ``cfg`` dict the GMMFormer family saves in ``best.ckpt``, from a jaxprvr config (the family's spec)."""
    return spec(cfg.model.name).official_config(cfg)


def write_official(path, cfg, params, *, opt_state=None, epoch: int = 0, model_val=None,
                   steps_per_epoch: int | None = None, ema_shadow=None) -> Path:
    """Writes ``params`` (and the optimizer state, where the official file has one) in the official file layout
    of ``cfg.model.name`` (the family's spec writes it; e.g. :meth:`parity.prvr.PRVRSpec.write_official`)."""
    return spec(cfg.model.name).write_official(path, cfg, params, opt_state=opt_state, epoch=epoch,
                                               model_val=model_val, steps_per_epoch=steps_per_epoch,
                                               ema_shadow=ema_shadow)


# ------------------------------------------------------------------------------------------ CLI


def read_official_params(fam, src, model_cfg, hint: str = "pass --model {}"):
    """An official PRVR file (MS-SL ``model.ckpt``, GMMFormer / v2 / MTM ``best.ckpt``) read by ``fam.read_official``
    -> ``(OfficialCheckpoint, key table, Flax params)``, the parameters converted through the key table of
    ``model_cfg``. An unreadable file and a file of another family are one error each (``hint`` names the family
    the file holds: ``--model`` here, ``model=`` for ``jaxprvr.load``). Shapes are the caller's to check."""
    try:
        ck = fam.read_official(src)
    except JaxprvrError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise JaxprvrError(src, "an official checkpoint file (model.ckpt / best.ckpt)",
                           f"{type(e).__name__}: {e}") from None
    if ck.model_name is not None and ck.model_name != model_cfg.name:
        raise ConversionError(src, f"a {model_cfg.name} checkpoint", f"the keys of a {ck.model_name} checkpoint",
                              hint=hint.format(ck.model_name))
    tab = model_table(model_cfg)
    return ck, tab, torch_to_flax(tab, ck.state_dict, where=src)


def _load_config(args):
    from jaxprvr.config import load_config

    cfg = load_config(args.config, args.model, list(args.overrides))
    if cfg.model.name != args.model:
        raise JaxprvrError("--config", f"a config of --model {args.model}", cfg.model.name)
    return cfg


def _abstract_params(cfg):
    """The parameter shapes of ``cfg``'s model (:func:`jaxprvr.api.abstract_variables`)."""
    from jaxprvr.api import abstract_variables

    return abstract_variables(cfg)[0]


def _abstract_opt_state(params, ema: bool = False):
    import jax
    import jax.numpy as jnp

    from jaxprvr.optim import BertAdamState, EmaState

    inner = BertAdamState(count=jax.ShapeDtypeStruct((), jnp.int32), m=params, v=params)
    return EmaState(inner=inner, shadow=params) if ema else inner


def _saved_opt_state_is_ema(opt_dir: Path) -> bool | None:
    """Whether the orbax ``opt_state`` item at ``opt_dir`` is an :class:`jaxprvr.optim.EmaState` (top-level
    ``inner`` / ``shadow``); ``None`` when its metadata cannot be read."""
    import orbax.checkpoint as ocp

    try:
        md = ocp.StandardCheckpointHandler().metadata(opt_dir)
        tree = getattr(md, "tree", md)
        return "shadow" in tree and "inner" in tree
    except Exception:  # noqa: BLE001 - any unreadable metadata: decide from the config instead
        return None


def torch2jax(args) -> dict:
    import jax

    from jaxprvr.checkpoint import Checkpoints
    from jaxprvr.optim import EmaState

    src = Path(args.input)
    if not src.is_file():
        raise JaxprvrError(src, "an official checkpoint file (model.ckpt / best.ckpt)", "no such file")
    fam = spec(args.model)
    clip_weights = getattr(args, "clip_weights", None)
    if clip_weights and not hasattr(_load_config(args).model, "clip"):
        raise JaxprvrError(f"--clip-weights {clip_weights}", f"a model with a frozen CLIP tower outside its official "
                           f"checkpoint (a model.clip field)", f"--model {args.model}, which has none")
    if fam.convert_torch2jax is not None:  # a family with its own file layout (parity.base.FamilySpec)
        return fam.convert_torch2jax(args, _load_config(args))
    cfg = _load_config(args)
    ck, tab, params = read_official_params(fam, src, cfg.model, hint="pass --model {}")
    abstract = _abstract_params(cfg)
    check_shapes(params, abstract, src, tab)
    opt_state = None
    if ck.optimizer is not None:
        opt_state = optimizer_to_jax(tab, ck.optimizer, params, where=f"{src} (optimizer)")
    file_ema = getattr(ck, "ema_shadow", None)
    ema_state, ema_note = None, None
    if cfg.train.use_ema:  # the JAX optimizer state is then EmaState(inner=BertAdam, shadow=EMA weights)
        if file_ema is not None:
            shadow = shadow_to_jax(tab, file_ema, params, where=f"{src} (ema_shadow)")
            ema_note = "from the file's ema_shadow"
        else:
            shadow = jax.tree.map(np.copy, params)
            ema_note = ("initialised from the parameters: the file has no 'ema_shadow' (as the official EMA "
                        "registers the weights it starts from)")
        ema_state = EmaState(inner=opt_state if opt_state is not None else zero_bert_adam_state(params),
                             shadow=shadow)
    elif file_ema is not None:
        ema_note = "not converted: train.use_ema is off (--set train.use_ema=true keeps the EMA weights)"
    out = Path(args.out_dir)
    ckpt_dir = out / "ckpt"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not args.force:
        raise JaxprvrError(out, "an output folder without checkpoints", "an existing ckpt/ folder",
                           hint="pass --force to replace it")
    epoch = int(ck.epoch) if ck.epoch is not None else -1
    best_metric, best_value = fam.official_best(ck)
    meta = dict(config=cfg.to_dict(), source=str(src.absolute()), source_layout=ck.layout, epoch=epoch)
    slots = ("best", "latest") if opt_state is not None else ("best",)
    ckpts = Checkpoints(ckpt_dir, slots=slots)
    step = int(opt_state.count) if opt_state is not None else 0
    # with train.use_ema "best" carries the EmaState too: evaluation reads the EMA weights from it
    ckpts.save("best", step, params, ema_state, meta=meta)
    if opt_state is not None:
        resume = dict(meta, global_step=step, next_epoch=epoch + 1, step_in_epoch=0, es_cnt=0,
                      best_epoch=epoch, stopped=False, **{f"best_{best_metric}": best_value})
        ckpts.save("latest", step, params, ema_state if ema_state is not None else opt_state, resume)
    ckpts.close()
    return dict(model=args.model, input=str(src), out=str(out), tensors=len(table(tab)),
                parameters=int(sum(np.size(a) for a in flatten(params).values())), epoch=epoch,
                optimizer_state=opt_state is not None, optimizer_step=step if opt_state is not None else None,
                slots=list(slots), ema=ema_state is not None, ema_shadow=ema_note)


def jax2torch(args) -> dict:
    import jax

    from jaxprvr.config import model_config_from_dict
    from jaxprvr.checkpoint import read_meta, resolve_params_dir

    if spec(args.model).convert_jax2torch is not None:  # a family with its own file layout
        return spec(args.model).convert_jax2torch(args, _load_config(args))
    step_dir = resolve_params_dir(args.input)
    meta = read_meta(step_dir)
    cfg = _load_config(args)
    saved = meta.get("config", {}).get("model")
    if saved is not None:
        if saved.get("name") != args.model:
            raise JaxprvrError(step_dir, f"a checkpoint of --model {args.model}", f"one of {saved.get('name')}")
        from jaxprvr.config import apply_overrides

        cfg = apply_overrides(dataclasses.replace(cfg, model=model_config_from_dict(saved)), list(args.overrides))
    abstract = _abstract_params(cfg)
    import orbax.checkpoint as ocp

    from jaxprvr.checkpoint import load_params
    from jaxprvr.optim import EmaState

    params, _ = load_params(step_dir, abstract)
    opt_state, ema_shadow = None, None
    opt_dir = step_dir / "opt_state"
    if opt_dir.is_dir():
        is_ema = _saved_opt_state_is_ema(opt_dir)
        if is_ema is None:
            is_ema = bool(meta.get("config", {}).get("train", {}).get("use_ema", cfg.train.use_ema))
        if is_ema or not args.no_optimizer:  # the EMA weights are exported even with --no-optimizer
            try:
                opt_state = ocp.StandardCheckpointer().restore(opt_dir, _abstract_opt_state(abstract, is_ema))
            except (ValueError, KeyError, FileNotFoundError) as e:
                what = "a BertAdam state with EMA weights" if is_ema else "a BertAdam state"
                raise JaxprvrError(opt_dir, what, f"{type(e).__name__}: {e}") from None
            if isinstance(opt_state, EmaState):
                ema_shadow = jax.device_get(opt_state.shadow)
                opt_state = None if args.no_optimizer else opt_state.inner
    params = jax.device_get(params)
    val = meta.get("val") or {}
    model_val = [val.get(k, 0.0) for k in ("r1", "r5", "r10", "r100", "sumr")] if val else None
    # a converted checkpoint records the official epoch; a jaxprvr run saves both slots after next_epoch += 1
    epoch = int(meta["epoch"]) if "epoch" in meta else int(meta.get("next_epoch", 1)) - 1
    ema_note = None
    if ema_shadow is not None and not spec(args.model).has_ema:
        ema_shadow, ema_note = None, f"EMA weights not exported: the official {args.model} file has no 'ema_shadow'"
    elif ema_shadow is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, use_ema=True))
    path = write_official(args.output, cfg, params, opt_state=jax.device_get(opt_state), epoch=epoch,
                          model_val=model_val, steps_per_epoch=args.steps_per_epoch, ema_shadow=ema_shadow)
    return dict(model=args.model, input=str(step_dir), output=str(path), tensors=len(table(model_table(cfg.model))),
                layout=spec(args.model).official_layout,
                optimizer_state=opt_state is not None, epoch=epoch, ema_shadow=ema_shadow is not None,
                **({"note": ema_note} if ema_note else {}))


def clip2jax(args) -> dict:
    """An OpenAI-format CLIP (``ViT-B-32.pt`` TorchScript or a ``torch.save``-d state dict, read without running
    its pickle) -> a folder of :func:`parity.clip.save_clip_dir` (``params.npz`` + ``clip.json`` with each key's
    stored dtype), what ``--set model.clip=OUT_DIR`` reads."""
    from parity.clip import CLIP_DIR_FILES, load_clip_weights, save_clip_dir

    src, out = Path(args.input), Path(args.out_dir)
    if not src.is_file():
        raise JaxprvrError(src, "an OpenAI-format CLIP file (a TorchScript .pt or a state dict)", "no such file")
    if any((out / f).exists() for f in CLIP_DIR_FILES) and not args.force:
        raise JaxprvrError(out, "a folder without a converted CLIP", "clip.json / params.npz there",
                           hint="pass --force to replace it")
    dims, params, dtypes = load_clip_weights(src)
    save_clip_dir(out, dims, params, dtypes, source=str(src.absolute()))
    return dict(input=str(src), out=str(out), tensors=len(dtypes), dtypes=sorted(set(dtypes.values())),
                dims=dataclasses.asdict(dims))


def jax2clip(args) -> dict:
    """A :func:`clip2jax` folder -> a ``torch.save``-d state dict with OpenAI's keys in ``state_dict`` order, each
    tensor in its stored dtype (bit-exact round trip; a TorchScript source's scalar non-parameter entries are not
    written)."""
    import zipfile

    import torch

    from parity.clip import load_clip_dir, params_to_state_dict
    from parity.prvr import _atomic

    src = Path(args.input)
    try:
        dims, params, dtypes = load_clip_dir(src)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise JaxprvrError(src, "a readable clip2jax folder", f"{type(e).__name__}: {e}") from None
    sd = params_to_state_dict(dims, params, dtypes, where=str(src))
    tensors = collections.OrderedDict((k, to_tensor(a)) for k, a in sd.items())
    path = _atomic(args.output, lambda tmp: torch.save(tensors, tmp))
    return dict(input=str(src), output=str(path), tensors=len(tensors),
                dtypes=sorted({str(a.dtype) for a in sd.values()}))


def build_parser() -> argparse.ArgumentParser:
    from jaxprvr import registry
    from jaxprvr.config import all_datasets

    p = argparse.ArgumentParser(prog="python -m parity.convert",
                                description="Convert checkpoints between the official PyTorch code and jaxprvr.")
    sub = p.add_subparsers(dest="direction", required=True)

    def common(sp):
        sp.add_argument("--model", required=True, choices=registry.names())
        sp.add_argument("--config", required=True, help=f"dataset ({'|'.join(all_datasets())}) or <model>/<dataset>")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (e.g. model.hidden_size=256) to match the checkpoint")

    t2j = sub.add_parser("torch2jax", help="official model.ckpt / best.ckpt -> orbax checkpoint folder")
    common(t2j)
    t2j.add_argument("input", help="official checkpoint file")
    t2j.add_argument("out_dir", help="output folder (gets ckpt/best, and ckpt/latest when moments exist)")
    t2j.add_argument("--force", action="store_true", help="write into an output folder that has checkpoints")
    t2j.add_argument("--clip-weights", metavar="FILE", default=None,
                     help="the frozen CLIP text tower a model reads outside its official checkpoint "
                          "(clip_text_encoder.pth, ViT-B-32.pt or a clip2jax folder); recorded as model.clip")
    t2j.set_defaults(run=torch2jax)
    j2t = sub.add_parser("jax2torch", help="jaxprvr checkpoint (run, slot or step folder) -> official file")
    common(j2t)
    j2t.add_argument("input", help="a run folder, ckpt/<slot> folder or step folder")
    j2t.add_argument("output", help="official file to write (its family's layout: model.ckpt for MS-SL, best.ckpt "
                                    "for the GMMFormer family and MTM, a state dict for clip_wti)")
    j2t.add_argument("--no-optimizer", action="store_true", help="do not export the BertAdam moments")
    j2t.add_argument("--steps-per-epoch", type=int, default=None,
                     help="len(train_loader), to record the official schedule's t_total (default: -1)")
    j2t.set_defaults(run=jax2torch)
    c2j = sub.add_parser("clip2jax", help="OpenAI-format CLIP (.pt TorchScript or state dict) -> a folder that "
                                          "model.clip reads (params.npz + clip.json)")
    c2j.add_argument("input", help="ViT-B-32.pt / ViT-B-16.pt (TorchScript) or a torch.save-d CLIP state dict")
    c2j.add_argument("out_dir", help="output folder")
    c2j.add_argument("--force", action="store_true", help="replace a converted CLIP in out_dir")
    c2j.set_defaults(run=clip2jax)
    j2c = sub.add_parser("jax2clip", help="a clip2jax folder -> a torch.save-d state dict with OpenAI's keys and "
                                          "the stored dtypes")
    j2c.add_argument("input", help="a clip2jax folder")
    j2c.add_argument("output", help="state dict file to write")
    j2c.set_defaults(run=jax2clip)
    return p


def main(argv=None) -> int:
    from jaxprvr.cli import run_cli

    return run_cli(build_parser(), lambda a: a.run(a), argv)


if __name__ == "__main__":
    sys.exit(main())
