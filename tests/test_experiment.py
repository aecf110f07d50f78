"ovseg.experiment: the method contract, episode / semantic evaluation, frozen features, the fold x seed runner, tables."
import dataclasses, json, math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.core import TrainConfig
from ovseg.embedded import WorldConfig
from ovseg.embedded import World, WorldEpisodes, WorldSemantic
from ovseg.experiment import (FeatureEpisodes, Task, WithFeatures, check_method, evaluate_episodes, evaluate_semantic,
                              fold_table, mean_over_folds, paper_cell, paper_figure, predict_windows, run_dir_name,
                              run_grid, run_one, summarise, world_cache_dir, world_episodes, world_features,
                              world_semantic, write_results)
from ovseg.train import from_pretrained, register_arch

torch.set_num_threads(1)


@dataclasses.dataclass
class ColourConfig:
    words: list[str] = dataclasses.field(default_factory=list)


@register_arch("test_experiment_colour")
class Colour(nn.Module):
    "Per-pixel logits: (R, G, B, 1) times the sum of learned word vectors of the class name."
    config_class = ColourConfig
    def __init__(self, config: ColourConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Parameter(0.1 * torch.randn(len(config.words), 4))
    def _text(self, names):
        return torch.stack([sum(self.emb[self.config.words.index(w)] for w in n.split()) for n in names])
    def predict(self, images01, class_names):
        x = torch.cat([images01, torch.ones_like(images01[:, :1])], 1)
        return torch.einsum("bchw,kc->bkhw", x, self._text(class_names))
    def predict_episodes(self, images01, class_names, dense=None, out_size=None):
        if dense is not None: images01 = F.interpolate(dense, size=out_size, mode="nearest")   # dense = the pixels, pooled
        return torch.stack([self.predict(im[None], [n])[0, 0] for im, n in zip(images01, class_names)])
    def training_loss(self, batch):
        x = batch["image"] if "image" in batch else None
        logits, label = self.predict_episodes(x, batch["class_name"], batch.get("dense"), tuple(batch["label"].shape[-2:])), batch["label"]
        return F.binary_cross_entropy_with_logits(logits[label != 255], label[label != 255].float())


class Oracle(nn.Module):
    "Knows the answer: channel k of the image is class k's mask; logits +-10."
    def predict(self, images01, class_names):
        return (images01[:, : len(class_names)] - 0.5) * 20
    def predict_episodes(self, images01, class_names, dense=None, out_size=None):
        return (images01[:, 0] - 0.5) * 20


class Masks(torch.utils.data.Dataset):
    "Images whose channel 0 is the foreground of the episode (and channels hold the semantic classes)."
    classes = [0, 1]
    def __init__(self, n=6, size=(20, 24), empty=()):
        self.n, self.size, self.empty = n, size, set(empty)
    def __len__(self): return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        fg = torch.rand(*self.size, generator=g) > 0.5
        if i in self.empty: fg[:] = False
        img = torch.stack([fg.float(), (~fg).float(), torch.zeros(self.size)])
        return dict(image=img, label=fg.long(), class_id=i % 2, class_name=["a", "b"][i % 2], id=str(i))


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(image_size=32, n_train=48, n_val=24, n_episodes=30), seed=0)


def _words(world):
    return sorted({w for n in world.class_names for w in n.split()} | {"background"})


TC = TrainConfig(max_steps=6, batch_size=8, lr=0.05, warmup_steps=0, weight_decay=0.0, weight_decay_end=0.0,
                 device="cpu", precision="fp32", log_every=2)


# ---- the contract -------------------------------------------------------------------------------------------
def test_contract_names_what_is_missing(world):
    assert check_method(Colour(ColourConfig(_words(world))), episodes=True)
    with pytest.raises(TypeError, match="training_loss, predict, registration"):
        check_method(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="registration"):   # the methods alone are not enough: save/load needs the arch
        check_method(Oracle())
    with pytest.raises(TypeError, match="predict_episodes"):
        evaluate_episodes(nn.Linear(2, 2), Masks())


