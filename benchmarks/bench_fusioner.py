"""Fusioner training throughput: our batched, cached loop vs the official code's structure.

The official Fusioner code trains one image at a time and, at every step, re-encodes the
class name through all 32 prompt templates and runs the frozen image encoder again. Ours
batches images, encodes each class list once (cache) and reads visual features from the
feature cache. Same model (head + frozen encoders), same data, same optimizer; each mode runs
in its own process so that peak memory (max RSS on CPU, max allocated on CUDA) is its own.

    python benchmarks/bench_fusioner.py                 # CPU: EfficientNet-Lite0 + MiniLM, 64 px images
    python benchmarks/bench_fusioner.py --cuda          # + GPU: 480 px, random ViT-B/16 CLIP, bf16/compile on/off
Prints images/s and peak memory of each and the ratio ours / official.
"""
import argparse, json, os, resource, subprocess, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OVSEG_PROGRESS", "0")


def build(args):
    import torch
    from ovseg.core import FusionerConfig
    from ovseg.encoders import create_clip
    from ovseg.fusioner import Fusioner
    torch.manual_seed(0)
    if args.device == "cuda":
        v, t = create_clip("random:open_clip:ViT-B-16")
        fc = FusionerConfig(visual="random:open_clip:ViT-B-16", text="random:open_clip:ViT-B-16", dim=512, depth=args.depth or 12,
                            heads=8, templates="fusioner")
    else:  # the offline uni-modal pair (no dependence on the embedded CLIP stage)
        from ovseg.encoders import create_visual_encoder, create_text_encoder
        v, t = create_visual_encoder("efficientnet-lite0", stride=8), create_text_encoder("minilm")
        fc = FusionerConfig(visual="efficientnet-lite0", text="minilm", visual_stride=8, dim=32, depth=args.depth or 2,
                            heads=4, decoder_channels=[16, 16, 8, 8], drop_path=0.0, templates="fusioner")
    model = Fusioner(fc, visual=v, text=t).to(args.device)
    v.to(args.device); t.to(args.device)
    return model, v, t


def data(args, n):
    import torch
    g = torch.Generator().manual_seed(0)
    names = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange")
             for s in ("circle", "square", "triangle", "cross", "ring")]
    S = args.size
    imgs = torch.rand(n, 3, S, S, generator=g)
    labels = torch.randint(0, 2, (n, S, S), generator=g)
    labels[:, :2] = 255
    cls = [names[i % len(names)] for i in range(n)]
    return imgs, labels, cls


def run_mode(args):
    import torch
    from ovseg.core import autocast
    from ovseg.fusioner import binary_episode_loss
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model, v, t = build(args)
    B, steps = args.batch, args.steps
    imgs, labels, cls = data(args, B * (steps + args.warmup))
    dtype = torch.bfloat16 if args.bf16 else None
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    if args.mode == "ours":
        # feature cache: frozen visual features computed once, up front (not timed, like a cache hit)
        with torch.no_grad():
            feats = torch.cat([v(imgs[i:i + 64].to(dev)).dense.float() for i in range(0, len(imgs), 64)])
        step_fn = lambda b: model.training_loss(b)
        if args.compile: step_fn = torch.compile(step_fn)
    def step(k):
        sl = slice(k * B, (k + 1) * B)
        if args.mode == "ours":
            batch = dict(dense=feats[sl], label=labels[sl].to(dev), class_name=cls[sl])
            with autocast(dev, dtype): loss = step_fn(batch)
            loss.backward()
        else:  # official structure: per image, re-run the image encoder and all text templates
            for i in range(sl.start, sl.stop):
                emb = t.encode_classes([cls[i]], templates="fusioner").float().to(dev)   # no cache
                with autocast(dev, dtype):
                    dense = v(imgs[i:i + 1].to(dev)).dense.float()
                    logits = model(dense, emb, tuple(labels.shape[-2:]))[:, 0]
                    loss = binary_episode_loss(logits, labels[i:i + 1].to(dev)) / B
                loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
    for k in range(args.warmup): step(k)
    if dev.type == "cuda": torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(args.warmup, args.warmup + steps): step(k)
    if dev.type == "cuda": torch.cuda.synchronize()
    el = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"images_per_s": B * steps / el, "peak_mib": peak, "seconds": el}))


def child(args, mode, **over):
    cmd = [sys.executable, __file__, "--child", "--mode", mode]
    for k, val in {**vars(args), **over}.items():
        if k in ("child", "mode", "cuda"): continue
        if isinstance(val, bool):
            if val: cmd.append(f"--{k}")
        else: cmd += [f"--{k}", str(val)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode: raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args, label, **over):
    ours = child(args, "ours", **over)
    base = child(args, "official", **over)
    print(f"{label}: ours {ours['images_per_s']:.1f} img/s, peak {ours['peak_mib']:.0f} MiB | "
          f"official-style {base['images_per_s']:.1f} img/s, peak {base['peak_mib']:.0f} MiB | "
          f"speed-up x{ours['images_per_s'] / base['images_per_s']:.1f}, memory ratio {ours['peak_mib'] / base['peak_mib']:.2f}")
    return {"label": label, "ours": ours, "official": base, "speedup": ours["images_per_s"] / base["images_per_s"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true"); p.add_argument("--mode", default="ours")
    p.add_argument("--device", default="cpu"); p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16); p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1); p.add_argument("--depth", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true"); p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda", action="store_true", help="also run the CUDA comparisons (480 px, ViT-B/16 CLIP)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.child: return run_mode(args)
    results = [compare(args, f"CPU, EfficientNet-Lite0 + MiniLM, {args.size}px, batch {args.batch}")]
    import torch
    if args.cuda or torch.cuda.is_available():
        if not torch.cuda.is_available(): print("CUDA requested but not available: GPU comparisons skipped")
        else:
            for bf16 in (False, True):
                for comp in (False, True):
                    results.append(compare(args, f"CUDA 480px ViT-B/16 (random), bf16={bf16}, compile={comp}",
                                           device="cuda", size=480, batch=8, steps=10, warmup=3, bf16=bf16, compile=comp))
    else:
        print("no CUDA GPU: 480 px / ViT-B/16 / bf16 / torch.compile comparisons skipped")
    if args.json:
        with open(args.json, "w") as f: json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
