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
