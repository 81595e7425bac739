#!/usr/bin/env bash
# Set up and run the whole test suite (CPU, offline, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
.venv/bin/ruff check . && .venv/bin/ruff format --check .  # lint + format (pyproject.toml)
.venv/bin/python -m pytest tests "$@"
