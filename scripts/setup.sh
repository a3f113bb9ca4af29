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
