"""Hugging Face dataset cards written from measured statistics (`pipeline data card`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from huggingface_hub import DatasetCard, DatasetCardData

from pipeline.data.validation import LoadResult, summarize

TASK_CATEGORIES = {"text": ["text-generation"], "messages": ["text-generation"],
                   "prompt_completion": ["text-generation"], "preference": ["text-generation", "reinforcement-learning"],
                   "classification": ["text-classification"]}


def size_category(rows: int) -> str:
    """The Hub's size bucket for a row count (n<1K, 1K<n<10K, ...)."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M")]
    return next((label for bound, label in bounds if rows < bound), "n>10M")


def dataset_card(loaded: LoadResult, *, name: str, license: str, language: Sequence[str], source: str,
                 description: str = "", known_issues: Sequence[str] = ()) -> DatasetCard:
    """A card whose numbers come from `loaded` (rows, lengths, drops by reason)."""
    report = loaded.report
    stats = summarize(loaded.rows)
    canonical = loaded.canonical_format
    data = DatasetCardData(license=license, language=list(language), task_categories=TASK_CATEGORIES[canonical],
                           size_categories=[size_category(stats["rows"])], source_datasets=[source], pretty_name=name)
    drops = [f"- {reason}: {n} record(s) dropped" for reason, n in report.dropped.most_common()]
    issues = [f"- {issue}" for issue in known_issues] + drops
    body = "\n".join([
        f"# {name}", "", description or f"Source: {source}.", "",
        "## Schema", "",
        f"Input format {', '.join(report.formats)} normalised to the canonical `{canonical}` format: "
        f"{_schema(canonical)}.", "",
        "## Statistics", "",
        "| statistic | value |", "| --- | --- |",
        f"| records read | {report.records} |",
        *[f"| {key.replace('_', ' ')} | {value} |" for key, value in stats.items()], "",
        "## Cleaning applied", "",
        "Every record was read with its file and line, normalised and checked by `pipeline data validate`; "
        f"{report.kept} rows kept, {report.num_dropped} records dropped "
        f"({', '.join(f'{r}: {n}' for r, n in report.dropped.most_common()) or 'none'}). Stage recipes further "
        "apply NFC/whitespace normalisation, length and repetition filters, exact and MinHash near-duplicate "
        "removal, and an n-gram contamination check between train and eval splits (reported per run).", "",
        "## Known issues", "",
        *(issues or ["- none measured"]), "",
    ])
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _schema(canonical: str) -> str:
    return {"text": '`{"text": str}`',
            "messages": '`{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`',
            "prompt_completion": '`{"prompt": str, "completion": str}`',
            "preference": '`{"prompt": [turns], "chosen": [assistant turns], "rejected": [assistant turns]}`',
            "classification": '`{"text": str, "label": int | str}`'}[canonical]


def card_metadata(card_text: str) -> Mapping[str, Any]:
    """The YAML metadata of a card, as a dict."""
    return DatasetCard(card_text).data.to_dict()
