"""OVSegmentor (ovseg.ovsegmentor): entities, losses, training steps, EMA hook + exact resume, save/load, inference,
thresholds chosen on training images, settings, initialisation, caption lists, segment / CLI, PASCAL Context-60,
and the paper profile's pieces on fixtures the tests create."""
import dataclasses, itertools, json, math, warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovseg.core import ConfigError, TrainConfig, load_config
from ovseg.ovsegmentor import OVSegmentorConfig, OVSegmentorSettings
from ovseg.embedded import WorldConfig
from ovseg.embedded import World, WorldCaptions, WorldSemantic
from ovseg.ovsegmentor import (CaptionList, CropFlip, EntityCaptions, EntityParser, OVSegmentor, all_gather_grad,
                               build_model, choose_thresholds, info_nce, init_visual, mask_consistency_loss, match_masks,
                               partner_index, setting_recipe, singular, stage2, train_stage)
from ovseg.train import fit, from_pretrained, save_pretrained

torch.set_num_threads(1)       # tiny tensors: one thread is faster, and does not fight other processes for cores


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(n_train=48, n_val=8), seed=0)


@pytest.fixture(scope="module")
def text_encoder():
    from ovseg.encoders import create_text_encoder
    try: return create_text_encoder("minilm")
    except Exception as e: pytest.skip(f"MiniLM unavailable: {e}")


@pytest.fixture(scope="module")
def data(world):
    return EntityCaptions(WorldCaptions(world, "train"), world.class_names)


TINY = dict(width=24, depths=[1, 1], group_tokens=8, groups=4, embed_dim=16, proj_hidden=32)


def _cfg(world, **kw):
    return OVSegmentorConfig(**{**TINY, "vocabulary": list(world.class_names), **kw})


def _model(world, text_encoder, seed=0, **kw):
    torch.manual_seed(seed)
    return OVSegmentor(_cfg(world, **kw), text_encoder=text_encoder)


def _batch(data, idx):
    return torch.utils.data.default_collate([data[i] for i in idx])


