#!/usr/bin/env python
"""Copy the pipeline's headline figures from outputs/ into docs/img/, downscaled, so that the README
and the docs show them to someone browsing the repository before running anything. `make repro`
calls this after `dvc repro`; commit docs/img/ with the dvc.lock of the same run.

Usage: scripts/refresh_figures.py   (figures whose stage has not run are left as they are)"""
from pathlib import Path
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {  # docs/img name: the stage output it shows
    "summary.png": "outputs/summary/summary.png",
    "gallery.png": "outputs/gallery/gallery.png",
    "world_samples.png": "outputs/world/world_samples.png",
    "world_mosaic4.png": "outputs/world/world_mosaic4.png",
}
MAX_SIDE = 1400   # keeps each PNG small in git

def main() -> int:
    out = ROOT / "docs" / "img"; out.mkdir(parents=True, exist_ok=True)
    for name, src in FIGURES.items():
        p = ROOT / src
        if not p.is_file(): print(f"skip {name}: {src} not made yet"); continue
        im = Image.open(p)
        if max(im.size) > MAX_SIDE:
            s = MAX_SIDE / max(im.size)
            im = im.convert("RGB").resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)
            im.quantize(256).save(out / name, optimize=True)   # a palette PNG: a fraction of the RGB size
        else: (out / name).write_bytes(p.read_bytes())
        print(f"docs/img/{name} <- {src} ({(out / name).stat().st_size // 1024} KB)")
    return 0

if __name__ == "__main__": raise SystemExit(main())
