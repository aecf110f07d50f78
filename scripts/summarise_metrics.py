#!/usr/bin/env python
"""Print the results table of the `summary` stage (outputs/summary/summary.md), then each DVC
metrics file as one short block (`dvc metrics show` puts every key of every stage into one very
wide table)."""
import json, subprocess, sys
from pathlib import Path

summary = Path("outputs/summary/summary.md")
if summary.exists():
    print(f"novel-class mIoU per method ({summary}; figure: {summary.with_suffix('.png')})\n")
    print(summary.read_text())

out = subprocess.run(["dvc", "metrics", "show", "--json"], capture_output=True, text=True, check=True).stdout
files = next(iter(json.loads(out).values()), {}).get("data", {})

def flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict): yield from flat(v, f"{prefix}{k}.")
        else: yield f"{prefix}{k}", v

for path, entry in sorted(files.items()):
    items = [f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in flat(entry.get("data", {}))]
    shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
    print(f"{path}\n    {shown}")
print("\nall values: dvc metrics show   (numbers are from the profile in params.yaml; 'embedded' = synthetic world, CPU)")
