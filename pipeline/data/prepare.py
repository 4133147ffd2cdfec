"""Pretraining data prepared once: streamed, cleaned, deduplicated, tokenised and packed into reusable shards.

`prepare(spec, tokenizer, block_size=…, root=…)` reads the mixture spec's sources one row at a time (local files
and folders, Hub datasets with `streaming=True`, `demo:` sets) and works in three passes, so memory holds one batch,
one chunk and one shard, never the corpus:

1. read → clean (`cleaning.normalize_text` + `default_filters`) → tokenise in batches → MinHash band keys of the
   token n-grams (`minhash_index`); written to disk in chunks of about 4M tokens (`work/chunk-NNNNN`). Batches are
   processed in order by one worker process per core (forked once the first `PARALLEL_AFTER_TOKENS` tokens are done
   in-process), so the output does not depend on the number of workers.
2. exact and near duplicates found from the chunks' band keys, candidates confirmed by the exact Jaccard similarity
   of their token n-grams (read back from the chunks); the eval split drawn among the survivors (seeded).
3. the surviving documents, each followed by EOS, concatenated in order and cut into blocks of `block_size`
   (the final remainder dropped and counted, as `packing.tokenize_and_pack` does), written as shards (`shards`).

Everything lands in `root/<fingerprint[:16]>/`; `prepared.json`, written last, names the fingerprint: a hash of
the sources (path, options, file sizes and modification times), cleaning and dedup settings, seed and test size,
the tokenizer hash, block size and shard size. The same inputs find the folder and reuse it; any change gives
another fingerprint and prepares anew. An interrupted run resumes: finished chunks and shards are kept, the chunk or
shard that was being written is redone. Unlike `mixing.load_mixture` (the in-memory path other stages use) rows
are not shuffled: the trainer samples blocks at random, and sources follow each other in the stream.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import numpy.lib.format as npy_format

from pipeline.artifacts import tokenizer_hash
from pipeline.data.cleaning import default_filters, dedup_key_text, normalize_text
from pipeline.data.minhash_index import NearDupSettings, Signer, find_duplicates
from pipeline.data.mixing import MIXTURE_KEYS, SOURCE_KEYS
from pipeline.data.shards import (
    MANIFEST_NAME, ShardError, ShardInfo, check_shard, open_split, read_prepared_manifest, shard_path,
    write_prepared_manifest, write_shard,
)
from pipeline.data.sources import SUFFIXES
from pipeline.data.validation import ValidationReport, iter_rows
from pipeline.errors import ConfigError, DataError

VERSION = 2  # bump when the prepared layout or any pass changes its output
CHUNK_TOKENS = 1 << 22  # pass-1 chunk: about 16 MB of token ids, plus dedup keys
SHARD_TOKENS = 1 << 22  # default shard: about 16 MB of blocks
BATCH_ROWS = 512  # rows tokenised per call
PARALLEL_AFTER_TOKENS = 1 << 20  # pass 1 starts its worker processes once this many tokens are done in-process
TRAIN, EVAL, EXACT, NEAR = 0, 1, 2, 3  # document status after pass 2
EXIT_HOOK = "PIPELINE_PREPARE_EXIT_AFTER"  # "chunks:N" or "shards:N": exit abruptly after N written (tests)
NEAR_DUP = NearDupSettings()


@dataclass
class Prepared:
    folder: Path
    manifest: dict
    reused: bool = False

    def dataset(self, split: str = "train"):
        return open_split(self.folder, self.manifest, split)

    @property
    def sampled(self) -> dict[str, int]:  # what stage manifests record per source (as `Mixture.sampled`)
        return self.manifest["report"]["sampled"]

    def fingerprint(self) -> str:
        return self.manifest["fingerprint"][:16]

    def summary(self) -> str:
        report, splits = self.manifest["report"], self.manifest["splits"]
        lines = [f"prepared data {'reused' if self.reused else 'written'}: {self.folder}"]
        for source, counts in report["validation"].items():
            dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items()) or "none"
            lines.append(f"  {source}: {counts['records']} records read, {report['sampled'][source]} rows taken, "
                         f"dropped as invalid: {dropped}")
        cleaning = report["cleaning"]
        if cleaning:
            dropped = {k.removeprefix("dropped:"): v for k, v in cleaning.items() if k.startswith("dropped:")}
            lines.append(f"  cleaning: {cleaning['total']} rows, dropped "
                         + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"))
        dedup = report["dedup"]
        if self.manifest["inputs"]["dedup"]:
            lines.append(f"  dedup: {dedup['documents']} documents, dropped exact {dedup['exact']}, "
                         f"near {dedup['near']}")
        for name, split in splits.items():
            lines.append(f"  {name}: {split['documents']} documents, {split['tokens']} tokens (with EOS) -> "
                         f"{split['blocks']} blocks of {self.manifest['block_size']} in {len(split['shards'])} "
                         f"shard(s); dropped remainder {split['dropped_tokens']} tokens")
        return "\n".join(lines)


# --------------------------------------------------------------------------- fingerprint


def _check_spec(spec: Mapping, where: str) -> None:
    unknown = sorted(set(spec) - MIXTURE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(MIXTURE_KEYS)}")
    if not spec.get("sources"):
        raise ConfigError(f"{where}.sources: empty; list at least one source with a `path`")
    for i, source in enumerate(spec["sources"]):
        bad = sorted(set(source) - SOURCE_KEYS)
        if bad:
            raise ConfigError(f"{where}.sources[{i}]: unknown key(s) {bad}; allowed: {sorted(SOURCE_KEYS)}")
        if "path" not in source:
            raise ConfigError(f"{where}.sources[{i}].path: missing")
        if "rows" in source and "fraction" in source:
            raise ConfigError(f"{where}.sources[{i}]: give `rows` or `fraction`, not both")


def _source_identity(path: str) -> Any:
    """What changes when a local source changes: each file's size and modification time."""
    p = Path(path)
    if p.is_file():
        return [p.stat().st_size, p.stat().st_mtime_ns]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        return [[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return None  # a Hub id or demo set: named by the spec itself


def fingerprint_inputs(spec: Mapping, tokenizer, *, block_size: int, shard_blocks: int) -> dict:
    sources = [{**{k: v for k, v in s.items() if k != "license"}, "identity": _source_identity(str(s["path"]))}
               for s in spec["sources"]]
    clean = bool(spec.get("clean", True))
    dedup = bool(spec.get("dedup", True))
    return {"version": VERSION, "sources": sources, "seed": int(spec.get("seed", 0)),
            "test_size": spec.get("test_size", 0), "strict": bool(spec.get("strict", False)),
            "clean": [repr(f) for f in default_filters()] if clean else False,
            "dedup": asdict(NEAR_DUP) if dedup else False, "tokenizer": tokenizer_hash(tokenizer),
            "block_size": block_size, "shard_blocks": shard_blocks}


def fingerprint_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def default_shard_blocks(block_size: int) -> int:
    return max(1, SHARD_TOKENS // block_size)


def preparation_folder(spec: Mapping, tokenizer, *, block_size: int, root: str | os.PathLike,
                       shard_blocks: int | None = None, where: str = "dataset") -> tuple[Path, dict]:
    _check_spec(spec, where)
    inputs = fingerprint_inputs(spec, tokenizer, block_size=block_size,
                                shard_blocks=shard_blocks or default_shard_blocks(block_size))
    return Path(root) / fingerprint_of(inputs)[:16], inputs


def find_prepared(spec: Mapping, tokenizer, *, block_size: int, root: str | os.PathLike,
                  shard_blocks: int | None = None) -> Prepared | None:
    """The complete preparation matching these inputs, or None."""
    folder, inputs = preparation_folder(spec, tokenizer, block_size=block_size, root=root, shard_blocks=shard_blocks)
    manifest = read_prepared_manifest(folder)
    if manifest is None or manifest["fingerprint"] != fingerprint_of(inputs):
        return None
    return Prepared(folder, manifest, reused=True)


# --------------------------------------------------------------------------- pass 1: stream, clean, tokenise, sign


def _stream_rows(spec: Mapping, reports: dict[str, ValidationReport], sampled: Counter,
                 where: str) -> Iterator[str]:
    """The texts of every source in order, `rows: N` taking the first N, `fraction: f` each row with probability f."""
    seed = int(spec.get("seed", 0))
    for i, source in enumerate(spec["sources"]):
        path = str(source["path"])
        report = reports.setdefault(path, ValidationReport(source=path))
        rng = random.Random(f"{seed}:{i}:{path}")
        limit = int(source["rows"]) if "rows" in source else None
        fraction = float(source.get("fraction", 1.0))
        if not 0 < fraction <= 1:
            raise ConfigError(f"{where}.sources[{i}].fraction: {fraction} is not in (0, 1]")
        rows = iter_rows(path, report, format=source.get("format"), fields=source.get("fields"),
                         strict=bool(spec.get("strict", False)), text_unit=source.get("text_unit", "paragraph"),
                         split=source.get("split", "train"), name=source.get("name"), streaming=True)
        for row, origin in rows:
            if limit is not None and sampled[path] >= limit:
                break
            if fraction < 1 and rng.random() >= fraction:
                continue
            if not isinstance(row.get("text"), str):
                raise DataError(f"{origin}: a {sorted(row)} row; pretraining reads text rows "
                                 f"({where}.sources[{i}] {path})")
            sampled[path] += 1
            yield row["text"]
        if limit is not None and sampled[path] < limit:
            raise ConfigError(f"{where}.sources[{i}].rows: asks for {limit} rows but {path} has {sampled[path]}")


class _TokenizerRun:
    """Batched encoding straight through the Rust tokenizer (the ids `tokenizer(texts)` gives, without its
    Python-side dictionaries), truncation and padding off."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError("the tokenizer has no eos token: documents could not be separated when packed")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = Tokenizer.from_str(backend.to_str()) if backend is not None else None
        if self.backend is not None:
            self.backend.no_truncation()
            self.backend.no_padding()
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:  # `encode_batch_fast`: the same ids, without character offsets
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize_texts(run: _TokenizerRun, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, starts): the documents' ids concatenated (no EOS) and their start offsets plus the end."""
    ids = run(texts)
    starts = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(list(map(len, ids)), out=starts[1:])
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(starts[-1]))
    return tokens, starts


@dataclass
class _Batch:
    """What pass 1 keeps of one batch of rows: token ids with EOS after each surviving document, and dedup keys."""

    cleaning: Counter  # rows read and dropped by cleaning, per reason
    tokens: np.ndarray
    lengths: np.ndarray  # per document, EOS included
    exact: np.ndarray | None = None
    bands: np.ndarray | None = None  # (documents, bands) LSH band keys


class _BatchWork:
    """Pass 1's work on one batch of texts: normalise and filter, tokenise, exact key, MinHash band keys. The same
    in this process and in pass 1's worker processes, so the output does not depend on which."""

    def __init__(self, run: _TokenizerRun, clean: bool, dedup: bool):
        self.run = run
        self.filters = default_filters() if clean else None
        self.signer = Signer(NEAR_DUP) if dedup else None

    def __call__(self, texts: list[str]) -> _Batch:
        cleaning, kept = Counter(), texts
        if self.filters is not None:
            cleaning["total"], kept = len(texts), []
            for text in texts:
                text = normalize_text(text)
                reason = "empty" if not text.strip() else next((r for f in self.filters if (r := f(text))), None)
                if reason:
                    cleaning[f"dropped:{reason}"] += 1
                else:
                    kept.append(text)
        tokens, starts = tokenize_texts(self.run, kept) if kept else (np.zeros(0, np.uint32), np.zeros(1, np.int64))
        batch = _Batch(cleaning, np.insert(tokens, starts[1:], self.run.eos), np.diff(starts) + 1)
        if self.signer is not None:
            batch.exact = _exact_keys(kept)
            signatures = self.signer.signatures(tokens, starts) if kept else np.zeros((0, NEAR_DUP.num_perm),
                                                                                     np.uint32)
            batch.bands = self.signer.band_keys(signatures)
        return batch


_WORKER_STATE: _BatchWork | None = None  # set in each pass-1 worker process


def _start_worker(work: _BatchWork) -> None:
    global _WORKER_STATE
    _WORKER_STATE = work


def _work_in_worker(texts: list[str]) -> _Batch:
    return _WORKER_STATE(texts)


class _Chunk:
    """One pass-1 chunk being filled from batches."""

    def __init__(self):
        self.batches: list[_Batch] = []
        self.num_tokens = 0

    def add(self, batch: _Batch) -> None:
        self.batches.append(batch)
        self.num_tokens += len(batch.tokens)

    def save(self, folder: Path, meta: dict, dedup: bool) -> None:
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

        def joined(name: str, empty: np.ndarray) -> np.ndarray:
            parts = [getattr(b, name) for b in self.batches if len(getattr(b, name))]
            return np.concatenate(parts) if parts else empty

        np.save(tmp / "tokens.npy", joined("tokens", np.zeros(0, np.uint32)))
        np.save(tmp / "lengths.npy", joined("lengths", np.zeros(0, np.int64)))
        if dedup:
            np.save(tmp / "exact.npy", joined("exact", np.zeros(0, np.uint64)))
            bands = joined("bands", np.zeros((0, Signer(NEAR_DUP).num_bands), np.uint64))
            np.save(tmp / "bands.npy", np.ascontiguousarray(bands.T))  # (bands, documents): a band reads at once
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, folder)


def _exact_keys(texts: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(dedup_key_text(t).encode(), digest_size=8).digest(), "little")
                     for t in texts], dtype=np.uint64)


