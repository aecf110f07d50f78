#!/usr/bin/env python
"""The paper smoke run (issue 23): every stage of paper/dvc.yaml, through `dvc repro`, on tiny real-layout fixtures.

1. `ovseg.testing.write_paper_fixtures` writes every dataset the `paper` profile reads (the real folder layouts and
   list files, noise pictures) into WORK/project/data; `write_paper_weights` writes random-weight checkpoints of every
   encoder it names, in the downloads' layouts, into WORK/weights (kept between runs: the ViT-L file takes a while).
2. WORK/project is a copy of this checkout's pipeline files (paper/dvc.yaml, repro/, scripts/, ovseg/ as DVC deps)
   whose params.yaml is this repository's with `profiles.paper` overlaid by paper/smoke.yaml (fewer steps, images
   and pixels; nothing else) and `paths` / weight settings pointing at the fixtures. The real recipes stay as they are.
3. `dvc repro paper/dvc.yaml` runs there exactly as a user's `dvc repro paper/dvc.yaml` would (papermill, the
   ovseg kernel), then the table `stage | ran | seconds` is printed and written to WORK/smoke.json.
    python scripts/paper_smoke.py [--work /tmp/ovseg_paper_smoke] [--stage NAME ...] [--keep-going]
Exit status 0 when every stage ran.
"""
import argparse, json, os, re, shutil, subprocess, sys, time
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parents[1]

def merge(base: dict, over: dict) -> dict:
    "Deep merge: mappings merge key by key, anything else replaces."
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

def smoke_params(weights: dict[str, str]) -> dict:
    "params.yaml of the smoke project: profiles.paper + paper/smoke.yaml + local fixture/weight paths."
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    over = yaml.safe_load((ROOT / "paper" / "smoke.yaml").read_text())
    p = merge(raw["profiles"]["paper"], over)
    p["paths"] = {"data": "data", "outputs": "outputs", "weights": "weights"}
    p["encoders"]["weights"] = {**p["encoders"].get("weights", {}), **weights}   # the same paths params.yaml names
    raw["profile"], raw["profiles"] = "paper", {"paper": p}
    return raw

def setup(work: Path) -> Path:
    from ovseg.paper import PAPER_WEIGHTS
    from ovseg.testing import write_paper_fixtures, write_paper_weights
    proj = work / "project"
    t0 = time.time()
    if not (work / "data.done").exists():
        shutil.rmtree(work / "data", ignore_errors=True)
        write_paper_fixtures(work / "data", n=1)
        (work / "data.done").write_text("1")
    wdir = work / "weights"
    files = write_paper_weights(wdir)
    print(f"paper_smoke: fixtures and weights ready in {time.time() - t0:.0f} s ({work})", flush=True)
    shutil.rmtree(proj, ignore_errors=True); proj.mkdir(parents=True)
    for d in ("repro", "scripts", "ovseg", "paper"): shutil.copytree(ROOT / d, proj / d, ignore=shutil.ignore_patterns("__pycache__", "dvc.lock"))
    os.symlink(work / "data", proj / "data")
    (proj / "weights").mkdir()
    local = {}
    for spec, f in files.items():          # the paths docs/weights.md names (ovseg.paper.PAPER_WEIGHTS), linked to the cached files
        rel = PAPER_WEIGHTS[spec]
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f, proj / rel)
        local[spec] = rel
    (proj / "params.yaml").write_text(yaml.safe_dump(smoke_params(local), sort_keys=False))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=proj, check=True)
    return proj

def run(proj: Path, stages: list[str], keep_going: bool) -> list[dict]:
    names = list(yaml.safe_load((proj / "paper" / "dvc.yaml").read_text())["stages"])
    cmd = ["dvc", "repro", "--force"] + (["--keep-going"] if keep_going else [])
    cmd += [f"paper/dvc.yaml:{s}" for s in stages] if stages else ["paper/dvc.yaml"]
    if stages: cmd.insert(2, "--single-item")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "OVSEG_PROGRESS": "0"}
    started, seconds, current = {}, {}, None
    p = subprocess.Popen(cmd, cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in p.stdout:
        log.append(line); sys.stdout.write(line); sys.stdout.flush()
        m = re.match(r"Running stage '(?:paper/dvc\.yaml:)?([\w-]+)'", line.strip())
        if m:
            now = time.time()
            if current: seconds[current] = now - started[current]
            current = m.group(1); started[current] = now
    p.wait()
    if current: seconds[current] = time.time() - started[current]
    (proj.parent / "dvc_repro.log").write_text("".join(log))
    lock = yaml.safe_load((proj / "paper" / "dvc.lock").read_text()) if (proj / "paper" / "dvc.lock").exists() else {}
    done = set((lock or {}).get("stages", {}))
    rows = [{"stage": s, "ran": s in done and s in seconds, "seconds": round(seconds.get(s, 0.0), 1)}
            for s in names if not stages or s in stages]
    return rows, p.returncode

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.environ.get("OVSEG_PAPER_SMOKE_DIR", "/tmp/ovseg_paper_smoke"))
    ap.add_argument("--stage", action="append", default=[], help="run only these stages (default: all of paper/dvc.yaml)")
    ap.add_argument("--keep-going", action="store_true", help="run the other stages when one fails")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    proj = setup(work)
    t_setup = time.time() - t0
    rows, rc = run(proj, a.stage, a.keep_going)
    table = "| stage | ran | seconds |\n|---|---|---|\n" + "\n".join(f"| {r['stage']} | {'yes' if r['ran'] else 'NO'} | {r['seconds']:.0f} |" for r in rows)
    table += f"\n| (fixtures, weights, project setup) | yes | {t_setup:.0f} |\n| total | {'yes' if all(r['ran'] for r in rows) else 'NO'} | {time.time() - t0:.0f} |"
    print(table)
    (work / "smoke.json").write_text(json.dumps({"rows": rows, "setup_seconds": round(t_setup, 1), "total_seconds": round(time.time() - t0, 1),
                                                 "dvc_rc": rc}, indent=1))
    (work / "smoke.md").write_text(table + "\n")
    return 0 if rc == 0 and all(r["ran"] for r in rows) else 1

if __name__ == "__main__":
    sys.exit(main())
