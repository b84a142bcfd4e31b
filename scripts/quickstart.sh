#!/usr/bin/env bash
# Install spartune into .venv and run the main job (spartune-pipeline) on the built-in defaults:
# proxy sweep -> transfer -> target runs -> tables -> figures -> results/pipeline/report.md.
# Extra arguments are Hydra overrides, e.g. `bash scripts/quickstart.sh train.steps=100`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_install.sh
export MPLBACKEND=Agg
exec .venv/bin/spartune-pipeline "$@"
