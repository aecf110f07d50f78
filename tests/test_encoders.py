"Frozen encoder zoo: every backend builds offline and loads local checkpoints through the public calls."
import json, time
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
from ovseg.encoders import EncoderWeightsError, VisualFeatures, create_clip, create_text_encoder, create_visual_encoder, list_encoders, register_encoder, VisualEncoder, _seeded
from ovseg.openclip import save_open_clip_dir
from ovseg.prompts import get_templates
from ovseg.testing import tiny_clip, tiny_clip_cfg

TINY_CLIP_CFG = tiny_clip_cfg(image_size=64, patch_size=16)   # 4x4 patches of 16 pixels


def _frozen(enc):
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train(); assert not enc.training


def _unit(x): return torch.allclose(x.norm(dim=-1), torch.ones(len(x)), atol=1e-5)


@pytest.fixture(scope="module")
def chelsea():
    import skimage.data
    return torch.from_numpy(skimage.data.chelsea().copy()).permute(2, 0, 1).float()[None] / 255


@pytest.fixture(scope="module")
def eff():
    return create_visual_encoder("efficientnet-lite0", taps=(8, 16, 32))


@pytest.fixture(scope="module")
def minilm():
    return create_text_encoder("minilm")


# --- EfficientNet-Lite0: real packaged weights ------------------------------------------------------
def test_efficientnet_real_weights_rank_cat_first(eff, chelsea):
    x = torch.nn.functional.interpolate(chelsea, size=(224, 224), mode="bilinear", antialias=True)
    top = eff.logits(x).argmax(-1).item()
    assert 281 <= top <= 285, top


def test_efficientnet_shapes_taps_norm(eff):
    f = eff(torch.rand(2, 3, 128, 96))
    assert isinstance(f, VisualFeatures)
    assert f.dense.shape == (2, 1280, 4, 3) and f.global_.shape == (2, 1280) and f.stride == 32
    assert {s: t.shape for s, t in f.taps.items()} == {8: (2, 40, 16, 12), 16: (2, 112, 8, 6), 32: (2, 1280, 4, 3)}
    assert (eff.mean, eff.std) == ((127 / 255,) * 3, (128 / 255,) * 3) and eff.dim == 1280
    s16 = create_visual_encoder("efficientnet-lite0", stride=16)
    g = s16(torch.rand(1, 3, 64, 64))
    assert (g.dense.shape, g.stride, s16.dim, g.taps) == ((1, 112, 4, 4), 16, 112, None)
    _frozen(eff)


def test_efficientnet_local_weights_and_random_control(tmp_path, eff):
    torch.save(eff.model.state_dict(), tmp_path / "lite0.pth")
    again = create_visual_encoder("efficientnet-lite0", weights=str(tmp_path / "lite0.pth"))
    assert again.weights_hash == eff.weights_hash
    r1, r2 = (create_visual_encoder("random:efficientnet-lite0", seed=3) for _ in range(2))
    r3 = create_visual_encoder("random:efficientnet-lite0", seed=4)
    assert r1.weights_hash == r2.weights_hash != r3.weights_hash != eff.weights_hash
    assert "random" in r1.name


def test_outputs_deterministic_and_plain_tensors(eff):
    x = torch.rand(1, 3, 64, 64)
    a, b = eff(x), eff(x)
    assert torch.equal(a.dense, b.dense) and torch.equal(a.global_, b.global_)
    assert not a.dense.is_inference() and a.dense.dtype == torch.float32
    head = torch.nn.Conv2d(1280, 2, 1)
    head(a.dense).sum().backward()  # features feed a trainable head
    assert head.weight.grad is not None


# --- MiniLM: real packaged weights -----------------------------------------------------------------
def test_minilm_real_weights(minilm):
    e = minilm.encode(["a photo of a cat", "a photo of a kitten", "a photo of a truck"])
    assert e.shape == (3, 384) and _unit(e)
    assert e[0] @ e[1] > e[0] @ e[2]
    assert torch.equal(e, minilm.encode(["a photo of a cat", "a photo of a kitten", "a photo of a truck"]))
    _frozen(minilm)


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer
    from ovseg.encoders import minilm_dir
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    ref = torch.as_tensor(st.encode(["a red circle on grass"], normalize_embeddings=True))
    assert torch.allclose(minilm.encode(["a red circle on grass"]), ref, atol=1e-4)


