import json
import pytest, torch, open_clip
import torch.nn.functional as F
from ovseg.denseclip import DenseCLIP, dense_clip_tokens
from ovseg.openclip import OpenClipTextEncoder, interpolate_pos_embed, load_open_clip
from ovseg.testing import TINY_CLIP_CFG, tiny_clip, tiny_clip_dir

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def tiny():
    return tiny_clip()

def _manual(v, img, residual, mlp):
    B = img.shape[0]
    x = torch.cat([v.class_embedding.expand(B, 1, -1), v.conv1(img).flatten(2).transpose(1, 2)], 1)
    gh, gw = img.shape[-2] // 8, img.shape[-1] // 8
    x = v.ln_pre(x + interpolate_pos_embed(v.positional_embedding, v.grid_size, (gh, gw)))
    for b in v.transformer.resblocks[:-1]: x = b(x)
    last = v.transformer.resblocks[-1]; C = x.shape[-1]
    a = (last.ln_1(x) @ last.attn.in_proj_weight[2 * C:].T + last.attn.in_proj_bias[2 * C:]) @ last.attn.out_proj.weight.T \
        + last.attn.out_proj.bias
    y = x + a if residual else a
    if mlp: y = y + last.mlp(last.ln_2(y))
    return (v.ln_post(y[:, 1:]) @ v.proj).transpose(1, 2).reshape(B, -1, gh, gw)

@pytest.mark.parametrize("residual,mlp", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("size", [(32, 32), (48, 24)])
def test_value_path_matches_hand_computed(tiny, residual, mlp, size):
    img = torch.randn(2, 3, *size)
    with torch.no_grad():
        got = dense_clip_tokens(tiny.visual, img, residual, mlp)
        ref = _manual(tiny.visual, img, residual, mlp)
    assert got.shape == (2, 32, size[0] // 8, size[1] // 8)
    assert torch.allclose(got, ref, atol=1e-5)

def test_value_path_is_not_the_plain_forward(tiny):
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tiny.visual.output_tokens = True
        _, toks = tiny.visual(img)
        tiny.visual.output_tokens = False
        got = dense_clip_tokens(tiny.visual, img).flatten(2).transpose(1, 2)
    assert not torch.allclose(toks, got, atol=1e-3)

def test_pos_embed_interpolation_identity_and_shape():
    p = torch.randn(17, 6)
    assert torch.equal(interpolate_pos_embed(p, (4, 4), (4, 4)), p)
    assert interpolate_pos_embed(p, (4, 4), (2, 5)).shape == (11, 6)

def test_non_multiple_size_rejected(tiny):
    with pytest.raises(ValueError, match="multiple of the patch"):
        dense_clip_tokens(tiny.visual, torch.randn(1, 3, 30, 32))

def test_predict_any_size_and_cosine(tiny):
    dc = DenseCLIP(tiny, model_cfg=TINY_CLIP_CFG)
    for size in [(32, 32), (50, 37), (5, 7)]:
        out = dc.predict(torch.rand(2, 3, *size), ["cat", "dog"])
        assert out.shape == (2, 2, *size) and torch.isfinite(out).all()
        assert out.abs().max() <= dc.logit_scale + 1e-4     # scaled cosine

def test_prompt_ensemble_normalised(tiny):
    e = DenseCLIP(tiny, ["{}", "a photo of a {}."]).class_embeddings(["a", "b", "c"])
    assert e.shape == (3, 32) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)

def test_save_load_roundtrip(tiny, tmp_path):
    dc = DenseCLIP(tiny, model_cfg=TINY_CLIP_CFG, residual=False)
    img = torch.rand(1, 3, 40, 40)
    ref = dc.predict(img, ["x", "y"])
    dc.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["arch"] == "denseclip" and cfg["config"]["residual"] is False
    assert torch.allclose(DenseCLIP.from_pretrained(tmp_path).predict(img, ["x", "y"]), ref, atol=1e-5)
    from ovseg.train import from_pretrained
    assert torch.allclose(from_pretrained(tmp_path).predict(img, ["x", "y"]), ref, atol=1e-5)

def test_from_open_clip_dir(tiny, tmp_path):
    tiny_clip_dir(tmp_path)                     # the same weights as `tiny`
    dc = DenseCLIP.from_open_clip(str(tmp_path))
    ref = DenseCLIP(tiny, model_cfg=TINY_CLIP_CFG)
    img = torch.rand(1, 3, 32, 32)
    assert torch.allclose(dc.predict(img, ["cat"]), ref.predict(img, ["cat"]), atol=1e-4)

def test_unknown_open_clip_name():
    with pytest.raises(ValueError, match="ViT-B-16"):
        load_open_clip("ViT-B-61")
