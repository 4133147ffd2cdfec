"""Prepared pretraining shards: Arrow stream files of fixed token blocks, written atomically, checked on load.

A preparation folder holds `train/shard-00000.arrow …` (and `eval/…`), each one Arrow IPC stream with a single
`input_ids` column (one block per row) whose schema metadata names the preparation's fingerprint, split and shard
index, and `prepared.json`, written last: its presence means the preparation is complete. Arrow stream files are
what `datasets` memory-maps for its own cache, so `Dataset.from_file` opens a shard without reading it into memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.errors import DataError

MANIFEST_NAME = "prepared.json"
_META_KEY = b"pipeline_prepared"


class ShardError(DataError):
    """A shard that is missing, truncated or from another preparation; the message names the file."""


def shard_path(folder: Path, split: str, index: int) -> Path:
    return Path(folder) / split / f"shard-{index:05d}.arrow"


@dataclass
class ShardInfo:
    file: str  # relative to the preparation folder
    blocks: int
    bytes: int | None  # None: not known yet (a shard found on disk when resuming)


def write_shard(folder: Path, split: str, index: int, blocks: np.ndarray, fingerprint: str) -> ShardInfo:
    """Write `blocks` (num_blocks, block_size) as shard `index`; the final name appears only once it is complete."""
    path = shard_path(folder, split, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    num_blocks, block_size = blocks.shape
    offsets = pa.array(np.arange(0, (num_blocks + 1) * block_size, block_size, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(blocks.reshape(-1).astype(np.int32, copy=False)))
    meta = {"fingerprint": fingerprint, "split": split, "index": index, "blocks": num_blocks}
    schema = pa.schema([("input_ids", column.type)], metadata={_META_KEY: json.dumps(meta).encode()})
    with open(partial, "wb") as f:
        with pa.ipc.new_stream(f, schema) as writer:
            writer.write_batch(pa.record_batch([column], schema=schema))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return ShardInfo(str(path.relative_to(folder)), num_blocks, path.stat().st_size)


def check_shard(folder: Path, info: ShardInfo | dict, fingerprint: str) -> None:
    """Raise ShardError naming the file when it is missing, truncated, or written by another preparation."""
    info = ShardInfo(**info) if isinstance(info, dict) else info
    path = Path(folder) / info.file
    if not path.is_file():
        raise ShardError(f"{path}: shard missing; rerun `pipeline data prepare` to write it again")
    size = path.stat().st_size
    if info.bytes is not None and size != info.bytes:
        raise ShardError(f"{path}: truncated or altered ({size} bytes, {info.bytes} expected); delete it and rerun "
                         f"`pipeline data prepare` to write it again")
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            meta = json.loads((reader.schema.metadata or {}).get(_META_KEY, b"{}"))
            rows = sum(batch.num_rows for batch in reader)
    except (pa.ArrowInvalid, json.JSONDecodeError, OSError) as e:
        raise ShardError(f"{path}: not a readable shard ({e}); delete it and rerun `pipeline data prepare`") from None
    if meta.get("fingerprint") != fingerprint:
        raise ShardError(f"{path}: foreign shard (written by preparation {str(meta.get('fingerprint'))[:16]}, not "
                         f"{fingerprint[:16]}); delete it and rerun `pipeline data prepare`")
    if rows != info.blocks:
        raise ShardError(f"{path}: {rows} blocks, {info.blocks} expected; delete it and rerun `pipeline data prepare`")


def read_prepared_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_prepared_manifest(folder: Path, manifest: dict) -> None:
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def open_split(folder: Path, manifest: dict, split: str):
    """The split's shards as one memory-mapped `datasets.Dataset` (None when the split has no blocks)."""
    from datasets import Dataset, concatenate_datasets

    infos = manifest["splits"].get(split, {}).get("shards", [])
    for info in infos:
        check_shard(folder, info, manifest["fingerprint"])
    parts = [Dataset.from_file(str(Path(folder) / info["file"])) for info in infos]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
