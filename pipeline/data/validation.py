"""Load a source into canonical rows, checking every row.

`load_rows` reads a file, folder or Hub id (`sources`), detects or takes the format (`formats`), normalises each
record and reports every record it drops as `path:line: field: problem (fix)`. The default drops and counts;
`strict=True` raises `DataValidationError` on the first bad record. The report's table (kept, dropped by reason)
is what `pipeline data validate` prints.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from pipeline.data.formats import CANONICAL, FORMATS, RowProblem, apply_field_map, detect_format, normalize
from pipeline.data.sources import Origin, RawRecord, read_records
from pipeline.errors import DataError

MAX_KEPT_ISSUES = 1000  # messages kept for display; counts are always exact


class DataValidationError(DataError):
    """A bad record in strict mode, or a source whose format cannot be told; the message starts with `path:line:`."""


@dataclass(frozen=True)
class Issue:
    origin: Origin
    field: str
    problem: str
    fix: str

    @property
    def reason(self) -> str:
        """The issue without its numbers, to count issues of one kind together."""
        return re.sub(r"\d+", "N", f"{self.field}: {self.problem}")

    def __str__(self) -> str:
        return f"{self.origin}: {self.field}: {self.problem} ({self.fix})"


@dataclass
class ValidationReport:
    source: str
    formats: Counter = field(default_factory=Counter)  # input format → records read in it
    records: int = 0  # records read (lines, array elements, paragraphs, rows)
    kept: int = 0  # canonical rows produced
    dropped: Counter = field(default_factory=Counter)  # reason → records dropped
    issues: list[Issue] = field(default_factory=list)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def add_issue(self, issue: Issue) -> None:
        self.dropped[issue.reason] += 1
        if len(self.issues) < MAX_KEPT_ISSUES:
            self.issues.append(issue)

    def table(self, show_issues: int = 10) -> str:
        fmt = ", ".join(f"{f} → {CANONICAL[f]}" for f in self.formats) or "-"
        rows = [("records read", self.records), ("rows kept", self.kept)]
        rows += [(f"dropped: {reason}", n) for reason, n in self.dropped.most_common()]
        width = max(len(name) for name, _ in rows)
        lines = [f"{self.source}  (format: {fmt})", f"{'':<{width}}  {'count':>8}  {'share':>7}"]
        for name, n in rows:
            share = n / self.records if self.records else 0.0
            lines.append(f"{name:<{width}}  {n:>8}  {share:>7.1%}")
        if self.issues and show_issues:
            lines.append(f"first {min(show_issues, len(self.issues))} of {self.num_dropped} problems:")
            lines += [f"  {issue}" for issue in self.issues[:show_issues]]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass
class LoadResult:
    rows: list[dict[str, Any]]
    origins: list[Origin]  # where each kept row came from
    report: ValidationReport

    @property
    def canonical_format(self) -> str:
        kinds = {CANONICAL[f] for f in self.report.formats}
        if len(kinds) != 1:
            raise DataValidationError(f"{self.report.source}: rows of several canonical formats {sorted(kinds)}; "
                                      "load them as separate sources")
        return kinds.pop()


def load_rows(source: str, *, format: str | None = None, fields: Mapping[str, str] | None = None,
              strict: bool = False, text_unit: str = "paragraph", split: str = "train", name: str | None = None,
              streaming: bool = False, limit: int | None = None) -> LoadResult:
    """Canonical rows of `source`, every dropped record counted in the report (see module docstring).

    `format` forces an input format (one of `formats.FORMATS`); otherwise each file's format is detected from its
    first readable record. `fields` maps expected names to your keys, e.g. {"text": "paragraphs"}.
    `limit` stops after that many records (for previews).
    """
    report = ValidationReport(source=str(source))
    rows, origins = [], []
    for row, origin in iter_rows(source, report, format=format, fields=fields, strict=strict, text_unit=text_unit,
                                 split=split, name=name, streaming=streaming, limit=limit):
        rows.append(row)
        origins.append(origin)
    return LoadResult(rows, origins, report)


def iter_rows(source: str, report: ValidationReport, *, format: str | None = None,
              fields: Mapping[str, str] | None = None, strict: bool = False, text_unit: str = "paragraph",
              split: str = "train", name: str | None = None, streaming: bool = False,
              limit: int | None = None) -> Iterator[tuple[dict[str, Any], Origin]]:
    """`load_rows` one row at a time (memory does not grow with the source); counts go into `report`."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format: unknown {format!r}; use one of {', '.join(FORMATS)}")
    records = read_records(source, text_unit=text_unit, split=split, name=name, streaming=streaming)
    for record, fmt in _with_formats(records, format, fields):
        report.records += 1
        try:
            if record.error:
                raise RowProblem(*record.error)
            if fmt is None:
                keys = sorted(record.row) if isinstance(record.row, Mapping) else type(record.row).__name__
                raise RowProblem("(row)", f"format not recognised from keys {keys}",
                                 f"pass --format (one of {', '.join(FORMATS)}) or map fields with --field")
            canonical = normalize(apply_field_map(record.row, fields), fmt)
        except RowProblem as p:
            issue = Issue(record.origin, p.field, p.problem, p.fix)
            if strict:
                raise DataValidationError(str(issue)) from None
            report.add_issue(issue)
            continue
        report.formats[fmt] += 1
        report.kept += len(canonical)
        for row in canonical:
            yield row, record.origin
        if limit is not None and report.records >= limit:
            break


def _with_formats(records: Iterable[RawRecord], forced: str | None,
                  fields: Mapping[str, str] | None) -> Iterator[tuple[RawRecord, str | None]]:
    """Pair each record with its file's format: forced, or detected from the file's first readable record."""
    detected: dict[str, str | None] = {}
    for record in records:
        if forced is not None:
            yield record, forced
            continue
        file = record.origin.source
        if detected.get(file) is None and record.error is None:
            try:
                detected[file] = detect_format(apply_field_map(record.row, fields))
            except RowProblem:
                detected[file] = None
        yield record, detected.get(file)


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Row count and character statistics of canonical rows (for dataset cards)."""
    from pipeline.data.formats import iter_texts

    lengths = sorted(sum(len(t) for t in iter_texts(row)) for row in rows)
    if not lengths:
        return {"rows": 0}
    return {"rows": len(lengths), "chars_total": sum(lengths), "chars_mean": round(sum(lengths) / len(lengths), 1),
            "chars_median": lengths[len(lengths) // 2], "chars_min": lengths[0], "chars_max": lengths[-1]}
