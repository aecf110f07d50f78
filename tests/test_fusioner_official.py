"""The `paper` Fusioner head is the official architecture, module by module.

The reference below is written from the equations of the official modules (chaofanma/Fusioner@01985ed: model/fusion.py, model/decoder.py, model/head.py;
fusion transformer, decoder, cosine head), with explicit tensor algebra for layer norm,
multi-head attention, GELU, instance norm and the projections; only convolution and bilinear
resizing use torch's primitives. The `paper` head (the `paper` profile's settings at a small
width) has its weights copied 1:1 into the reference's named tensors, and every stage must agree.
Run with `-s` to see the max |difference| of each stage."""
import dataclasses, math

import pytest
import torch
import torch.nn.functional as F

from ovseg.core import load_config
from ovseg.fusioner import FusionHead

torch.set_num_threads(1)
TOL = 1e-4


def _paper_small():
    "The `paper` profile's Fusioner head settings, at a small width and depth."
    fc = load_config("params.yaml", "paper").params.fusioner.model
    # the settings that make it the official architecture (a change of the profile fails here)
    assert (fc.class_embed, fc.out_proj, fc.init, fc.decoder_affine, fc.resize, fc.drop_path) == \
        ("shared", "matrix", "torch", False, "features", 0.0)
    assert fc.decoder_channels == [fc.dim] * 4 and fc.mlp_ratio == 4.0 and fc.temperature == 0.07
    return dataclasses.replace(fc, dim=32, depth=2, heads=4, decoder_channels=[32] * 4)


# ---- the reference, from the equations -------------------------------------------------------
def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b

def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b

def gelu(x): return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

def attention(x, p, heads):
    "Multi-head self-attention: one qkv projection (with bias), softmax(q k^T / sqrt(d_head)) v, output projection."
    B, N, C = x.shape
    hd = C // heads
    qkv = linear(x, p["qkv.w"], p["qkv.b"]).reshape(B, N, 3, heads, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))               # (B, heads, N, hd)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1)
    return linear((a @ v).transpose(1, 2).reshape(B, N, C), p["proj.w"], p["proj.b"])

def block(x, p, heads):
    "Pre-norm block: x + Attn(LN1 x), then x + FC2(GELU(FC1(LN2 x)))."
    x = x + attention(layer_norm(x, p["ln1.w"], p["ln1.b"]), p, heads)
    h = linear(gelu(linear(layer_norm(x, p["ln2.w"], p["ln2.b"]), p["fc1.w"], p["fc1.b"])), p["fc2.w"], p["fc2.b"])
    return x + h

def fusion(visual, text, P, heads):
    """visual (B, N, Dv) and text (B, K, Dt), both L2-normalised. Visual: LN, linear, LN; text: LN,
    linear, + the one shared class embedding; [visual ; text] through the blocks; LN; each part
    times its bias-free d x d matrix."""
    v = layer_norm(linear(layer_norm(visual, *P["vin.ln0"]), *P["vin.fc"]), *P["vin.ln1"])
    t = linear(layer_norm(text, *P["tin.ln0"]), *P["tin.fc"]) + P["cls_emb"]
    x = torch.cat([v, t], 1)
    for p in P["blocks"]: x = block(x, p, heads)
    x = layer_norm(x, *P["norm"])
    K = text.shape[1]
    return x[:, :-K] @ P["proj_patch"], x[:, -K:] @ P["proj_classes"]

def instance_norm(x, eps=1e-5):
    mu = x.mean((2, 3), keepdim=True)
    var = ((x - mu) ** 2).mean((2, 3), keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)

def decoder(patches, P, grid, out):
    """Tokens (B, hw, d) as a (B, d, h, w) map; 4 x (conv3x3, instance norm without affine, ReLU) with
    the map doubled (bilinear) before stages 2-4; conv1x1; resized to `out` x `out`."""
    B, N, d = patches.shape
    h, w = grid
    x = patches.transpose(1, 2).reshape(B, d, h, w)
    for i in range(4):
        if i: x = F.interpolate(x, size=(h * 2 ** i, w * 2 ** i), mode="bilinear", align_corners=False)
        x = torch.relu(instance_norm(F.conv2d(x, *P["conv"][i], padding=1)))
    x = F.conv2d(x, *P["conv"][4])
    return F.interpolate(x, size=(out, out), mode="bilinear", align_corners=False)

def head(features, classes, temperature):
    "Cosine of every pixel feature with every class token, divided by the temperature."
    f = features / features.norm(dim=1, keepdim=True)
    c = classes / classes.norm(dim=-1, keepdim=True)
    return torch.einsum("bdhw,bkd->bkhw", f, c) / temperature


