#!/usr/bin/env python
"""Fail unless ovseg/ is exactly what `nbdev-export` makes from nbs/.

Exports into a scratch copy of the repository and compares every module; a difference is
reported with the notebook to edit (from the module's `File to edit` header)."""
import filecmp, re, shutil, subprocess, sys, tempfile
from pathlib import Path

root = Path(__file__).resolve().parents[1]
lib = root / "ovseg"

def notebook_of(module: Path) -> str:
    m = re.search(r"File to edit: \.\./(\S+\.ipynb)", module.read_text()) if module.exists() else None
    return m.group(1) if m else "its notebook in nbs/"

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    shutil.copytree(root / "nbs", tmp / "nbs")
    shutil.copy(root / "pyproject.toml", tmp)
    shutil.copy(root / "README.md", tmp) if (root / "README.md").exists() else None
    (tmp / "ovseg").mkdir()
    shutil.copy(lib / "__init__.py", tmp / "ovseg")   # hand-written; nbdev only updates it
    r = subprocess.run(["nbdev-export"], cwd=tmp, capture_output=True, text=True)
    if r.returncode: sys.exit(f"nbdev-export failed:\n{r.stderr}")
    made = {p.relative_to(tmp / "ovseg") for p in (tmp / "ovseg").rglob("*.py")}
    have = {p.relative_to(lib) for p in lib.rglob("*.py")}
    problems = []
    for rel in sorted(made | have):
        ours, theirs = lib / rel, tmp / "ovseg" / rel
        if rel not in have: problems.append(f"ovseg/{rel} is missing: run nbdev-export ({notebook_of(theirs)})")
        elif rel not in made: problems.append(f"ovseg/{rel} is not exported by any notebook: delete it or export it from nbs/")
        elif not filecmp.cmp(ours, theirs, shallow=False):
            problems.append(f"ovseg/{rel} differs from what {notebook_of(theirs)} exports: "
                            "edit the notebook, not the module, then run nbdev-export")
    if problems: sys.exit("\n".join(problems))
    print(f"ok: {len(made)} modules match their notebooks")
