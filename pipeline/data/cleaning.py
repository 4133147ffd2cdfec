"""Text normalisation and quality filters for canonical rows.

Everything here works on plain rows (dicts) so it applies to every stage's format:
``{"text"}`` for pretraining, ``{"prompt", "completion"}`` or ``{"messages"}`` for the
others. Filters are plain callables ``text -> reason | None``; ``clean_rows`` runs them
and counts every dropped row under its reason, so a cleaning pass never loses data
silently.
"""

from __future__ import annotations

import operator
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

Row = Mapping[str, Any]
Filter = Callable[[str], "str | None"]

# ---------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------

_ZERO_WIDTH = "\u200b\u200c\u200d\ufeff"
# Control characters (Unicode category Cc) other than newline and tab. Built once as a
# translation table: str.translate is much faster than a per-character loop.
_DELETE_TABLE = {
    cp: None
    for cp in list(range(0x00, 0x20)) + list(range(0x7F, 0xA0))
    if chr(cp) not in "\n\t"
}
_DELETE_TABLE.update({ord(c): None for c in _ZERO_WIDTH})

# Only ASCII blanks: an ideographic space (U+3000) is content in CJK layout, not padding.
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 3+ blank lines == 4+ consecutive newlines


def normalize_text(s: str) -> str:
    """Return ``s`` in the canonical form every later stage assumes.

    NFC rather than NFKC on purpose: NFKC folds full-width punctuation (，。！？：；)
    to ASCII and would silently rewrite Chinese text. Line endings are unified before
    control characters are removed, because ``\\r`` is itself a control character.
    """
    s = unicodedata.normalize("NFC", s)
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = s.translate(_DELETE_TABLE)
    if " \n" in s or "\t\n" in s or s.endswith((" ", "\t")):  # the substitutions' only matches (fast path)
        s = _TRAILING_SPACE.sub("", s)
    if "\n\n\n\n" in s:
        s = _MANY_BLANK_LINES.sub("\n\n\n", s)
    return s


def dedup_key_text(s: str) -> str:
    """The text two rows must share to count as exact duplicates.

    NFC, zero-width characters removed, every whitespace run collapsed to one space,
    casefolded: so whitespace, line-ending and case variants of a text collide.
    """
    s = unicodedata.normalize("NFC", s).translate(_DELETE_TABLE)
    return " ".join(s.split()).casefold()


# ---------------------------------------------------------------------------
# Units: words for space-separated scripts, characters for unspaced ones
# ---------------------------------------------------------------------------

# Scripts written without spaces between words: CJK ideographs (with extensions and
# compatibility forms), kana, Thai, Lao, Khmer, Myanmar. Hangul is not here: Korean
# uses spaces.
_UNSPACED_CHAR = re.compile(
    "[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]"
)
_WORD_CHAR = re.compile(r"\w")
_WORD = re.compile(r"\w+")


def is_unspaced(text: str, min_fraction: float = 0.3) -> bool:
    """Heuristic: is ``text`` mostly in a script that does not separate words by spaces?

    True when at least ``min_fraction`` of its word characters (regex ``\\w``) belong to
    such a script. Word n-grams are meaningless there (a Chinese sentence is one
    "word"), so callers switch to character n-grams. The fraction is low enough that
    Chinese text with embedded English terms still counts as Chinese.
    """
    if min_fraction > 0 and _UNSPACED_CHAR.search(text) is None:  # most text: no such character at all
        return False
    word_chars = len(_WORD_CHAR.findall(text))
    if word_chars == 0:
        return False
    return len(_UNSPACED_CHAR.findall(text)) / word_chars >= min_fraction


def text_units(text: str) -> list[str]:
    """Split ``text`` into comparison units: casefolded words, or characters if unspaced.

    Punctuation and whitespace are dropped in both cases so that punctuation variants
    (ASCII vs full-width commas, for example) do not hide a match.
    """
    text = unicodedata.normalize("NFC", text).casefold()
    if is_unspaced(text):
        return _WORD_CHAR.findall(text)
    return _WORD.findall(text)


