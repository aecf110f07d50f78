"""OVSegmentor at CC4M scale, on CPU: what grows with the caption count and what a step costs.

* partners: `partner_arrays` (an inverted index entity -> captions, one sort) at 10k / 100k / 1M synthetic
  captions (1-3 of the official 73 entities each, Zipf-distributed), and the older per-caption candidate list
  (ovseg v1, quadratic) at 2k / 4k / 8k for comparison.
* parse: `EntityParser.named(["ovseg73"])` entities per second on synthetic captions.
* captions: `CaptionList` of a synthetic 100k-row TSV (no images opened): load time and the memory its strings take,
  extrapolated to 4M rows.
* text: MiniLM (frozen, cached) features of 768 distinct strings - one string per forward (v1) vs
  `text_batch` strings per forward (now).
* step: captions/s of one stage-1 training step at the paper's sizes (GroupViT ViT-B/16 224 px, 64 -> 8 groups,
  BERT-base fine-tuned in the step, 256-d, 4096 hidden, contrast + MEC) with random weights.

    python benchmarks/bench_ovsegmentor_scale.py                       # everything (the step at batch 4, 2 steps)
    python benchmarks/bench_ovsegmentor_scale.py --only partners --sizes 10000 100000 1000000
"""
import argparse, os, resource, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OVSEG_PROGRESS", "0")
import numpy as np


def synthetic_entities(n, seed=0):
    from ovseg.ovsegmentor import OVSEG73
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, len(OVSEG73) + 1); p /= p.sum()
    k = rng.integers(1, 4, n)
    flat = rng.choice(len(OVSEG73), k.sum(), p=p)
    off = np.concatenate([[0], np.cumsum(k)])
    return [[OVSEG73[j] for j in flat[off[i]:off[i + 1]]] for i in range(n)]


def partners_v1(entity_lists, partners=10, seed=0):
    "ovseg v1: every (other caption, entity) candidate of each caption listed, then a draw: quadratic."
    by_entity = {}
    for i, ents in enumerate(entity_lists):
        for e in set(ents): by_entity.setdefault(e, []).append(i)
    rng = np.random.default_rng(seed)
    out = []
    for i, ents in enumerate(entity_lists):
        cands = [(j, e) for e in dict.fromkeys(ents) for j in by_entity[e] if j != i]
        pick = rng.permutation(len(cands))[:partners] if cands else []
        out.append([cands[k] for k in sorted(pick)])
    return out


def bench_partners(sizes, old_sizes):
    from ovseg.ovsegmentor import partner_arrays
    print("partner finding (10 partners per caption)")
    for n in sizes:
        ents = synthetic_entities(n)
        t = time.perf_counter(); idx, _, _ = partner_arrays(ents, 10, 0); dt = time.perf_counter() - t
        print(f"  inverted index  {n:>9,} captions: {dt:7.2f} s  ({n / dt:,.0f} captions/s; {(idx[:, 0] >= 0).mean():.3f} with a partner)")
    for n in old_sizes:
        ents = synthetic_entities(n)
        t = time.perf_counter(); partners_v1(ents); dt = time.perf_counter() - t
        print(f"  v1 (quadratic)  {n:>9,} captions: {dt:7.2f} s")


