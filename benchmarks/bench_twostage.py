"""Crop classification of zsseg's stage 2 on CPU: every proposal's masked crop classified by the
frozen CLIP image tower, three ways, timed in the same run (best of --repeats, round-robin):

  ours      `ovseg.maskgen.mask_crops` (all proposals of all images in one einsum) + one CLIP call
  official  the official adapter's recipe: a Python loop over proposals (box, mean fill,
            `F.interpolate` bicubic per crop), then one CLIP call on the stacked crops
  one-by-one  one crop and one CLIP call per proposal (the fully unbatched loop)

CLIP weights are random (speed does not depend on them). Defaults are the embedded profile
(the embedded CLIP's architecture, 64 px crops, Q=16, 8 images of 64 px); `--clip vit-b-16
--queries 100 --size 512 --images 1` is the paper's setting (slow on CPU).
    python benchmarks/bench_twostage.py [--threads 1] [--repeats 3]

`--whole`: seconds per image of the whole two-stage inference (`ZsSeg.predict` on one image:
frozen backbone, proposals, masked crops, CLIP on every crop, ensemble, semantic map) next to
the bare CLIP forward (the image tower once on the image resized to its input size, what dense
CLIP needs), one image per call as `ovseg segment` runs it. `--clip embedded`: EfficientNet-Lite0
taps, the embedded CLIP's architecture, Q=16, 64 px images; `--clip vit-b-16`: timm ResNet-101-D,
ViT-B/16, Q=100, `--size` px images. Random weights: speed does not depend on them.
    python benchmarks/bench_twostage.py --whole [--clip vit-b-16 --size 512 --images 2]
"""
import argparse, os, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
import torch
import torch.nn.functional as F


def proposals(B, Q, S, seed=0):
    "Soft random ellipse masks (B, Q, S, S); every 8th is empty after thresholding."
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(S).float(), torch.arange(S).float(), indexing="ij")
    c = torch.rand(B, Q, 2, generator=g) * S
    r = (0.08 + 0.3 * torch.rand(B, Q, 2, generator=g)) * S
    d = ((yy - c[..., 0, None, None]) / r[..., 0, None, None]) ** 2 + ((xx - c[..., 1, None, None]) / r[..., 1, None, None]) ** 2
    m = torch.sigmoid(4 * (1 - d))
    m[:, ::8] *= 0.4
    return m


def official_crops(img, masks, thr, fill, size):
    "One image: the official per-proposal loop (valid masks only), stacked."
    out, valid = [], []
    f = torch.tensor(fill).view(3, 1, 1)
    for m in masks:
        b = m > thr
        valid.append(bool(b.any()))
        if not valid[-1]: continue
        ys, xs = b.nonzero(as_tuple=True)
        t, bt, l, r = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
        mb = b[None, t:bt, l:r]
        reg = img[:, t:bt, l:r] * mb + f * (~mb)
        out.append(F.interpolate(reg[None], size=(size, size), mode="bicubic", align_corners=False))
    return (torch.cat(out) if out else img.new_zeros(0, 3, size, size)), torch.tensor(valid)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1); ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clip", choices=["embedded", "vit-b-16"], default="embedded")
    ap.add_argument("--queries", type=int, default=16); ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--whole", action="store_true", help="s/image of the whole two-stage inference vs the bare CLIP forward")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.whole: return whole(a)
    import open_clip
    from ovseg.maskgen import CLIP_MEAN, mask_crops
    torch.manual_seed(0)
    if a.clip == "embedded":
        from ovseg.cliptrain import ClipTrainConfig
        from ovseg.cliptrain import clip_model_cfg
        clip = open_clip.CLIP(**clip_model_cfg(ClipTrainConfig(), 64)).eval()
    else:
        clip = open_clip.create_model("ViT-B-16").eval()
    S = clip.visual.image_size[0] if isinstance(clip.visual.image_size, (tuple, list)) else clip.visual.image_size
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1); std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    text = F.normalize(torch.randn(30, clip.text_projection.shape[1]), dim=-1)
    encode = lambda x: 100 * F.normalize(clip.encode_image((x - mean) / std), dim=-1) @ text.T
    imgs = torch.rand(a.images, 3, a.size, a.size)
    masks = proposals(a.images, a.queries, a.size)

    def ours():
        crops, valid = mask_crops(imgs, masks, 0.5, CLIP_MEAN, S)
        logits = crops.new_zeros(*valid.shape, len(text)); logits[valid] = encode(crops[valid]); return logits

    def official():
        out = []
        for b in range(a.images):
            crops, valid = official_crops(imgs[b], masks[b], 0.5, CLIP_MEAN, S)
            lg = crops.new_zeros(len(valid), len(text)); lg[valid] = encode(crops); out.append(lg)
        return torch.stack(out)

    def one_by_one():
        out = torch.zeros(a.images, a.queries, len(text))
        for b in range(a.images):
            for q in range(a.queries):
                crop, valid = official_crops(imgs[b], masks[b, q:q + 1], 0.5, CLIP_MEAN, S)
                if valid[0]: out[b, q] = encode(crop)[0]
        return out

    paths = {"ours (batched crops, one CLIP call)": ours, "official (crop loop, one CLIP call)": official,
             "one-by-one (crop + CLIP call per proposal)": one_by_one}
    with torch.inference_mode():
        ref = ours()
        for name, fn in paths.items():                              # warm-up, and all three agree
            assert torch.allclose(fn(), ref, atol=1e-2), name
        best = {k: float("inf") for k in paths}
        for _ in range(a.repeats):
            for name, fn in paths.items():
                t = time.perf_counter(); fn(); best[name] = min(best[name], time.perf_counter() - t)
        crop_only = {"ours": lambda: mask_crops(imgs, masks, 0.5, CLIP_MEAN, S),
                     "official": lambda: [official_crops(imgs[b], masks[b], 0.5, CLIP_MEAN, S) for b in range(a.images)]}
        cbest = {k: min(_time(fn) for _ in range(a.repeats)) for k, fn in crop_only.items()}
    n_valid = int((masks > 0.5).flatten(2).any(-1).sum())
    print(f"{a.images} images {a.size}px, Q={a.queries} ({n_valid} non-empty), CLIP {a.clip} ({S}px crops), "
          f"threads {a.threads}, best of {a.repeats}")
    base = best["ours (batched crops, one CLIP call)"]
    for name, t in best.items():
        print(f"  {name:45s} {t * 1000:9.1f} ms   x{t / base:5.2f} of ours")
    print(f"  cropping alone: ours {cbest['ours'] * 1000:.1f} ms, official loop {cbest['official'] * 1000:.1f} ms "
          f"(x{cbest['official'] / cbest['ours']:.2f})")


