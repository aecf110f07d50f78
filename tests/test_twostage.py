"The zsseg two-stage model (ovseg.twostage): training, prediction, save/load, prompts, bad input."
import dataclasses

import pytest
import torch
import torch.nn as nn

from ovseg.embedded import WorldConfig
from ovseg.images import collate
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
    assert c.backbone == "timm-features:resnet101d" and c.clip == "open_clip:ViT-B-16-quickgelu" and c.lam == 0.8   # OpenAI weights: QuickGELU
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
    # the paper profile names the local files of docs/weights.md (paper/dvc.yaml depends on them); the rest is paper_config's
    from ovseg.paper import PAPER_WEIGHTS
    assert dataclasses.replace(pap.model, weights={}) == dataclasses.replace(paper_config("voc"), weights={})
    assert pap.model.weights == {k: PAPER_WEIGHTS[k] for k in ("open_clip:ViT-B-16-quickgelu", "timm-features:resnet101d")}
    voc, coco = pap.benchmarks["voc"], pap.benchmarks["coco-stuff"]
    assert (voc.dataset, voc.train_split, voc.dataset_kw, voc.lam, voc.max_steps, voc.batch_size, voc.crop) == \
        ("voc20", "train_aug", {"mask_dir": "SegmentationClassAug"}, 0.7, 20000, 16, 512)
    assert (coco.dataset, coco.lam, coco.max_steps, coco.batch_size, coco.crop, coco.test_short_side) == \
        ("coco_stuff171", 0.8, 60000, 32, 640, 640)
    t = pap.train
    assert (t.lr, t.weight_decay, t.grad_clip) == (1e-4, 1e-4, 0.01)
    assert {n: (g.prefixes, g.lr, g.schedule, g.weight_decay) for n, g in t.groups.items()} == \
        {"backbone": (["backbone."], 1e-5, "poly", 1e-4), "rest": ([""], 1e-4, "poly", 1e-4)}        # poly, backbone x0.1
    assert dataclasses.replace(pap.model, **coco.model, lam=coco.lam, weights={}) == dataclasses.replace(paper_config("coco-stuff"), weights={})
    assert (voc.names, voc.augment, voc.eval_resolution, voc.prompt_steps, coco.prompt_steps) == ("raw", "official", "label", 3200, 16000)
    pt = pap.prompt_train
    assert (pt.lr, pt.weight_decay, pt.batch_size, pt.warmup_steps) == (0.02, 5e-4, 32, 100)
    m = emb.model                                                      # the embedded profile keeps its settings
    assert (m.prompt, m.crop_prompt, m.train_backbone, m.no_object_decay, m.seen_names) == ("templates", "same", False, False, "by_name")


def test_zero_shot_data_on_real_layouts(tmp_path):
    "VOC 15/5 and COCO-Stuff 156/15 from fixtures in the real layouts: unseen -> 255, unlabelled images dropped."
    import numpy as np
    from PIL import Image
    from ovseg.twostage import ZsSegBenchmark
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
    assert len(names) == 20 and [names[u] for u in unseen] == ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]   # official raw names
    clean = zero_shot_data(dataclasses.replace(bench, names="clean"), tmp_path)[2]
    assert [clean[u] for u in unseen] == ["potted plant", "sheep", "sofa", "train", "tv monitor"]               # the older option
    assert val[0]["label"].shape == (8, 8) and zero_shot_data(dataclasses.replace(bench, test_short_side=4), tmp_path)[1][0]["image"].shape == (3, 4, 4)
    assert zero_shot_data(dataclasses.replace(bench, test_short_side=4), tmp_path)[1][0]["label"].shape == (8, 8)   # label at its size
    assert zero_shot_data(dataclasses.replace(bench, test_short_side=4, eval_resolution="test"), tmp_path)[1][0]["label"].shape == (4, 4)
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


# --- the headline recipe (issue #25): learned-prompt text path, backbone, decay, seen names, evaluation, augmentation ---

