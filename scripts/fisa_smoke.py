"""FISA's bottleneck analysis on one fold and one seed of the embedded world (a smoke run, not run by CI or DVC).

The zsseg generator of the fold (trained on its seen classes with frozen EfficientNet-Lite0 taps
precomputed once, or loaded with --generator) is frozen. On val (all 30 classes, background ignored)
it scores mIoU-seen / unseen / hIoU / pAcc for masks x classifiers (docs/fisa.md, Table F1):
  predicted masks + the generator's own class head        (the conventional paradigm's classifier)
  predicted masks + frozen CLIP (mask pooling)            (alone, and ensembled with the head)
  predicted masks + frozen CLIP on masked crops (zsseg)   (alone, and ensembled with the head)
  ground-truth masks + frozen CLIP                        (mask pooling, and crops)
  predicted masks + oracle classes (IoU assignment)
  ground-truth masks + ground-truth classes               (100 by construction)
then trains FISA (SEVE + norms + LoRA) on the seen classes and adds its rows (adapted CLIP alone,
ensembled, on ground-truth masks). The claim under test: the oracle-classification gain is far
larger than the oracle-mask gain.
    python scripts/fisa_smoke.py --out /tmp/fisa_smoke [--gen-steps 1500] [--steps 500] [--val 500] [--generator DIR]
"""
import argparse, dataclasses, json, os, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
from pathlib import Path
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/fisa_smoke"); ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0); ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-steps", type=int, default=None, help="generator steps (default: fisa.generator_train.max_steps)")
    ap.add_argument("--gen-batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="FISA steps (default: fisa.train.max_steps)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--val", type=int, default=500, help="val images scored")
    ap.add_argument("--train-images", type=int, default=0, help="> 0: the first N training images only")
    ap.add_argument("--generator", default=None, help="a saved zsseg model dir to use as the frozen generator")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from ovseg.core import load_config
    from ovseg.embedded import WorldSemantic, get_world
    from ovseg.experiment import evaluate_semantic, world_semantic
    from ovseg.fisa import Fisa, build_generator, train_fisa, trainable_parameters
    from ovseg.maskgen import oracle_classes, oracle_masks
    from ovseg.metrics import SemanticMetric
    from ovseg.train import from_pretrained
    cfg = load_config()
    s = cfg.params.fisa
    s = dataclasses.replace(s, generator_train=dataclasses.replace(s.generator_train, device="cpu",
                                                                   max_steps=a.gen_steps or s.generator_train.max_steps,
                                                                   batch_size=a.gen_batch or s.generator_train.batch_size),
                            train=dataclasses.replace(s.train, device="cpu", max_steps=a.steps or s.train.max_steps,
                                                      batch_size=a.batch or s.train.batch_size))
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    world = get_world(cfg)
    task = world_semantic(world)
    train = task.train(a.fold, a.seed)
    if a.train_images:
        full, train = train, torch.utils.data.Subset(train, range(min(a.train_images, len(train))))
        train.class_names, train.unseen = full.class_names, full.unseen
    t0 = time.time()
    gen = from_pretrained(a.generator) if a.generator else \
        build_generator(s, train, a.fold, a.seed, unseen=train.unseen, directory=out / "generator", precompute_taps=True)
    gen_s = time.time() - t0
    val = WorldSemantic(world, "val", background="ignore", fold=a.fold)
    names, K, unseen = val.class_names, len(val.class_names), val.unseen
    sub = torch.utils.data.Subset(val, range(min(a.val, len(val))))
    sub.class_names = names
    ev = lambda m: evaluate_semantic(m, sub, names, unseen=unseen)
    keys = ("mIoU_seen", "mIoU_unseen", "hIoU", "pAcc")
    rows = {}
    def row(name, r): rows[name] = {k: round(float(r[k]), 2) for k in keys}; print(name, rows[name], flush=True)

    frozen = Fisa(s.model, generator=gen).eval()                       # gate 0, LoRA 0: exactly frozen CLIP
    alone = Fisa(dataclasses.replace(s.model, ensemble=False), generator=gen).eval()
    alone.load_state_dict(frozen.state_dict())
    class Head(torch.nn.Module):                                       # the generator's own class head alone
        def __init__(self, f): super().__init__(); self.f = f
        def predict(self, x, n): return self.f.predict(x, n, lam=None)
    row("predicted masks + generator head", ev(Head(frozen)))
    row("predicted masks + frozen CLIP", ev(alone))
    row("predicted masks + frozen CLIP + head (ensemble)", ev(frozen))
    class Crops(torch.nn.Module):                                      # zsseg's classifier: frozen CLIP on masked crops
        def __init__(self, g, lam): super().__init__(); self.g, self.lam = g, lam
        def predict(self, x, n): return self.g.predict(x, n, lam=self.lam)
    row("predicted masks + frozen CLIP on crops (zsseg)", ev(Crops(gen, 0.0)))
    row("predicted masks + crops + head (zsseg ensemble)", ev(Crops(gen, s.model.lam)))

    def oracle_rows(model, tag):
        gt_clip, gt_crops, pred_oracle = SemanticMetric(K), SemanticMetric(K), SemanticMetric(K)
        for i in range(len(sub)):
            smp = sub[i]
            x, lab = smp["image"][None], smp["label"][None]
            gt_clip.update(model.predict_with_masks(x, names, oracle_masks(lab, K))[0], lab[0])
            gt_crops.update(gen.predict_with_masks(x, names, oracle_masks(lab, K))[0], lab[0])
            with torch.no_grad(): _, ml = gen.proposals(x)
            p = oracle_classes(ml.sigmoid(), lab, K)
            pred_oracle.update(torch.einsum("bqk,bqhw->bkhw", p, ml.sigmoid())[0], lab[0])
        row(f"ground-truth masks + {tag}", {k: 100 * v for k, v in gt_clip.compute(unseen=unseen).items() if k in keys})
        row("ground-truth masks + frozen CLIP on crops (zsseg)", {k: 100 * v for k, v in gt_crops.compute(unseen=unseen).items() if k in keys})
        return pred_oracle
    po = oracle_rows(alone, "frozen CLIP")
    row("predicted masks + oracle classes", {k: 100 * v for k, v in po.compute(unseen=unseen).items() if k in keys})
    rows["ground-truth masks + ground-truth classes"] = {k: 100.0 for k in keys}

    t0 = time.time()
    model = train_fisa(s, gen, train, out / "fisa", seed=a.seed)
    fisa_s = time.time() - t0
    adapted_alone = Fisa(dataclasses.replace(model.config, ensemble=False), generator=gen).eval()
    adapted_alone.load_state_dict(model.state_dict())
    row("predicted masks + FISA (adapted CLIP)", ev(adapted_alone))
    row("predicted masks + FISA + head (ensemble)", ev(model))
    def gt_only(m, tag):
        metric = SemanticMetric(K)
        for i in range(len(sub)):
            smp = sub[i]
            metric.update(m.predict_with_masks(smp["image"][None], names, oracle_masks(smp["label"][None], K))[0], smp["label"])
        row(f"ground-truth masks + {tag}", {k: 100 * v for k, v in metric.compute(unseen=unseen).items() if k in keys})
    gt_only(adapted_alone, "FISA (adapted CLIP)")
    info = trainable_parameters(model)
    res = {"fold": a.fold, "seed": a.seed, "val_images": len(sub), "generator_steps": s.generator_train.max_steps,
           "fisa_steps": s.train.max_steps, "generator_seconds": round(gen_s, 1), "fisa_seconds": round(fisa_s, 1),
           "trainable": info, "rows": rows}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print("\n| masks + classifier | mIoU-S | mIoU-U | hIoU | pAcc |\n|---|---|---|---|---|")
    for k, r in rows.items(): print(f"| {k} | {r['mIoU_seen']:.1f} | {r['mIoU_unseen']:.1f} | {r['hIoU']:.1f} | {r['pAcc']:.1f} |")
    print(f"\ngenerator {gen_s:.0f} s, FISA {fisa_s:.0f} s; trainable {info['trainable']:,} ({info['fraction']:.3%} of CLIP)")


if __name__ == "__main__":
    main()