def synthetic_captions(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "a an the two three of on in with and near next to at red small big old young happy".split()
    ents = synthetic_entities(n, seed)
    plural = {"people": "people", "man": "men", "glass": "glasses", "bus": "buses"}
    out = []
    for es in ents:
        toks = list(rng.choice(words, 8))
        for e in es: toks.insert(int(rng.integers(len(toks))), plural.get(e, e + "s") if rng.random() < 0.3 else e)
        out.append(" ".join(toks) + ".")
    return out


def bench_parse(n):
    from ovseg.ovsegmentor import EntityParser
    p, caps = EntityParser.named(["ovseg73"]), synthetic_captions(n)
    t = time.perf_counter(); found = sum(bool(p.entities(c)) for c in caps); dt = time.perf_counter() - t
    print(f"entity parsing (ovseg73): {n / dt:,.0f} captions/s ({found / n:.2f} with an entity) -> 4M captions in {4e6 / (n / dt) / 60:.1f} min")


def bench_captions(n):
    from ovseg.ovsegmentor import CaptionList
    caps = synthetic_captions(n)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "list.tsv"
        f.write_text("".join(f"images/{i:08d}.jpg\t{c}\n" for i, c in enumerate(caps)))
        size = f.stat().st_size
        t = time.perf_counter(); cl = CaptionList(f); dt = time.perf_counter() - t
        mem = cl.files.nbytes() + cl.captions.nbytes()
    as_lists = sum(sys.getsizeof(c) for c in caps) + sum(sys.getsizeof(f"images/{i:08d}.jpg") for i in range(n)) + 16 * n
    print(f"caption list: {n:,} rows ({size / 1e6:.1f} MB) read in {dt:.2f} s; strings held in {mem / 1e6:.1f} MB "
          f"(as Python lists: {as_lists / 1e6:.1f} MB) -> 4M rows: {4e6 / n * dt:.0f} s, {4e6 / n * mem / 1e9:.2f} GB")


def bench_text(n=768, batch=256):
    import torch
    from ovseg.ovsegmentor import OVSegmentorConfig
    from ovseg.encoders import create_text_encoder
    from ovseg.ovsegmentor import OVSegmentor, _TEXT_CACHES
    te = create_text_encoder("minilm")
    caps = synthetic_captions(n, seed=1)
    m = OVSegmentor(OVSegmentorConfig(), text_encoder=te)
    for bs, label in ((1, "one string per forward (v1)"), (batch, f"{batch} strings per forward")):
        _TEXT_CACHES.pop(te, None); m._cache = _TEXT_CACHES.setdefault(te, {}).setdefault("mean", __import__("collections").OrderedDict())
        t = time.perf_counter(); m.cache_text(caps, batch_size=bs); dt = time.perf_counter() - t
        print(f"text features, {label}: {n / dt:,.0f} strings/s ({dt:.2f} s for {n})")


def paper_text_encoder():
    "BERT-base with random weights and MiniLM's tokenizer (the same uncased WordPiece vocabulary as bert-base-uncased)."
    from transformers import BertConfig, BertModel
    from ovseg.encoders import create_text_encoder
    te = create_text_encoder("minilm")
    te.model, te.dim, te.max_length, te.name = BertModel(BertConfig()), 768, 77, "random(bert-base)"
    return te


def bench_step(batch, steps):
    import torch
    from ovseg.ovsegmentor import OVSegmentor, paper_config, OVSEG73
    torch.manual_seed(0)
    cfg = paper_config(vocabulary=["ovseg73"], text_trainable=True, answer_templates=["imagenet80"])
    model = OVSegmentor(cfg, text_encoder=paper_text_encoder()).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    caps = synthetic_captions(batch * (steps + 1), seed=2)
    times = []
    for s in range(steps + 1):
        b = dict(image=torch.rand(batch, 3, 224, 224), caption=caps[s * batch:(s + 1) * batch])
        t = time.perf_counter()
        loss = model.training_loss(b); opt.zero_grad(); loss.backward(); opt.step()
        times.append(time.perf_counter() - t)
    dt = float(np.mean(times[1:]))                 # the first step warms up
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"stage-1 step at paper sizes (ViT-B/16 224 px + BERT-base fine-tuned, {n / 1e6:.0f}M trainable), batch {batch}, "
          f"{torch.get_num_threads()} threads: {dt:.2f} s/step = {batch / dt:.2f} captions/s; losses {model.last_losses}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=["partners", "parse", "captions", "text", "step"])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--old-sizes", type=int, nargs="*", default=[2_000, 4_000, 8_000])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    if "partners" in a.only: bench_partners(a.sizes, a.old_sizes)
    if "parse" in a.only: bench_parse(100_000)
    if "captions" in a.only: bench_captions(100_000)
    if "text" in a.only: bench_text()
    if "step" in a.only: bench_step(a.batch, a.steps)
