"""`import ovseg` from another project: fast, lazy entry points, `python -m ovseg`, `--version`,
and dependency ranges that the exact pins of requirements.lock satisfy.
Also run by scripts/check_install.sh inside a clean venv with another torch."""
import subprocess, sys, tomllib
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def _py(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()

def test_import_is_lazy():
    # the entry points are listed by dir() but nothing heavy is imported until one is used
    out = _py("import ovseg, sys; print('torch' in sys.modules, 'open_clip' in sys.modules, "
              "'segment' in dir(ovseg) and 'load_model' in dir(ovseg))")
    assert out == "False False True"

def test_entry_points_resolve_to_their_modules():
    import importlib, ovseg
    import ovseg.encoders as enc
    seg_mod = importlib.import_module("ovseg.segment")
    assert ovseg.load_model is seg_mod.load_model
    assert ovseg.create_visual_encoder is enc.create_visual_encoder
    assert ovseg.create_text_encoder is enc.create_text_encoder and ovseg.create_clip is enc.create_clip
    with pytest.raises(AttributeError, match="no_such_thing"): ovseg.no_such_thing

@pytest.mark.parametrize("first", ["import ovseg", "from ovseg.segment import parse_classes; import ovseg"])
def test_segment_is_callable_whatever_was_imported_first(first):
    # `ovseg.segment(image, classes)` calls the function, `ovseg.segment.parse_classes` is the module's
    out = _py(first + "\nimport ovseg.segment as m; print(callable(ovseg.segment), m is ovseg.segment, "
              "hasattr(m, 'parse_classes'))")
    assert out == "True True True"

def test_segment_call_goes_to_the_function(monkeypatch):
    import ovseg, ovseg.segment as m
    monkeypatch.setattr(m, "segment", lambda *a, **k: ("called", a, k))
    assert ovseg.segment("img", "cat, dog", model="x") == ("called", ("img", "cat, dog"), {"model": "x"})

def test_python_m_ovseg_and_version():
    import ovseg
    r = subprocess.run([sys.executable, "-m", "ovseg", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"ovseg {ovseg.__version__}", r.stderr
    r = subprocess.run([sys.executable, "-m", "ovseg", "segment", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--classes" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ovseg"], capture_output=True, text=True)
    assert r.returncode == 2 and "segment" in r.stdout   # no subcommand: usage, exit 2

def _requirements():
    from packaging.requirements import Requirement
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(s) for s in proj["dependencies"]]

def test_dependencies_are_ranges():
    pinned = [str(r) for r in _requirements() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"pyproject.toml pins {pinned}: give ranges; exact pins belong in requirements.lock"

def test_lock_satisfies_ranges_and_torch_floor_is_the_locked_torch():
    lock = ROOT / "requirements.lock"
    if not lock.exists(): pytest.skip("no requirements.lock next to the tests (installed copy)")
    from packaging.utils import canonicalize_name as canon
    pins = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split(";")[0].strip().split("==")
            pins[canon(name)] = ver
    for r in _requirements():
        assert canon(r.name) in pins, f"{r.name} is a dependency but not pinned in requirements.lock"
        assert r.specifier.contains(pins[canon(r.name)], prereleases=True), \
            f"requirements.lock pins {r.name}=={pins[canon(r.name)]}, outside pyproject's {r.specifier}"
    # torch's lower bound is the oldest torch tested, which is the locked one
    torch_req = next(r for r in _requirements() if canon(r.name) == "torch")
    floor = next(s.version for s in torch_req.specifier if s.operator == ">=")
    assert pins["torch"].startswith(floor), (floor, pins["torch"])
