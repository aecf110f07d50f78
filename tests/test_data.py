"ovseg.data: tiny fixtures in each real on-disk layout, read through the public API."
import gzip, json, warnings, zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg import data as D
from ovseg.data import DatasetNotFoundError, LabelValueError, create_dataset, list_datasets
from ovseg.images import collate
from ovseg.prepare import prepare_dataset
from ovseg.windows import sliding_window, tta_predict

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


def jpg(path, h=20, w=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def png(path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(arr)
    if arr.dtype == np.uint16:
        Image.fromarray(arr).save(path)          # 16-bit (TIFF)
        return
    im = Image.fromarray(arr.astype(np.uint8), mode="P" if palette else "L")
    if palette: im.putpalette(list(RNG.integers(0, 255, 768, dtype=np.uint8)))
    im.save(path)


def mask(values, h=20, w=24, dtype=np.uint8):
    return np.resize(np.asarray(values, dtype=dtype), (h, w))


# ---------------------------------------------------------------- semantic layouts

def test_registry_lists_everything():
    assert set(list_datasets()) >= {"pascal5i", "coco20i", "fss1000", "mosaic4", "voc20", "voc21", "coco_stuff171",
                                   "ade150", "ade847", "pc59", "pc459", "coco_object"}
    with pytest.raises(KeyError, match="known"): create_dataset("nope", "x")


def test_voc(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2012"
    for i in ("a", "b"):
        jpg(voc / f"JPEGImages/{i}.jpg"); png(voc / f"SegmentationClass/{i}.png", mask([0, 1, 20, 255]), palette=True)
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    d21, d20 = create_dataset("voc21", tmp_path), create_dataset("voc20", tmp_path)
    assert d21.num_classes == 21 and d20.num_classes == 20
    assert d21.class_names[0] == "background" and d20.class_names[-1] == "tv monitor"
    assert sorted(d21[0]["label"].unique().tolist()) == [0, 1, 20, 255]
    assert sorted(d20[0]["label"].unique().tolist()) == [0, 19, 255]
    s = d21[1]
    assert s["image"].shape == (3, 20, 24) and s["image"].dtype == torch.float32 and 0 <= s["image"].min() <= s["image"].max() <= 1
    assert s["id"] == "b"
    assert [d21.raw_class_names[i] for i in d21.unseen] == ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]
    b = collate([d21[0], d21[1]])
    assert b["image"].shape == (2, 3, 20, 24) and b["label"].shape == (2, 20, 24) and b["id"] == ["a", "b"]


def coco_stuff_fixture(root):
    c = root / "coco"
    # raw values are COCO ids - 1: 0 person, 1 bicycle, 91 banner (id 92), 181 wood, 255 unlabelled, 11 unused id 12
    jpg(c / "val2017/000000000001.jpg"); png(c / "stuffthingmaps/val2017/000000000001.png", mask([0, 1, 91, 181, 255, 11]))
    jpg(c / "val2017/000000000002.jpg"); png(c / "stuffthingmaps/val2017/000000000002.png", mask([20, 171]))  # cow, wall-concrete
    return c


def test_coco_stuff_and_object(tmp_path):
    coco_stuff_fixture(tmp_path)
    cs = create_dataset("coco_stuff171", tmp_path, "val")
    assert cs.num_classes == 171 and len(cs) == 2
    assert sorted(cs[0]["label"].unique().tolist()) == [0, 1, 80, 170, 255]
    assert cs.class_names[80] == "banner" and cs.class_names[84] == "building" and cs.raw_class_names[84] == "building-other"
    assert len(cs.unseen) == 15 and {cs.raw_class_names[i] for i in cs.unseen} >= {"cow", "wall-concrete", "playingfield"}
    lab = cs[1]["label"]
    assert set(lab.unique().tolist()) == {cs.raw_class_names.index("cow"), cs.raw_class_names.index("wall-concrete")}
    assert all(i in cs.unseen for i in lab.unique().tolist())
    co = create_dataset("coco_object", tmp_path, "val")
    assert co.num_classes == 81 and co.class_names[0] == "background" and co.class_names[1] == "person"
    assert sorted(co[0]["label"].unique().tolist()) == [0, 1, 2, 255]   # stuff -> background


def test_ade150_reduce_zero_label(tmp_path):
    a = tmp_path / "ADEChallengeData2016"
    jpg(a / "images/validation/ADE_val_00000001.jpg"); png(a / "annotations/validation/ADE_val_00000001.png", mask([0, 1, 150]))
    d = create_dataset("ade150", tmp_path, "val")
    assert d.num_classes == 150 and d.class_names[0] == "wall" and d.class_names[-1] == "flag"
    assert sorted(d[0]["label"].unique().tolist()) == [0, 149, 255]


def test_ade847_tiff_and_names(tmp_path):
    a = tmp_path / "ADE20K_2021_17_01"
    (a).mkdir(parents=True)
    (a / "ade847_classes.txt").write_text("\n".join(f"thing{k}, alias" for k in range(847)))
    jpg(a / "images_detectron2/validation/x.jpg")
    png(a / "annotations_detectron2/validation/x.tif", mask([0, 300, 846, 65535], dtype=np.uint16))
    d = create_dataset("ade847", tmp_path, "val")
    assert d.num_classes == 847 and d.ignore_index == 65535 and d.class_names[5] == "thing5"
    assert sorted(d[0]["label"].unique().tolist()) == [0, 300, 846, 65535]


def context_fixture(root):
    import scipy.io
    d = root / "VOCdevkit/VOC2010"
    names = ["accordion", "aeroplane", "bag", "person", "zebra"]  # a 5-name stand-in for the 459 labels.txt
    d.mkdir(parents=True)
    (d / "labels.txt").write_text("".join(f"{k}: {n}\n" for k, n in enumerate(names, 1)))
    (d / "ImageSets/Main").mkdir(parents=True)
    (d / "ImageSets/Main/train.txt").write_text("2008_000001\n")
    (d / "ImageSets/Main/val.txt").write_text("2008_000002\n2008_000003\n")
    for i in ("2008_000001", "2008_000002"):
        jpg(d / f"JPEGImages/{i}.jpg")
        (d / "trainval").mkdir(exist_ok=True)
        scipy.io.savemat(d / f"trainval/{i}.mat", {"LabelMap": mask([0, 1, 2, 4, 5], dtype=np.uint16)})
    return d


def test_pascal_context_59_and_459_via_prepare_convert(tmp_path):
    d = context_fixture(tmp_path)
    import ovseg.prepare as P
    P._convert_pc59(tmp_path)          # the conversion step of prepare_dataset('pc59')
    assert (d / "ImageSets/SegmentationContext/val.txt").read_text() == "2008_000002\n"   # 000003 has no labels
    p59 = create_dataset("pc59", tmp_path, "val")
    assert p59.num_classes == 59 and len(p59) == 1
    # aeroplane -> 0, person -> 36; accordion/zebra/unlabelled -> background -> ignored
    assert sorted(p59[0]["label"].unique().tolist()) == [0, D.PC59.index("person"), 255]
    p459 = create_dataset("pc459", tmp_path, "val")
    assert p459.num_classes == 5 and p459.ignore_index == 65535
    assert sorted(p459[0]["label"].unique().tolist()) == [0, 1, 3, 4, 65535]


# ---------------------------------------------------------------- episodes

def test_fold_class_splits_match_design():
    assert D.pascal5i_fold_classes(0) == [0, 1, 2, 3, 4] and D.pascal5i_fold_classes(3) == [15, 16, 17, 18, 19]
    assert D.coco20i_fold_classes(1) == list(range(1, 80, 4)) and len(D.coco20i_fold_classes(2)) == 20
    names = D.coco20i_names()
    assert len(names) == 80 and names[0] == "person"
    for f in range(4):
        lines = (D.splits_dir() / f"pascal5i/val/fold{f}.txt").read_text().split()
        assert len(lines) == [346, 451, 725, 346][f]
        assert {int(l.split("__")[1]) - 1 for l in lines} == set(D.pascal5i_fold_classes(f))
        # HSNet: training for fold f reads the other folds' trn files -> exactly the 15 base classes
        t = D.Pascal5i.__new__(D.Pascal5i)
        t.fold, t.split, t.max_episodes, t.dir = f, "trn", None, Path("x")
        assert {it[2] for it in t._index()} == set(range(20)) - set(D.pascal5i_fold_classes(f))
        with gzip.open(D.splits_dir() / f"coco20i/trn_fold{f}.json.gz", "rt") as fh:
            trn = json.load(fh)
        assert {int(c) for c, ps in trn.items() if ps} == set(range(80)) - set(D.coco20i_fold_classes(f))
        with gzip.open(D.splits_dir() / f"coco20i/val_fold{f}.json.gz", "rt") as fh:
            val = json.load(fh)
        assert {int(c) for c, ps in val.items() if ps} == set(D.coco20i_fold_classes(f))


def test_pascal5i_episodes(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2012"
    lines = (D.splits_dir() / "pascal5i/val/fold1.txt").read_text().split()[:3]
    for l in lines:
        i, c = l.split("__")
        jpg(voc / f"JPEGImages/{i}.jpg"); png(voc / f"SegmentationClassAug/{i}.png", mask([0, int(c), 255, 3]))
    d = create_dataset("pascal5i", tmp_path, "val", fold=1, max_episodes=3)
    assert len(d) == 3 and d.fold_classes == [5, 6, 7, 8, 9] and len(d.base_classes) == 15
    s = d[0]
    c = int(lines[0].split("__")[1])
    assert s["class_id"] == c - 1 and s["class_name"] == d.class_names[c - 1] and s["id"] == lines[0]
    want = {0, 1, 255} if c != 3 else {1, 255}
    assert set(s["label"].unique().tolist()) == want
    full = D.Pascal5i.__new__(D.Pascal5i)     # list length without images on disk
    full.fold, full.split, full.max_episodes, full.dir = 2, "val", None, voc
    assert len(full._index()) == 725


def test_coco20i_episodes_first_1000_sorted(tmp_path):
    c = tmp_path / "COCO2014"
    with gzip.open(D.splits_dir() / "coco20i/val_fold0.json.gz", "rt") as fh:
        lists = json.load(fh)
    pairs = sorted((p, int(k)) for k, ps in lists.items() for p in ps)
    for p, k in pairs[:2]:
        jpg(c / p); png(c / "annotation" / Path(p).with_suffix(".png"), mask([0, k + 1, 7]))
    d = create_dataset("coco20i", tmp_path, "val", fold=0)
    assert len(d) == 1000 and d.fold_classes[:3] == [0, 4, 8]
    assert [(str(it[0].relative_to(c)), it[2]) for it in d.items[:5]] == [(p, k) for p, k in pairs[:5]]
    s = d[0]
    assert s["class_id"] == pairs[0][1] and s["class_name"] == d.class_names[pairs[0][1]]
    assert set(s["label"].unique().tolist()) <= {0, 1} and (s["label"] == 1).any()
    assert len(create_dataset("coco20i", tmp_path, "val", fold=0, max_episodes=None)) == len(pairs)


def fss_fixture(root, classes=("cat", "dog", "eagle", "fire_truck", "golf_ball")):
    f = root / "FSS-1000"
    for n in classes:
        for k in (1, 2):
            jpg(f / n / f"{k}.jpg", 16, 16)
            Image.fromarray(np.resize(np.array([0, 255], dtype=np.uint8), (16, 16))).convert("RGB").save(f / n / f"{k}.png")
    return f


def test_fss1000_and_mosaic4(tmp_path):
    fss_fixture(tmp_path)
    d = create_dataset("fss1000", tmp_path)
    assert len(d) == 10 and d.class_names[3] == "fire truck"
    s = d[0]
    assert s["label"].dtype == torch.int64 and set(s["label"].unique().tolist()) == {0, 1}
    m1 = create_dataset("mosaic4", tmp_path, n=3, seed=7, size=32)
    m2 = create_dataset("mosaic4", tmp_path, n=3, seed=7, size=32)
    assert len(m1) == 12 and m1.mosaics == m2.mosaics
    assert m1.mosaics != create_dataset("mosaic4", tmp_path, n=3, seed=8, size=32).mosaics
    e = m1[5]   # mosaic 1, quadrant 1 (top right)
    assert e["image"].shape == (3, 32, 32) and len(set(e["names"])) == 4 and e["class_name"] == e["names"][1]
    assert e["label"][:, :16].sum() == 0 and e["label"][16:].sum() == 0 and e["label"][:16, 16:].sum() > 0
    assert torch.equal(m1[5]["image"], m2[5]["image"])


# ---------------------------------------------------------------- errors, corrupt files

def test_missing_dataset_names_path_and_prepare_command(tmp_path):
    for name in ("voc21", "ade150", "coco_stuff171", "pascal5i", "coco20i", "fss1000", "pc459"):
        with pytest.raises(DatasetNotFoundError) as e: create_dataset(name, tmp_path)
        assert str(tmp_path) in str(e.value) and f"prepare_dataset('{name}'" in str(e.value)
    # an image listed but missing: an error naming it, not a bare FileNotFoundError
    voc = tmp_path / "VOCdevkit/VOC2012"; (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("gone\n")
    d = create_dataset("voc21", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="gone.jpg"): d[0]


def test_corrupt_file_is_skipped_and_counted(tmp_path):
    a = tmp_path / "ADEChallengeData2016"
    for i in range(3):
        jpg(a / f"images/validation/x{i}.jpg"); png(a / f"annotations/validation/x{i}.png", mask([i + 1]))
    (a / "images/validation/x1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    d = create_dataset("ade150", tmp_path)
    d.substitute_corrupt = True   # what training splits do by default (evaluation raises: tests/test_trust.py)
    with pytest.warns(UserWarning, match="skipping unreadable"):
        out = [d[i]["id"] for i in range(3)]
    assert out == ["x0", "x2", "x2"] and d.skipped == 1 and "x1.jpg" in d.skipped_files[0]
    # also through a DataLoader worker loop: the epoch completes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = [i for b in torch.utils.data.DataLoader(d, batch_size=2, collate_fn=collate) for i in b["id"]]
    assert len(ids) == 3


def test_bad_label_value_names_file_and_value(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2012"
    jpg(voc / "JPEGImages/a.jpg"); png(voc / "SegmentationClass/a.png", mask([0, 1, 42]))
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\n")
    with pytest.raises(LabelValueError, match=r"a\.png.*42"): create_dataset("voc21", tmp_path)[0]
    coco_stuff_fixture(tmp_path)
    png(tmp_path / "coco/stuffthingmaps/val2017/000000000002.png", mask([200]))
    with pytest.raises(LabelValueError, match="200"): create_dataset("coco_stuff171", tmp_path)[1]


def test_prepare_without_network_and_from_placed_archive(tmp_path, monkeypatch):
    import urllib.request, urllib.error
    def fail(*a, **k): raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(RuntimeError, match=r"ADEChallengeData2016.zip.*re-run prepare_dataset"):
        prepare_dataset("ade150", tmp_path)
    with pytest.raises(RuntimeError, match="by hand"): prepare_dataset("fss1000", tmp_path)
    # an archive placed by hand is unpacked (ADE has no published MD5, so none is checked)
    z = tmp_path / "downloads/ADEChallengeData2016.zip"
    with zipfile.ZipFile(z, "w") as zf:
        import io
        b = io.BytesIO(); Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(b, "JPEG")
        zf.writestr("ADEChallengeData2016/images/validation/v.jpg", b.getvalue())
        b = io.BytesIO(); Image.fromarray(np.ones((8, 8), np.uint8)).save(b, "PNG")
        zf.writestr("ADEChallengeData2016/annotations/validation/v.png", b.getvalue())
    prepare_dataset("ade150", tmp_path)
    assert create_dataset("ade150", tmp_path)[0]["label"].unique().tolist() == [0]
    # a wrong checksum is an error
    (tmp_path / "downloads/VOCtrainval_11-May-2012.tar").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="MD5"): prepare_dataset("voc21", tmp_path)
    assert "md5 6cd6e144" in D.prepare_instructions("voc21")


# ---------------------------------------------------------------- transforms and inference

def test_transforms_keep_masks_nearest():
    torch.manual_seed(0)
    img = torch.rand(3, 31, 47); lab = torch.randint(0, 5, (31, 47)); lab[:, :3] = 255
    inst = torch.stack([lab == 1, lab == 2])
    for t in (D.Resize(short_side=17), D.Resize(size=(64, 50)), D.RandomScaleCrop(40, (0.5, 2.0)),
              D.RandomHFlip(1.0), D.train_transform(24)):
        s = t(dict(image=img, label=lab, instances=inst, id="x"))
        assert s["label"].dtype == torch.int64 and set(s["label"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
        assert s["image"].shape[-2:] == s["label"].shape == s["instances"].shape[-2:]
        assert s["instances"].dtype == torch.bool
    s = D.RandomHFlip(1.0)(dict(image=img, label=lab))
    assert torch.equal(s["label"], lab.flip(-1)) and torch.equal(s["image"], img.flip(-1))
    j = D.PhotometricJitter()
    for _ in range(5):
        s = j(dict(image=img, label=lab))
        assert s["label"] is lab and 0 <= s["image"].min() and s["image"].max() <= 1
    big = D.Resize(size=(62, 94))(dict(image=img, label=lab))
    assert torch.equal(big["label"], lab.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_sliding_window_equals_full_image():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)
    f = lambda x: conv(x)
    img = torch.rand(1, 3, 50, 77)
    with torch.no_grad(): full = f(img)
    for win, stride in ((32, 16), (24, 24), (16, 10), (100, 50)):
        torch.testing.assert_close(sliding_window(f, img, win, stride, 4), full)
    torch.testing.assert_close(sliding_window(f, img[0], (20, 30), (15, 25), 4), full[0])
    probs = tta_predict(f, img, 4, scales=[1.0], flip=True)
    torch.testing.assert_close(probs, full.softmax(1))
    ms = tta_predict(f, img, 4, scales=[0.5, 1.0, 1.5], flip=True, window=32, stride=16)
    assert ms.shape == (1, 4, 50, 77) and torch.allclose(ms.sum(1), torch.ones(1, 50, 77))
    with pytest.raises(ValueError, match="window"): sliding_window(lambda x: x[:, :2], img, 32, 16, 4)


def test_dataloader_workers_and_collate(tmp_path):
    fss_fixture(tmp_path)
    d = create_dataset("fss1000", tmp_path, transform=D.Resize(size=12))
    dl = torch.utils.data.DataLoader(d, batch_size=4, num_workers=1, collate_fn=collate)
    b = next(iter(dl))
    assert b["image"].shape == (4, 3, 12, 12) and b["class_id"].dtype == torch.int64 and len(b["class_name"]) == 4


def test_panoptic_datasets_are_known_before_their_module_is_imported(tmp_path):
    "create_dataset('coco_panoptic') works from ovseg.data alone (the class lives in ovseg.fisa)."
    import subprocess, sys
    code = ("import sys; from ovseg.data import create_dataset, list_datasets\n"
            "assert 'coco_panoptic' in list_datasets() and 'ovseg.fisa' not in sys.modules\n"
            f"try: create_dataset('coco_panoptic', root={str(tmp_path)!r})\n"
            "except KeyError as e: sys.exit(f'unknown: {e}')\n"
            "except Exception as e: print(type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "DatasetNotFoundError" in r.stdout        # known, and its missing folder is named
