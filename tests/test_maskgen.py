"Mask generation pieces (ovseg.maskgen): matcher, losses, crops, pooling, ensemble, oracles."
import itertools, math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.maskgen import (CLIP_MEAN, HungarianMatcher, MaskProposer, PixelDecoder, SetCriterion, TransformerDecoder,
                           dice_cost, dice_loss, focal_cost, mask_boxes, mask_crops, mask_pool, oracle_classes,
                           oracle_masks, semantic_inference, semantic_targets, sigmoid_focal_loss, two_stage_ensemble)

torch.set_num_threads(1)


def _focal_pixel(x, t, a=0.25, g=2.0):
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    pt = p * t + (1 - p) * (1 - t)
    return (a * t + (1 - a) * (1 - t)) * ce * (1 - pt) ** g


def test_focal_and_dice_by_hand():
    x = torch.tensor([[0.0, 2.0, -1.0, 3.0]]); t = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    want = np.mean([_focal_pixel(float(a), float(b)) for a, b in zip(x[0], t[0])])
    assert sigmoid_focal_loss(x, t, num_masks=1).item() == pytest.approx(want, rel=1e-5)
    assert sigmoid_focal_loss(x, t, num_masks=4).item() == pytest.approx(want / 4, rel=1e-5)
    p = torch.sigmoid(x)[0].tolist()
    want_dice = 1 - (2 * (p[0] + p[3]) + 1) / (sum(p) + 2 + 1)
    assert dice_loss(x, t, 1).item() == pytest.approx(want_dice, rel=1e-5)
    # the pairwise costs equal the per-pair losses (focal: mean over pixels)
    assert focal_cost(x, t)[0, 0].item() == pytest.approx(want, rel=1e-5)
    assert dice_cost(x, t)[0, 0].item() == pytest.approx(want_dice, rel=1e-5)


