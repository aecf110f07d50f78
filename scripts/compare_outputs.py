#!/usr/bin/env python
"""Did a change alter any result? Compare every JSON file under two runs' outputs/ folders.

Usage: python scripts/compare_outputs.py BEFORE_REPO AFTER_REPO
Each file is reported byte-identical, identical once the keys that only record when and how fast a run went
(timings, per-second rates, cost ratios of timings, the commit, the start time) are dropped, or different
(with the differing keys). Exit status 1 when any file differs or is missing. Used for #30's refactor: the
whole embedded pipeline run twice on this machine, same thread count, same (shortened) params.yaml.
"""
import json, re, sys
from pathlib import Path

VOLATILE = re.compile(r"(seconds|per_second|_s$|time|elapsed|wall|minutes|per_step|cost_ratio|^s_per_|^commit$|^started$|^finished$)", re.I)

def stable(o):
    if isinstance(o, dict): return {k: stable(v) for k, v in o.items() if not VOLATILE.search(str(k))}
    if isinstance(o, list): return [stable(v) for v in o]
    return o

def main(a: Path, b: Path) -> int:
    files = sorted(p.relative_to(a) for p in (a / "outputs").rglob("*.json"))
    byte = same = 0; bad = []
    for rel in files:
        fa, fb = a / rel, b / rel
        if not fb.exists(): bad.append(f"{rel}: missing in {b}"); continue
        if fa.read_bytes() == fb.read_bytes(): byte += 1; same += 1; continue
        ja, jb = stable(json.loads(fa.read_text())), stable(json.loads(fb.read_text()))
        if ja == jb: same += 1; continue
        keys = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)) if isinstance(ja, dict) and isinstance(jb, dict) else []
        bad.append(f"{rel}: differs ({', '.join(keys[:8])})")
    bad += [f"{p.relative_to(b)}: missing in {a}" for p in (b / "outputs").rglob("*.json") if not (a / p.relative_to(b)).exists()]
    print(f"{len(files)} JSON files: {byte} byte-identical, {same} identical without timing keys, {len(bad)} differ or are missing")
    for line in bad: print("  " + line)
    return 1 if bad else 0

if __name__ == "__main__":
    if len(sys.argv) != 3: sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