def _exit_hook(kind: str, done: int) -> None:
    wanted = os.environ.get(EXIT_HOOK, "")
    if wanted == f"{kind}:{done}":
        os._exit(75)  # an abrupt stop, as a kill would be: nothing cleans up


def default_workers() -> int:
    """Pass-1 worker processes: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _BatchRunner:
    """Runs `_BatchWork` over batches in order: in this process for the first `PARALLEL_AFTER_TOKENS` tokens (a small
    corpus never starts processes), then in `workers` forked processes, a few batches ahead of the writer."""

    def __init__(self, work: _BatchWork, workers: int):
        self.work, self.workers = work, workers
        self.pool, self.pending = None, deque()

    def submit(self, texts: list[str], end: int) -> Iterator[tuple[_Batch, int]]:
        """Queue a batch (`end`: rows consumed through it); yields the batches that are done, in order."""
        if self.pool is None:
            yield self.work(texts), end
            return
        self.pending.append((self.pool.apply_async(_work_in_worker, (texts,)), end))
        while len(self.pending) > 2 * self.workers:
            result, done = self.pending.popleft()
            yield result.get(), done

    def drain(self) -> Iterator[tuple[_Batch, int]]:
        while self.pending:
            result, done = self.pending.popleft()
            yield result.get(), done

    def go_parallel(self) -> None:
        if self.pool is not None or self.workers < 2:
            return
        import gc
        import multiprocessing

        gc.freeze()  # the workers share this process's objects copy-on-write; collections would copy them
        configured = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited: one thread a worker, no warning about the fork
        try:
            self.pool = multiprocessing.get_context("fork").Pool(self.workers, _start_worker, (self.work,))
        finally:
            gc.unfreeze()
            if configured is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = configured

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _chunk_pass(spec: Mapping, tokenizer, work: Path, where: str, workers: int) -> dict:
    """Pass 1, resuming after the last finished chunk. Returns the validation, sampling and cleaning counts."""
    work.mkdir(parents=True, exist_ok=True)
    done = sorted(p for p in work.glob("chunk-*") if not p.name.endswith(".partial"))
    last = json.loads((done[-1] / "meta.json").read_text()) if done else None
    skip = last["rows_consumed"] if last else 0
    cleaning = Counter(last["cleaning"]) if last else Counter()
    if done:
        print(f"resuming preparation: {len(done)} finished chunk(s) kept ({skip} rows)")
    reports: dict[str, ValidationReport] = {}
    sampled: Counter = Counter()
    dedup = bool(spec.get("dedup", True))
    runner = _BatchRunner(_BatchWork(_TokenizerRun(tokenizer), bool(spec.get("clean", True)), dedup), workers)
    chunk, consumed, written, texts, tokens_done = _Chunk(), 0, len(done), [], 0

    def take(finished: Iterator[tuple[_Batch, int]]) -> None:
        nonlocal chunk, written, tokens_done
        for batch, end in finished:
            cleaning.update(batch.cleaning)
            chunk.add(batch)
            tokens_done += len(batch.tokens)
            if tokens_done >= PARALLEL_AFTER_TOKENS:
                runner.go_parallel()
            if chunk.num_tokens >= CHUNK_TOKENS:
                chunk.save(work / f"chunk-{written:05d}", {"rows_consumed": end, "cleaning": dict(cleaning)}, dedup)
                written += 1
                chunk = _Chunk()
                _exit_hook("chunks", written - len(done))

    try:
        for text in _stream_rows(spec, reports, sampled, where):
            consumed += 1
            if consumed <= skip:
                continue
            texts.append(text)
            if len(texts) >= BATCH_ROWS:
                take(runner.submit(texts, consumed))
                texts = []
        if texts:
            take(runner.submit(texts, consumed))
        take(runner.drain())
    finally:
        runner.close()
    if chunk.batches or not written:
        chunk.save(work / f"chunk-{written:05d}", {"rows_consumed": consumed, "cleaning": dict(cleaning)}, dedup)
        written += 1
        _exit_hook("chunks", written - len(done))
    validation = {path: {"records": r.records, "kept": r.kept, "dropped": dict(r.dropped)}
                  for path, r in reports.items()}
    return {"validation": validation, "sampled": dict(sampled), "cleaning": dict(cleaning)}


# --------------------------------------------------------------------------- pass 2: duplicates, eval split


def _chunks(work: Path) -> list[Path]:
    return sorted(p for p in work.glob("chunk-*") if not p.name.endswith(".partial"))


def _load(chunk: Path, name: str) -> np.ndarray:
    return np.load(chunk / f"{name}.npy", mmap_mode="r")


class _ChunkDocuments:
    """Document i's tokens (no EOS) across the chunks, each read with one `pread`: no chunk is mapped, so what is
    read does not stay in this process's memory. Holds 8 bytes per document (its offset in its chunk)."""

    def __init__(self, chunks: list[Path]):
        self.files, self.data_offsets, self.ends = [], [], []
        first, firsts = 0, []
        for chunk in chunks:
            lengths = np.asarray(_load(chunk, "lengths"))
            self.ends.append(np.cumsum(lengths))
            firsts.append(first)
            first += len(lengths)
            f = open(chunk / "tokens.npy", "rb")
            version = npy_format.read_magic(f)
            _, _, dtype = (npy_format.read_array_header_1_0 if version == (1, 0)
                           else npy_format.read_array_header_2_0)(f)
            if dtype != np.uint32:
                raise DataError(f"{chunk / 'tokens.npy'}: {dtype} tokens, uint32 expected; delete {chunk} and rerun")
            self.files.append(f)
            self.data_offsets.append(f.tell())
        self.firsts = np.array(firsts, dtype=np.int64)

    def __call__(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.firsts, i, side="right")) - 1
        ends, j = self.ends[k], i - int(self.firsts[k])
        start = int(ends[j - 1]) if j else 0
        count = int(ends[j]) - start - 1  # without the EOS
        data = os.pread(self.files[k].fileno(), 4 * count, self.data_offsets[k] + 4 * start)
        return np.frombuffer(data, dtype=np.uint32)

    def __enter__(self) -> "_ChunkDocuments":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files:
            f.close()


