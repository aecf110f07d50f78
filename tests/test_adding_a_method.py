"""docs/adding-a-method.md cannot rot: its template (nbs/_method_template.ipynb) is exported with nbdev into a
package of its own, as a newcomer's method or a plugin would be, trained one step on the embedded world through
the shared runner, and found by the registry and the summary without any list being edited."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "nbs" / "_method_template.ipynb"


def _run_notebook(nb: str, out: Path, env: dict, *params: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/run_notebook.py", nb, str(out), *params], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_template_method_is_found_by_the_registry_and_the_summary(tmp_path):
    from nbdev.export import nb_export
    pkg = tmp_path / "plugin"; pkg.mkdir()
    nb_export(str(TEMPLATE), lib_path=str(pkg))
    src = (pkg / "method_template.py").read_text()
    assert "register_section(" in src and "register_method(" in src and "@register_arch(" in src

    # 1. the notebook itself: check_method, one optimizer step through ovseg.experiment.run_grid, results.json
    outputs = tmp_path / "outputs"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OVSEG_PROGRESS="0")
    r = _run_notebook("nbs/_method_template.ipynb", tmp_path / "nb", env, "-p", "out_dir", str(outputs))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((outputs / "template" / "results.json").read_text())
    assert [(row["variant"], row["fold"], row["seed"]) for row in res["rows"]] == [("template", 0, 0)]
    assert (outputs / "template" / "runs" / "template_f0_s0" / "model" / "config.json").exists()

    # 2. the exported module, named only by OVSEG_METHODS: its section, arch and method are discovered
    plug = dict(env, OVSEG_METHODS="method_template", PYTHONPATH=os.pathsep.join([str(pkg), env.get("PYTHONPATH", "")]))
    code = ("import dataclasses; from ovseg.core import load_config, sections; from ovseg.experiment import methods\n"
            "from ovseg.train import arch_class\n"
            "cfg = load_config('params.yaml')\n"
            "print(sections()['template'].module, type(cfg.params.template).__name__, cfg.params.template.model.hidden)\n"
            "print(arch_class('template').__module__, [m.display for m in methods()][-1])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=plug, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["method_template", "TemplateSettings", "16", "method_template", "Template", "(pixel", "MLP)"], r.stdout
    # control: importable but not named by OVSEG_METHODS, nothing finds it (the line above is the discovery)
    r = subprocess.run([sys.executable, "-c", "from ovseg.core import sections; print('template' in sections())"],
                       cwd=ROOT, env=dict(plug, OVSEG_METHODS=""), capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "False", r.stdout + r.stderr[-2000:]

    # 3. the summary lists its row, and names every registered stage that has no results here
    r = _run_notebook("repro/summary.ipynb", tmp_path / "summary", plug, "-p", "outputs_dir", str(outputs),
                      "-p", "out_dir", str(tmp_path / "summary"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (tmp_path / "summary" / "summary.md").read_text()
    assert "| template | template | 1 |" in md, md
    missing = md.split("No results under", 1)[1]
    assert "fusioner_pascal5i (Fusioner)" in missing and "zsseg (zsseg)" in missing and "template (" not in missing, md


def test_no_method_is_listed_outside_its_own_notebook():
    "The gallery's and the summary's code, and ovseg.core, name no method, stage or run folder: all come from the registry."
    import dataclasses
    import ovseg.core as core
    from ovseg.experiment import methods
    code = ""
    for nb in ("repro/15_gallery.ipynb", "repro/summary.ipynb"):
        cells = json.loads((ROOT / nb).read_text())["cells"]
        code += "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    ms = methods()
    assert len(ms) >= 5
    for m in ms:
        assert f'"{m.display}"' not in code, m.display
        for s in m.stages: assert f'"{s}"' not in code and f"{s}/" not in code, s
        if m.gallery: assert m.gallery.run.split("/")[0] + "/runs" not in code
    assert all(sec.module != "ovseg.core" for sec in core.sections().values())
    own = [v for v in vars(core).values() if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == "ovseg.core"]
    assert {c.__name__ for c in own} <= {"RuntimeConfig", "PathsConfig", "EncodersConfig", "DataConfig", "ParamGroupConfig",
                                         "TrainConfig", "Config", "Section"}, own
