"""The task interface: what the generic trainer (:mod:`jaxprvr.train`) and evaluator CLI (:mod:`jaxprvr.evaluate`)
ask of a task, in the spirit of scenic's ``BaseModel`` (model, loss and metrics per project).

A task knows its datasets on disk, its batches, its losses, its optimizer recipe and its evaluation protocol;
the generic loop knows the state (parameters, optimizer state with an optional EMA, step), exact resume,
multi-host batch slices, checkpoints, the progress bar and ``metrics.jsonl``, and nothing of a model family.

Conventions every task keeps:

* a model is called as ``model.apply({"params": p}, batch, train=..., rngs={"dropout": k})`` on a dict
  batch holding :attr:`Task.batch_keys` and returns ``(outputs, aux)``;
* the loss is ``loss(params, batch, rngs, step, model_state) -> (loss, (named terms, new model_state))``,
  ``model_state`` holding the model's non-trainable collections (``{"batch_stats": ...}``; ``{}`` for a model
  without BatchNorm), a pure function of the traced global ``step`` and of two PRNG streams, ``rngs["dropout"]`` and ``rngs["sample"]`` (both functions of the
  seed and of the step only, so a resumed run draws what an uninterrupted one draws);
* the evaluator returns a flat metrics dict (``"_"``-prefixed keys are artefacts, kept out of the logs)
  holding :attr:`Task.selection_metric`, which selects the ``best`` checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """One training split's epochs: ``steps_per_epoch`` batches, each of the same shapes."""

    steps_per_epoch: int
    batches: Callable[[int, int], Iterator[dict]]  # (epoch, first step in the epoch) -> this process's batches
    counts: Callable[[dict], dict[str, int]]  # the items a batch holds globally, e.g. {"videos": 16}: throughput logs


class Task:
    """Base class of the tasks; a task module exposes one instance as ``TASK``."""

    name: str = ""
    splits: tuple[str, ...] = ("train", "val", "test")
    batch_keys: tuple[str, ...] = ()  # the arrays of a training batch the model and the loss read
    selection_metric: str = ""  # the validation metric that selects the best checkpoint
    selection_mode: str = "max"  # "max" or "min"
    demo_overrides: dict[str, str] = {}  # what --demo changes on top of a config (the family adds its own)
    api_class: str = ""  # "module:Class" of its jaxprvr.load object (jaxprvr.api_tasks); "" gives a plain Loaded

    # -- data
    def demo_root(self, cfg) -> Path:
        """A built-in demo dataset for ``cfg.data.dataset`` (created on first use): its ``--data-root``."""
        raise NotImplementedError

    def open_split(self, cfg, root, split: str):
        raise NotImplementedError

    def validation_split(self, cfg) -> str:
        """The split evaluated after each epoch to select ``best`` (and to stop early)."""
        return "val"

    # Data fields a checkpoint's config fixes for evaluation (they shape the model's input): jaxprvr.evaluate takes
    # them from the checkpoint, as it takes its model section.
    checkpoint_data_fields: tuple[str, ...] = ()
    # Checkpoint slots "best_<split>" (one per selection split) instead of the single "best".
    best_per_split: bool = False

    def selection_splits(self, cfg) -> tuple[str, ...]:
        """The splits evaluated after each epoch, in order; with several (or :attr:`best_per_split`) each keeps its
        own best checkpoint (:meth:`best_slot`) and one early-stopping counter runs over all of them."""
        return (self.validation_split(cfg),)

    def selection_key(self, cfg) -> str:
        """The metric of the evaluator's dict that selects the best checkpoint (default :attr:`selection_metric`)."""
        return self.selection_metric

    def best_slot(self, cfg, split: str) -> str:
        return f"best_{split}" if self.best_per_split or len(self.selection_splits(cfg)) > 1 else "best"

    def test_plan(self, cfg) -> list[tuple[str, str]]:
        """``(split, checkpoint slot)`` pairs evaluated after training (default: test on the best checkpoint)."""
        return [("test", self.best_slot(cfg, self.selection_splits(cfg)[0]))]

    def validates_after(self, cfg, epoch: int) -> bool:
        """Whether the trainer evaluates the validation split after (0-based) ``epoch`` (default: every epoch)."""
        return True

    def with_data_dims(self, cfg, ds):
        """``cfg`` with the dimensions the data on disk fixes (e.g. the visual feature width)."""
        return cfg

    def initial_params(self, cfg, params):
        """The parameters a fresh run starts from, given the random init (e.g. pretrained weights loaded into a
        part of the model); not called on ``--resume`` or ``--init-from``."""
        return params

    def dummy_batch(self, cfg) -> dict:
        """A small batch of the static layout, for ``model.init``."""
        raise NotImplementedError

    def train_plan(self, cfg, ds, *, mesh, n_slices: int) -> TrainPlan:
        raise NotImplementedError

    # -- optimisation
    def loss(self, model, cfg, steps_per_epoch: int) -> Callable[[Any, dict, dict, Any], tuple[Any, dict]]:
        raise NotImplementedError

    def optimizer(self, cfg, params, steps_per_epoch: int):
        raise NotImplementedError

    def lr_at(self, cfg, steps_per_epoch: int) -> Callable[[int], float]:
        """The learning rate of global step ``step`` (for the logs)."""
        raise NotImplementedError

    def lr_group_scales(self, cfg) -> dict[str, float]:
        """Named learning-rate groups as multiples of :meth:`lr_at` (logged per step as ``name = lr * scale``)."""
        return {}

    def log_fields(self, cfg, epoch: int) -> dict:
        """Extra fields of the per-step log records of ``epoch`` (e.g. a phase of the recipe)."""
        return {}

    # -- evaluation
    def evaluator(self, model, cfg, mesh=None):
        """An object with ``evaluate(params, ds, progress=False, keep_outputs=False) -> metrics dict``; for a model
        with BatchNorm it also takes ``model_state=`` (the running statistics)."""
        raise NotImplementedError

    def test_fields(self, ds) -> dict:
        """Extra fields of the test results (e.g. the chance level of the metrics on that split)."""
        return {}

    def format_metrics(self, metrics: dict) -> str:
        """One line of metrics (the per-epoch validation line)."""
        return " ".join(f"{k}={v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float)))

    def test_line(self, metrics: dict) -> str:
        """The line ``jaxprvr.train`` prints after the test evaluation."""
        return "test " + self.format_metrics(metrics)

    def save_outputs(self, directory, metrics: dict, ds) -> None:
        """Writes what ``evaluate(..., keep_outputs=True)`` kept (scores, predictions) to ``directory``."""
        raise NotImplementedError

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of :attr:`selection_metric` improves on ``best`` (``None``: nothing yet)."""
        if best is None:
            return True
        return value > best if self.selection_mode == "max" else value < best