def _band_row(chunk: Path, band: int) -> np.ndarray:
    """One band's keys of a chunk, copied out so the file's mapping (and its pages in this process) goes at once."""
    return np.array(_load(chunk, "bands")[band])


def _statuses(spec: Mapping, chunks: list[Path], where: str) -> tuple[np.ndarray, dict]:
    sizes = [len(_load(c, "lengths")) for c in chunks]
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    total = int(offsets[-1])
    status = np.zeros(total, dtype=np.uint8)
    dedup = {"documents": total, "exact": 0, "near": 0}
    if spec.get("dedup", True) and total:
        signer = Signer(NEAR_DUP)
        with _ChunkDocuments(chunks) as document:
            parent, exact = find_duplicates(
                total, np.concatenate([np.array(_load(c, "exact")) for c in chunks]),
                lambda band: np.concatenate([_band_row(c, band) for c in chunks]),
                signer.num_bands, lambda i: signer.shingle_set(document(i)), NEAR_DUP.threshold)
        duplicate = parent != np.arange(total)
        status[duplicate & ~exact] = NEAR
        status[exact] = EXACT
        dedup.update(exact=int(exact.sum()), near=int((duplicate & ~exact).sum()))
    survivors = np.flatnonzero(status == TRAIN)
    test_size = spec.get("test_size", 0) or 0
    n_eval = round(test_size * len(survivors)) if isinstance(test_size, float) else int(test_size)
    if test_size and not 0 < n_eval < len(survivors):
        raise ConfigError(f"{where}.test_size: {test_size!r} leaves no train or no eval documents of "
                         f"{len(survivors)}")
    if n_eval:
        chosen = np.random.default_rng(int(spec.get("seed", 0))).choice(survivors, n_eval, replace=False)
        status[chosen] = EVAL
    return status, dedup


