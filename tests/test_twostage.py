"The zsseg two-stage model (ovseg.twostage): training, prediction, save/load, prompts, bad input."
import pytest
import torch
import torch.nn as nn

from ovseg.core import WorldConfig
from ovseg.data import collate
from ovseg.embedded import World, WorldSemantic
from ovseg.encoders import VisualEncoder, register_encoder
from ovseg.twostage import PromptLearner, ZeroShotTrainView, ZsSeg, ZsSegConfig, paper_config

torch.set_num_threads(1)


class TinyTaps(VisualEncoder):
    "A frozen random conv pyramid with taps at strides 8/16/32 (test double of EfficientNet-Lite0)."
    stride, pad_to = 8, 32

    def __init__(self, seed: int = 0, random_init: bool = False, taps=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c8, self.c16, self.c32 = nn.Conv2d(3, 8, 8, 8), nn.Conv2d(8, 12, 2, 2), nn.Conv2d(12, 16, 2, 2)
        with torch.no_grad():
            for p in self.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.name, self.dim = f"tiny-taps-{seed}", 8
        self.freeze()

    def _forward(self, x):
        a = self.c8(x); b = torch.relu(self.c16(a)); c = torch.relu(self.c32(b))
        return a, c.mean((2, 3)), {8: a, 16: b, 32: c}


register_encoder("test-tiny-taps", "visual", lambda ident="", **kw: TinyTaps(**kw), "test double")


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(n_train=48, n_val=8), seed=0)


def _cfg(clipdir, world, **kw):
    base = dict(backbone="test-tiny-taps", clip=f"open_clip:{clipdir}", class_names=list(world.class_names),
                unseen=world.novel_classes(0), queries=6, dim=16, mask_dim=16, layers=2, heads=2, ffn=32, embed_hidden=16)
    return ZsSegConfig(**{**base, **kw})


def _batch(world, n=8):
    ds = ZeroShotTrainView(WorldSemantic(world, "train", background="ignore", fold=0, novel="ignore"))
    return collate([ds[i] for i in range(n)])


def test_training_lowers_loss_and_predicts(clipdir, world):
    torch.manual_seed(0)
    model = ZsSeg(_cfg(clipdir, world))
    assert model.config.embed_dim == 32 and model.config.text_width == 32         # filled from the tiny CLIP
    batch = _batch(world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(ZsSeg.frozen_prefixes)}
    losses = []
    for _ in range(15):
        loss = model.training_loss(batch); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())     # encoders stay frozen
    model.eval()
    names = [world.class_names[world.base_classes(0)[0]], world.class_names[world.novel_classes(0)[0]], "a made-up thing"]
    out = model.predict(batch["image"][:3], names)
    assert out.shape == (3, 3, 64, 64) and torch.isfinite(out).all()
    probs = out.exp()
    assert (probs >= 0).all() and probs.sum(1).max() <= 6 + 1e-3                      # Σ_q p·m over 6 queries
    assert model.seen_flags(names).tolist() == [True, False, False]
    # odd sizes: padded inside, result at the input resolution
    assert model.predict(torch.rand(1, 3, 50, 37), names).shape == (1, 3, 50, 37)


def test_lambda_modes_follow_the_ensemble(clipdir, world):
    from ovseg.maskgen import two_stage_ensemble
    model = ZsSeg(_cfg(clipdir, world)).eval()
    x = _batch(world, 2)["image"]
    names = world.class_names[:4]
    emb, masks = model.proposals(x)
    text = model.class_embeddings(names)
    ql = model.query_logits(emb, text)
    cl, valid = model.classify_masks(x, masks.sigmoid(), text)
    for lam in (0.8, 0.3, 0.0, None):
        p = two_stage_ensemble(ql, cl, valid, model.seen_flags(names), lam)
        want = torch.einsum("bqk,bqhw->bkhw", p, masks.sigmoid()).clamp_min(1e-8).log()
        assert torch.allclose(model.predict(x, names, lam=lam), want, atol=1e-5)
    # CLIP logits on crops equal CLIP on each crop separately (batched == one at a time)
    from ovseg.maskgen import mask_crops
    crops, v2 = mask_crops(x, masks.sigmoid(), 0.5, model.clip_visual.mean, model.crop_size)
    b, q = valid.nonzero()[0].tolist()
    one = torch.nn.functional.normalize(model.clip_visual(crops[b, q][None]).global_, dim=-1) @ text.T * 100
    assert torch.allclose(cl[b, q], one[0], atol=1e-3)


