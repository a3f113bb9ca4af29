"""A sharded step on 8 simulated CPU devices equals the single-device step (same code, 1-D data mesh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_eight_devices_match_one(tiny_root):
    """GMMFormer v2: its loss has the most cross-device parts (NCE over the batch, host Hungarian matching)."""
    model = "gmmformer_v2"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_check.py"), str(tiny_root), model],
                       capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["param_max_change"] > 1e-3, res  # the steps really moved the parameters
    assert res["param_allclose_excess"] <= 0, res  # |p8 - p1| <= 1e-6 + 1e-5 |p1| for every element
    assert res["loss_1"] == pytest.approx(res["loss_8"], rel=1e-5)
    assert res["score_max_abs"] < 1e-5, res  # the gallery is split over the 8 devices along its videos
    assert res["padded_gallery_shape"] == [37, 13], res  # 13 videos on 8 devices: padding columns dropped
    assert res["padded_gallery_max_abs"] < 1e-5, res
    assert res["sumr_1"] == pytest.approx(res["sumr_8"])
