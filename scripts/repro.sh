#!/usr/bin/env bash
# Run the DVC pipeline on the profile named in params.yaml, then say where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=$(python -c "import yaml; print(yaml.safe_load(open('params.yaml'))['profile'])")
echo "== dvc repro (profile: $profile) =="
if [ "$profile" = paper ]; then
  # the papers' settings: their own pipeline (paper/dvc.yaml, docs/reproduction.md), which never waits for the
  # embedded world or CLIP and writes under outputs/paper/; docs/weights.md lists what it reads
  dvc repro paper/dvc.yaml
  echo; echo "Tables, figures and executed notebooks are under outputs/paper/."
  exit 0
fi
dvc repro dvc.yaml   # the root pipeline only; the real-image one is `make repro-real` (real/dvc.yaml)
echo
echo "== figures for the README and docs (docs/img/) =="
python scripts/refresh_figures.py
echo
echo "== metrics =="
python scripts/summarise_metrics.py
echo
echo "Tables, figures and executed notebooks are under outputs/ (see README, 'Outputs')."
