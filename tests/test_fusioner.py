import dataclasses, json

import pytest
import torch.nn.functional as F
import torch

from ovseg.fusioner import FusionerConfig
from ovseg.core import TrainConfig
from ovseg.testing import HashText, RandomVisual
from ovseg.images import collate
from ovseg.experiment import WithFeatures, compute_features, evaluate_episodes, mean_over_folds, predict_windows
from ovseg.fusioner import Fusioner, FusionHead, binary_episode_loss, multiclass_loss
from ovseg.train import fit, from_pretrained, save_pretrained

torch.set_num_threads(1)
CFG = FusionerConfig(dim=32, depth=2, heads=4, decoder_channels=[16, 16, 16, 16], max_classes=4, drop_path=0.0)


def _model(**kw):
    torch.manual_seed(0)
    return Fusioner(dataclasses.replace(CFG, **kw), visual=RandomVisual(24), text=HashText(12))


def _episodes(n=8, size=32):
    g = torch.Generator().manual_seed(0)
    names = ["red circle", "blue square", "green ring"]
    return dict(image=torch.rand(n, 3, size, size, generator=g), label=torch.randint(0, 2, (n, size, size), generator=g),
                class_name=[names[i % 3] for i in range(n)], class_id=torch.arange(n) % 3)


@pytest.mark.parametrize("fusion,depth", [(True, 2), (False, 2), (True, 0)])
def test_shapes(fusion, depth):
    m = _model(fusion=fusion, depth=depth)
    imgs = torch.rand(3, 3, 40, 48)
    assert m.predict(imgs, ["a b", "c", "d e", "f"]).shape == (3, 4, 40, 48)
    assert m.predict_episodes(imgs, ["a", "b", "a"]).shape == (3, 40, 48)
    assert hasattr(m.head, "blocks") == (fusion and depth > 0)


def test_head_with_different_dims():
    for vd, td in [(768, 512), (384, 1024), (5, 7)]:
        h = FusionHead(CFG, vd, td)
        assert h(torch.randn(2, vd, 3, 3), torch.randn(2, td)).shape == (2, 2, 24, 24)


def test_binary_loss_ignores_255():
    logits = torch.zeros(1, 2, 2); logits[0, 0, 0] = 5.0
    lab = torch.tensor([[[1, 255], [255, 255]]])
    expect = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([5.0]), torch.tensor([1.0]))
    assert torch.allclose(binary_episode_loss(logits, lab), expect)
    big = logits.clone(); big[0, 1, 1] = 1e4  # an ignored pixel cannot change the loss
    assert torch.allclose(binary_episode_loss(big, lab), expect)
    assert binary_episode_loss(logits, torch.full_like(lab, 255)) == 0


def test_multiclass_loss_ignores_255():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    lab = torch.randint(0, 3, (2, 4, 4)); lab[0] = 255
    multiclass_loss(logits, lab).backward()
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1].abs().sum() > 0


def test_class_embeddings_once_per_list():
    m = _model()
    b = _episodes()
    for _ in range(3): m.training_loss(b)
    assert m.text_encodes == 1 and m.text.calls == 3   # 3 distinct names, encoded once
    m.predict(b["image"], ["x", "y"]); m.predict(b["image"], ["x", "y"])
    assert m.text_encodes == 2


def test_episode_batch_equals_per_image():
    m = _model().eval()
    b = _episodes(4)
    batched = m.predict_episodes(b["image"], b["class_name"])
    for i in range(4):
        single = m.predict(b["image"][i:i + 1], [b["class_name"][i]])[0, 0]
        torch.testing.assert_close(batched[i], single, rtol=1e-4, atol=1e-4)


def test_cached_features_match_images():
    m = _model().eval()
    b = _episodes(4)
    dense = m.visual_features(b["image"])
    torch.testing.assert_close(m.predict_episodes(b["image"], b["class_name"], dense=dense),
                               m.predict_episodes(b["image"], b["class_name"]))
    m.train(); torch.manual_seed(1); l1 = m.training_loss(b)
    torch.manual_seed(1); l2 = m.training_loss({**{k: v for k, v in b.items() if k != "image"}, "dense": dense})
    torch.testing.assert_close(l1, l2)


def test_multiclass_mode_trains():
    m = _model(mode="multiclass")
    b = dict(image=torch.rand(2, 3, 32, 32), label=torch.randint(0, 3, (2, 32, 32)), class_names=[["a", "b", "c"]] * 2)
    loss = m.training_loss(b); loss.backward()
    assert loss.ndim == 0 and m.head.text_proj.grad is not None


