"""MESM on Charades-STA: config/charades/C+SF_C.json (default) and config/charades/VGG_GloVe.json (lntzm/MESM @ 8501bdea).

    python -m jaxprvr.train --config charades --model mesm --data-root $MESM  # C+SF_C: CLIP + SlowFast, CLIP text
    python -m jaxprvr.train --config charades --model mesm --data-root $MESM --set data.variant=VGG_GloVe

The official selection is on test (runner.py L70-80: "val" = test); ``train.selection=val`` selects on a seeded
10% of the train videos instead (docs/quirks.md).
The paper's numbers are not in the repository (vmr.md PART D): none are quoted here.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    from jaxprvr.tasks.vmr_detr import resolve_config

    return resolve_config(make_config("mesm", "charades"))
