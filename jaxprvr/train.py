"""Train a model with its official recipe, then evaluate the best checkpoint on test: the generic loop.

    python -m jaxprvr.train --config tvr --demo                 # built-in synthetic data, a short run
    python -m jaxprvr.train --config tvr --data-root $ROOT      # the official TVR recipe (MTM)
    python -m jaxprvr.train --config act --model ms_sl --data-root $ROOT --set train.n_epoch=50
    python -m jaxprvr.train --list                              # configs x models

The loop knows the state (parameters, optimizer state with the optional EMA, step), exact resume,
multi-host batch slices, checkpoints, the progress bar and ``metrics.jsonl``; everything a task decides
(datasets, batches, loss, optimizer recipe, evaluation and the selection metric) comes from the task of the
model's registry row (:mod:`jaxprvr.tasks`). Per epoch: the task's batches, validation, the ``best``
checkpoint when the selection metric improves, early stopping after ``max_es_cnt`` epochs without improvement.
Outputs in ``--out``: ``config.json``, ``metrics.jsonl`` (one JSON object per log step and per evaluation),
``ckpt/{latest,best}``, ``test_results.json``. ``--resume`` continues exactly where the latest checkpoint
stopped (same data order, same dropout and sampling keys).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprvr import sharding as shd
from jaxprvr.cli import add_compile_cache_args, enable_compile_cache, jsonable, run_cli
from jaxprvr.errors import JaxprvrError
from jaxprvr.logs import log_file, third_party_output_to
from jaxprvr.tasks import task_for

# ----------------------------------------------------------------------------------------------
# Setup helpers (shared with evaluate, parity and the tests); each asks the config's task
# ----------------------------------------------------------------------------------------------


def resolve_data_root(cfg, data_root, demo: bool) -> Path:
    if demo:
        return task_for(cfg).demo_root(cfg)
    if data_root is None:
        raise JaxprvrError("--data-root", "a folder holding the dataset (docs/data.md), or --demo", "no --data-root given")
    return Path(data_root)


def config_with_data_dims(cfg, ds):
    """``cfg`` with the dimensions the data on disk fixes (PRVR: the visual width of shape.txt)."""
    return task_for(cfg).with_data_dims(cfg, ds)


def dummy_batch(cfg) -> dict:
    return task_for(cfg).dummy_batch(cfg)


# The variable collections a model may keep beside its parameters, updated by the train step and saved
# with the checkpoints (BatchNorm's running statistics); every other collection is transient.
MODEL_STATE_COLLECTIONS = ("batch_stats",)


def init_variables(model, cfg, key):
    """``(params, model_state)``: the parameters and the non-trainable collections of
    :data:`MODEL_STATE_COLLECTIONS` (``{}`` for a model without any, e.g. the PRVR families)."""
    variables = model.init({"params": key}, dummy_batch(cfg), train=False)
    return variables["params"], {k: variables[k] for k in MODEL_STATE_COLLECTIONS if k in variables}


def init_params(model, cfg, key):
    return init_variables(model, cfg, key)[0]


def make_optimizer(cfg, params, steps_per_epoch: int):
    """The task's optimizer recipe over ``n_epoch x steps_per_epoch`` steps."""
    return task_for(cfg).optimizer(cfg, params, steps_per_epoch)


def make_train_step(model, cfg, tx, mesh, steps_per_epoch: int):
    """``step(state, batch, keys) -> (state, metrics)``: the task's loss and one optimizer update, jitted, on a
    sharded batch; the state is donated and stays replicated. ``keys``: :func:`train_keys`. A state holding
    ``"model_state"`` (BatchNorm statistics) gets it back as the loss updated it; the parameters' gradient
    never flows through it."""
    loss_fn = task_for(cfg).loss(model, cfg, steps_per_epoch)

    def step(state, batch, keys):
        # Keys are functions of (seed, global step) only, so a resumed run draws the same dropout masks
        # and samples. Dropout masks are counter hashes of the dropout key (jaxprvr.ops.dropout); the key is
        # an "rbg" one, whose per-layer fold-ins compile faster than threefry's.
        k_drop, k_sample = (jax.random.fold_in(k, state["step"]) for k in keys)
        rngs = {"dropout": k_drop, "sample": k_sample}
        model_state = state.get("model_state", {})
        (loss, (terms, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, rngs, state["step"], model_state)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if "model_state" in state:
            new_state["model_state"] = jax.lax.stop_gradient(model_state)
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **terms}  # norm before clipping

    rep = shd.replicated(mesh)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(rep, rep))


