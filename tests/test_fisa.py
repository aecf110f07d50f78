"FISA (ovseg.fisa): the untrained adapter is CLIP exactly, SIMO settings, training, save/load/segment, bad input, the paper path."
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from ovseg.core import ConfigError, DataConfig, TrainConfig, load_config
from ovseg.fisa import FisaConfig, FisaSettings
from ovseg.embedded import WorldConfig
from ovseg.images import collate
from ovseg.embedded import World, WorldSemantic
from ovseg.encoders import VisualEncoder, register_encoder
from ovseg.fisa import (LoRA, SEVE, TRAINABLE, ADE20KPanoptic, COCOPanoptic, Fisa, build_generator, evaluate_panoptic,
                        real_train_set, train_fisa, trainable_parameters)
from ovseg.twostage import ZeroShotTrainView, ZsSeg, ZsSegConfig

torch.set_num_threads(2)


class FisaTaps(VisualEncoder):
    "A frozen random conv pyramid with taps at strides 8/16/32: a fast stand-in for EfficientNet-Lite0's."
    stride, pad_to = 8, 32

    def __init__(self, seed: int = 0, taps=None, **kw):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c8, self.c16, self.c32 = nn.Conv2d(3, 8, 8, 8), nn.Conv2d(8, 12, 2, 2), nn.Conv2d(12, 16, 2, 2)
        with torch.no_grad():
            for p in self.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.name, self.dim = f"fisa-taps-{seed}", 8
        self.freeze()

    def _forward(self, x):
        a = self.c8(x); b = torch.relu(self.c16(a)); c = torch.relu(self.c32(b))
        return a, c.mean((2, 3)), {8: a, 16: b, 32: c}


register_encoder("test-fisa-taps", "visual", lambda ident="", **kw: FisaTaps(**kw), "test double (tests/test_fisa.py)")
TINY_GEN = dict(backbone="test-fisa-taps", taps=[8, 16, 32], decoder_stride=8, queries=6, dim=16, mask_dim=16,
                layers=2, heads=2, ffn=32, embed_hidden=16)


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(n_train=48, n_val=8), seed=0)


@pytest.fixture(scope="module")
def generator(clipdir, world):
    "A small (untrained) zsseg generator of fold 0: the proposals' quality does not matter here."
    torch.manual_seed(0)
    return ZsSeg(ZsSegConfig(clip=f"open_clip:{clipdir}", class_names=list(world.class_names), unseen=world.novel_classes(0),
                             **TINY_GEN)).eval()


def _batch(world, n=8, instances=False):
    ds = ZeroShotTrainView(WorldSemantic(world, "train", background="ignore", fold=0, novel="ignore", instances=instances))
    return collate([ds[i] for i in range(n)])


def test_untrained_adapter_is_frozen_clip_exactly(generator, world):
    x = _batch(world, 2)["image"]
    names = world.class_names[:5]
    with torch.no_grad():
        ref = generator.clip_visual(x).dense
        _, masks = generator.proposals(x)
    for kw in [dict(trainable=t) for t in TRAINABLE] + [dict(depth=0), dict(depth=2), dict(conditioning="pooled"),
                                                        dict(conditioning="none")]:
        m = Fisa(FisaConfig(**kw), generator=generator).eval()
        with torch.no_grad():
            assert torch.equal(m.dense_features(x, names), ref), kw               # zero gate, zero LoRA: CLIP's features
            logits, valid = m.classify(x, masks.sigmoid(), names)
            want, _ = m.mask_logits(ref, masks.sigmoid(), m.class_embeddings(names))
        assert torch.equal(logits, want)
    with torch.no_grad():
        m.tower.seve.gate.fill_(0.5)
        assert not torch.allclose(m.dense_features(x, names), ref)                 # an open gate changes them
    # the value path: with the gate shut, exactly MaskCLIP's dense tokens
    from ovseg.denseclip import dense_clip_tokens
    v = Fisa(FisaConfig(dense="value"), generator=generator).eval()
    with torch.no_grad():
        assert torch.equal(v.dense_features(x, names), dense_clip_tokens(generator.clip_visual.model.visual,
                                                                          generator.clip_visual.normalise(x)))