def _official_prompt_feature(model, ctx, name, tok, dot_after=True):
    """The official LearnablePromptExtractor (zsseg.baseline@d77c3af text_prompt.py:75-152) written from its equations:
    start/dot/end/pad signals are the token embeddings of "X." at positions 0, 2, 3, 4; the noun is tokenize(name) without
    its start/end tokens; [start, ctx, noun, dot, end] + pad to the context length; feature at position len - 1."""
    L = model.positional_embedding.shape[0]
    emb = model.token_embedding(tok(["X."]))[0]
    start, dot, end, pad = emb[:1], emb[2:3], emb[3:4], emb[4:5]
    ids = tok([name])[0]
    n_name = int((ids != 0).sum()) - 2
    noun = model.token_embedding(ids[1:1 + n_name])
    parts = [start, ctx, noun, dot, end] if dot_after else [start, noun, ctx, dot, end]   # control: ctx after the name
    seq = torch.cat(parts)
    length = len(seq)
    seq = torch.cat([seq, pad.expand(L - length, -1)])[None]
    x = model.transformer(seq + model.positional_embedding, attn_mask=model.attn_mask)
    x = model.ln_final(x)[0, length - 1] @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1)


def test_learned_prompt_token_layout_matches_the_official_equations():
    import open_clip
    from ovseg.openclip import OpenClipTextEncoder
    from ovseg.testing import tiny_clip
    clip = tiny_clip()
    tok = open_clip.get_tokenizer("ViT-B-16", context_length=16)
    text = OpenClipTextEncoder(clip, tok, "tiny")
    torch.manual_seed(0)
    pl = PromptLearner(32, n_ctx=4)
    assert abs(float(PromptLearner(512, 16).ctx.detach().std()) - 0.02) < 0.002          # official init N(0, 0.02), 16 x 512
    names = ["cat", "tv monitor", "pottedplant"]
    ids, ends = pl.token_ids(names, tok, 16)
    for row, end, name in zip(ids.tolist(), ends.tolist(), names):
        body = tok.encode(name)
        expect = [49406] + [0] * 4 + body + [269] + [49407]                          # [SOS] ctx x4 name . [EOS]
        assert row == expect + [0] * (16 - len(expect)) and end == len(expect) - 1   # then id-0 padding
    x, _ = pl.embed(names, text)
    assert torch.equal(x[:, 1:5], pl.ctx.detach().expand(3, -1, -1).to(x.dtype)) or torch.allclose(x[:, 1:5], pl.ctx.expand(3, -1, -1))
    pad0 = clip.token_embedding.weight[0]
    assert torch.allclose(x[1, int(ends[1]) + 1:], pad0.expand(16 - int(ends[1]) - 1, -1))
    with torch.no_grad():
        ours = pl(names, text)
        ref = torch.stack([_official_prompt_feature(clip, pl.ctx, n, tok) for n in names])
        wrong = torch.stack([_official_prompt_feature(clip, pl.ctx, n, tok, dot_after=False) for n in names])
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()
    assert (ours - wrong).abs().max() > 1e-2                                         # control: the layout matters


