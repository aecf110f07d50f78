"""The `paper` OVSegmentor computes what the official code computes, part by part.

Each reference below is written from the equations of the official modules (Jazzcharles/OVSegmentor@cfcbc3a):
the inference rule (segmentation/evaluation/group_vit_seg.py:229-252, mmseg's slide averaging), the MEC head
(models/multi_label_contrastive.py:88-185 with models/group_vit.py:337-414), the CMC loss and its matching
(models/multi_label_contrastive.py:385-443, models/losses.py:32-131) and the ranking of the groups against the
entity prompt (multi_label_contrastive.py:672-679), and the GroupViT stem without a LayerNorm before stage 1
(models/group_vit.py:578-614) with DINO (timm-layout) blocks. Layer norm, attention, GELU and softmax are
written out as tensor algebra; the ovseg modules' weights are read into them. Every part agrees to TOL on
random inputs, and each has a control: the older ovseg behaviour (the named `v1` options) does not.
Run with `-s` to see each max |difference|."""
import dataclasses, itertools, math

import pytest
import torch
import torch.nn.functional as F

from ovseg.ovsegmentor import OVSegmentorConfig
from ovseg.core import load_config
from ovseg.grouping import GroupViT
from ovseg.ovsegmentor import MultimodalGroupingBlock, OVSegmentor, _combine, mask_consistency_loss

torch.set_num_threads(1)
TOL = 1e-4


def test_paper_profile_is_the_official_path():
    m = load_config("params.yaml", "paper").params.ovsegmentor.model
    assert (m.inference_rule, m.mec_head, m.cmc_loss, m.patch_norm, m.momentum_train_mode, m.answer_style) == \
        ("official", "official", "official", False, True, "prefix")
    assert m.entity_prompt.format("dog") == "A photo of dog"            # official: 'A photo of ' + entity
    assert m.text_trainable                                             # official stage 1 fine-tunes BERT
    from ovseg.ovsegmentor import paper_config
    assert m == paper_config() and m.vocabulary == ["ovseg73"] and m.answer_templates == ["imagenet80"]