def test_trainable_fractions_are_ordered(generator):
    info = {t: trainable_parameters(Fisa(FisaConfig(trainable=t), generator=generator)) for t in TRAINABLE}
    f = [info[t]["fraction"] for t in TRAINABLE]
    assert f == sorted(f) and len(set(f)) == 4, info
    m = Fisa(FisaConfig(trainable="adapter"), generator=generator)
    assert info["adapter"]["trainable"] == sum(p.numel() for p in m.tower.seve.parameters())
    lora = Fisa(FisaConfig(trainable="adapter+norms+LoRA", lora_rank=2), generator=generator)
    n_lora = sum(p.numel() for mod in lora.tower.modules() if isinstance(mod, LoRA) for p in mod.parameters())
    assert n_lora == 1 * 2 * (3 * 32 + 32)                                          # 1 block after SEVE, r = 2, (3C x C)
    full = info["full"]
    assert full["trainable"] == sum(p.numel() for p in generator.clip_visual.model.visual.parameters()) + info["adapter"]["trainable"]
    assert 0 < info["adapter"]["fraction"] < full["fraction"] < 1


def test_training_lowers_the_loss_and_touches_only_the_trainable_part(generator, world):
    torch.manual_seed(0)
    model = Fisa(FisaConfig(), generator=generator)
    batch = _batch(world, 6)
    before_gen = {k: v.clone() for k, v in generator.state_dict().items()}
    frozen_tower = model.tower.visual.conv1.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model.train().training_loss(batch); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert model.last_losses["masks"] > 0 and model.tower.seve.gate.abs() > 0
    assert all(torch.equal(v, generator.state_dict()[k]) for k, v in before_gen.items())   # generator + pretrained CLIP
    assert torch.equal(model.tower.visual.conv1.weight, frozen_tower) and not model.generator.training
    # training from segments (one mask per object instance) works too
    loss = model.training_loss(_batch(world, 4, instances=True))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    # and with matched proposals added
    m2 = Fisa(FisaConfig(train_masks="gt+pred"), generator=generator)
    assert torch.isfinite(m2.training_loss(batch))


