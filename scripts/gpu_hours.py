#!/usr/bin/env python
"""GPU-hour estimates of the paper pipeline's stages on one H100 (issue 23, item 5; docs/reproduction.md).

Per-sample training cost is MEASURED: the FLOPs (torch.utils.flop_counter) of one `training_loss` forward + backward
at the paper recipe's input size, on a CPU, with the real architectures and random weights (the smoke test's files:
`--work` of scripts/paper_smoke.py, default /tmp/ovseg_paper_smoke). Inference cost per image is measured the same
way with `predict` at a typical image size. Both are multiplied by the official schedules in params.yaml
(`profiles.paper`) and by the dataset sizes below, then divided by an assumed sustained throughput:
  bf16 autocast: 40 % of the H100 SXM's 989 dense TFLOP/s = 396 TFLOP/s
  fp32 (Fusioner's and OVSegmentor's official precision; ovseg leaves TF32 off): 40 % of 67 TFLOP/s = 27 TFLOP/s
The FLOP counter sees matmuls and convolutions only (not norms, softmax, data loading), so these are lower bounds
on work and the utilisation is an assumption: read them as the order of magnitude, within about 2x.
    python scripts/gpu_hours.py [--work /tmp/ovseg_paper_smoke] [--only fusioner zsseg fisa ovsegmentor]
"""
import argparse, dataclasses, json, os, sys, time
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
import torch, yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
PAPER_PRECISION = "bf16"
TFLOPS = {"bf16": 0.4 * 989e12, "fp32": 0.4 * 67e12}
# dataset sizes (official splits): training images / episodes and evaluation images
N = {"pascal5i_trn": [12667, 11736, 9023, 13227],            # HSNet trn lists: the three other folds' files (ovseg/splits)
     "coco20i_trn": [95476, 133927, 141054, 141016],        # HSNet trn_fold*.json.gz pairs
     "voc_val": 1449, "pc_val": 5105, "coco_val": 5000, "ade_val": 2000, "cc": 4_000_000}   # cc: the paper's CC4M

def flops(fn) -> float:
    with FlopCounterMode(display=False) as fc: fn()
    return float(fc.get_total_flops())

FALLBACK = set()   # models whose backward the FLOP counter's module hooks cannot follow: 3 x forward instead

def train_flops(model, batch) -> float:
    "FLOPs of one training step's forward + backward, after one uncounted step has filled the per-run caches (class text)."
    model.train()
    with torch.no_grad(): model.training_loss(batch)
    def step():
        model.train(); loss = model.training_loss(batch); loss.backward()
    try: f = flops(step)
    except AssertionError:          # torch's module tracker: "Expected gradient function to be set" (a parameter returned as is)
        FALLBACK.add(type(model).__name__)
        model.zero_grad(set_to_none=True)
        with torch.no_grad(): f = 3 * flops(lambda: model.train() or model.training_loss(batch))
    model.zero_grad(set_to_none=True)
    return f

def cfg_for(work: Path):
    from ovseg.core import load_config
    sys.path.insert(0, str(ROOT / "scripts"))
    from paper_smoke import smoke_params
    from ovseg.paper import PAPER_WEIGHTS
    raw = smoke_params({})
    raw["profiles"]["paper"] = yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["paper"]   # the real recipe
    p = raw["profiles"]["paper"]
    global PAPER_PRECISION
    PAPER_PRECISION = "bf16" if p["runtime"].get("precision") == "bf16" else "fp32"   # the recipe's, not this CPU run's
    p["runtime"] = {"device": "cpu", "precision": "fp32", "num_workers": 0, "compile": False, "threads": 2}
    p["paths"] = {"data": str(work / "data"), "outputs": "/tmp/gpu_hours_out", "weights": str(work / "project" / "weights")}
    p["encoders"]["weights"] = {k: str(work / "project" / v) for k, v in PAPER_WEIGHTS.items()}
    for blk in (p["zsseg"]["model"], p["fisa"]["generator"]):
        blk["weights"] = {k: str(work / "project" / v) for k, v in PAPER_WEIGHTS.items() if k in blk.get("weights", {})}
    f = work / "gpu_hours_params.yaml"; f.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(f, "paper")