def test_learned_prompts_only_context_trains(clipdir, world):
    "The prompt step moves only the context vectors, then freezes them; stage 1 neither trains nor optimises them."
    from ovseg.core import TrainConfig
    from ovseg.train import param_groups
    from ovseg.twostage import PromptSamples, prompt_lr, train_prompts
    torch.manual_seed(0)
    model = ZsSeg(_cfg(clipdir, world, prompt="learned", prompt_context=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = ZeroShotTrainView(WorldSemantic(world, "train", background="ignore", fold=0, novel="ignore"))
    samples = PromptSamples(view, per_class=2, size=32, seed=0)
    assert len(samples) <= 2 * len(model.seen_classes) and all(c not in world.novel_classes(0) for _, c in samples.items)
    s = samples[0]
    assert s["image"].shape == (3, 32, 32) and set(s["label"].unique().tolist()) <= {samples.items[0][1], 255}
    losses = train_prompts(model, samples, TrainConfig(max_steps=12, batch_size=8, lr=0.02, weight_decay=5e-4, warmup_steps=2))
    assert len(losses) == 12 and not model.prompt.ctx.requires_grad
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"prompt.ctx"}, changed
    assert prompt_lr(0, 12, 0.02, 2) == pytest.approx(0.02 * 0.005) and prompt_lr(6, 12, 0.02, 2) == pytest.approx(0.01)
    model.training_loss(_batch(world)).backward()
    assert model.prompt.ctx.grad is None
    assert not any(p is model.prompt.ctx for g in param_groups(model) for p in g["params"])


def test_voc_crop_prompts_are_separate(clipdir, world):
    "VOC: the query head keeps its template, the crop classifier reads its own learned prompts (the prompt step trains those)."
    torch.manual_seed(0)
    model = ZsSeg(_cfg(clipdir, world, templates=["a sculpture of a {}."], crop_prompt="learned", prompt_context=4))
    assert model.prompt is None and model.crop_text_learner is model.crop_prompt
    names = world.class_names[:4]
    q, c = model.class_embeddings(names), model.crop_embeddings(names)
    assert torch.allclose(q, model.clip_text.encode_classes(names, templates=["a sculpture of a {}."]).float(), atol=1e-5)
    assert (q - c).abs().max() > 1e-3
    model.prompt_loss(_batch(world)).backward()
    assert model.crop_prompt.ctx.grad is not None and model.crop_prompt.ctx.grad.abs().sum() > 0
    plain = ZsSeg(_cfg(clipdir, world, templates=["a sculpture of a {}."]))
    assert torch.allclose(plain.crop_embeddings(names), plain.class_embeddings(names))   # control: crop_prompt same
    with pytest.raises(ValueError, match="crop_prompt='same'"):
        ZsSeg(_cfg(clipdir, world, prompt="learned", crop_prompt="learned"))


def test_no_object_weight_decay(clipdir, world):
    from ovseg.train import param_groups
    def decayed(model):
        return any(p is model.no_object for g in param_groups(model) if g.get("decay") for p in g["params"])
    assert decayed(ZsSeg(_cfg(clipdir, world, no_object_decay=True)))       # official: weight decay 1e-4 on it
    assert not decayed(ZsSeg(_cfg(clipdir, world)))                          # control: the older rule (no decay)


def test_cross_dataset_names_are_unseen(clipdir, world):
    names = list(world.class_names)
    novel = set(world.novel_classes(0))
    official = ZsSeg(_cfg(clipdir, world, seen_names="vocabulary"))
    flags = official.seen_flags(names[::-1])                                # the training vocabulary, any order
    assert flags.tolist() == [i not in novel for i in range(len(names))][::-1]
    other = names[:5] + ["pink hexagon"]                                     # another dataset's list
    assert not official.seen_flags(other).any()
    assert ZsSeg(_cfg(clipdir, world)).seen_flags(other)[:5].tolist() == [i not in novel for i in range(5)]   # control: by name


class TinyTapsBN(TinyTaps):
    "TinyTaps with a BatchNorm (detectron2's R-103 keeps its BatchNorms frozen)."
    def __init__(self, **kw):
        super().__init__(**kw)
        self.bn = nn.BatchNorm2d(8)
        self.name = "tiny-taps-bn"
        self.freeze()
    def _forward(self, x):
        a = self.bn(self.c8(x)); b = torch.relu(self.c16(a)); c = torch.relu(self.c32(b))
        return a, c.mean((2, 3)), {8: a, 16: b, 32: c}


register_encoder("test-tiny-taps-bn", "visual", lambda ident="", **kw: TinyTapsBN(**kw), "test double with BatchNorm")


def test_trainable_backbone(clipdir, world, tmp_path):
    from ovseg.core import ConfigError, ParamGroupConfig, TrainConfig
    from ovseg.twostage import ZsSegSettings, check_zsseg
    from ovseg.train import from_pretrained, param_groups, save_pretrained
    torch.manual_seed(0)
    model = ZsSeg(_cfg(clipdir, world, backbone="test-tiny-taps-bn", train_backbone=True))
    batch = _batch(world)
    model.training_loss(batch).backward()
    assert model.backbone.c8.weight.grad is not None and model.backbone.c8.weight.grad.abs().sum() > 0
    assert model.backbone.bn.weight.grad is None and not model.backbone.bn.training          # frozen BatchNorm
    groups = {"backbone": ParamGroupConfig(prefixes=["backbone."], lr=1e-5), "rest": ParamGroupConfig(prefixes=[""], lr=1e-4)}
    lrs = {g["group"]: g["lr"] for g in param_groups(model, groups) if g["params"]}
    assert lrs == {"backbone": 1e-5, "rest": 1e-4}                                            # the backbone at 0.1x
    with torch.no_grad(): model.backbone.c8.weight.add_(1.0)
    save_pretrained(model.eval(), tmp_path / "m")
    back = from_pretrained(tmp_path / "m")
    assert torch.equal(back.backbone.c8.weight, model.backbone.c8.weight)                     # the trained backbone is saved
    with pytest.raises(ValueError, match="precomputed"):
        model.training_loss({**batch, **{f"tap_{s}": t for s, t in model.backbone(batch["image"]).taps.items()}})
    frozen = ZsSeg(_cfg(clipdir, world, backbone="test-tiny-taps-bn"))                        # control: frozen by default
    frozen.training_loss(batch).backward()
    assert frozen.backbone.c8.weight.grad is None
    with pytest.raises(ConfigError, match="train.groups"):
        check_zsseg(ZsSegSettings(model=ZsSegConfig(train_backbone=True)))
    check_zsseg(ZsSegSettings(model=ZsSegConfig(train_backbone=True), train=TrainConfig(groups=groups),
                              baseline_train=TrainConfig(groups=groups)))


def test_evaluation_at_the_labels_resolution(clipdir, world):
    """Official (zero_shot_mask_former_model.py:221-231): the semantic map at the test size is resized (bilinear) to the
    original label and scored there. A proposer that returns each image's ground-truth masks (at the test size) makes it
    checkable: every pixel right at the test size (the older protocol, the control), not quite after the upsampling."""
    import torch.nn.functional as F
    from ovseg.maskgen import oracle_masks, two_stage_ensemble
    from ovseg.metrics import SemanticMetric
    from ovseg.twostage import ResizeImage, ablation_scores
    torch.manual_seed(0)
    model = ZsSeg(_cfg(clipdir, world)).eval()
    val, K, names = WorldSemantic(world, "val", background="ignore"), 30, list(world.class_names)
    tf = ResizeImage(40)
    class Small(torch.utils.data.Dataset):
        class_names = val.class_names
        def __len__(self): return 4
        def __getitem__(self, i): return tf(val[i])
    s0 = Small()[0]
    assert s0["image"].shape[-2:] == (40, 40) and s0["label"].shape == (64, 64)
    small = [F.interpolate(Small()[i]["label"][None, None].float(), size=(40, 40), mode="nearest-exact")[0].long() for i in range(4)]
    text = model.class_embeddings(names)
    queue = iter(small)
    def perfect(x, taps=None):
        return text[None].clone(), oracle_masks(next(queue), K).float() * 40 - 20
    model.proposals = perfect
    unseen = world.novel_classes(0)
    rows = ablation_scores(model, Small(), unseen, lams=(), batch_size=1, oracles=())
    ours, old = SemanticMetric(K), SemanticMetric(K)
    for i in range(4):
        emb, logits = text[None], oracle_masks(small[i], K).float() * 40 - 20
        sem = torch.einsum("bqk,bqhw->bkhw", two_stage_ensemble(model.query_logits(emb, text), None, None, [], None), logits.sigmoid())
        ours.update(F.interpolate(sem, size=(64, 64), mode="bilinear", align_corners=False), Small()[i]["label"][None])
        old.update(sem, small[i])
    r, o = ours.compute(unseen=unseen), old.compute(unseen=unseen)
    for k in ("pAcc", "mIoU", "mIoU_seen", "mIoU_unseen"):
        assert rows["proposals"][k] == pytest.approx(100 * r[k], abs=1e-6)
    assert ours.confmat.sum() == sum(int((Small()[i]["label"] != 255).sum()) for i in range(4))   # every original pixel
    assert o["pAcc"] == 1.0 and 0.9 < r["pAcc"] < 1.0                                     # control: the older protocol differs
    model.proposals = perfect; queue = iter(small)
    with pytest.raises(ValueError, match="oracle"):
        ablation_scores(model, Small(), unseen, lams=(), batch_size=1)


def test_official_augmentation():
    import colorsys
    from ovseg.images import train_transform
    from ovseg.twostage import ColorAugSSD, PadTo, ShortSideChoice, _hsv, _rgb, official_train_transform
    g = torch.Generator().manual_seed(0)
    px = torch.rand(3, 5, 7, generator=g)
    hsv = _hsv(px)
    ref = torch.tensor([colorsys.rgb_to_hsv(*px[:, i, j].tolist()) for i in range(5) for j in range(7)]).T.reshape(3, 5, 7)
    assert (hsv - ref).abs().max() < 1e-5 and (_rgb(hsv) - px).abs().max() < 1e-5             # HSV as colorsys (OpenCV's, in [0, 1])
    torch.manual_seed(0)
    s = {"image": torch.rand(3, 30, 60), "label": torch.randint(0, 5, (30, 60))}
    sides = {tuple(ShortSideChoice([16, 24], max_size=40)(s)["image"].shape[-2:]) for _ in range(20)}
    assert sides == {(16, 32), (20, 40)}                                                       # choice list, long side capped
    out = official_train_transform(32, [16])(s)
    assert out["image"].shape == (3, 32, 32) and out["label"].shape == (32, 32)
    assert torch.allclose(out["image"][:, 16:], torch.tensor(128 / 255)) and (out["label"][16:] == 255).all()   # pad 128 / 255
    old = train_transform(32, (16 / 30, 16 / 30))(s)
    assert (old["image"][:, 16:] == 0).all()                                                   # control: the older pipeline pads 0
    for seed in range(5):
        torch.manual_seed(seed)
        j = ColorAugSSD()(s)
        assert j["image"].shape == s["image"].shape and 0 <= j["image"].min() and j["image"].max() <= 1 and j["label"] is s["label"]
    assert PadTo(8)(s)["image"].shape == (3, 30, 60)                                           # never crops


def test_paper_recipe_end_to_end_on_a_real_layout(clipdir, tmp_path):
    """The paper profile's chain on a VOC-layout fixture with tiny encoders: raw names, the official augmentation, the
    learned crop prompts (trained, then frozen), stage 1 through `fit` with poly groups and the backbone at 0.1x, and
    scoring at the label's own size."""
    import numpy as np
    from PIL import Image
    from ovseg.core import ParamGroupConfig, TrainConfig
    from ovseg.twostage import ZsSegBenchmark
    from ovseg.images import collate
    from ovseg.train import fit
    from ovseg.twostage import PromptSamples, ablation_scores, ensemble_row, train_prompts, zero_shot_data
    voc = tmp_path / "data/VOCdevkit/VOC2012"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"): (voc / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(6):
        lab = np.zeros((40, 56), np.uint8); lab[5:30, 5:25] = 1 + k % 3; lab[10:35, 30:50] = 16 + k % 5   # a seen and an unseen class
        img = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8); img[lab == 1 + k % 3] = (200, 30, 30)
        Image.fromarray(img).save(voc / "JPEGImages" / f"{k}.jpg"); Image.fromarray(lab).save(voc / "SegmentationClassAug" / f"{k}.png")
    (voc / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(map(str, range(6))) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("0\n1\n")
    bench = ZsSegBenchmark(dataset_kw={"mask_dir": "SegmentationClassAug"}, crop=32, short_side=[32, 40], test_short_side=32)
    train, val, names, unseen = zero_shot_data(bench, tmp_path / "data")
    assert names[15] == "pottedplant" and train[0]["image"].shape == (3, 32, 32)
    torch.manual_seed(0)
    cfg = ZsSegConfig(backbone="test-tiny-taps-bn", clip=f"open_clip:{clipdir}", class_names=names, unseen=unseen, queries=4, dim=16,
                      mask_dim=16, layers=1, heads=2, ffn=32, embed_hidden=16, templates=["a sculpture of a {}."], crop_prompt="learned",
                      prompt_context=4, train_backbone=True, no_object_decay=True, seen_names="vocabulary", lam=0.7)
    model = ZsSeg(cfg)
    plain = zero_shot_data(bench, tmp_path / "data", augment=False)[0]
    losses = train_prompts(model, PromptSamples(plain, 2, model.crop_size), TrainConfig(max_steps=3, batch_size=2, lr=0.02, warmup_steps=1))
    assert len(losses) == 3 and not model.crop_prompt.ctx.requires_grad
    ctx, conv = model.crop_prompt.ctx.clone(), model.backbone.c8.weight.clone()
    groups = {"backbone": ParamGroupConfig(prefixes=["backbone."], lr=1e-4, schedule="poly", weight_decay=1e-4),
              "rest": ParamGroupConfig(prefixes=[""], lr=1e-3, schedule="poly", weight_decay=1e-4)}
    loader = torch.utils.data.DataLoader(train, batch_size=2, collate_fn=collate)
    fit(model, loader, TrainConfig(max_steps=3, batch_size=2, grad_clip=0.01, device="cpu", groups=groups, log_every=1), tmp_path / "run")
    assert torch.equal(model.crop_prompt.ctx, ctx) and not torch.equal(model.backbone.c8.weight, conv)   # prompts frozen, backbone trained
    assert val[0]["image"].shape[-2:] == (32, 45) and val[0]["label"].shape == (40, 56)
    rows = ablation_scores(model, val, unseen, lams=[0.7], batch_size=1, oracles=())
    assert set(rows) == {"proposals", "clip", ensemble_row(0.7)} and all(0 <= r["pAcc"] <= 100 for r in rows.values())


def test_learned_text_cached_until_the_context_changes(clipdir, world):
    model = ZsSeg(_cfg(clipdir, world, prompt="learned", prompt_context=4))
    names = world.class_names[:3]
    assert model.class_embeddings(names).requires_grad                       # trains: not cached
    model.prompt.requires_grad_(False)
    a = model.class_embeddings(names)
    with torch.no_grad(): model.prompt.ctx.add_(torch.randn(model.prompt.ctx.shape))   # e.g. load_state_dict: the cache is dropped
    b = model.class_embeddings(names)
    assert not a.requires_grad and (a - b).abs().max() > 1e-3
    assert torch.allclose(b, model.prompt(names, model.clip_text), atol=1e-6)


def test_benchmark_model_overrides_are_checked():
    from ovseg.core import ConfigError
    from ovseg.twostage import ZsSegBenchmark, ZsSegSettings, check_zsseg
    with pytest.raises(ConfigError, match="'lerned' is not one of"):
        check_zsseg(ZsSegSettings(benchmarks={"voc": ZsSegBenchmark(model={"prompt": "lerned"})}))
    with pytest.raises(ConfigError, match=r"unknown ZsSegConfig fields \['promt'\]"):
        check_zsseg(ZsSegSettings(benchmarks={"voc": ZsSegBenchmark(model={"promt": "learned"})}))
    with pytest.raises(ConfigError, match="short_side"):
        check_zsseg(ZsSegSettings(benchmarks={"voc": ZsSegBenchmark(short_side=[])}))
    check_zsseg(ZsSegSettings(benchmarks={"voc": ZsSegBenchmark(model={"prompt": "learned", "crop_prompt": "same"})}))
