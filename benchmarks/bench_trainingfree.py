"""Seconds per image and peak memory of each training-free method at its harness's sizes, beside MaskCLIP,
measured in the same run on CPU.

ViT-B/16 open_clip with random weights (`open_clip.create_model("ViT-B-16")`; speed does not depend on the
weights); ProxyCLIP's VFM is timm's DINO ViT-B/8 architecture, random weights. Time: all methods share one CLIP
in one process and are timed round-robin (one warm-up each, then `--repeats` rounds, best time per method), so
a busy CPU slows them alike. Peak RSS: each method in its own child process (model built, one image). The image is `--height`x`--width` (default 375x500, a typical VOC/ADE photo) and each
method uses its own `TF_PRESETS[(method, --dataset)]` protocol (short side, sliding window, stride, PAMR).
Class embeddings are random unit vectors for `--classes` classes (the text tower runs once per class list and
is cached; it is not part of the per-image cost).
    python benchmarks/bench_trainingfree.py [--threads 1] [--repeats 2] [--dataset ade150] [--methods ...]
"""
import argparse, json, os, resource, subprocess, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")

METHODS = ("maskclip", "sclip", "clearclip", "naclip", "proxyclip", "scclip", "resclip")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB


def build(methods, a):
    import torch, open_clip
    import torch.nn.functional as F
    from ovseg.denseclip import DenseCLIP, TF_PRESETS, TimmVFM
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16").eval()
    text = F.normalize(torch.randn(a.classes, 512), dim=-1)
    out = {}
    for m in methods:
        dc = DenseCLIP(clip, method=m, vfm=TimmVFM() if m == "proxyclip" else None,
                       **TF_PRESETS[(m, a.dataset)].model_kwargs())
        dc.class_embeddings = lambda names: text                              # the cached text side
        out[m] = dc
    return out, torch.rand(1, 3, a.height, a.width), [str(i) for i in range(a.classes)]


def child(a) -> dict:
    from ovseg.denseclip import TF_PRESETS
    models, img, names = build([a.method], a)
    base = _rss_mib()
    out = models[a.method].predict(img, names)
    assert out.shape == (1, a.classes, a.height, a.width) and bool(out.isfinite().all())
    p = TF_PRESETS[(a.method, a.dataset)]
    return dict(method=a.method, peak_rss_mib=_rss_mib(), model_rss_mib=base, short_side=p.short_side,
                window=p.slide_crop, stride=p.slide_stride, pamr=dict(p.method_options).get("pamr_steps", 0))


def timed(a) -> dict:
    "Best seconds per image of each method, round-robin in one process."
    models, img, names = build(a.methods, a)
    for m in a.methods: models[m].predict(img, names)                          # warm-up
    best = {m: float("inf") for m in a.methods}
    for _ in range(a.repeats):
        for m in a.methods:
            t = time.perf_counter(); models[m].predict(img, names); best[m] = min(best[m], time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1); ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dataset", default="ade150"); ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--height", type=int, default=375); ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--method", help=argparse.SUPPRESS); ap.add_argument("--json", help="also write rows here")
    a = ap.parse_args()
    if a.method:
        print(json.dumps(child(a))); return
    rows, load0 = [], os.getloadavg()[0]
    for m in a.methods:      # peak RSS first, each in a fresh child (Linux keeps a parent's high-water mark in its children)
        cmd = [sys.executable, __file__, "--method", m] + [x for k in ("threads", "dataset", "classes", "height", "width")
                                                           for x in (f"--{k}", str(getattr(a, k)))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode: raise SystemExit(f"{m} failed:\n{r.stderr[-2000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    best = timed(a)
    for r in rows: r["s_per_image"] = best[r["method"]]
    ref = next((r for r in rows if r["method"] == "maskclip"), rows[0])
    print(f"{a.height}x{a.width} image, {a.classes} classes, protocol TF_PRESETS[(method, {a.dataset!r})], "
          f"{a.threads} thread(s), best of {a.repeats} round-robin rounds; load average before/after "
          f"{load0:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| method | short side | window / stride | s/image | x MaskCLIP | peak RSS (MiB) | peak before the image (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        win = f"{r['window']} / {r['stride']}" if r["window"] else "whole image"
        print(f"| {r['method']}{' + PAMR' if r['pamr'] else ''} | {r['short_side']} | {win} | {r['s_per_image']:.2f} | "
              f"{r['s_per_image'] / ref['s_per_image']:.2f} | {r['peak_rss_mib']:.0f} | {r['model_rss_mib']:.0f} |")
    if a.json: open(a.json, "w").write(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