def hours(total_flops: float, precision: str) -> float: return total_flops / TFLOPS[precision] / 3600

def fusioner(cfg):
    from ovseg.images import collate
    from ovseg.fusioner import paper_model, paper_task
    s, tr = cfg.params.fusioner, cfg.params.train
    model = paper_model(s.model, "pascal5i", cfg)(0, 0)
    ds = paper_task("pascal5i", cfg).train(0, 0)
    per = train_flops(model, collate([ds[0]]))                                  # one 224 episode, fwd + bwd
    img = torch.rand(1, 3, 375, 500)
    with torch.no_grad(): model.predict(img[:, :, :224, :224], ["cat"])     # class text cached first
    inf = flops(lambda: torch.no_grad()(lambda: model.predict(img[:, :, :224, :224], ["cat"]))()) * 6   # slide 224/149 on 500x375: 6 windows
    rows = []
    for stage, runs, eps, n_eval in (("fusioner_pascal5i", 2, sum(N["pascal5i_trn"]), 4 * 1000),
                                     ("fusioner_coco20i", 1, sum(N["coco20i_trn"]), 4 * 1000),
                                     ("fusioner_encoders", len(s.pairs), sum(N["pascal5i_trn"]) * len(s.ablation_folds) / 4, len(s.ablation_folds) * 1000),
                                     ("fusioner_depth", len(s.depths), sum(N["pascal5i_trn"]) * len(s.ablation_folds) / 4, len(s.ablation_folds) * 1000)):
        total = runs * len(s.seeds) * (tr.epochs * eps * per + n_eval * inf)
        rows.append(dict(stage=stage, per_sample_GFLOP=per / 1e9, samples=runs * len(s.seeds) * tr.epochs * eps, precision=tr.precision,
                         how=f"{runs} run(s) x {len(s.seeds)} seed(s) x {tr.epochs} epochs x the folds' HSNet training episodes; "
                             f"eval {n_eval} episodes x 6 windows of 224", gpu_hours=hours(total, tr.precision)))
    rows.append(dict(stage="fusioner_mosaic4", per_sample_GFLOP=inf / 6 / 1e9, samples=4 * 1000, precision=tr.precision,
                     how="evaluation only: 4 x 1000 episodes of the pascal5i models", gpu_hours=hours(4 * 1000 * inf, tr.precision)))
    return rows

def zsseg(cfg):
    from ovseg.images import collate
    from ovseg.twostage import ZsSeg, zero_shot_data
    from ovseg.core import from_dict
    S = cfg.params.zsseg
    rows = []
    for name, bench in S.benchmarks.items():
        mc = dataclasses.replace(S.model, **{k: v for k, v in bench.model.items()})
        train, val, names, unseen = zero_shot_data(bench, cfg.params.paths.data)
        model = ZsSeg(dataclasses.replace(mc, class_names=names, unseen=unseen))
        per = train_flops(model, collate([train[0]]))
        # inference: no parameter needs a gradient (with them on, torch's module tracker asserts on a query embedding
        # passed into a decoder layer under no_grad: "Expected gradient function to be set")
        model.requires_grad_(False)
        img = torch.rand(1, 3, bench.test_short_side, int(bench.test_short_side * 4 / 3))
        with torch.no_grad(): model.predict(img, names)
        inf = flops(lambda: torch.no_grad()(lambda: model.predict(img, names))())
        n_val = N["voc_val"] if bench.dataset.startswith("voc") else N["coco_val"]
        runs = len(S.seeds) * len(S.folds)
        total = runs * (bench.max_steps * bench.batch_size * per + n_val * inf)
        prec = S.train.precision if S.train.precision != "auto" else PAPER_PRECISION   # fp32: the official code's
        rows.append(dict(stage=f"zsseg ({name})", per_sample_GFLOP=per / 1e9, samples=runs * bench.max_steps * bench.batch_size, precision=prec,
                         how=f"{bench.max_steps} steps x batch {bench.batch_size} at crop {bench.crop}; eval {n_val} images at short side "
                             f"{bench.test_short_side} (proposals + CLIP crops); the learned-prompt step not counted", gpu_hours=hours(total, prec)))
    return rows

