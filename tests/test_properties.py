"""Property-based tests (Hypothesis) of the two functions every number and every image passes through:
the semantic metrics against a plain NumPy reference, and `read_image` on random modes and dtypes."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from ovseg.images import ImageError, read_image
from ovseg.metrics import SemanticMetric

torch.set_num_threads(1)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _reference(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> dict:
    "mmseg / detectron2: one confusion matrix, IoU over classes present in label or prediction, pAcc."
    keep = target != ignore
    t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(float); union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"mIoU": np.nanmean(iou) if (union > 0).any() else np.nan,
            "pAcc": tp.sum() / cm.sum() if cm.sum() else np.nan, "confmat": cm}


@st.composite
def label_pairs(draw):
    k = draw(st.integers(1, 12))
    ignore = draw(st.sampled_from([255, -1, k + 3]))
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9))
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.int32, np.int64])) if ignore >= 0 else \
        draw(st.sampled_from([np.int16, np.int32, np.int64]))
    if ignore > np.iinfo(dtype).max: ignore = 255 if dtype != np.uint8 or k < 255 else ignore
    values = st.one_of(st.integers(0, k - 1), st.just(ignore))
    target = draw(hnp.arrays(dtype, shape, elements=values))
    pred = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, k - 1)))
    if draw(st.booleans()):                      # a strided view (a flip), as TTA produces
        target, pred = target[..., ::-1], pred[..., ::-1]
    return pred, target, k, ignore


@FAST
@given(label_pairs())
def test_semantic_metric_matches_numpy_reference(case):
    pred, target, k, ignore = case
    m = SemanticMetric(k, ignore_index=ignore)
    m.update(pred, target)
    ref = _reference(pred, target, k, ignore)
    np.testing.assert_array_equal(m.confmat.numpy(), ref["confmat"])
    res = m.compute()
    for key in ("mIoU", "pAcc"):
        a, b = res[key], ref[key]
        assert (np.isnan(a) and np.isnan(b)) or abs(a - b) < 1e-12, (key, a, b)


@FAST
@given(label_pairs(), st.integers(1, 4))
def test_semantic_metric_logits_equal_their_argmax(case, scale):
    pred, target, k, ignore = case
    logits = torch.nn.functional.one_hot(torch.as_tensor(pred.copy()), k).movedim(-1, 0 if pred.ndim == 2 else 1).float() * scale
    if pred.ndim == 2: a = SemanticMetric(k, ignore_index=ignore).update(logits, target)
    else: a = SemanticMetric(k, ignore_index=ignore).update(logits, target)
    b = SemanticMetric(k, ignore_index=ignore).update(pred, target)
    assert torch.equal(a.confmat, b.confmat)


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["uint8", "uint16", "bool", "float", "pil"]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    ch = draw(st.sampled_from([None, 1, 3, 4]))
    shape = (h, w) if ch is None else (h, w, ch)
    if kind == "uint8": return draw(hnp.arrays(np.uint8, shape))
    if kind == "uint16": return draw(hnp.arrays(np.uint16, shape))
    if kind == "bool": return draw(hnp.arrays(np.bool_, shape))
    if kind == "float": return draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "LA", "I;16", "I", "F", "1"]))
    if mode == "F": return Image.new(mode, (w, h), draw(st.floats(0, 1)))   # float images hold [0, 1] (else an error)
    return Image.new(mode, (w, h), draw(st.integers(0, 255)) if mode not in ("RGB", "RGBA") else None)


@FAST
@given(images())
def test_read_image_gives_rgb_uint8_of_the_same_size(img):
    out = read_image(img)
    h, w = (img.size[1], img.size[0]) if isinstance(img, Image.Image) else img.shape[:2]
    assert out.mode == "RGB" and out.size == (w, h)
    a = np.asarray(out)
    assert a.dtype == np.uint8 and a.shape == (h, w, 3)


@FAST
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, max_side=10)))
def test_read_image_keeps_uint8_grey_values_exactly(a):
    out = np.asarray(read_image(a))
    assert (out == a[..., None]).all()


@FAST
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=10),
                  elements=st.one_of(st.floats(0, 1, width=32), st.just(np.nan), st.just(np.inf))))
def test_read_image_never_turns_nan_into_black(a):
    if np.isfinite(a).all(): read_image(a)
    else:
        with pytest.raises(ImageError): read_image(a)
