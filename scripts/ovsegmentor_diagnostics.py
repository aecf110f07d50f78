#!/usr/bin/env python
"""Why does OVSegmentor not segment the embedded world yet? Train one stage-1 configuration on the
world's captions and print, as one JSON line, what separates "groups are wrong" from "classes are
wrong" (docs/ovsegmentor.md, "Does it learn?"):

- mIoU: the real prediction (31 classes incl. background; top-k and bg_thresh chosen on the last
  300 training images, as the DVC stage does), and the all-background floor;
- colour_mIoU: the same prediction and labels with the 30 classes merged into their 6 colours;
- group_oracle_mIoU: every group takes its majority ground-truth class (the grouping's ceiling);
- image-level recall: the share of an image's classes (and of its colours / shapes) among the
  top 3 classes of the pooled image embedding (chance on the val split: 10.4% / 43.6% / 50.4%);
- group_usage: the share of patches each group takes (a collapse shows as one large share).

`--steps 0` scores the initialisation. Runs from the repository root after `dvc repro world
embedded_clip` (it reads outputs/world and outputs/embedded_clip); no output is written except the
run folder under --out.
    python scripts/ovsegmentor_diagnostics.py [--setting contrast|mec|cmc_random] [--steps 600]
        [--lr 2e-3] [--backbone-lr LR] [--image-size 64] [--train-images 1000] [--seed 0] [--out DIR]
"""
import argparse, dataclasses, json, os, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("OVSEG_PROGRESS", "0")
import torch, torch.nn.functional as F


