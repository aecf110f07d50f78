import json
import numpy as np
import pytest
import torch
from ovseg.embedded import WorldConfig
from ovseg.core import load_config
from ovseg.embedded import (World, WorldSemantic, WorldEpisodes, WorldCaptions, WorldMosaic4,
                            save_world, get_world)

torch.set_num_threads(1)
SMALL = dict(n_train=300, n_val=120, chunk=64)

@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(**SMALL), seed=0)

def test_same_seed_same_bytes_and_different_seed_differs():
    a = World(WorldConfig(**SMALL), seed=3).split("train").digest()
    b = World(WorldConfig(**SMALL), seed=3).split("train").digest()
    c = World(WorldConfig(**SMALL), seed=4).split("train").digest()
    assert a == b and a != c
    # splits use different streams
    assert World(WorldConfig(**SMALL), seed=3).split("val").digest() != a

def test_random_access_matches_bulk(world):
    arrs, caps = world.split("train").arrays()
    fresh = World(WorldConfig(**SMALL), seed=0).split("train")
    for i in (0, 63, 64, 299):
        rec = fresh[i]
        assert np.array_equal(rec["images"], arrs["images"][i]) and rec["caption"] == caps[i]

def test_save_load_identical(tmp_path, world):
    save_world(world, tmp_path / "w")
    back = World.load(tmp_path / "w")
    for name in ("train", "val"):
        assert back.split(name).digest() == world.split(name).digest()
    meta = json.loads((tmp_path / "w" / "world.json").read_text())
    assert meta["class_names"] == world.class_names
    s1, s2 = WorldSemantic(world, "val")[5], WorldSemantic(back, "val")[5]
    assert torch.equal(s1["image"], s2["image"]) and torch.equal(s1["label"], s2["label"])

def test_get_world_reads_matching_written_world(tmp_path):
    cfg = load_config()
    cfg.params.world = WorldConfig(**SMALL)
    w = World(cfg.params.world, cfg.seed)
    save_world(w, tmp_path)
    assert get_world(cfg, tmp_path).split("train")._arrays is not None
    cfg.seed += 1   # a different seed is not read from disk
    assert get_world(cfg, tmp_path).split("train")._arrays is None

def test_missing_world_error_names_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro world"):
        World.load(tmp_path / "nope")

@pytest.mark.parametrize("patterns", [[], ["plain", "striped", "dotted"]])
def test_folds_novel_words_in_base(patterns):
    w = World(WorldConfig(patterns=patterns, n_train=10, n_val=10), 0)
    all_novel = []
    for f in range(w.cfg.n_folds):
        base, novel = w.base_classes(f), w.novel_classes(f)
        assert novel and not set(base) & set(novel) and sorted(base + novel) == list(range(w.num_classes))
        words = {x for c in base for x in w.class_names[c].split()}
        assert all(x in words for c in novel for x in w.class_names[c].split())
        all_novel += novel
    assert sorted(all_novel) == list(range(w.num_classes))   # folds partition the classes
    assert len(w.class_names) == len(set(w.class_names))

def test_impossible_folds_rejected():
    with pytest.raises(ValueError, match="novel words"):
        World(WorldConfig(colours=["red"], shapes=["circle", "square"], n_folds=2, n_train=1, n_val=1))

