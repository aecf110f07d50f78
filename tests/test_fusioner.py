import dataclasses, json

import pytest
import torch

from ovseg.core import FusionerConfig, TrainConfig
from ovseg.fusioner import (Fusioner, FusionHead, HashText, RandomVisual, binary_episode_loss, collate,
                            evaluate_episodes, mean_over_folds, multiclass_loss, slide_predict, WithFeatures,
                            compute_features)
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
    back = from_pretrained(saved)
    for (k, a), b in zip(m.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    back._enc.update(visual=m.visual, text=m.text)
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
    s = slide_predict(m, img, ["a", "b"], crop=32, stride=20, flip=True)
    assert s.shape == (2, 45, 70)
    torch.testing.assert_close(s.sum(0), torch.ones(45, 70))  # mean of softmaxes
    small = slide_predict(m, torch.rand(3, 20, 20), ["a", "b"], crop=32, stride=20, flip=False)
    assert small.shape == (2, 20, 20)


def test_mean_over_folds():
    r = mean_over_folds({0: {"mIoU": 10.0, "FB_IoU": 50.0}, 1: {"mIoU": 30.0, "FB_IoU": 70.0}})
    assert r["mean"] == {"mIoU": 20.0, "FB_IoU": 60.0}
