"""The environment works in every way users run code: plain Python, a Jupyter kernel,
papermill and nbdev-test (the last is the test command's own step 2)."""
import json, subprocess, sys, textwrap
from pathlib import Path
import pytest

IMPORTS = "import ovseg, open_clip, timm, torchvision; from transformers import BertModel, BertConfig"

def test_plain_python_imports_without_ovseg_first():
    # open_clip first: the start-up hook, not `import ovseg`, must make torchvision importable
    code = "import open_clip, timm; from transformers import BertModel; import ovseg; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]

def test_startup_hook_is_installed_in_site_packages():
    from ovseg.compat import PTH_NAME
    import site
    assert any((Path(d) / PTH_NAME).exists() for d in site.getsitepackages())

def test_hook_defines_schemas_only_when_needed():
    code = textwrap.dedent("""
        import torch, ovseg.compat as c
        before = c.torchvision_needs_shim()
        import torchvision
        print(before, c.torchvision_needs_shim(), c._library is not None)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    import torch
    expected = "True False True" if torch.version.cuda is None else "False False False"
    assert r.stdout.strip() == expected

def _notebook(tmp_path, source):
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = tmp_path / "check.ipynb"; nbformat.write(nb, p); return p

def test_jupyter_kernel_imports(tmp_path):
    import nbformat
    from nbclient import NotebookClient
    p = _notebook(tmp_path, IMPORTS + "\nm = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))\nprint('kernel ok')")
    nb = nbformat.read(p, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    assert "kernel ok" in "".join(o.get("text", "") for o in nb.cells[0].outputs)

def test_papermill_runs_and_injects_parameters(tmp_path):
    import nbformat, papermill as pm
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(IMPORTS + "\nprint('x =', x)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "in.ipynb"; nbformat.write(nb, src)
    out = pm.execute_notebook(str(src), str(tmp_path / "out.ipynb"), parameters={"x": 41}, kernel_name="python3", progress_bar=False)
    texts = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert "x = 41" in texts

def test_nbdev_clean_keeps_parameters_tag(tmp_path):
    import nbformat, shutil
    nbs = tmp_path / "nbs"; nbs.mkdir()
    shutil.copy("pyproject.toml", tmp_path)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"], "scrolled": True})]
    nbformat.write(nb, nbs / "p.ipynb")
    r = subprocess.run(["nbdev-clean", "--fname", str(nbs / "p.ipynb")], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.loads((nbs / "p.ipynb").read_text())["cells"][0]["metadata"]
    assert meta == {"tags": ["parameters"]}

def test_repository_notebooks_are_clean():
    for p in sorted(Path("nbs").glob("*.ipynb")):
        nb = json.loads(p.read_text())
        stored = [c for c in nb["cells"] if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
        assert not stored, f"{p} has stored outputs: run nbdev-clean"
