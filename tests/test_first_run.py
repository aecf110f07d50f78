"""Issue 22: the README's own example, as a new user runs it. No CLIP weights can be downloaded here, so a
random-weight, real-architecture ViT-B/16 stands in for OpenAI's file -- once in the Hugging Face cache
(what `pretrained="openai"` downloads to), once as the local file docs/weights.md tells users to fetch.
Every assertion is about what the user would get: the activation the model runs with, a label map at
the photo's size, one clear line for every mistake."""
import json, os, re, shlex, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ovseg
from ovseg.cli import main
from ovseg.testing import shared_data, write_paper_weights

ROOT = Path(__file__).resolve().parents[1]
HUB_REPO = "models--timm--vit_base_patch16_clip_224.openai"    # where open_clip's 'openai' tag for ViT-B-16 downloads


def _activation(model) -> str:
    "Name of the MLP activation the dense CLIP's vision tower runs with."
    return type(model.clip.visual.transformer.resblocks[0].mlp.gelu).__name__


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    "weights/ViT-B-16.openai/open_clip_model.safetensors, as docs/weights.md says to download it (random numbers)."
    d = tmp_path_factory.mktemp("weights")
    return Path(write_paper_weights(d, ["open_clip:ViT-B-16-quickgelu"])["open_clip:ViT-B-16-quickgelu"])


@pytest.fixture
def hub_cache(weights, tmp_path, monkeypatch):
    "A Hugging Face cache holding that file where `pretrained='openai'` looks for it (offline: no download)."
    cache = tmp_path / "hub"
    rev = "0" * 40
    snap = cache / HUB_REPO / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").symlink_to(weights)
    (cache / HUB_REPO / "refs").mkdir()
    (cache / HUB_REPO / "refs" / "main").write_text(rev)
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from ovseg.segment import _MODEL_CACHE
    _MODEL_CACHE.clear()
    return cache


@pytest.fixture
def photo(tmp_path):
    "photo.jpg: a real street photo (CamVid test frame, read from ../shared/data), or a synthetic one without it."
    src = shared_data("camvid", "test")
    p = tmp_path / "photo.jpg"
    if src is not None and src.is_dir():    # a quarter-size frame keeps the ViT-B/16 forwards short on a CPU
        Image.open(sorted(src.glob("*.jpg"))[0]).reduce(2).save(p)
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8)).save(p)
    return p


def test_readme_python_example_builds_quickgelu(hub_cache, photo, monkeypatch):
    monkeypatch.chdir(photo.parent)
    r = ovseg.segment("photo.jpg", "cat, sofa, wall", model="ViT-B-16", pretrained="openai")   # the README's line
    W, H = Image.open(photo).size
    assert r.label.shape == (H, W) and r.classes == ["cat", "sofa", "wall"]
    assert _activation(ovseg.load_model("ViT-B-16", "openai")) == "QuickGELU"
    ovseg.segment.overlay(r).save("overlay.png")


def test_readme_local_file_route_builds_quickgelu(weights, photo):
    r = ovseg.segment(photo, "road, car, sky", model="ViT-B-16", pretrained=str(weights), background_threshold=0.5,
                      device="cpu")
    assert r.classes[0] == "background" and r.label.max() <= 3
    assert _activation(ovseg.load_model("ViT-B-16", str(weights))) == "QuickGELU"
    assert _activation(ovseg.load_model("ViT-B-16-quickgelu", str(weights))) == "QuickGELU"


def test_control_file_that_does_not_say_openai_is_gelu_with_a_warning(weights, tmp_path):
    "The control: without the rule's evidence the plain config is GELU -- and the user is told, not left guessing."
    plain = tmp_path / "clip.safetensors"; plain.symlink_to(weights)
    with pytest.warns(UserWarning, match="ViT-B-16-quickgelu"):
        m = ovseg.load_model("ViT-B-16", str(plain))
    assert _activation(m) == "GELU"


def _quoted_segment_commands() -> list[tuple[str, str]]:
    "(file, command) for every concrete `ovseg segment ... --model ViT-B-16...` quoted in the README and docs."
    out = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in re.finditer(r"^(ovseg segment [^\n`]*--model ViT-B-16[^\n`]*)$", f.read_text(), re.M):
            out.append((f.name, m.group(1).split("  #")[0].strip()))
    return out


def test_readme_and_docs_segment_commands_run(hub_cache, weights, photo, tmp_path, monkeypatch, capsys):
    cmds = _quoted_segment_commands()
    assert any(f == "README.md" for f, _ in cmds), "the README quotes no `ovseg segment --model ViT-B-16` command"
    (tmp_path / "weights" / "ViT-B-16.openai").mkdir(parents=True)
    (tmp_path / "weights" / "ViT-B-16.openai" / "open_clip_model.safetensors").symlink_to(weights)
    monkeypatch.chdir(tmp_path)
    for i, (f, cmd) in enumerate(cmds):
        argv = shlex.split(cmd)[1:]
        if "..." in argv or "--out" not in argv: continue           # a synopsis, not a runnable command
        argv[argv.index("--out") + 1] = f"seg{i}"
        argv = [str(photo) if a == "photo.jpg" else a for a in argv]
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 0, f"{f}: `{cmd}` -> {rc}: {err}"
        assert len(list(Path(f"seg{i}").glob("*_label.png"))) == 1


