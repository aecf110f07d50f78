import json, os, subprocess, sys
import numpy as np
import pytest, torch, open_clip
from PIL import Image
from ovseg.cli import main

torch.set_num_threads(1)

@pytest.fixture
def imgs(tmp_path):
    d = tmp_path / "imgs"; d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(d / "b.jpg")
    (d / "c.png").write_bytes(b"broken")
    return d

def test_single_file(clipdir, imgs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["segment", str(imgs / "a.png"), "--classes", "cat, sofa, wall", "--model", str(clipdir),
                 "--background-threshold", "0.5", "--out", str(out)]) == 0
    a = json.loads((out / "a_areas.json").read_text())
    assert a["classes"] == ["background", "cat", "sofa", "wall"] and a["size"] == [30, 40]
    assert abs(sum(v["pixels"] for v in a["areas"].values()) - 1200) == 0
    lab = Image.open(out / "a_label.png"); assert lab.mode == "P" and lab.size == (40, 30)
    assert Image.open(out / "a_overlay.png").size[0] > 40

def test_batch_skips_bad(clipdir, imgs, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["segment", str(imgs), "--classes", "cat, sofa", "--model", str(clipdir), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "c.png" in err and "Traceback" not in err
    assert {p.name for p in out.iterdir()} == {f"{s}_{k}" for s in "ab" for k in ("label.png", "overlay.png", "areas.json")}

def test_single_bad_file_is_error(clipdir, imgs, tmp_path, capsys):
    assert main(["segment", str(imgs / "c.png"), "--classes", "cat", "--model", str(clipdir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovseg: error: cannot read image") and "Traceback" not in err

def test_class_list_messages(clipdir, imgs, tmp_path, capsys):
    assert main(["segment", str(imgs / "a.png"), "--classes", "", "--model", str(clipdir), "--out", str(tmp_path)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["segment", str(imgs / "a.png"), "--classes", "cat, ,dog", "--model", str(clipdir), "--out", str(tmp_path)]) == 2
    assert "blank" in capsys.readouterr().err
    assert main(["segment", str(imgs / "a.png"), "--classes", "cat, Cat", "--model", str(clipdir), "--out", str(tmp_path)]) == 0
    assert "duplicate" in capsys.readouterr().err

def test_unknown_model(imgs, tmp_path, capsys):
    assert main(["segment", str(imgs / "a.png"), "--classes", "cat", "--model", "ViT-B-61", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ViT-B-16" in err and len(err) < 600   # the closest names, not all of open_clip's

def test_eval(clipdir, imgs, tmp_path, capsys):
    labs = tmp_path / "labs"; labs.mkdir()
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(labs / "a.png")
    assert main(["eval", str(imgs), str(labs), "--classes", "cat, sofa", "--model", str(clipdir),
                 "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["images"] == 1 and 0 <= m["mIoU"] <= 100

def test_train_then_segment(clipdir, imgs, tmp_path, capsys):
    "`ovseg train` on a tiny world + tiny CLIP writes a checkpoint that `ovseg segment` loads and runs."
    spec = f"open_clip:{clipdir}"
    params = {"profile": "embedded", "seed": 0, "profiles": {"embedded": {
        "runtime": {"device": "cpu", "threads": 1}, "encoders": {"cache_dir": ""},
        "world": {"image_size": 64, "n_train": 24, "n_val": 12, "out_dir": str(tmp_path / "world")},
        "train": {"max_steps": 5, "batch_size": 8, "log_every": 1},
        "fusioner": {"model": {"visual": spec, "text": spec, "dim": 16, "depth": 1, "heads": 2, "drop_path": 0.0,
                               "decoder_channels": [8, 8, 8, 8], "templates": "plain"}, "episodes_per_fold": 8, "folds": [1]}}}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    ck = tmp_path / "ck"
    assert main(["train", "--params", str(tmp_path / "params.yaml"), "--steps", "3", "--seed", "1", "--out", str(ck)]) == 0
    assert "saved" in capsys.readouterr().out
    meta = json.loads((ck / "config.json").read_text())
    assert meta["arch"] == "fusioner" and meta["config"]["visual"] == spec and (ck / "model.safetensors").exists()
    ev = json.loads((ck / "eval.json").read_text())
    assert ev["fold"] == 1 and ev["seed"] == 1 and 0 <= ev["mIoU"] <= 100
    assert json.loads((ck / "metrics.json").read_text())["step"] == 3
    out = tmp_path / "seg"
    assert main(["segment", str(imgs / "a.png"), "--classes", "red circle, blue square", "--model", str(ck),
                 "--window", "64", "--stride", "48", "--out", str(out)]) == 0
    a = json.loads((out / "a_areas.json").read_text())
    assert a["classes"] == ["red circle", "blue square"] and a["size"] == [30, 40]
    from ovseg.segment import segment
    r = segment(torch.rand(3, 48, 64), ["red circle", "blue square"], model=str(ck), window=64, stride=48)
    assert r.label.shape == (48, 64)

def test_train_bad_params(tmp_path, capsys):
    assert main(["train", "--params", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err

def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "ovseg")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-c", "import sys; from ovseg.cli import main; sys.exit(main())"]
    r = subprocess.run(cmd + ["segment", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--classes" in r.stdout and "--background-threshold" in r.stdout