def test_save_load_round_trip(clipdir, world, tmp_path):
    from ovseg.train import from_pretrained, save_pretrained
    torch.manual_seed(1)
    model = ZsSeg(_cfg(clipdir, world, lam=0.6)).eval()
    with torch.no_grad(): model.no_object.add_(1.0)                                  # not the initial values
    x = _batch(world, 2)["image"]
    names = world.class_names[3:9]
    ref = model.predict(x, names)
    save_pretrained(model, tmp_path / "m")
    back = from_pretrained(tmp_path / "m")
    assert isinstance(back, ZsSeg) and back.config == model.config and back.config.lam == 0.6
    assert torch.allclose(back.predict(x, names), ref, atol=1e-5)
    import json
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["arch"] == "zsseg" and saved["config"]["backbone"] == "test-tiny-taps"
    from safetensors.torch import load_file
    assert not any(k.startswith(ZsSeg.frozen_prefixes) for k in load_file(str(tmp_path / "m" / "model.safetensors")))


def test_bad_input(clipdir, world):
    model = ZsSeg(_cfg(clipdir, world)).eval()
    batch = _batch(world, 4)
    x = batch["image"][:1]
    with pytest.raises(ValueError, match="repeats 'red circle'"): model.predict(x, ["red circle", "blue ring", "red circle"])
    with pytest.raises(ValueError, match="empty"): model.predict(x, [])
    # masks that binarise to nothing: no crop reaches CLIP, p_c = 1 (the proposal classifier decides), CLIP alone: nothing
    model.config.mask_threshold = 1.0
    _, masks = model.proposals(x)
    _, valid = model.classify_masks(x, masks.sigmoid(), model.class_embeddings(["red circle"]))
    assert not valid.any()
    ens, prop = model.predict(x, ["red circle", "blue ring"]), model.predict(x, ["red circle", "blue ring"], lam=None)
    assert torch.isfinite(ens).all() and not torch.allclose(ens, prop)
    assert torch.allclose(model.predict(x, ["red circle"], lam=0), torch.tensor(1e-8).log())
    model.config.mask_threshold = 0.5
    # an empty proposal set (oracle masks of an all-ignored image): defined, uniform output
    from ovseg.maskgen import oracle_masks
    empty = oracle_masks(torch.full((1, 64, 64), 255), 30)
    out = model.predict_with_masks(x, world.class_names, empty)
    assert out.shape == (1, 30, 64, 64) and torch.allclose(out, torch.tensor(1e-8).log())
    # all-ignore training images: a finite loss that trains towards no-object
    model.train()
    loss = model.training_loss(dict(batch, label=torch.full_like(batch["label"], 255)))
    loss.backward()
    assert torch.isfinite(loss) and model.no_object.grad is not None
    # unseen classes must not reach training
    leak = batch["label"].clone(); leak[0, 0, 0] = world.novel_classes(0)[0]
    with pytest.raises(ValueError, match="unseen class"): model.training_loss(dict(batch, label=leak))
    with pytest.raises(ValueError, match="outside class_names"): model.training_loss(dict(batch, label=batch["label"].clamp(max=30) + 40))
    # a model without a training vocabulary cannot tell seen from unseen
    bare = ZsSeg(_cfg(clipdir, world, class_names=[], unseen=[])).eval()
    with pytest.raises(ValueError, match="training vocabulary"): bare.predict(x, ["red circle"])
    assert bare.predict(x, ["red circle"], lam=0).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="unseen indices"): ZsSeg(_cfg(clipdir, world, unseen=[99]))
    with pytest.raises(ValueError, match="taps"): ZsSeg(_cfg(clipdir, world, taps=[4, 8]))


def test_zero_shot_view_drops_unlabelled(world):
    base = WorldSemantic(world, "train", background="ignore")
    novel = world.novel_classes(0)
    view = ZeroShotTrainView(base, unseen=novel)
    assert 0 < len(view) <= len(base)
    for k in range(len(view)):
        lab = view[k]["label"]
        assert (lab != 255).any() and not torch.isin(lab, torch.tensor(novel)).any()
    dropped = set(range(len(base))) - set(view.index)
    for i in dropped: assert torch.isin(base[i]["label"], torch.tensor(novel + [255])).all()


