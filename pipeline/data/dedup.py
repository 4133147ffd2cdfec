"""Deduplication (exact and near) and train/eval contamination checks.

All functions keep the *first* occurrence of duplicated content and report which row
indices were removed and which kept row each one duplicated, so a dedup pass can be
audited afterwards.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from datasketch import MinHash, MinHashLSH

from .cleaning import dedup_key_text, is_unspaced, row_text, text_units

Row = Mapping[str, Any]

# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


@dataclass
class DedupReport:
    """Outcome of a dedup pass over ``total`` texts, indexed by input position."""

    total: int
    kept_indices: list[int]
    # removed index -> index of the kept text it duplicates
    duplicate_of: dict[int, int] = field(default_factory=dict)
    # removed index -> "exact" | "near"
    method: dict[int, str] = field(default_factory=dict)

    @property
    def removed_indices(self) -> list[int]:
        return sorted(self.duplicate_of)

    @property
    def num_removed(self) -> int:
        return len(self.duplicate_of)

    def count(self, method: str) -> int:
        return sum(1 for m in self.method.values() if m == method)

    def table(self) -> str:
        lines = [
            f"{'rows':<16}{'count':>8}",
            f"{'kept':<16}{len(self.kept_indices):>8}",
        ]
        for m in sorted(set(self.method.values())):
            lines.append(f"{'removed: ' + m:<16}{self.count(m):>8}")
        lines.append(f"{'total':<16}{self.total:>8}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------
# Exact
# ---------------------------------------------------------------------------


def text_hash(text: str) -> str:
    """sha256 of the dedup key (NFC, whitespace collapsed, casefolded)."""
    return hashlib.sha256(dedup_key_text(text).encode("utf-8")).hexdigest()


def exact_dedup(texts: Iterable[str]) -> DedupReport:
    first_seen: dict[str, int] = {}
    report = DedupReport(total=0, kept_indices=[])
    for index, text in enumerate(texts):
        report.total += 1
        key = text_hash(text)
        if key in first_seen:
            report.duplicate_of[index] = first_seen[key]
            report.method[index] = "exact"
        else:
            first_seen[key] = index
            report.kept_indices.append(index)
    return report


# ---------------------------------------------------------------------------
# Near (MinHash LSH)
# ---------------------------------------------------------------------------


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Character n-gram shingles of the dedup key of ``text``.

    Characters rather than words so that the same code works for Chinese, which has
    no spaces to split on. A text shorter than ``n`` is a single shingle.
    """
    key = dedup_key_text(text)
    if len(key) <= n:
        return {key.encode("utf-8")}
    return {key[i : i + n].encode("utf-8") for i in range(len(key) - n + 1)}


def minhashes(
    texts: Sequence[str], *, ngram: int = 5, num_perm: int = 128, seed: int = 1
) -> list[MinHash]:
    # A fixed seed fixes the permutations, hence the signatures and the result.
    # crc32 instead of datasketch's default sha1: MinHash needs a fixed, well-spread
    # 32-bit hash, not a cryptographic one (datasketch premixes it with the murmur
    # finalizer anyway), and crc32 makes hashing cheaper than the permutations.
    return MinHash.bulk(
        (shingles(t, ngram) for t in texts), num_perm=num_perm, seed=seed, hashfunc=zlib.crc32
    )


# (false-positive weight, false-negative weight) for choosing LSH bands and rows.
_LSH_WEIGHTS = (0.1, 0.9)


def near_dedup(
    texts: Sequence[str],
    *,
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
    seed: int = 1,
) -> DedupReport:
    """Drop texts whose estimated Jaccard similarity to an earlier kept text >= threshold.

    Texts are visited in order; only kept texts enter the LSH index, so each cluster
    of near duplicates keeps its first member. LSH candidates are confirmed with the
    MinHash Jaccard estimate, which removes most of LSH's false positives; among
    confirmed matches the earliest kept text is recorded, so the output does not
    depend on set iteration order.
    """
    texts = list(texts)
    # Every candidate is verified below, so a false positive costs one comparison
    # while a false negative is a duplicate left in the data: tune the bands for
    # recall (datasketch's default weighs both errors equally and, at threshold 0.8
    # with 128 permutations, misses ~60% of pairs sitting right at the threshold).
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
    report = DedupReport(total=len(texts), kept_indices=[])
    signatures = minhashes(texts, ngram=ngram, num_perm=num_perm, seed=seed)
    for index, sig in enumerate(signatures):
        matches = [k for k in lsh.query(sig) if signatures[k].jaccard(sig) >= threshold]
        if matches:
            report.duplicate_of[index] = min(matches)
            report.method[index] = "near"
        else:
            lsh.insert(index, sig)
            report.kept_indices.append(index)
    return report


def dedup_texts(
    texts: Sequence[str],
    *,
    exact: bool = True,
    near: bool = True,
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
    seed: int = 1,
) -> DedupReport:
    """Exact dedup, then near dedup over the survivors; indices refer to ``texts``."""
    texts = list(texts)
    report = exact_dedup(texts) if exact else DedupReport(len(texts), list(range(len(texts))))
    if near:
        survivors = report.kept_indices
        sub = near_dedup(
            [texts[i] for i in survivors],
            threshold=threshold,
            num_perm=num_perm,
            ngram=ngram,
            seed=seed,
        )
        report.kept_indices = [survivors[i] for i in sub.kept_indices]
        for i, j in sub.duplicate_of.items():
            report.duplicate_of[survivors[i]] = survivors[j]
            report.method[survivors[i]] = "near"
    return report


