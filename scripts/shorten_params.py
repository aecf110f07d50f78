"""Shorten the embedded profile's schedules in a params.yaml (a quick whole-pipeline run, e.g. before/after a refactor;
scripts/compare_outputs.py compares the two runs). Usage: python scripts/shorten_params.py params.yaml (edits it in place).
Never commit the shortened file: its numbers mean nothing."""
import sys, yaml
p = sys.argv[1]
d = yaml.safe_load(open(p))
e = d["profiles"]["embedded"]
e["world"].update(n_train=400, n_val=100)
e["clip"].update(steps=60)
e["train"].update(max_steps=20)
f = e["fusioner"]; f.update(seeds=[0], folds=[0, 1], episodes_per_fold=20, ablation_folds=[0], n_mosaics=8)
f["pairs"] = f["pairs"][:2]; f["depths"] = [0, 1]
e["data"].update(coco20i_episodes=20, mosaic4_count=8)
for k in ("train", "generator_train"): e["fisa"][k]["max_steps"] = 15
e["fisa"].update(seeds=[0], folds=[0])
for k in ("train", "baseline_train", "prompt_train"): e["zsseg"][k]["max_steps"] = 15
e["zsseg"].update(seeds=[0], folds=[0], holdout=40)
o = e["ovsegmentor"]; o["stage1"]["max_steps"] = 10; o["stage2"]["max_steps"] = 4; o.update(train_images=120, holdout=40)
yaml.safe_dump(d, open(p, "w"), sort_keys=False)
