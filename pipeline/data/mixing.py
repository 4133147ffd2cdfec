"""Dataset mixtures: several sources, each sampled to a share, cleaned, deduplicated and split.

A mixture is the `dataset` block of a stage config (the shape TRL and alignment-handbook use):

```yaml
dataset:
  seed: 0
  test_size: 0.05           # fraction or row count held out for evaluation
  dedup: true               # exact + MinHash near-duplicate removal
  sources:
    - path: ../shared/data/sft/alpaca_en_0-3252.json
      fraction: 0.5         # share of this source's rows to keep (or `rows: N`)
    - path: ../shared/data/sft/alpaca_zh_0-3252.json
      format: alpaca        # optional: forces the input format
      fields: {}            # optional: expected name -> your key
```
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pipeline.data.cleaning import CleanReport, clean_rows
from pipeline.data.dedup import ContaminationReport, DedupReport, dedup_rows, train_eval_split
from pipeline.data.formats import iter_texts
from pipeline.data.validation import DataValidationError, ValidationReport, load_rows
from pipeline.errors import ConfigError

SOURCE_KEYS = {"path", "fraction", "rows", "format", "fields", "split", "name", "streaming", "text_unit", "license"}
MIXTURE_KEYS = {"sources", "seed", "test_size", "dedup", "clean", "strict"}


@dataclass
class Mixture:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    canonical_format: str
    validation: list[ValidationReport] = field(default_factory=list)
    cleaning: CleanReport | None = None
    dedup: DedupReport | None = None
    contamination: ContaminationReport | None = None
    sampled: dict[str, int] = field(default_factory=dict)  # source → rows taken

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for row in self.train + self.eval:
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        return digest.hexdigest()[:16]

    def summary(self) -> str:
        parts = [report.table(show_issues=3) for report in self.validation]
        if self.cleaning is not None:
            parts.append("cleaning:\n" + self.cleaning.table())
        if self.dedup is not None:
            parts.append(f"dedup: kept {len(self.dedup.kept_indices)} of {self.dedup.total}")
        parts.append("sampled: " + ", ".join(f"{k} {v}" for k, v in self.sampled.items()))
        parts.append(f"split: train {len(self.train)}, eval {len(self.eval)}")
        if self.contamination is not None:
            parts.append("eval/train contamination:\n" + self.contamination.table())
        return "\n".join(parts)


def _row_text(row: Mapping[str, Any]) -> str:
    return "\n".join(iter_texts(row))


def _check_keys(spec: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def load_mixture(spec: Mapping[str, Any], *, where: str = "dataset") -> Mixture:
    """Load, sample, clean, dedup and split a mixture spec (see module docstring)."""
    _check_keys(spec, MIXTURE_KEYS, where)
    sources: Sequence[Mapping] = spec.get("sources") or []
    if not sources:
        raise ConfigError(f"{where}.sources: empty; list at least one source with a `path`")
    seed = int(spec.get("seed", 0))
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    mixture = Mixture([], [], canonical_format="")
    formats = set()
    for i, source in enumerate(sources):
        here = f"{where}.sources[{i}]"
        _check_keys(source, SOURCE_KEYS, here)
        if "path" not in source:
            raise ConfigError(f"{here}.path: missing")
        loaded = load_rows(source["path"], format=source.get("format"), fields=source.get("fields"),
                           strict=bool(spec.get("strict", False)), split=source.get("split", "train"),
                           name=source.get("name"), text_unit=source.get("text_unit", "paragraph"))
        mixture.validation.append(loaded.report)
        if not loaded.rows:
            raise DataValidationError(f"{here}: {source['path']} gave no usable rows\n{loaded.report.table()}")
        formats.add(loaded.canonical_format)
        taken = _sample(loaded.rows, source, rng, here)
        mixture.sampled[str(source["path"])] = len(taken)
        rows += taken
    if len(formats) > 1:
        raise ConfigError(f"{where}.sources: mixes canonical formats {sorted(formats)}; one stage trains on one format")
    mixture.canonical_format = formats.pop()
    rng.shuffle(rows)
    if spec.get("clean", True):
        rows, mixture.cleaning = clean_rows(rows, field=_text_fields(mixture.canonical_format), text_of=_row_text)
    if spec.get("dedup", True):
        rows, mixture.dedup = dedup_rows(rows, text_of=_row_text)
    test_size = spec.get("test_size", 0)
    if test_size:
        try:
            mixture.train, mixture.eval, mixture.contamination = train_eval_split(rows, test_size, seed,
                                                                                  text_of=_row_text)
        except ValueError as e:
            raise ConfigError(f"{where}.test_size: {e}") from None
    else:
        mixture.train = rows
    return mixture


def _text_fields(canonical: str) -> list[str]:
    return {"text": ["text"], "classification": ["text"], "messages": ["messages"],
            "prompt_completion": ["prompt", "completion"], "preference": ["prompt", "chosen", "rejected"]}[canonical]


def _sample(rows: list, source: Mapping, rng: random.Random, where: str) -> list:
    if "rows" in source and "fraction" in source:
        raise ConfigError(f"{where}: give `rows` or `fraction`, not both")
    if "rows" in source:
        n = int(source["rows"])
    else:
        fraction = float(source.get("fraction", 1.0))
        if not 0 < fraction <= 1:
            raise ConfigError(f"{where}.fraction: {fraction} is not in (0, 1]")
        n = round(fraction * len(rows))
    if n > len(rows):
        raise ConfigError(f"{where}.rows: asks for {n} rows but {source['path']} has {len(rows)}")
    return rows if n == len(rows) else rng.sample(rows, n)