# ---- evaluation ---------------------------------------------------------------------------------------------
def test_episodes_oracle_is_perfect_and_inverse_is_zero():
    r = evaluate_episodes(Oracle(), Masks(), batch_size=4)
    assert r == {"mIoU": 100.0, "FB_IoU": 100.0, "episodes": 6}
    class Inverse(Oracle):
        def predict_episodes(self, images01, class_names, dense=None, out_size=None): return -super().predict_episodes(images01, class_names)
    assert evaluate_episodes(Inverse(), Masks(), batch_size=4)["mIoU"] == 0.0


def test_episodes_windows_and_skip_empty():
    ds = Masks(empty=(0, 3))
    assert evaluate_episodes(Oracle(), ds, window=16, stride=8, skip_empty=True) == {"mIoU": 100.0, "FB_IoU": 100.0, "episodes": 4}
    assert evaluate_episodes(Oracle(), ds)["episodes"] == 6
    seen = []
    class Spy(Oracle):
        def predict_episodes(self, images01, class_names, dense=None, out_size=None):
            seen.append(tuple(images01.shape[-2:])); return super().predict_episodes(images01, class_names)
    evaluate_episodes(Spy(), Masks(1), window=16, stride=8)
    assert set(seen) == {(16, 16)} and len(seen) == 2 * 2   # 20 x 24: two window rows and two columns


def test_mean_over_folds():
    r = mean_over_folds({0: {"mIoU": 10.0, "FB_IoU": 50.0, "x": 1}, 1: {"mIoU": 30.0, "FB_IoU": 70.0, "x": 3}}, keys=("mIoU", "x"))
    assert r["mean"] == {"mIoU": 20.0, "x": 2.0} and r["fold1"]["FB_IoU"] == 70.0


def test_predict_windows_equals_whole_image_for_a_pixelwise_model(world):
    torch.manual_seed(0)
    m, img, names = Colour(ColourConfig(_words(world))), torch.rand(3, 45, 70), ["red circle", "background", "blue ring"]
    whole = m.predict(img[None], names)[0]
    torch.testing.assert_close(predict_windows(m, img, names, window=32, stride=20, probs=False), whole)
    torch.testing.assert_close(predict_windows(m, img, names, window=32, stride=20), whole.softmax(0))
    assert predict_windows(m, img[None], names, window=0).shape == (1, 3, 45, 70)


def test_predict_windows_flip_averages_the_mirror():
    class LeftRamp(nn.Module):   # logits grow to the right: the mirrored copy grows to the left
        def predict(self, x, names): return torch.linspace(0, 1, x.shape[-1]).expand(x.shape[0], len(names), *x.shape[-2:]) * torch.arange(len(names)).view(1, -1, 1, 1)
    lg = predict_windows(LeftRamp(), torch.rand(3, 4, 9), ["a", "b"], flip=True, probs=False)
    torch.testing.assert_close(lg[1], torch.full((4, 9), 0.5))          # (ramp + reversed ramp) / 2
    p = predict_windows(LeftRamp(), torch.rand(3, 4, 9), ["a", "b"], window=4, stride=3, flip=True)
    torch.testing.assert_close(p.sum(0), torch.ones(4, 9))


def test_semantic_oracle_and_hiou():
    class Sem(torch.utils.data.Dataset):
        class_names = ["fg", "bg"]
        def __len__(self): return 4
        def __getitem__(self, i): s = Masks()[i]; return dict(image=s["image"], label=1 - s["label"])   # 0 = fg channel
    r = evaluate_semantic(Oracle(), Sem(), window=16, stride=8, flip=True, unseen=[1])
    assert r["mIoU"] == r["mIoU_seen"] == r["mIoU_unseen"] == r["hIoU"] == r["pAcc"] == 100.0
    class Swapped(Oracle):
        def predict(self, images01, class_names): return super().predict(images01, class_names).flip(1)
    assert evaluate_semantic(Swapped(), Sem())["mIoU"] == 0.0 and evaluate_semantic(Oracle(), Sem(), limit=1)["pAcc"] == 100.0