def test_fit_save_load_segment_and_panoptic(generator, world, tmp_path):
    import ovseg
    from ovseg.train import fit
    torch.manual_seed(1)
    model = Fisa(FisaConfig(lam=0.7), generator=generator)
    ds = ZeroShotTrainView(WorldSemantic(world, "train", background="ignore", fold=0, novel="ignore"))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    fit(model, loader, TrainConfig(max_steps=2, lr=3e-3, device="cpu", log_every=1), tmp_path / "run")
    d = tmp_path / "run" / "model"
    saved = json.loads((d / "config.json").read_text())
    assert saved["arch"] == "fisa" and saved["config"]["generator_config"]["queries"] == 6
    from safetensors.torch import load_file
    keys = list(load_file(str(d / "model.safetensors")))
    assert "tower.seve.gate" in keys and any(k.startswith("generator.proposer.") for k in keys)
    assert not any(k.startswith(("generator.backbone.", "generator.clip_visual.", "tower.visual.conv1.")) for k in keys)
    back = ovseg.segment.load_model(str(d))                                       # from_pretrained via the registry, cached
    assert isinstance(back, Fisa) and back.config == model.config
    x = WorldSemantic(world, "val")[0]["image"][None]
    names = world.class_names[:4] + ["a made-up thing"]
    assert torch.allclose(back.predict(x, names), model.eval().predict(x, names), atol=1e-5)
    res = ovseg.segment((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8), names, model=str(d))
    assert res.label.shape == (64, 64) and res.classes == names and res.label.max() < len(names)
    # the CLI scores it on a folder of images and label PNGs
    from ovseg.cli import main
    val = WorldSemantic(world, "val", background="ignore")
    (tmp_path / "img").mkdir(); (tmp_path / "lab").mkdir()
    for i in range(2):
        s = val[i]
        Image.fromarray((s["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(s["label"].numpy().astype(np.uint8)).save(tmp_path / "lab" / f"{i}.png")
    assert main(["eval", str(tmp_path / "img"), str(tmp_path / "lab"), "--classes", ", ".join(world.class_names),
                 "--model", str(d), "--out", str(tmp_path / "m.json")]) == 0
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["mIoU"] <= 100
    # PQ of its panoptic output on the world (objects are things, background void)
    r = evaluate_panoptic(back, WorldSemantic(world, "val", background="ignore", instances=True), max_images=2)
    assert r["n"] >= 1 and 0 <= r["PQ"] <= 1 and 0 <= r["RQ"] <= 1


def test_bad_input(generator, world, tmp_path):
    model = Fisa(FisaConfig(), generator=generator).eval()
    batch = _batch(world, 4)
    x = batch["image"][:1]
    with pytest.raises(ValueError, match="duplicate"): model.predict(x, ["red circle", "blue ring", "red circle"])
    with pytest.raises(ValueError, match="empty"): model.predict(x, [])
    # an empty proposal set: a defined, uniform answer
    out = model.predict_with_masks(x, world.class_names[:3], torch.zeros(1, 0, 64, 64))
    assert out.shape == (1, 3, 64, 64) and torch.allclose(out, torch.tensor(1e-8).log())
    # masks that binarise to nothing: CLIP classifies none, the generator's head decides, CLIP alone says nothing
    model.config.mask_threshold = 1.0
    _, masks = generator.proposals(x)
    _, valid = model.classify(x, masks.sigmoid(), ["red circle"])
    assert not valid.any()
    assert torch.isfinite(model.predict(x, ["red circle", "blue ring"])).all()
    assert torch.allclose(model.predict(x, ["red circle"], lam=0), torch.tensor(1e-8).log())
    model.config.mask_threshold = 0.5
    # all-ignore labels train nothing; unseen or unknown labels are refused
    model.train()
    loss = model.training_loss(dict(batch, label=torch.full_like(batch["label"], 255)))
    loss.backward()
    assert loss == 0
    leak = batch["label"].clone(); leak[0, 0, 0] = world.novel_classes(0)[0]
    with pytest.raises(ValueError, match="unseen class"): model.training_loss(dict(batch, label=leak))
    with pytest.raises(ValueError, match="outside class_names"): model.training_loss(dict(batch, label=batch["label"].clamp(max=30) + 40))
    # construction errors name the fix
    with pytest.raises(ValueError, match="needs a frozen mask generator"): Fisa(FisaConfig())
    with pytest.raises(FileNotFoundError, match="not found"): Fisa(FisaConfig(generator=str(tmp_path / "nowhere")))
    with pytest.raises(TypeError, match="zsseg"): Fisa(FisaConfig(), generator=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="depth 9"): Fisa(FisaConfig(depth=9), generator=generator)
    with pytest.raises(ValueError, match="unseen indices"): Fisa(FisaConfig(class_names=["a", "b"], unseen=[5]), generator=generator)
    with pytest.raises(ValueError, match="SEVE"): SEVE(32, 32, 2)(torch.randn(1, 3, 32), torch.zeros(0, 32))


def test_settings_in_params_yaml(tmp_path):
    emb, pap = load_config("params.yaml", "embedded").params.fisa, load_config("params.yaml", "paper").params.fisa
    assert emb.benchmark == "world" and pap.benchmark == "real" and pap.train_set == "coco_panoptic"
    assert emb.model.depth == 1 and pap.model.depth == 3 and pap.model.dense == "value" and pap.model.lam_seen == 0.6
    assert pap.train.max_steps * 5 <= 368750 + 5                                   # the ~5x-cheaper assumption
    for bad, key in [("{model: {depth: -1}}", "fisa.model.depth"), ("{model: {trainable: everything}}", "trainable"),
                     ("{model: {generator_config: {queries: 3}}}", "fisa.model.generator_config"),
                     ("{model: {prompt: no placeholder}}", "fisa.model.prompt"), ("{modle: {}}", "did you mean")]:
        p = tmp_path / "params.yaml"
        p.write_text(f"profile: embedded\nprofiles:\n  embedded:\n    fisa: {bad}\n")
        with pytest.raises(ConfigError, match=key): load_config(p)


# --- the paper path on real layouts (COCO panoptic training, ADE20K mIoU and PQ) ----------------------------

def _rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def _panoptic_fixture(root, json_name, png_dir, img_dir, n, cats, seed=0, bad_id=False):
    rng = np.random.default_rng(seed)
    (root / png_dir).mkdir(parents=True, exist_ok=True); (root / img_dir).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        ids = np.full((64, 64), 1000, np.int64)                                    # stuff region (category 3), id 1000
        y, x = rng.integers(4, 30, 2)
        ids[y:y + 24, x:x + 24] = 7                                                # a thing (category 1)
        ids[:6, :6] = 0                                                            # void
        ids[-8:, -8:] = 9                                                          # a crowd region (category 1)
        if bad_id: ids[10, 10] = 4242
        img = np.where((ids == 7)[..., None], [200, 30, 30], [30, 60, 200]).astype(np.uint8)
        Image.fromarray(img).save(root / img_dir / f"{i:04d}.jpg"); Image.fromarray(_rgb(ids)).save(root / png_dir / f"{i:04d}.png")
        images.append({"id": i, "file_name": f"{i:04d}.jpg", "height": 64, "width": 64})
        anns.append({"image_id": i, "file_name": f"{i:04d}.png", "segments_info": [
            {"id": 7, "category_id": 1, "iscrowd": 0}, {"id": 1000, "category_id": 3, "iscrowd": 0},
            {"id": 9, "category_id": 1, "iscrowd": 1}]})
    (root / json_name).write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "car", "isthing": 1},
        {"id": 3, "name": "sky-other-merged", "isthing": 0}]


def test_coco_panoptic_layout_and_errors(tmp_path):
    c = tmp_path / "coco"
    _panoptic_fixture(c, "annotations/panoptic_val2017.json", "annotations/panoptic_val2017", "val2017", 2, CATS)
    ds = COCOPanoptic(tmp_path, "val")
    s = ds[0]
    assert ds.class_names == ["person", "car", "sky"] and ds.is_thing == [True, True, False] and ds.thing_classes == [0, 1]
    assert s["instances"].shape == (3, 64, 64) and s["instance_classes"].tolist() == [0, 2, 0]
    assert s["instance_crowd"].tolist() == [False, False, True]
    assert (s["label"] == 255).sum() == 36 and set(s["label"].unique().tolist()) == {0, 2, 255}
    from ovseg.data import DatasetNotFoundError, LabelValueError
    with pytest.raises(DatasetNotFoundError, match="panoptic_train2017.json"): COCOPanoptic(tmp_path, "train")
    b = tmp_path / "bad" / "coco"
    _panoptic_fixture(b, "annotations/panoptic_val2017.json", "annotations/panoptic_val2017", "val2017", 1, CATS, bad_id=True)
    with pytest.raises(LabelValueError, match="segment id 4242"): COCOPanoptic(tmp_path / "bad", "val")[0]


def test_paper_path_on_real_layouts(clipdir, tmp_path):
    root = tmp_path / "data"
    _panoptic_fixture(root / "coco", "annotations/panoptic_train2017.json", "annotations/panoptic_train2017", "train2017", 2, CATS)
    ade = root / "ADEChallengeData2016"
    _panoptic_fixture(ade, "ade20k_panoptic_val.json", "ade20k_panoptic_val", "images/validation", 2, CATS, seed=1)
    (ade / "annotations/validation").mkdir(parents=True)
    for i in range(2):                                                             # ADE-150 semantic labels of the same images
        Image.fromarray(np.resize(np.arange(0, 151, dtype=np.uint8), (64, 64))).save(ade / f"annotations/validation/{i:04d}.png")
    tiny = TrainConfig(max_steps=1, batch_size=2, lr=1e-3, device="cpu", log_every=1)
    settings = FisaSettings(benchmark="real", train=tiny, generator_train=tiny, generator_dir=str(tmp_path / "gen"),
                            generator=dict(TINY_GEN, clip=f"open_clip:{clipdir}", weights={}),
                            model=FisaConfig(depth=1, dense="value", pool="binary", lam_seen=0.6, prompt="a photo of a {}."))
    train = real_train_set(settings, root, DataConfig(crop_size=64, scale_range=[0.8, 1.2], flip=True, jitter=True))
    assert "instances" in train[0] and train[0]["image"].shape == (3, 64, 64)
    gen = build_generator(settings, train)                                         # panoptic targets, then saved
    assert (tmp_path / "gen" / "model" / "config.json").exists() and gen.config.class_names == ["person", "car", "sky"]
    again = build_generator(settings, train)                                       # the second time it is loaded
    assert all(torch.equal(a, b) for a, b in zip(gen.proposer.state_dict().values(), again.proposer.state_dict().values()))
    model = train_fisa(settings, gen, train, tmp_path / "fisa")
    assert (tmp_path / "fisa" / "model" / "config.json").exists() and model.config.lam_seen == 0.6
    # the standard mIoU benchmark path (ADE-150 layout): any class list, the image's resolution
    from ovseg.data import create_dataset
    from ovseg.experiment import check_method, evaluate_semantic
    a150 = create_dataset("ade150", root, "val")
    r = evaluate_semantic(check_method(model), a150, window=48, stride=16)
    assert 0 <= r["mIoU"] <= 100 and r["IoU"] is not None
    # ADE20K panoptic PQ
    r = evaluate_panoptic(model, ADE20KPanoptic(root, "val"))
    assert r["n"] >= 1 and 0 <= r["PQ"] <= 1 and set(r) >= {"PQ_th", "PQ_st", "SQ", "RQ"}
