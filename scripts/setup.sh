#!/usr/bin/env bash
# Creates .venv (when missing) and installs jaxprvr with everything the demo and the tests need.
# torch goes in first: on these machines `torch==2.13.0` resolves to a local CPU wheel; any other
# torch spec would pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>/dev/null
if ! python -c "import torch" 2>/dev/null; then
  wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  python -m pip install -q "${wheel:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev,torch]"
# The official Mamba (MTM's torch twin and the selective-scan reference). Without a GPU it installs as pure
# Python: skip the CUDA builds, no build isolation (it needs the torch above), no dependencies but einops.
if ! python -c "import importlib.util as u; assert u.find_spec('mamba_ssm') and u.find_spec('causal_conv1d')" 2>/dev/null; then
  MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    python -m pip install -q --no-build-isolation --no-deps "mamba_ssm==2.3.2.post1" "causal_conv1d==1.7.0" "einops>=0.7"
fi
# openai/CLIP's own model code (clip/model.py, the reference of tests/test_clip_model.py): the clip-anytorch wheel,
# pure Python, without its dependencies (torchvision has no CPU build for this torch; the tests load model.py alone).
if ! python -c "import importlib.util as u; assert u.find_spec('clip')" 2>/dev/null; then
  python -m pip install -q --no-deps "clip-anytorch==2.6.0"
fi
# decord 0.6.0, the official video reader: only for tests/test_video.py's cross-check (x86-64 Linux wheels only).
if [ "$(uname -m)" = "x86_64" ] && ! python -c "import decord" 2>/dev/null; then
  python -m pip install -q --no-deps "decord==0.6.0" || echo "setup: decord not installed (its cross-check will skip)"
fi
