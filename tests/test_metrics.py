"Hand-computed and reference checks of ovseg.metrics (mmseg/detectron2-0.6, HSNet, zsseg conventions)."
import math, os, tempfile

import numpy as np
import pytest
import torch

from ovseg.metrics import (EpisodicMetric, SemanticMetric, confusion_matrix, harmonic_mean,
                           reduce_zero_label)

torch.set_num_threads(1)


def d2_reference(pred, gt, K, ignore=255):
    "detectron2 0.6 SemSegEvaluator, transcribed with numpy."
    conf = np.zeros((K + 1, K + 1), dtype=np.int64)
    for p, g in zip(pred, gt):
        g = g.copy(); g[g == ignore] = K
        conf += np.bincount((K + 1) * p.reshape(-1) + g.reshape(-1), minlength=conf.size).reshape(conf.shape)
    acc = np.full(K, np.nan); iou = np.full(K, np.nan)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(float)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    iou_valid = (pos_gt + pos_pred) > 0
    union = pos_gt + pos_pred - tp
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    return dict(mIoU=np.nanmean(iou), mAcc=np.nanmean(acc), pAcc=tp.sum() / pos_gt.sum(), IoU=iou)


def test_hand_computed_and_empty_class():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    r = SemanticMetric(4).update(pred, gt).compute()
    # class 0: TP1 FP1 FN1 -> 1/3; class 1: TP2 FP1 -> 2/3; class 2: TP1 FN1 -> 1/2; class 3 only
    # predicted on ignored pixels -> absent from both -> NaN, excluded
    np.testing.assert_allclose(r["IoU"][:3], [1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(r["IoU"][3]) and r["valid"] == [True, True, True, False]
    assert r["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r["pAcc"] == pytest.approx(4 / 6)
    assert r["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_predicted_but_absent_counts_zero():
    r = SemanticMetric(3).update(torch.tensor([0, 0, 2, 2]), torch.tensor([0, 0, 0, 0])).compute()
    assert r["IoU"][2] == 0.0 and math.isnan(r["IoU"][1])
    assert r["mIoU"] == pytest.approx((0.5 + 0.0) / 2)
    assert math.isnan(r["Acc"][2])          # no ground truth: left out of mAcc
    assert r["mAcc"] == pytest.approx(0.5)


def test_all_ignore_images():
    m = SemanticMetric(3)
    m.update(torch.full((2, 4, 4), 1), torch.full((2, 4, 4), 255))
    assert int(m.confmat.sum()) == 0
    r = m.compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["pAcc"])
    # an all-ignore image adds nothing to a real one
    m.update(torch.tensor([[1, 1]]), torch.tensor([[1, 2]]))
    r = m.compute()
    assert r["IoU"][1] == 0.5 and r["IoU"][2] == 0.0 and r["mIoU"] == pytest.approx(0.25)


def test_matches_detectron2_reference_random():
    rng = np.random.default_rng(0)
    K = 7
    preds = [rng.integers(0, K - 1, (13, 17)) for _ in range(5)]   # class K-1 never predicted
    gts = [rng.integers(0, K + 1, (13, 17)) for _ in range(5)]
    for g in gts: g[g >= K - 2] = np.where(rng.random(g[g >= K - 2].shape) < .5, 255, 0)  # K-2, K-1 absent
    m = SemanticMetric(K)
    for p, g in zip(preds, gts): m.update(torch.from_numpy(p), torch.from_numpy(g))
    r, ref = m.compute(), d2_reference(preds, gts, K)
    np.testing.assert_allclose(r["IoU"], ref["IoU"])
    for k in ("mIoU", "mAcc", "pAcc"): assert r[k] == pytest.approx(ref[k])


def test_numpy_input_and_logits():
    r1 = SemanticMetric(3).update(np.array([[0, 2]]), np.array([[0, 1]], dtype=np.uint8)).compute()
    logits = torch.zeros(1, 3, 1, 2); logits[0, 0, 0, 0] = 1; logits[0, 2, 0, 1] = 1
    r2 = SemanticMetric(3).update(logits, torch.tensor([[[0, 1]]])).compute()
    assert r1["IoU"] == r2["IoU"] or np.allclose(r1["IoU"], r2["IoU"], equal_nan=True)


def test_out_of_range_labels_raise():
    with pytest.raises(ValueError, match="label value 7"):
        SemanticMetric(3).update(torch.tensor([0]), torch.tensor([7]))
    with pytest.raises(ValueError, match="predicted class 5"):
        SemanticMetric(3).update(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(3, 3), 3)


def test_merge_equals_single_pass():
    g = torch.Generator().manual_seed(1)
    P = torch.randint(0, 6, (8, 9, 9), generator=g); T = torch.randint(0, 7, (8, 9, 9), generator=g)
    T[T == 6] = 255
    whole = SemanticMetric(6).update(P, T)
    parts = [SemanticMetric(6).update(P[i:i + 3], T[i:i + 3]) for i in range(0, 8, 3)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert torch.equal(merged.confmat, whole.confmat)
    assert merged.compute() == whole.compute()
    with pytest.raises(ValueError): SemanticMetric(5).merge(whole)


def test_gzsl_seen_unseen_hiou():
    gt = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    pred = torch.tensor([0, 0, 1, 0, 2, 3, 3, 3])
    r = SemanticMetric(4).update(pred, gt).compute(unseen=[2, 3])
    # IoU0 = 2/3, IoU1 = 1/2, IoU2 = 1/2, IoU3 = 2/3
    S, U = (2 / 3 + 1 / 2) / 2, (1 / 2 + 2 / 3) / 2
    assert r["mIoU_seen"] == pytest.approx(S) and r["mIoU_unseen"] == pytest.approx(U)
    assert r["hIoU"] == pytest.approx(2 * S * U / (S + U))
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(0.4, 0.6) == pytest.approx(0.48)


def test_reduce_zero_label():
    lab = torch.tensor([[0, 1, 2], [150, 255, 0]], dtype=torch.uint8)
    assert reduce_zero_label(lab).tolist() == [[255, 0, 1], [149, 255, 255]]
    assert reduce_zero_label(lab).dtype == torch.int64


def hsnet_reference(episodes, class_ids, n):
    "HSNet's Evaluator + AverageMeter, per episode with torch.histc, as in its repository."
    ib, ub = torch.zeros(2, n), torch.zeros(2, n)
    for pred, gt, c in episodes:
        pred, gt = pred.clone().float(), gt.clone().float()
        ign = gt == 255
        pred[ign] = 255; gt[ign] = 255
        inter = pred[pred == gt]
        ai = torch.histc(inter, bins=2, min=0, max=1)
        ap = torch.histc(pred, bins=2, min=0, max=1); ag = torch.histc(gt, bins=2, min=0, max=1)
        ib[:, c] += ai; ub[:, c] += ap + ag - ai
    iou = ib / torch.max(torch.stack([ub, torch.ones_like(ub)]), dim=0)[0]
    idx = torch.tensor(class_ids)
    miou = iou.index_select(1, idx)[1].mean()
    fb = (ib.index_select(1, idx).sum(1) / ub.index_select(1, idx).sum(1)).mean()
    return float(miou), float(fb)


def test_episodic_matches_hsnet_reference():
    g = torch.Generator().manual_seed(2)
    eps = []
    for i in range(12):
        gt = (torch.rand(10, 11, generator=g) < .3).long()
        gt[torch.rand(10, 11, generator=g) < .1] = 255
        pred = (torch.rand(10, 11, generator=g) < .35).long()
        eps.append((pred, gt, [5, 6, 7, 8, 9][i % 5]))
    m = EpisodicMetric([5, 6, 7, 8, 9], num_classes=20)
    # batched updates of 4 episodes with mixed classes
    for i in range(0, 12, 4):
        chunk = eps[i:i + 4]
        m.update(torch.stack([e[0] for e in chunk]), torch.stack([e[1] for e in chunk]), [e[2] for e in chunk])
    r = m.compute()
    miou, fb = hsnet_reference(eps, [5, 6, 7, 8, 9], 20)
    assert r["mIoU"] == pytest.approx(miou) and r["FB_IoU"] == pytest.approx(fb)
    assert r["episodes"] == 12


def test_episodic_hand_and_errors():
    m = EpisodicMetric([0, 1])
    m.update(torch.tensor([[1, 1], [0, 0]]).bool(), torch.tensor([[1, 0], [0, 255]]), 0)
    r = m.compute()
    # class 0: fg I1 U2 -> .5; class 1 has no episodes -> 0 (HSNet max(union,1)); bg I1 U2
    assert r["IoU"] == {0: 0.5, 1: 0.0} and r["mIoU"] == pytest.approx(0.25)
    assert r["FB_IoU"] == pytest.approx(0.5)
    with pytest.raises(TypeError, match="sigmoid"): m.update(torch.rand(2, 2), torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match="0 \\(background\\)"): m.update(torch.zeros(2, 2).long(), torch.full((2, 2), 3), 0)
    with pytest.raises(ValueError, match="0 \\(background\\)"): m.update(torch.zeros(2, 2).long(), torch.full((2, 2), -1), 0)
    with pytest.raises(ValueError, match="binary"): m.update(torch.full((2, 2), 2), torch.zeros(2, 2).long(), 0)
    # uint8 labels and bool predictions (what CamVid episodes carry) count exactly as int64 ones
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2, (3, 5, 7), generator=g); t[:, 0] = 255; p = torch.rand(3, 5, 7, generator=g) > .5
    u8 = EpisodicMetric([0, 1, 2]).update(p, t.to(torch.uint8), [0, 1, 2]); i64 = EpisodicMetric([0, 1, 2]).update(p.long(), t, [0, 1, 2])
    assert torch.equal(u8.inter, i64.inter) and torch.equal(u8.union, i64.union)
    a, b = EpisodicMetric([0, 1]), EpisodicMetric([0, 1])
    a.update(torch.tensor([[1, 0]]), torch.tensor([[1, 1]]), 0); b.update(torch.tensor([[1, 1]]), torch.tensor([[0, 1]]), 1)
    whole = EpisodicMetric([0, 1]).update(torch.tensor([[[1, 0]], [[1, 1]]]), torch.tensor([[[1, 1]], [[0, 1]]]), [0, 1])
    assert a.merge(b).compute() == whole.compute()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    g = torch.Generator().manual_seed(3)
    P, T = torch.randint(0, 5, (4, 32, 32), generator=g), torch.randint(0, 6, (4, 32, 32), generator=g)
    T[T == 5] = 255
    cpu = SemanticMetric(5).update(P, T)
    gpu = SemanticMetric(5, device="cuda").update(P.cuda(), T.cuda())
    assert gpu.confmat.device.type == "cuda" and torch.equal(cpu.confmat, gpu.confmat.cpu())
    assert cpu.compute() == gpu.compute()
    e1 = EpisodicMetric([0, 1]).update((P[:, 0] > 2), (T[:, 0] == 1).long(), [0, 1, 0, 1])
    e2 = EpisodicMetric([0, 1], device="cuda").update((P[:, 0] > 2).cuda(), (T[:, 0] == 1).long().cuda(), [0, 1, 0, 1])
    assert e1.compute() == e2.compute()


def _ddp_worker(rank, world, init_file, P, T, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = SemanticMetric(5).update(P[rank::world], T[rank::world]).all_reduce()
        e = EpisodicMetric([1, 2], num_classes=5).update((P[rank::world] > 2), (T[rank::world] == 1).long(),
                                                          [1, 2][rank]).all_reduce()
        torch.save((m.confmat, e.compute()), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_all_reduce_two_gloo_processes():
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available(): pytest.skip("torch.distributed not available")
    g = torch.Generator().manual_seed(4)
    P, T = torch.randint(0, 5, (6, 8, 8), generator=g), torch.randint(0, 6, (6, 8, 8), generator=g)
    T[T == 5] = 255
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), P, T, out), nprocs=2, join=True)
        results = [torch.load(f"{out}.{r}") for r in range(2)]
    whole = SemanticMetric(5).update(P, T)
    ep = EpisodicMetric([1, 2], num_classes=5)
    ep.update((P[0::2] > 2), (T[0::2] == 1).long(), 1).update((P[1::2] > 2), (T[1::2] == 1).long(), 2)
    for cm, er in results:
        assert torch.equal(cm, whole.confmat)
        assert er == ep.compute()


# --- panoptic quality -------------------------------------------------------------------------

from ovseg.metrics import PanopticMetric, panoptic_ids


def panopticapi_reference(pairs, categories):
    "cocodataset/panopticapi pq_compute_single_core + pq_average, transcribed with numpy (VOID = 0, OFFSET)."
    stat = {c: dict(tp=0, fp=0, fn=0, iou=0.0) for c in categories}
    for pan_gt, gt_segms, pan_pred, pred_segms in pairs:
        gt_segms = {k: dict(v, area=int((pan_gt == k).sum())) for k, v in gt_segms.items()}
        pred_segms = {k: dict(v, area=int((pan_pred == k).sum())) for k, v in pred_segms.items()}
        OFFSET = 256 * 256 * 256
        lab, cnt = np.unique(pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64), return_counts=True)
        gt_pred = {(int(l) // OFFSET, int(l) % OFFSET): int(c) for l, c in zip(lab, cnt)}
        gt_matched, pred_matched = set(), set()
        for (g, p), inter in gt_pred.items():
            if g not in gt_segms or p not in pred_segms or gt_segms[g]["iscrowd"] == 1: continue
            if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]: continue
            union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - gt_pred.get((0, p), 0)
            if inter / union > 0.5:
                stat[gt_segms[g]["category_id"]]["tp"] += 1; stat[gt_segms[g]["category_id"]]["iou"] += inter / union
                gt_matched.add(g); pred_matched.add(p)
        crowd = {}
        for g, info in gt_segms.items():
            if g in gt_matched or info["area"] == 0: continue
            if info["iscrowd"] == 1: crowd[info["category_id"]] = g; continue
            stat[info["category_id"]]["fn"] += 1
        for p, info in pred_segms.items():
            if p in pred_matched or info["area"] == 0: continue
            inter = gt_pred.get((0, p), 0)
            if info["category_id"] in crowd: inter += gt_pred.get((crowd[info["category_id"]], p), 0)
            if inter / info["area"] > 0.5: continue
            stat[info["category_id"]]["fp"] += 1
    out = {}
    for name, isthing in (("", None), ("_th", True), ("_st", False)):
        pq = sq = rq = n = 0
        for c, cinfo in categories.items():
            if isthing is not None and cinfo["isthing"] != isthing: continue
            s = stat[c]
            if s["tp"] + s["fp"] + s["fn"] == 0: continue
            n += 1
            pq += s["iou"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
            sq += s["iou"] / s["tp"] if s["tp"] else 0
            rq += s["tp"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
        out[f"PQ{name}"], out[f"SQ{name}"], out[f"RQ{name}"] = (pq / n, sq / n, rq / n) if n else (math.nan,) * 3
    return out


def test_panoptic_hand_computed_tp_fp_fn():
    # gt: A (class 0) = top row, B (class 1) = bottom row, 4 px each.
    # pred a (class 0) = 3 px of A + 1 px of B: IoU 3 / (4 + 4 - 3) = 0.6 > 0.5, a TP.
    # pred b (class 1) = 1 px of A + 2 px of B: IoU 2 / (3 + 4 - 2) = 0.4, an FP of class 1; B stays an FN.
    gt = torch.tensor([[1, 1, 1, 1], [2, 2, 2, 2]])
    pred = torch.tensor([[1, 1, 1, 2], [1, 2, 2, 0]])
    r = PanopticMetric(2, thing_classes=[0]).update(pred, [0, 1], gt, [0, 1]).compute()
    assert r["PQ_per_class"] == pytest.approx([0.6, 0.0])          # 0.6 / 1; 0 / (0 + 0.5 + 0.5)
    assert (r["PQ"], r["SQ"], r["RQ"]) == pytest.approx((0.3, 0.3, 0.5))
    assert (r["PQ_th"], r["PQ_st"], r["n_th"], r["n_st"]) == pytest.approx((0.6, 0.0, 1, 1))


def test_panoptic_void_leaves_the_union_and_mostly_void_predictions_are_ignored():
    gt = torch.tensor([[1, 1, 0, 0, 0]])                   # one segment (class 0) and three void pixels
    one = torch.tensor([[1, 1, 1, 0, 0]])                  # covers the segment + 1 void px: IoU 2/(3+2-2-1) = 1
    r = PanopticMetric(1).update(one, [0], gt, [0]).compute()
    assert r["PQ"] == pytest.approx(1.0)
    two = torch.tensor([[1, 1, 2, 2, 2]])                  # segment 2 lies entirely on void: not a false positive
    m = PanopticMetric(1).update(two, [0, 0], gt, [0])
    assert (m.tp.item(), m.fp.item(), m.fn.item()) == (1, 0, 0)
    half = torch.tensor([[2, 1, 1, 1, 0]])                 # pred 1: 1 px of the segment + 2 void -> ignored;
    m = PanopticMetric(1).update(half, [0, 0], gt, [0])    # pred 2: 1 of 2 segment px, IoU 0.5 (not > 0.5): FP
    assert (m.tp.item(), m.fp.item(), m.fn.item()) == (0, 1, 1)


def test_panoptic_crowd_regions():
    gt = torch.tensor([[1, 1, 2, 2, 2, 2]])                # 1: class 0; 2: crowd region of class 1
    crowd = {1: 0, 2: 1}
    pred = torch.tensor([[1, 1, 2, 2, 2, 3]])              # 2 (class 1) on the crowd: ignored; 3 (class 0) on it: FP
    m = PanopticMetric(2).update(pred, {1: 0, 2: 1, 3: 0}, gt, {1: 0, 2: 1}, gt_crowd=crowd)
    assert (m.tp.tolist(), m.fp.tolist(), m.fn.tolist()) == ([1, 0], [1, 0], [0, 0])   # the crowd is never an FN
    r = m.compute()
    assert r["n"] == 1 and r["PQ"] == pytest.approx(1.0 / 1.5)


def test_panoptic_matches_the_panopticapi_transcription():
    rng = np.random.default_rng(0)
    cats = {0: {"isthing": True}, 1: {"isthing": True}, 2: {"isthing": False}, 3: {"isthing": False}}
    metric, pairs = PanopticMetric(4, thing_classes=[0, 1]), []
    for _ in range(30):
        # blocky maps so that matches (IoU > 0.5) happen as well as misses
        g = np.kron(rng.integers(0, 5, (3, 3)), np.ones((4, 4), np.int64))
        p = np.where(rng.random(g.shape) < 0.8, g, rng.integers(0, 6, g.shape))
        gseg = {int(s): {"category_id": int(rng.integers(4)), "iscrowd": int(rng.random() < 0.15)} for s in np.unique(g) if s}
        pseg = {int(s): {"category_id": gseg[s]["category_id"] if s in gseg and rng.random() < 0.7 else int(rng.integers(4)),
                         "iscrowd": 0} for s in np.unique(p) if s}
        metric.update(p, {k: v["category_id"] for k, v in pseg.items()}, g, {k: v["category_id"] for k, v in gseg.items()},
                      gt_crowd={k: bool(v["iscrowd"]) for k, v in gseg.items()})
        pairs.append((g, gseg, p, pseg))
    ref, ours = panopticapi_reference(pairs, cats), metric.compute()
    assert int(metric.tp.sum()) > 5 and int(metric.fp.sum()) > 5 and int(metric.fn.sum()) > 5
    for k, v in ref.items(): assert ours[k] == pytest.approx(v), k


def test_panoptic_bad_input_and_merge():
    m = PanopticMetric(3)
    with pytest.raises(ValueError, match="segment id 2 has no class"): m.update(torch.tensor([[1, 2]]), [0], torch.tensor([[1, 1]]), [0])
    with pytest.raises(ValueError, match="class 5 is outside"): m.update(torch.tensor([[1, 1]]), [5], torch.tensor([[1, 1]]), [0])
    with pytest.raises(ValueError, match="!="): m.update(torch.tensor([[1]]), [0], torch.tensor([[1, 1]]), [0])
    with pytest.raises(ValueError, match="overlap"): panoptic_ids(torch.ones(2, 2, 2, dtype=torch.bool), [0, 1])
    a = PanopticMetric(3).update(torch.tensor([[1, 1]]), [0], torch.tensor([[1, 1]]), [0])
    b = PanopticMetric(3).update(torch.tensor([[1, 2]]), [1, 2], torch.tensor([[1, 1]]), [1])
    both = PanopticMetric(3).update(torch.tensor([[1, 1]]), [0], torch.tensor([[1, 1]]), [0]) \
                            .update(torch.tensor([[1, 2]]), [1, 2], torch.tensor([[1, 1]]), [1])
    assert a.merge(b).compute()["PQ_per_class"] == pytest.approx(both.compute()["PQ_per_class"], nan_ok=True)
    assert math.isnan(PanopticMetric(2).compute()["PQ"])   # nothing scored: undefined, not 0
