"""FISA's training cost against the conventional paradigm, per optimiser step, in one run: the same
batch trains (a) FISA's trainable part (SEVE + LayerNorms + LoRA in the CLIP image tower, the mask
generator frozen) and (b) the mask generator itself (zsseg's proposer and class head, the paradigm FISA
compares with: fine-tuning the generator), round-robin, median of --steps timed steps after warm-up.
Also timed: the generator with precomputed backbone taps (its cheapest form) and FISA with the whole
CLIP tower trainable (SIMO's `full`). Prints ms/step, trainable parameters and the ratios, and the
whole-schedule ratio of the profile (`fisa.generator_train.max_steps` vs `fisa.train.max_steps`).

Weights are random (speed does not depend on them). `--size embedded` (default): the embedded
profile's sizes (EfficientNet-Lite0 taps, the embedded CLIP's architecture, 64 px, Q=16, batch 32);
`--size paper`: the paper profile's (ResNet-101-D, CLIP ViT-B/16, Q=100, d=256, 512 px; use a GPU).
    python benchmarks/bench_fisa.py [--size embedded|paper] [--device cpu|cuda] [--steps 10] [--threads 2]
"""
import argparse, dataclasses, os, statistics, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
import torch


def build(size: str, device: str):
    from ovseg.cliptrain import ClipTrainConfig
    from ovseg.core import load_config
    from ovseg.cliptrain import clip_model_cfg, create_clip_model
    from ovseg.openclip import save_open_clip_dir
    from ovseg.twostage import ZsSeg, ZsSegConfig, paper_config
    cfg = load_config("params.yaml", "embedded" if size == "embedded" else "paper")
    s = cfg.params.fisa
    if size == "embedded":
        ccfg = cfg.params.clip
        mcfg = clip_model_cfg(ClipTrainConfig(**{k: getattr(ccfg, k) for k in ("width", "layers", "head_width", "patch_size",
                                                                                 "pool_type", "text_width", "text_layers",
                                                                                 "text_heads", "context_length", "embed_dim")}), 64)
        d = tempfile.mkdtemp()
        torch.manual_seed(0)
        save_open_clip_dir(create_clip_model(mcfg), d, mcfg)
        gcfg = dataclasses.replace(ZsSegConfig(), backbone="random:efficientnet-lite0", clip=f"open_clip:{d}")
        image = 64
    else:
        gcfg = paper_config("coco-stuff", backbone="random:timm-features:resnet101d", clip="random:open_clip:ViT-B-16", weights={})
        image = 512
    return cfg, s, gcfg, image


def batch_for(world_or_none, names, B, image, seed=0):
    "B images with labels over `names` (the embedded world at 64 px; random blobs at other sizes)."
    g = torch.Generator().manual_seed(seed)
    if world_or_none is not None and image == 64:
        from ovseg.images import collate
        from ovseg.embedded import WorldSemantic
        ds = WorldSemantic(world_or_none, "train", background="ignore", fold=0, novel="ignore")
        return collate([ds[i] for i in range(B)])
    x = torch.rand(B, 3, image, image, generator=g)
    lab = torch.randint(0, len(names), (B, image // 32, image // 32), generator=g)
    lab = lab.repeat_interleave(32, 1).repeat_interleave(32, 2)
    return {"image": x, "label": lab}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["embedded", "paper"], default="embedded")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10); ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="images per step (default: the profile's fisa.train.batch_size)")
    ap.add_argument("--image", type=int, default=0, help="image side in pixels (default: 64 embedded, 512 paper)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from ovseg.fisa import Fisa, trainable_parameters
    from ovseg.twostage import ZsSeg
    cfg, s, gcfg, image = build(a.size, a.device)
    image = a.image or image
    B = a.batch or s.train.batch_size
    world = None
    if a.size == "embedded":
        from ovseg.embedded import WorldConfig
        from ovseg.embedded import World
        world = World(WorldConfig(n_train=max(64, B), n_val=8), seed=0)
        names, unseen = list(world.class_names), world.novel_classes(0)
    else:
        names, unseen = [f"class {k}" for k in range(133)], []
    gcfg = dataclasses.replace(gcfg, class_names=names, unseen=unseen)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    gen = ZsSeg(gcfg).to(dev)
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch_for(world, names, B, image).items()}
    with torch.no_grad(): taps = gen.backbone(batch["image"]).taps
    cached = dict(batch, **{f"tap_{k}": v for k, v in taps.items()})
    fisa = Fisa(s.model, generator=ZsSeg(gcfg).to(dev).eval()).to(dev)
    full = Fisa(dataclasses.replace(s.model, trainable="full"), generator=fisa.generator).to(dev)
    runs = {"fisa (SEVE + norms + LoRA)": (fisa, batch), "fisa, whole CLIP tower (full)": (full, batch),
            "generator fine-tune (taps online)": (gen, batch), "generator fine-tune (taps cached)": (gen, cached)}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, (m, _) in runs.items()}
    times = {k: [] for k in runs}
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    for it in range(a.warmup + a.steps):
        for k, (m, b) in runs.items():            # round-robin: load changes hit every variant alike
            m.train(); sync(); t = time.perf_counter()
            loss = m.training_loss(b); opts[k].zero_grad(set_to_none=True); loss.backward(); opts[k].step()
            sync()
            if it >= a.warmup: times[k].append(time.perf_counter() - t)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    n = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in runs.items()}
    dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# FISA vs generator fine-tuning, {a.size} sizes, batch {B} x {image} px, {dev_name}; median of {a.steps} steps")
    print(f"| step | ms/step | trainable params |\n|---|---|---|")
    for k in runs: print(f"| {k} | {ms[k]:.1f} | {n[k]:,} |")
    f, g, gc = ms["fisa (SEVE + norms + LoRA)"], ms["generator fine-tune (taps online)"], ms["generator fine-tune (taps cached)"]
    print(f"\nper step: generator / FISA = {g / f:.2f} (taps online), {gc / f:.2f} (taps cached)")
    print(f"trainable fraction of CLIP: {trainable_parameters(fisa)['fraction']:.4%}")
    gs, fs = s.generator_train.max_steps, s.train.max_steps
    print(f"whole schedule ({cfg.profile} profile: generator {gs} steps x {s.generator_train.batch_size}, FISA {fs} x "
          f"{s.train.batch_size}): generator / FISA = {gs * s.generator_train.batch_size * g / (fs * s.train.batch_size * f):.2f} "
          "(per-image cost assumed equal across batch sizes)")


if __name__ == "__main__":
    main()