# ---------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MinLength:
    """Drop texts shorter than ``min_chars`` characters (after stripping)."""

    min_chars: int = 1
    reason: str = "too_short"

    def __call__(self, text: str) -> str | None:
        return self.reason if len(text.strip()) < self.min_chars else None


@dataclass(frozen=True)
class MaxLength:
    """Drop texts longer than ``max_chars`` characters."""

    max_chars: int = 1_000_000
    reason: str = "too_long"

    def __call__(self, text: str) -> str | None:
        return self.reason if len(text) > self.max_chars else None


@dataclass(frozen=True)
class RepetitionFilter:
    """Gopher-style repetition filter (Rae et al. 2021, "Scaling Language Models", App. A).

    Lines are the non-empty lines of the text (stripped). Units are words, or
    characters for unspaced scripts (see ``text_units``).

    * duplicate-line fraction  = (#lines - #distinct lines) / #lines
      drop when > ``max_dup_line_frac`` (Gopher: 0.30).
    * duplicate-line char fraction = chars in lines that repeat an earlier line
      / chars in all lines; drop when > ``max_dup_line_char_frac`` (Gopher: 0.20).
    * top n-gram fraction, for each n in ``top_ngram_max_frac``:
      chars(units covered by occurrences of the most frequent n-gram) / chars(all units);
      drop when > the threshold for that n (Gopher: n=2: 0.20, 3: 0.18, 4: 0.16).
      Overlapping occurrences ("ab ab ab" has "ab ab" twice) cover each unit once,
      so the fraction stays <= 1; count * len(n-gram) would double count them.
      Only counted when the top n-gram occurs more than once: a text with no
      repeated n-gram cannot be repetitive, however short it is.

    The n-gram fractions are only computed for texts of at least ``min_units`` units.
    Gopher never applied them to shorter documents (its length filter requires 50
    words), and on short texts they are noise: a two-line speech that says
    "it shall be so" three times is not boilerplate.
    """

    max_dup_line_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    top_ngram_max_frac: Mapping[int, float] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    min_units: int = 50

    def __call__(self, text: str) -> str | None:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if lines:
            reason = self._duplicate_lines(lines)
            if reason:
                return reason
        units = text_units(text)
        if len(units) < self.min_units:
            return None
        return self._top_ngrams(units)

    def _duplicate_lines(self, lines: list[str]) -> str | None:
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in lines:
            if line in seen:
                dup_lines += 1
                dup_chars += len(line)
            seen.add(line)
        if dup_lines / len(lines) > self.max_dup_line_frac:
            return "dup_line_frac"
        if dup_chars / sum(len(line) for line in lines) > self.max_dup_line_char_frac:
            return "dup_line_char_frac"
        return None

    def _top_ngrams(self, units: list[str]) -> str | None:
        total_chars = sum(map(len, units))
        # Upper bounds settle most texts without counting every n-gram. The units an n-gram's occurrences cover
        # are occurrences of at most n distinct units, so they hold at most the n largest count * length products
        # over the units; and an n-gram occurs at most as often as the top (n-1)-gram and spans at most n times
        # the longest unit. The exact count below runs only when both bounds pass the threshold.
        counts = Counter(units)
        weights = sorted(map(operator.mul, counts.values(), map(len, counts)), reverse=True)
        longest = max(map(len, counts))
        top_count = max(counts.values())  # of the last n counted: n-grams occur no more often
        for n, threshold in sorted(self.top_ngram_max_frac.items()):
            if len(units) < n or top_count < 2:
                continue
            if min(sum(weights[:n]), top_count * n * longest) / total_chars <= threshold:
                continue
            grams = list(zip(*(units[i:] for i in range(n))))
            top, count = Counter(grams).most_common(1)[0]
            top_count = count
            if count < 2 or count * sum(map(len, top)) / total_chars <= threshold:
                continue
            covered = [False] * len(units)
            for start, gram in enumerate(grams):
                if gram == top:
                    covered[start : start + n] = [True] * n
            covered_chars = sum(len(u) for u, c in zip(units, covered) if c)
            if covered_chars / total_chars > threshold:
                return f"top_{n}gram_frac"
        return None


