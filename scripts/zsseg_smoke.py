"""Preliminary fold-0 smoke run of zsseg on the embedded world (not run by CI or DVC).

Trains (or reuses) an embedded CLIP, measures how well it classifies ground-truth object crops
(the precondition of the embedded protocol, docs/zsseg.md), trains the zsseg proposer on the seen classes of one fold
(frozen EfficientNet-Lite0 taps precomputed once) with `ovseg.train.fit`, and scores val with
mIoU-seen / unseen / hIoU / pAcc for: proposal classifier only, CLIP on crops only, the ensemble
(λ 0.8 and 0.7), oracle masks + CLIP, predicted masks + oracle classes.
    python scripts/zsseg_smoke.py --out /tmp/zsseg_smoke [--steps 1500] [--clip-dir DIR] [--fold 0]
"""
import argparse, json, os, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
from pathlib import Path
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/zsseg_smoke"); ap.add_argument("--clip-dir", default=None)
    ap.add_argument("--clip-steps", type=int, default=None); ap.add_argument("--clip-group", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1500); ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fold", type=int, default=0); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", default=None, help="a saved zsseg model dir: skip training, score it")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from ovseg.cliptrain import ClipTrainConfig
    from ovseg.core import TrainConfig, load_config
    from ovseg.cliptrain import train_clip
    from ovseg.images import collate
    from ovseg.embedded import World, WorldSemantic
    from ovseg.encoders import create_clip, create_visual_encoder
    from ovseg.maskgen import oracle_classes, oracle_masks
    from ovseg.metrics import SemanticMetric
    from ovseg.train import fit
    from ovseg.twostage import ZeroShotTrainView, ZsSeg, ZsSegConfig
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("params.yaml", "embedded")
    world = World(cfg.params.world, seed=cfg.seed)
    clip_dir = Path(a.clip_dir or out / "embedded_clip")
    t0 = time.time()
    if not (clip_dir / "open_clip_config.json").exists():
        ccfg = cfg.params.clip
        if a.clip_group > 1: ccfg = ClipTrainConfig(**{**ccfg.__dict__, "group_size": a.clip_group})
        train_clip(world, ccfg, seed=a.seed, steps=a.clip_steps, out_dir=clip_dir)
        print(f"embedded CLIP trained in {time.time() - t0:.0f} s -> {clip_dir}")
    names, novel = list(world.class_names), world.novel_classes(a.fold)
    backbone = create_visual_encoder("efficientnet-lite0", taps=(8, 16, 32))
    clip = create_clip(f"open_clip:{clip_dir}")
    torch.manual_seed(a.seed)
    zcfg = ZsSegConfig(clip=f"open_clip:{clip_dir}", class_names=names, unseen=novel)
    if a.eval_only:
        from ovseg.train import from_pretrained
        model = from_pretrained(a.eval_only, templates="embedded")
    else: model = ZsSeg(zcfg, backbone=backbone, clip=clip)
    val = WorldSemantic(world, "val", background="ignore")
    vb = [collate([val[i] for i in range(s, min(len(val), s + 100))]) for s in range(0, len(val), 100)]
    text = model.class_embeddings(names)

    # precondition: CLIP on ground-truth crops of val objects
    hit = torch.zeros(len(names)); tot = torch.zeros(len(names))
    for b in vb:
        om = oracle_masks(b["label"], len(names))
        logits, valid = model.classify_masks(b["image"], om, text)
        pred = logits.argmax(-1)
        truth = torch.arange(len(names)).expand_as(pred)
        tot += valid.sum(0).float(); hit += ((pred == truth) & valid).sum(0).float()
    nov = torch.zeros(len(names), dtype=torch.bool); nov[novel] = True
    pre = {"crop_acc_all": float(hit.sum() / tot.sum()), "crop_acc_novel": float(hit[nov].sum() / tot[nov].sum()),
           "crop_acc_seen": float(hit[~nov].sum() / tot[~nov].sum())}
    print("CLIP on ground-truth crops:", {k: round(v, 3) for k, v in pre.items()})

    train_s = 0.0
    if not a.eval_only: train_s = _train(a, model, world, backbone, out)
    evaluate(a, model, names, novel, vb, out, pre, train_s, clip_dir)