def fisa(cfg):
    from ovseg.images import collate
    from ovseg.fisa import Fisa, generator_config, real_train_set, PanopticProposerTraining
    from ovseg.twostage import ZsSeg
    S = cfg.params.fisa
    # the generator's class text (80 templates x 133 classes) is encoded once per run and cached, not per sample:
    # one template here keeps that one-off cost (64 TFLOP with 80) out of the per-sample count
    S = dataclasses.replace(S, generator={**S.generator, "templates": ["a photo of a {}."]})
    ds = real_train_set(S, cfg.params.paths.data, cfg.params.data)
    gen = ZsSeg(generator_config(S, ds.class_names, []))
    g_per = train_flops(PanopticProposerTraining(gen), collate([ds[0]]))
    gen.requires_grad_(False)
    model = Fisa(S.model, generator=gen)
    per = train_flops(model, collate([ds[0]]))
    img = torch.rand(1, 3, 512, 683)
    with torch.no_grad(): model.predict(img, list(ds.class_names)[:150])
    inf = flops(lambda: torch.no_grad()(lambda: model.predict(img, list(ds.class_names)[:150]))())
    n_val = N["ade_val"] * 3 + N["pc_val"] * 2 + N["voc_val"]      # ade150, ade847, ADE panoptic, pc59, pc459, voc20
    prec = PAPER_PRECISION
    g = S.generator_train; t = S.train
    return [dict(stage="fisa (generator)", per_sample_GFLOP=g_per / 1e9, samples=g.max_steps * g.batch_size, precision=prec,
                 how=f"{g.max_steps} steps x batch {g.batch_size} at crop {cfg.params.data.crop_size} (COCO panoptic)",
                 gpu_hours=hours(g.max_steps * g.batch_size * g_per, prec)),
            dict(stage="fisa (adaptation + eval)", per_sample_GFLOP=per / 1e9, samples=len(S.seeds) * t.max_steps * t.batch_size, precision=prec,
                 how=f"{len(S.seeds)} seed(s) x {t.max_steps} steps x batch {t.batch_size}; eval {n_val} images at 512x683 (one window)",
                 gpu_hours=hours(len(S.seeds) * (t.max_steps * t.batch_size * per + n_val * inf), prec))]

def ovsegmentor(cfg):
    from ovseg.ovsegmentor import CaptionList, CropFlip, EntityCaptions, _collate, build_model, stage2
    from ovseg.paper import data_path
    S, root = cfg.params.ovsegmentor, cfg.params.paths.data
    caps = CaptionList(data_path(S.captions, root), data_path(S.images_root, root), size=S.model.image_size)
    data = CropFlip(EntityCaptions(caps, S.model.vocabulary, partners=S.partners), S.model.image_size, S.crop_scale)
    batch = _collate([data[0], data[1]])
    m1 = build_model(S, "mec", weights=cfg.params.encoders.weights)
    per1 = train_flops(m1, batch) / 2
    m2 = stage2(m1, cmc_weight=S.cmc_weight)
    per2 = train_flops(m2, batch) / 2
    img = torch.rand(1, 3, S.eval_short_side, int(S.eval_short_side * 4 / 3))
    m2.eval()
    with torch.no_grad(): m2.predict(img, ["background"] + [f"class {k}" for k in range(150)])
    inf = flops(lambda: torch.no_grad()(lambda: m2.predict(img, ["background"] + [f"class {k}" for k in range(150)]))())
    n_val = N["voc_val"] + N["pc_val"] + N["coco_val"] + N["ade_val"]
    p1, p2 = S.stage1, S.stage2
    total = len(S.seeds) * (p1.epochs * N["cc"] * per1 + p2.epochs * N["cc"] * per2 + n_val * inf)
    return [dict(stage="ovsegmentor", per_sample_GFLOP=(per1 + per2) / 2e9, samples=len(S.seeds) * (p1.epochs + p2.epochs) * N["cc"],
                 precision=p1.precision, how=f"stage 1 {p1.epochs} epochs ({per1 / 1e9:.0f} GFLOP/pair) + stage 2 {p2.epochs} epochs "
                 f"({per2 / 1e9:.0f} GFLOP/pair, CMC's momentum encoder and partner image) over {N['cc'] / 1e6:.0f}M pairs (CC4M, the paper's "
                 f"CC12M captions with an entity); eval {n_val} images", gpu_hours=hours(total, p1.precision))]

