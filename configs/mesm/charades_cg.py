"""MESM on Charades-CG: config/Charades-CG/C+SF_C.json (lntzm/MESM @ 8501bdea).

    python -m jaxprvr.train --config charades_cg --data-root $MESM

Two selection splits, officially: novel_composition and novel_word, each with its own best checkpoint
(ckpt/best_novel_composition, ckpt/best_novel_word) and one early-stopping counter (train.py L152-197).
The official eval.py cannot evaluate this dataset (it asserts one test loader and loads model_test_best.ckpt).
The paper's numbers are not in the repository (vmr.md PART D): none are quoted here.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    from jaxprvr.tasks.vmr_detr import resolve_config

    return resolve_config(make_config("mesm", "charades_cg"))