# --------------------------------------------------------------------------- pass 3: pack and write shards


class _ShardStream:
    """One split's token stream cut into shards of `shard_blocks` blocks; shards already on disk are kept."""

    def __init__(self, folder: Path, split: str, block_size: int, shard_blocks: int, fingerprint: str):
        self.folder, self.split, self.fingerprint = folder, split, fingerprint
        self.block_size, self.shard_blocks = block_size, shard_blocks
        self.carry = np.zeros(0, dtype=np.uint32)
        self.shards: list[ShardInfo] = []
        self.tokens = self.documents = self.kept = self.written = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.tokens += len(tokens)
        self.documents += documents
        buffer = np.concatenate((self.carry, tokens))
        per_shard = self.shard_blocks * self.block_size
        start = 0
        while len(buffer) - start >= per_shard:
            self._shard(buffer[start:start + per_shard])
            start += per_shard
        self.carry = buffer[start:]

    def finish(self) -> dict:
        usable = len(self.carry) - len(self.carry) % self.block_size
        if usable:
            self._shard(self.carry[:usable])
        return {"documents": self.documents, "tokens": self.tokens, "blocks": sum(s.blocks for s in self.shards),
                "dropped_tokens": len(self.carry) - usable, "shards": [asdict(s) for s in self.shards]}

    def _shard(self, tokens: np.ndarray) -> None:
        index, blocks = len(self.shards), tokens.reshape(-1, self.block_size)
        path = shard_path(self.folder, self.split, index)
        if path.is_file():
            info = ShardInfo(str(path.relative_to(self.folder)), len(blocks), None)
            try:
                check_shard(self.folder, info, self.fingerprint)
                self.shards.append(ShardInfo(info.file, info.blocks, path.stat().st_size))
                self.kept += 1
                return
            except ShardError as e:
                print(f"redoing {e}")
        self.shards.append(write_shard(self.folder, self.split, index, blocks, self.fingerprint))
        self.written += 1
        _exit_hook("shards", self.written)