def ovsegmentor_memory(cfg, batch_size: int = 256) -> dict:
    """Bytes kept for backward per caption pair in one stage-1 (contrast + MEC) and one stage-2 (+ CMC) step at paper
    sizes (fp32), with and without gradient checkpointing, counted exactly with saved-tensor hooks (device-independent),
    plus weights, gradients and AdamW state; extrapolated to `batch_size` pairs on one GPU."""
    from ovseg.ovsegmentor import CaptionList, CropFlip, EntityCaptions, _collate, build_model, stage2
    from ovseg.paper import data_path
    S, root = cfg.params.ovsegmentor, cfg.params.paths.data
    caps = CaptionList(data_path(S.captions, root), data_path(S.images_root, root), size=S.model.image_size)
    data = CropFlip(EntityCaptions(caps, S.model.vocabulary, partners=S.partners), S.model.image_size, S.crop_scale)
    batch = _collate([data[i % len(data)] for i in range(2)])
    def saved_bytes(model):
        seen = {}
        def pack(t):
            try: key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            except Exception: key = (id(t), t.numel() * t.element_size())
            seen[key] = key[1]
            return t
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.training_loss(batch)
        loss.backward(); model.zero_grad(set_to_none=True)
        return sum(seen.values()) / 2
    m1 = build_model(S, "mec", weights=cfg.params.encoders.weights)
    out = {}
    for ck in (False, True):
        m1.set_grad_checkpointing(ck); out[f"stage1_ckpt{int(ck)}"] = saved_bytes(m1)
    m2 = stage2(m1, cmc_weight=S.cmc_weight)
    for ck in (False, True):
        m2.set_grad_checkpointing(ck); out[f"stage2_ckpt{int(ck)}"] = saved_bytes(m2)
    n_train = sum(p.numel() for p in m1.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in m1.parameters())
    static = 4 * n_all + 4 * n_train * 3          # fp32 weights + gradients + AdamW's two moments
    out.update(trainable_params=n_train, all_params=n_all, static_GB=static / 1e9,
               **{f"{k}_GB_at_{batch_size}": (static + batch_size * v) / 1e9 for k, v in list(out.items()) if k.startswith("stage")})
    return out

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/ovseg_paper_smoke")
    ap.add_argument("--only", nargs="*", default=["fusioner", "zsseg", "fisa", "ovsegmentor"])
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--memory", action="store_true", help="OVSegmentor's memory at batch 256, with and without checkpointing")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    cfg = cfg_for(Path(a.work))
    if a.memory:
        print(json.dumps(ovsegmentor_memory(cfg), indent=1)); return 0
    rows = []
    for name in a.only:
        t0 = time.time()
        try: new = globals()[name](cfg)
        except Exception as e: new = [dict(stage=name, error=f"{type(e).__name__}: {str(e)[:300]}")]
        rows += new
        for r in new: print(f"{name}: measured in {time.time() - t0:.0f} s: {json.dumps(r)}", file=sys.stderr, flush=True)
    print("| stage | GFLOP per training sample (fwd + bwd) | training samples | precision | H100 GPU-hours | how |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r: print(f"| {r['stage']} | not measured: {r['error']} | | | | |"); continue
        print(f"| {r['stage']} | {r['per_sample_GFLOP']:.0f} | {r['samples']:.3g} | {r['precision']} | {r['gpu_hours']:.1f} | {r['how']} |")
    if FALLBACK: print(f"\n(training FLOPs of {', '.join(sorted(FALLBACK))}: 3 x the forward's, the counter could not follow their backward)")
    if a.out: Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())