def train_keys(seed: int):
    """The root keys of the train step: (dropout key, sampling key)."""
    return jax.random.key(seed, impl="rbg"), jax.random.fold_in(jax.random.key(seed), 1)


class MetricWriter:
    """JSON lines on process 0; with ``tensorboard`` (a folder), the same numbers as TensorBoard scalars
    (:mod:`jaxprvr.tensorboard`: tags ``train/loss``, ``val/sumr``, ...) at the record's ``step``, else at
    ``current_step()`` (an evaluation's record)."""

    def __init__(self, path: Path, tensorboard=None, current_step=lambda: 0):
        self.path = path
        self.enabled = jax.process_index() == 0
        self.current_step = current_step
        self.tb = None
        if self.enabled and tensorboard is not None:
            from jaxprvr.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard)

    def write(self, record: dict) -> None:
        if self.enabled:
            record = jsonable(record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb is not None:
                from jaxprvr.tensorboard import scalars_of

                self.tb.scalars(record["step"] if "step" in record else self.current_step(), scalars_of(record))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# The training run
# ----------------------------------------------------------------------------------------------


class _Run:
    """One training run: its data, state, checkpoints and progress (``meta``, saved with every checkpoint)."""

    def __init__(self, cfg, data_root, out_dir, *, resume, progress, mesh, init_from, batch_slices, tensorboard=None):
        from jaxprvr.checkpoint import Checkpoints

        self.task = task_for(cfg)
        self.root, self.out = data_root, Path(out_dir)
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self.progress = progress and jax.process_index() == 0
        self.t_start = time.perf_counter()
        self.train_ds = self.task.open_split(cfg, data_root, "train")
        self.sel_splits = self.task.selection_splits(cfg)
        self.val_ds = {s: self.task.open_split(cfg, data_root, s) for s in self.sel_splits}
        self.cfg = cfg = self.task.with_data_dims(cfg, self.train_ds)
        n_slices = jax.process_count() if batch_slices is None else batch_slices
        self.plan = self.task.train_plan(cfg, self.train_ds, mesh=self.mesh, n_slices=n_slices)
        self.metric = self.task.selection_key(cfg)
        self.slots = {s: self.task.best_slot(cfg, s) for s in self.sel_splits}
        # meta keys of the best values: "best_<metric>" for the single "best" slot, else one per split
        self.best_keys = {s: f"best_{self.metric}" if slot == "best" else f"best_{self.metric}@{s}"
                          for s, slot in self.slots.items()}
        slots = ["latest", *self.slots.values(), *(sl for _, sl in self.task.test_plan(cfg))]
        # latest keeps two steps: when the newest cannot be read, --resume names the one before
        self.ckpts = Checkpoints(self.out / "ckpt", slots=tuple(dict.fromkeys(slots)), keep={"latest": 2},
                                 cleanup_tmp=resume)
        self.resumed = resume and self.ckpts.latest_step("latest") is not None
        if self.ckpts.latest_step("latest") is not None and not resume:
            raise JaxprvrError(self.out, "an output folder without checkpoints (or --resume)", "an existing run",
                               hint="pass --resume to continue it, or --out for a new run")
        self.out.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.writer = MetricWriter(self.out / "metrics.jsonl", tensorboard, current_step=lambda: self.global_step)
        self._init_state(init_from)
        self.train_step = make_train_step(self.model, cfg, self.tx, self.mesh, self.plan.steps_per_epoch)
        self.evaluator = self.task.evaluator(self.model, cfg, self.mesh)
        self.step_keys = train_keys(cfg.train.seed)
        self.lr_at = self.task.lr_at(cfg, self.plan.steps_per_epoch)

    def _init_state(self, init_from) -> None:
        """Fresh parameters (or ``init_from``'s) and optimizer state, or the ``latest`` checkpoint's on resume."""
        from jaxprvr.checkpoint import abstract_tree
        from jaxprvr.models import build_model

        cfg, mesh = self.cfg, self.mesh
        self.model = build_model(cfg.model)
        key = jax.random.PRNGKey(cfg.train.seed)
        params, model_state = jax.jit(lambda k: init_variables(self.model, cfg, k),
                                      out_shardings=shd.replicated(mesh))(key)
        if init_from is not None and not self.resumed:
            params, model_state = _init_from(init_from, cfg, abstract_tree(params), abstract_tree(model_state), mesh)
        elif not self.resumed:
            params = shd.replicate(self.task.initial_params(cfg, params), mesh)
        self.tx = self.task.optimizer(cfg, params, self.plan.steps_per_epoch)
        state = {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}
        if model_state:
            state["model_state"] = model_state
        self.state = shd.replicate(state, mesh)
        # Room for the checkpoints this run keeps (latest's two steps, each best slot's one) and the one being written
        # (orbax deletes the step it replaces only after the new one is finalised), less what the run's step folders
        # already hold (--resume), before the first is written: a full disk fails here, in one line, not in orbax's
        # writer hours later.
        size = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(self.state))
        n, have = self.ckpts.copies, self.ckpts.bytes_on_disk()
        check_out_dir(self.out, max(size, (n + 1) * size - have),
                      f"{n + 1} checkpoints of {_mb(size)}: {n} kept, 1 being written"
                      + (f"; less {_mb(have)} already saved" if have else ""))
        self.meta = {"next_epoch": 0, "step_in_epoch": 0, "es_cnt": 0, **{k: None for k in self.best_keys.values()},
                     "best_epoch": -1, "stopped": False}
        if self.resumed:
            self._check_resumed_model()
            p, o, meta = self.ckpts.restore("latest", abstract_tree(self.state["params"]),
                                            abstract_tree(self.state["opt_state"]))
            state = {"params": p, "opt_state": o, "step": jnp.asarray(meta["global_step"], jnp.int32)}
            if model_state:
                state["model_state"] = self.ckpts.restore_model_state("latest", abstract_tree(model_state))
            self.state = shd.replicate(state, mesh)
            self.meta.update({k: meta[k] for k in self.meta if k in meta})
        else:
            self.save("latest")  # from here on, a kill at any moment leaves a checkpoint to --resume from

    def _check_resumed_model(self) -> None:
        """Another model's ``latest``: one line naming both. An unreadable step is left to the restore that follows
        (it names the slot's last readable step)."""
        from jaxprvr.checkpoint import check_saved_model

        step_dir = self.ckpts.directory / "latest" / str(self.ckpts.latest_step("latest"))
        check_saved_model(step_dir, self.cfg.model.name, f"a checkpoint of model {self.cfg.model.name} to --resume",
                          hint="pass --model {saved} to continue that run, or --out for a new run", unreadable_ok=True)

    @property
    def global_step(self) -> int:
        return int(self.state["step"])

    def save(self, slot: str, **extra) -> None:
        if self.ckpts.latest_step(slot) == self.global_step:
            return  # nothing trained since this slot was written (e.g. --max-steps reached at once)
        meta = dict(self.meta, global_step=self.global_step, config=self.cfg.to_dict(), **extra)
        self.ckpts.save(slot, self.global_step, self.state["params"], self.state["opt_state"], meta,
                        model_state=self.state.get("model_state"))

    def fit(self, max_steps: int | None) -> bool:
        """Epochs until ``n_epoch``, early stopping or ``max_steps``; returns whether ``max_steps`` stopped it."""
        m = self.meta
        while not m["stopped"] and m["next_epoch"] < self.cfg.train.n_epoch:
            if not self.run_epoch(m["next_epoch"], max_steps):
                self.save("latest")
                return True
            epoch = m["next_epoch"]
            if self.task.validates_after(self.cfg, epoch):
                self.validate(epoch)
            else:  # not an evaluation epoch (e.g. MRNet's TEST_PERIOD): the epoch ends with a checkpoint only
                m.update(next_epoch=epoch + 1, step_in_epoch=0)
                self.save("latest")
        return False

    def run_epoch(self, epoch: int, max_steps: int | None) -> bool:
        """The remaining steps of ``epoch``; False when ``max_steps`` was reached first."""
        tc, spe = self.cfg.train, self.plan.steps_per_epoch
        first = self.meta["step_in_epoch"]  # > 0 when resuming inside an epoch
        bar = _progress(self.progress, spe, f"epoch {epoch}", initial=first)
        seen, t_last = {}, time.perf_counter()
        extra = self.task.log_fields(self.cfg, epoch)
        try:
            for i, batch in enumerate(self.plan.batches(epoch, first), start=first):
                if max_steps is not None and self.global_step >= max_steps:
                    return False
                dev_batch = shd.shard_local_batch({k: batch[k] for k in self.task.batch_keys if k in batch},
                                                  self.mesh)
                self.state, metrics = self.train_step(self.state, dev_batch, self.step_keys)
                self.meta["step_in_epoch"] = i + 1
                for k, n in self.plan.counts(batch).items():
                    seen[k] = seen.get(k, 0) + n
                gstep = self.global_step
                if gstep % tc.log_every == 0 or i + 1 == spe:
                    self._log_step(gstep, epoch, extra, metrics, seen, time.perf_counter() - t_last, bar)
                    seen, t_last = {}, time.perf_counter()
                if bar is not None:
                    bar.update(1)
                if tc.ckpt_every_steps and gstep % tc.ckpt_every_steps == 0 and i + 1 < spe:
                    self.save("latest")
        finally:
            if bar is not None:
                bar.close()
        return True

    def _log_step(self, gstep, epoch, extra, metrics, seen, dt, bar) -> None:
        metrics = jax.device_get(metrics)
        lr = self.lr_at(gstep - 1)
        rec = {"step": gstep, "epoch": epoch, "lr": lr,
               **{k: lr * s for k, s in self.task.lr_group_scales(self.cfg).items()}, **extra,
               **{f"{k}_per_s": n / dt for k, n in seen.items()}, **metrics}
        self.writer.write(rec)
        if not np.isfinite(rec["loss"]):
            raise JaxprvrError(f"step {gstep}", "a finite loss", str(rec["loss"]),
                               hint="the latest checkpoint is the last good state")
        if bar is not None:
            bar.set_postfix(loss=f"{float(rec['loss']):.4f}")

    def eval_params(self):
        from jaxprvr.optim import eval_params

        return eval_params(self.state["params"], self.state["opt_state"], self.cfg.train.use_ema)

    def _evaluate(self, params, ds, model_state):
        kw = {"model_state": model_state} if model_state else {}
        return self.evaluator.evaluate(params, ds, progress=self.progress, **kw)

    def validate(self, epoch: int) -> None:
        """Validation, the best checkpoint(s) and early stopping (official ``main.py``: ``es_cnt > max_es_cnt``; with
        several selection splits, one counter over all of them, reset by any improvement, as MESM's ``train.py``)."""
        m, tc, metric = self.meta, self.cfg.train, self.metric
        params = self.eval_params()
        for split in self.sel_splits:
            val = self._evaluate(params, self.val_ds[split], self.state.get("model_state"))
            key, slot = self.best_keys[split], self.slots[split]
            improved = self.task.better(val[metric], m[key])
            if improved:
                m.update({key: val[metric], "best_epoch": epoch, "es_cnt": 0})
            else:
                m["es_cnt"] += 1
                if tc.max_es_cnt != -1 and m["es_cnt"] > tc.max_es_cnt:
                    m["stopped"] = True
            where = {} if slot == "best" else {"eval_split": split}
            self.writer.write({"epoch": epoch, "split": "val", **where, "improved": improved, **_flat(val)})
            name = "val" if slot == "best" else split
            _log(self.progress, f"epoch {epoch} {name} {self.task.format_metrics(val)}" + (" (best)" if improved else ""))
            if improved:
                self.save(slot, val=_flat(val))
        m.update(next_epoch=epoch + 1, step_in_epoch=0)
        self.save("latest")

    def summary(self) -> dict:
        m = self.meta
        return {"out": str(self.out), "model": self.cfg.model.name, "dataset": self.cfg.data.dataset,
                "steps": self.global_step, "epochs_done": m["next_epoch"], "best_epoch": m["best_epoch"],
                **{f"best_val_{self.metric}" + ("" if self.slots[s] == "best" else f"@{s}"): m[k]
                   for s, k in self.best_keys.items()},
                "train_seconds": round(time.perf_counter() - self.t_start, 1)}

    def test(self) -> dict:
        """The task's test plan (default: the test split on the ``best`` checkpoint; ``latest`` when a slot was never
        written), EMA weights with ``train.use_ema``. Several test splits: ``{split: metrics}`` in
        ``test_results.json``, the first one returned."""
        results = {}
        for split, slot in self.task.test_plan(self.cfg):
            results[split] = self._test_split(split, slot)
        if jax.process_index() == 0:
            only = next(iter(results.values())) if len(results) == 1 else results
            (self.out / "test_results.json").write_text(json.dumps(jsonable(only), indent=2))
        self.tests = results
        return next(iter(results.values()))

    def _test_split(self, split: str, slot: str) -> dict:
        from jaxprvr.checkpoint import abstract_tree
        from jaxprvr.optim import eval_params

        test_ds = self.task.open_split(self.cfg, self.root, split)
        slot = slot if self.ckpts.latest_step(slot) is not None else "latest"
        abstract = abstract_tree(self.state["params"])
        if self.cfg.train.use_ema:  # the EMA weights live in the optimizer state
            p, o, _ = self.ckpts.restore(slot, abstract, abstract_tree(self.state["opt_state"]))
            params = eval_params(p, o, True)
        else:
            params, _, _ = self.ckpts.restore(slot, abstract)
        model_state = self.state.get("model_state")
        if model_state:
            model_state = shd.replicate(self.ckpts.restore_model_state(slot, abstract_tree(model_state)), self.mesh)
        test = self._evaluate(shd.replicate(params, self.mesh), test_ds, model_state)
        test.update(split=split, checkpoint=slot, **self.task.test_fields(test_ds))
        self.writer.write({"split": "test", **({} if split == "test" else {"eval_split": split}), **_flat(test)})
        return test


