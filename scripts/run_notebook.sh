#!/usr/bin/env bash
# Usage: scripts/run_notebook.sh repro/NB.ipynb OUT_DIR [-p NAME VALUE]...
# Executes NB with papermill in the "ovseg" Jupyter kernel (registered by scripts/setup_env.sh)
# into OUT_DIR/NB.ipynb, injecting params_file and out_dir; see scripts/run_notebook.py for the
# kernel settings that keep a healthy run free of WARNING/ERROR lines.
set -euo pipefail
exec python "$(dirname "$0")/run_notebook.py" "$@"
