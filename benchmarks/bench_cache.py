"""Feature cache benchmark: one fusion-head-like training epoch over frozen dense features, reading
them from the on-disk cache versus recomputing the frozen encoder every step.

    python benchmarks/bench_cache.py [--images 64] [--size 224] [--batch 8] [--encoder efficientnet-lite0]

Images: the embedded world's when ovseg.embedded is available, else synthetic. Prints seconds per
epoch and the ratio recompute / cached (baseline measured in the same run)."""
import argparse, os, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
import torch, torch.nn as nn, torch.nn.functional as F
from ovseg.encoders import create_visual_encoder
from ovseg.cache import FeatureCache

p = argparse.ArgumentParser()
p.add_argument("--images", type=int, default=64); p.add_argument("--size", type=int, default=224)
p.add_argument("--batch", type=int, default=8); p.add_argument("--encoder", default="efficientnet-lite0")
p.add_argument("--stride", type=int, default=16); p.add_argument("--threads", type=int, default=1)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)

def images():
    "The embedded world's train images (helper B's ovseg.embedded, if its world is built), else synthetic."
    try:
        from pathlib import Path
        from ovseg.embedded import World, WorldSemantic
        jf = Path("outputs/world/world.json")
        world = World.load(jf) if jf.exists() else World()
        ds = WorldSemantic(world, "train")
        n = min(a.images, len(ds))
        xs = [F.interpolate(ds[i]["image"][None], size=(a.size, a.size), mode="bilinear")[0] for i in range(n)]
        return torch.stack(xs), f"embedded-world"
    except Exception as e:
        print(f"(embedded world not usable: {type(e).__name__}: {e}; using synthetic images)")
    return torch.rand(a.images, 3, a.size, a.size), "synthetic"

X, src = images()
a.images = len(X)
K = 8
Y = torch.randint(0, K, (a.images, a.size, a.size))
ids = [f"bench{i}" for i in range(a.images)]
kw = {"stride": a.stride} if a.encoder.startswith("efficientnet") else {}
enc = create_visual_encoder(a.encoder, **kw)

class Head(nn.Module):
    "Fusion-head-like: 1x1 projection, 2 transformer layers over the dense tokens, conv classifier."
    def __init__(self, d_in, d=128):
        super().__init__()
        self.proj = nn.Conv2d(d_in, d, 1)
        self.tr = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 2 * d, batch_first=True), 2)
        self.cls = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GELU(), nn.Conv2d(d, K, 1))
    def forward(self, f):
        x = self.proj(f); B, D, h, w = x.shape
        x = self.tr(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, D, h, w)
        return self.cls(x)

def epoch(get_feats):
    torch.manual_seed(0)
    head = Head(enc.dim); opt = torch.optim.AdamW(head.parameters(), 1e-3)
    t0 = time.perf_counter()
    for i in range(0, a.images, a.batch):
        f = get_feats(slice(i, i + a.batch))
        logits = F.interpolate(head(f.dense), size=(a.size, a.size), mode="bilinear")
        loss = F.cross_entropy(logits, Y[i:i + a.batch])
        opt.zero_grad(); loss.backward(); opt.step()
    return time.perf_counter() - t0

enc(X[:a.batch])  # warm-up (first-call allocations) outside the timings
with tempfile.TemporaryDirectory() as d:
    cache = FeatureCache(d, enc, transform=f"bench-{a.size}")
    t_recompute = epoch(lambda s: enc(X[s]))
    t_cold = epoch(lambda s: cache.features(X[s], ids[s]))      # first epoch: computes and writes
    t_warm = epoch(lambda s: cache.features(None, ids[s]))       # later epochs: reads only
    mb = sum(p.stat().st_size for p in cache.dir.rglob("*.safetensors")) / 2**20
print(f"encoder {enc.name} (dense {enc.dim}x{a.size // a.stride}x{a.size // a.stride}, stride {a.stride}), "
      f"{a.images} {src} images {a.size}px, batch {a.batch}, {a.threads} thread(s); cache {mb:.1f} MiB")
print(f"epoch, recompute encoder each step : {t_recompute:7.2f} s")
print(f"epoch, cache cold (compute + write): {t_cold:7.2f} s   ratio cold/recompute {t_cold / t_recompute:.2f}")
print(f"epoch, cache warm (read only)      : {t_warm:7.2f} s")
print(f"speed-up recompute / cached (warm) : {t_recompute / t_warm:.2f}x")