def train(cfg, data_root, out_dir, *, resume: bool = False, progress: bool = True, max_steps: int | None = None,
          mesh=None, run_test: bool = True, init_from: str | None = None, batch_slices: int | None = None,
          tensorboard=None) -> dict:
    """Trains and returns a summary dict. ``max_steps`` stops early (saving ``latest``), as a kill would.
    ``init_from`` (any checkpoint path :func:`jaxprvr.checkpoint.load_params` accepts, e.g. the output of
    ``python -m parity.convert torch2jax``) starts from those parameters with a fresh optimizer (fine-tuning).
    ``batch_slices`` (default: the process count) cuts every batch into that many slices, each process
    building its own (:mod:`jaxprvr.distributed`); one process with ``batch_slices=S`` reproduces the batches
    of an ``S``-process run. With 1 (one process), the batches are the task's plain ones. ``tensorboard`` (a folder)
    also writes the numbers of ``metrics.jsonl`` there as TensorBoard event files."""
    from jaxprvr.distributed import exit_on_lost_peer

    with exit_on_lost_peer():  # several processes: one that dies ends the others at once (no waits, no hang)
        run = _Run(cfg, data_root, out_dir, resume=resume, progress=progress, mesh=mesh, init_from=init_from,
                   batch_slices=batch_slices, tensorboard=tensorboard)
    try:
        with exit_on_lost_peer():
            stopped_by_max_steps = run.fit(max_steps)
            summary = run.summary()
            if not (stopped_by_max_steps or not run_test):
                summary["test"] = run.test()
                if len(run.tests) > 1:
                    summary["tests"] = run.tests
    finally:
        run.ckpts.close()
        run.writer.close()
    return summary


