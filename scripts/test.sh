#!/usr/bin/env bash
# 1. ovseg/ is what nbdev-export makes from nbs/; 2. the notebooks run; 3. pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OVSEG_PROGRESS=0
echo "== 1/3 ovseg/ matches nbs/ =="
python scripts/check_export.py
echo "== 2/3 nbdev-test =="
nbdev-test --n-workers 2
echo "== 3/3 pytest =="
pytest -q -p no:cacheprovider "$@"
