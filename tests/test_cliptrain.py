import json
import pytest
import torch
from ovseg.cliptrain import ClipTrainConfig
from ovseg.embedded import WorldConfig
from ovseg.embedded import World
from ovseg.cliptrain import (clip_model_cfg, create_clip_model, clip_tokenizer, normalize, save_clip,
                             load_clip, train_clip, evaluate_clip, contrastive_loss, dense_embeddings)

torch.set_num_threads(1)
TINY = ClipTrainConfig(width=64, layers=2, head_width=32, text_width=64, text_layers=1, text_heads=2,
                       embed_dim=64, context_length=24, batch_size=32, steps=25, warmup=5, lr=2e-3)

@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(n_train=256, n_val=64, chunk=64), seed=0)

def test_save_load_round_trip_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    cfg = clip_model_cfg(TINY)
    m = create_clip_model(cfg).eval()
    save_clip(m, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "open_clip_config.json").read_text())
    assert meta["model_cfg"] == cfg and meta["preprocess_cfg"]["size"] == 64 and "mean" in meta["preprocess_cfg"]
    assert (tmp_path / "c" / "open_clip_model.safetensors").exists()
    m2, tok2 = load_clip(tmp_path / "c")
    tok = clip_tokenizer(cfg)
    x = torch.rand(4, 3, 64, 64)
    caps = ["a red circle", "two blue squares on a striped background", "a green ring", "an orange cross"]
    assert torch.equal(tok(caps), tok2(caps))
    with torch.no_grad():
        assert torch.equal(m.encode_image(normalize(m, x)), m2.encode_image(normalize(m2, x)))
        assert torch.equal(m.encode_text(tok(caps)), m2.encode_text(tok2(caps)))
        assert torch.equal(dense_embeddings(m, x), dense_embeddings(m2, x))
    assert dense_embeddings(m, x).shape == (4, 64, 8, 8)

def test_round_trip_through_plain_open_clip(tmp_path):
    import open_clip
    m = create_clip_model(clip_model_cfg(TINY)).eval()
    save_clip(m, tmp_path)
    m2 = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)

def test_missing_dir_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro embedded_clip"):
        load_clip(tmp_path / "none")

def test_contrastive_loss_perfect_pairs_lower():
    e = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert contrastive_loss(e, e, torch.tensor(20.0)) < contrastive_loss(e, e.roll(1, 0), torch.tensor(20.0))