def _train(a, model, world, backbone, out):
    from ovseg.core import TrainConfig
    from ovseg.images import collate
    from ovseg.embedded import WorldSemantic
    from ovseg.train import fit
    from ovseg.twostage import ZeroShotTrainView
    # training data: seen classes only, precomputed frozen taps
    train = ZeroShotTrainView(WorldSemantic(world, "train", background="ignore", fold=a.fold, novel="ignore"))
    samples = [train[i] for i in range(len(train))]
    with torch.inference_mode():
        for s in range(0, len(samples), 100):
            chunk = samples[s:s + 100]
            taps = backbone(torch.stack([x["image"] for x in chunk])).taps
            for j, x in enumerate(chunk):
                for st, t in taps.items(): x[f"tap_{st}"] = t[j].clone()
                x.pop("image")
    print(f"{len(samples)} training images with seen pixels (of {len(world.split('train'))}); taps cached")

    class ListData(torch.utils.data.Dataset):
        def __len__(self): return len(samples)
        def __getitem__(self, i): return samples[i]
    loader = torch.utils.data.DataLoader(ListData(), batch_size=a.batch, collate_fn=collate)
    tcfg = TrainConfig(max_steps=a.steps, batch_size=a.batch, lr=1e-3, weight_decay=1e-4, weight_decay_end=1e-4,
                       grad_clip=0.01, warmup_steps=0, log_every=50, seed=a.seed, device="cpu", precision="fp32")
    t1 = time.time()
    fit(model, loader, tcfg, out / "run")
    train_s = time.time() - t1
    print(f"trained {a.steps} steps in {train_s:.0f} s")
    return train_s


def evaluate(a, model, names, novel, vb, out, pre, train_s, clip_dir):
    from ovseg.maskgen import oracle_classes, oracle_masks
    from ovseg.metrics import SemanticMetric

    # evaluation
    model.eval()
    rows = {k: SemanticMetric(len(names), class_names=names) for k in
            ("(b) proposal classifier only", "(c) CLIP on crops only", "(d) ensemble lam=0.8", "(d') ensemble lam=0.7",
             "(e) oracle masks + CLIP", "(f) predicted masks + oracle classes")}
    with torch.no_grad():
        for b in vb:
            x, lab = b["image"], b["label"]
            emb, masks = model.proposals(x)
            m = masks.sigmoid()
            sem = lambda p: torch.einsum("bqk,bqhw->bkhw", p, m)
            rows["(b) proposal classifier only"].update(sem(model.class_probs(x, names, None, emb, masks)), lab)
            rows["(c) CLIP on crops only"].update(sem(model.class_probs(x, names, 0.0, emb, masks)), lab)
            rows["(d) ensemble lam=0.8"].update(sem(model.class_probs(x, names, 0.8, emb, masks)), lab)
            rows["(d') ensemble lam=0.7"].update(sem(model.class_probs(x, names, 0.7, emb, masks)), lab)
            rows["(e) oracle masks + CLIP"].update(model.predict_with_masks(x, names, oracle_masks(lab, len(names))), lab)
            rows["(f) predicted masks + oracle classes"].update(sem(oracle_classes(m, lab, len(names))), lab)
    res = {}
    print(f"\nfold {a.fold} (unseen: {', '.join(names[c] for c in novel)}), val {sum(len(b['label']) for b in vb)} images, seed {a.seed}")
    print(f"{'row':40s} {'mIoU-S':>7s} {'mIoU-U':>7s} {'hIoU':>7s} {'pAcc':>7s}")
    for k, met in rows.items():
        r = met.compute(unseen=novel)
        res[k] = {n: float(r[n]) for n in ("mIoU_seen", "mIoU_unseen", "hIoU", "pAcc", "mIoU")}
        print(f"{k:40s} " + " ".join(f"{100 * res[k][n]:7.1f}" for n in ("mIoU_seen", "mIoU_unseen", "hIoU", "pAcc")))
    (out / ("smoke_eval.json" if a.eval_only else "smoke.json")).write_text(json.dumps({"precondition": pre, "rows": res, "steps": a.steps, "train_seconds": train_s,
                                               "fold": a.fold, "seed": a.seed, "clip_dir": str(clip_dir)}, indent=1))


if __name__ == "__main__":
    main()