@pytest.fixture(scope="module")
def trained(world, text_encoder, data):
    "A tiny stage-2 model after a few steps (shared by the inference tests; never modified by them)."
    m = stage2(_model(world, text_encoder), cmc_weight=0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    b = _batch(data, range(16))
    for _ in range(3):
        loss = m.training_loss(b); opt.zero_grad(); loss.backward(); opt.step(); m.on_step(0)
    return m.eval()


# --- entities ----------------------------------------------------------------------------------
@pytest.mark.parametrize("caption,entities", [
    ("two red circles and a blue square on a plain background", ["red circle", "blue square"]),
    ("A picture of three Red Crosses", ["red cross"]),
    ("a circle, a red circle", ["circle", "red circle"]),          # longest phrase wins where it matches
    ("an image showing a green hexagon", []),                      # no entity of the vocabulary
    ("", []), ("   ", []), ("!!!", []),
])
def test_entity_parsing(caption, entities):
    p = EntityParser(["red circle", "blue squares", "circle", "red cross"])
    assert p.entities(caption) == entities
    q = p.question(caption)
    n_words = sum(len(e.split()) for e, _ in p.spans(caption))
    assert q.count("[MASK]") == n_words
    if not entities: assert q == caption


def test_singular_rules():
    assert [singular(w) for w in ["circles", "crosses", "boxes", "stars", "glass", "bus", "berries", "dish"]] == \
        ["circle", "cross", "box", "star", "glass", "bus", "berry", "dish"]


def test_answers_and_bad_vocabulary():
    p = EntityParser(["red circle", "blue square"])
    assert p.answer(["blue square", "red circle", "blue square"], "a photo of {}") == "a photo of blue square and red circle"
    assert p.answer(["Red Circles"]) == "a photo of a red circle."           # normalised like captions
    with pytest.raises(ValueError, match="not in the vocabulary"): p.answer(["red circle", "green unicorn"])
    with pytest.raises(ValueError, match="no entity"): p.answer([])
    with pytest.raises(ValueError, match="empty"): EntityParser([])
    with pytest.raises(ValueError, match="no word"): EntityParser(["red circle", "--"])


def test_official_entity_parser():
    "ovseg73: the official 73 nouns, synonym map and lemmas (WordNet's noun rules, the vocabulary as lexicon), offline."
    from ovseg.ovsegmentor import OVSEG73, OVSEG73_SYNONYMS, lemma
    p = EntityParser.named(["ovseg73"])
    assert len(OVSEG73) == len(set(OVSEG73)) == 73 and set(OVSEG73_SYNONYMS.values()) <= set(OVSEG73)
    cases = {"A man and two women walking their dogs": ["people", "dog"],
             "children playing with a ball near the buses": ["people", "ball", "bus"],
             "Knives, forks and glasses on a desk.": ["knife", "fork", "glass", "table"],
             "a cat sleeping on the couch in a hotel": ["cat", "sofa", "house"],
             "the couple rode their motorbikes and bikes": ["people", "motorcycle", "bicycle"],
             "sheep grazing next to a tv": ["sheep", "tv"], "a sunset over the sea": []}
    for cap, ents in cases.items(): assert p.entities(cap) == ents, (cap, p.entities(cap))
    assert p.question("A man and two women walking their dogs") == "A [MASK] and two [MASK] walking their [MASK]"
    assert p.answer(["people", "dog"], "itap of a {}.", prefix=True) == "itap of a people and dog"
    assert p.answer(["people", "dog"], "itap of a {}.") == "itap of a people and dog."
    assert [lemma(w, p.known) for w in ("mice", "benches", "boxes", "ladies", "buses", "knives", "skis")] == \
        ["mouse", "bench", "box", "lady", "bus", "knife", "skis"]       # skis: the vocabulary's own word


def test_partner_index():
    ents = [["a", "b"], ["b"], [], ["c"], ["a"]]
    idx = partner_index(ents, partners=10, seed=0)
    for i, ps in enumerate(idx):
        for j, e in ps: assert j != i and e in ents[i] and e in ents[j]
    assert idx[2] == [] and idx[3] == [] and sorted(set(idx[0])) == [(1, "b"), (4, "a")] and len(idx[0]) == 10
    assert len(partner_index(ents, partners=1)[0]) == 1
    assert partner_index(ents, seed=3) == partner_index(ents, seed=3)


def test_partner_draws_follow_the_official_distribution():
    "An entity of the image (uniform), then another image holding it (uniform); with replacement."
    ents = [["a", "b"]] + [["a"]] * 3 + [["b"]]
    idx = partner_index(ents, partners=4000, seed=0)[0]
    by_entity = np.mean([e == "a" for _, e in idx])
    assert abs(by_entity - 0.5) < 0.03                                     # not 3:1 as a uniform draw over pairs would be
    among_a = np.bincount([j for j, e in idx if e == "a"], minlength=4)[1:]
    assert np.all(np.abs(among_a / among_a.sum() - 1 / 3) < 0.04)


# --- losses ------------------------------------------------------------------------------------
def test_info_nce_matches_direct_formula():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(5, 7), dim=-1), F.normalize(torch.randn(5, 7), dim=-1)
    s = torch.tensor(14.0)
    la = -sum(math.log(math.exp(s * a[i] @ b[i]) / sum(math.exp(s * a[i] @ b[j]) for j in range(5))) for i in range(5)) / 5
    lb = -sum(math.log(math.exp(s * b[i] @ a[i]) / sum(math.exp(s * b[i] @ a[j]) for j in range(5))) for i in range(5)) / 5
    assert abs(float(info_nce(a, b, s)) - (la + lb) / 2) < 1e-4
    x = torch.randn(3, 2)
    assert all_gather_grad(x) is x                                    # no DDP: identity


def test_matcher_equals_brute_force():
    torch.manual_seed(0)
    pred, target = torch.rand(3, 4, 5, 5), torch.rand(3, 4, 5, 5)
    got = match_masks(pred, target)
    pn, tn = F.normalize(pred.flatten(2), dim=-1), F.normalize(target.flatten(2), dim=-1)
    for b in range(3):
        cost = torch.cdist(pn[b], tn[b])
        best = min(itertools.permutations(range(4)), key=lambda p: sum(float(cost[g, p[g]]) for g in range(4)))
        assert got[b].tolist() == list(best)