def _time(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def whole(a):
    "Seconds per image: ZsSeg.predict (everything) vs one forward of the CLIP image tower, best of --repeats."
    import tempfile
    import open_clip
    import ovseg.maskgen  # registers timm-features:
    from ovseg.encoders import create_clip, create_visual_encoder
    from ovseg.twostage import ZsSeg, ZsSegConfig, paper_config
    names = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange") for s in ("circle", "square", "triangle", "cross", "ring")]
    with tempfile.TemporaryDirectory() as tmp:
        if a.clip == "embedded":
            from ovseg.cliptrain import ClipTrainConfig
            from ovseg.cliptrain import clip_model_cfg
            from ovseg.openclip import save_open_clip_dir
            mcfg = clip_model_cfg(ClipTrainConfig(), 64)
            torch.manual_seed(0)
            save_open_clip_dir(open_clip.CLIP(**mcfg), tmp, mcfg)
            clip = create_clip(f"open_clip:{tmp}")
            cfg = ZsSegConfig(backbone="random:efficientnet-lite0", clip=f"open_clip:{tmp}", queries=a.queries,
                              class_names=names, unseen=list(range(0, 30, 4)))
        else:
            clip = create_clip("random:open_clip:ViT-B-16")
            cfg = paper_config("coco-stuff", backbone="random:timm-features:resnet101d", clip="random:open_clip:ViT-B-16",
                               weights={}, queries=a.queries, class_names=names, unseen=list(range(0, 30, 4)))
        backbone = create_visual_encoder(cfg.backbone, taps=tuple(cfg.taps))
        model = ZsSeg(cfg, backbone=backbone, clip=clip).eval()
        model.class_embeddings(names)                                   # text is cached per name: not part of the image cost
        imgs = torch.rand(a.images, 3, a.size, a.size)
        S = model.crop_size
        with torch.inference_mode():
            two = lambda: [model.predict(imgs[i:i + 1], names) for i in range(a.images)]
            bare = lambda: [clip[0](torch.nn.functional.interpolate(imgs[i:i + 1], size=(S, S), mode="bicubic", align_corners=False))
                            for i in range(a.images)]
            parts = {"two-stage (ZsSeg.predict)": two, "bare CLIP forward": bare}
            for fn in parts.values(): fn()                              # warm-up
            best = {k: min(_time(fn) for _ in range(a.repeats)) / a.images for k, fn in parts.items()}
            emb, masks = model.proposals(imgs[:1])
            n_crops = int((masks.sigmoid() > cfg.mask_threshold).flatten(2).any(-1).sum())
    arch = "the embedded CLIP's architecture" if a.clip == "embedded" else "ViT-B-16"
    print(f"whole inference, {a.size}px images, one per call, backbone {cfg.backbone}, CLIP {arch} "
          f"({S}px crops), Q={a.queries} ({n_crops} non-empty on the first image), threads {a.threads}, best of {a.repeats}")
    base = best["bare CLIP forward"]
    for k, t in best.items(): print(f"  {k:28s} {t:8.4f} s/image   x{t / base:6.1f} of the bare CLIP forward")


if __name__ == "__main__":
    main()
