#!/usr/bin/env bash
# Usage: scripts/run_notebook.sh repro/NB.ipynb OUT_DIR [papermill args...]
# Executes NB with papermill into OUT_DIR/NB.ipynb, injecting params_file and out_dir.
set -euo pipefail
nb=$1; out=$2; shift 2
mkdir -p "$out"
exec papermill --no-progress-bar -k python3 --cwd . "$nb" "$out/$(basename "$nb")" \
  -p params_file params.yaml -p out_dir "$out" "$@"
