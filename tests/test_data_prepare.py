"""Streamed pretraining preparation (pipeline.data.prepare): shards, fingerprints, resume, ranks, dedup at scale."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pyarrow as pa
import pytest
from datasets import Dataset
from datasketch import MinHash

from conftest import REPO
from pipeline.data import prepare as prep
from pipeline.data.minhash_index import NearDupSettings, Signer, find_duplicates, jaccard
from pipeline.data.packing import tokenize_and_pack
from pipeline.data.prepare import EXIT_HOOK, find_prepared, prepare
from pipeline.data.shards import ShardError
from test_data_packing import make_tokenizer

WORDS = ("river stone lamp garden window paper cloud violin harbor candle meadow silver engine forest basket "
         "lantern orchard pebble thunder canyon").split()


def corpus(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + "." for _ in range(n)]


DOCS = corpus()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(DOCS + ["学而时习之"], vocab_size=300)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def plain(path, **extra):
    return {"sources": [{"path": str(path)}], "clean": False, "dedup": False, "test_size": 0, **extra}


def blocks(prepared, split="train"):
    return prepared.dataset(split)["input_ids"]


@pytest.mark.parametrize("block_size,shard_blocks", [(7, 5), (32, 1000)])
def test_shards_equal_in_memory_packing_token_for_token(tokenizer, tmp_path, block_size, shard_blocks):
    source = write_jsonl(tmp_path / "c.jsonl", DOCS + ["", "x"])
    prepared = prepare(plain(source), tokenizer, block_size=block_size, root=tmp_path / "prep",
                       shard_blocks=shard_blocks)
    # the empty row is dropped by validation, as `load_rows` drops it for the in-memory path
    assert sum(prepared.manifest["report"]["validation"][str(source)]["dropped"].values()) == 1
    reference = tokenize_and_pack(Dataset.from_dict({"text": DOCS + ["x"]}), tokenizer, block_size=block_size)
    assert blocks(prepared) == reference.dataset["input_ids"]
    train = prepared.manifest["splits"]["train"]
    assert train["blocks"] == reference.report.num_blocks
    assert train["tokens"] == reference.report.num_tokens
    assert train["dropped_tokens"] == reference.report.dropped_tokens
    assert len(train["shards"]) == -(-reference.report.num_blocks // shard_blocks)


def test_signatures_equal_datasketch_minhash(tokenizer):
    signer = Signer(NearDupSettings(num_perm=64))
    texts = DOCS[:5] + ["ab"]  # the last is shorter than one 5-token shingle
    tokens, starts = prep.tokenize_texts(prep._TokenizerRun(tokenizer), texts)
    hashes, owners = signer.shingle_hashes(tokens, starts)
    signatures = signer.signatures(tokens, starts)
    for doc in range(len(texts)):
        expected = MinHash(num_perm=64, seed=1, hashfunc=int)
        expected.update_batch(hashes[owners == doc])
        assert np.array_equal(signatures[doc], expected.hashvalues)


def test_near_duplicates_are_confirmed_by_exact_jaccard():
    """Copies of a document with k tokens replaced, 5 or more apart (Jaccard (296 - 5k) / (296 + 5k)): those at or
    above 0.8 are dropped, those below kept, including 0.816 and 0.789, where a 128-permutation estimate errs often."""
    signer = Signer(NearDupSettings())
    rng = np.random.default_rng(0)
    docs, expected = [], {}
    for k in (3, 5, 6, 7, 9):
        base = rng.integers(0, 50_000, size=300).astype(np.uint32)
        copy = base.copy()
        copy[np.arange(k) * 30 + 10] = 60_000 + np.arange(k)
        similarity = jaccard(signer.shingle_set(base), signer.shingle_set(copy))
        assert similarity == pytest.approx((296 - 5 * k) / (296 + 5 * k))
        docs += [base, copy]
        expected[len(docs) - 1] = len(docs) - 2 if k <= 6 else len(docs) - 1
    tokens, starts = np.concatenate(docs), np.cumsum([0] + [len(d) for d in docs])
    bands = signer.band_keys(signer.signatures(tokens, starts))
    parent, exact = find_duplicates(len(docs), np.arange(len(docs), dtype=np.uint64), lambda b: bands[:, b],
                                    signer.num_bands, lambda i: signer.shingle_set(docs[i]), 0.8)
    assert not exact.any() and {i: int(parent[i]) for i in expected} == expected


def test_worker_processes_give_the_in_process_result_and_map_no_chunk(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "PARALLEL_AFTER_TOKENS", 0)  # workers from the first batch
    monkeypatch.setattr(prep, "BATCH_ROWS", 16)
    monkeypatch.setattr(prep, "CHUNK_TOKENS", 300)
    long = [" ".join(np.random.default_rng(i).choice(WORDS, size=60)) for i in range(20)]
    near = [" ".join(t.split()[:-1] + ["zebra"]) for t in long[:5]]
    texts = DOCS + long + near + DOCS[:10] + ["spam spam spam\nspam spam spam\nspam spam spam"]
    spec = {"sources": [{"path": str(write_jsonl(tmp_path / "c.jsonl", texts))}], "test_size": 0.1}
    mapped = []
    original = Signer.shingle_set
    monkeypatch.setattr(Signer, "shingle_set", lambda self, t: mapped.append(
        "chunk-" in open("/proc/self/maps").read()) or original(self, t))
    pools = []
    go_parallel = prep._BatchRunner.go_parallel
    monkeypatch.setattr(prep._BatchRunner, "go_parallel", lambda self: go_parallel(self) or pools.append(self.pool))
    alone = prepare(spec, tokenizer, block_size=8, root=tmp_path / "alone", workers=0)
    assert not any(pools)
    parallel = prepare(spec, tokenizer, block_size=8, root=tmp_path / "parallel", workers=2)
    assert any(pools)
    assert mapped and not any(mapped)  # pass 2 reads the chunks without mapping them (memory stays bounded)
    assert alone.manifest["report"] == parallel.manifest["report"]
    assert alone.manifest["report"]["dedup"] == {"documents": len(texts) - 1, "exact": 10, "near": 5}
    assert alone.manifest["splits"] == parallel.manifest["splits"]
    for split in ("train", "eval"):
        assert blocks(alone, split) == blocks(parallel, split)


def test_fingerprint_reused_and_invalidated_by_tokenizer_block_size_and_source(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", DOCS)
    root = tmp_path / "prep"
    first = prepare(plain(source), tokenizer, block_size=16, root=root)
    again = prepare(plain(source), tokenizer, block_size=16, root=root)
    assert not first.reused and again.reused and again.folder == first.folder
    other_tokenizer = make_tokenizer(DOCS, vocab_size=280)
    assert find_prepared(plain(source), other_tokenizer, block_size=16, root=root) is None
    assert find_prepared(plain(source), tokenizer, block_size=17, root=root) is None
    assert prepare(plain(source), tokenizer, block_size=17, root=root).folder != first.folder
    write_jsonl(source, DOCS[:-1])  # the source changes
    assert find_prepared(plain(source), tokenizer, block_size=16, root=root) is None
    changed = prepare(plain(source), tokenizer, block_size=16, root=root)
    assert changed.folder != first.folder and changed.manifest["splits"]["train"]["documents"] == len(DOCS) - 1
    assert len({p.name for p in root.iterdir()}) == 3


def test_exact_and_near_duplicates_dropped_and_counted(tokenizer, tmp_path):
    long = [" ".join(np.random.default_rng(i).choice(WORDS, size=150)) for i in range(6)]
    near = long[1].split()
    near[70] = "zebra"  # one word of 150 changed
    texts = long + ["  " + long[0].upper() + " ", " ".join(near), long[2] + " " + long[3]]
    source = write_jsonl(tmp_path / "c.jsonl", texts)
    prepared = prepare({"sources": [{"path": str(source)}], "clean": False, "test_size": 0}, tokenizer,
                       block_size=8, root=tmp_path / "prep")
    assert prepared.manifest["report"]["dedup"] == {"documents": 9, "exact": 1, "near": 1}
    kept = [long[i] for i in range(6)] + [long[2] + " " + long[3]]
    reference = tokenize_and_pack(Dataset.from_dict({"text": kept}), tokenizer, block_size=8)
    assert blocks(prepared) == reference.dataset["input_ids"]


def test_cleaning_and_eval_split_are_counted(tokenizer, tmp_path):
    texts = DOCS[:60] + ["\u200b", "spam spam spam\nspam spam spam\nspam spam spam\nspam spam spam"]
    source = write_jsonl(tmp_path / "c.jsonl", texts)
    prepared = prepare({"sources": [{"path": str(source)}], "dedup": False, "test_size": 10}, tokenizer,
                       block_size=8, root=tmp_path / "prep")
    report = prepared.manifest["report"]
    assert report["cleaning"] == {"total": 62, "dropped:empty": 1, "dropped:dup_line_frac": 1}
    splits = prepared.manifest["splits"]
    assert (splits["train"]["documents"], splits["eval"]["documents"]) == (50, 10)
    assert len(prepared.dataset("eval")) == splits["eval"]["blocks"] > 0
    summary = prepared.summary()
    assert "dropped dup_line_frac 1, empty 1" in summary and "eval: 10 documents" in summary


RUN = """
import os, sys, json
sys.path.insert(0, {tests!r})
from pipeline.data import prepare as prep
from pipeline.data.tokenizer import load_tokenizer
prep.CHUNK_TOKENS, prep.BATCH_ROWS = 200, 16
calls = []
original = prep.tokenize_texts
prep.tokenize_texts = lambda run, texts: calls.append(len(texts)) or original(run, texts)
result = prep.prepare_once(json.loads(sys.argv[1]), load_tokenizer(sys.argv[2]), block_size=8, root=sys.argv[3],
                           shard_blocks=20, poll_seconds=0.1, timeout_seconds=60)
