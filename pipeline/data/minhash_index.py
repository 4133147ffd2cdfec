"""Near-duplicate detection for corpora larger than memory: datasketch MinHash signatures, LSH bands kept on disk.

datasketch's `MinHashLSH` keeps every signature and band table in Python dicts (about 2 KB per document), which
does not fit a pretraining corpus. Here the same pieces run in two passes with a few bytes per document in memory:

1. `signatures` turns each document's token n-grams into a datasketch MinHash signature (its `affine32` scheme and
   seeded permutations, vectorised over a batch: `test_prepare.py` checks it equals `MinHash.update_batch`) and
   folds each LSH band into one 64-bit key. The caller stores the band keys (and the tokens) per chunk on disk.
2. `find_duplicates` sorts each band's keys (one band in memory at a time), confirms every candidate pair with the
   exact Jaccard similarity of the two documents' shingle sets (read back from disk: the signatures' estimate, with
   128 permutations, misses about a quarter of the pairs at 0.82), and joins confirmed pairs; each group keeps its
   earliest document. Exact duplicates (equal 64-bit hashes of the normalised text) are grouped first and counted
   apart.

Band count and rows per band come from datasketch's `MinHashLSH` for the threshold, weighted for recall
(`NearDupSettings.lsh_weights`): a false candidate costs one exact comparison, a missed one stays in the data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH
from datasketch.minhash import _fmix

_MAX_SHINGLES = 1 << 15  # shingles hashed per numpy step: (shingles x num_perm) uint32 stays near 16 MB


@dataclass(frozen=True)
class NearDupSettings:
    threshold: float = 0.8  # Jaccard similarity of token n-gram sets at or above which two documents are duplicates
    num_perm: int = 128
    ngram: int = 5  # tokens per shingle
    seed: int = 1
    # (false positive, false negative) weights choosing bands x rows: a false candidate costs one exact comparison,
    # a missed one stays in the data. (0.02, 0.98) gives 17 bands of 7 rows: a pair at 0.8 is a candidate with
    # probability 0.98 (0.87 with the 14 x 9 of (0.1, 0.9)), a pair at 0.5 with 0.13.
    lsh_weights: tuple[float, float] = (0.02, 0.98)

    def bands(self) -> tuple[int, int]:
        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, weights=self.lsh_weights)
        return lsh.b, lsh.r


class Signer:
    """Signatures and band keys of token-id documents under one `NearDupSettings`."""

    def __init__(self, settings: NearDupSettings):
        self.settings = settings
        self.a, self.b = MinHash(num_perm=settings.num_perm, seed=settings.seed).permutations  # datasketch's own
        self.num_bands, self.rows = settings.bands()
        self._a_column, self._b_column = self.a[:, None].astype(np.uint32), self.b[:, None].astype(np.uint32)
        rng = np.random.default_rng(settings.seed)
        self._gram_mix = rng.integers(1, 2**63, size=settings.ngram, dtype=np.uint64) | np.uint64(1)
        self._band_mix = rng.integers(1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1)

    def shingle_hashes(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes of every token n-gram inside each document, and the document each belongs to.

        `tokens` is the batch's documents concatenated, `starts` their start offsets plus the end. A document
        shorter than n contributes one shingle of all its tokens.
        """
        hashes, owners = self._shingles64(tokens, starts)
        order = np.argsort(owners, kind="stable")
        return (hashes[order] >> np.uint64(32)).astype(np.uint32), owners[order]

    def shingle_set(self, tokens: np.ndarray) -> np.ndarray:
        """One document's distinct 64-bit shingle hashes, sorted: what `jaccard` compares."""
        return np.unique(self._shingles64(tokens, np.array([0, len(tokens)]))[0])

    def _shingles64(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.settings.ngram
        tokens = tokens.astype(np.uint64)
        lengths = np.diff(starts)
        doc_of = np.repeat(np.arange(len(lengths)), lengths)
        windows = max(len(tokens) - n + 1, 0)
        mixed = np.zeros(windows, dtype=np.uint64)
        for j in range(n):
            mixed += tokens[j:j + windows] * self._gram_mix[j]
        inside = doc_of[:windows] == doc_of[n - 1:n - 1 + windows] if windows else np.zeros(0, bool)
        hashes, owners = [mixed[inside]], [doc_of[:windows][inside]]
        for d in np.flatnonzero(lengths < n):  # rare: documents of fewer than n tokens
            piece = tokens[starts[d]:starts[d + 1]]
            hashes.append(np.array([(piece * self._gram_mix[:len(piece)]).sum() + np.uint64(len(piece))],
                                   dtype=np.uint64))
            owners.append(np.array([d]))
        return np.concatenate(hashes), np.concatenate(owners)

    def signatures(self, tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """(documents, num_perm) uint32: each row equals datasketch's MinHash of that document's shingle hashes."""
        hashes, owners = self.shingle_hashes(tokens, starts)
        out = np.empty((len(starts) - 1, self.settings.num_perm), dtype=np.uint32)
        first = np.searchsorted(owners, np.arange(len(starts) - 1))  # every document owns >= 1 shingle
        bounds = np.append(first, len(owners))
        doc = 0
        while doc < len(first):  # whole documents per step, about _MAX_SHINGLES shingles at a time
            last = max(doc + 1, int(np.searchsorted(bounds, bounds[doc] + _MAX_SHINGLES, side="right")) - 1)
            last = min(last, len(first))
            lo, hi = bounds[doc], bounds[last]
            # (num_perm, shingles): each permutation's values contiguous, so the per-document minimum runs along
            # memory (8x faster than the transposed layout); uint32 wraparound is the modulo
            permuted = self._a_column * _fmix(hashes[lo:hi], 32)[None, :]
            permuted += self._b_column
            out[doc:last] = np.minimum.reduceat(permuted, bounds[doc:last] - lo, axis=1).T
            doc = last
        return out

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(documents, bands) uint64: each band's rows folded into one key (equal bands give equal keys)."""
        used = signatures[:, : self.num_bands * self.rows].astype(np.uint64)
        return (used.reshape(len(signatures), self.num_bands, self.rows) * self._band_mix).sum(axis=2)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sets given as sorted arrays of distinct values (`Signer.shingle_set`)."""
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common) if len(a) + len(b) else 1.0


def find_duplicates(num_docs: int, exact_keys: np.ndarray, band_column: Callable[[int], np.ndarray],
                    num_bands: int, shingles_of: Callable[[int], np.ndarray], threshold: float,
                    max_compare: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(parent, exact) over documents 0..num_docs-1: parent[i] != i marks a duplicate of an earlier document;
    exact[i] says it was an exact one. `band_column(j)` gives band j's keys for all documents (read from disk),
    `shingles_of(i)` one document's shingle set (`Signer.shingle_set`; the last few thousand are cached).

    A document sharing a band key with earlier ones is compared with them in order (at most `max_compare`) by the
    exact Jaccard similarity of their shingle sets, and joins the first one at or above `threshold`; one already
    in its group (joined through another band) ends the search."""
    parent = np.arange(num_docs, dtype=np.int64)
    shingles_of = functools.lru_cache(maxsize=4096)(shingles_of)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def join(i: int, j: int) -> None:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the earliest document of a group is the one kept

    for members in _equal_groups(exact_keys):
        for d in members[1:]:
            join(int(members[0]), int(d))
    exact = parent != np.arange(num_docs)
    for band in range(num_bands):
        for members in _equal_groups(band_column(band)):
            members = [int(d) for d in members if not exact[d]]
            for k, d in enumerate(members[1:], start=1):
                for earlier in members[max(0, k - max_compare):k]:
                    if root(earlier) == root(d):
                        break
                    if jaccard(shingles_of(earlier), shingles_of(d)) >= threshold:
                        join(earlier, d)
                        break
    while True:  # every parent points to an earlier document or itself: jump until all point to their root
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent, exact
        parent = grand


def _equal_groups(keys: np.ndarray) -> Sequence[np.ndarray]:
    """Indices sharing a key, for every key held by two or more documents (each group in index order)."""
    if len(keys) < 2:
        return []
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return []
    starts = np.flatnonzero(np.diff(np.concatenate(([False], same, [False])).astype(np.int8)) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate(([False], same, [False])).astype(np.int8)) == -1)
    return [order[s:e + 1] for s, e in zip(starts, ends)]
