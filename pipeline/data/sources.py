"""Read raw records from files, folders and Hub datasets, each tagged with where it came from.

Every record carries an `Origin` (file and line, or Hub id and row) so a bad row can be reported as
`path:line: field: problem (fix)`. Reading never decides what a row means; `formats` does that. Undecodable
bytes and corrupt JSON lines are not exceptions here: they come back as records with an `error`, so the
validator counts and reports them like any other bad row.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import DataError

SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet")


@dataclass(frozen=True)
class Origin:
    """Where a record starts: a file and a 1-based line, or a dataset and a row index."""

    source: str
    line: int
    unit: str = "line"  # "line" for text files; "row" for parquet and Hub datasets

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.unit == "line" else f"{self.source}:row {self.line}"


@dataclass
class RawRecord:
    origin: Origin
    row: Any = None  # a dict, or a str for plain-text files
    error: tuple[str, str, str] | None = None  # (field, problem, fix) when the record could not be read


class SourceError(DataError):
    """A source that cannot be read at all (missing path, unknown suffix, offline Hub id)."""


def read_records(source: str | os.PathLike, *, text_unit: str = "paragraph", split: str = "train",
                 name: str | None = None, streaming: bool = False) -> Iterator[RawRecord]:
    """Yield the records of a file, a folder of files (sorted, recursive) or a Hub dataset id.

    `text_unit` says how a `.txt` file splits into documents: "file", "paragraph" (blank-line separated) or "line".
    `split`, `name` and `streaming` apply to Hub datasets (`datasets.load_dataset`). `demo:KIND?n=N&seed=S` reads
    the embedded demo tasks (KIND: pretrain, sft, preference, prompts, classification, eval).
    """
    if str(source).startswith("demo:"):
        yield from _read_demo(str(source))
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise SourceError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
        for file in files:
            yield from read_records(file, text_unit=text_unit)
        return
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".txt": _read_txt, ".csv": _read_csv,
                   ".parquet": _read_parquet}
        if path.suffix not in readers:
            raise SourceError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        if path.suffix == ".txt":
            yield from _read_txt(path, text_unit)
        else:
            yield from readers[path.suffix](path)
        return
    if _looks_like_hub_id(str(source)):
        yield from _read_hub(str(source), name=name, split=split, streaming=streaming)
        return
    raise SourceError(f"{source}: no such file or folder (and not a Hub dataset id like 'org/name')")


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/")) and "." not in parts[1][-8:]


def _undecodable(origin: Origin) -> RawRecord:
    return RawRecord(origin, error=("(bytes)", "not valid UTF-8", "re-save the file as UTF-8"))


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None when the line is not UTF-8); line ends kept."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    for number, line in _decoded_lines(path):
        origin = Origin(str(path), number)
        if line is None:
            yield _undecodable(origin)
            continue
        if not line.strip():
            continue
        try:
            yield RawRecord(origin, json.loads(line))
        except json.JSONDecodeError as e:
            yield RawRecord(origin, error=("(json)", f"corrupt JSON at column {e.colno}: {e.msg}",
                                           "fix or delete this line"))


def _read_json(path: Path) -> Iterator[RawRecord]:
    """A JSON array (or one object) whose elements are tagged with the line each starts on."""
    bad, parts = set(), []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:  # decoded with replacement so the JSON structure survives; its row is dropped
            bad.add(number)
            parts.append(raw.decode("utf-8", "replace"))
    text = "\n".join(parts)
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if pos < len(text) and text[pos] == "{":  # a single object: one record
        try:
            yield RawRecord(Origin(str(path), 1), json.loads(text))
        except json.JSONDecodeError as e:
            yield RawRecord(Origin(str(path), e.lineno), error=("(json)", f"corrupt JSON: {e.msg}", "fix the file"))
        return
    if pos >= len(text) or text[pos] != "[":
        yield RawRecord(Origin(str(path), 1), error=("(json)", "expected a JSON array of objects",
                                                     "use a JSON array, or one object per line in a .jsonl file"))
        return
    pos, line, last = pos + 1, 1, 0  # invariant: line == 1 + newlines in text[:last]
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        line += text.count("\n", last, pos)
        last = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield RawRecord(Origin(str(path), e.lineno), error=("(json)", f"corrupt JSON: {e.msg}",
                                                                "fix the file; the rest of it is not read"))
            return
        span = range(line, line + text.count("\n", pos, end) + 1)
        yield _undecodable(Origin(str(path), line)) if bad.intersection(span) else RawRecord(Origin(str(path), line), value)
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_txt(path: Path, unit: str) -> Iterator[RawRecord]:
    if unit not in ("file", "paragraph", "line"):
        raise SourceError(f"text_unit: {unit!r} is not one of 'file', 'paragraph', 'line'")
    start, chunk = 1, []
    for number, line in _decoded_lines(path):
        if line is None:
            yield _undecodable(Origin(str(path), number))
            continue
        if unit == "line":
            if line.strip():
                yield RawRecord(Origin(str(path), number), line.rstrip("\r\n"))
            continue
        if unit == "paragraph" and not line.strip():
            if chunk:
                yield RawRecord(Origin(str(path), start), "".join(chunk).rstrip("\r\n"))
            chunk = []
            continue
        if not chunk:
            start = number
        chunk.append(line)
    if chunk:
        yield RawRecord(Origin(str(path), start), "".join(chunk).rstrip("\r\n"))


def _read_csv(path: Path) -> Iterator[RawRecord]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        yield _undecodable(Origin(str(path), line))
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2
    for row in reader:
        yield RawRecord(Origin(str(path), start), dict(row))
        start = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            yield RawRecord(Origin(str(path), index, unit="row"), row)
            index += 1


def _read_hub(dataset_id: str, *, name: str | None, split: str, streaming: bool) -> Iterator[RawRecord]:
    import datasets

    try:
        data = datasets.load_dataset(dataset_id, name, split=split, streaming=streaming)
    except Exception as e:  # offline, missing, gated: all end here with the reason
        raise SourceError(f"{dataset_id}: could not load from the Hub ({type(e).__name__}: {e}). Offline "
                          f"(HF_HUB_OFFLINE=1) only cached datasets load; download it first or pass a local path") from e
    for index, row in enumerate(data):
        yield RawRecord(Origin(f"{dataset_id}[{split}]", index, unit="row"), row)


def _read_demo(source: str) -> Iterator[RawRecord]:
    from urllib.parse import parse_qsl

    from pipeline.data import demo_tasks

    kind, _, query = source.removeprefix("demo:").partition("?")
    params = dict(parse_qsl(query))
    unknown = set(params) - {"n", "seed"}
    if unknown:
        raise SourceError(f"{source}: unknown parameter(s) {sorted(unknown)}; use n and seed")
    n, seed = int(params.get("n", 1000)), int(params.get("seed", 0))
    makers = {
        "pretrain": lambda: [{"text": t} for t in demo_tasks.pretraining_corpus(n, seed)],
        "sft": lambda: demo_tasks.sft_rows(n, seed),
        "preference": lambda: demo_tasks.preference_rows(n, seed),
        "prompts": lambda: [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["answer"]}]}
                            for r in demo_tasks.rl_prompt_rows(n, seed)],
        "classification": lambda: demo_tasks.classification_rows(n, seed),
        "eval": lambda: [{"prompt": t.prompt, "completion": t.answer} for t in demo_tasks.eval_tasks(n, seed)],
    }
    if kind not in makers:
        raise SourceError(f"{source}: unknown demo set {kind!r}; use one of {', '.join(makers)}")
    for index, row in enumerate(makers[kind]()):
        yield RawRecord(Origin(f"demo:{kind}", index, unit="row"), row)
