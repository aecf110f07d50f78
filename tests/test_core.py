import json, textwrap
import numpy as np, pytest, torch
from ovseg.core import (ConfigError, load_config, seed_everything, pick_device, pick_dtype,
                        autocast, atomic_write, atomic_write_text)

def write(tmp_path, text):
    p = tmp_path / "params.yaml"; p.write_text(textwrap.dedent(text)); return p

def test_repository_params_load_for_both_profiles():
    for name in ("embedded", "paper"):
        cfg = load_config("params.yaml", name)
        assert cfg.profile == name
    assert load_config("params.yaml").profile == "embedded"   # the default a fresh clone runs

@pytest.mark.parametrize("body,needle", [
    ("profiles: {embedded: {runtime: {devcie: cpu}}}", "did you mean 'device'"),
    ("profiles: {embedded: {runtime: {device: gpu}}}", "profiles.embedded.runtime.device = 'gpu'"),
    ("profiles: {embedded: {runtime: {threads: 1.5}}}", "must be an integer"),
    ("profiles: {embedded: {runtime: {compile: 'yes'}}}", "must be true or false"),
    ("profiles: {embedded: {nonsense: 1}}", "unknown key 'profiles.embedded.nonsense'"),
    ("profile: embedded\nprofles: {}", "unknown top-level key"),
    ("profiles: {embedded: [1, 2]}", "must be a mapping"),
    ("profiles: {embedded: {runtime: {device: cpu}\n", "not valid YAML"),
])
def test_bad_settings_name_the_file_and_key(tmp_path, body, needle):
    p = write(tmp_path, body)
    with pytest.raises(ConfigError) as e: load_config(p)
    assert needle in str(e.value) and str(p) in str(e.value)

def test_missing_profile_lists_available(tmp_path):
    p = write(tmp_path, "profiles: {embedded: {}}")
    with pytest.raises(ConfigError, match="available: embedded"): load_config(p, "paper")

def test_env_var_selects_profile(tmp_path, monkeypatch):
    p = write(tmp_path, "profiles: {embedded: {}, paper: {runtime: {precision: bf16}}}")
    monkeypatch.setenv("OVSEG_PROFILE", "paper")
    assert load_config(p).params.runtime.precision == "bf16"

def test_seeding_reproduces_all_rngs():
    import random
    def draw():
        g = seed_everything(11)
        return random.random(), np.random.rand(), torch.rand(3).tolist(), torch.randperm(10, generator=g).tolist()
    assert draw() == draw()
    seed_everything(12); other = torch.rand(3).tolist()
    assert other != draw()[2]

def test_device_and_precision_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype(torch.device("cpu")) is None
    assert pick_dtype(torch.device("cuda")) is torch.bfloat16
    assert pick_dtype(torch.device("cuda"), "fp32") is None
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="runtime.device"): pick_device("cuda")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16

def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = atomic_write_text(tmp_path / "a.json", json.dumps({"v": 1}))
    def fail(tmp): tmp.write_text("half"); raise RuntimeError("crash")
    with pytest.raises(RuntimeError): atomic_write(p, fail)
    assert json.loads(p.read_text()) == {"v": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]

def test_atomic_write_gives_normal_permissions(tmp_path):
    import os, stat
    umask = os.umask(0o022)
    try: p = atomic_write_text(tmp_path / "b.txt", "x")
    finally: os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644

def test_progress_disable_with_env(monkeypatch):
    from ovseg.core import progress
    monkeypatch.setenv("OVSEG_PROGRESS", "0")
    assert list(progress(range(3), "x", disable=True)) == [0, 1, 2]
    assert list(progress(range(3), "x")) == [0, 1, 2]


def test_a_notebook_section_loads_after_its_namespace_is_gone(tmp_path):
    "nbdev-test runs notebooks in one process: a section a notebook registered from __main__ still loads in the next one."
    import sys, types
    from ovseg import core
    ns = {"__name__": "__main__"}
    exec("from __future__ import annotations\nfrom dataclasses import dataclass, field\n"
         "@dataclass\nclass LeakInner:\n    k: int = 1\n"
         "@dataclass\nclass LeakOuter:\n    inner: LeakInner = field(default_factory=LeakInner)\n", ns)
    main = types.ModuleType("__main__"); main.__dict__.update(ns)
    old = sys.modules["__main__"]; sys.modules["__main__"] = main
    try: core.register_section("leaktest", ns["LeakOuter"])
    finally: sys.modules["__main__"] = old        # the notebook is gone: LeakInner is not in this process's __main__
    try:
        p = tmp_path / "p.yaml"
        p.write_text("profile: embedded\nprofiles:\n  embedded:\n    leaktest: {inner: {k: 3}}\n")
        assert core.load_config(p, "embedded").params.leaktest.inner.k == 3
    finally:
        core.SECTIONS.pop("leaktest", None); core._PROFILE[0] = None