def test_semantic_shapes_dtypes_conventions(world):
    ds = WorldSemantic(world, "train", instances=True)
    assert ds.class_names[0] == "background" and ds.class_names[1:] == world.class_names
    for i in range(20):
        s = ds[i]
        assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
        assert 0 <= s["image"].min() and s["image"].max() <= 1
        assert s["label"].shape == (64, 64) and s["label"].dtype == torch.int64
        assert s["instances"].dtype == torch.bool and s["instance_classes"].dtype == torch.int64
        assert s["instances"].shape[0] == s["instance_classes"].shape[0] >= 1
        # instance masks are disjoint, nonempty and agree with the label map
        assert s["instances"].sum(0).max() <= 1 and s["instances"].flatten(1).any(1).all()
        for m, c in zip(s["instances"], s["instance_classes"]):
            assert (s["label"][m] == c + 1).all()
        assert ((s["label"] > 0) == s["instances"].any(0)).all()
    ig = WorldSemantic(world, "train", background="ignore", fold=1, novel="ignore")
    assert ig.class_names == world.class_names and set(ig.unseen) == set(world.novel_classes(1))
    for i in range(20):
        a, b = ds[i]["label"], ig[i]["label"]
        assert (b[a == 0] == 255).all()
        for c in world.novel_classes(1): assert (b[a == c + 1] == 255).all()
        for c in world.base_classes(1): assert (b[a == c + 1] == c).all()

def test_ignore_border():
    w = World(WorldConfig(ignore_border=1, **SMALL), 0)
    lab = WorldSemantic(w, "val")[0]["label"]
    assert (lab == 255).any() and set(lab.unique().tolist()) - {255}

def test_captions_mention_the_objects_present(world):
    sp = world.split("train")
    for i in range(len(sp)):
        rec = sp[i]
        present = set(np.unique(rec["labels"]).tolist()) - {0}
        assert present, i
        for c in present: assert world.class_names[c - 1] in rec["caption"], (rec["caption"], c)
        for c in set(range(world.num_classes)) - {c - 1 for c in present}:
            assert f" {world.class_names[c]}" not in f" {rec['caption']}", rec["caption"]
    caps = world.split("train").arrays()[1]
    assert len(set(caps)) > 200   # variety

def test_episodes_novel_and_base(world):
    ev = WorldEpisodes(world, fold=2, split="val")
    assert len(ev) > 0
    for k in range(len(ev)):
        e = ev[k]
        assert e["class_id"] in world.novel_classes(2) and e["class_name"] == world.class_names[e["class_id"]]
        assert set(e["label"].unique().tolist()) <= {0, 1} and e["label"].sum() >= 16
    tr = WorldEpisodes(world, fold=2, split="train", classes="base")
    assert set(tr.pairs[:, 1].tolist()) <= set(world.base_classes(2))
    raws = [torch.from_numpy(world.split("train")[int(i)]["labels"].astype(np.int64)) for i, _ in tr.pairs[:50]]
    for k, raw in enumerate(raws):
        lab = tr[k]["label"]
        for c in world.novel_classes(2): assert (lab[raw == c + 1] == 255).all()
    capped = WorldEpisodes(world, fold=2, split="val", n_episodes=5)
    assert len(capped) == 5 and capped[0]["id"] == WorldEpisodes(world, fold=2, split="val", n_episodes=5)[0]["id"]

def test_caption_dataset_exclude(world):
    full, held = WorldCaptions(world, "train"), WorldCaptions(world, "train", exclude=world.novel_classes(0))
    assert len(held) < len(full) == 300
    s = held[0]
    assert isinstance(s["caption"], str) and s["image"].shape == (3, 64, 64)

def test_mosaic4_four_distinct_classes(world):
    mo = WorldMosaic4(world, fold=0, n_mosaics=10)
    assert len(mo) == 40
    for k in range(len(mo)):
        e = mo[k]
        ids = e["mosaic_class_ids"].tolist()
        assert len(set(ids)) == 4 and set(ids) <= set(world.novel_classes(0))
        assert e["class_id"] == ids[k % 4] and e["label"].sum() > 0
        assert e["image"].shape == (3, 64, 64) and e["label"].shape == (64, 64)
        # the queried class lies (at least) in its own quadrant
        q = k % 4; r, c = divmod(q, 2)
        assert e["label"][32 * r:32 * r + 32, 32 * c:32 * c + 32].sum() > 0

def test_generation_is_fast():
    import time
    t0 = time.perf_counter()
    World(WorldConfig(n_train=1000, n_val=1), 9).split("train").arrays()
    assert time.perf_counter() - t0 < 10
