"""MESM on TACoS: config/TACoS/C3D_GloVe.json (lntzm/MESM @ 8501bdea).

    python -m jaxprvr.train --config tacos --model mesm --data-root $MESM

GloVe words (glove.6B.300d.txt), the TwoMLP enhancer (share_MLP false), chunks of <= 10 queries per item, 3
items per batch; official selection on test, train.selection=val uses val.json.
The paper's numbers are not in the repository (vmr.md PART D): none are quoted here.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    from jaxprvr.tasks.vmr_detr import resolve_config

    return resolve_config(make_config("mesm", "tacos"))