# ---- the 1:1 weight map ----------------------------------------------------------------------
def official_weights(h: FusionHead) -> dict:
    "The ovseg head's tensors under the reference's names (nothing is re-initialised or transposed)."
    sd = {k: v.detach() for k, v in h.state_dict().items()}
    pair = lambda k: (sd[f"{k}.weight"], sd[f"{k}.bias"])
    d = h.cfg.dim
    blocks = []
    for i in range(h.cfg.depth):
        b = f"blocks.{i}."
        blocks.append({"qkv.w": sd[b + "attn.in_proj_weight"], "qkv.b": sd[b + "attn.in_proj_bias"],
                       "proj.w": sd[b + "attn.out_proj.weight"], "proj.b": sd[b + "attn.out_proj.bias"],
                       "ln1.w": sd[b + "norm1.weight"], "ln1.b": sd[b + "norm1.bias"],
                       "ln2.w": sd[b + "norm2.weight"], "ln2.b": sd[b + "norm2.bias"],
                       "fc1.w": sd[b + "mlp.0.weight"], "fc1.b": sd[b + "mlp.0.bias"],
                       "fc2.w": sd[b + "mlp.2.weight"], "fc2.b": sd[b + "mlp.2.bias"]})
    P = {"vin.ln0": pair("visual_in.0"), "vin.fc": pair("visual_in.1"), "vin.ln1": pair("visual_in.2"),
         "tin.ln0": pair("text_in.0"), "tin.fc": pair("text_in.1"), "cls_emb": sd["class_embed"],
         "blocks": blocks, "norm": pair("norm"), "proj_patch": sd["visual_proj"], "proj_classes": sd["text_proj"],
         "conv": [pair(f"decoder.stages.{i}.0") for i in range(4)] + [pair("decoder.out")]}
    assert P["cls_emb"].shape == (1, d) and P["proj_patch"].shape == (d, d)
    # every trained tensor is used exactly once (nothing of ours is left out of the comparison)
    def leaves(x):
        if isinstance(x, torch.Tensor): yield x
        elif isinstance(x, dict): yield from (t for v in x.values() for t in leaves(v))
        else: yield from (t for v in x for t in leaves(v))
    used = [id(t) for t in leaves(P)]
    assert len(used) == len(set(used)) and set(used) == {id(t) for t in sd.values()}
    return P


@pytest.fixture(scope="module")
def setup():
    cfg = _paper_small()
    torch.manual_seed(0)
    h = FusionHead(cfg, visual_dim=24, text_dim=20).eval()
    with torch.no_grad():   # move the norms off their (1, 0) init so that they are tested too
        for n, p in h.named_parameters():
            if "norm" in n or n.endswith(("in.0.weight", "in.2.weight", "in.0.bias", "in.2.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return h, official_weights(h)


@pytest.mark.parametrize("K", [1, 3], ids=["binary", "multiclass"])
def test_paper_head_equals_official_equations(setup, K):
    h, P = setup
    g = torch.Generator().manual_seed(K)
    B, grid, out = 2, (4, 4), 56          # a 56 px image at patch 14: a 4 x 4 grid, logits at 56 x 56
    dense = torch.randn(B, 24, *grid, generator=g)
    text = F.normalize(torch.randn(B, K, 20, generator=g), dim=-1)
    visual = F.normalize(dense.flatten(2).transpose(1, 2), dim=-1)             # the official L2-normalised tokens
    with torch.no_grad():
        ours_v, ours_t = h.tokens(dense, text)
        ref_v, ref_t = fusion(visual, text, P, h.cfg.heads)
        ours_dec = F.interpolate(h.decoder(ours_v.transpose(1, 2).reshape(B, -1, *grid)), size=(out, out),
                                 mode="bilinear", align_corners=False)
        ref_dec = decoder(ref_v, P, grid, out)
        ours = h(dense, text, out_size=(out, out))
        ref = head(ref_dec, ref_t, h.cfg.temperature)
    diffs = {"fusion visual tokens": (ours_v - ref_v).abs().max().item(),
             "fusion class tokens": (ours_t - ref_t).abs().max().item(),
             "decoder features": (ours_dec - ref_dec).abs().max().item(),
             "logits": (ours - ref).abs().max().item()}
    print(f"\nK={K}: " + ", ".join(f"{k} max|d| {v:.2e}" for k, v in diffs.items()),
          f"(logits range {ref.min().item():.2f}..{ref.max().item():.2f})")
    assert ours.shape == ref.shape == (B, K, out, out)
    for k, v in diffs.items(): assert v < TOL, (k, v)


def test_reference_is_sensitive(setup):
    "The comparison can fail: per-slot class embeddings, logits resized after the cosine, or an affine norm differ."
    h, P = setup
    g = torch.Generator().manual_seed(7)
    dense, text = torch.randn(2, 24, 4, 4, generator=g), F.normalize(torch.randn(2, 3, 20, generator=g), dim=-1)
    with torch.no_grad():
        _, ref_t = fusion(F.normalize(dense.flatten(2).transpose(1, 2), dim=-1), text, P, h.cfg.heads)
        ref = head(decoder(fusion(F.normalize(dense.flatten(2).transpose(1, 2), dim=-1), text, P, h.cfg.heads)[0],
                           P, (4, 4), 56), ref_t, h.cfg.temperature)
        late = dataclasses.replace(h.cfg, resize="logits")
        h2 = FusionHead(late, 24, 20).eval(); h2.load_state_dict(h.state_dict())
        assert (h2(dense, text, out_size=(56, 56)) - ref).abs().max() > 1e-2
        P2 = dict(P, cls_emb=P["cls_emb"] + 0.1 * torch.randn(P["cls_emb"].shape, generator=g))
        assert (fusion(F.normalize(dense.flatten(2).transpose(1, 2), dim=-1), text, P2, h.cfg.heads)[1] - ref_t).abs().max() > 1e-3