def _pack_pass(folder: Path, chunks: list[Path], status: np.ndarray, block_size: int, shard_blocks: int,
               fingerprint: str) -> dict:
    for partial in folder.glob("*/*.partial"):
        partial.unlink()
    streams = {split: _ShardStream(folder, split, block_size, shard_blocks, fingerprint)
               for split in ("train", "eval")}
    first = 0
    for chunk in chunks:
        lengths = np.asarray(_load(chunk, "lengths"))
        tokens = _load(chunk, "tokens")
        mine = status[first:first + len(lengths)]
        first += len(lengths)
        for code, stream in ((TRAIN, streams["train"]), (EVAL, streams["eval"])):
            chosen = mine == code
            if chosen.any():
                stream.add(np.asarray(tokens[np.repeat(chosen, lengths)]), int(chosen.sum()))
    splits = {split: stream.finish() for split, stream in streams.items()}
    kept = sum(s.kept for s in streams.values())
    if kept:
        print(f"resuming preparation: {kept} finished shard(s) kept")
    if not splits["eval"]["documents"]:
        del splits["eval"]
    return splits


# --------------------------------------------------------------------------- entry points


def prepare(spec: Mapping, tokenizer, *, block_size: int, root: str | os.PathLike, shard_blocks: int | None = None,
            where: str = "dataset", tokenizer_path: str | None = None, workers: int | None = None) -> Prepared:
    """Prepare (or reuse) the shards for this spec, tokenizer and block size; see the module docstring."""
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    shard_blocks = shard_blocks or default_shard_blocks(block_size)
    folder, inputs = preparation_folder(spec, tokenizer, block_size=block_size, root=root,
                                        shard_blocks=shard_blocks, where=where)
    fingerprint = fingerprint_of(inputs)
    existing = find_prepared(spec, tokenizer, block_size=block_size, root=root, shard_blocks=shard_blocks)
    if existing is not None:
        for split in existing.manifest["splits"]:
            for info in existing.manifest["splits"][split]["shards"]:
                check_shard(folder, info, fingerprint)
        return existing
    started = time.monotonic()
    (folder / "FAILED").unlink(missing_ok=True)
    work = folder / "work"
    counts = _chunk_pass(spec, tokenizer, work, where, default_workers() if workers is None else workers)
    chunks = _chunks(work)
    status, dedup = _statuses(spec, chunks, where)
    splits = _pack_pass(folder, chunks, status, block_size, shard_blocks, fingerprint)
    if not splits["train"]["blocks"]:
        raise ConfigError(f"{where}: {splits['train']['tokens']} training tokens make no block of {block_size}; "
                         "add data or lower block_size")
    manifest = {"fingerprint": fingerprint, "inputs": inputs, "block_size": block_size,
                "shard_blocks": shard_blocks, "tokenizer_name_or_path": tokenizer_path,
                "report": {**counts, "dedup": dedup}, "splits": splits,
                "seconds": round(time.monotonic() - started, 1)}
    shutil.rmtree(work)  # the token spool: the shards now hold what training needs
    write_prepared_manifest(folder, manifest)
    return Prepared(folder, manifest)


