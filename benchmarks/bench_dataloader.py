"""DataLoader throughput: images per second with 0, 1 and 2 worker processes.

    python benchmarks/bench_dataloader.py [--images 96] [--size 384] [--crop 256] [--batch 8]

Sources: a real-layout fixture (ADE20K-150 layout: JPEG images + grey PNG masks written to a
temporary folder, read through ovseg.data with the standard training transform) and, when
ovseg.embedded is available, the embedded world (WorldSemantic). Each configuration runs one
full epoch (worker start-up included) after a warm-up epoch; ratios are against 0 workers in
the same run."""
import argparse, os, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from ovseg.images import collate, train_transform
from ovseg.data import create_dataset

p = argparse.ArgumentParser()
p.add_argument("--images", type=int, default=96); p.add_argument("--size", type=int, default=384)
p.add_argument("--crop", type=int, default=256); p.add_argument("--batch", type=int, default=8)
p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
a = p.parse_args()
torch.set_num_threads(1)

def ade_fixture(root: Path, n: int, size: int):
    rng = np.random.default_rng(0)
    d = root / "ADEChallengeData2016"
    (d / "images/training").mkdir(parents=True); (d / "annotations/training").mkdir(parents=True)
    h, w = size, size * 4 // 3
    for i in range(n):
        # smooth images compress like photos; blocky label maps like real annotations
        base = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(d / f"images/training/ADE_train_{i:08d}.jpg", quality=90)
        lab = rng.integers(0, 151, (h // 32, w // 32), dtype=np.uint8)
        Image.fromarray(lab).resize((w, h), Image.NEAREST).save(d / f"annotations/training/ADE_train_{i:08d}.png")

def throughput(ds, workers: int) -> float:
    g = torch.Generator().manual_seed(0)
    def epoch():
        dl = torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=workers,
                                         collate_fn=collate, generator=g)
        n = 0
        for b in dl: n += len(b["id"])
        return n
    epoch()                                   # warm-up (page cache, lazy generation)
    t = time.perf_counter(); n = epoch(); dt = time.perf_counter() - t
    return n / dt

def report(name, ds):
    print(f"\n{name}: {len(ds)} images")
    base = None
    for w in a.workers:
        r = throughput(ds, w)
        base = base or r
        print(f"  workers={w}: {r:8.1f} images/s  ({r / base:.2f}x vs 0 workers)")

print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores visible, batch {a.batch}")
with tempfile.TemporaryDirectory() as tmp:
    ade_fixture(Path(tmp), a.images, a.size)
    ds = create_dataset("ade150", tmp, "train", transform=train_transform(a.crop))
    report(f"real-layout fixture (ADE20K-150 layout, {a.size}x{a.size * 4 // 3} JPEG/PNG, "
           f"scale-crop {a.crop} + flip + jitter)", ds)

try:
    from ovseg.embedded import WorldConfig
    from ovseg.embedded import World, WorldSemantic
except ImportError as e:
    print(f"\nembedded world: skipped (ovseg.embedded not available: {e})")
else:
    world = World(WorldConfig(), seed=0)
    ds = WorldSemantic(world, "train")
    if len(ds) > a.images: ds = torch.utils.data.Subset(ds, range(a.images))
    report("embedded world (WorldSemantic, train split, default WorldConfig)", ds)