class _Eps(torch.utils.data.Dataset):
    "Learnable toy episodes: the foreground is where the image is bright in the channel the class names."
    names = ["red thing", "green thing", "blue thing"]
    classes = [0, 1, 2]
    def __init__(self, n=48, seed=0):
        self.g = seed; self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.g * 1000 + i)
        img = torch.zeros(3, 32, 32)
        c = i % 3
        for k in range(3):
            y, x = torch.randint(0, 24, (2,), generator=g).tolist()
            img[k, y:y + 8, x:x + 8] = 1.0
        return dict(image=img, label=(img[c] > 0.5).long(), class_id=c, class_name=self.names[c], id=str(i))


def test_fit_and_roundtrip(tmp_path):
    m = _model()
    dl = torch.utils.data.DataLoader(_Eps(), batch_size=8, collate_fn=collate)
    tcfg = TrainConfig(epochs=2, lr=3e-3, warmup_steps=1, device="cpu", log_every=1)
    res = fit(m, dl, tcfg, tmp_path / "run", eval_fn=lambda mm: evaluate_episodes(mm, _Eps(12, seed=9), batch_size=12))
    assert {"mIoU", "FB_IoU", "train_loss"} <= set(res)
    saved = tmp_path / "run" / "model"
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["arch"] == "fusioner" and cfg["config"]["visual_dim"] == 24
    from ovseg.fusioner import load_fusioner   # the stand-in encoders exist only in memory: pass them in
    back = load_fusioner(saved, visual=m.visual, text=m.text)
    for (k, a), b in zip(m.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    m.eval()
    b = _episodes(2)
    assert torch.equal(back.predict(b["image"], ["x"]), m.predict(b["image"], ["x"]))


def test_with_features_dataset():
    ds = _Eps(6)
    v = RandomVisual(24)
    feats = compute_features(v, ds, batch_size=4)
    wf = WithFeatures(ds, feats)
    s = wf[2]
    assert "image" not in s and s["dense"].shape == (24, 4, 4)
    assert torch.equal(s["dense"], v(ds[2]["image"][None]).dense[0])


def test_sliding_window_covers_and_flip():
    m = _model(mode="multiclass").eval()
    img = torch.rand(3, 45, 70)
    s = predict_windows(m, img, ["a", "b"], window=32, stride=20, flip=True)
    assert s.shape == (2, 45, 70)
    torch.testing.assert_close(s.sum(0), torch.ones(45, 70))  # mean of softmaxes
    small = predict_windows(m, torch.rand(3, 20, 20), ["a", "b"], window=32, stride=20, flip=False)
    assert small.shape == (2, 20, 20)


def test_mean_over_folds():
    r = mean_over_folds({0: {"mIoU": 10.0, "FB_IoU": 50.0}, 1: {"mIoU": 30.0, "FB_IoU": 70.0}})
    assert r["mean"] == {"mIoU": 20.0, "FB_IoU": 60.0}


# ---- the paper recipe: settings, pad-aware resizing, augmentation, encoders, optimiser groups ----
from ovseg.core import ParamGroupConfig, load_config
from ovseg.fusioner import OfficialAugment, build_encoders, fit_to_output, for_dataset, pair_config


def test_paper_profile_is_the_official_recipe():
    "Every row of the official recipe (docs/fusioner.md, chaofanma/Fusioner@01985ed) as a setting of the `paper` profile."
    cfg = load_config("params.yaml", "paper")
    fc, runs, tc = cfg.params.fusioner.model, cfg.params.fusioner, cfg.params.train
    assert (fc.dim, fc.depth, fc.heads, fc.mlp_ratio, fc.drop_path, fc.temperature) == (512, 12, 8, 4.0, 0.0, 0.07)
    assert fc.decoder_channels == [512] * 4 and not fc.decoder_affine and fc.resize == "features"
    assert (fc.class_embed, fc.out_proj, fc.init) == ("shared", "matrix", "torch")
    assert (fc.templates, runs.class_names) == ("fusioner32", "raw")
    assert fc.visual == fc.text == "open_clip:ViT-L-14-quickgelu" and fc.pretrained == "openai"
    assert fc.loss_reduction == "image" and fc.input_norm == "dataset" and runs.augment == "official"
    assert (runs.crop, runs.window, runs.stride, runs.flip, runs.eval_protocol, runs.skip_empty) == (224, 224, 149, False, "slide", True)
    assert runs.scale_range == [0.5, 1.0] and runs.benchmark == "real"
    assert (tc.epochs, tc.warmup_epochs, tc.lr, tc.min_lr, tc.weight_decay, tc.weight_decay_end) == (510, 10, 1e-3, 2e-6, 0.01, 0.4)
    assert tc.grad_clip == 0 and tc.precision == "fp32" and tc.batch_size == 32
    dec = tc.groups["decoder"]
    assert (dec.prefixes, dec.optimizer, dec.lr, dec.schedule, dec.weight_decay, dec.warmup_steps, dec.warmup_epochs) == \
        (["head.decoder."], "adam", 1e-3, "constant", 0.0, 0, 0.0)
    emb = load_config("params.yaml", "embedded").params.fusioner   # ovseg's own choices stay named options there
    m = emb.model
    assert (m.class_embed, m.out_proj, m.resize, m.input_norm, emb.augment) == ("per_slot", "linear", "logits", "encoder", "ovseg")


@pytest.mark.parametrize("resize", ["features", "logits"])
def test_padded_grid_is_not_squeezed(resize):
    "An image whose size is not a multiple of the patch: its logits are those of the padded image, cropped."
    from ovseg.encoders import VisualEncoder
    class Patch8(VisualEncoder):
        stride, pad_to, dim, name = 8, 8, 6, "patch8"
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        def __init__(self):
            super().__init__(); torch.manual_seed(3); self.conv = torch.nn.Conv2d(3, 6, 8, 8); self.freeze()
        def _forward(self, x): d = self.conv(x); return d, d.mean((2, 3)), None
    torch.manual_seed(0)
    m = Fusioner(dataclasses.replace(CFG, resize=resize), visual=Patch8(), text=HashText(12)).eval()
    assert m.config.feature_stride == 8
    img = torch.rand(1, 3, 30, 37)
    padded = torch.full((1, 3, 32, 40), 0.5); padded[..., :30, :37] = img   # 0.5 = the mean: normalises to the zero padding
    small, big = m.predict(img, ["a", "b"]), m.predict(padded, ["a", "b"])
    assert small.shape == (1, 2, 30, 37)
    torch.testing.assert_close(small, big[..., :30, :37])
    squeezed = F.interpolate(m.head(m.visual_features(img), m.class_embeddings(["a", "b"])), size=(30, 37), mode="bilinear") \
        if resize == "logits" else None
    if squeezed is not None: assert (squeezed - small).abs().max() > 1e-3


def test_fit_to_output_same_grid_is_plain_resize():
    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(fit_to_output(x, (64, 64), (8, 8), 8), F.interpolate(x, size=(64, 64), mode="bilinear"))


def test_official_augment_is_seeded_and_valid():
    lab = torch.zeros(50, 70, dtype=torch.int64); lab[10:40, 20:50] = 1; lab[:3] = 255
    s = dict(image=torch.rand(3, 50, 70), label=lab, class_name="x", class_id=0)
    aug = OfficialAugment(32)
    torch.manual_seed(5); a = [aug(s) for _ in range(8)]
    torch.manual_seed(5); b = [aug(s) for _ in range(8)]
    for x, y in zip(a, b): assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert all(x["image"].shape == (3, 32, 32) and set(x["label"].unique().tolist()) <= {0, 1, 255} for x in a)
    assert len({float(x["image"].sum()) for x in a}) == 8   # random crops differ


def _fake_bert(d):
    "A tiny BERT in the Hugging Face directory layout (random weights), as a local `encoders.weights` entry."
    from transformers import BertConfig, BertModel, BertTokenizer
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "."]))
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(str(d))
    BertModel(BertConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(str(d))
    return d


def test_paper_pairs_honour_encoders_weights(tmp_path):
    "mocov3-vitb|bert-base (the paper's encoder-pair stage) builds from local weights given in encoders.weights."
    import timm
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    ckpt = {"epoch": 300, "arch": "vit_base", "state_dict": {**{f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()},
                                                               "module.base_encoder.head.0.weight": torch.zeros(8, 768)}}
    torch.save(ckpt, tmp_path / "vit-b-300ep.pth.tar")
    cfg = load_config("params.yaml", "paper")
    weights = {"mocov3-vitb": str(tmp_path / "vit-b-300ep.pth.tar"), "bert-base": str(_fake_bert(tmp_path / "bert"))}
    fc = for_dataset(pair_config(cfg.params.fusioner.model, "mocov3-vitb|bert-base"), "coco20i", weights)
    v, t = build_encoders(fc)
    assert v.name.startswith("mocov3-vitb+norm") and tuple(v.mean) == (0.4650, 0.4357, 0.3973)   # official COCO statistics
    torch.testing.assert_close(v.model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert t.encode_classes(["cat"], templates="plain").shape == (1, 16)
    with pytest.raises(Exception, match="weights"):   # without the mapping: the error says how to pass them
        build_encoders(pair_config(cfg.params.fusioner.model, "mocov3-vitb|bert-base"))


def test_openai_weights_build_quickgelu_and_explicit_mismatches_are_errors():
    "OpenAI's ViT-L/14 with a GELU name builds the QuickGELU model; a mismatch asked for explicitly is an error."
    from ovseg.encoders import EncoderWeightsError
    from ovseg.openclip import resolve_activation
    assert resolve_activation("ViT-L-14", "openai")[0] == "ViT-L-14-quickgelu"
    with pytest.raises(EncoderWeightsError, match="force_quick_gelu=False"):
        resolve_activation("ViT-L-14", "openai", {"force_quick_gelu": False})
    with pytest.raises(EncoderWeightsError, match="open_clip:ViT-L-14"):
        resolve_activation("ViT-L-14-quickgelu", "laion2b_s32b_b82k")


def _paper_small(**kw):
    fc = load_config("params.yaml", "paper").params.fusioner.model
    return dataclasses.replace(fc, dim=16, depth=1, heads=2, decoder_channels=[16] * 4, visual_dim=0, text_dim=0, **kw)


def test_two_optimiser_groups_resume_exactly(tmp_path):
    "Fusion module AdamW (warm-up, cosine, wd schedule) + decoder Adam (constant): stop + resume == uninterrupted."
    tc = load_config("params.yaml", "paper").params.train
    tc = dataclasses.replace(tc, epochs=3, warmup_epochs=1, batch_size=8, device="cpu", precision="fp32", compile=False, log_every=1)
    def run(out, **kw):
        torch.manual_seed(0)
        m = Fusioner(_paper_small(), visual=RandomVisual(24), text=HashText(12))
        fit(m, torch.utils.data.DataLoader(_Eps(32), batch_size=8, collate_fn=collate), tc, out, **kw)
        return m
    full = run(tmp_path / "full")
    run(tmp_path / "part", stop_after=5)
    resumed = run(tmp_path / "part", resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()): assert torch.equal(a, b), k
    log = (tmp_path / "full" / "train_log.tsv").read_text().splitlines()
    head, rows = log[0].split("\t"), [r.split("\t") for r in log[1:]]
    lr, lrd = head.index("lr"), head.index("lr_decoder")
    assert all(float(r[lrd]) == 1e-3 for r in rows)                       # decoder: constant
    fusion = [float(r[lr]) for r in rows]                                 # fusion: warm-up to the peak, cosine towards min_lr
    assert fusion[3] == pytest.approx(1e-3) and fusion[:4] == sorted(fusion[:4]) and fusion[3:] == sorted(fusion[3:], reverse=True)
    assert 2e-6 < fusion[-1] < 1e-4
    # the decoder group is plain Adam without weight decay; the rest AdamW with the cosine decay
    opt = json.loads((tmp_path / "full" / "checkpoint" / "trainer_state.json").read_text())["optimizer"]["param_groups"]
    dec = [g for g in opt if g.get("group") == "decoder"]
    assert dec and all(not g["decoupled_weight_decay"] and g["weight_decay"] == 0 for g in dec)
    assert any(g.get("group") is None and g["decay"] and g["weight_decay"] == pytest.approx(0.4) for g in opt)


def test_no_graph_break_in_the_head():
    "torch.compile sees the whole paper head (fusion, decoder, cosine) as one graph."
    h = FusionHead(_paper_small(), 24, 12)
    ex = torch._dynamo.explain(h)(torch.randn(2, 24, 4, 4), torch.randn(2, 1, 12), (56, 56))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons


def test_compile_does_not_recompile_per_class_name_set():
    "torch.compile of the training step: batches with new class names reuse the graphs (the text part runs outside them)."
    import torch._dynamo
    from torch._dynamo.utils import counters
    names = [f"class {k}" for k in range(20)]
    graphs = {}
    for fixed in (True, False):
        torch._dynamo.reset(); counters.clear()
        m = _model()
        step = torch.compile(lambda b: m.training_loss(b), backend="eager")
        for i in range(6):
            b = _episodes(4)
            b["class_name"] = [names[((0 if fixed else 7 * i) + 3 * j) % 20] for j in range(4)]
            step(b).backward()
        graphs[fixed] = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs[False] == graphs[True], f"new class names compiled {graphs[False]} graphs, the same names {graphs[True]}"