# ---- frozen features ----------------------------------------------------------------------------------------
def test_features_are_rows_of_their_image(world, tmp_path):
    from ovseg.encoders import VisualEncoder
    class Pool(VisualEncoder):   # a frozen "encoder": 4 x 4 average pooling of the pixels
        name, dim, stride, mean, std = "pool4", 3, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        def __init__(self): super().__init__(); self.freeze()
        def _forward(self, x): d = F.avg_pool2d(x, 4); return d, d.mean((2, 3)), None
    cache = world_cache_dir(world, tmp_path)
    feats = world_features(Pool(), world, "val", cache_dir=cache)
    assert feats.shape == (24, 3, 8, 8) and any(cache.rglob("*.safetensors"))
    torch.testing.assert_close(world_features(Pool(), world, "val", cache_dir=cache), feats)   # read back
    eps = WorldEpisodes(world, 0, "val")
    for k in (0, 7):
        s, i = FeatureEpisodes(eps, feats)[k], int(eps.pairs[k][0])
        assert "image" not in s and torch.equal(s["dense"], feats[i])
    wf = WithFeatures(eps, {"tap_4": torch.arange(len(eps)), "tap_8": -torch.arange(len(eps))}, keep_image=True)
    assert (wf[5]["tap_4"], wf[5]["tap_8"]) == (5, -5) and "image" in wf[5]
    with pytest.raises(ValueError, match="one per sample"):
        WithFeatures(eps, feats[:3])
    assert world_cache_dir(world, None) is None
    other = World(WorldConfig(image_size=32, n_train=48, n_val=24), seed=1)
    assert world_cache_dir(other, tmp_path) != cache


# ---- tasks and the runner -----------------------------------------------------------------------------------
def test_world_tasks_hold_out_the_novel_classes(world):
    tr = world_episodes(world).train(2, 0)
    assert {int(c) for _, c in tr.pairs} <= set(world.base_classes(2))
    a, b, c = (world_episodes(world, train_images=10).train(2, s) for s in (3, 3, 4))
    assert len(a) == 10 and a.indices == b.indices != c.indices          # a subset per seed
    st = world_semantic(world).train(2, 0)
    novel = set(world.novel_classes(2))
    assert all(int(v) not in novel for i in range(len(st)) for v in st[i]["label"].unique() if v != 255)


def test_run_grid_rows_folders_and_reproducibility(world, tmp_path):
    build = lambda fold, seed: Colour(ColourConfig(_words(world)))
    task = world_episodes(world, n_val_episodes=20)
    seen = []
    rows = run_grid(build, task, folds=[1, 0], seeds=[3, 4], train=TC, out_dir=tmp_path, method="colour model",
                    on_run=lambda m, r: seen.append((m.training, r["fold"])))
    assert [(r["method"], r["fold"], r["seed"]) for r in rows] == [("colour model", f, s) for s in (3, 4) for f in (1, 0)]
    assert all({"mIoU", "FB_IoU", "episodes", "seconds"} <= set(r) for r in rows) and len(seen) == 4
    run = tmp_path / "runs" / run_dir_name("colour model", 0, 4)
    assert run.name == "colour_model_f0_s4" and (run / "run.json").exists()
    assert json.loads((run / "eval.json").read_text())["mIoU"] == rows[3]["mIoU"]
    back = from_pretrained(run / "model")
    assert evaluate_episodes(back, WorldEpisodes(world, 0, "val", n_episodes=20))["mIoU"] == rows[3]["mIoU"]
    _, again = run_one(build, task, 0, 4, TC, tmp_path / "again")
    assert again == {k: rows[3][k] for k in again}                       # the same run, the same numbers
    # the features path: a task on cached "features" (here the pixels themselves) trains and scores the same way
    images = lambda split: torch.stack([x["image"] for x in WorldSemantic(world, split)])
    ident = {s: images(s) for s in ("train", "val")}
    _, via = run_one(build, world_episodes(world, n_val_episodes=20, features=ident), 0, 4, TC, tmp_path / "feats")
    assert via == again


