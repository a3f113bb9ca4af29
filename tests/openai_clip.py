"""openai/CLIP's own code as a test reference: the modules of the ``clip-anytorch`` wheel (``scripts/setup.sh``
installs it without dependencies), loaded by path -- ``clip/__init__.py`` imports torchvision, which has no CPU
build for this torch. Its ``model.py`` ViT path is openai/CLIP's at 77 tokens; ``simple_tokenizer.py`` is OpenAI's
tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def openai_clip_module(name: str):
    """``clip/<name>.py`` of the installed clip-anytorch wheel as a module (skips the test if it is absent)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-anytorch is not installed (scripts/setup.sh installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / f"{name}.py"
    mod_spec = importlib.util.spec_from_file_location(f"_openai_clip_{name}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def random_clip_inputs(n_images: int, seed: int = 0, resolution: int = 64, vocab: int = 500):
    """Random pixels ``(n_images, 3, R, R)`` and three captions of 77 ids (lengths 5, 12, 30: SOT ``vocab - 2``,
    random tokens, EOT ``vocab - 1`` -- the largest id, as in CLIP --, then 0-padding)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((n_images, 3, resolution, resolution)).astype(np.float32)
    ids = np.zeros((3, 77), np.int64)
    for b, n in enumerate((5, 12, 30)):
        ids[b, 0] = vocab - 2
        ids[b, 1:n - 1] = rng.integers(1, vocab - 3, n - 2)
        ids[b, n - 1] = vocab - 1
    return pixels, ids
