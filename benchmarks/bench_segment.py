"""Seconds per 512x512 image on CPU: the segment API (dense CLIP value path; a Fusioner
checkpoint) against the bare image-encoder forward on the same input, measured in the same run.

ViT-B/16-sized open_clip with random weights (`open_clip.create_model("ViT-B-16")`; speed does
not depend on the weights). Prints seconds and ratios to the bare encoder.
    python benchmarks/bench_segment.py [--threads 1] [--repeats 3]
"""
import argparse, os, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
import numpy as np
import torch

def timeit(fn, repeats):
    "Register `fn`; all registered paths are timed round-robin in `run_all` (fairer on a busy CPU)."
    _PATHS.append((fn, repeats)); return len(_PATHS) - 1

_PATHS = []

def run_all():
    for fn, _ in _PATHS: fn()                       # warm-up (text embeddings cached, allocator warm)
    best = [float("inf")] * len(_PATHS)
    for r in range(max(rep for _, rep in _PATHS)):
        for i, (fn, _) in enumerate(_PATHS):
            t = time.perf_counter(); fn(); best[i] = min(best[i], time.perf_counter() - t)
    return best

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1); ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import open_clip
    from ovseg.denseclip import DenseCLIP
    from ovseg.segment import segment
    from ovseg.openclip import OpenClipVisualEncoder, OpenClipTextEncoder
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16").eval()
    vis = OpenClipVisualEncoder(clip, {}, "open_clip:ViT-B-16(random)")
    txt = OpenClipTextEncoder(clip, open_clip.get_tokenizer("ViT-B-16"), "open_clip:ViT-B-16(random)")
    S = a.size
    img = np.random.default_rng(0).integers(0, 255, (S, S, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    classes = ["cat", "sofa", "wall", "floor", "person", "table", "window", "plant"]
    rows = {}
    with torch.inference_mode():
        rows["bare encoder forward (C's OpenClipVisualEncoder, all 12 blocks)"] = timeit(lambda: vis(x), a.repeats)
        dc = DenseCLIP(clip, model_cfg=open_clip.get_model_config("ViT-B-16"))
        rows["DenseCLIP.predict (value path), one pass"] = timeit(lambda: dc.predict(x, classes), a.repeats)
        rows["segment(dense CLIP), one window (window=512)"] = timeit(
            lambda: segment(img, classes, model=dc, window=S, stride=S, short_side=S), a.repeats)
        rows["segment(dense CLIP), defaults (short side 448 -> 1 window)"] = timeit(
            lambda: segment(img, classes, model=dc), a.repeats)
        try:
            from ovseg.fusioner import FusionerConfig
            from ovseg.fusioner import Fusioner
            from ovseg.train import save_pretrained
            from ovseg.fusioner import load_fusioner
            fz = Fusioner(FusionerConfig(visual="random:open_clip:ViT-B-16", text="random:open_clip:ViT-B-16",
                                         mode="multiclass"), visual=vis, text=txt).eval()
            with tempfile.TemporaryDirectory() as d:   # a real checkpoint round trip (encoders passed in memory)
                save_pretrained(fz, d); fz = load_fusioner(d, visual=vis, text=txt)
            rows["segment(Fusioner checkpoint, d=512 L=12), one window"] = timeit(
                lambda: segment(img, classes, model=fz, window=S, stride=S, short_side=S), a.repeats)
        except Exception as e:
            print(f"Fusioner skipped: {type(e).__name__}: {e}")
        times = run_all()
    rows = {k: times[i] for k, i in rows.items()}
    base = next(iter(rows.values()))
    print(f"CPU, {torch.get_num_threads()} thread(s), {S}x{S} image, {len(classes)} classes, best of {a.repeats}")
    print(f"{'path':62s} {'s/img':>8s} {'x bare':>7s}")
    for k, v in rows.items(): print(f"{k:62s} {v:8.3f} {v / base:7.2f}")

if __name__ == "__main__":
    main()