def _init_from(path, cfg, abstract, abstract_model_state, mesh):
    from jaxprvr.checkpoint import check_saved_model, load_model_state, load_params

    check_saved_model(path, cfg.model.name, hint="pass the matching --model")
    params, _ = load_params(path, abstract)
    model_state = load_model_state(path, abstract_model_state) if abstract_model_state else {}
    return shd.replicate(params, mesh), shd.replicate(model_state, mesh)


def _flat(res: dict) -> dict:
    return {k: v for k, v in res.items() if not k.startswith("_")}


def _progress(enabled, total, desc, initial=0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr,
                leave=False)


def _log(enabled, text):
    if enabled:
        print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------

# The least free space a run starts with (config.json, metrics.jsonl, logs, small checkpoints); once the training
# state exists, the run also checks for room for the checkpoints it keeps (latest: 2, each best slot: 1) and the one
# being written, less those already saved.
MIN_FREE_BYTES = 100 * 2**20


def check_out_dir(out: Path, need_bytes: int = MIN_FREE_BYTES, why: str = "") -> None:
    """``out`` can hold the run (its nearest existing folder takes a file, with ``need_bytes`` free), else one
    :class:`JaxprvrError` naming it. Checked with ``os.access``, then by writing, syncing and deleting a probe file
    (root passes ``os.access`` on a read-only mount), then ``shutil.disk_usage``; nothing is created, so a run
    that fails later for another reason leaves no empty folder. ``why``: what the space is for."""
    import os
    import shutil

    need = max(need_bytes, MIN_FREE_BYTES)
    expected = f"a writable folder with at least {_mb(need)} free{f' ({why})' if why else ''}"
    base = Path(os.path.abspath(out))
    while not base.exists() and base != base.parent:
        base = base.parent
    at = "" if base == Path(os.path.abspath(out)) else f" ({base})"
    if not base.is_dir():
        raise JaxprvrError(out, expected, f"a path under the file {base}", hint="pass --out DIR")
    if not os.access(base, os.W_OK | os.X_OK):
        raise JaxprvrError(out, expected, f"a folder without write permission{at}", hint="pass --out DIR")
    probe = base / f".jaxprvr-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise JaxprvrError(out, expected, f"a folder where a write fails{at}: {e.strerror or e}",
                           hint="pass --out DIR") from None
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(base).free
    if free < need:
        raise JaxprvrError(out, expected, f"{_mb(free)} free{at}", hint="free some space or pass --out DIR")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MB"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from jaxprvr import distributed, registry
    from jaxprvr.config import all_datasets

    labels = ", ".join(f.label for f in registry.FAMILIES.values())
    p = argparse.ArgumentParser(
        prog="python -m jaxprvr.train",
        description=f"Train a model ({labels}) with its official recipe; prints a JSON summary with the test "
                    "metrics of the best checkpoint.")
    p.add_argument("--config", help=f"dataset ({'|'.join(all_datasets())}: its default model) or <model>/<dataset>")
    p.add_argument("--list", action="store_true", help="print the table of configs x models and exit")
    p.add_argument("--markdown", action="store_true",
                   help="with --list: print the models page instead (one table per task: parameters, official "
                        "numbers, official checkpoint, parity; docs/models.md)")
    p.add_argument("--model", default=None, help=f"{' | '.join(registry.names())} (default: the config's)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-root", default=None, help="the dataset folder (docs/data.md; PRVR: the folder holding "
                                                       "<collection>/TextData and <collection>/FeatureData)")
    src.add_argument("--demo", action="store_true",
                     help="create (once) and use a synthetic dataset with a planted signal; a short run")
    p.add_argument("--out", default=None, help="output folder (default: runs/<model>-<dataset>[-demo-<time>])")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt/latest")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from the parameters of this checkpoint (e.g. one made by parity.convert), "
                        "with a fresh optimizer: fine-tuning")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.n_epoch=1 (repeatable)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many global steps (saves latest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines on stderr")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also write the numbers of metrics.jsonl as TensorBoard event files into DIR "
                        "(default: <out>/tensorboard); no TensorFlow needed")
    distributed.add_args(p, "run the same command in every process, with the same coordinator and process count "
                         "and a distinct --process-id; each process reads only its slice of every batch, all share "
                         "--out (process 0 writes the metrics and results); after a process dies, start them all "
                         "again with --resume. Unset: a single-process run.")
    add_compile_cache_args(p)
    return p