def test_template_ensembling(minilm):
    names = ["cat", "truck"]
    for tpl in ("fusioner", "imagenet80", "plain", ["a {} here.", "the {}."]):
        c = minilm.encode_classes(names, templates=tpl)
        assert c.shape == (2, 384) and _unit(c)
    manual = torch.nn.functional.normalize(minilm.encode([t.format("cat") for t in get_templates("imagenet80")]).mean(0), dim=0)
    assert torch.allclose(minilm.encode_classes(["cat"], "imagenet80")[0], manual, atol=1e-5)
    assert torch.allclose(minilm.encode_classes(["cat"], "plain")[0], minilm.encode(["cat"])[0], atol=1e-6)
    with pytest.raises(ValueError): minilm.encode_classes(["cat"], ["no placeholder"])


# --- transformers: tiny random BERT saved locally and loaded back ------------------------------------
def _tiny_bert_dir(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "circle", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    d = tmp_path / "tinybert"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    return d


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_hf_local_dir(tmp_path, pooling):
    d = _tiny_bert_dir(tmp_path)
    t = create_text_encoder(f"hf:{d}", pooling=pooling)
    e = t.encode(["a photo of a cat", "a red circle"])
    assert e.shape == (2, 32) and t.dim == 32 and _unit(e) and pooling in t.name
    assert torch.equal(e, create_text_encoder(f"hf:{d}", pooling=pooling).encode(["a photo of a cat", "a red circle"]))
    _frozen(t)
    b = create_text_encoder("bert-base", weights=str(d))   # the BERT alias with a local directory
    assert b.encode(["cat"]).shape == (1, 32)


# --- timm: tiny random ViT saved to a file and loaded back -----------------------------------------
def test_timm_local_file(tmp_path):
    import timm, safetensors.torch
    kw = dict(depth=2, embed_dim=32, num_heads=2)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kw)
    safetensors.torch.save_file(src.state_dict(), tmp_path / "vit.safetensors")
    v = create_visual_encoder("timm:vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"), **kw)
    assert torch.equal(v.model.cls_token, src.cls_token)
    f = v(torch.rand(2, 3, 80, 48))
    assert (f.dense.shape, f.global_.shape, f.stride, v.dim) == ((2, 32, 5, 3), (2, 32), 16, 32)
    f2 = v(torch.rand(1, 3, 70, 40))    # padded to a multiple of the patch
    assert f2.dense.shape == (1, 32, 5, 3)
    _frozen(v)


