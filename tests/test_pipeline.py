"The DVC pipeline's wiring: every stage runs a papermill notebook that exists and takes parameters."
import json
from pathlib import Path

import nbformat
import pytest
import yaml

from ovseg.core import load_config
from ovseg.fusioner import pair_config, pair_spec

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_runs_a_tagged_notebook_it_depends_on(name):
    stage = STAGES[name]
    script, notebook, out_dir = stage["cmd"].split()
    assert script == "scripts/run_notebook.sh"
    assert notebook in stage["deps"], f"{name}: the notebook it runs must be a dependency"
    for dep in stage["deps"]:
        assert (ROOT / dep).exists() or dep.startswith("outputs/"), f"{name}: missing dependency {dep}"
    nb = nbformat.read(ROOT / notebook, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{notebook}: needs exactly one cell tagged 'parameters'"
    assert "params_file" in params[0].source and f'"{out_dir}"' in params[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{notebook} has stored outputs"


def test_paper_figures_file_is_what_the_table_notebooks_read():
    fig = json.loads((ROOT / "repro/paper_figures.json").read_text())
    for table in ("pascal5i", "coco20i"):
        assert {f"fold{k}" for k in range(4)} | {"mean", "FB_IoU", "backbone"} <= set(fig[table])
    assert {"mean", "FB_IoU"} <= set(fig["mosaic4"])
    cfg = load_config(ROOT / "params.yaml", "paper")
    assert {str(d) for d in cfg.params.fusioner.depths} <= set(fig["depth"])
    values = [v for t in ("pascal5i", "coco20i", "mosaic4") for k, v in fig[t].items() if k != "backbone"]
    values += list(fig["encoder_pairs"].values()) + list(fig["depth"].values()) + [fig["no_fusion"]]
    assert all(v is None or isinstance(v, (int, float)) for v in values)
    # a filled value must say which table of the paper it comes from
    if any(v is not None for v in values): assert fig["tables"], "name the paper's table for each filled value"


@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_encoder_pairs_parse_and_include_the_main_pair(profile):
    runs = load_config(ROOT / "params.yaml", profile).params.fusioner
    fc = runs.model
    configs = [pair_config(fc, p) for p in runs.pairs]
    assert all(c.visual and c.text for c in configs)
    assert [pair_spec(c) for c in configs] == runs.pairs
    if profile == "embedded":   # the encoder table reuses the main stage's runs for these two
        random = pair_spec(pair_config(fc, f"random:{fc.visual}@{fc.visual_stride}|random:{fc.text}"))
        assert pair_spec(fc) in runs.pairs and random in runs.pairs


def test_training_curves_are_plotted_from_stage_outputs():
    # `dvc plots show` renders each training stage's loss: every top-level plot file is a run log under
    # a stage's `runs` output, and every stage that saves runs has a loss plot
    top = yaml.safe_load((ROOT / "dvc.yaml").read_text()).get("plots") or []
    outs = {next(iter(o)) if isinstance(o, dict) else o: stage for stage, s in STAGES.items() for o in s.get("outs", [])}
    plotted = set()
    for entry in top:
        (name, spec), = entry.items()
        assert spec.get("x") == "step" and isinstance(spec.get("y"), dict), name
        for path, field in spec["y"].items():
            assert field == "loss" and path.endswith("/train_log.tsv"), (name, path)
            run_dirs = [o for o in outs if path.startswith(o + "/") and o.endswith("/runs")]
            assert run_dirs, f"{name}: {path} is not inside any stage's runs/ output"
            plotted.add(outs[run_dirs[0]])
    training = {stage for o, stage in outs.items() if o.endswith("/runs") and not stage.startswith("fusioner_")}
    assert training <= plotted, f"training stages without a loss plot: {sorted(training - plotted)}"
    assert "fusioner_pascal5i" in plotted
