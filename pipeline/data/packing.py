"""Pretraining tokenisation and packing into fixed-length blocks.

Documents are tokenised without special tokens, each is followed by the EOS token,
the token streams are concatenated in dataset order and cut into ``block_size``
blocks. Packing is global (one stream for the whole dataset), so the only tokens
ever dropped are the final remainder, and that count is reported.

Labels are left to the collator (causal-LM collators copy ``input_ids``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from pipeline.artifacts import tokenizer_hash

logger = logging.getLogger(__name__)

# Bump when the packed layout changes, so old caches stop matching.
_CACHE_VERSION = 1
_REPORT_FILE = "pack_report.json"


@dataclass
class PackReport:
    num_documents: int
    num_tokens: int  # all document tokens plus one EOS per document (if add_eos)
    block_size: int
    num_blocks: int
    dropped_tokens: int  # the final remainder, when drop_remainder
    cache_hit: bool = False
    cache_path: str | None = None

    def __str__(self) -> str:
        kept = self.num_blocks * self.block_size
        return (
            f"packed {self.num_documents} documents / {self.num_tokens} tokens into "
            f"{self.num_blocks} blocks of {self.block_size} ({kept} tokens); "
            f"dropped remainder: {self.dropped_tokens} tokens"
            + (f" [cache hit: {self.cache_path}]" if self.cache_hit else "")
        )


class Packed(NamedTuple):
    dataset: Dataset
    report: PackReport


def tokenize_and_pack(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    text_field: str = "text",
    num_proc: int | None = None,
    add_eos: bool = True,
    drop_remainder: bool = True,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 1000,
) -> Packed:
    """Tokenise ``dataset[text_field]`` and pack it into blocks of ``block_size`` tokens.

    Returns ``(dataset, report)``: a dataset with one column ``input_ids`` (one block
    per row) and a ``PackReport`` with the exact token accounting. With
    ``drop_remainder=False`` the last block may be shorter than ``block_size``.

    With ``cache_dir``, the result is stored under a folder named from the dataset
    fingerprint, the tokenizer's hash and the packing options, and a rerun with the
    same inputs loads it instead of recomputing (``report.cache_hit``).

    Tokenisation runs as a batched ``Dataset.map`` (``num_proc`` workers); packing is
    a second single-batch map over the token column in Arrow, so it is exact and
    global while staying vectorised.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if len(dataset) == 0:
        raise ValueError("cannot pack an empty dataset")
    if text_field not in dataset.column_names:
        raise ValueError(f"dataset has no column {text_field!r}: {dataset.column_names}")
    eos_id = tokenizer.eos_token_id
    if add_eos and eos_id is None:
        raise ValueError(
            "the tokenizer has no eos token: documents could not be separated when packed"
        )

    key = _cache_key(dataset, tokenizer, block_size, text_field, add_eos, drop_remainder)
    final = Path(cache_dir) / f"packed-{key[:24]}" if cache_dir is not None else None
    if final is not None and final.is_dir():
        return _load_cached(final)

    packed, report = _tokenize_and_pack(
        dataset,
        tokenizer,
        block_size=block_size,
        text_field=text_field,
        num_proc=num_proc,
        eos_id=eos_id if add_eos else None,
        drop_remainder=drop_remainder,
        batch_size=batch_size,
        fingerprint=key,
    )
    if final is not None:
        packed = _save_cache(packed, report, final)
        report.cache_path = str(final)
    if report.num_blocks == 0:
        logger.warning("no complete block of %d tokens: %s", block_size, report)
    logger.info("%s", report)
    return Packed(packed, report)


def _tokenize_and_pack(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    text_field: str,
    num_proc: int | None,
    eos_id: int | None,
    drop_remainder: bool,
    batch_size: int,
    fingerprint: str,
) -> tuple[Dataset, PackReport]:
    # Explicit fingerprints: our key already covers every input, and it spares
    # datasets from hashing the tokenizer object for its own cache.
    tokenized = dataset.with_format("arrow").map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "text_field": text_field, "eos_id": eos_id},
        new_fingerprint=f"{fingerprint[:16]}-tok",
        desc="Packing: tokenize",
    )
    lengths = pc.list_value_length(tokenized.data.column("input_ids"))
    num_tokens = int(pc.sum(lengths).as_py() or 0)
    num_blocks, remainder = divmod(num_tokens, block_size)
    report = PackReport(
        num_documents=len(tokenized),
        num_tokens=num_tokens,
        block_size=block_size,
        num_blocks=num_blocks,
        dropped_tokens=remainder if drop_remainder else 0,
    )
    # batch_size=None: the whole token column in one call, hence one global stream.
    packed = tokenized.map(
        _pack_table,
        batched=True,
        batch_size=None,
        fn_kwargs={"block_size": block_size, "drop_remainder": drop_remainder},
        new_fingerprint=f"{fingerprint[:16]}-pack",
        desc="Packing: cut blocks",
    ).with_format(None)
    expected = num_blocks + (1 if remainder and not drop_remainder else 0)
    if len(packed) != expected:  # cheap guard on the accounting the report promises
        raise RuntimeError(f"packing produced {len(packed)} blocks, expected {expected}")
    return packed, report


def _tokenize_batch(
    batch: pa.Table, tokenizer: PreTrainedTokenizerBase, text_field: str, eos_id: int | None
) -> pa.Table:
    texts = batch.column(text_field).to_pylist()
    ids = tokenizer(
        texts,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # documents longer than model_max_length are normal here
    )["input_ids"]
    if eos_id is not None:
        for doc in ids:
            doc.append(eos_id)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(doc) for doc in ids], out=offsets[1:])
    values = np.fromiter((t for doc in ids for t in doc), dtype=np.int32, count=int(offsets[-1]))
    return pa.table({"input_ids": _list_array(offsets, values)})


def _pack_table(table: pa.Table, block_size: int, drop_remainder: bool) -> pa.Table:
    column = table.column("input_ids")
    # flatten() honours each chunk's slice offsets, unlike .values
    chunks = [chunk.flatten() for chunk in column.chunks]
    flat = pa.concat_arrays(chunks) if chunks else pa.array([], pa.int32())
    total = len(flat)
    end = total - total % block_size if drop_remainder else total
    offsets = np.append(np.arange(0, end, block_size, dtype=np.int64), end)
    return pa.table({"input_ids": _list_array(offsets, flat.slice(0, end))})


def _list_array(offsets: np.ndarray, values) -> pa.Array:
    # int32 offsets cap a list column at 2**31 values; switch type only when needed.
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def _cache_key(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_field: str,
    add_eos: bool,
    drop_remainder: bool,
) -> str:
    parts = {
        "version": _CACHE_VERSION,
        "dataset": dataset._fingerprint,
        "tokenizer": tokenizer_hash(tokenizer),
        "block_size": block_size,
        "text_field": text_field,
        "add_eos": add_eos,
        "drop_remainder": drop_remainder,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _load_cached(path: Path) -> Packed:
    report = PackReport(**json.loads((path / _REPORT_FILE).read_text()))
    report.cache_hit = True
    report.cache_path = str(path)
    logger.info("%s", report)
    return Packed(load_from_disk(str(path)), report)


def _save_cache(packed: Dataset, report: PackReport, final: Path) -> Dataset:
    """Save under ``final`` atomically: the folder only appears once it is complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        packed.save_to_disk(str(tmp))
        (tmp / _REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a concurrent run finishing first: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_from_disk(str(final))
