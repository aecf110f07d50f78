"Real-data smoke: a few CamVid frames (../shared/data), real pretrained encoders, one Fusioner training step, scored, saved, segmented."
import dataclasses

import pytest
import torch

from ovseg.core import TrainConfig, load_config
from ovseg.experiment import run_one
from ovseg.realdata import CamVid, CamVidFusioner, camvid_fold_classes, find_data

CAMVID = find_data("camvid", required=False)
pytestmark = pytest.mark.skipif(CAMVID is None, reason="no CamVid copy: set OVSEG_SHARED_DATA or put it in ../shared/data/camvid")


def test_fusioner_one_step_on_camvid(tmp_path):
    torch.set_num_threads(1)
    fc = load_config("params.yaml", "real").params.fusioner.model          # the real profile's model: Lite0 + MiniLM
    fc = dataclasses.replace(fc, dim=16, depth=1, heads=2)                    # a small head keeps the step cheap
    cf = CamVidFusioner(CAMVID.parent, size=(64, 96), train_label_size=(32, 48), limit=3)
    model, res = run_one(cf.build(fc), cf.task(fc), 2, 0, TrainConfig(max_steps=1, batch_size=4, device="cpu", log_every=1),
                         tmp_path / "run")
    for s in ("val", "test"):
        for k in ("mIoU", "FB_IoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pAcc"):
            assert 0 <= res[f"{s}_{k}"] <= 100, (s, k, res)
    assert res["test_episodes"] > 0
    feats = cf.features(fc)["test"]
    assert feats.dense.shape[-2:] == (4, 6) and feats.labels.shape[-2:] == (360, 480)   # stride 16; labels native
    # training saw no unseen pixel as foreground or background
    tr = cf.task(fc).train(2, 0)
    for k in range(len(tr)):
        raw = cf.features(fc)["train"].labels[tr.pairs[k][0]].long()
        lab = tr[k]["label"]
        assert all((lab[raw == u] == 255).all() for u in camvid_fold_classes(2))
    # the saved run segments a real frame at its own resolution
    from ovseg.segment import segment
    img = CamVid(CAMVID.parent, "test").items[0][0]
    r = segment(str(img), ["road", "car", "tree", "sky", "building", "pedestrian"], model=str(tmp_path / "run" / "model"),
                short_side=64, window=96, stride=96)
    assert r.size == (360, 480) and int(r.label.max()) < 6


FLICKR = find_data("flickr8k_1k", required=False)
needs_flickr = pytest.mark.skipif(FLICKR is None, reason="no Flickr8k copy: set OVSEG_SHARED_DATA or put it in ../shared/data/flickr8k_1k")


