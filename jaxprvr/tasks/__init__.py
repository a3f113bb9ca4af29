"""Tasks (:mod:`jaxprvr.tasks.base`): ``prvr`` (partially relevant video retrieval). A family's task is named by
its registry row; :func:`task_for` gives the task of a config."""

from __future__ import annotations

import importlib

from jaxprvr.tasks.base import Task, TrainPlan


def get(name: str) -> Task:
    """The task named ``name`` (its module's ``TASK``)."""
    return importlib.import_module(f"jaxprvr.tasks.{name}").TASK


def task_for(cfg) -> Task:
    """The task of a Config (or of a model config): its family's registry row names it."""
    from jaxprvr import registry

    return registry.family_of(cfg).task_instance()


__all__ = ["Task", "TrainPlan", "get", "task_for"]