def default_filters(
    *, min_chars: int = 1, max_chars: int = 1_000_000, repetition: bool = True
) -> list[Filter]:
    filters: list[Filter] = [MinLength(min_chars), MaxLength(max_chars)]
    if repetition:
        filters.append(RepetitionFilter())
    return filters


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------


def row_text(row: Row, fields: str | Sequence[str] = "text") -> str:
    """The text of ``row`` that filters judge: the named fields joined by newlines.

    A ``messages`` field (list of ``{"role", "content"}``) contributes its contents.
    """
    names = [fields] if isinstance(fields, str) else list(fields)
    parts: list[str] = []
    for name in names:
        value = row[name]
        if isinstance(value, str):
            parts.append(value)
        else:
            parts.extend(str(m["content"]) for m in value)
    return "\n".join(parts)


def normalize_row(row: Row, fields: str | Sequence[str] = "text") -> dict[str, Any]:
    """A copy of ``row`` with ``normalize_text`` applied to the named text fields."""
    names = [fields] if isinstance(fields, str) else list(fields)
    out = dict(row)
    for name in names:
        value = out[name]
        if isinstance(value, str):
            out[name] = normalize_text(value)
        else:
            out[name] = [{**m, "content": normalize_text(m["content"])} for m in value]
    return out


@dataclass
class CleanReport:
    """How many rows a cleaning pass kept, and how many it dropped for each reason."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    # Row indices (in the input) dropped per reason, for inspection and tests.
    dropped_indices: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def drop(self, index: int, reason: str) -> None:
        self.dropped[reason] += 1
        self.dropped_indices.setdefault(reason, []).append(index)

    def table(self) -> str:
        rows = [("kept", self.kept)]
        rows += [(f"dropped: {r}", n) for r, n in sorted(self.dropped.items())]
        rows.append(("total", self.total))
        width = max(len(name) for name, _ in rows)
        lines = [f"{'rows':<{width}}  {'count':>8}  {'share':>7}"]
        for name, n in rows:
            share = n / self.total if self.total else 0.0
            lines.append(f"{name:<{width}}  {n:>8}  {share:>7.1%}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def clean_rows(
    rows: Iterable[Row],
    *,
    field: str | Sequence[str] = "text",
    text_of: Callable[[Row], str] | None = None,
    filters: Sequence[Filter] | None = None,
    normalize: bool = True,
) -> tuple[list[dict[str, Any]], CleanReport]:
    """Normalise and filter ``rows``; return the kept rows and a report of every drop.

    ``field`` names the text field(s) to normalise and judge. ``text_of`` overrides
    what the filters see (the fields are still normalised first). ``filters`` defaults
    to ``default_filters()``; the first filter that objects gives the drop reason.
    Rows whose text is empty after normalisation are dropped as ``"empty"``, rows
    lacking the field as ``"missing_field"``, rows whose field is not text (a null,
    say) as ``"invalid_field"``.
    """
    filters = default_filters() if filters is None else list(filters)
    report = CleanReport()
    kept: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        report.total += 1
        try:
            row = normalize_row(row, field) if normalize else dict(row)
            text = text_of(row) if text_of is not None else row_text(row, field)
        except KeyError:
            report.drop(index, "missing_field")
            continue
        except (TypeError, AttributeError):  # e.g. a null where text belongs
            report.drop(index, "invalid_field")
            continue
        reason = "empty" if not text.strip() else _first_reason(filters, text)
        if reason is None:
            kept.append(row)
            report.kept += 1
        else:
            report.drop(index, reason)
    return kept, report


def _first_reason(filters: Sequence[Filter], text: str) -> str | None:
    for f in filters:
        reason = f(text)
        if reason:
            return reason
    return None
