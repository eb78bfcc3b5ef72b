"""A synthetic corpus with planted duplicates at known Jaccard similarities, for the tests and the benchmark.

Distinct documents are sentences of pseudo-words drawn from a Zipf-like vocabulary mixed with English function
words (so they pass the quality rules). A planted near duplicate of a source replaces every occurrence of k
distinct words of the source by fresh words: with n distinct words the word-set Jaccard similarity is
(n - k) / (n + k), so k = n(1 - J)/(1 + J) plants a chosen J; each copy then records its exact Jaccard (measured
with the pipeline's own `dedup.jaccard`). Exact duplicates are copies with different spacing (equal once
normalised). Copies come after their source in the file order, so "first kept" keeps the source."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gigafactory.data.dedup import jaccard

FUNCTION_WORDS = "the of and to in a is that for it with as was on be by at this have from or".split()
SYLLABLES = "ka ri to me na su lo vi de sha ba en or tu mi po ler an is ul ge fa ro ki".split()


@dataclass
class Corpus:
    docs: list[dict[str, str]] = field(default_factory=list)  # {"id", "text"} in file order
    source_of: dict[str, str] = field(default_factory=dict)  # planted copy id -> source id
    jaccard_of: dict[str, float] = field(default_factory=dict)  # planted near-copy id -> exact word-set Jaccard
    exact_ids: set[str] = field(default_factory=set)


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))))
    return sorted(words)


def _document(rng: np.random.Generator, vocab: np.ndarray, cdf: np.ndarray) -> list[str]:
    out: list[str] = []
    for _ in range(int(rng.integers(6, 16))):  # sentences
        n = int(rng.integers(8, 18))
        content = [str(w) for w in vocab[np.searchsorted(cdf, rng.random(n))]]
        for pos in rng.choice(n, size=n // 3, replace=False):
            content[pos] = FUNCTION_WORDS[int(rng.integers(len(FUNCTION_WORDS)))]
        content[0] = content[0].capitalize()
        out.extend(content[:-1] + [content[-1] + "."])
    return out


def _near_copy(rng: np.random.Generator, words: list[str], target: float, fresh: list[str]) -> list[str]:
    distinct = sorted({w.lower().rstrip(".") for w in words})
    k = max(1, round(len(distinct) * (1 - target) / (1 + target)))
    swap = {w: fresh.pop() for w in rng.choice(distinct, size=k, replace=False)}
    out = []
    for w in words:
        core, dot = (w[:-1], ".") if w.endswith(".") else (w, "")
        new = swap.get(core.lower())
        out.append((new.capitalize() if core[:1].isupper() else new) + dot if new else w)
    return out


def make_corpus(seed: int, n_distinct: int = 2000, near_fraction: float = 0.15, exact_fraction: float = 0.05,
                jaccard_range: tuple[float, float] = (0.5, 0.95)) -> Corpus:
    """`n_distinct` documents, plus near copies of `near_fraction` of them at Jaccard drawn uniformly from
    `jaccard_range`, plus exact copies of `exact_fraction`; copies are placed after their sources."""
    rng = np.random.Generator(np.random.PCG64(seed))
    vocab = np.array(_vocabulary(rng, 6000))
    rng.shuffle(vocab)  # Zipf ranks in random order
    probs = 1 / np.arange(1, len(vocab) + 1) ** 0.9
    cdf = np.cumsum(probs / probs.sum())
    cdf[-1] = 1.0
    fresh = [f"zq{i:x}" for i in range(100_000)]  # never in `vocab` (its syllables have no 'z' or 'q')
    rng.shuffle(fresh)
    originals = [(f"doc-{i:06d}", _document(rng, vocab, cdf)) for i in range(n_distinct)]
    slots: list[list[tuple[str, str]]] = [[(i, " ".join(w))] for i, w in originals]
    corpus = Corpus()
    for j, src in enumerate(rng.choice(n_distinct, size=int(n_distinct * near_fraction), replace=False)):
        src_id, words = originals[int(src)]
        target = float(rng.uniform(*jaccard_range))
        text = " ".join(_near_copy(rng, words, target, fresh))
        cid = f"near-{j:06d}"
        corpus.source_of[cid] = src_id
        corpus.jaccard_of[cid] = jaccard(" ".join(words), text)
        later = int(rng.integers(int(src), n_distinct))
        slots[later].append((cid, text))
    for j, src in enumerate(rng.choice(n_distinct, size=int(n_distinct * exact_fraction), replace=False)):
        src_id, words = originals[int(src)]
        cid = f"exact-{j:06d}"
        corpus.source_of[cid] = src_id
        corpus.exact_ids.add(cid)
        later = int(rng.integers(int(src), n_distinct))
        slots[later].append((cid, "  ".join(words) + "\n"))
    corpus.docs = [{"id": i, "text": t} for slot in slots for i, t in slot]
    return corpus


def write_jsonl(corpus: Corpus, folder: Path, files: int = 4, compress_last: bool = True) -> list[Path]:
    """The corpus as `files` JSONL files in order (the last gzip-compressed if `compress_last`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(corpus.docs)), files)
    paths = []
    for k, idx in enumerate(chunks):
        lines = "".join(json.dumps(corpus.docs[i]) + "\n" for i in idx)
        if compress_last and k == files - 1:
            path = folder / f"part-{k:03d}.jsonl.gz"
            path.write_bytes(gzip.compress(lines.encode(), mtime=0))
        else:
            path = folder / f"part-{k:03d}.jsonl"
            path.write_text(lines)
        paths.append(path)
    return paths


def score(corpus: Corpus, dropped: list[dict[str, str]], min_jaccard: float = 0.8) -> dict[str, float]:
    """Recall over planted near copies with Jaccard >= min_jaccard and over exact copies; the fraction of distinct
    documents removed; precision of the duplicate removals (removed copies / all duplicate removals)."""
    dup = {d["id"] for d in dropped if d["reason"] in ("near_duplicate", "exact_duplicate")}
    targets = [c for c, j in corpus.jaccard_of.items() if j >= min_jaccard]
    distinct = [d["id"] for d in corpus.docs if d["id"] not in corpus.source_of]
    below = [c for c, j in corpus.jaccard_of.items() if j < min_jaccard]
    planted = set(corpus.source_of)
    return {
        "near_recall": sum(c in dup for c in targets) / max(1, len(targets)),
        "near_planted": len(targets),
        "exact_recall": sum(c in dup for c in corpus.exact_ids) / max(1, len(corpus.exact_ids)),
        "distinct_removed": sum(d in dup for d in distinct) / max(1, len(distinct)),
        "precision": len(dup & planted) / max(1, len(dup)),
        "below_threshold_removed": sum(c in dup for c in below) / max(1, len(below)),
    }
