"""The "ovseg" Jupyter kernel that scripts/setup_env.sh registers runs this environment,
executes an nbs/ notebook (nbclient) and a repro/ stage (papermill, through scripts/run_notebook.sh,
as `dvc repro` does) -- and a healthy stage prints no WARNING or ERROR line."""
import json, os, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from run_notebook import QuietShutdownKernelManager, kernel_config, same_python

def _spec():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try: return KernelSpecManager().get_kernel_spec("ovseg")
    except NoSuchKernel:
        pytest.skip("no Jupyter kernel named 'ovseg' is registered: scripts/setup_env.sh (make env) registers it")

def test_ovseg_kernel_runs_this_environment():
    spec = _spec()
    assert spec.display_name == "ovseg"       # = what nbdev-clean writes into every notebook: JupyterLab changes nothing on open
    assert same_python(spec.argv[0]), f"kernel 'ovseg' runs {spec.argv[0]}, not {sys.executable}: re-run setup"
    assert "curve" in spec.metadata.get("supported_encryption", []), "kernel cannot encrypt its sockets"

def test_nbs_notebook_runs_headless_in_ovseg_kernel():
    import nbformat
    from nbclient import NotebookClient
    _spec()
    nb = nbformat.read(ROOT / "nbs/02_metrics.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel python', sys.executable)"))
    NotebookClient(nb, timeout=600, kernel_name="ovseg", resources={"metadata": {"path": str(ROOT / "nbs")}},
                   kernel_manager_class=QuietShutdownKernelManager, config=kernel_config()).execute()
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert f"kernel python {sys.executable}" in out, out

def test_repro_stage_runs_in_ovseg_kernel_and_logs_no_warning_or_error(tmp_path):
    _spec()
    out = tmp_path / "environment"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OVSEG_PROGRESS": "0"}
    r = subprocess.run([str(ROOT / "scripts/run_notebook.sh"), "repro/00_environment.ipynb", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    bad = [l for l in log.splitlines() if re.search(r"\b(WARNING|ERROR)\b", l)]
    assert not bad, "a healthy stage logged:\n" + "\n".join(bad)
    assert "(kernel ovseg)" in log
    assert json.loads((out / "metrics.json").read_text()) and (out / "00_environment.ipynb").exists()


def test_every_notebook_opens_in_the_ovseg_kernel():
    # JupyterLab picks a notebook's kernel from its kernelspec: "ovseg" is the one setup_env.sh registers
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    wrong = [str(p.relative_to(root)) for p in sorted([*root.glob("nbs/*.ipynb"), *root.glob("repro/*.ipynb")])
             if json.loads(p.read_text())["metadata"].get("kernelspec", {}).get("name") != "ovseg"]
    assert not wrong, f"kernelspec is not 'ovseg' in {wrong}"


def test_every_notebook_names_the_registered_kernel_as_it_is_registered():
    "A notebook whose kernelspec differs from the kernel's own (name or display name) opens as modified in JupyterLab."
    import glob
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    bad = []
    for f in sorted(glob.glob(str(root / "nbs" / "*.ipynb")) + glob.glob(str(root / "repro" / "*.ipynb"))):
        ks = json.loads(Path(f).read_text()).get("metadata", {}).get("kernelspec", {})
        if (ks.get("name"), ks.get("display_name")) != ("ovseg", "ovseg"): bad.append(f"{Path(f).name}: {ks}")
    assert not bad, bad