def _brute_force(C):
    Q, T = C.shape
    return min(sum(C[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(Q), T))


@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal_vs_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    Q, T, K = 5, 1 + seed % 4, 4
    logits, masks = torch.randn(1, Q, K + 1, generator=g), torch.randn(1, Q, 6, 6, generator=g)
    cls = torch.randint(0, K, (T,), generator=g)
    tm = torch.rand(T, 12, 12, generator=g) > 0.5
    m = HungarianMatcher()
    C = m.cost(logits[0], masks[0], cls, tm).numpy()
    # the cost by its definition: 1 * -p[class] + 20 * focal + 1 * dice, targets nearest-downsampled
    t_small = tm[:, ::2, ::2].float().flatten(1)         # nearest 12 -> 6 takes every second pixel
    p = logits[0].softmax(-1)
    direct = -p[:, cls] + 20 * focal_cost(masks[0].flatten(1), t_small) + dice_cost(masks[0].flatten(1), t_small)
    assert np.allclose(C, direct.numpy(), atol=1e-5)
    (q, t), = m(logits, masks, [(cls, tm)])
    assert len(q) == T and len(set(q.tolist())) == T and sorted(t.tolist()) == list(range(T))
    assert C[q.numpy(), t.numpy()].sum() == pytest.approx(_brute_force(C), abs=1e-5)


def test_semantic_targets_ignore_and_errors():
    lab = torch.tensor([[[3, 3, 255], [0, 255, 255]]])
    (cls, masks), = semantic_targets(lab)
    assert cls.tolist() == [0, 3] and masks.sum().item() == 3 and not masks[:, 0, 2].any()
    (cls, masks), = semantic_targets(torch.full((4, 4), 255))
    assert cls.numel() == 0 and masks.shape == (0, 4, 4)
    with pytest.raises(ValueError, match="negative label"): semantic_targets(torch.tensor([[-1, 0]]))


def test_criterion_ce_by_hand_and_deep_supervision():
    g = torch.Generator().manual_seed(0)
    L, B, Q, K = 3, 2, 4, 3
    logits, masks = torch.randn(L, B, Q, K + 1, generator=g), torch.randn(L, B, Q, 8, 8, generator=g)
    lab = torch.full((B, 8, 8), 255); lab[0, :4] = 1; lab[0, 4:] = 2; lab[1, :, :3] = 0
    tg = semantic_targets(lab)
    crit = SetCriterion()
    parts = crit.layer_losses(logits[0], masks[0], tg, num_masks=3)
    idx = crit.matcher(logits[0], masks[0], tg)
    # CE by hand: matched queries -> their class, others -> no-object (weight 0.1), weighted mean
    num, den = 0.0, 0.0
    for b in range(B):
        target = {int(q): int(tg[b][0][t]) for q, t in zip(*idx[b])}
        for q in range(Q):
            c = target.get(q, K)
            w = 0.1 if c == K else 1.0
            num += -w * F.log_softmax(logits[0, b, q], -1)[c].item(); den += w
    assert parts["ce"].item() == pytest.approx(num / den, rel=1e-5)
    total, last = crit(logits, masks, tg)
    want = sum(sum(w * v for w, v in zip((1, 20, 1), crit.layer_losses(logits[l], masks[l], tg, 3).values())) for l in range(L))
    assert total.item() == pytest.approx(float(want), rel=1e-5)
    assert set(last) == {"ce", "focal", "dice"}


def test_criterion_all_ignored_batch():
    logits = torch.randn(2, 1, 3, 5, requires_grad=True)
    masks = torch.randn(2, 1, 3, 4, 4, requires_grad=True)
    total, parts = SetCriterion()(logits, masks, semantic_targets(torch.full((1, 8, 8), 255)))
    total.backward()
    assert torch.isfinite(total) and parts["focal"] == 0 and parts["dice"] == 0
    assert logits.grad.abs().sum() > 0            # every query is pushed towards no-object
    # the CE target is the last (no-object) class for every query
    want = F.cross_entropy(logits[1, 0].detach(), torch.full((3,), 4))
    assert parts["ce"] == pytest.approx(want.item(), rel=1e-5)


def _crop_loop(img, masks, thr, fill, size, expand):
    "The official recipe, one proposal at a time: box of the binary mask, mean fill, bicubic resize."
    out, valid = [], []
    H, W = img.shape[-2:]
    for m in masks:
        b = m > thr
        if not b.any(): valid.append(False); out.append(None); continue
        ys, xs = b.nonzero(as_tuple=True)
        x0, y0, x1, y1 = xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * expand, (y1 - y0) * expand
        l, t, r, bt = int(cx - w / 2), int(cy - h / 2), int(cx + w / 2), int(cy + h / 2)
        l, t, r, bt = max(l, 0), max(t, 0), min(r, W), min(bt, H)
        f = torch.tensor(fill).view(3, 1, 1)
        reg = img[:, t:bt, l:r] * b[None, t:bt, l:r] + f * (~b[None, t:bt, l:r])
        out.append(F.interpolate(reg[None], size=(size, size), mode="bicubic", align_corners=False)[0]); valid.append(True)
    return out, valid


@pytest.mark.parametrize("expand,size,method", [(1.0, 16, "matrix"), (1.0, 7, "matrix"), (1.4, 12, "matrix"),
                                                (1.0, 16, "loop"), (1.4, 12, "loop"), (1.0, 9, "auto")])
def test_mask_crops_equal_per_crop_loop(expand, size, method):
    g = torch.Generator().manual_seed(1)
    B, Q, H, W = 2, 6, 23, 31
    img = torch.rand(B, 3, H, W, generator=g)
    masks = torch.zeros(B, Q, H, W)
    for b in range(B):
        for q in range(Q - 1):
            y0, x0 = torch.randint(0, H - 2, (1,), generator=g).item(), torch.randint(0, W - 2, (1,), generator=g).item()
            y1, x1 = y0 + torch.randint(1, H - y0, (1,), generator=g).item(), x0 + torch.randint(1, W - x0, (1,), generator=g).item()
            masks[b, q, y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=g)   # soft, partly below thr
    masks[1, 2, 5, 7] = 0.9                                                          # a single-pixel mask
    crops, valid = mask_crops(img, masks, 0.5, CLIP_MEAN, size, expand, method=method, chunk=4)
    for b in range(B):
        ref, v = _crop_loop(img[b], masks[b], 0.5, CLIP_MEAN, size, expand)
        assert valid[b].tolist() == v
        for q in range(Q):
            if v[q]: assert torch.allclose(crops[b, q], ref[q], atol=1e-5), (b, q)
    assert not valid[:, -1].any()                                                    # empty mask: invalid ...
    assert torch.allclose(crops[:, -1], torch.tensor(CLIP_MEAN).view(1, 3, 1, 1).expand(B, 3, size, size))  # ... and all fill


def test_mask_crops_bad_input():
    with pytest.raises(ValueError, match="image resolution"): mask_crops(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="expand"): mask_boxes(torch.ones(1, 4, 4, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="method"): mask_crops(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), method="fast")
    crops, valid = mask_crops(torch.rand(1, 3, 8, 8), torch.zeros(1, 0, 8, 8), size=4)   # no proposals at all
    assert crops.shape == (1, 0, 3, 4, 4) and valid.shape == (1, 0)


def test_mask_pool_and_semantic_inference():
    dense = torch.randn(2, 8, 4, 4)
    assert mask_pool(dense, torch.rand(2, 5, 32, 32)).shape == (2, 5, 8)
    ones = torch.ones(2, 1, 4, 4)
    assert torch.allclose(mask_pool(dense, ones)[:, 0], dense.mean((2, 3)), atol=1e-5)
    m = torch.zeros(2, 1, 4, 4); m[:, :, 1, 2] = 1
    assert torch.allclose(mask_pool(dense, m)[:, 0], dense[:, :, 1, 2], atol=1e-4)
    assert (mask_pool(dense, torch.zeros(2, 3, 4, 4)) == 0).all()
    p, ml = torch.rand(2, 5, 3), torch.randn(2, 5, 6, 6)
    want = (p[..., None, None] * torch.sigmoid(ml)[:, :, None]).sum(1)
    assert torch.allclose(semantic_inference(p, ml), want, atol=1e-5)
    assert (semantic_inference(torch.zeros(1, 0, 3), torch.zeros(1, 0, 6, 6)) == 0).all()


def _np_softmax(x): e = np.exp(x - x.max(-1, keepdims=True)); return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("lam", [0.8, 0.5, 0.0, None])
def test_ensemble_against_numpy(lam):
    rng = np.random.default_rng(0)
    B, Q, K = 2, 4, 5
    ql, cl = rng.normal(size=(B, Q, K + 1)) * 3, rng.normal(size=(B, Q, K + 1)) * 3
    valid = rng.random((B, Q)) > 0.3
    seen = np.array([True, False, True, False, False])
    got = two_stage_ensemble(torch.tensor(ql), torch.tensor(cl), torch.tensor(valid), seen, lam).numpy()
    pq = _np_softmax(ql)[..., :K]                         # no-object dropped after the softmax
    pc = _np_softmax(cl[..., :K])                         # ... and before it for CLIP
    pc = np.where(valid[..., None], pc, 1.0)
    if lam is None: want = pq
    elif lam <= 0: want = pc * valid[..., None]
    else: want = np.where(seen, pq ** lam * pc ** (1 - lam), pq ** (1 - lam) * pc ** lam)
    assert np.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="one entry per class"):
        two_stage_ensemble(torch.tensor(ql), torch.tensor(cl), None, seen[:3], 0.8)