def test_runner_refuses_a_model_outside_the_contract(world, tmp_path):
    with pytest.raises(TypeError, match="registration"):
        run_one(lambda f, s: Oracle(), world_episodes(world), 0, 0, TC, tmp_path)


def test_a_custom_task(world, tmp_path):
    "Any protocol is a Task: here, train on fold 0's episodes and report a number computed by hand."
    task = Task(train=lambda f, s: WorldEpisodes(world, f, "train", classes="base"),
                evaluate=lambda m, f: {"norm": float(m.emb.detach().norm())}, name="norm")
    rows = run_grid(lambda f, s: Colour(ColourConfig(_words(world))), task, [0], [0], TC, tmp_path, method="m")
    assert rows[0]["norm"] > 0 and set(rows[0]) == {"method", "fold", "seed", "norm", "seconds"}


# ---- summaries and tables -----------------------------------------------------------------------------------
ROWS = [{"method": "A", "fold": f, "seed": s, "mIoU": 10.0 * f + s, "FB_IoU": 50.0} for s in (0, 1) for f in (0, 1)] + \
       [{"method": "B", "fold": 0, "seed": 0, "mIoU": 7.0, "FB_IoU": 40.0}]


def test_summarise_by_hand():
    s = summarise(ROWS)
    assert s["A"]["per_seed"] == [5.0, 6.0] and s["A"]["mean"] == 5.5 and math.isclose(s["A"]["std"], math.sqrt(0.5))
    assert s["A"]["per_fold"] == {0: 0.5, 1: 10.5} and s["B"] == {"mean": 7.0, "std": 0.0, "per_seed": [7.0], "seeds": [0], "per_fold": {0: 7.0}}


def test_paper_figures_and_table():
    figs = {"pascal5i": {"mean": None, "fold0": 61.2}, "no_fusion": 40, "flag": True}
    assert paper_figure(figs, "pascal5i.fold0") == 61.2 and paper_figure(figs, "no_fusion") == 40.0
    assert paper_figure(figs, "pascal5i.mean") is None and paper_figure(figs, "a.b.c") is None and paper_figure(figs, "flag") is None
    assert (paper_cell(None), paper_cell(3.14159), paper_cell(3.14159, 2)) == ("not reported", "3.1", "3.14")
    lines = fold_table(ROWS, extra=("FB_IoU",), paper={"A": 12.0}, label=lambda m: f"{m} (ours)").splitlines()
    assert lines[0] == "| method | fold0 | fold1 | mIoU (mean ± std over seeds) | FB_IoU | paper |"
    assert lines[2] == "| A (ours) | 0.5 | 10.5 | 5.5 ± 0.7 | 50.0 ± 0.0 | 12.0 |"
    assert lines[3] == "| B (ours) | 7.0 |  | 7.0 ± 0.0 | 40.0 ± 0.0 | not reported |"


def test_write_results_is_strict_json(tmp_path):
    write_results(tmp_path, "| a |\n", {"rows": ROWS[:1], "x": float("inf")}, {"mIoU_mean": float("nan")})
    def no_nan(tok): raise ValueError(tok)
    res = json.loads((tmp_path / "results.json").read_text(), parse_constant=no_nan)
    assert res["rows"][0]["variant"] == "A" and res["x"] is None
    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=no_nan) == {"mIoU_mean": None}
    assert (tmp_path / "table.md").read_text() == "| a |\n"


def test_fork_map_runs_closures_in_forked_processes_in_order():
    import os, torch
    from ovseg.experiment import fork_map
    big = torch.arange(10.0)                                 # shared with the children by the fork, not pickled
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = fork_map(lambda i: (float(big[i] * 2), os.getpid()), range(6), processes=2)
    finally: torch.set_num_threads(threads)
    assert [g[0] for g in got] == [2.0 * i for i in range(6)]
    assert os.getpid() not in {g[1] for g in got}             # computed in the children
    if threads > 1:
        with pytest.raises(ValueError, match="runtime.threads: 1"): fork_map(lambda i: i, range(3), processes=2)
    assert fork_map(lambda i: i + 1, [1, 2], processes=1) == [2, 3]
