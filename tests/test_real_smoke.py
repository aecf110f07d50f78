"Real-data smoke: a few CamVid frames (../shared/data), real pretrained encoders, one Fusioner training step, scored, saved, segmented."
import dataclasses

import pytest
import torch

from ovseg.core import TrainConfig, load_config
from ovseg.experiment import run_one
from ovseg.realdata import CamVid, CamVidFusioner, camvid_fold_classes, find_data

CAMVID = find_data("camvid", required=False)
pytestmark = pytest.mark.skipif(CAMVID is None, reason="no CamVid copy: set OVSEG_SHARED_DATA or put it in ../shared/data/camvid")


def test_fusioner_one_step_on_camvid(tmp_path):
    torch.set_num_threads(1)
    fc = load_config("params.yaml", "real").params.fusioner.model          # the real profile's model: Lite0 + MiniLM
    fc = dataclasses.replace(fc, dim=16, depth=1, heads=2)                    # a small head keeps the step cheap
    cf = CamVidFusioner(CAMVID.parent, size=(64, 96), train_label_size=(32, 48), limit=3)
    model, res = run_one(cf.build(fc), cf.task(fc), 2, 0, TrainConfig(max_steps=1, batch_size=4, device="cpu", log_every=1),
                         tmp_path / "run")
    for s in ("val", "test"):
        for k in ("mIoU", "FB_IoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pAcc"):
            assert 0 <= res[f"{s}_{k}"] <= 100, (s, k, res)
    assert res["test_episodes"] > 0
    feats = cf.features(fc)["test"]
    assert feats.dense.shape[-2:] == (4, 6) and feats.labels.shape[-2:] == (360, 480)   # stride 16; labels native
    # training saw no unseen pixel as foreground or background
    tr = cf.task(fc).train(2, 0)
    for k in range(len(tr)):
        raw = cf.features(fc)["train"].labels[tr.pairs[k][0]].long()
        lab = tr[k]["label"]
        assert all((lab[raw == u] == 255).all() for u in camvid_fold_classes(2))
    # the saved run segments a real frame at its own resolution
    from ovseg.segment import segment
    img = CamVid(CAMVID.parent, "test").items[0][0]
    r = segment(str(img), ["road", "car", "tree", "sky", "building", "pedestrian"], model=str(tmp_path / "run" / "model"),
                short_side=64, window=96, stride=96)
    assert r.size == (360, 480) and int(r.label.max()) < 6
