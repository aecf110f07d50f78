"OVSegmentor (ovseg.ovsegmentor): entities, losses, training steps, EMA hook + exact resume, save/load, inference."
import dataclasses, itertools, math

import pytest
import torch
import torch.nn.functional as F

from ovseg.core import TrainConfig, WorldConfig
from ovseg.embedded import World, WorldCaptions
from ovseg.ovsegmentor import (EntityCaptions, EntityParser, OVSegmentor, OVSegmentorConfig, all_gather_grad,
                               info_nce, mask_consistency_loss, match_masks, partner_index, singular, stage2)
from ovseg.train import fit, from_pretrained, save_pretrained

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(n_train=48, n_val=8), seed=0)


@pytest.fixture(scope="module")
def text_encoder():
    from ovseg.encoders import create_text_encoder
    try: return create_text_encoder("minilm")
    except Exception as e: pytest.skip(f"MiniLM unavailable: {e}")


def _cfg(world, **kw):
    base = dict(width=48, depths=[1, 1], group_tokens=8, groups=4, embed_dim=32, proj_hidden=64,
                vocabulary=list(world.class_names))
    return OVSegmentorConfig(**{**base, **kw})


def _model(world, text_encoder, seed=0, **kw):
    torch.manual_seed(seed)
    return OVSegmentor(_cfg(world, **kw), text_encoder=text_encoder)


def _batch(data, idx):
    return torch.utils.data.default_collate([data[i] for i in idx])


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


def test_partner_index():
    ents = [["a", "b"], ["b"], [], ["c"], ["a"]]
    idx = partner_index(ents, partners=10, seed=0)
    for i, ps in enumerate(idx):
        for j, e in ps: assert j != i and e in ents[i] and e in ents[j]
    assert idx[2] == [] and idx[3] == [] and sorted(idx[0]) == [(1, "b"), (4, "a")]
    assert len(partner_index(ents, partners=1)[0]) == 1
    assert partner_index(ents, seed=3) == partner_index(ents, seed=3)


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
    torch.manual_seed(0)
    t = torch.randn(1, 2, 4, 4) * 5
    p = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = mask_consistency_loss(p, t, threshold=0.6)
    tb = t.sigmoid().flatten(2); tb = (tb >= 0.6 * tb.amax(-1, keepdim=True)).float()
    pf = p.detach().flatten(2); pf = (pf - pf.amin(-1, keepdim=True)) / (pf.amax(-1, keepdim=True) - pf.amin(-1, keepdim=True))
    idx = match_masks(pf, tb)[0]
    dice = [1 - (2 * (pf[0, g] * tb[0, idx[g]]).sum() + 1) / (pf[0, g].sum() + tb[0, idx[g]].sum() + 1) for g in range(2)]
    assert torch.allclose(loss, torch.stack(dice).mean(), atol=1e-6)
    loss.backward(); assert p.grad.abs().sum() > 0
    # a prediction equal to the binarised target in another group order scores better than its opposite
    perfect = tb.view(1, 2, 4, 4)[:, [1, 0]] * 10
    assert mask_consistency_loss(perfect, t) < mask_consistency_loss(-perfect, t)


# --- model -------------------------------------------------------------------------------------
def test_training_steps_lower_the_loss(world, text_encoder):
    data = WorldCaptions(world, "train")
    model = _model(world, text_encoder, mec_weight=1.0)
    batch = _batch(data, range(16))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = model.training_loss(batch)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(float(loss))
    assert "mec" in model.last_losses and all(math.isfinite(l) for l in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_bad_batches(world, text_encoder):
    model = _model(world, text_encoder, cmc_weight=0.1)
    data = EntityCaptions(WorldCaptions(world, "train"), world.class_names)
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


def test_cmc_detaches_half_the_groups(world, text_encoder):
    model = _model(world, text_encoder, cmc_weight=0.1).train()
    data = EntityCaptions(WorldCaptions(world, "train"), world.class_names)
    batch = _batch(data, range(4))
    out = model.encode_image(batch["image"])
    q = out["assign"]["q"]; q.retain_grad()
    model.cmc_loss(out, batch["partner"], list(batch["entity"]), batch["has_partner"]).backward()
    zero_rows = (q.grad.abs().sum(-1) == 0).sum(1)
    assert torch.all(zero_rows == 2)                                  # group_ratio 0.5 of 4 groups get no gradient


def _fit_data(world):
    return torch.utils.data.DataLoader(EntityCaptions(WorldCaptions(world, "train"), world.class_names), batch_size=8)


def test_ema_hook_and_exact_resume(world, text_encoder, tmp_path):
    tcfg = TrainConfig(max_steps=4, batch_size=8, lr=1e-3, log_every=1, device="cpu", seed=0, weight_decay=0.05,
                       weight_decay_end=0.05)
    def make():
        return stage2(_model(world, text_encoder), cmc_weight=0.1)
    m0 = make()
    before = [p.clone() for p in m0.momentum.parameters()]
    full = make()
    fit(full, _fit_data(world), tcfg, tmp_path / "full")
    assert not all(torch.equal(a, b) for a, b in zip(before, full.momentum.parameters()))   # the hook ran
    part = make()
    fit(part, _fit_data(world), tcfg, tmp_path / "part", stop_after=2)
    last = make()
    fit(last, _fit_data(world), tcfg, tmp_path / "part", resume=True)
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


def test_save_load_round_trip(world, text_encoder, tmp_path):
    model = stage2(_model(world, text_encoder), cmc_weight=0.1).eval()
    save_pretrained(model, tmp_path / "m")
    back = from_pretrained(tmp_path / "m")
    x = WorldCaptions(world, "val")[0]["image"][None]
    names = ["background"] + list(world.class_names)
    assert torch.equal(model.predict(x, names), back.predict(x, names))
    assert not any(k.startswith("text_encoder.") for k in
                   __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "m" / "model.safetensors")))
    assert back.config == model.config


def test_predict_rules(world, text_encoder):
    model = _model(world, text_encoder, topk=2, bg_thresh=0.5).eval()
    x = torch.stack([WorldCaptions(world, "val")[i]["image"] for i in range(2)])
    names = list(world.class_names)
    s = model.predict(x, names)
    assert s.shape == (2, len(names), 64, 64)
    # top-k filter: at most k classes score above zero per image
    assert ((s.amax((2, 3)) > 0).sum(1) <= 2).all()
    # background channel: constant per image, = min(bg_thresh, max group affinity)
    sb = model.predict(x, ["background"] + names)
    assert torch.allclose(sb[:, 1:], s) and (sb[:, 0] <= 0.5).all()
    assert torch.all(sb[:, 0] == sb[:, 0, :1, :1])
    # each pixel's scores are its group's: few distinct score vectors per image
    assert len(torch.unique(s[0].flatten(1).T, dim=0)) <= model.config.groups
    # sliding window for images larger than the window
    mw = dataclasses.replace(model.config, window=32, stride=16)
    model.config = mw
    assert model.predict(x, names).shape == (2, len(names), 64, 64)
    with pytest.raises(ValueError, match="repeats"): model.predict(x, ["red circle", "red circle"])
    with pytest.raises(ValueError, match="only 'background'"): model.predict(x, ["background"])