def test_mocov3_checkpoint_prefix(tmp_path):
    import timm
    kw = dict(depth=1, embed_dim=32, num_heads=2)
    src = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kw)
    torch.save({"state_dict": {f"module.base_encoder.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "moco.pth.tar")
    v = create_visual_encoder("mocov3-vitb", weights=str(tmp_path / "moco.pth.tar"), **kw)
    assert torch.equal(v.model.pos_embed, src.pos_embed) and v.name == "mocov3-vitb"


def test_random_vit_control():
    a, b = create_visual_encoder("random-vit", seed=1), create_visual_encoder("random-vit", seed=1)
    assert a.weights_hash == b.weights_hash and a.stride == 16 and a.dim == 384


# --- open_clip: tiny random CLIPs in the embedded-CLIP directory format ----------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    import open_clip
    d = tmp_path_factory.mktemp("clip")
    m = tiny_clip(image_size=64, patch_size=16)
    save_open_clip_dir(m, d / "vit", TINY_CLIP_CFG)
    rn_cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
              "text_cfg": TINY_CLIP_CFG["text_cfg"]}
    with _seeded(0): rn = open_clip.CLIP(**rn_cfg)
    save_open_clip_dir(rn, d / "rn", rn_cfg)
    return d, m.eval(), rn.eval()


def test_open_clip_vit_dir(clip_dir):
    d, m, _ = clip_dir
    v, t = create_clip(f"open_clip:{d / 'vit'}")
    assert v.model is t.model
    x = torch.rand(2, 3, 64, 64)
    f = v(x)
    assert (f.dense.shape, f.stride, v.dim) == ((2, 32, 4, 4), 16, 32)
    with torch.no_grad(): ref = m.encode_image(v.normalise(x))
    assert torch.allclose(f.global_, ref, atol=1e-4)
    # dense = patch tokens after ln_post, projected by proj
    with torch.no_grad():
        m.visual.output_tokens = True
        _, tokens = m.visual(v.normalise(x))
        m.visual.output_tokens = False
    ref_dense = (tokens @ m.visual.proj).transpose(1, 2).reshape(2, 32, 4, 4)
    assert torch.allclose(f.dense, ref_dense, atol=1e-4)
    e = t.encode_classes(["red circle", "blue square"], "plain")
    with torch.no_grad():
        import open_clip
        ref_t = torch.nn.functional.normalize(m.encode_text(open_clip.get_tokenizer(f"local-dir:{d / 'vit'}")(["red circle", "blue square"])), dim=-1)
    assert _unit(e) and torch.allclose(e, ref_t, atol=1e-5)
    _frozen(v); _frozen(t)
    assert create_visual_encoder(f"open_clip:{d / 'vit'}").weights_hash == v.weights_hash
    assert create_text_encoder(f"open_clip:{d / 'vit'}").dim == 32


def test_open_clip_resnet_dir(clip_dir):
    d, _, rn = clip_dir
    v = create_visual_encoder(f"open_clip:{d / 'rn'}")
    x = torch.rand(1, 3, 64, 64)
    f = v(x)
    assert (f.dense.shape, f.global_.shape, f.stride) == ((1, 32, 2, 2), (1, 32), 32)
    with torch.no_grad(): ref = rn.encode_image(v.normalise(x))
    assert torch.allclose(f.global_, ref, atol=1e-4)
    assert v(torch.rand(1, 3, 96, 128)).dense.shape == (1, 32, 3, 4)


def test_open_clip_checkpoint_file(clip_dir, tmp_path):
    import open_clip
    d, m, _ = clip_dir
    # a registered model name + a checkpoint file (the usual "pretrained=<path>" route)
    cfgdir = tmp_path / "cfgs"; cfgdir.mkdir()
    (cfgdir / "ovseg-tiny-test.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfgdir)
    torch.save(m.state_dict(), tmp_path / "tiny.pt")
    v, t = create_clip("open_clip:ovseg-tiny-test", pretrained=str(tmp_path / "tiny.pt"))
    ref_v = create_visual_encoder(f"open_clip:{d / 'vit'}")
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(v(x).dense, ref_v(x).dense, atol=1e-5)


# --- offline behaviour -----------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: create_visual_encoder("dino-vits16"),
    lambda: create_visual_encoder("timm:vit_base_patch16_224.augreg_in1k"),
    lambda: create_text_encoder("hf:bert-base-uncased"),
    lambda: create_text_encoder("bert-base"),
    lambda: create_visual_encoder("open_clip:RN50-quickgelu", pretrained="openai"),  # RN50 + openai: a QuickGELU error first
])
def test_hub_offline_fails_fast_with_local_path_hint(call, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(EncoderWeightsError) as e:
        call()
    assert time.time() - t0 < 20     # a hub lookup without HF_HUB_OFFLINE retries for ~47 s; 20 s leaves room for a loaded CI machine
    msg = str(e.value)
    assert "local" in msg and ("weights=" in msg or "pretrained=" in msg or "hf:weights/" in msg)


def test_missing_local_paths_and_unknown_names(tmp_path):
    with pytest.raises(EncoderWeightsError): create_visual_encoder("mocov3-vitb")
    with pytest.raises(EncoderWeightsError): create_visual_encoder(f"open_clip:{tmp_path}")
    with pytest.raises(EncoderWeightsError): create_clip("embedded-clip", weights=str(tmp_path / "nope"))
    with pytest.raises(KeyError, match="known"): create_visual_encoder("no-such-encoder")
    with pytest.raises(ValueError): create_visual_encoder("minilm")


def test_registry():
    assert {"efficientnet-lite0", "minilm", "open_clip:", "timm:", "hf:", "dino-vits16", "dinov2-vits14",
            "mocov3-vitb", "vit-b16", "bert-base", "embedded-clip"} <= set(list_encoders())
    assert "minilm" not in list_encoders("visual") and "open_clip:" in list_encoders("text")

    class Const(VisualEncoder):
        name, dim, stride = "const", 4, 8
        def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.ones(4)); self.freeze()
        def _forward(self, x):
            B, _, H, W = x.shape
            d = self.w.view(1, 4, 1, 1).expand(B, 4, H // 8, W // 8)
            return d, d.mean((2, 3)), None
    register_encoder("test-const", "visual", lambda ident="", **kw: Const())
    f = create_visual_encoder("test-const")(torch.rand(1, 3, 16, 24))
    assert f.dense.shape == (1, 4, 2, 3) and "test-const" in list_encoders("visual")


def test_encoders_config():
    from ovseg.core import EncodersConfig
    from ovseg.encoders import encoders_from_config
    v, t = encoders_from_config(EncodersConfig(visual="efficientnet-lite0", text="minilm", visual_stride=16))
    assert (v.name, v.stride, v.dim, t.name) == ("efficientnet-lite0", 16, 112, "minilm")