@needs_flickr
def test_lit_one_step_on_flickr8k_and_camvid_segments(tmp_path):
    "The real_lit stage in miniature: frozen Lite0 + MiniLM features, one LiT step, retrieval and CamVid segment zero-shot."
    import torch.nn.functional as F
    from ovseg.images import load_image
    from ovseg.encoders import create_text_encoder, create_visual_encoder
    from ovseg.realdata import LiT, LockedPairs, flickr8k_captions, retrieval_chance, retrieval_recall, segment_features
    from ovseg.train import fit
    torch.set_num_threads(1)
    enc = load_config("params.yaml", "real").params.encoders
    vis, txt = create_visual_encoder(enc.visual, stride=32), create_text_encoder(enc.text)
    fl = flickr8k_captions(split="test", size=96)
    photos = fl.images[:6]
    caps = [(photos.index(f), c) for f, c in zip(fl.files, fl.captions) if f in photos]
    img = torch.stack([F.interpolate(load_image(fl.root / f)[None], size=(96, 96), mode="bilinear", align_corners=False)[0].clamp(0, 1)
                       for f in photos])
    with torch.no_grad(): ifeat, tfeat = vis(img).global_, txt.encode([c for _, c in caps])
    ci = torch.tensor([i for i, _ in caps])
    assert ifeat.shape == (6, 1280) and tfeat.shape == (30, 384)
    lit = LiT(1280, 384, embed_dim=32)
    w0 = lit.img_proj.weight.detach().clone()
    fit(lit, torch.utils.data.DataLoader(LockedPairs(ifeat, tfeat, ci), batch_size=6),
        TrainConfig(max_steps=1, batch_size=6, device="cpu", log_every=1), tmp_path / "lit")
    assert not torch.equal(w0, lit.img_proj.weight)                            # the projection trained
    r = retrieval_recall(lit.encode_image(ifeat), lit.encode_text(tfeat), ci)
    assert set(r) == set(retrieval_chance(6)) and all(0 <= v <= 100 for v in r.values())
    cv = CamVid(CAMVID.parent, "test")
    frames = torch.stack([F.interpolate(load_image(p, exif=False)[None], size=(64, 96), mode="bilinear", align_corners=False)[0].clamp(0, 1)
                          for p, _, _ in cv.items[:2]])
    labels = torch.stack([cv._label(m, cv.lut) for _, m, _ in cv.items[:2]])
    with torch.no_grad(): dense = vis(frames).dense
    feats, cls, frame = segment_features(dense, labels)
    assert len(cls) == sum(len(set(l.unique().tolist()) - {255}) for l in labels) and feats.shape[1] == 1280
    pred = (lit.encode_image(feats) @ lit.class_embeddings(txt, CamVid.class_names, enc.templates).T).argmax(1)
    assert pred.shape == cls.shape and int(pred.max()) < 11


@needs_flickr
def test_ovsegmentor_one_step_on_flickr8k_captions(tmp_path):
    "The real_ovsegmentor stage in miniature: the real profile's OVSegmentor, one caption-only step, labels for a CamVid frame."
    import dataclasses as dc
    import torch.nn.functional as F
    from ovseg.images import load_image
    from ovseg.ovsegmentor import EntityCaptions, build_model, train_stage
    from ovseg.realdata import flickr8k_captions
    torch.set_num_threads(1)
    S = load_config("params.yaml", "real").params.ovsegmentor
    cl = flickr8k_captions(split="train", size=72)
    keep = set(cl.images[:4])
    rows = [(f, c) for f, c in zip(cl.files, cl.captions) if f in keep]
    cl.files, cl.captions = [r[0] for r in rows], [r[1] for r in rows]
    data = EntityCaptions(cl, S.model.vocabulary, partners=S.partners, captions=cl.captions)
    model = build_model(S, "mec", vocabulary=S.model.vocabulary)
    w0 = [q.detach().clone() for q in model.visual.parameters()]
    train_stage(model, data, dc.replace(S.stage1, max_steps=1, batch_size=4, device="cpu", precision="fp32", log_every=1), tmp_path / "ovs")
    assert (tmp_path / "ovs" / "train_log.tsv").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.visual.parameters()))   # the GroupViT trained
    frame = F.interpolate(load_image(CamVid(CAMVID.parent, "test").items[0][0], exif=False)[None], size=(64, 85), mode="bilinear",
                          align_corners=False).clamp(0, 1)
    logits = model.predict(frame, CamVid.class_names)
    assert logits.shape == (1, 11, 64, 85) and torch.isfinite(logits).all()