def test_learned_prompts(clipdir, world, tmp_path):
    torch.manual_seed(0)
    model = ZsSeg(_cfg(clipdir, world, prompt="learned", prompt_context=4))
    assert model.prompt.ctx.shape == (4, 32)
    batch = _batch(world, 8)
    opt = torch.optim.AdamW(model.prompt.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model.prompt_loss(batch); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < losses[0]
    # stage-1 training leaves the learned prompts alone (they are trained first, then frozen)
    model.prompt.ctx.grad = None
    model.training_loss(batch).backward()
    assert model.prompt.ctx.grad is None
    from ovseg.train import from_pretrained, save_pretrained
    save_pretrained(model.eval(), tmp_path / "p")
    back = from_pretrained(tmp_path / "p")
    assert torch.equal(back.prompt.ctx, model.prompt.ctx)
    with pytest.raises(ValueError, match="context length"):
        ZsSeg(_cfg(clipdir, world, prompt="learned", prompt_context=14)).class_embeddings(["red striped circle"])


def test_paper_config_is_the_paper():
    c = paper_config("coco-stuff")
    assert (c.queries, c.dim, c.layers, c.heads, c.ffn, c.embed_hidden, c.decoder_stride) == (100, 256, 6, 8, 2048, 1024, 32)
    assert c.backbone == "timm-features:resnet101d" and c.clip == "open_clip:ViT-B-16" and c.lam == 0.8
    assert paper_config("voc").lam == 0.7 and paper_config("voc", queries=50).queries == 50


def test_per_pixel_baseline(clipdir, world, tmp_path):
    "head='per_pixel': the paper's one-stage baseline trains on seen pixels, predicts a distribution, saves and loads."
    from ovseg.train import from_pretrained, save_pretrained
    torch.manual_seed(0)
    model = ZsSeg(_cfg(clipdir, world, head="per_pixel"))
    assert model.proposer is None
    batch = _batch(world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model.training_loss(batch); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    # the loss is CE over the seen classes only: a hand computation on the mapped labels agrees
    model.eval()
    seen = model.seen_classes
    text = model.class_embeddings(seen)
    logits = torch.nn.functional.interpolate(model.pixel_logits(batch, text), size=(64, 64), mode="bilinear", align_corners=False)
    lut = {c: i for i, c in enumerate(c for c in range(30) if c not in world.novel_classes(0))}
    mapped = batch["label"].clone().apply_(lambda v: lut.get(v, 255))
    assert torch.allclose(model.training_loss(batch), torch.nn.functional.cross_entropy(logits, mapped, ignore_index=255), atol=1e-5)
    names = world.class_names[:7]
    out = model.predict(batch["image"][:2], names)
    assert out.shape == (2, 7, 64, 64) and torch.allclose(out.exp().sum(1), torch.ones(2, 64, 64), atol=1e-4)
    assert model.predict(torch.rand(1, 3, 40, 50), names).shape == (1, 7, 40, 50)
    with pytest.raises(ValueError, match="head='proposals'"): model.proposals(batch["image"][:1])
    save_pretrained(model, tmp_path / "fcn")
    back = from_pretrained(tmp_path / "fcn")
    assert back.config.head == "per_pixel" and torch.allclose(back.predict(batch["image"][:2], names), out, atol=1e-5)
    # an all-ignored batch gives a zero loss, not NaN
    assert model.train().training_loss(dict(batch, label=torch.full_like(batch["label"], 255))).item() == 0.0


def test_class_names_compared_ignoring_case_and_spacing(clipdir, world):
    model = ZsSeg(_cfg(clipdir, world)).eval()
    seen, novel = model.seen_classes[0], world.class_names[world.novel_classes(0)[0]]
    # a training class written differently is still a training class (the ensemble trusts the query head on it)
    assert model.seen_flags([seen.upper(), f"  {seen}  ".replace(" ", "  "), novel.title()]).tolist() == [True, True, False]
    x = _batch(world, 1)["image"]
    with pytest.raises(ValueError, match="repeats"): model.predict(x, [seen, seen.upper()])
    with pytest.raises(ValueError, match="not a class name"): model.predict(x, [seen, "  "])
    with pytest.raises(ValueError, match="config.class_names repeats"):
        ZsSeg(_cfg(clipdir, world, class_names=["red circle", "Red Circle"], unseen=[]))
    with pytest.raises(ValueError, match="at least one query"): ZsSeg(_cfg(clipdir, world, queries=0))


def test_proposals_from_precomputed_taps(clipdir, world):
    model = ZsSeg(_cfg(clipdir, world)).eval()
    x = _batch(world, 2)["image"]
    emb, masks = model.proposals(x)
    emb2, masks2 = model.proposals(x, taps=model.backbone(x).taps)
    assert torch.allclose(emb, emb2, atol=1e-6) and torch.allclose(masks, masks2, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 32"): model.proposals(torch.rand(1, 3, 50, 50), taps=model.backbone(x).taps)


def _save_world_folder(world, root, n=3):
    "n val images of the world as PNG files and their label PNGs (255 = background, ignored)."
    import numpy as np
    from PIL import Image
    val = WorldSemantic(world, "val", background="ignore")
    (root / "img").mkdir(parents=True); (root / "lab").mkdir()
    for i in range(n):
        s = val[i]
        Image.fromarray((s["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / "img" / f"v{i}.png")
        Image.fromarray(s["label"].numpy().astype(np.uint8), "L").save(root / "lab" / f"v{i}.png")
    return root / "img", root / "lab"


def test_segment_and_cli_with_a_saved_zsseg(clipdir, world, tmp_path, capsys):
    "ovseg.segment, `ovseg segment --model DIR` and `ovseg eval --model DIR` run a saved zsseg model with its λ."
    import json
    from ovseg.cli import main
    from ovseg.segment import segment
    from ovseg.train import save_pretrained
    torch.manual_seed(0)
    model = ZsSeg(_cfg(clipdir, world, lam=0.6, mask_threshold=0.4)).eval()
    save_pretrained(model, tmp_path / "zs")
    saved = json.loads((tmp_path / "zs" / "config.json").read_text())["config"]
    assert saved["lam"] == 0.6 and saved["mask_threshold"] == 0.4 and saved["unseen"] == world.novel_classes(0)
    imgs, labs = _save_world_folder(world, tmp_path)
    names = list(world.class_names)
    r = segment(imgs / "v0.png", names, model=str(tmp_path / "zs"))
    want = model.predict(WorldSemantic(world, "val", background="ignore")[0]["image"], names)[0].argmax(0)
    assert r.label.shape == (64, 64) and r.classes == names
    assert (torch.from_numpy(r.label.astype("int64")) == want).float().mean() > 0.99   # PNG round trip of the image only
    assert main(["segment", str(imgs / "v1.png"), "--classes", ", ".join(names[:5]), "--model", str(tmp_path / "zs"),
                 "--out", str(tmp_path / "seg")]) == 0
    assert (tmp_path / "seg" / "v1_label.png").exists()
    capsys.readouterr()
    assert main(["eval", str(imgs), str(labs), "--classes", ", ".join(names), "--model", str(tmp_path / "zs"),
                 "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["images"] == 3 and 0 <= m["pAcc"] <= 100
    assert sorted(m["unseen"]) == sorted(names[c] for c in world.novel_classes(0))   # seen / unseen scores for zero-shot models
    assert {"mIoU_seen", "mIoU_unseen", "hIoU"} <= set(m)


def test_params_zsseg_sections():
    "params.yaml: the embedded block builds the model it names; the paper block is the paper's (VOC 15/5, COCO-Stuff 156/15)."
    from ovseg.core import load_config
    emb = load_config("params.yaml", "embedded").params.zsseg
    assert emb.benchmark == "world" and len(emb.seeds) >= 3 and emb.holdout > 0 and 0 < emb.model.mask_threshold < 1
    assert emb.model.head == "proposals" and emb.model.lam in emb.lams
    pap = load_config("params.yaml", "paper").params.zsseg
    assert pap.benchmark == "real" and set(pap.benchmarks) == {"voc", "coco-stuff"}
    assert pap.model == paper_config("voc")
    voc, coco = pap.benchmarks["voc"], pap.benchmarks["coco-stuff"]
    assert (voc.dataset, voc.train_split, voc.dataset_kw, voc.lam, voc.max_steps, voc.batch_size, voc.crop) == \
        ("voc20", "train_aug", {"mask_dir": "SegmentationClassAug"}, 0.7, 20000, 16, 512)
    assert (coco.dataset, coco.lam, coco.max_steps, coco.batch_size, coco.crop, coco.test_short_side) == \
        ("coco_stuff171", 0.8, 60000, 32, 640, 640)
    t = pap.train
    assert (t.lr, t.weight_decay, t.grad_clip) == (1e-4, 1e-4, 0.01)


def test_zero_shot_data_on_real_layouts(tmp_path):
    "VOC 15/5 and COCO-Stuff 156/15 from fixtures in the real layouts: unseen -> 255, unlabelled images dropped."
    import numpy as np
    from PIL import Image
    from ovseg.core import ZsSegBenchmark
    from ovseg.twostage import zero_shot_data
    def save(path, arr, img=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(arr, np.uint8), "RGB" if img else "L").save(path)
    # VOC: raw 0 background, 1..20 classes (16 pottedplant, 17 sheep, 18 sofa, 19 train, 20 tvmonitor are unseen)
    voc = tmp_path / "VOCdevkit/VOC2012"
    labels = {"a": [1, 16], "b": [0, 17], "c": [0, 255], "d": [5, 5]}
    for k, vals in labels.items():
        save(voc / "JPEGImages" / f"{k}.jpg", np.full((8, 8, 3), 100), img=True)
        save(voc / "SegmentationClassAug" / f"{k}.png", np.resize(np.array(vals), (8, 8)))
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text("a\nb\nc\nd\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    bench = ZsSegBenchmark(dataset="voc20", dataset_kw={"mask_dir": "SegmentationClassAug"}, crop=8, short_side=[8, 16],
                           test_short_side=8)
    train, val, names, unseen = zero_shot_data(bench, tmp_path)
    assert len(names) == 20 and [names[u] for u in unseen] == ["potted plant", "sheep", "sofa", "train", "tv monitor"]
    assert [train.dataset.items[i][2] for i in train.index] == ["a", "d"]            # b: only unseen + background, c: nothing
    a = zero_shot_data(bench, tmp_path, augment=False)[0][0]["label"]
    assert sorted(a.unique().tolist()) == [0, 255]                                     # aeroplane kept, pottedplant ignored
    assert train[0]["image"].shape == (3, 8, 8) and len(val) == 2
    assert sorted(val[0]["label"].unique().tolist()) == [0, 15]                        # evaluation keeps the unseen class
    # COCO-Stuff: raw = COCO id - 1; 20 = cow (unseen), 0 = person, 171 = wall-concrete (unseen)
    c = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        for k, vals in {"1": [0, 20], "2": [20, 171], "3": [255, 255]}.items():
            save(c / split / f"{k}.jpg", np.full((8, 8, 3), 50), img=True)
            save(c / "stuffthingmaps" / split / f"{k}.png", np.resize(np.array(vals), (8, 8)))
    cb = ZsSegBenchmark(dataset="coco_stuff171", train_split="train", crop=8, short_side=[8], test_short_side=8)
    train, val, names, unseen = zero_shot_data(cb, tmp_path, augment=False)
    assert len(names) == 171 and len(unseen) == 15 and len(names) - len(unseen) == 156
    assert [train.dataset.items[i][2] for i in train.index] == ["1"]
    assert sorted(train[0]["label"].unique().tolist()) == [0, 255] and len(val) == 3


def test_ablation_scores_match_predict(clipdir, world):
    "Every row of ablation_scores is the metric of the corresponding prediction, computed separately."
    from ovseg.maskgen import oracle_classes, oracle_masks
    from ovseg.metrics import SemanticMetric
    from ovseg.twostage import ablation_scores, choose_lam, ensemble_row
    torch.manual_seed(0)
    model = ZsSeg(_cfg(clipdir, world)).eval()
    val = WorldSemantic(world, "val", background="ignore")
    names, unseen = list(world.class_names), world.novel_classes(0)
    scores = ablation_scores(model, val, unseen, lams=(0.3, 0.8), batch_size=3)     # batches of 3 (the last one short)
    b = collate([val[i] for i in range(len(val))])
    def score(logits):
        m = SemanticMetric(30); m.update(logits, b["label"]); r = m.compute(unseen=unseen)
        return {k: 100 * r[k] for k in ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pAcc")}
    want = {"proposals": score(model.predict(b["image"], names, lam=None)), "clip": score(model.predict(b["image"], names, lam=0.0)),
            ensemble_row(0.3): score(model.predict(b["image"], names, lam=0.3)),
            ensemble_row(0.8): score(model.predict(b["image"], names, lam=0.8)),
            "oracle_masks": score(model.predict_with_masks(b["image"], names, oracle_masks(b["label"], 30)))}
    _, masks = model.proposals(b["image"])
    want["oracle_classes"] = score(torch.einsum("bqk,bqhw->bkhw", oracle_classes(masks.sigmoid(), b["label"], 30), masks.sigmoid()))
    assert set(scores) == set(want)
    for row, w in want.items():
        for k, v in w.items(): assert scores[row][k] == pytest.approx(v, abs=1e-6, nan_ok=True), (row, k)
    # rows can be left out; unknown oracle rows and λ without an ensemble row are refused
    assert ablation_scores(model, val, unseen, lams=(), oracles=()).keys() == {"proposals", "clip"}
    with pytest.raises(ValueError, match="unknown oracle"): ablation_scores(model, val, unseen, oracles=("oracle_boxes",))
    assert choose_lam({ensemble_row(0.5): {"hIoU": 2.0}, ensemble_row(0.7): {"hIoU": 2.0}}, [0.5, 0.7]) == 0.5   # ties: the first
    with pytest.raises(ValueError, match="no ensemble rows"): choose_lam(scores, [0.6])
