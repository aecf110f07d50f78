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