def dedup_rows(
    rows: Sequence[Row],
    *,
    field: str | Sequence[str] = "text",
    text_of: Callable[[Row], str] | None = None,
    **kwargs: Any,
) -> tuple[list[Row], DedupReport]:
    """``dedup_texts`` over rows; returns the kept rows (in order) and the report."""
    rows = list(rows)
    texts = [text_of(r) if text_of is not None else row_text(r, field) for r in rows]
    report = dedup_texts(texts, **kwargs)
    return [rows[i] for i in report.kept_indices], report


# ---------------------------------------------------------------------------
# Contamination
# ---------------------------------------------------------------------------


@dataclass
class ContaminationReport:
    """Which eval texts share an n-gram (or, if short, their whole text) with train."""

    n: int
    num_eval: int
    flagged_indices: list[int] = field(default_factory=list)
    # flagged eval index -> the overlapping n-gram, as text
    examples: dict[int, str] = field(default_factory=dict)
    # eval indices with fewer than ``min_units`` units: too short to judge
    skipped_indices: list[int] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return len(self.flagged_indices) / self.num_eval if self.num_eval else 0.0

    @property
    def clean(self) -> bool:
        return not self.flagged_indices

    def table(self, max_examples: int = 5) -> str:
        lines = [
            f"eval rows     {self.num_eval:>8}",
            f"contaminated  {len(self.flagged_indices):>8}  ({self.fraction:.1%}, n={self.n})",
            f"too short     {len(self.skipped_indices):>8}",
        ]
        for i in self.flagged_indices[:max_examples]:
            lines.append(f"  eval[{i}]: {self.examples[i][:80]!r}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _join_units(units: Sequence[str], unspaced: bool) -> str:
    return "".join(units) if unspaced else " ".join(units)


def contamination(
    train_texts: Iterable[str],
    eval_texts: Iterable[str],
    n: int = 13,
    *,
    min_units: int = 8,
) -> ContaminationReport:
    """Flag eval texts that share an ``n``-gram with any train text.

    Units are words (casefolded, punctuation dropped) for space-separated text and
    characters for text that is mostly in an unspaced script such as Chinese; the
    choice is made per text by ``cleaning.is_unspaced`` (>= 30% of word characters in
    CJK/kana/Thai-like scripts). Word and character n-grams live in separate spaces,
    so an English eval item is only compared with English train n-grams.

    An eval text shorter than ``n`` units but with at least ``min_units`` is flagged
    when its whole unit sequence occurs in some train text (short prompts have no
    n-gram at all but are the easiest items to memorise). Shorter ones are reported
    as skipped rather than silently passed.
    """
    train_grams: set[tuple[bool, int]] = set()
    # Unit streams of all train texts, one per line, padded so that substring search
    # for " a b c " only matches on word boundaries.
    streams: dict[bool, list[str]] = {False: [], True: []}
    for text in train_texts:
        unspaced = is_unspaced(text)
        units = text_units(text)
        for i in range(len(units) - n + 1):
            train_grams.add((unspaced, hash(tuple(units[i : i + n]))))
        streams[unspaced].append(_join_units(units, unspaced))
    haystack = {
        False: "\n " + " \n ".join(streams[False]) + " \n",
        True: "\n" + "\n".join(streams[True]) + "\n",
    }

    report = ContaminationReport(n=n, num_eval=0)
    for index, text in enumerate(eval_texts):
        report.num_eval += 1
        unspaced = is_unspaced(text)
        units = text_units(text)
        if len(units) < min(n, min_units):
            report.skipped_indices.append(index)
            continue
        hit = _first_overlap(units, unspaced, n, train_grams, haystack[unspaced])
        if hit is not None:
            report.flagged_indices.append(index)
            report.examples[index] = hit
    return report


def _first_overlap(
    units: list[str], unspaced: bool, n: int, train_grams: set, haystack: str
) -> str | None:
    if len(units) < n:
        whole = _join_units(units, unspaced)
        needle = whole if unspaced else f" {whole} "
        return whole if needle in haystack else None
    for i in range(len(units) - n + 1):
        gram = tuple(units[i : i + n])
        if (unspaced, hash(gram)) in train_grams:
            return _join_units(gram, unspaced)
    return None


def train_eval_split(
    rows: Sequence[Row],
    test_size: float | int,
    seed: int = 0,
    *,
    field: str | Sequence[str] = "text",
    text_of: Callable[[Row], str] | None = None,
    n: int = 13,
) -> tuple[list[Row], list[Row], ContaminationReport]:
    """Deterministic shuffled split, plus a contamination check of eval against train.

    ``test_size`` is a fraction in (0, 1) or an absolute row count. The same ``seed``
    and rows always give the same split. Both parts keep the input order.
    A ``datasets.Dataset`` works too (rows are read by index).
    """
    total = len(rows)
    n_eval = round(test_size * total) if isinstance(test_size, float) else int(test_size)
    if not 0 < n_eval < total:
        raise ValueError(f"test_size={test_size!r} leaves no train or no eval rows of {total}")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    train = [rows[i] for i in train_idx]
    evals = [rows[i] for i in eval_idx]

    def text(row: Row) -> str:
        return text_of(row) if text_of is not None else row_text(row, field)

    report = contamination((text(r) for r in train), (text(r) for r in evals), n=n)
    return train, evals, report
