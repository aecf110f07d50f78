#!/usr/bin/env bash
# Usage: scripts/check_install.sh [pytest args...]
# `pip install .` into a clean venv that already holds a torch other than requirements.lock's
# (default torch 2.14.1 + torchvision 0.29.1: another minor version), then run a test subset
# there against the installed package, not this checkout. Shows that the ranges in
# pyproject.toml are ones a user's environment can satisfy.
#   TORCH_SPEC   what to install first (default "torch==2.14.1 torchvision==0.29.1"; the
#                CUDA build, ~5.5 GB in the venv, which runs on the CPU too)
#   VENV         where to build the venv (default: a temporary folder, removed afterwards)
#   PYTHON       interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ovseg-check-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
venv=${VENV:-$tmp/venv}
tests=(tests/test_packaging.py tests/test_core.py tests/test_metrics.py tests/test_denseclip.py
       tests/test_segment.py tests/test_cli.py)
[ $# -gt 0 ] && tests=("$@")

echo "== 1/4 clean venv at $venv with $TORCH_SPEC =="
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q $TORCH_SPEC

echo "== 2/4 pip install . (from a copy of the working tree, so no build files land here) =="
mkdir "$tmp/src"
git ls-files -co --exclude-standard | grep -v '^outputs/' | tar -cf - -T - | tar -xf - -C "$tmp/src"
"$venv/bin/python" -m pip install -q "$tmp/src" pytest pytest-timeout
"$venv/bin/python" -m pip check

echo "== 3/4 what was installed =="
cd "$tmp"   # not the checkout: `import ovseg` must find the installed package
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md, ovseg, sys, torch
assert "site-packages" in ovseg.__file__, f"ovseg imported from {ovseg.__file__}, not the install"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {md.version('torchvision')}, "
      f"ovseg {ovseg.__version__} from {ovseg.__file__}")
EOF
"$venv/bin/ovseg" --version
"$venv/bin/python" -m ovseg --version

echo "== 4/4 tests: ${tests[*]} =="
mkdir "$tmp/run" && cp -r "$root/tests" "$tmp/run/" && cp "$root/pyproject.toml" "$root/params.yaml" "$tmp/run/"
cd "$tmp/run"
HF_HUB_OFFLINE=1 OVSEG_PROGRESS=0 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
echo "== check_install: passed in ${SECONDS}s =="
