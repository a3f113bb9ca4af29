"""The Python API: ``jaxprvr.load(path)`` gives a trained model with the calls a notebook needs.

    import jaxprvr
    m = jaxprvr.load("runs/mtm-tvr-demo-<time>")      # a run folder, a checkpoint folder or an official file
    s = m.scores(m.encode_queries(query_feats), m.encode_videos(video_feats))

What ``load`` reads (docs/api.md):

* a **run folder** (``RUN/ckpt/best``, else its one ``best_<split>``, else ``latest``) or a **checkpoint folder**
  (a slot ``RUN/ckpt/<slot>`` or a step folder): exactly what ``python -m jaxprvr.evaluate --ckpt`` accepts,
  resolved by the same code (:func:`jaxprvr.checkpoint.resolve_params_dir`). With ``config=None`` the model is the
  run's own config as saved with the checkpoint (every section: the evaluation settings the run validated with);
  with ``config=`` it is ``jaxprvr.evaluate``'s rule (:func:`jaxprvr.evaluate.load_checkpoint_config`): that
  config, with the checkpoint's model section and the data fields that fix the model's input;
* an **official PyTorch checkpoint file** (``model.ckpt`` / ``best.ckpt`` / MRNet's ``.pth`` / MESM's ``.ckpt`` /
  BackBone_tvr's ``pytorch_model.bin.N``), converted in memory through the family's key table (what ``python -m
  parity.convert torch2jax`` writes to disk); ``config=`` names its config (an official file need not carry one)
  and ``model=`` the family when it is not the config's default.

``ema=True`` gives the EMA weights of a run trained with ``train.use_ema`` (what its validation and test used, as
``jaxprvr.evaluate`` without ``--no-ema``); ``ema=False`` the raw weights.

The object returned is the :class:`Loaded` subclass its task names (``Task.api_class``):
:class:`jaxprvr.api_tasks.PRVRModel` (``encode_queries``, ``encode_videos``, ``scores``),
:class:`~jaxprvr.api_tasks.MRNetModel` and :class:`~jaxprvr.api_tasks.MESMModel` (``predict``),
:class:`~jaxprvr.api_tasks.T2VModel` (``encode_text``, ``encode_video``, ``similarity``). Their calls take any
number of items: the batch axis is padded up to a :func:`bucket` size and each jitted function is compiled once
per bucket (``Loaded.traces`` counts the compilations).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxprvr.errors import JaxprvrError

BUCKET_MIN = 8  # the smallest padded batch
BUCKET_STEP = 64  # powers of two up to here, then multiples of it


def bucket(n: int, minimum: int = BUCKET_MIN) -> int:
    """The padded size of a batch of ``n`` items: the next power of two from ``minimum`` (8) up to 64 (8, 16, 32,
    64), then the next multiple of 64. Calls whose batches share a bucket share one compiled program."""
    n = int(n)
    if n < 1:
        raise JaxprvrError("batch", "at least one item", f"{n}")
    if n <= BUCKET_STEP:
        return max(int(minimum), 1 << (n - 1).bit_length())
    return -(-n // BUCKET_STEP) * BUCKET_STEP


def pad_rows(a, size: int, fill=0) -> np.ndarray:
    """``a`` with axis 0 padded to ``size`` rows of ``fill``."""
    a = np.asarray(a)
    if a.shape[0] == size:
        return a
    if a.shape[0] > size:
        raise JaxprvrError("pad_rows", f"at most {size} rows", f"{a.shape[0]}")
    return np.concatenate([a, np.full((size - a.shape[0],) + a.shape[1:], fill, a.dtype)], 0)


@dataclasses.dataclass(eq=False)
class Loaded:
    """A loaded model: the Flax ``model``, its ``params`` (and ``model_state``: BatchNorm statistics, ``{}`` for
    most models), the ``config`` (a :class:`jaxprvr.config.Config`) and the ``task``
    (:class:`jaxprvr.tasks.base.Task`); ``ema``: whether ``params`` are EMA weights; ``source``: what was read.

    ``model.apply({"params": m.params, **m.model_state}, ...)`` runs the model directly; the task subclasses add
    batched, jitted calls. ``traces`` counts how often each of those was traced, i.e. compiled (once per shape
    bucket)."""

    model: Any
    params: Any = dataclasses.field(repr=False)
    config: Any = dataclasses.field(repr=False)
    task: Any = dataclasses.field(repr=False)
    model_state: dict = dataclasses.field(default_factory=dict, repr=False)
    ema: bool = False
    source: str = ""
    data_root: str | None = None
    traces: collections.Counter = dataclasses.field(default_factory=collections.Counter, repr=False)
    _fns: dict = dataclasses.field(default_factory=dict, repr=False)  # name -> jitted function (:meth:`jit`)

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}(model={c.model.name!r}, dataset={c.data.dataset!r}, task={self.task.name!r}, "
                f"ema={self.ema}, source={self.source!r})")

    @property
    def name(self) -> str:
        return self.config.model.name

    def jit(self, name: str, fn: Callable) -> Callable:
        """``jax.jit(fn)`` kept under ``name`` (one per loaded model); every trace of it adds 1 to
        ``traces[name]``."""
        if name not in self._fns:
            import jax

            def counted(*args):
                self.traces[name] += 1  # runs while tracing only: one count per compiled shape
                return fn(*args)

            self._fns[name] = jax.jit(counted)
        return self._fns[name]


# ---------------------------------------------------------------------------------------------- load


def load(path, *, config=None, model: str | None = None, ema: bool = True, overrides: Sequence[str] = (),
         data_root=None) -> Loaded:
    """A trained model from a run folder, a checkpoint folder or an official PyTorch checkpoint file.

    ``config``: ``None`` (a folder: the config saved with the checkpoint), a dataset / ``<model>/<dataset>`` name,
    or a :class:`jaxprvr.config.Config`; required for an official file. ``model``: the family (default: the
    checkpoint's, else the config's). ``ema``: the EMA weights of a run trained with ``train.use_ema``.
    ``overrides``: ``--set`` strings applied last (e.g. ``"model.clip=ViT-B-32.pt"``). ``data_root``: the folder
    relative paths of the config are resolved under (MESM's CLIP weights and vocabulary files)."""
    from jaxprvr.tasks import task_for

    p = Path(path).expanduser()
    if p.is_file():
        cfg, params, model_state, used_ema = _load_official(p, config, model, ema, overrides)
    elif p.exists():
        cfg, params, model_state, used_ema = _load_folder(p, config, model, ema, overrides)
    else:
        raise JaxprvrError(p, "a run folder, a checkpoint folder or an official checkpoint file", "nothing there")
    from jaxprvr.models import build_model

    task = task_for(cfg)
    cls = _class_for(task)
    return cls(model=build_model(cfg.model), params=params, config=cfg, task=task, model_state=model_state,
               ema=used_ema, source=str(p), data_root=None if data_root is None else str(Path(data_root).expanduser()))


def _class_for(task):
    """The :class:`Loaded` subclass of ``task`` (its ``api_class``, ``"module:Class"``); a task without one gets
    :class:`Loaded` itself (the model, its parameters and config)."""
    from jaxprvr.registry import _load

    return _load(task.api_class) if task.api_class else Loaded


def _saved_config(p: Path, step_dir: Path) -> dict:
    """The config dict saved with the checkpoint (its meta), else ``config.json`` of the run folder."""
    from jaxprvr.checkpoint import read_meta

    saved = read_meta(step_dir).get("config")
    if saved:
        return saved
    for folder in (p, *p.parents[:3]):
        f = folder / "config.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise JaxprvrError(f, "the run's config (JSON)", str(e)) from None
    return {}


def config_from_dict(saved: dict, overrides: Sequence[str] = (), where: str = "checkpoint config"):
    """A :class:`jaxprvr.config.Config` from a saved ``Config.to_dict()``: the config file of its (model, dataset)
    with every saved field, then ``overrides``. Saved data / loss / train fields the schema no longer has are
    dropped (they meant nothing to this version); the model section must match the schema
    (:func:`jaxprvr.config.model_config_from_dict`)."""
    from jaxprvr.config import apply_overrides, load_config, model_config_from_dict

    m, d = saved.get("model") or {}, saved.get("data") or {}
    if "name" not in m or "dataset" not in d:
        raise JaxprvrError(where, "a saved config with model.name and data.dataset", f"sections {sorted(saved)}")
    cfg = load_config(d["dataset"], m["name"])
    cfg = dataclasses.replace(cfg, model=model_config_from_dict(m, where=where))
    kept = {}
    for section in ("data", "loss", "train"):
        names = {f.name for f in dataclasses.fields(getattr(cfg, section))}
        for k, v in (saved.get(section) or {}).items():
            if k in names:
                kept[f"{section}.{k}"] = tuple(v) if isinstance(v, list) else v
    return apply_overrides(apply_overrides(cfg, kept), list(overrides))


def _load_folder(p: Path, config, model, ema: bool, overrides):
    import jax

    from jaxprvr.checkpoint import load_ema_params, load_model_state, load_params, resolve_params_dir
    from jaxprvr.config import Config

    step_dir = resolve_params_dir(p)
    saved = _saved_config(p, step_dir)
    saved_model = (saved.get("model") or {}).get("name")
    if model is not None and saved_model is not None and model != saved_model:
        raise JaxprvrError(p, f"a checkpoint of model={model!r}", f"one of {saved_model!r}")
    if isinstance(config, Config):
        cfg = _checkpoint_rule(config, saved, step_dir, overrides)
    elif config is None:
        if not saved:
            raise JaxprvrError(p, "a checkpoint with its config (meta or config.json)", "none",
                               hint="pass config= (a dataset or <model>/<dataset>)")
        cfg = config_from_dict(saved, overrides, where=str(step_dir))
    else:  # jaxprvr.evaluate's rule: the named config with the checkpoint's model section (and input data fields)
        from jaxprvr.evaluate import load_checkpoint_config

        args = types.SimpleNamespace(ckpt=str(step_dir), config=str(config), model=model, overrides=list(overrides))
        cfg, _ = load_checkpoint_config(args)
    if model is not None and cfg.model.name != model:
        raise JaxprvrError("load(model=...)", f"a config of {model!r}", cfg.model.name)
    # Restored by the readers jaxprvr.evaluate uses: a truncated file, or arrays of other shapes than the configured
    # model's (jax.eval_shape of its init; nothing is computed), is one error line
    abstract, abstract_state = abstract_variables(cfg)
    params, _ = load_params(step_dir, abstract)
    model_state = load_model_state(step_dir, abstract_state) if abstract_state else {}
    use_ema = bool((saved.get("train") or {}).get("use_ema", False)) and ema
    if use_ema:  # as jaxprvr.evaluate: the EMA weights validation and test used (the optimizer state's shadow)
        try:
            params = load_ema_params(step_dir, abstract)
        except JaxprvrError as e:
            raise JaxprvrError(e.where, e.expected, e.found, hint="pass ema=False for the raw weights") from None
    return cfg, jax.device_put(params), jax.device_put(model_state), use_ema


def _checkpoint_rule(cfg, saved: dict, step_dir: Path, overrides):
    """``jaxprvr.evaluate``'s rule (:func:`jaxprvr.evaluate.with_checkpoint_model`) on a given
    :class:`jaxprvr.config.Config`: its sections, with the checkpoint's model section and the data fields that fix
    the model's input, then ``overrides``."""
    from jaxprvr.config import apply_overrides
    from jaxprvr.evaluate import with_checkpoint_model

    model = saved.get("model")
    if model is not None and model.get("name") != cfg.model.name:
        raise JaxprvrError(step_dir, f"a checkpoint of the config's model {cfg.model.name!r}",
                           f"one of {model.get('name')!r}")
    return apply_overrides(with_checkpoint_model(cfg, saved, step_dir), list(overrides))


def abstract_variables(cfg):
    """Shapes of ``(params, model_state)`` of ``cfg``'s model (``jax.eval_shape`` of its init on the task's dummy
    batch: nothing is computed), memoised per config and ``jax_enable_x64`` (a trace costs about a second)."""
    import jax

    return _abstract_variables(cfg, bool(jax.config.jax_enable_x64))


@functools.lru_cache(maxsize=8)
def _abstract_variables(cfg, x64: bool):
    import jax

    from jaxprvr.models import build_model
    from jaxprvr.train import init_variables

    m = build_model(cfg.model)
    return jax.eval_shape(lambda: init_variables(m, cfg, jax.random.PRNGKey(0)))


# ---------------------------------------------------------------------------------------------- official files


def _load_official(p: Path, config, model, ema: bool, overrides):
    """An official PyTorch checkpoint -> ``(cfg, params, model_state, ema)`` in memory (the family's key table)."""
    import jax

    from jaxprvr import registry
    from jaxprvr.config import Config, apply_overrides, load_config
    from parity.convert import check_shapes

    if config is None:
        raise JaxprvrError(p, "config= naming the config of this official file (a dataset or <model>/<dataset>)",
                           "config=None",
                           hint="e.g. config='<dataset>', with model='<family>' when it is not the config's default")
    if isinstance(config, Config):
        cfg = apply_overrides(config, list(overrides))
    else:
        cfg = load_config(str(config), model, list(overrides))
    if model is not None and cfg.model.name != model:
        raise JaxprvrError("load(model=...)", f"a config of {model!r}", cfg.model.name)
    spec = registry.get(cfg.model.name).parity_module().SPEC
    if spec.read_variables is None:
        raise JaxprvrError(p, "a family with an in-memory reader (parity SPEC.read_variables)", cfg.model.name,
                           hint="convert it with python -m parity.convert torch2jax, then load the folder")
    try:
        cfg, params, model_state, *rest = spec.read_variables(p, cfg, list(overrides))
    except JaxprvrError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise JaxprvrError(p, f"an official {cfg.model.name} checkpoint file", f"{type(e).__name__}: {e}") from None
    check_shapes(params, abstract_variables(cfg)[0], p, spec.table_for(cfg.model))
    shadow = rest[0] if rest else None  # the file's EMA weights (MTM's ema_shadow with train.use_ema)
    used_ema = bool(ema and shadow is not None)
    return cfg, jax.device_put(shadow if used_ema else params), jax.device_put(model_state), used_ema


__all__ = ["load", "Loaded", "bucket", "pad_rows", "config_from_dict"]
