#!/usr/bin/env bash
# The demo: set up, search the embedded toy MoE for the best 4-of-8 experts per layer, export it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
rm -rf runs/toy out/toy-pruned
.venv/bin/eep search experiments/toy.yaml --run-dir runs/toy
.venv/bin/eep export runs/toy --out out/toy-pruned