@torch.no_grad()
def diagnose(model, world, names, val_x, val_y, held, cfg) -> dict:
    from ovseg.metrics import SemanticMetric
    from ovseg.ovsegmentor import _combine, choose_thresholds
    S, K, n_col = cfg.params.ovsegmentor, len(names), len(cfg.params.world.colours)
    att = torch.tensor(world.attributes)                             # (classes, 3): colour, pattern, shape ids
    colour = torch.full((256,), 255, dtype=torch.long)               # label -> colour label (background 0, ignore 255)
    colour[0] = 0; colour[1:1 + len(att)] = 1 + att[:, 0]
    chosen = choose_thresholds(model, held, S.bg_grid, S.topk_grid)  # writes top-k and bg_thresh into model.config
    model.eval()
    text = model.class_embeddings(names[1:])
    real, col, oracle, floor = SemanticMetric(K), SemanticMetric(n_col + 1), SemanticMetric(K), SemanticMetric(K)
    recall = {"classes": [], "colours": [], "shapes": []}
    usage = torch.zeros(model.config.groups)
    for s in range(0, len(val_x), 100):
        x, y = val_x[s:s + 100], val_y[s:s + 100].long()
        parts = model._parts(x, text)                                 # one encoder pass serves every measure below
        g = parts["group"]
        G = parts["aff"].shape[1]
        counts = torch.einsum("bghw,bkhw->bgk", F.one_hot(g, G).permute(0, 3, 1, 2).float(),
                              F.one_hot(y.clamp(0, K - 1), K).permute(0, 3, 1, 2).float())
        oracle.update(torch.gather(counts.argmax(-1), 1, g.flatten(1)).view_as(g), y)
        usage += F.one_hot(g.flatten(), G).float().sum(0)
        pred = _combine(parts, model.config.topk, model.config.bg_thresh, model.config.inference_rule).clamp_min(1e-8).argmax(1)   # = model.predict(x, names)
        real.update(pred, y); col.update(colour[pred], colour[y]); floor.update(torch.zeros_like(y), y)
        top = parts["img"].topk(3, dim=1).indices                      # class ids (no background)
        for b in range(len(x)):
            present = torch.tensor(sorted(set(y[b].unique().tolist()) - {0, 255})) - 1
            if not len(present): continue
            for key, a in (("classes", None), ("colours", 0), ("shapes", 2)):
                p, t = (set(present.tolist()), set(top[b].tolist())) if a is None else (set(att[present, a].tolist()), set(att[top[b], a].tolist()))
                recall[key].append(len(p & t) / len(p))
    pct = lambda m: round(100 * m.compute()["mIoU"], 2)
    return dict(mIoU=pct(real), all_background_mIoU=pct(floor), colour_mIoU=pct(col), group_oracle_mIoU=pct(oracle),
                **{f"image_recall_{k}": round(100 * sum(v) / len(v), 1) for k, v in recall.items()},
                topk=chosen["topk"], bg_thresh=chosen["bg_thresh"],
                group_usage=[round(float(u), 2) for u in usage / usage.sum()], logit_scale=round(float(model.scale), 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="contrast", help="stage-1 setting of ovseg.ovsegmentor.build_model (cmc_random: MEC from random init, row (d)'s stage 1)")
    ap.add_argument("--steps", type=int, default=600, help="stage-1 optimiser steps (0: score the initialisation)")
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default: params.yaml ovsegmentor.stage1.lr)")
    ap.add_argument("--backbone-lr", type=float, default=None, help="own lr for the initialised ViT blocks (0 freezes them)")
    ap.add_argument("--image-size", type=int, default=None, help="model input size (the world's images are resized)")
    ap.add_argument("--train-images", type=int, default=None, help="caption images (default: params.yaml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run folder (checkpoint, train_log.tsv); default: a new temporary folder")
    a = ap.parse_args()

    from ovseg.core import ParamGroupConfig, load_config, setup_runtime
    from ovseg.embedded import WorldCaptions, WorldSemantic, get_world
    from ovseg.encoders import create_text_encoder
    from ovseg.experiment import train_config
    from ovseg.ovsegmentor import EntityCaptions, build_model, train_stage
    cfg = load_config("params.yaml", "embedded")
    device, _ = setup_runtime(cfg)
    S = cfg.params.ovsegmentor
    world = get_world(cfg)
    names = ["background"] + list(world.class_names)
    caps = WorldCaptions(world, "train")
    n = len(caps)
    n_fit = min(a.train_images or S.train_images or n - S.holdout, n - S.holdout)
    captions = [world.split("train")[i]["caption"] for i in range(n)]
    data = EntityCaptions(torch.utils.data.Subset(caps, range(n_fit)), world.class_names, partners=S.partners, seed=cfg.seed,
                          captions=captions[:n_fit])
    held_ds = WorldSemantic(world, "train", background="class")
    held = torch.utils.data.Subset(held_ds, range(n - S.holdout, n))
    held.split, held.class_names = "train", held_ds.class_names
    val = WorldSemantic(world, "val", background="class")
    val_x = torch.stack([val[i]["image"] for i in range(len(val))])
    val_y = torch.stack([val[i]["label"] for i in range(len(val))])
    torch.manual_seed(a.seed)
    over = {"image_size": a.image_size} if a.image_size else {}
    model = build_model(S, a.setting, vocabulary=world.class_names, text_encoder=create_text_encoder(S.model.text), **over).to(device)
    model.cache_text(captions[:n_fit] + [S.model.class_template.format(c) for c in names[1:]])
    t0 = time.time()
    if a.steps > 0:
        st = dataclasses.replace(S.stage1, max_steps=a.steps, warmup_steps=max(1, a.steps // 20), seed=a.seed, log_every=max(1, a.steps // 8),
                                 **({"lr": a.lr, "min_lr": a.lr / 4} if a.lr else {}))
        if a.backbone_lr is not None:
            bb = ["visual.patch_embed", "visual.pos_embed", "visual.ln_pre", "visual.stage1", "visual.stage2"]
            st = dataclasses.replace(st, groups={"backbone": ParamGroupConfig(prefixes=bb, lr=a.backbone_lr, min_lr=a.backbone_lr / 4,
                                                                             warmup_steps=st.warmup_steps, weight_decay=st.weight_decay,
                                                                             weight_decay_end=st.weight_decay_end)})
        tc = train_config(dataclasses.replace(cfg, params=dataclasses.replace(cfg.params, train=st)), device)
        train_stage(model, data, tc, a.out or tempfile.mkdtemp(prefix="ovs_diag_"), S.crop_scale)
    res = diagnose(model, world, names, val_x, val_y, held, cfg)
    print(json.dumps({"setting": a.setting, "steps": a.steps, "lr": a.lr or S.stage1.lr, "backbone_lr": a.backbone_lr,
                      "image_size": model.config.image_size, "train_images": n_fit, "seed": a.seed,
                      "train_seconds": round(time.time() - t0, 1), **res}))


if __name__ == "__main__":
    main()
