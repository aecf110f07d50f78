"Feature cache: hits, misses, invalidation, concurrent writers, build_cache."
import json, multiprocessing as mp
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
from ovseg.cache import CachedEncoder, FeatureCache, build_cache, cached_features, transform_fingerprint
from ovseg.encoders import create_visual_encoder


@pytest.fixture(scope="module")
def enc():
    return create_visual_encoder("efficientnet-lite0", stride=16, taps=(8, 16))


def _imgs(n, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_hit_miss_and_values(enc, tmp_path):
    c = FeatureCache(tmp_path, enc, transform="t")
    x, ids = _imgs(3), ["a", "b", "c"]
    f = c.features(x, ids)
    assert (c.hits, c.misses, len(c)) == (0, 3, 3)
    ref = enc(x)
    assert torch.allclose(f.dense, ref.dense, atol=1e-6) and set(f.taps) == {8, 16}
    g = c.features(None, ids)
    assert (c.hits, c.misses) == (3, 3)
    assert torch.equal(g.dense, f.dense) and torch.equal(g.global_, f.global_) and torch.equal(g.taps[8], f.taps[8])
    # partial hit: only the new id is computed
    c.features(torch.cat([x[:1], _imgs(1, 5)]), ["a", "d"])
    assert (c.hits, c.misses) == (4, 4)
    with pytest.raises(KeyError): c.features(None, ["zzz"])


def test_invalidation(enc, tmp_path):
    x = _imgs(1)
    FeatureCache(tmp_path, enc, transform={"resize": 64}).features(x, ["a"])
    assert FeatureCache(tmp_path, enc, transform={"resize": 64}).get("a") is not None
    assert FeatureCache(tmp_path, enc, transform={"resize": 96}).get("a") is None         # transform changed
    assert FeatureCache(tmp_path, enc, transform={"resize": 64}).get("b") is None         # other image
    other = create_visual_encoder("efficientnet-lite0", stride=16, taps=(8, 16))
    with torch.no_grad(): other.model._fc.bias.add_(1.0)                                    # weights changed
    other._weights_hash = None
    assert FeatureCache(tmp_path, other, transform={"resize": 64}).get("a") is None
    rnd = create_visual_encoder("random:efficientnet-lite0", stride=16, taps=(8, 16))
    assert FeatureCache(tmp_path, rnd, transform={"resize": 64}).get("a") is None
    assert transform_fingerprint(None) != transform_fingerprint("x")


def test_corrupt_entry_is_a_miss(enc, tmp_path):
    c = FeatureCache(tmp_path, enc)
    c.features(_imgs(1), ["a"])
    c.path("a").write_bytes(b"garbage")
    assert c.get("a") is None
    c.features(_imgs(1), ["a"])
    assert c.get("a") is not None


def _writer(root, seed, out):
    torch.set_num_threads(1)
    from ovseg.cache import FeatureCache
    from ovseg.encoders import create_visual_encoder
    e = create_visual_encoder("efficientnet-lite0", stride=16, taps=(8, 16))
    c = FeatureCache(root, e, transform="t")
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # same images in both
    for _ in range(3):
        for i in range(8):
            c.put(f"img{i}", e(x[i:i + 1]))
    out.put(c.features(None, [f"img{i}" for i in range(8)]).dense.sum().item())


def test_two_concurrent_writers(enc, tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_writer, args=(str(tmp_path), s, q)) for s in (0, 1)]
    for p in ps: p.start()
    for p in ps: p.join(120)
    assert all(p.exitcode == 0 for p in ps)
    a, b = q.get(timeout=5), q.get(timeout=5)
    assert a == pytest.approx(b)
    c = FeatureCache(tmp_path, enc, transform="t")
    assert len(c) == 8
    assert not list(Path(tmp_path).rglob("*.tmp"))                                           # no leftovers
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(c.features(None, [f"img{i}" for i in range(8)]).dense, enc(x).dense, atol=1e-4)


def test_cached_encoder_and_helper(enc, tmp_path):
    ce = CachedEncoder(enc, tmp_path, transform="t")
    assert (ce.stride, ce.dim, ce.name) == (enc.stride, enc.dim, enc.name)
    x = _imgs(2)
    f = ce(x, ["p", "q"]); g = ce(None, ["p", "q"])
    assert torch.equal(f.dense, g.dense) and ce.cache.hits == 2
    assert torch.allclose(ce(x).dense, f.dense, atol=1e-6)                                   # no ids: plain encoder
    h = cached_features(enc, x, ["p", "q"], tmp_path, transform="t")
    assert torch.equal(h.dense, f.dense)
    f16 = FeatureCache(tmp_path / "h", enc, dtype=torch.float16)
    f16.features(x, ["p", "q"])
    assert torch.allclose(f16.features(None, ["p", "q"]).dense, f.dense, atol=1e-2)


def test_build_cache(enc, tmp_path):
    ds = [dict(image=torch.rand(3, 64, 64), id=f"i{k}") for k in range(5)] + [dict(image=torch.rand(3, 32, 48), id="odd")]
    s = build_cache(ds, enc, tmp_path, transform="t", batch_size=4)
    assert (s["images"], s["computed"], s["already_cached"]) == (6, 6, 0)
    assert json.loads((tmp_path / "summary.json").read_text())["encoder"] == enc.identity
    s2 = build_cache(ds, enc, tmp_path, transform="t", batch_size=4)
    assert (s2["computed"], s2["already_cached"]) == (0, 6)
    assert FeatureCache(tmp_path, enc, transform="t").get("odd").dense.shape == (1, 112, 2, 3)