# ---- tensor algebra ------------------------------------------------------------------------------
def layer_norm(x, mod, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * mod.weight + mod.bias

def linear(x, w, b=None): return x @ w.T + (0 if b is None else b)

def gelu(x): return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

def mha(q_in, k_in, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    "softmax(q kᵀ / sqrt(d_head)) v per head, then the output projection; no mask (as the official Attention)."
    B, N, C = q_in.shape
    S, hd = k_in.shape[1], C // heads
    q = linear(q_in, wq, bq).reshape(B, N, heads, hd).transpose(1, 2)
    k = linear(k_in, wk, bk).reshape(B, S, heads, hd).transpose(1, 2)
    v = linear(k_in, wv, bv).reshape(B, S, heads, hd).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1)
    return linear((a @ v).transpose(1, 2).reshape(B, N, C), wo, bo)

def vit_block(x, P, heads):
    "timm/official AttnBlock: x + Attn(LN1 x) (fused qkv), then x + FC2(GELU(FC1(LN2 x)))."
    C = x.shape[-1]
    W, b = P["attn.qkv.weight"], P["attn.qkv.bias"]
    n1 = lambda t: (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)   # nn.LayerNorm (official)
    h = n1(x) * P["norm1.weight"] + P["norm1.bias"]
    x = x + mha(h, h, W[:C], b[:C], W[C:2 * C], b[C:2 * C], W[2 * C:], b[2 * C:], P["attn.proj.weight"], P["attn.proj.bias"], heads)
    h = n1(x) * P["norm2.weight"] + P["norm2.bias"]
    return x + linear(gelu(linear(h, P["mlp.fc1.weight"], P["mlp.fc1.bias"])), P["mlp.fc2.weight"], P["mlp.fc2.bias"])

def own_block(x, blk, heads):
    "The same block from an ovseg `Block`'s tensors."
    C = x.shape[-1]
    W, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    h = layer_norm(x, blk.ln_1)
    x = x + mha(h, h, W[:C], b[:C], W[C:2 * C], b[C:2 * C], W[2 * C:], b[2 * C:], blk.attn.out_proj.weight, blk.attn.out_proj.bias, heads)
    return x + linear(gelu(linear(layer_norm(x, blk.ln_2), blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)), blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)


# ---- 1. the inference rule -------------------------------------------------------------------------
def official_window(group_logits, img_logits, group_of_pixel, topk, bg_thresh):
    """One image (window): group_logits (G,K) = scale·G·Tᵀ, img_logits (K,), group_of_pixel (H,W) -> (1+K,H,W).
    pre = softmax(group logits); the image's top-k classes of softmax(img logits); each group's logits outside
    them set to -inf, re-softmaxed, multiplied by pre; pixel = its group's row; channel 0 = 1 where the pixel's
    max < min(bg_thresh, max of that matrix)."""
    pre = torch.exp(group_logits - group_logits.amax(-1, keepdim=True)); pre = pre / pre.sum(-1, keepdim=True)
    avg = torch.exp(img_logits - img_logits.max()); avg = avg / avg.sum()
    top = avg.topk(min(topk, len(avg))).indices
    masked = torch.full_like(group_logits, float("-inf")); masked[:, top] = group_logits[:, top]
    fin = torch.exp(masked - masked.amax(-1, keepdim=True)); fin = fin / fin.sum(-1, keepdim=True)
    fin = fin * pre
    onehot = F.one_hot(group_of_pixel, group_logits.shape[0]).to(fin.dtype)       # (H,W,G)
    fg = (onehot @ fin).permute(2, 0, 1)
    bg = torch.zeros(1, *fg.shape[1:])
    bg[0, fg.amax(0) < min(bg_thresh, float(fin.max()))] = 1
    return torch.cat([bg, fg])


def _random_parts(B=3, G=8, K=12, H=9, W=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, G, K, generator=g) * 4
    return dict(group=torch.randint(G, (B, H, W), generator=g), logits=logits, aff=logits.softmax(-1),
                img=torch.randn(B, K, generator=g) * 4)


@pytest.mark.parametrize("bg_thresh", [0.2, 0.5, 0.95])
def test_inference_rule_equals_official(bg_thresh):
    parts = _random_parts()
    ref = torch.stack([official_window(parts["logits"][b], parts["img"][b], parts["group"][b], 5, bg_thresh) for b in range(3)])
    got = _combine(parts, 5, bg_thresh, "official")
    diff = (got - ref).abs().max().item()
    print(f"inference rule (bg_thresh {bg_thresh}): max |diff| {diff:.2e}")
    assert diff <= TOL and 0 < ref[:, 0].mean() < 1                   # some background, some not
    old = _combine(parts, 5, bg_thresh, "image_filter")                 # control: ovseg v1's rule
    agree = (old.argmax(1) == ref.argmax(1)).float().mean().item()
    print(f"  control (image_filter): label agreement {agree:.2f}, max |diff| {(old - ref).abs().max():.2e}")
    assert (old - ref)[:, 1:].abs().max() > 1e-2 and agree < 0.99


def test_sliding_window_averages_the_background_decision(text_encoder):
    torch.manual_seed(0)
    cfg = OVSegmentorConfig(image_size=16, patch_size=4, width=24, heads=2, depths=[1, 1], group_tokens=8, groups=4,
                            embed_dim=16, proj_hidden=32, window=16, stride=8, topk=3, bg_thresh=0.5)
    model = OVSegmentor(cfg, text_encoder=text_encoder).eval()
    names = ["background", "red circle", "blue square", "green cross", "yellow star"]
    x = torch.rand(1, 3, 24, 32)
    text = model.class_embeddings(names[1:])
    out = torch.zeros(1, 5, 24, 32); count = torch.zeros(24, 32)
    for y1 in (0, 8):                                                   # mmseg slide: 16-px windows every 8 px
        for x1 in (0, 8, 16):
            win = x[..., y1:y1 + 16, x1:x1 + 16]
            with torch.no_grad():
                o = model.encode_image(win)
                soft = F.interpolate(o["assign"]["soft"].reshape(1, -1, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)
                s = model.scale
                gl = s * F.normalize(model.img_proj(o["tokens"]), dim=-1)[0] @ text.T
                il = s * F.normalize(model.img_proj(o["pooled"]), dim=-1)[0] @ text.T
            out[..., y1:y1 + 16, x1:x1 + 16] += official_window(gl, il, soft[0].argmax(0), 3, 0.5)
            count[y1:y1 + 16, x1:x1 + 16] += 1
    ref = out / count
    got = model.scores(x, names)
    diff = (got - ref).abs().max().item()
    print(f"sliding windows: max |diff| {diff:.2e}; background fraction {(ref.argmax(1) == 0).float().mean():.2f}")
    assert diff <= TOL and set(ref[0, 0].unique().tolist()) - {0.0, 1.0}  # an averaged (fractional) decision
    old = dataclasses.replace(cfg, inference_rule="image_filter")
    model.config = old                                                  # control: the v1 rule
    assert (model.scores(x, names) - ref).abs().max() > 1e-2


# ---- 2. the MEC head --------------------------------------------------------------------------------
def official_mec(question, groups, mg, heads):
    "t = LN(question), v = LN(groups); p = post-norm CrossAttnBlock(t, v); out = LN(AttnBlock(p) + p); token 0."
    t, v = layer_norm(question, mg.norm_q), layer_norm(groups, mg.norm_g)
    c = mg.cross
    a = c.attn
    x = t + mha(t, v, a.q_proj.weight, a.q_proj.bias, a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias,
                a.proj.weight, a.proj.bias, heads)
    x = x + linear(gelu(linear(layer_norm(x, c.norm2), c.mlp.fc1.weight, c.mlp.fc1.bias)), c.mlp.fc2.weight, c.mlp.fc2.bias)
    p = layer_norm(x, c.norm_post)
    return layer_norm(own_block(p, mg.self_attn, heads) + p, mg.norm_out)[:, 0]


def test_mec_head_equals_official():
    torch.manual_seed(0)
    mg = MultimodalGroupingBlock(32, 4).eval()
    for prm in mg.parameters(): prm.data += 0.1 * torch.randn_like(prm)    # non-trivial norms and biases
    q, g = torch.randn(3, 7, 32), torch.randn(3, 8, 32)
    mask = torch.ones(3, 7, dtype=torch.bool); mask[1, 4:] = False; mask[2, 2:] = False
    with torch.no_grad():
        ref, got = official_mec(q, g, mg, 4), mg(q, g, mask)
    diff = (got - ref).abs().max().item()
    print(f"MEC head: max |diff| {diff:.2e} (outputs ~{ref.abs().max():.1f})")
    assert diff <= TOL
    mg.official = False                                                   # control: ovseg v1's head
    with torch.no_grad(): old = mg(q, g, mask)
    print(f"  control (v1): max |diff| {(old - ref).abs().max():.2f}")
    assert (old - ref).abs().max() > 1e-2


def test_mec_width_alignment(text_encoder):
    "Official: the head works at min(widths); only the wider side is projected (none when they are equal)."
    m = OVSegmentor(OVSegmentorConfig(width=24, heads=2, depths=[1, 1], group_tokens=4, groups=2, embed_dim=8, proj_hidden=16),
                    text_encoder=text_encoder)
    assert m.question_in.in_features == text_encoder.dim and m.question_in.out_features == 24 and not hasattr(m, "group_in")
    wide = OVSegmentor(OVSegmentorConfig(width=2 * text_encoder.dim, heads=2, depths=[1, 1], group_tokens=4, groups=2,
                                         embed_dim=8, proj_hidden=16), text_encoder=text_encoder)
    assert not hasattr(wide, "question_in") and wide.group_in.out_features == text_encoder.dim
    assert wide.bridge.net[0].in_features == text_encoder.dim


# ---- 3. the CMC loss, its matching and the group ranking ---------------------------------------------
def official_cmc(pred, target, threshold):
    """pred, target (B,G,H,W) raw logit maps. Matching: Hungarian (brute force here) on the L2 distance of the
    L2-normalised flattened raw maps; targets: sigmoid, 1 where >= threshold·max; predictions min-max normalised;
    per image 1 - (2 Σ p t + 1) / (Σ p + Σ t + 1) over all its masks; summed over the images, divided by G."""
    B, G = pred.shape[:2]
    P, T = pred.flatten(2), target.flatten(2)
    total, perms = 0.0, []
    for b in range(B):
        pn, tn = P[b] / P[b].norm(dim=-1, keepdim=True), T[b] / T[b].norm(dim=-1, keepdim=True)
        cost = ((pn[:, None] - tn[None]) ** 2).sum(-1).sqrt()
        perm = min(itertools.permutations(range(G)), key=lambda pm: sum(float(cost[g, pm[g]]) for g in range(G)))
        perms.append(perm)
        t = T[b][list(perm)].sigmoid()
        t = (t - threshold * t.amax(-1, keepdim=True) >= 0).float()
        p = (P[b] - P[b].amin(-1, keepdim=True)) / (P[b].amax(-1, keepdim=True) - P[b].amin(-1, keepdim=True))
        total = total + 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return total / G, perms


def test_cmc_loss_and_matching_equal_official():
    torch.manual_seed(0)
    B = 16
    pred, target = torch.randn(B, 4, 8, 8) * 3, torch.randn(B, 4, 8, 8) * 3
    pred[:, :, :4] += 2.0; target[:, :, :, :4] += 2.0                   # raw maps with a common offset: matchings differ
    ref, perms = official_cmc(pred, target, 0.6)
    got = mask_consistency_loss(pred, target, 0.6)
    diff = abs(float(got) - float(ref))
    print(f"CMC loss: {float(ref):.4f}, max |diff| {diff:.2e}")
    assert diff <= TOL
    from ovseg.ovsegmentor import match_masks
    assert [tuple(r) for r in match_masks(pred, target).tolist()] == perms
    old = mask_consistency_loss(pred, target, 0.6, official=False)       # control: ovseg v1's loss
    print(f"  control (v1): {float(old):.4f} ({float(ref) / float(old):.1f}x weaker at batch {B})")
    assert abs(float(old) - float(ref)) > 0.1
    # v1 matched the normalised predictions with the binarised targets: another matching for some images
    t = target.flatten(2).sigmoid(); t = (t >= 0.6 * t.amax(-1, keepdim=True)).float()
    p = pred.flatten(2); p = (p - p.amin(-1, keepdim=True)) / (p.amax(-1, keepdim=True) - p.amin(-1, keepdim=True))
    v1 = [tuple(r) for r in match_masks(p, t).tolist()]
    print(f"  matchings agree on {sum(a == b for a, b in zip(v1, perms))}/{B} images")
    assert v1 != perms


def test_group_ranking_is_a_dot_product(text_encoder):
    torch.manual_seed(0)
    cfg = OVSegmentorConfig(width=24, heads=2, depths=[1, 1], group_tokens=8, groups=8, embed_dim=16, proj_hidden=32, cmc_weight=0.1)
    m = OVSegmentor(cfg, text_encoder=text_encoder).train()
    tokens = torch.randn(6, 8, 24) * torch.rand(6, 8, 1) * 4              # groups of very different norms
    ents = ["red circle", "blue square", "green cross", "red circle", "yellow star", "blue square"]
    sel = [0, 2, 3, 5]
    with torch.no_grad():
        feat = m.img_proj(tokens)                                           # whole batch, projected, unnormalised
        noun = m.text_proj(m.text_pooled([f"A photo of {ents[i]}" for i in sel]))
        sim = torch.einsum("bgd,bd->bg", feat[sel], noun)
    ref = torch.zeros(4, 8, dtype=torch.bool).scatter_(1, sim.topk(4, 1, largest=False).indices, True)
    got = m.detached_groups(tokens, sel, [ents[i] for i in sel], feat)
    assert torch.equal(got, ref)
    m.config = dataclasses.replace(cfg, cmc_loss="v1", entity_prompt="a photo of a {}.")   # control: cosine ranking
    assert not torch.equal(m.detached_groups(tokens, sel, [ents[i] for i in sel]), ref)


def test_momentum_encoder_runs_in_train_mode(text_encoder):
    "Official: the momentum GroupViT is part of the model in train mode, so its drop path is active."
    torch.manual_seed(0)
    cfg = OVSegmentorConfig(width=24, heads=2, depths=[2, 1], group_tokens=4, groups=2, embed_dim=8, proj_hidden=16,
                            cmc_weight=0.1, drop_path=0.9)
    m = OVSegmentor(cfg, text_encoder=text_encoder).train()
    x = torch.rand(16, 3, 64, 64)
    a, b = (m.encode_image(x, momentum=True)["assign"]["k"] for _ in range(2))
    assert (a - b).abs().max() > 1e-3 and m.momentum.training             # stochastic, and the mode is restored
    m.config = dataclasses.replace(cfg, momentum_train_mode=False)        # control: v1's eval-mode momentum encoder
    a, b = (m.encode_image(x, momentum=True)["assign"]["k"] for _ in range(2))
    assert torch.equal(a, b)


# ---- 4. the patch path without a LayerNorm, DINO init -------------------------------------------------
def _dino(width=24, depth=4, patch=4, grid=4, seed=0):
    "A timm-layout ViT state dict with DINO's names (patch_embed, cls_token, pos_embed, blocks.i.norm1/attn.qkv/...)."
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    sd = {"patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
          "cls_token": r(1, 1, width), "pos_embed": r(1, 1 + grid * grid, width), "norm.weight": 1 + r(width), "norm.bias": r(width)}
    for i in range(depth):
        sd.update({f"blocks.{i}.norm1.weight": 1 + r(width), f"blocks.{i}.norm1.bias": r(width),
                   f"blocks.{i}.attn.qkv.weight": r(3 * width, width), f"blocks.{i}.attn.qkv.bias": r(3 * width),
                   f"blocks.{i}.attn.proj.weight": r(width, width), f"blocks.{i}.attn.proj.bias": r(width),
                   f"blocks.{i}.norm2.weight": 1 + r(width), f"blocks.{i}.norm2.bias": r(width),
                   f"blocks.{i}.mlp.fc1.weight": r(4 * width, width), f"blocks.{i}.mlp.fc1.bias": r(4 * width),
                   f"blocks.{i}.mlp.fc2.weight": r(width, 4 * width), f"blocks.{i}.mlp.fc2.bias": r(width)})
    return sd


def test_unnormed_patch_path_with_dino_init():
    sd = _dino()
    torch.manual_seed(0)
    gv = GroupViT(16, 4, 24, 2, (2, 2), group_tokens=6, groups=3, patch_norm=False)
    gv.init_from_vit(sd); gv.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4).flatten(2).transpose(1, 2)
        t = t + sd["pos_embed"][0, 1:]                                      # patch + position, no norm (official)
        t = torch.cat([t, gv.group_token.expand(2, -1, -1)], 1)
        for i in range(2): t = vit_block(t, {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}, 2)
        seg, _ = gv.grouping(t[:, :16], t[:, 16:])                          # the grouping block (equal to the official elsewhere)
        for i in (2, 3): seg = vit_block(seg, {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}, 2)
        ref = (seg - seg.mean(-1, keepdim=True)) / torch.sqrt(seg.var(-1, unbiased=False, keepdim=True) + 1e-5) * sd["norm.weight"] + sd["norm.bias"]
        got = gv(x)["tokens"]
    diff = (got - ref).abs().max().item()
    print(f"patch path, DINO init: max |diff| {diff:.2e}")
    assert diff <= TOL
    old = GroupViT(16, 4, 24, 2, (2, 2), group_tokens=6, groups=3, patch_norm=True)   # control: v1's fresh ln_pre
    old.load_state_dict({**gv.state_dict(), "ln_pre.weight": torch.ones(24), "ln_pre.bias": torch.zeros(24)})
    with torch.no_grad(): o = old.eval()(x)["tokens"]
    print(f"  control (patch_norm): max |diff| {(o - ref).abs().max():.2f}")
    assert (o - ref).abs().max() > 1e-2


@pytest.fixture(scope="module")
def text_encoder():
    from ovseg.encoders import create_text_encoder
    try: return create_text_encoder("minilm")
    except Exception as e: pytest.skip(f"MiniLM unavailable: {e}")


def test_segment_tokens_enter_the_projector_statistics(text_encoder):
    """Official: every training step projects the segment tokens too (image_feat), after the pooled feature, so the
    BatchNorm running mean of img_proj is 0.9·(0.9·r + 0.1·mean(pooled)) + 0.1·mean(tokens)."""
    cfg = OVSegmentorConfig(width=24, heads=2, depths=[1, 1], group_tokens=4, groups=2, embed_dim=8, proj_hidden=16, mec_weight=0.0)
    batch = dict(image=torch.rand(4, 3, 64, 64), caption=["a red circle", "a blue square", "two crosses", "a star"])
    runs = {}
    for official in (True, False):
        torch.manual_seed(0)
        m = OVSegmentor(dataclasses.replace(cfg, project_groups=official), text_encoder=text_encoder).train()
        r0 = m.img_proj.net[1].running_mean.clone()
        torch.manual_seed(1); m.training_loss(batch)
        torch.manual_seed(1)
        with torch.no_grad():
            out = m.encode_image(batch["image"])                             # the same Gumbel draws
            fc = m.img_proj.net[0]
            mp, mt = fc(out["pooled"]).mean(0), fc(out["tokens"].reshape(-1, 24)).mean(0)
        ref = 0.9 * (0.9 * r0 + 0.1 * mp) + 0.1 * mt                          # the official statistics
        runs[official] = (m.img_proj.net[1].running_mean - ref).abs().max().item()
        if not official: assert (m.img_proj.net[1].running_mean - (0.9 * r0 + 0.1 * mp)).abs().max() <= TOL
    print(f"projector statistics: max |diff| {runs[True]:.2e}; control (v1, pooled only) {runs[False]:.2e}")
    assert runs[True] <= TOL and runs[False] > 1e-3