def test_mask_consistency_loss_by_hand():
    "The v1 loss (official=False); the official one is tested in test_ovsegmentor_official.py."
    torch.manual_seed(0)
    t = torch.randn(1, 2, 4, 4) * 5
    p = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = mask_consistency_loss(p, t, threshold=0.6, official=False)
    tb = t.sigmoid().flatten(2); tb = (tb >= 0.6 * tb.amax(-1, keepdim=True)).float()
    pf = p.detach().flatten(2); pf = (pf - pf.amin(-1, keepdim=True)) / (pf.amax(-1, keepdim=True) - pf.amin(-1, keepdim=True))
    idx = match_masks(pf, tb)[0]
    dice = [1 - (2 * (pf[0, g] * tb[0, idx[g]]).sum() + 1) / (pf[0, g].sum() + tb[0, idx[g]].sum() + 1) for g in range(2)]
    assert torch.allclose(loss, torch.stack(dice).mean(), atol=1e-6)
    loss.backward(); assert p.grad.abs().sum() > 0
    # a prediction equal to the binarised target in another group order scores better than its opposite
    perfect = tb.view(1, 2, 4, 4)[:, [1, 0]] * 10
    for official in (True, False):
        assert mask_consistency_loss(perfect, t, official=official) < mask_consistency_loss(-perfect, t, official=official)


# --- model -------------------------------------------------------------------------------------
def test_training_steps_lower_the_loss(world, text_encoder):
    data = WorldCaptions(world, "train")
    model = _model(world, text_encoder, mec_weight=1.0)
    batch = _batch(data, range(16))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = model.training_loss(batch)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(float(loss.detach()))
    assert "mec" in model.last_losses and all(math.isfinite(l) for l in losses)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses


def test_text_features_shared_between_models(world, text_encoder):
    a, b = _model(world, text_encoder), _model(world, text_encoder, seed=1)
    n = a.cache_text(["a red circle on a plain background", "a test string only here"])
    assert b._cache is a._cache and "a test string only here" in b._cache and n == len(a._cache)
    c = _model(world, text_encoder, text_pooling="cls")                # another pooling: its own cache
    assert c._cache is not a._cache


def test_batched_text_cache_equals_one_at_a_time(world):
    from ovseg.encoders import create_text_encoder
    te = create_text_encoder("minilm")                       # its own cache
    m = OVSegmentor(_cfg(world), text_encoder=te)
    texts = [f"a photo of a {c}." for c in world.class_names[:5]] + ["two red circles and a blue ring", "x", "red circle"]
    m.cache_text(texts, batch_size=4)
    batched = {t: m._cache.pop(t) for t in texts}
    m.cache_text(texts, batch_size=1)
    for t in texts:
        assert batched[t][0].shape == m._cache[t][0].shape                     # no padding tokens kept
        assert torch.allclose(batched[t][0], m._cache[t][0], atol=1e-5) and torch.allclose(batched[t][1], m._cache[t][1], atol=1e-5)


def test_bad_batches(world, text_encoder, data):
    model = _model(world, text_encoder, cmc_weight=0.1)
    batch = _batch(data, range(6))
    # captions with no entity: no MEC for them; none with one: MEC skipped
    b = dict(batch, caption=["a plain background"] * 6)
    assert torch.isfinite(model.training_loss(b)) and "mec" not in model.last_losses
    # empty captions are dropped (with a warning); only empty ones are an error
    b = dict(batch, caption=[""] + list(batch["caption"][1:]))
    with pytest.warns(UserWarning, match="1 empty caption"): assert torch.isfinite(model.training_loss(b))
    with pytest.raises(ValueError, match="empty"): model.training_loss(dict(batch, caption=[""] * 6))
    # no image with a partner: no CMC
    b = dict(batch, has_partner=torch.zeros(6, dtype=torch.bool))
    assert torch.isfinite(model.training_loss(b)) and "cmc" not in model.last_losses
    assert "cmc" in (model.training_loss(batch) and model.last_losses)
    # a dataset item without partner is marked so
    lonely = EntityCaptions(WorldCaptions(world, "train"), world.class_names, captions=["x"] * len(data))
    assert lonely[0]["has_partner"] is False and torch.equal(lonely[0]["partner"], lonely[0]["image"])
    with pytest.raises(ValueError, match="vocabulary"):
        OVSegmentor(_cfg(world, vocabulary=[]), text_encoder=text_encoder).training_loss(batch)