print(json.dumps({{"tokenised_batches": len(calls), "blocks": len(result.dataset("train"))}}))
"""


def run_preparer(spec, tokenizer_dir, root, env=None):
    script = RUN.format(tests=str(REPO / "tests"))
    return subprocess.Popen([sys.executable, "-c", script, json.dumps(spec), str(tokenizer_dir), str(root)],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)


def test_two_ranks_prepare_once(tokenizer_dir, tmp_path):
    spec = plain(write_jsonl(tmp_path / "c.jsonl", DOCS * 3))
    waiter = run_preparer(spec, tokenizer_dir, tmp_path / "prep", {"RANK": "1", "WORLD_SIZE": "2"})
    main = run_preparer(spec, tokenizer_dir, tmp_path / "prep", {"RANK": "0", "WORLD_SIZE": "2"})
    outputs = [p.communicate(timeout=120) for p in (main, waiter)]
    assert [p.returncode for p in (main, waiter)] == [0, 0], outputs
    main_result, waiter_result = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert main_result["tokenised_batches"] > 0 and waiter_result["tokenised_batches"] == 0
    assert waiter_result["blocks"] == main_result["blocks"] > 0
    assert "rank 1: waiting for rank 0" in outputs[1][0]


def test_killed_preparation_resumes_to_the_uninterrupted_result(tokenizer, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_TOKENS", prep.CHUNK_TOKENS)
    monkeypatch.setattr(prep, "BATCH_ROWS", prep.BATCH_ROWS)
    spec = {"sources": [{"path": str(write_jsonl(tmp_path / "c.jsonl", DOCS * 3 + corpus(40, seed=1)))}],
            "test_size": 0.1}
    prep.CHUNK_TOKENS, prep.BATCH_ROWS = 200, 16  # as the subprocesses run it (restored by monkeypatch)
    reference = prepare(spec, tokenizer, block_size=8, root=tmp_path / "reference", shard_blocks=20)
    for hook in ("chunks:2", "shards:2"):
        killed = run_preparer(spec, tokenizer_dir, tmp_path / "prep", {EXIT_HOOK: hook})
        killed.communicate(timeout=120)
        assert killed.returncode == 75
    (folder,) = (tmp_path / "prep").iterdir()
    assert len(list((folder / "train").glob("shard-*.arrow"))) >= 2 and not (folder / "prepared.json").exists()
    out, err = run_preparer(spec, tokenizer_dir, tmp_path / "prep").communicate(timeout=120)
    assert "finished shard(s) kept" in out and "finished chunk(s) kept" in out, out + err
    done = reference.folder
    for split in ("train", "eval"):
        for shard in sorted((done / split).glob("*.arrow")):
            assert (folder / split / shard.name).read_bytes() == shard.read_bytes()
    resumed, uninterrupted = (json.loads((f / "prepared.json").read_text()) for f in (folder, done))
    assert resumed["splits"] == uninterrupted["splits"] and resumed["report"] == uninterrupted["report"]
    assert json.loads(out.strip().splitlines()[-1])["blocks"] == len(reference.dataset("train"))


def test_truncated_and_foreign_shards_are_refused_with_their_file(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", DOCS)
    prepared = prepare(plain(source), tokenizer, block_size=8, root=tmp_path / "prep", shard_blocks=30)
    shard = prepared.folder / "train" / "shard-00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"train/shard-00001\.arrow: truncated"):
        prepared.dataset("train")
    with pytest.raises(ShardError, match=r"shard-00001\.arrow: truncated"):
        prepare(plain(source), tokenizer, block_size=8, root=tmp_path / "prep", shard_blocks=30)
    other = prepare(plain(source, seed=5), tokenizer, block_size=8, root=tmp_path / "prep", shard_blocks=30)
    shard.write_bytes((other.folder / "train" / "shard-00001.arrow").read_bytes())
    with pytest.raises(ShardError, match=r"shard-00001\.arrow: foreign shard"):
        prepared.dataset("train")


def test_streams_a_local_folder_and_a_hub_id(tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", DOCS[:30])
    pq.write_table(pa.table({"text": DOCS[30:50]}), folder / "b.parquet")
    local = prepare(plain(folder), tokenizer, block_size=8, root=tmp_path / "prep")
    reference = tokenize_and_pack(Dataset.from_dict({"text": DOCS[:50]}), tokenizer, block_size=8)
    assert blocks(local) == reference.dataset["input_ids"]

    import datasets

    asked = []

    def offline_hub(path, name=None, split=None, streaming=False):
        asked.append((path, name, split, streaming))
        return Dataset.from_dict({"text": DOCS[:50]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    spec = plain("org/corpus")
    spec["sources"][0].update(name="sample", rows=40)
    hub = prepare(spec, tokenizer, block_size=8, root=tmp_path / "prep")
    assert asked == [("org/corpus", "sample", "train", True)]
    assert hub.manifest["report"]["sampled"] == {"org/corpus": 40}
    reference = tokenize_and_pack(Dataset.from_dict({"text": DOCS[:40]}), tokenizer, block_size=8)
    assert blocks(hub) == reference.dataset["input_ids"]


def test_cli_prepares_from_the_stage_config_and_inspect_shows_the_shards(tokenizer_dir, tmp_path, capsys):
    from pipeline.cli import main

    source = write_jsonl(tmp_path / "c.jsonl", DOCS)
    command = ["data", "prepare", "--config", str(REPO / "recipes/configs/demo/pretrain.yaml"), "--dataset_path",
               str(source), "--tokenizer_name_or_path", str(tokenizer_dir), "--output_dir",
               str(tmp_path / "out" / "pretrain"), "--block_size", "16"]
    assert main(command) == 0
    (folder,) = (tmp_path / "out" / "prepared").iterdir()
    manifest = json.loads((folder / "prepared.json").read_text())
    assert f"prepared data written: {folder}" in capsys.readouterr().out
    assert manifest["inputs"]["test_size"] == 0.02 and manifest["block_size"] == 16
    assert main(command) == 0
    assert f"prepared data reused: {folder}" in capsys.readouterr().out
    assert main(["data", "inspect", "--prepared", str(folder)]) == 0
    shown = capsys.readouterr().out
    train = manifest["splits"]["train"]
    assert f"{train['tokens']} tokens (with EOS) -> {train['blocks']} blocks of 16" in shown
    assert f"--- block 1 of {train['blocks']}" in shown and "<|eos|>" in shown
    assert main(["data", "inspect", "--config", str(REPO / "recipes/configs/demo/pretrain.yaml"), "--dataset_path",
                 str(source), "--tokenizer_name_or_path", str(tokenizer_dir), "--output_dir",
                 str(tmp_path / "out" / "pretrain"), "--block_size", "16", "-n", "1"]) == 0
    assert f"prepared data reused: {folder}" in capsys.readouterr().out  # inspect of the config finds the shards
    (folder / "train" / "shard-00000.arrow").write_bytes(b"")
    assert main(command) == 1
    assert "train/shard-00000.arrow: truncated" in capsys.readouterr().err
