"""Configs: ``configs/<model>/<dataset>.py`` each expose ``get_config()``.

``load_config("tvr")`` gives the best model available on TVR; ``load_config("tvr", model="ms_sl")``
picks another; ``load_config("gmmformer_v2/act")`` names the file directly.
"""

from __future__ import annotations

import importlib

from configs.base import DATASETS, Config, apply_overrides
from jaxprvr.errors import JaxprvrError

MODELS = ("ms_sl", "gmmformer", "gmmformer_v2", "mtm")
# The strongest model implemented so far, per dataset (what `--config tvr` trains).
BEST_MODEL = {"tvr": "mtm", "act": "mtm", "cha": "mtm"}


def load_config(name: str, model: str | None = None, overrides=()) -> Config:
    if "/" in name:
        model_from_name, name = name.split("/", 1)
        if model is not None and model != model_from_name:
            raise JaxprvrError("--model", f"{model_from_name} (named by --config)", repr(model))
        model = model_from_name
    if name not in DATASETS:
        raise JaxprvrError("--config", f"one of {sorted(DATASETS)} or <model>/<dataset>", repr(name))
    model = model or BEST_MODEL[name]
    if model not in MODELS:
        raise JaxprvrError("--model", f"one of {list(MODELS)}", repr(model))
    cfg = importlib.import_module(f"configs.{model}.{name}").get_config()
    return apply_overrides(cfg, list(overrides))


__all__ = ["Config", "load_config", "apply_overrides", "MODELS", "BEST_MODEL"]
