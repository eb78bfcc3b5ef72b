"""Exact and near-duplicate detection.

Exact: a 128-bit BLAKE2b digest of the final (normalised, scrubbed) text; the first document in canonical order
is kept, later ones are dropped as `exact_duplicate` with `duplicate_of` its id.

Near: MinHash over the document's *set of words* (lower-cased `\\w+` tokens; `shingle` > 1 uses word n-grams) and
LSH banding. Defaults: 120 hash functions in 20 bands of 6 rows. Two documents of Jaccard similarity s share at
least one band with probability 1 - (1 - s^6)^20: 99.8% at s = 0.8, 92% at 0.7, 43% at 0.55, 8% at 0.4, so the
banding's threshold (1/20)^(1/6) ≈ 0.61 sits below the target. Every candidate pair is then verified: the
fraction of equal signature values estimates s with a standard error of about sqrt(s(1-s)/120) ≈ 0.037 at 0.8,
and a pair counts as a near duplicate when that estimate is at least 0.7. The target is "Jaccard ≥ 0.8 is a near
duplicate": at 0.8 a pair is found and confirmed with probability ≈ 0.998 · 0.997; a pair of distinct documents
(s ≤ 0.5) passes verification with probability below 1e-5.

Why word sets: a near duplicate of Jaccard 0.8 by word sets keeps only about 0.4 of its word 5-grams, so 5-gram
shingles (FineWeb's choice) miss edits that word sets still catch; word sets cost little precision on documents
of more than a handful of words. Documents in the same LSH-verified component form a cluster; its first member is
kept and the others are dropped as `near_duplicate` with `duplicate_of` that member's id.

Why numpy and not datasketch: the signature is one vectorised expression (below), and datasketch's LSH index is
an in-process dictionary, where this pipeline needs signatures computed in parallel workers (local processes or
Ray) and then banded once over all of them; datasketch would also bring scipy in."""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

_MERSENNE = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+")


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_perm: int = Field(120, gt=0, description="MinHash functions")
    bands: int = Field(20, gt=0, description="LSH bands; rows per band = num_perm / bands")
    threshold: float = Field(0.7, gt=0, le=1, description="estimated Jaccard at which a candidate pair is a duplicate")
    shingle: int = Field(1, gt=0, description="words per shingle (1 = word sets)")
    seed: int = 1

    @property
    def rows(self) -> int:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm={self.num_perm} must be a multiple of bands={self.bands}")
        return self.num_perm // self.bands

    def candidate_probability(self, s: float) -> float:
        return 1 - (1 - s**self.rows) ** self.bands


def exact_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int) -> set[str]:
    words = _WORD.findall(text.lower())
    if n == 1 or len(words) < n:
        return set(words) if n == 1 or words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    a = rng.integers(1, int(_MERSENNE), size=cfg.num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_MERSENNE), size=cfg.num_perm, dtype=np.uint64)
    return a, b


class MinHasher:
    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.a, self.b = _permutations(cfg)

    def signature(self, text: str) -> np.ndarray:
        """`num_perm` uint32 minima of the universal hashes (a·h + b) mod (2^61 - 1) over the shingle hashes h."""
        sh = shingles(text, self.cfg.shingle)
        if not sh:
            return np.full(self.cfg.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        h = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in sh), dtype=np.uint64, count=len(sh))
        with np.errstate(over="ignore"):  # the products wrap modulo 2^64 by design, as in datasketch
            phv = (h[:, None] * self.a[None, :] + self.b[None, :]) % _MERSENNE
        return (phv & np.uint64(0xFFFFFFFF)).min(axis=0).astype(np.uint32)


# ---- global decisions (run once, over every part's hashes and signatures) -------------------------------------
def exact_duplicates(hashes: np.ndarray) -> np.ndarray:
    """For each document, the index of the first document with the same hash (itself if it is the first)."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)]


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:  # the smaller index (earlier document) becomes the root: it is the one kept
            self.parent[max(ri, rj)] = min(ri, rj)


def _band_keys(block: np.ndarray) -> np.ndarray:
    """One 64-bit key per row of a band (a polynomial hash; a collision only adds a candidate to verify)."""
    keys = np.zeros(len(block), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in range(block.shape[1]):
            keys = keys * np.uint64(0x100000001B3) + block[:, col].astype(np.uint64)
    return keys


def near_duplicates(sigs: np.ndarray, cfg: DedupConfig) -> tuple[np.ndarray, int]:
    """For each document (rows of `sigs`, canonical order), the index of the first member of its near-duplicate
    cluster (itself if it is kept), and the number of candidate pairs checked."""
    n = len(sigs)
    uf = _UnionFind(n)
    rows = cfg.rows
    checked = 0
    for band in range(cfg.bands):
        keys = _band_keys(sigs[:, band * rows : (band + 1) * rows])
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for s, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
            members = order[s : s + size]  # stable sort: ascending document index within a bucket
            first = members[0]
            agree = (sigs[members[1:]] == sigs[first]).mean(axis=1)
            checked += len(members) - 1
            for m in members[1:][agree >= cfg.threshold]:
                uf.union(int(first), int(m))
    roots = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
    return roots, checked


def jaccard(a: str, b: str, n: int = 1) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for tests and benchmarks)."""
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0
