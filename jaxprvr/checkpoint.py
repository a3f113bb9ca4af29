"""Orbax checkpoints of a training run: ``<out>/ckpt/latest`` and ``<out>/ckpt/best``.

Each checkpoint holds three items: ``params`` (what evaluation and conversion need), ``opt_state``
(training only) and ``meta`` (JSON: config, epoch, step, early-stopping state), and a fourth,
``model_state``, for a model with non-trainable variables (``{"batch_stats": ...}`` of BatchNorm).

Saves are asynchronous: :meth:`Checkpoints.save` returns once the state is on the host, and orbax writes it on a
background thread into a temporary folder that it renames when complete, so a kill at any moment leaves the
previous checkpoint loadable; a checkpoint is only deleted after its successor is finalised. One save is in
flight at a time: a save first waits for the pending one, whatever its slot, so checkpoints finalise in the
order they were started (``best/<s>`` before ``latest/<s>`` at the end of an improving epoch: a ``latest`` that
records a new best never exists without that best) and two orbax managers never synchronise processes at the
same time (in a multi-process run that fails: "Barrier ... is already ongoing"). A restore waits for the pending
save, :meth:`Checkpoints.close` too (call it before the process exits).

A checkpoint that cannot be read (a truncated file, a missing item, another model's) raises one
:class:`JaxprvrError` naming the step folder and what failed; :meth:`Checkpoints.restore` also names the
slot's last readable step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxprvr.errors import JaxprvrError

ITEMS = ("params", "opt_state", "meta", "model_state")


def _host_tree(tree):
    """Replicated device arrays as numpy, in one transfer. Orbax then writes them from process 0 only (its
    handler for replicated numpy arrays) and skips its per-array device-to-host path: a training state of
    ~2,500 small arrays (tiny MTM with BertAdam and EMA) saved in 2.1 s instead of 4.8 s. A tree with an
    array split over devices (not fully replicated) is left to orbax's sharded writer. (On CPU these numpy arrays
    share the device buffers; orbax copies them before ``save`` returns, so the next train step may donate them.)"""
    leaves = jax.tree.leaves(tree)
    if not all(getattr(x, "is_fully_replicated", True) for x in leaves):
        return tree
    if jax.process_count() > 1:
        from jaxprvr.sharding import to_host

        return jax.tree.map(to_host, tree)
    return jax.device_get(tree)


class Checkpoints:
    """One orbax CheckpointManager per slot (``latest``, ``best``), each keeping ``keep[slot]`` steps (default 1).
    ``cleanup_tmp``: delete the temporary folders of saves a kill interrupted (only for the run's owner: a reader
    of a run still training would delete the save in progress)."""

    def __init__(self, directory: str | Path, slots=("latest", "best"), keep: dict | None = None,
                 cleanup_tmp: bool = False):
        self.directory = Path(directory).absolute()
        self._managers, self._pending = {}, None  # the slot of the save in flight
        # the steps the run keeps on disk; while a save is written (one at a time), one more: orbax deletes the step
        # it replaces only after the new one is finalised
        self.copies = sum((keep or {}).get(slot, 1) for slot in slots)
        for slot in slots:
            self._managers[slot] = ocp.CheckpointManager(
                self.directory / slot,
                options=ocp.CheckpointManagerOptions(max_to_keep=(keep or {}).get(slot, 1), create=True,
                                                     enable_async_checkpointing=True,
                                                     cleanup_tmp_directories=cleanup_tmp),
                item_names=ITEMS,
            )

    def save(self, slot: str, step: int, params, opt_state=None, meta: dict | None = None, model_state=None) -> None:
        """Starts writing ``step`` into ``slot`` and returns (the write finishes in the background)."""
        items = dict(params=ocp.args.StandardSave(_host_tree(params)), meta=ocp.args.JsonSave(meta or {}))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(_host_tree(opt_state))
        if model_state:
            items["model_state"] = ocp.args.StandardSave(_host_tree(model_state))
        if self._pending not in (None, slot):  # one save in flight (see the module docstring); orbax itself
            self.wait()  # waits for the previous save of the same slot
        self._managers[slot].save(step, args=ocp.args.Composite(**items), force=True)
        self._pending = slot

    def wait(self) -> None:
        """Blocks until the pending save (if any) is finalised."""
        if self._pending is not None:
            self._managers[self._pending].wait_until_finished()
            self._pending = None

    def latest_step(self, slot: str) -> int | None:
        """The newest step of ``slot``, including one still being written."""
        return self._managers[slot].latest_step()

    def steps(self, slot: str) -> list[int]:
        return sorted(self._managers[slot].all_steps())

    def bytes_on_disk(self) -> int:
        """The size of the files in the finalised step folders of every slot (a resumed run's checkpoints)."""
        total = 0
        for slot in self._managers:
            for step_dir in _steps(self.directory / slot) if (self.directory / slot).is_dir() else []:
                total += sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
        return total

    def restore(self, slot: str, abstract_params, abstract_opt_state=None, step: int | None = None):
        """Returns ``(params, opt_state or None, meta)`` of the slot's newest step (or of ``step``). An unreadable step
        raises one :class:`JaxprvrError` naming it and the slot's last readable step."""
        self.wait()
        step = self.latest_step(slot) if step is None else step
        if step is None:
            raise JaxprvrError(self.directory / slot, "a saved checkpoint", "none")
        _quiet_abandoned_reads()
        try:
            return self._restore(slot, step, abstract_params, abstract_opt_state)
        except _Mismatch:  # read, but not this model's arrays: not a damaged step
            raise
        except Exception as e:  # orbax and tensorstore raise many types (ValueError, plain Exception, ...)
            err = unreadable(self.directory / slot / str(step), _expected(abstract_opt_state), e)
        hint = None
        for older in reversed([s for s in self.steps(slot) if s < step]):
            try:
                self._restore(slot, older, abstract_params, abstract_opt_state)
            except Exception:  # noqa: BLE001 - this one is unreadable too: look further back
                continue
            hint = (f"the last readable step is {slot}/{older}: move {err.where} out of {self.directory / slot} "
                    "to go back to it")
            break
        if hint is None:
            others = [f"{s}/{m.latest_step()}" for s, m in self._managers.items()
                      if s != slot and m.latest_step() is not None]
            hint = f"no earlier readable step in {slot}" + (f"; the run also has {', '.join(others)}" if others else "")
        raise JaxprvrError(err.where, err.expected, err.found, hint=hint)

    def _restore(self, slot, step, abstract_params, abstract_opt_state):
        items = dict(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        missing = [k for k in items if not (self.directory / slot / str(step) / k).is_dir()]
        if missing:  # checked first, to name it
            raise _Missing(f"no {'/, no '.join(missing)}/ item")
        out = self._managers[slot].restore(step, args=ocp.args.Composite(**items))
        where = self.directory / slot / str(step)
        params = _checked(where / "params", out["params"], abstract_params, "parameters matching the model config")
        opt_state = None if abstract_opt_state is None else _checked(
            where / "opt_state", out["opt_state"], abstract_opt_state, _expected(abstract_opt_state))
        return params, opt_state, out["meta"]

    def restore_model_state(self, slot: str, abstract_model_state):
        """The ``model_state`` item (BatchNorm statistics) of the slot's newest step."""
        self.wait()
        step = self.latest_step(slot)
        if step is None:
            raise JaxprvrError(self.directory / slot, "a saved checkpoint", "none")
        return load_model_state(self.directory / slot / str(step), abstract_model_state)

    def close(self):
        """Waits for the pending saves, then closes the managers."""
        self.wait()
        for mgr in self._managers.values():
            mgr.close()


class _Missing(Exception):
    """An item folder a restore needs is not in the step folder."""


def _expected(abstract_opt_state) -> str:
    return "a readable checkpoint (params, " + ("opt_state, " if abstract_opt_state is not None else "") + "meta)"


def unreadable(where, expected: str, err: BaseException) -> JaxprvrError:
    """A failed checkpoint read as one :class:`JaxprvrError`: the first line of the innermost cause (orbax wraps
    tensorstore's errors, e.g. ``OUT_OF_RANGE: ... Requested byte range ... is not valid`` for a truncated file)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = (str(err).strip().splitlines() or [""])[0]
    text = text if len(text) <= 300 else text[:297] + "..."
    return JaxprvrError(where, expected, text if isinstance(err, _Missing) else f"{type(err).__name__}: {text}")


def _quiet_abandoned_reads() -> None:
    """After a failed orbax read, the reads it had started in parallel are abandoned: tensorstore completes them
    into orbax's closed asyncio loop, and their tasks are collected later, each report a traceback printed after the
    one-line error (``RuntimeError: Event loop is closed`` and ``Exception ignored in: <coroutine ...>`` through
    ``sys.unraisablehook``, ``Task exception was never retrieved`` through the ``asyncio`` logger). Installed before
    the first read (a report may come before the error reaches us), the filters drop those reports when they come
    from orbax or tensorstore (:func:`_from_orbax`); every other one still prints."""
    asyncio_log = logging.getLogger("asyncio")
    if _abandoned_task_record not in asyncio_log.filters:
        asyncio_log.addFilter(_abandoned_task_record)
    previous = sys.unraisablehook
    if getattr(previous, "jaxprvr_quiet", False):
        return

    def abandoned(u) -> bool:
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return _from_orbax(u.exc_traceback)
        code = getattr(u.object, "cr_code", None)  # a coroutine of orbax's reader, closed unfinished
        return code is not None and _orbax_file(code.co_filename)

    def hook(u):
        if not abandoned(u):
            previous(u)

    hook.jaxprvr_quiet = True
    sys.unraisablehook = hook


def _orbax_file(filename: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in filename or f"{os.sep}tensorstore{os.sep}" in filename


def _from_orbax(tb) -> bool:
    """Whether a traceback passes through orbax's or tensorstore's Python code, or through a frame holding a
    tensorstore object (tensorstore has no Python frame of its own): ``loop.call_soon_threadsafe(callback,
    <tensorstore.Future>, ...)`` called from its C++ thread (what its completed reads raise into orbax's closed loop),
    asyncio's ``_wrap_awaitable(<tensorstore.Future>)`` (the task ``asyncio.gather`` makes of a read it awaits)."""
    def tensorstore(v) -> bool:
        return type(v).__module__.partition(".")[0] == "tensorstore"

    while tb is not None:
        frame = tb.tb_frame
        if _orbax_file(frame.f_code.co_filename):
            return True
        for v in frame.f_locals.values():
            if tensorstore(v) or (isinstance(v, (tuple, list)) and any(tensorstore(a) for a in v)):
                return True
        tb = tb.tb_next
    return False


def _abandoned_task_record(record: logging.LogRecord) -> bool:
    """The ``asyncio`` logger's filter: False (dropped) for "Task exception was never retrieved" of a task of orbax
    or tensorstore (its coroutine defined there, or its exception raised there)."""
    if "exception was never retrieved" not in record.getMessage():
        return True
    exc = record.exc_info[1] if record.exc_info else None
    from_orbax = any(_orbax_file(w) for w in re.findall(r"defined at ([^>]*?):\d+>", record.getMessage())) or \
        (exc is not None and _from_orbax(exc.__traceback__))
    return not from_orbax


def _steps(slot_dir: Path) -> list[Path]:
    return sorted((c for c in slot_dir.iterdir() if c.name.isdigit() and c.is_dir()), key=lambda c: int(c.name))


def resolve_params_dir(path: str | Path) -> Path:
    """Finds the step folder holding ``params`` from a run dir, a slot dir or a step dir.

    Accepted: ``<run>`` (uses ``ckpt/best``, else its one ``ckpt/best_<split>``, else ``ckpt/latest``: the first
    that holds a step; a run with several ``best_<split>`` slots must name one), ``<run>/ckpt/<slot>``, a manager
    folder (its newest step), or a step folder that contains ``params/``. A newest step without ``params/`` is an
    error (never silently an older step or another slot).
    """
    p = Path(path).absolute()
    if not p.exists():
        raise JaxprvrError(p, "a checkpoint folder", "nothing at that path")
    if (p / "params").is_dir():
        return p
    if any((p / item).is_dir() for item in ITEMS):
        raise JaxprvrError(p, "a params/ item in the checkpoint", "none (the step folder is incomplete)")
    bests = sorted(c for c in (p / "ckpt").glob("best_*") if c.is_dir()) if (p / "ckpt").is_dir() else []
    if not (p / "ckpt" / "best").is_dir() and len(bests) > 1:  # one best per selection split: say which
        raise JaxprvrError(p, "one checkpoint slot (the run keeps a best per selection split)",
                           f"{[c.name for c in bests]}", hint=f"pass {p}/ckpt/<slot>")
    for cand in (p / "ckpt" / "best", *bests, p / "ckpt" / "latest", p):
        steps = _steps(cand) if cand.is_dir() else []
        if steps:
            if not (steps[-1] / "params").is_dir():
                older = [s for s in steps[:-1] if (s / "params").is_dir()]
                raise JaxprvrError(steps[-1], "a params/ item in the newest checkpoint",
                                   "none (the step folder is incomplete)",
                                   hint=f"pass --ckpt {older[-1]} for the step before" if older else None)
            return steps[-1]
    raise JaxprvrError(p, "a run folder, a checkpoint slot folder or a step folder with params/", "none of these")


def read_meta(path: str | Path) -> dict:
    """The JSON meta (config, epoch, ...) saved with a checkpoint; ``{}`` when there is none."""
    meta_file = resolve_params_dir(path) / "meta" / "metadata"
    if not meta_file.exists():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise unreadable(meta_file, "the checkpoint's JSON meta (config, epoch, ...)", e) from None
    if not isinstance(meta, dict):
        raise JaxprvrError(meta_file, "the checkpoint's JSON meta (an object)", type(meta).__name__)
    return meta


def check_saved_model(path: str | Path, model: str | None, expected: str | None = None, hint: str | None = None, *,
                      unreadable_ok: bool = False) -> dict:
    """The meta of the checkpoint at ``path`` (:func:`read_meta`); one whose saved config names a model other than
    ``model`` raises one :class:`JaxprvrError` at ``path``: ``expected`` (default "a checkpoint of model <model>"),
    found "one of <saved>", ``hint`` (``{saved}`` in it: the saved model's name). No check for ``model=None`` or a
    meta without a model name (nothing says which model wrote it: the parameter tree is checked when read). ``unreadable_ok``: a meta (or a step folder) that
    cannot be read gives ``{}`` instead of its error, for a caller whose next read names the failure better
    (``--resume`` names the last readable step)."""
    try:
        meta = read_meta(path)
    except JaxprvrError:
        if unreadable_ok:
            return {}
        raise
    cfg = meta.get("config")
    section = cfg.get("model") if isinstance(cfg, dict) else None
    name = section.get("name") if isinstance(section, dict) else None
    if model is not None and name is not None and name != model:
        raise JaxprvrError(path, expected or f"a checkpoint of model {model}", f"one of {name}",
                           hint=hint.replace("{saved}", str(name)) if hint else None)
    return meta


class _Mismatch(JaxprvrError):
    """A checkpoint read whole whose arrays are not the configured model's."""


def _checked(where, restored, abstract, what: str):
    """``restored`` when every leaf has the shape of ``abstract``'s (orbax restores the saved arrays whatever the
    target's shapes: a config whose widths differ from the checkpoint's would load silently), else one error naming
    the first differing array."""
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(restored)}
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise _Mismatch(where, what, f"other arrays (missing {missing[:2]}, extra {extra[:2]})",
                        hint="was it written for another model or config?")
    bad = [k for k in want if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if bad:
        k = bad[0]
        raise _Mismatch(where, f"{what}: {k} of shape {tuple(want[k].shape)}", f"shape {tuple(np.shape(got[k]))}"
                        + (f" (and {len(bad) - 1} more arrays of other shapes)" if len(bad) > 1 else ""),
                        hint="the config's sizes differ from the checkpoint's: match them with --set")
    return restored


def load_params(path: str | Path, abstract_params):
    """Restores only the parameters (and the JSON meta if present) from any accepted checkpoint path."""
    step_dir = resolve_params_dir(path)
    meta = read_meta(step_dir)
    _quiet_abandoned_reads()
    try:
        params = ocp.StandardCheckpointer().restore(step_dir / "params", abstract_params)
    except Exception as e:  # noqa: BLE001 - any failed read (orbax and tensorstore raise many types)
        raise unreadable(step_dir / "params", "parameters matching the model config", e) from None
    return _checked(step_dir / "params", params, abstract_params, "parameters matching the model config"), meta


def load_model_state(path: str | Path, abstract_model_state):
    """The non-trainable variables (``{"batch_stats": ...}``) of a checkpoint of a model that has them."""
    step_dir = resolve_params_dir(path)
    if not (step_dir / "model_state").is_dir():
        raise JaxprvrError(step_dir, "a model_state/ item (the model's BatchNorm statistics)", "none",
                           hint="a checkpoint of this model saves it; was it written for another model?")
    _quiet_abandoned_reads()
    try:
        state = ocp.StandardCheckpointer().restore(step_dir / "model_state", abstract_model_state)
    except Exception as e:  # noqa: BLE001
        raise unreadable(step_dir / "model_state", "variables matching the model config", e) from None
    return _checked(step_dir / "model_state", state, abstract_model_state, "variables matching the model config")


def load_ema_params(path: str | Path, abstract_params):
    """The EMA weights (MTM ``train.use_ema``) of a checkpoint: the ``shadow`` of its ``opt_state``."""
    import jax.numpy as jnp

    from jaxprvr.optim import BertAdamState, EmaState

    step_dir = resolve_params_dir(path)
    abstract = EmaState(inner=BertAdamState(count=jax.ShapeDtypeStruct((), jnp.int32), m=abstract_params,
                                            v=abstract_params), shadow=abstract_params)
    _quiet_abandoned_reads()
    try:
        opt_state = ocp.StandardCheckpointer().restore(step_dir / "opt_state", abstract)
    except Exception as e:  # noqa: BLE001
        err = unreadable(step_dir / "opt_state", "a BertAdam state with EMA weights (train.use_ema)", e)
        raise JaxprvrError(err.where, err.expected, err.found,
                           hint="pass --no-ema to evaluate the raw weights") from None
    return _checked(step_dir / "opt_state", opt_state, abstract, "a BertAdam state with EMA weights matching the model "
                    "config").shadow


def abstract_tree(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