def test_ensemble_empty_proposal_set():
    p = two_stage_ensemble(torch.zeros(1, 0, 4), torch.zeros(1, 0, 3), torch.zeros(1, 0, dtype=torch.bool), [True] * 3, 0.8)
    assert p.shape == (1, 0, 3)


def test_oracles():
    lab = torch.full((1, 6, 6), 255); lab[0, :3, :3] = 0; lab[0, 3:, 3:] = 2
    om = oracle_masks(lab, 3)
    assert om.sum((-2, -1)).tolist() == [[9, 0, 9]]
    prop = torch.zeros(1, 3, 6, 6); prop[0, 0, :3, :3] = 1; prop[0, 1, :3, :6] = 1   # exact class 0; half class 0
    oc = oracle_classes(prop, lab, 3)
    assert torch.allclose(oc[0, 0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(oc[0, 1], torch.tensor([1.0, 0, 0]))                     # IoU 0.5 with class 0 only -> normalised
    assert (oc[0, 2] == 0).all()                                                    # overlaps nothing
    with pytest.raises(ValueError, match="outside"): oracle_masks(torch.tensor([[[5]]]), 3)


def test_architecture_shapes():
    taps = {8: torch.randn(2, 5, 8, 8), 16: torch.randn(2, 6, 4, 4), 32: torch.randn(2, 7, 2, 2)}
    assert PixelDecoder({8: 5, 16: 6, 32: 7}, 16, 8)(taps).shape == (2, 8, 16, 16)
    with pytest.raises(KeyError, match="missing"): PixelDecoder({8: 5, 16: 6}, 16, 8)({8: taps[8]})
    with pytest.raises(ValueError, match="decoder_stride"): MaskProposer({8: 5}, decoder_stride=32)
    dec = TransformerDecoder(7, dim=16, queries=3, layers=2, heads=2, ffn=32).eval()
    out = dec(taps[32])
    assert out.shape == (2, 2, 3, 16)
    assert torch.allclose(out[:, 0], dec(taps[32][:1])[:, 0], atol=1e-5)             # images do not interact
    mp = MaskProposer({8: 5, 16: 6, 32: 7}, 32, dim=16, mask_dim=8, queries=3, layers=2, heads=2, ffn=32, embed_dim=4, embed_hidden=8)
    o = mp(taps)
    assert o["masks"].shape == (2, 2, 3, 16, 16) and o["embeddings"].shape == (2, 2, 3, 4)


def test_timm_features_encoder():
    from ovseg.encoders import create_visual_encoder
    enc = create_visual_encoder("random:timm-features:resnet18", taps=(8, 16, 32))
    f = enc(torch.rand(1, 3, 40, 72))                      # padded to 64 x 96 inside, cells over padding dropped
    assert {s: tuple(t.shape[-2:]) for s, t in f.taps.items()} == {8: (5, 9), 16: (3, 5), 32: (2, 3)}
    with pytest.raises(ValueError, match="feature strides"): create_visual_encoder("random:timm-features:resnet18", taps=(3,))