def test_short_training_lowers_loss_and_saves(tmp_path, world):
    m, tok, hist = train_clip(world, TINY, seed=0, out_dir=tmp_path, log_every=5)
    assert hist["loss"][-1] < hist["loss"][0] - 0.2
    m2, tok2 = load_clip(tmp_path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(): assert torch.equal(m.encode_image(normalize(m, x)), m2.encode_image(normalize(m2, x)))
    met = evaluate_clip(m2, tok2, world, n=64)
    for k in ("i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5", "zs_top1", "dense_patch_acc"):
        assert 0 <= met[k] <= 1
    assert met["i2t_top1"] <= met["i2t_top5"]

def test_training_is_deterministic(world):
    cfg = ClipTrainConfig(**{**TINY.__dict__, "steps": 4})
    _, _, h1 = train_clip(world, cfg, seed=1, log_every=2)
    _, _, h2 = train_clip(world, cfg, seed=1, log_every=2)
    assert h1["loss"] == h2["loss"]

def test_holdout_fold_excludes_novel_images(world):
    from ovseg.cliptrain import _train_arrays
    d = _train_arrays(world, "train", world.novel_classes(0))
    assert not set(d["classes"].ravel().tolist()) & set(world.novel_classes(0))

def test_loads_through_ovseg_encoders(tmp_path):
    enc = pytest.importorskip("ovseg.encoders")
    m = create_clip_model(clip_model_cfg(TINY)).eval()
    save_clip(m, tmp_path)
    vis, txt = enc.create_clip(f"open_clip:{tmp_path}")
    x = torch.rand(2, 3, 64, 64)
    f = vis(x)
    with torch.no_grad():
        g = m.encode_image(normalize(m, x), normalize=True)
        d = dense_embeddings(m, x)
        t = m.encode_text(clip_tokenizer(clip_model_cfg(TINY))(["a red circle"]), normalize=True)
    F = torch.nn.functional
    assert torch.allclose(F.normalize(f.global_, dim=-1), g, atol=1e-5)
    assert f.dense.shape == d.shape and torch.allclose(F.normalize(f.dense, dim=1), F.normalize(d, dim=1), atol=1e-5)
    assert torch.allclose(txt.encode(["a red circle"]), t, atol=1e-5)

def test_grouped_batches_share_a_colour(world):
    import numpy as np
    from ovseg.cliptrain import _grouped_batch, _train_arrays
    d = _train_arrays(world, "train")
    colour = np.array([world.attributes[int(c[c >= 0][0])][0] for c in d["classes"]])
    by = [np.nonzero(colour == k)[0] for k in range(len(world.cfg.colours))]
    idx = _grouped_batch(np.random.default_rng(0), by, 32, 4)
    assert len(idx) == 32
    for grp in idx.reshape(8, 4): assert len(set(colour[grp].tolist())) == 1 and len(set(grp.tolist())) == 4
    cfg = ClipTrainConfig(**{**TINY.__dict__, "steps": 3, "group_size": 4})
    _, _, h = train_clip(world, cfg, seed=0, log_every=1)
    assert len(h["loss"]) == 3


def test_object_crops_are_the_masked_crop_of_each_instance(world):
    from ovseg.cliptrain import object_crops, PREPROCESS_CFG
    import numpy as np
    crops, cls, where = object_crops(world, "val", size=32)
    arrs, _ = world.split("val").arrays()
    k = 3; i = int(where[k])
    slot = [m for m, c in enumerate(arrs["instance_classes"][i]) if c == int(cls[k])][0]
    mask = arrs["instances"][i] == slot + 1
    ys, xs = np.nonzero(mask)
    box = np.where(mask[..., None], arrs["images"][i] / 255, PREPROCESS_CFG["mean"])[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    ref = torch.nn.functional.interpolate(torch.tensor(box, dtype=torch.float32).permute(2, 0, 1)[None], size=(32, 32),
                                          mode="bicubic", align_corners=False)[0].clamp(0, 1)
    assert torch.allclose(crops[k], ref, atol=1e-4)                 # by hand: fill outside the mask, box, bicubic resize


def test_object_crops_cover_every_instance_and_respect_exclude(world):
    from ovseg.cliptrain import object_crops
    import numpy as np
    crops, cls, where = object_crops(world, "val")
    arrs, _ = world.split("val").arrays()
    ic = arrs["instance_classes"]
    assert len(crops) == (ic >= 0).sum() and crops.shape[1:] == (3, 64, 64)
    assert all(int(c) in ic[int(i)] for c, i in zip(cls, where))
    assert 0 <= float(crops.min()) and float(crops.max()) <= 1
    novel = world.novel_classes(0)
    _, cls0, _ = object_crops(world, "val", exclude=novel)
    assert not set(cls0.tolist()) & set(novel) and len(cls0) == int(np.isin(cls, novel, invert=True).sum())


def test_crop_scores_known_answers(world):
    from ovseg.cliptrain import crop_scores
    truth = torch.arange(world.num_classes)
    idx = {a: k for k, a in enumerate(world.attributes)}
    S = len(world.cfg.shapes)
    other_shape = torch.tensor([idx[(c, p, (s + 1) % S)] for c, p, s in world.attributes])
    other_colour = torch.tensor([idx[((c + 1) % len(world.cfg.colours), p, s)] for c, p, s in world.attributes])
    assert crop_scores(truth, truth, world) == pytest.approx({**{k: 1.0 for k in ("crop_top1", "crop_colour", "crop_shape")},
                                                              **{f"crop_novel{f}": 1.0 for f in range(world.cfg.n_folds)}})
    s = crop_scores(other_shape, truth, world)
    assert s["crop_top1"] == 0 and s["crop_shape"] == 0 and s["crop_colour"] == 1
    s = crop_scores(other_colour, truth, world)
    assert s["crop_top1"] == 0 and s["crop_shape"] == 1 and s["crop_colour"] == 0
    half = torch.where(truth % 2 == 0, truth, other_shape)
    s = crop_scores(half, truth, world)
    assert s["crop_top1"] == pytest.approx(0.5) and s["crop_novel0"] == pytest.approx(
        float((torch.tensor(world.novel_classes(0)) % 2 == 0).float().mean()))


def test_object_crop_training_and_holdout(world):
    import numpy as np
    from ovseg.cliptrain import _object_sampler
    novel = world.novel_classes(1)
    draw = _object_sampler(world, novel, 64)
    crops, caps = draw(np.random.default_rng(0), 40)
    assert crops.shape[0] == len(caps) == world.num_classes - len(novel)       # one crop per remaining class
    assert not any(world.class_names[c] in cap for c in novel for cap in caps)
    cfg = ClipTrainConfig(**{**TINY.__dict__, "steps": 3, "object_crops": 6, "holdout_fold": 1})
    _, _, h = train_clip(world, cfg, seed=0, log_every=1)
    assert len(h["loss"]) == 3 and all(np.isfinite(h["loss"]))


def test_evaluate_reports_crop_accuracy(world):
    m = create_clip_model(clip_model_cfg(TINY)).eval()
    met = evaluate_clip(m, clip_tokenizer(clip_model_cfg(TINY)), world, n=32)
    arrs, _ = world.split("val").arrays()
    assert met["crop_n"] == (arrs["instance_classes"] >= 0).sum()
    for k in ("crop_top1", "crop_colour", "crop_shape", "crop_novel0", "crop_novel3"):
        assert 0 <= met[k] <= 1
    assert met["crop_top1"] <= min(met["crop_colour"], met["crop_shape"])


def test_load_clip_refuses_a_folder_without_weights(tmp_path):
    "open_clip alone would build random weights for a folder that lost its weights file."
    import pytest
    from ovseg.cliptrain import ClipTrainConfig
    from ovseg.cliptrain import clip_model_cfg, create_clip_model, save_clip, load_clip
    tiny = ClipTrainConfig(width=64, layers=2, text_width=64, text_layers=1, embed_dim=64, context_length=24)
    d = save_clip(create_clip_model(clip_model_cfg(tiny)), tmp_path / "clip")
    load_clip(d)
    (d / "open_clip_model.safetensors").unlink()
    with pytest.raises(Exception, match="open_clip_model.safetensors"):
        load_clip(d)
