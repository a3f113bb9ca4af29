"""MESM on QVHighlights: config/QVHighlights/C+SF_C.json (lntzm/MESM @ 8501bdea).

    python -m jaxprvr.train --config qvhighlights --data-root $MESM

Selection on val (as officially); the test numbers need highlight_test_with_gt.jsonl (Moment-DETR #89): the
split test_with_gt. Metrics add Moment-DETR's HL-min-{Fair,Good,VeryGood}-{mAP,Hit1}.
The paper's numbers are not in the repository (vmr.md PART D): none are quoted here.
"""

from jaxprvr.config import Config, make_config


def get_config() -> Config:
    from jaxprvr.tasks.vmr_detr import resolve_config

    return resolve_config(make_config("mesm", "qvhighlights"))