def test_paper_profile_encoders_build_from_local_files(tmp_path):
    "Every encoder spec the `paper` profile names builds from a local random-weight file; its CLIPs run QuickGELU."
    import yaml
    import ovseg.maskgen   # registers timm-features:
    from ovseg.encoders import create_clip, create_text_encoder, create_visual_encoder
    paper = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["paper"]
    specs = set()
    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items(): walk(k); walk(v)
        elif isinstance(x, list):
            for v in x: walk(v)
        elif isinstance(x, str):
            specs.update(s for s in x.split("|") if re.match(r"(open_clip:|timm-features:|dino-|mocov3-|bert-base$)", s))
    walk(paper)
    assert {"open_clip:ViT-L-14-quickgelu", "dino-vitb16", "bert-base", "mocov3-vitb"} <= specs, specs
    clip_specs = {s for s in specs if s.startswith("open_clip:")}
    assert all(s.endswith("-quickgelu") for s in clip_specs), f"OpenAI CLIPs named without -quickgelu: {clip_specs}"
    files = write_paper_weights(tmp_path, sorted(specs))
    for s in sorted(specs):
        if s.startswith("open_clip:"):
            v, t = create_clip(s, pretrained=files[s])
            assert type(v.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU", s
            assert v(torch.rand(1, 3, 224, 224)).dense.shape[-2:] == (224 // v.stride,) * 2
        elif s == "bert-base":
            assert create_text_encoder(s, weights=files[s]).encode_classes(["cat"], templates="plain").shape == (1, 768)
        else:
            create_visual_encoder(s, weights=files[s])
    # the segment block's model too (a bare open_clip name)
    assert paper["segment"]["model"].endswith("-quickgelu") or paper["segment"]["pretrained"] == "openai"


def test_cli_checks_before_torch_and_speaks_flags(tmp_path):
    "A typo costs no model load: the CLI answers before importing torch, in flags, on one line."
    code = ("import sys; from ovseg.cli import main\n"
            f"rc = main(['segment', {str(tmp_path / 'x.jpg')!r}, '--classes', 'a', '--model', 'ViT-B-16', '--out', 'o'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ovseg: error:") and "--pretrained" in lines[0]
    assert "pretrained=" not in lines[0]


def test_default_model_missing_names_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path); monkeypatch.delenv("OVSEG_MODEL", raising=False)
    Image.new("RGB", (8, 8)).save("p.png")
    assert main(["segment", "p.png", "--classes", "a, b", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "dvc repro embedded_clip" in err and "synthetic" in err and err.count("\n") == 1


def test_models_lists_saved_runs_and_open_clip_names(tmp_path, monkeypatch, capsys):
    from ovseg.testing import tiny_clip_dir
    monkeypatch.chdir(tmp_path)
    tiny_clip_dir(tmp_path / "outputs" / "embedded_clip")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "outputs/embedded_clip  (open_clip folder)" in out and "ViT-B-16-quickgelu" in out and "openai" in out


def test_segment_signature_and_help():
    import inspect
    sig = inspect.signature(ovseg.segment)
    assert list(sig.parameters)[:4] == ["image", "classes", "model", "pretrained"] and "device" in sig.parameters
    assert all(f"{p}:" in inspect.getdoc(ovseg.segment.segment) for p in sig.parameters)
    import pkgutil
    mods = {m.name for m in pkgutil.iter_modules(ovseg.__path__) if not m.name.startswith("_")}
    assert all(f"`ovseg.{m}`" in ovseg.__doc__ for m in mods), sorted(m for m in mods if f"`ovseg.{m}`" not in ovseg.__doc__)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_segment_on_cuda(weights, photo):
    r = ovseg.segment(photo, "road, car, sky", model="ViT-B-16", pretrained=str(weights), device="cuda")
    m = ovseg.load_model("ViT-B-16", str(weights), device="cuda")
    assert next(m.parameters()).is_cuda and r.probs.device.type == "cpu" and r.label.shape[::-1] == Image.open(photo).size


def test_device_cuda_without_gpu_is_one_clear_error(photo, capsys):
    if torch.cuda.is_available(): pytest.skip("this machine has CUDA")
    assert main(["segment", str(photo), "--classes", "a", "--model", "ViT-B-16", "--pretrained", "openai",
                 "--device", "cuda", "--out", str(photo.parent / "o")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA" in err and "--device cpu" in err


def test_training_free_method_from_python_and_cli(tmp_path, capsys):
    "ovseg.segment(..., method=) and `ovseg segment --method` reach the training-free switch; a trained model refuses it."
    from ovseg.testing import tiny_clip_dir
    clip = tiny_clip_dir(tmp_path / "clip")
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)
    a = ovseg.segment(img, "a, b, c", model=str(clip), method="sclip", device="cpu")
    b = ovseg.segment(img, "a, b, c", model=str(clip), device="cpu")
    assert not torch.equal(a.probs, b.probs)            # the switch changes the last block
    Image.fromarray(img).save(tmp_path / "p.png")
    assert main(["segment", str(tmp_path / "p.png"), "--classes", "a, b", "--model", str(clip), "--method", "clearclip",
                 "--out", str(tmp_path / "o")]) == 0
    with pytest.raises(SystemExit) as e:                # argparse: the choices are listed
        main(["segment", str(tmp_path / "p.png"), "--classes", "a, b", "--model", str(clip), "--method", "nope",
              "--out", str(tmp_path / "o2")])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_method_list_is_the_dense_clip_one():
    "The CLI keeps its own copy of the method names so `--help` needs no torch; it must not drift from ovseg.denseclip's."
    import ovseg.cli, ovseg.denseclip
    assert ovseg.cli.TF_METHODS == ovseg.denseclip.TF_METHODS
