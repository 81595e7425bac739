#!/usr/bin/env bash
# Create .venv (if missing) and install eep with its test extras.
# torch is installed first and on its own: on a CPU-only machine with a local CPU wheel,
# `pip install torch==2.13.0` takes that wheel; on a GPU machine it takes the CUDA build from
# PyPI. Installing anything that depends on torch first would pull a multi-GB CUDA build.
# Set EEP_TORCH to choose another torch requirement (e.g. EEP_TORCH="torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "${EEP_TORCH:-torch==2.13.0}"
fi
.venv/bin/pip install --quiet -e ".[test]"
