"""repro/summary.ipynb (DVC stage `summary`) on fake stage outputs: one row per method with the
seed spread, paper figures where known, ablation stages left out, every scalar metric gathered."""
import csv, json, os, subprocess
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def _stage(root, name, rows=None, metrics=None, **extra):
    d = root / name; d.mkdir(parents=True)
    if rows is not None: (d / "results.json").write_text(json.dumps({"rows": rows, **extra}))
    if metrics is not None: (d / "metrics.json").write_text(json.dumps(metrics))

def test_summary_notebook_on_fake_outputs(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try: KernelSpecManager().get_kernel_spec("ovseg")
    except NoSuchKernel: pytest.skip("no Jupyter kernel named 'ovseg': scripts/setup_env.sh registers it")
    outputs = tmp_path / "outputs"
    # two seeds x two folds: the seed score is the fold mean (60, 70 -> mean 65, std 7.07)
    _stage(outputs, "fusioner_pascal5i",
           [{"variant": "Fusioner", "seed": s, "fold": f, "mIoU": 55 + 10 * s + 10 * f} for s in (0, 1) for f in (0, 1)]
           + [{"variant": "no fusion", "seed": s, "fold": 0, "mIoU": 40.0} for s in (0, 1)],
           {"mIoU_mean": 65.0, "seconds": 3.0})
    _stage(outputs, "zsseg_voc", [{"variant": "zsseg", "seed": 0, "mIoU_unseen": 31.0, "mIoU": 80.0}],
           {"hIoU": 44.0}, paper={"zsseg": 77.5})
    _stage(outputs, "fisa_world", None, {"mIoU_mean": 33.3, "mIoU_std": 1.5})
    _stage(outputs, "fusioner_depth", [{"variant": "Fusioner", "seed": 0, "mIoU": 1.0}], {"mIoU_mean": 1.0})
    _stage(outputs, "environment", None, {"threads": 2, "torch": "2.13"})
    out = outputs / "summary"
    r = subprocess.run([str(ROOT / "scripts/run_notebook.sh"), "repro/summary.ipynb", str(out), "-p", "outputs_dir", str(outputs)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OVSEG_PROGRESS": "0"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = {(t["stage"], t["variant"]): t for t in csv.DictReader((out / "summary.csv").open())}
    assert set(rows) == {("fusioner_pascal5i", "Fusioner"), ("fusioner_pascal5i", "no fusion"),
                         ("zsseg_voc", "zsseg"), ("fisa_world", "fisa_world")}      # depth is an ablation
    fz = rows[("fusioner_pascal5i", "Fusioner")]
    assert float(fz["mean"]) == pytest.approx(65.0) and float(fz["std"]) == pytest.approx(7.0711, abs=1e-3)
    assert int(fz["seeds"]) == 2 and fz["paper"] == ""          # paper_figures.json: not reported
    assert float(rows[("zsseg_voc", "zsseg")]["mean"]) == 31.0   # the unseen-class score, not the overall mIoU
    assert float(rows[("zsseg_voc", "zsseg")]["paper"]) == 77.5
    assert float(rows[("fisa_world", "fisa_world")]["std"]) == 1.5
    md = (out / "summary.md").read_text()
    assert "65.0 ± 7.1" in md and "not reported" in md and "77.5" in md
    gathered = {(m["stage"], m["metric"]) for m in csv.DictReader((out / "all_metrics.csv").open())}
    assert {("environment", "threads"), ("zsseg_voc", "hIoU"), ("fusioner_depth", "mIoU_mean")} <= gathered
    assert (out / "summary.png").stat().st_size > 10_000
    assert json.loads((out / "metrics.json").read_text())["methods"] == 4
