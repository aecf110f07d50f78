import json, math, os, socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from ovseg.core import TrainConfig
from ovseg.testing import ToyConfig, ToyData, ToyModel
from ovseg.train import (fit, from_pretrained, group_schedule, lr_at, param_groups, register_arch,
                         save_pretrained, save_checkpoint, wd_at, EpochSampler, ARCHS)

torch.set_num_threads(1)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _loader(bs=8, n=64):
    return torch.utils.data.DataLoader(ToyData(n), batch_size=bs)


def _model(dropout=0.1):
    torch.manual_seed(0)
    return ToyModel(ToyConfig(dropout=dropout))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_schedules():
    total, warm = 50, 5
    lrs = [lr_at(s, total, 1.0, warm, 0.1) for s in range(total)]
    assert lrs[:warm] == pytest.approx([(i + 1) / warm for i in range(warm)])
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # cosine decays monotonically
    assert lr_at(total, total, 1.0, warm, 0.1) == pytest.approx(0.1)
    wds = [wd_at(s, total, 0.01, 0.4) for s in range(total)]
    assert wds[0] == pytest.approx(0.01) and wds[-1] == pytest.approx(0.4)
    assert all(a <= b for a, b in zip(wds, wds[1:]))
    assert wd_at(total // 2, total + 1, 0.0, 1.0) == pytest.approx(0.5)


def test_poly_schedule():
    "detectron2's WarmupPolyLR: base * factor * (1 - it/max_it)^0.9 (factor: linear warm-up, 1 after); control: not cosine."
    total, base = 1000, 1e-4
    for step in (0, 1, 250, 500, 999):
        assert lr_at(step, total, base, schedule="poly") == pytest.approx(base * (1 - step / total) ** 0.9, rel=1e-12)
    assert lr_at(500, total, base, schedule="poly") == pytest.approx(5.358867e-05, rel=1e-6)   # 1e-4 * 0.5^0.9
    assert lr_at(500, total, base) == pytest.approx(5e-05)                                     # the cosine at t = 0.5
    assert lr_at(4, total, base, warmup=10, schedule="poly") == pytest.approx(base * 0.5 * (1 - 4 / total) ** 0.9)
    assert lr_at(total, total, base, schedule="poly") == 0.0
    from ovseg.core import ParamGroupConfig
    m = nn.Linear(3, 3)
    g = param_groups(m, {"all": ParamGroupConfig(prefixes=[""], lr=base, schedule="poly")})[0]
    assert group_schedule(g, 250, total, 1.0, 0.0)[0] == pytest.approx(base * 0.75 ** 0.9)


def test_sampler_partitions_and_skips():
    a, b = EpochSampler(11, 3, world=2, rank=0), EpochSampler(11, 3, world=2, rank=1)
    for s in (a, b): s.set_epoch(4)
    assert len(set(a.indices()) | set(b.indices())) == 10 and not set(a.indices()) & set(b.indices())
    full = a.indices(); a.set_epoch(4, start=3); assert a.indices() == full[3:]
    a.set_epoch(5); assert a.indices() != full


def test_weight_decay_applied_to_matrices_only(tmp_path):
    m = _model()
    fit(m, _loader(), _cfg(epochs=1, weight_decay=0.05, weight_decay_end=0.05), tmp_path)
    st = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    g = st["optimizer"]["param_groups"]
    assert g[0]["weight_decay"] == pytest.approx(0.05) and g[1]["weight_decay"] == 0.0


def test_grad_accumulation_equivalence(tmp_path):
    m1, m2 = _model(0.0), _model(0.0)
    fit(m1, _loader(8), _cfg(), tmp_path / "a")
    fit(m2, _loader(4), _cfg(batch_size=4, grad_accum=2), tmp_path / "b")
    for x, y in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_resume_is_exact(tmp_path):
    full = _model()
    r_full = fit(full, _loader(), _cfg(), tmp_path / "full", eval_fn=lambda m: {"w": float(m.net[0].weight.sum())})
    # stop mid-epoch, resume across the epoch boundary, stop again, resume to the end
    part2 = _model()
    fit(part2, _loader(), _cfg(), tmp_path / "p2", stop_after=3)
    fit(part2, _loader(), _cfg(), tmp_path / "p2", stop_after=6, resume=True)  # 3 -> 9 (crosses the epoch)
    last = ToyModel(ToyConfig())
    r2 = fit(last, _loader(), _cfg(), tmp_path / "p2", resume=True, eval_fn=lambda m: {"w": float(m.net[0].weight.sum())})
    assert _same(last, full)
    assert r2["w"] == r_full["w"] and r2["step"] == r_full["step"] == 16
    assert (tmp_path / "p2" / "train_log.tsv").read_text() .count("\n") == 17  # header + 16 steps, no duplicates


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    m = _model()
    opt = torch.optim.AdamW(m.parameters())
    d = tmp_path / "ck"
    save_checkpoint(d, m, opt, {"step": 1}, _cfg())
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    import ovseg.train as T
    def boom(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(T, "_rng_state", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, m, opt, {"step": 2}, _cfg())
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the old checkpoint is intact


class _Interrupting(ToyModel):
    calls = 0
    def training_loss(self, batch):
        type(self).calls += 1
        if type(self).calls == 6: raise KeyboardInterrupt
        return super().training_loss(batch)


def test_ctrl_c_saves_checkpoint(tmp_path):
    torch.manual_seed(0); m = _Interrupting(ToyConfig())
    with pytest.raises(KeyboardInterrupt):
        fit(m, _loader(), _cfg(), tmp_path)
    st = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert st["step"] == 5 and st["batch_in_epoch"] == 5
    # and it resumes to the same end point as an uninterrupted run
    full = _model(); fit(full, _loader(), _cfg(), tmp_path / "full")
    r = ToyModel(ToyConfig()); fit(r, _loader(), _cfg(), tmp_path, resume=True)
    assert _same(r, full)


def test_pretrained_roundtrip_and_no_pickle(tmp_path):
    m = _model()
    d = save_pretrained(m, tmp_path / "m")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["arch"] == "toy" and cfg["config"]["hidden"] == 8
    m2 = from_pretrained(d)
    assert _same(m, m2) and not m2.training
    (d / "config.json").write_text(json.dumps({"arch": "nope", "config": {}}))
    with pytest.raises(KeyError, match="unknown arch"):
        from_pretrained(d)


def _free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def _ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    m = _model(0.0)
    ds = ToyData(64)
    res = fit(m, torch.utils.data.DataLoader(ds, batch_size=4), _cfg(batch_size=4), out,
              eval_fn=lambda mm: {"val_mse": float(((mm(ds.x) - ds.y) ** 2).mean())})
    if rank == 0:
        (Path(out) / "res.json").write_text(json.dumps(res))
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_ddp_two_gloo_processes_match_one(tmp_path):
    ds = ToyData(64)
    m = _model(0.0)
    one = fit(m, _loader(8), _cfg(), tmp_path / "one",
              eval_fn=lambda mm: {"val_mse": float(((mm(ds.x) - ds.y) ** 2).mean())})
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two" / "res.json").read_text())
    assert two["step"] == one["step"]
    assert two["val_mse"] == pytest.approx(one["val_mse"], rel=1e-4)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    m2 = from_pretrained(tmp_path / "two" / "model")
    for x, y in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_from_pretrained_finds_archs_defined_outside_ovseg_arch(tmp_path):
    "A fresh interpreter resolves every method's arch name to the module that registers it."
    import subprocess, sys
    code = ("import ovseg.train as t\n"
            "for a in ('zsseg', 'ovsegmentor', 'fusioner', 'denseclip'): assert t.import_arch(a), a\n"
            "assert not t.import_arch('no-such-arch')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_register_arch_warns_when_replacing_another_class():
    import warnings
    from ovseg.train import ARCHS, register_arch
    class A: pass
    class B: pass
    try:
        register_arch("dup-test", A)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            register_arch("dup-test", A)                       # the same class again: quiet
            assert not w
            register_arch("dup-test", B)
        assert any("dup-test" in str(x.message) for x in w)
    finally: ARCHS.pop("dup-test", None)


def test_run_json_records_settings_versions_commit_and_resumes(tmp_path):
    """A run's folder tells how it was made (issue 16 item 5): settings, seed, versions, git commit."""
    m = _model()
    fit(m, _loader(), _cfg(seed=5, lr=3e-3), tmp_path / "r", stop_after=3)
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec["seed"] == 5 and rec["train_config"]["lr"] == 3e-3 and rec["arch"] == "toy"
    assert rec["model_config"]["dropout"] == 0.1
    assert rec["versions"]["torch"] == torch.__version__
    assert set(rec["git"]) == {"commit", "dirty"}
    assert rec["git"]["commit"] is None or len(rec["git"]["commit"]) == 40
    assert "resumes" not in rec
    fit(m, _loader(), _cfg(seed=5, lr=3e-3), tmp_path / "r", resume=True)
    rec2 = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec2["started"] == rec["started"] and [r["step"] for r in rec2["resumes"]] == [3]


def test_run_json_not_dirty_when_only_the_pipeline_rewrote_its_lock(tmp_path):
    "make repro rewrites dvc.lock after each stage: that alone must not mark later runs' code as dirty."
    import subprocess
    from ovseg.train import _git_state
    g = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)
    g("init", "-q"); g("config", "user.email", "t@t"); g("config", "user.name", "t")
    (tmp_path / "dvc.lock").write_text("a\n"); (tmp_path / "code.py").write_text("x = 1\n")
    g("add", "."); g("commit", "-qm", "c")
    assert _git_state(tmp_path)["dirty"] is False
    (tmp_path / "dvc.lock").write_text("b\n")
    assert _git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert _git_state(tmp_path)["dirty"] is True
