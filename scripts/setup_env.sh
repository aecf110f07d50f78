#!/usr/bin/env bash
# Create or update .venv from requirements.lock; a no-op when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.ovseg-setup
want=$(cat requirements.lock pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then exit 0; fi

echo "== setting up .venv (first run takes a few minutes) =="
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is pinned in the lock file: on a machine without CUDA it resolves to the
# CPU build; an unpinned torch would pull several GB of CUDA packages.
.venv/bin/python -m pip install -q -r requirements.lock
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null
# Start-up hook that makes the CUDA build of torchvision import on CPU torch (nbs/00_compat.ipynb).
.venv/bin/python -c "from ovseg.compat import write_pth; print('startup hook:', write_pth())"
# JupyterLab kernel for this environment.
# Registered inside .venv (--sys-prefix), so two checkouts on one machine never take each other's
# kernel; scripts/run_notebook.py puts .venv/share/jupyter first on JUPYTER_PATH. A user-level
# "ovseg" kernel left by older versions of this script would shadow it in JupyterLab: remove it.
.venv/bin/python -m ipykernel install --sys-prefix --name ovseg --display-name "ovseg" >/dev/null
legacy="${JUPYTER_DATA_DIR:-$HOME/.local/share/jupyter}/kernels/ovseg"
if [ -f "$legacy/kernel.json" ] && ! grep -q "$(pwd)/.venv/" "$legacy/kernel.json"; then
  echo "removing the user-level 'ovseg' kernel of another environment ($legacy)"; rm -rf "$legacy"
fi
echo "registered Jupyter kernel 'ovseg'"
.venv/bin/python -c "import ovseg, open_clip, timm; from transformers import BertModel" \
  || { echo "environment check failed: see the import error above" >&2; exit 1; }
echo "$want" > "$stamp"
