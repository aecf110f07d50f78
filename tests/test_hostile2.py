"""Issue 26: the second round of bad input and faults. Each test is one item of the issue; the user-facing
promise it checks is in the README's "What happens when..." table and docs/reliability.md."""
import contextlib, errno, io, json, os, subprocess, sys, textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovseg.cli import main
from ovseg.core import ConfigError, TrainConfig, load_config
from ovseg.testing import ToyConfig, ToyData, ToyModel, tiny_clip_dir
from ovseg.train import CheckpointError, NonFiniteTrainingError, fit, from_pretrained, save_pretrained

torch.set_num_threads(1)


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main([str(a) for a in argv])
        except SystemExit as e: rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _one_error(err: str, *names) -> str:
    lines = [l for l in err.splitlines() if l.startswith("ovseg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in names: assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def _img(p: Path, colour=(200, 30, 30)) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(p)
    return p


@pytest.fixture
def clip(tmp_path):
    return tiny_clip_dir(tmp_path / "clip")


# -------------------------------------------------------------- 1. eval --out never replaces a user's file
def test_01_eval_out_never_replaces_an_input_or_existing_file(clip, tmp_path):
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    _img(imgs / "a.png"); labs.mkdir(); Image.fromarray(np.zeros((30, 40), np.uint8)).save(labs / "a.png")
    before = (imgs / "a.png").read_bytes()
    rc, _, err = _cli("eval", imgs, labs, "--classes", "cat, dog", "--model", clip, "--out", imgs / "a.png", "--overwrite")
    assert rc == 2 and (imgs / "a.png").read_bytes() == before
    _one_error(err, "inside the input folder")
    (tmp_path / "m.json").write_text("{\"mine\": 1}")
    rc, _, err = _cli("eval", imgs, labs, "--classes", "cat, dog", "--model", clip, "--out", tmp_path / "m.json")
    assert rc == 2 and json.loads((tmp_path / "m.json").read_text()) == {"mine": 1}
    _one_error(err, "already exists", "--overwrite")
    rc, _, _ = _cli("eval", imgs, labs, "--classes", "cat, dog", "--model", clip, "--out", tmp_path / "m.json", "--overwrite")
    assert rc == 0 and "mIoU" in json.loads((tmp_path / "m.json").read_text())


# -------------------------------------------------------------- 2. train --out never replaces a saved model
def test_02_train_out_holding_a_model_is_refused(tmp_path):
    d = save_pretrained(ToyModel(ToyConfig()), tmp_path / "model")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    rc, _, err = _cli("train", "--params", "params.yaml", "--out", d)
    assert rc == 2 and {p.name: p.read_bytes() for p in d.iterdir()} == before
    _one_error(err, "already holds a saved model", "--overwrite")


# -------------------------------------------------------------- 3. nothing blocks on a FIFO
def test_03_fifos_are_refused_by_type_never_opened(clip, tmp_path):
    os.mkfifo(tmp_path / "in.png")
    labs = tmp_path / "labs"; labs.mkdir(); os.mkfifo(labs / "a.png")
    _img(tmp_path / "imgs" / "a.png")
    ck = save_pretrained(ToyModel(ToyConfig()), tmp_path / "ck"); (ck / "config.json").unlink(); os.mkfifo(ck / "config.json")
    code = textwrap.dedent(f"""
        import sys
        from ovseg.cli import main
        from ovseg.train import from_pretrained, CheckpointError
        assert main(['segment', {str(tmp_path / 'in.png')!r}, '--classes', 'a', '--model', {str(clip)!r}, '--out', {str(tmp_path / 'o')!r}]) == 2
        assert main(['eval', {str(tmp_path / 'imgs')!r}, {str(labs)!r}, '--classes', 'a, b', '--model', {str(clip)!r}]) == 1
        try: from_pretrained({str(ck)!r}); sys.exit('loaded a FIFO')
        except CheckpointError as e: assert 'FIFO' in str(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("FIFO") >= 2          # the segment input and the eval label, each named


# -------------------------------------------------------------- 4. non-finite training is never saved as a model
def test_04_infinite_lr_is_a_settings_error(tmp_path):
    (tmp_path / "p.yaml").write_text("profile: e\nseed: 0\nprofiles:\n  e:\n    train: {lr: .inf}\n")
    with pytest.raises(ConfigError, match=r"train.lr = inf must be a finite number"):
        load_config(tmp_path / "p.yaml")


class _Exploding(ToyModel):
    arch = "toy"
    def training_loss(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        loss = super().training_loss(batch)
        return loss * float("nan") if self.calls == 4 else loss


def test_04_nonfinite_loss_stops_with_the_last_finite_checkpoint(tmp_path):
    torch.manual_seed(0)
    m = _Exploding(ToyConfig(dropout=0.0))
    tc = TrainConfig(max_steps=10, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1, device="cpu", seed=0)
    with pytest.raises(NonFiniteTrainingError, match="step 4.*last finite state"):
        fit(m, torch.utils.data.DataLoader(ToyData(64), batch_size=8), tc, tmp_path)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and not (tmp_path / "model").exists()
    assert all(torch.isfinite(p).all() for p in m.parameters())


# -------------------------------------------------------------- 5. NaN weights are refused at load
def test_05_checkpoint_with_nan_weights_is_refused(tmp_path):
    m = ToyModel(ToyConfig())
    with torch.no_grad(): m.net[0].weight[0, 0] = float("nan")
    d = save_pretrained(m, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="non-finite weights.*net.0.weight"):
        from_pretrained(d)


# -------------------------------------------------------------- 6. no traceback from bad weights or a full disk
def test_06_pretrained_pickle_or_corrupt_file_is_one_error(tmp_path):
    import pickle
    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"x": 1}))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    _img(tmp_path / "a.png")
    for f in ("evil.bin", "junk.safetensors"):
        rc, _, err = _cli("segment", tmp_path / "a.png", "--classes", "a, b", "--model", "ViT-B-32",
                          "--pretrained", tmp_path / f, "--out", tmp_path / "o")
        assert rc == 2, err
        _one_error(err, f)


def test_06_disk_full_while_checkpointing_is_one_error(tmp_path, monkeypatch):
    import ovseg.train as T
    def full(*a, **k): raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(T, "save_file", full)
    tc = TrainConfig(max_steps=2, batch_size=8, lr=1e-2, log_every=1, device="cpu", seed=0)
    with pytest.raises(CheckpointError, match="could not write the checkpoint.*free disk space"):
        fit(ToyModel(ToyConfig()), torch.utils.data.DataLoader(ToyData(32), batch_size=8), tc, tmp_path)


# -------------------------------------------------------------- 7. segment outputs: all files or none
def test_07_disk_full_while_saving_leaves_nothing_half_written(clip, tmp_path, monkeypatch):
    _img(tmp_path / "a.png")
    real_save = Image.Image.save
    def full(self, fp, *a, **k):
        if "overlay" in str(fp): raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, "save", full)
    rc, _, err = _cli("segment", tmp_path / "a.png", "--classes", "a, b", "--model", clip, "--out", tmp_path / "o")
    assert rc == 2 and list((tmp_path / "o").iterdir()) == []
    _one_error(err, "a", "nothing of it was kept")
    monkeypatch.setattr(Image.Image, "save", real_save)
    rc, _, _ = _cli("segment", tmp_path / "a.png", "--classes", "a, b", "--model", clip, "--out", tmp_path / "o")
    assert rc == 0 and len(list((tmp_path / "o").iterdir())) == 3      # the next run is not refused


# -------------------------------------------------------------- 8. unreadable folder entries are reported
def test_08_dangling_link_and_fifo_in_a_folder_are_listed(clip, tmp_path):
    src = tmp_path / "in"; _img(src / "good.png")
    os.symlink(tmp_path / "gone.jpg", src / "photo.jpg"); os.mkfifo(src / "pipe.png")
    rc, out, err = _cli("segment", src, "--classes", "a, b", "--model", clip, "--out", tmp_path / "o")
    assert rc == 1 and "segmented 1 of 3 images" in out
    assert "photo.jpg" in err and "broken symbolic link" in err and "pipe.png" in err and "FIFO" in err


# -------------------------------------------------------------- 9. settings are typed strictly
def test_09_duplicate_yaml_key_is_an_error(tmp_path):
    (tmp_path / "p.yaml").write_text("profile: e\nseed: 0\nprofiles:\n  e:\n    train: {lr: 0.1}\n    train: {lr: 0.2}\n")
    with pytest.raises(ConfigError, match="'train' is given twice"):
        load_config(tmp_path / "p.yaml")


def test_09_string_for_a_bool_in_a_checkpoint_config_is_an_error(tmp_path):
    m = ToyModel(ToyConfig()); d = save_pretrained(m, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text()); meta["config"]["dropout"] = "0.1"
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="dropout.*must be a number"):
        from_pretrained(d)


# -------------------------------------------------------------- 10. no silently wrong numbers
def test_10_metrics_refuse_nan_logits_and_fractional_labels():
    from ovseg.metrics import SemanticMetric
    m = SemanticMetric(2)
    with pytest.raises(ValueError, match="non-finite"):
        m.update(torch.full((1, 2, 4, 4), float("nan")), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="whole class indices"):
        m.update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 0.5))
    m.update(torch.zeros(4, 4, dtype=torch.long), torch.ones(4, 4))           # whole-number floats are fine
    assert m.confmat.sum() == 16


def test_10_images_nan_ambiguous_int_empty_and_32bit(tmp_path):
    from ovseg.images import ImageError, read_image
    a = np.random.rand(8, 8, 3).astype(np.float32); a[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match="NaN"): read_image(a)
    with pytest.raises(ImageError, match="ambiguous"): read_image(np.full((8, 8), 300, np.int64))
    with pytest.raises(ImageError, match="empty"): read_image(np.zeros((0, 5, 3), np.uint8))
    ramp = (np.linspace(0, 2 ** 31 - 1, 64 * 64).reshape(64, 64)).astype(np.int32)
    Image.fromarray(ramp, "I").save(tmp_path / "deep.tif")
    levels = np.unique(np.asarray(read_image(tmp_path / "deep.tif"))[..., 0])
    assert len(levels) > 200                                                  # not 5 saturated grey levels


# -------------------------------------------------------------- 11. messages name the file or key
def test_11_messages_name_what_is_wrong(clip, tmp_path):
    _img(tmp_path / "good.png")
    rc, _, err = _cli("segment", tmp_path / "good.png", "--classes", "a", "--model", tmp_path / "good.png", "--out", tmp_path / "o")
    assert rc == 2; _one_error(err, "is a file, not a model")
    (tmp_path / "taken").write_text("x")
    rc, _, err = _cli("segment", tmp_path / "good.png", "--classes", "a", "--model", clip, "--out", tmp_path / "taken")
    assert rc == 2; _one_error(err, "--out", "is a file")
    rc, _, err = _cli("eval", tmp_path / "good.png", tmp_path, "--classes", "a", "--model", clip)
    assert rc == 2; _one_error(err, "IMAGES_DIR", "good.png")


# -------------------------------------------------------------- 12. a resumed run logs what an uninterrupted one logs
def test_12_resume_reports_the_same_running_loss(tmp_path):
    tc = TrainConfig(max_steps=8, batch_size=8, lr=1e-2, warmup_steps=0, log_every=4, device="cpu", seed=0)
    dl = lambda: torch.utils.data.DataLoader(ToyData(64), batch_size=8)
    torch.manual_seed(0); a = ToyModel(ToyConfig(dropout=0.0)); fit(a, dl(), tc, tmp_path / "a")
    torch.manual_seed(0); b = ToyModel(ToyConfig(dropout=0.0)); fit(b, dl(), tc, tmp_path / "b", stop_after=2)
    fit(b, dl(), tc, tmp_path / "b", resume=True)
    la = (tmp_path / "a" / "train_log.tsv").read_text().splitlines()
    lb = (tmp_path / "b" / "train_log.tsv").read_text().splitlines()
    col = la[0].split("\t").index("loss")
    assert [l.split("\t")[col] for l in la[1:]] == [l.split("\t")[col] for l in lb[1:]]
    assert json.loads((tmp_path / "a/metrics.json").read_text())["train_loss"] == json.loads((tmp_path / "b/metrics.json").read_text())["train_loss"]


def test_09_residual_yes_in_a_dense_clip_config_is_an_error(clip, tmp_path):
    from ovseg.denseclip import DenseCLIP
    d = DenseCLIP.from_open_clip(str(clip)).save_pretrained(tmp_path / "dc")
    meta = json.loads((d / "config.json").read_text()); meta["config"]["residual"] = "yes"
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="'residual' = 'yes' must be true or false"):
        from_pretrained(d)
