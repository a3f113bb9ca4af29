"""MESM on Charades-CD: none shipped: Charades-CG's config (docs/quirks.md) (lntzm/MESM @ 8501bdea).

    python -m jaxprvr.train --config charades_cd --data-root $MESM

Official selection on test_ood (runner.py L70-80); train.selection=val uses charades_val.json.
The paper's numbers are not in the repository (vmr.md PART D): none are quoted here.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    from jaxprvr.tasks.vmr_detr import resolve_config

    return resolve_config(make_config("mesm", "charades_cd"))