def test_cmc_detaches_half_the_groups(world, text_encoder, data):
    model = _model(world, text_encoder, cmc_weight=0.1).train()
    batch = _batch(data, range(4))
    out = model.encode_image(batch["image"])
    q = out["assign"]["q"]; q.retain_grad()
    model.cmc_loss(out, batch["partner"], list(batch["entity"]), batch["has_partner"]).backward()
    zero_rows = (q.grad.abs().sum(-1) == 0).sum(1)
    assert torch.all(zero_rows == 2)                                  # group_ratio 0.5 of 4 groups get no gradient


def test_ema_hook_and_exact_resume(world, text_encoder, data, tmp_path):
    tcfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-3, log_every=1, device="cpu", seed=0, weight_decay=0.05,
                       weight_decay_end=0.05)
    small = torch.utils.data.Subset(data, range(16))
    def make():
        return stage2(_model(world, text_encoder), cmc_weight=0.1)
    before = [p.clone() for p in make().momentum.parameters()]
    full = train_stage(make(), small, tcfg, tmp_path / "full", crop_scale=(0.5, 1.0))     # augmented, via fit
    assert not all(torch.equal(a, b) for a, b in zip(before, full.momentum.parameters()))   # the hook ran
    loader = lambda: torch.utils.data.DataLoader(CropFlip(small, 64, (0.5, 1.0)), batch_size=4)
    fit(make(), loader(), tcfg, tmp_path / "part", stop_after=1)
    last = make()
    fit(last, loader(), tcfg, tmp_path / "part", resume=True)
    sa, sb = full.state_dict(), last.state_dict()
    assert sa.keys() == sb.keys() and any(k.startswith("momentum.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_on_step_is_an_ema(world, text_encoder):
    m = _model(world, text_encoder, cmc_weight=0.1)
    with torch.no_grad():
        for p in m.visual.parameters(): p.add_(1.0)
    old = [p.clone() for p in m.momentum.parameters()]
    m.on_step(1)
    for o, pm, p in zip(old, m.momentum.parameters(), m.visual.parameters()):
        assert torch.allclose(pm, 0.99 * o + 0.01 * p)
    assert not any(p.requires_grad for p in m.momentum.parameters())


def test_stage2_control_has_no_momentum_encoder(world, text_encoder):
    m1 = _model(world, text_encoder)
    ctrl, s2 = stage2(m1, cmc_weight=0.0), stage2(m1, cmc_weight=0.1)
    assert ctrl.momentum is None and s2.momentum is not None
    assert all(torch.equal(a, b) for a, b in zip(ctrl.visual.parameters(), m1.visual.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(s2.momentum.parameters(), m1.visual.parameters()))
    with pytest.raises(ValueError, match=">= 0"): stage2(m1, cmc_weight=-1)


def test_save_load_round_trip(world, trained, tmp_path):
    save_pretrained(trained, tmp_path / "m")
    back = from_pretrained(tmp_path / "m")
    x = WorldCaptions(world, "val")[0]["image"][None]
    names = ["background"] + list(world.class_names)
    assert torch.equal(trained.predict(x, names), back.predict(x, names))
    assert not any(k.startswith("text_encoder.") for k in
                   __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "m" / "model.safetensors")))
    assert back.config == trained.config


def test_fine_tuned_text_encoder(world, data, tmp_path):
    "text_trainable: features computed in the step with gradients, no cache, saved with the model; stage2 freezes it."
    import copy
    from ovseg.encoders import create_text_encoder
    te = create_text_encoder("minilm")
    m = _model(world, te, text_trainable=True).train()
    assert m.text_encoder.model.training and m.frozen_prefixes == () and m.cache_text(["a red circle"]) == 0
    before = copy.deepcopy(m.text_encoder.model.encoder.layer[0].attention.self.query.weight)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    loss = m.training_loss(_batch(data, range(8))); opt.zero_grad(); loss.backward()
    assert m.text_encoder.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0 and "mec" in m.last_losses
    opt.step()
    assert not torch.equal(before, m.text_encoder.model.encoder.layer[0].attention.self.query.weight) and len(m._cache) == 0
    save_pretrained(m, tmp_path / "ft")
    keys = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert any(k.startswith("text_encoder.") for k in keys)
    back = from_pretrained(tmp_path / "ft")
    assert torch.equal(back.text_encoder.model.encoder.layer[0].attention.self.query.weight,
                       m.text_encoder.model.encoder.layer[0].attention.self.query.weight)
    s2 = stage2(m)
    assert not s2.config.text_trainable and not any(p.requires_grad for p in s2.text_encoder.model.parameters())
    # the stage-2 model keeps the fine-tuned text encoder when saved (the paper smoke found it reloading the original)
    assert s2.config.text_tuned and s2.frozen_prefixes == ()
    save_pretrained(s2, tmp_path / "s2")
    back2 = from_pretrained(tmp_path / "s2")
    assert torch.equal(back2.text_encoder.model.encoder.layer[0].attention.self.query.weight,
                       m.text_encoder.model.encoder.layer[0].attention.self.query.weight)


# --- inference ---------------------------------------------------------------------------------
def test_predict_rules(world, trained):
    model = trained
    x = torch.stack([WorldCaptions(world, "val")[i]["image"] for i in range(2)])
    names = list(world.class_names)
    with _config(model, topk=2, bg_thresh=0.5):
        s = model.scores(x, names)
        assert s.shape == (2, len(names), 64, 64)
        # predict = log of the scores floored at 1e-8 (argmax identical; softmax = scores normalised per pixel)
        assert torch.allclose(model.predict(x, names), s.clamp_min(1e-8).log())
        # top-k filter: at most k classes score above zero per image
        assert ((s.amax((2, 3)) > 0).sum(1) <= 2).all()
        # background channel (official rule): 1 where the best score < min(bg_thresh, max score of the image), else 0
        sb = model.scores(x, ["background"] + names)
        assert torch.allclose(sb[:, 1:], s) and set(sb[:, 0].unique().tolist()) <= {0.0, 1.0}
        ref = s.amax(1) < torch.clamp(s.flatten(1).amax(1), max=0.5)[:, None, None]
        assert torch.equal(sb[:, 0].bool(), ref) and torch.equal(sb.argmax(1) == 0, ref)
    with _config(model, topk=2, bg_thresh=0.5, inference_rule="image_filter"):   # v1: channel 0 = the threshold itself
        sb = model.scores(x, ["background"] + names)
        assert (sb[:, 0] <= 0.5).all() and torch.all(sb[:, 0] == sb[:, 0, :1, :1])
        # each pixel's scores are its group's: few distinct score vectors per image
        assert len(torch.unique(s[0].flatten(1).T, dim=0)) <= model.config.groups
    with _config(model, window=32, stride=16):                       # sliding window for images larger than it
        assert model.predict(x, names).shape == (2, len(names), 64, 64)
    with pytest.raises(ValueError, match="repeats"): model.predict(x, ["red circle", "red circle"])
    with pytest.raises(ValueError, match="only 'background'"): model.predict(x, ["background"])


class _config:
    "Temporarily replace fields of model.config."
    def __init__(self, model, **kw): self.model, self.kw = model, kw
    def __enter__(self): self.old = self.model.config; self.model.config = dataclasses.replace(self.old, **self.kw)
    def __exit__(self, *a): self.model.config = self.old


@pytest.mark.parametrize("rule", ["official", "image_filter"])
def test_choose_thresholds_equals_predict_and_never_uses_val(world, trained, rule):
    held = torch.utils.data.Subset(WorldSemantic(world, "train"), range(36, 48))
    names = held.dataset.class_names
    from ovseg.metrics import SemanticMetric
    model = trained
    with _config(model, inference_rule=rule):
        r = choose_thresholds(model, held, bg_grid=[0.2, 0.5, 0.8, 1.0], topk_grid=[1, 3], batch_size=5)
        assert r["images"] == 12 and len(r["table"]) == 8
        assert (model.config.topk, model.config.bg_thresh) == (r["topk"], r["bg_thresh"])
        assert r["mIoU"] == max(t["mIoU"] for t in r["table"])
        for row in (r["table"][0], r["table"][5]):                 # each row = mIoU of predict's argmax at that setting
            model.config = dataclasses.replace(model.config, topk=row["topk"], bg_thresh=row["bg_thresh"])
            m = SemanticMetric(len(names))
            for i in range(len(held)):
                s = held[i]; m.update(model.predict(s["image"][None], names)[0].argmax(0), s["label"])
            assert abs(100 * m.compute()["mIoU"] - row["mIoU"]) < 1e-6
        # strict split: only background + some classes; labels of the others are ignored
        keep = [0] + [c + 1 for c in world.base_classes(0)]
        before = dataclasses.replace(model.config)
        rs = choose_thresholds(model, held, [0.5], [3], classes=keep, apply=False)
        assert len(rs["table"]) == 1 and model.config == before                  # apply=False: the model is unchanged
        with pytest.raises(ValueError, match="training images only"): choose_thresholds(model, WorldSemantic(world, "val"), [0.5])
        with pytest.raises(ValueError, match="background"): choose_thresholds(model, held, [0.5], classes=[1, 2])
        with pytest.raises(ValueError, match="empty"): choose_thresholds(model, held, [])


def test_segment_and_cli_with_a_saved_model(world, trained, tmp_path, capsys):
    from ovseg.cli import main
    from ovseg.segment import segment
    d = save_pretrained(trained, tmp_path / "ovs")
    val = WorldSemantic(world, "val")
    names = ["background"] + list(world.class_names)
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir(); labs.mkdir()
    for i in range(3):
        s = val[i]
        Image.fromarray((s["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(imgs / f"{i}.png")
        Image.fromarray(s["label"].numpy().astype(np.uint8)).save(labs / f"{i}.png")
    # background first: the model's own rule (label 0 where the best score is below min(bg_thresh, max affinity))
    r = segment(imgs / "0.png", names, model=d)
    x = val[0]["image"][None]
    assert r.classes == names and np.array_equal(r.label, trained.predict(x, names)[0].argmax(0).numpy())
    assert torch.allclose(r.probs, trained.scores(x, names)[0] / trained.scores(x, names)[0].sum(0), atol=1e-4)
    # without 'background' every pixel gets a class
    r2 = segment(imgs / "0.png", world.class_names[:5], model=d)
    assert r2.classes == world.class_names[:5] and r2.label.max() < 5
    assert main(["segment", str(imgs / "0.png"), "--classes", ", ".join(names), "--model", str(d), "--out", str(tmp_path / "seg")]) == 0
    assert (tmp_path / "seg" / "0_label.png").exists()
    assert main(["eval", str(imgs), str(labs), "--classes", ", ".join(names), "--model", str(d), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["images"] == 3 and 0 <= m["mIoU"] <= 100 and set(m["IoU"]) == set(names)


# --- settings, initialisation, recipes ---------------------------------------------------------
def test_settings_section(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: embedded\nprofiles:\n  embedded:\n    ovsegmentor:\n      init: random\n"
                 "      model: {groups: 4, bg_thresh: 0.6, vocabulary: [red circle]}\n"
                 "      stage1: {max_steps: 7, lr: 0.001}\n      bg_grid: [0.5, 0.7]\n      settings: [mec, cmc]\n")
    s = load_config(p).params.ovsegmentor
    assert isinstance(s, OVSegmentorSettings) and s.model.groups == 4 and s.model.bg_thresh == 0.6
    assert s.stage1.max_steps == 7 and s.stage1.batch_size == TrainConfig().batch_size and s.bg_grid == [0.5, 0.7]
    for bad, match in [("model: {bg_thresh: 1.5}", "bg_thresh"), ("model: {groupz: 4}", "groupz"),
                       ("settings: [mec, magic]", "settings"), ("crop_scale: [0.9, 0.5]", "crop_scale"),
                       ("model: {width: 100, heads: 3}", "heads")]:
        p.write_text(f"profiles:\n  embedded:\n    ovsegmentor:\n      {bad}\n")
        with pytest.raises(ConfigError, match=match): load_config(p)


def test_setting_recipes():
    assert setting_recipe("contrast") == dict(mec=False, stage2=False, cmc=False, random=False)
    assert setting_recipe("cmc_random") == dict(mec=True, stage2=True, cmc=True, random=True)
    assert setting_recipe("mec_stage2") == dict(mec=True, stage2=True, cmc=False, random=False)
    with pytest.raises(ValueError, match="known"): setting_recipe("cmc2")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    "A random open_clip ViT in the embedded CLIP's folder format, with this model's sizes."
    from ovseg.cliptrain import create_clip_model, save_clip
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": 2, "width": 24, "head_width": 8, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    torch.manual_seed(3)
    return save_clip(create_clip_model(cfg), tmp_path_factory.mktemp("clip"), cfg)


def test_build_model_and_init(world, text_encoder, clip_dir, tmp_path):
    s = OVSegmentorSettings(model=_cfg(world), init="embedded-clip")
    m = build_model(s, "contrast", text_encoder=text_encoder, clip_dir=clip_dir)
    sd = {k[len("visual."):]: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(clip_dir / "open_clip_model.safetensors")).items() if k.startswith("visual.")}
    assert m.config.mec_weight == 0 and m.config.cmc_weight == 0 and m.init_copied
    assert torch.equal(m.visual.stage1[0].attn.in_proj_weight, sd["transformer.resblocks.0.attn.in_proj_weight"])
    assert torch.equal(m.visual.stage2[0].mlp.c_fc.weight, sd["transformer.resblocks.1.mlp.c_fc.weight"])
    r = build_model(s, "cmc_random", text_encoder=text_encoder, clip_dir=clip_dir)
    assert r.init_copied == [] and r.config.mec_weight == 1.0
    assert not torch.equal(r.visual.stage1[0].attn.in_proj_weight, m.visual.stage1[0].attn.in_proj_weight)
    # a state-dict file (open_clip layout here; timm's is tested in test_grouping) gives the same weights
    torch.save({"state_dict": {f"module.visual.{k}": v for k, v in sd.items()}}, tmp_path / "vit.pth")
    m2 = _model(world, text_encoder, seed=5)
    assert init_visual(m2, str(tmp_path / "vit.pth")) and torch.equal(m2.visual.pos_embed, m.visual.pos_embed)
    with pytest.raises(FileNotFoundError, match="not found"): init_visual(m2, str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="vocabulary"):
        build_model(OVSegmentorSettings(model=_cfg(world, vocabulary=[]), init="random"), "mec", text_encoder=text_encoder)


def test_crop_flip(world, data):
    torch.manual_seed(0)
    cf = CropFlip(data, 32, scale=(0.3, 0.6))
    item = cf[0]
    assert item["image"].shape == item["partner"].shape == (3, 32, 32) and item["caption"] == data[0]["caption"]
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    full = CropFlip(data, 64, scale=(1.0, 1.0), flip=False)[0]["image"]     # whole image at its own size: unchanged
    assert torch.allclose(full, data[0]["image"], atol=1e-5)


def test_caption_list(tmp_path):
    for i in range(3): Image.new("RGB", (30 + i, 20), (80 * i, 40, 200)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pairs.tsv").write_text("image\tcaption\n0.jpg\ta cat on a mat\n1.jpg\ttwo dogs\tand a cat\n\n2.jpg\t\n")
    cl = CaptionList(tmp_path / "sub" / "pairs.tsv", root=tmp_path)
    assert len(cl) == 3 and cl.captions == ["a cat on a mat", "two dogs\tand a cat", ""]
    assert cl[1]["image"].shape == (3, 20, 31) and cl[1]["id"] == "1.jpg"
    (tmp_path / "pairs.csv").write_text('0.jpg,"a cat, on a mat"\nmissing.jpg,a dog\n')
    cl = CaptionList(tmp_path / "pairs.csv", size=10)
    assert cl.captions == ["a cat, on a mat", "a dog"] and cl[0]["image"].shape[-2] == 10
    with pytest.warns(UserWarning, match="missing.jpg"): assert cl[1]["id"] == "0.jpg"
    (tmp_path / "bad.csv").write_text("0.jpg,a cat\njust-one-field\n")
    with pytest.raises(ValueError, match=r"bad.csv:2"): CaptionList(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("x.jpg,a\ny.jpg,b\n")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="unreadable"): CaptionList(tmp_path / "gone.csv")[0]
    with pytest.raises(FileNotFoundError, match="caption list"): CaptionList(tmp_path / "none.csv")


# --- PASCAL Context-60 and the paper profile's pieces ------------------------------------------
def _context_fixture(root):
    "VOC2010 + PASCAL Context in the layout `prepare_dataset('pc59')` writes (.mat labels converted to PNGs)."
    import scipy.io
    from ovseg import data as D
    d = root / "VOCdevkit/VOC2010"
    (d / "ImageSets/Main").mkdir(parents=True); (d / "trainval").mkdir(); (d / "JPEGImages").mkdir()
    (d / "labels.txt").write_text("".join(f"{k}: {n}\n" for k, n in enumerate(["accordion", "aeroplane", "bag", "person", "zebra"], 1)))
    (d / "ImageSets/Main/train.txt").write_text("2008_000001\n")
    (d / "ImageSets/Main/val.txt").write_text("2008_000002\n")
    rng = np.random.default_rng(0)
    for i in ("2008_000001", "2008_000002"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"JPEGImages/{i}.jpg")
        lab = np.resize(np.array([0, 1, 2, 4, 5], np.uint16), (40, 48))
        scipy.io.savemat(d / f"trainval/{i}.mat", {"LabelMap": lab})
    D.PREPARE["pc60"]["convert"](root)          # the conversion step of prepare_dataset('pc60')
    return d


def test_pascal_context_60(tmp_path):
    from ovseg.data import create_dataset, list_datasets, PC59
    _context_fixture(tmp_path)
    assert "pc60" in list_datasets()
    p60, p59 = create_dataset("pc60", tmp_path, "val"), create_dataset("pc59", tmp_path, "val")
    assert p60.num_classes == 60 and p60.class_names[0] == "background" and p60.class_names[1:] == p59.class_names
    lab60, lab59 = p60[0]["label"], p59[0]["label"]
    # aeroplane -> 1, person -> 1 + its PC-59 index; accordion / zebra / unlabelled -> background 0 (PC-59: ignored)
    assert sorted(lab60.unique().tolist()) == [0, 1, 1 + PC59.index("person")]
    assert torch.equal(lab60[lab59 != 255], lab59[lab59 != 255] + 1) and (lab60[lab59 == 255] == 0).all()
    bad = tmp_path / "VOCdevkit/VOC2010/SegmentationClassContext/2008_000002.png"
    Image.fromarray(np.full((40, 48), 77, np.uint8)).save(bad)
    with pytest.raises(ValueError, match="77"): p60[0]


def _tiny_bert(d):
    from transformers import BertConfig, BertModel, BertTokenizer
    d.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "and", "on", "mat", "."]
    (d / "vocab.txt").write_text("\n".join(words))
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(str(d))
    return d


def test_paper_pieces_on_fixtures(tmp_path):
    "paper_config's layout (patch 16, BERT [CLS], DINO-style timm init, windows) scaled down, on files made here."
    import timm
    from safetensors.torch import save_file
    from ovseg.data import create_dataset
    from ovseg.experiment import evaluate_semantic
    from ovseg.ovsegmentor import paper_config
    bert = _tiny_bert(tmp_path / "bert")
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "dino.safetensors"))
    for i in range(4): Image.new("RGB", (40, 36), (60 * i, 100, 30)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "cc.tsv").write_text("".join(f"{i}.jpg\ta photo of a {'cat' if i % 2 else 'dog'} on the mat\n" for i in range(4)))
    cfg = paper_config(image_size=32, width=32, heads=8, depths=[1, 1], group_tokens=8, groups=4, embed_dim=16, proj_hidden=32,
                       text_weights=str(bert), vocabulary=["cat", "dog", "mat"], window=32, stride=16, drop_path=0.0)
    s = OVSegmentorSettings(model=cfg, init=str(tmp_path / "dino.safetensors"), stage1=TrainConfig(max_steps=2, batch_size=2, device="cpu"))
    m = build_model(s, "mec")
    assert m.text_encoder.name == "bert-base" and m.config.text_pooling == "cls" and len(m.init_copied) > 10
    assert torch.equal(m.visual.stage2[0].attn.in_proj_weight, vit.blocks[1].attn.qkv.weight)
    data = EntityCaptions(CaptionList(tmp_path / "cc.tsv"), cfg.vocabulary)
    train_stage(m, data, s.stage1, tmp_path / "run", crop_scale=(0.08, 1.0))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 2
    _context_fixture(tmp_path / "data")
    r = evaluate_semantic(m, create_dataset("pc60", tmp_path / "data", "val"), window=0)   # 40x48 > window 32: model windows
    assert 0 <= r["mIoU"] <= 100