def prepare_once(spec: Mapping, tokenizer, *, block_size: int, root: str | os.PathLike,
                 shard_blocks: int | None = None, rank: int | None = None, poll_seconds: float = 1.0,
                 timeout_seconds: float | None = None, **kwargs) -> Prepared:
    """Rank 0 prepares (or reuses); every other rank waits for `prepared.json`, then opens the same shards.

    Ranks come from the `RANK` variable that torchrun and Accelerate set; `root` must be a folder all ranks see.
    A failure on rank 0 is written to `FAILED` in the preparation folder, so the others stop with its message.
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank == 0:
        folder, _ = preparation_folder(spec, tokenizer, block_size=block_size, root=root, shard_blocks=shard_blocks)
        try:
            return prepare(spec, tokenizer, block_size=block_size, root=root, shard_blocks=shard_blocks, **kwargs)
        except Exception as e:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "FAILED").write_text(f"{type(e).__name__}: {e}")
            raise
    folder, inputs = preparation_folder(spec, tokenizer, block_size=block_size, root=root, shard_blocks=shard_blocks)
    started, waited_since = time.time(), time.monotonic()
    print(f"rank {rank}: waiting for rank 0 to prepare {folder}")
    while True:
        found = find_prepared(spec, tokenizer, block_size=block_size, root=root, shard_blocks=shard_blocks)
        if found is not None:
            return found
        failed = folder / "FAILED"
        if failed.is_file() and failed.stat().st_mtime >= started - 1:
            raise RuntimeError(f"rank 0 failed to prepare {folder}: {failed.read_text()}")
        if timeout_seconds is not None and time.monotonic() - waited_since > timeout_seconds:
            raise TimeoutError(f"rank {rank}: {folder / MANIFEST_NAME} did not appear in {timeout_seconds} s")
        time.sleep(poll_seconds)


def describe(prepared: Prepared, tokenizer=None, *, samples: int = 1) -> str:
    """What `pipeline data inspect` prints for prepared shards: counts, token totals and decoded blocks."""
    lines = [prepared.summary()]
    for split, info in prepared.manifest["splits"].items():
        for shard in info["shards"]:
            lines.append(f"  {shard['file']}: {shard['blocks']} blocks, {shard['bytes']} bytes")
    train = prepared.dataset("train")
    if tokenizer is not None:
        for i in range(min(samples, len(train))):
            lines.append(f"\n--- block {i + 1} of {len(train)} ({prepared.manifest['block_size']} tokens; "
                         f"{tokenizer.eos_token} separates documents)")
            lines.append(tokenizer.decode(train[i]["input_ids"]))
    return "\n".join(lines)


def open_prepared(folder: str | os.PathLike) -> Prepared:
    folder = Path(folder)
    manifest = read_prepared_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME}: not a complete preparation (run "
                                f"`pipeline data prepare --config STAGE.yaml` first)")
    return Prepared(folder, manifest, reused=True)