def run(args) -> dict:
    from jaxprvr import distributed, registry
    from jaxprvr.config import config_table, format_config_table, load_config

    if args.list:
        print(format_config_table())
        return {"configs": config_table()}
    if args.config is None:
        raise JaxprvrError("--config", "a dataset or <model>/<dataset> (--list shows them)", "no --config given")
    enable_compile_cache(args)
    # Before any JAX computation. A no-op for a single-process run.
    multi = distributed.initialize_from_args(args)
    overrides = list(args.overrides)
    if args.demo:
        name = load_config(args.config, args.model).model.name
        overrides = registry.get(name).demo_overrides() + overrides
    cfg = load_config(args.config, args.model, overrides)
    out = args.out
    if out is None:
        out = f"runs/{cfg.model.name}-{cfg.data.dataset}"
        if args.demo and not args.resume and not multi:  # (processes would not agree on the time)
            out += "-demo-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out)
    check_out_dir(out)  # a read-only --out or a full disk fails here, before any data is read or anything compiles
    tensorboard = None if args.tensorboard is None else Path(args.tensorboard or out / "tensorboard")
    header = f"jaxprvr.train {cfg.model.name}/{cfg.data.dataset} --out {out}"
    with third_party_output_to(log_file(out, "log", args.process_id), header=header):
        root = resolve_data_root(cfg, args.data_root, args.demo)
        summary = train(cfg, root, out, resume=args.resume, progress=not args.no_progress, max_steps=args.max_steps,
                        init_from=args.init_from, tensorboard=tensorboard)
    distributed.shutdown()  # waits for the other processes (after a failure, the process just exits)
    if args.demo:  # the plots of the run (docs/report.md): its evaluation artefacts, then the report
        summary["report_command"] = (
            f"python -m jaxprvr.evaluate --config {args.config} --model {cfg.model.name} --demo --ckpt {out} "
            f"--save-outputs {out}/eval --no-progress && python -m jaxprvr.report {out} --out {out}/report --demo")
    return summary


def _report(summary: dict) -> None:
    test = summary.get("test")
    if test is not None:
        from jaxprvr import registry

        print(registry.get(summary["model"]).task_instance().test_line(test), file=sys.stderr)
    if summary.get("report_command"):
        print(f"plots of this run: {summary['report_command']}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.markdown:  # the page alone on stdout (docs/models.md is this output), no JSON after it
        if not args.list:
            parser.error("--markdown goes with --list")
        from jaxprvr.modelcard import models_page

        print(models_page(), end="")
        return 0
    return run_cli(parser, run, args=args, report=_report,
                   interrupted="interrupted: the latest checkpoint is intact; continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