def test_documented_real_photo_example(tmp_path, capsys):
    "docs/real.md's offline real-photo command, run as written on the CamVid Fusioner run (when the real pipeline has made it)."
    import json, re, shlex
    from pathlib import Path
    from ovseg.cli import main
    root = Path(__file__).resolve().parents[1]
    model = root / "outputs/real_fusioner/model_fold2"
    if not (model / "config.json").is_file(): pytest.skip("outputs/real_fusioner/model_fold2 not made yet (make repro-real)")
    cmd = re.search(r"^ovseg segment (\S+) (.*)$", (root / "docs/real.md").read_text(), re.M)
    assert cmd, "docs/real.md lost its `ovseg segment` example"
    args = shlex.split(cmd.group(2))
    frame = CAMVID / "test" / Path(cmd.group(1)).name                   # the shared copy, wherever this checkout is
    args[args.index("--model") + 1] = str(model)
    args[args.index("--out") + 1] = str(tmp_path / "seg")
    main(["segment", str(frame), *args])
    areas = json.loads(next((tmp_path / "seg").glob("*_areas.json")).read_text())
    names = [n.strip() for n in args[args.index("--classes") + 1].split(",")]
    assert len(next((tmp_path / "seg").glob("*_overlay.png")).read_bytes()) > 1000
    assert set(areas["areas"]) == set(names) and abs(sum(a["fraction"] for a in areas["areas"].values()) - 1) < 1e-6
    assert areas["size"] == [360, 480]


def test_twostage_and_one_stage_one_step_on_camvid(tmp_path):
    "The real_twostage stage in miniature: a LiT (untrained projections) as ZsSeg's clip, one step of each head, every row scored."
    import json
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from ovseg.encoders import create_clip, create_visual_encoder
    from ovseg.images import load_image
    from ovseg.realdata import LiT
    from ovseg.train import fit
    from ovseg.twostage import ZsSeg, ablation_scores, ensemble_row
    torch.set_num_threads(1)
    zs = load_config("params.yaml", "real").params.zsseg
    assert zs.model.clip.startswith("lit:")                                      # the stage's classifier is the trained LiT
    torch.manual_seed(0)
    save_file(LiT(1280, 384, 32).state_dict(), str(tmp_path / "lit.safetensors"))
    (tmp_path / "lit.json").write_text(json.dumps({"visual": "efficientnet-lite0", "text": "minilm", "visual_dim": 1280,
                                                   "text_dim": 384, "embed_dim": 32}))
    clip = create_clip(f"lit:{tmp_path / 'lit.safetensors'}")
    backbone = create_visual_encoder(zs.model.backbone, taps=tuple(zs.model.taps))
    unseen = camvid_fold_classes(0)
    def frames(split, n, fold=None):
        cv = CamVid(CAMVID.parent, split, fold=fold, novel="ignore" if fold is not None else "keep")
        out = []
        for p, m, _ in cv.items[:n]:
            img = F.interpolate(load_image(p, exif=False)[None], size=(64, 96), mode="bilinear", align_corners=False)[0].clamp(0, 1)
            lab = F.interpolate(cv._label(m, cv.lut)[None, None].float(), size=(64, 96), mode="nearest-exact")[0, 0].long()
            out.append({"image": img, "label": lab})
        return out
    train, test = frames("train", 2, fold=0), frames("test", 2)
    assert all(not torch.isin(s["label"], torch.tensor(unseen)).any() for s in train)   # no unseen pixel trains
    scores = {}
    for head in ("per_pixel", "proposals"):
        mc = dataclasses.replace(zs.model, clip=f"lit:{tmp_path / 'lit.safetensors'}", head=head, queries=4, dim=16, mask_dim=16,
                                 layers=1, ffn=32, embed_hidden=16, crop_size=32, class_names=list(CamVid.class_names), unseen=unseen)
        model = ZsSeg(mc, backbone=backbone, clip=clip)
        assert model.config.embed_dim == 32                                      # the LiT's joint space
        w0 = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        from ovseg.images import collate
        fit(model, torch.utils.data.DataLoader(train, batch_size=2, collate_fn=collate),
            TrainConfig(max_steps=1, batch_size=2, device="cpu", log_every=1), tmp_path / head)
        assert any(not torch.equal(a, b) for a, b in zip(w0, [p for p in model.parameters() if p.requires_grad]))
        scores.update(ablation_scores(model.eval(), test, unseen, [0.5], list(CamVid.class_names), batch_size=2))
    assert set(scores) == {"per_pixel", "proposals", "clip", ensemble_row(0.5), "oracle_masks", "oracle_classes"}
    assert all(0 <= v <= 100 for r in scores.values() for v in r.values())
