"""Pretraining data preparation speed: tokenize + pack through `datasets.map` vs raw `tokenizers` encode_batch.

Both sides tokenise the same documents with the same trained tokenizer; ours also appends EOS, packs into fixed
blocks and builds an Arrow dataset. Runs alternate and the median is reported; the goal is a ratio >= 0.5.

    python benchmarks/data_prep.py                                        # embedded demo corpus
    python benchmarks/data_prep.py --text ../shared/data/pretrain/tinyshakespeare.txt --repeats 5

`--prepare_mb N` measures `pipeline.data.prepare` end to end instead (read + clean + dedup + tokenise + pack + write
shards) on a generated corpus of N MB with planted near-duplicates, against raw encode_batch on the same text, with
the peak RSS of the preparing process; then the planted near-duplicates' recall and precision on a sample.

    python benchmarks/data_prep.py --prepare_mb 100
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import statistics
import tempfile
import time

import datasets
from datasets import Dataset

from pipeline.data.demo_tasks import pretraining_corpus
from pipeline.data.packing import tokenize_and_pack
from pipeline.data.tokenizer import train_tokenizer
from pipeline.data.validation import load_rows


def documents(args) -> list[str]:
    if args.text:
        return [row["text"] for row in load_rows(args.text).rows]
    return pretraining_corpus(args.documents, seed=0)


def raw_tokens_per_second(tokenizer, docs) -> float:
    backend = tokenizer.backend_tokenizer
    start = time.perf_counter()
    encodings = backend.encode_batch(docs, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    return tokens / (time.perf_counter() - start)


def ours_tokens_per_second(tokenizer, dataset, args) -> tuple[float, object]:
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: measure the work, not a cache hit
        start = time.perf_counter()
        packed = tokenize_and_pack(dataset, tokenizer, block_size=args.block_size, num_proc=args.num_proc,
                                   cache_dir=cache)
        seconds = time.perf_counter() - start
    # Count document tokens only (not the added EOS) so both sides divide the same number.
    return (packed.report.num_tokens - packed.report.num_documents) / seconds, packed.report


def generated_documents(count: int, seed: int, planted_every: int = 50, block: int = 1000):
    """Zipf-distributed made-up words, ~1 KB per document. Every `planted_every`-th document is a near-duplicate: a
    copy of a recent one (among the last 500-1000) with 1 or 2 words in 100 replaced, alternately (token 5-gram
    Jaccard 0.84-0.96 with the benchmark's tokenizer, above the 0.8 threshold). Halfway between two of them sits a
    distant copy with 6 words in 100 replaced (Jaccard 0.60-0.74), which must be kept. Yields (text, copied index
    or None, near)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "gu", "fe", "zo", "bi", "ya"]
    words = np.array(["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(5000)], dtype=object)
    cumulative = np.cumsum(1 / np.arange(1, len(words) + 1))
    cumulative /= cumulative[-1]
    recent, index = [], 0
    while index < count:
        lengths = rng.integers(120, 220, size=block).tolist()
        drawn = words[np.searchsorted(cumulative, rng.random(sum(lengths)), side="right")].tolist()
        position = 0
        for length in lengths:
            if index >= count:
                return
            phase = index % planted_every
            if phase in (planted_every - 1, planted_every // 2 - 1) and recent:
                near = phase == planted_every - 1
                source, text = recent[rng.integers(len(recent))]
                tokens = text.split()
                edits = (1 + (index // planted_every) % 2) if near else 6  # words in 100
                for k in rng.choice(len(tokens), size=max(1, edits * len(tokens) // 100), replace=False):
                    tokens[k] = "qux"
                yield " ".join(tokens), source, near
            else:
                text = " ".join(drawn[position:position + length]) + "."
                recent.append((index, text))
                if len(recent) > 1000:
                    del recent[:500]
                yield text, None, False
            position += length
            index += 1


def raw_encode_batch(backend, corpus) -> tuple[int, float, float]:
    """(tokens, seconds, cpu seconds) of `encode_batch` over the corpus's texts, 1000 at a time."""
    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    with open(corpus) as f:
        batch = []
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
                batch = []
        tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
    return tokens, time.perf_counter() - start, time.process_time() - cpu


class TreeMemory:
    """Peak of the summed PSS (proportional set size: shared pages split among the processes sharing them) of a
    process and its descendants, sampled every `every` seconds; the sum of RSS would count forked, shared pages
    once per worker."""

    def __init__(self, pid: int, every: float = 0.2):
        import threading

        import psutil

        self.root, self.every, self.peak_pss, self.peak_rss, self.stop = psutil.Process(pid), every, 0, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while not self.stop:
            pss = rss = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    info = p.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
            except psutil.Error:
                pass
            else:
                self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            time.sleep(self.every)

    def close(self) -> tuple[float, float]:
        self.stop = True
        self.thread.join()
        return self.peak_pss / 2**20, self.peak_rss / 2**20


def prepare_benchmark(args) -> dict:
    """End-to-end preparation of a generated corpus, in a child process so its memory is its own. Raw encode_batch
    runs before and after it and the two speeds are averaged, so load from other jobs that drifts during the run
    weighs on both sides."""
    import os
    import tempfile
    from pathlib import Path

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.prepare_mb:g}mb.jsonl"
    docs, size, planted = 0, 0, 0
    with open(corpus, "w") as f:
        for text, _, near in generated_documents(10**9, seed=0):
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            docs, size, planted = docs + 1, size + len(line), planted + near
            if size >= args.prepare_mb * 1_000_000:
                break
    sample = [text for text, _, _ in generated_documents(2000, seed=0)]
    tokenizer = train_tokenizer(sample, vocab_size=args.vocab_size, show_progress=False)
    tokenizer.save_pretrained(work / "tokenizer")
    backend = tokenizer.backend_tokenizer
    raw_tokens, before, before_cpu = raw_encode_batch(backend, corpus)
    child = ("import json, os, sys, time; from pipeline.data.prepare import prepare; "
             "from pipeline.data.tokenizer import load_tokenizer; tok = load_tokenizer(sys.argv[2]); "
             "t = time.perf_counter(); "
             "p = prepare({'sources': [{'path': sys.argv[1]}], 'test_size': 0}, tok, "
             "block_size=int(sys.argv[3]), root=sys.argv[4], workers=int(sys.argv[5]) if sys.argv[5] else None); "
             "seconds = time.perf_counter() - t; c = os.times(); "
             "print(json.dumps({'seconds': seconds, 'cpu': c.user + c.system + c.children_user + c.children_system, "
             "'manifest': p.manifest}))")
    process = subprocess.Popen([sys.executable, "-c", child, str(corpus), str(work / "tokenizer"),
                                str(args.block_size), str(work / "prepared"), str(args.workers or "")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid)
    out, err = process.communicate()
    peak_pss, peak_rss_sum = memory.close()
    if process.returncode:
        raise RuntimeError(f"prepare failed ({process.returncode}):\n{err}")
    ours = json.loads(out.strip().splitlines()[-1])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    _, after, after_cpu = raw_encode_batch(backend, corpus)
    raw_speed = (raw_tokens / before + raw_tokens / after) / 2
    train, report = ours["manifest"]["splits"]["train"], ours["manifest"]["report"]
    ours_tokens = train["tokens"] - train["documents"]  # document tokens only, as raw counts them
    return {"corpus_mb": round(size / 1e6, 1), "documents": docs, "cores": os.cpu_count(),
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: encode_batch uses all cores)"),
            "raw_encode_batch_tok_s": round(raw_speed),
            "raw_encode_batch_tok_s_before_after": [round(raw_tokens / before), round(raw_tokens / after)],
            "prepare_seconds": round(ours["seconds"], 1),
            "prepare_tok_s": round(ours_tokens / ours["seconds"]),
            "ratio": round(ours_tokens / ours["seconds"] / raw_speed, 3),
            "cpu_seconds_raw_prepare": [round((before_cpu + after_cpu) / 2, 1), round(ours["cpu"], 1)],
            "peak_pss_mb_all_processes": round(peak_pss), "peak_rss_mb_sum_all_processes": round(peak_rss_sum),
            "peak_rss_mb_largest_process": round(peak_mb),
            "dedup": report["dedup"], "cleaning": report["cleaning"],
            "blocks": train["blocks"], "planted_near_duplicates": planted,  # and as many distant copies to keep
            **near_duplicate_quality(tokenizer, args.quality_docs)}


def near_duplicate_quality(tokenizer, count: int) -> dict:
    """Recall and precision of the planted near-duplicates among `count` generated documents (with as many distant
    copies that must be kept), through the same band keys and confirmation `prepare` uses (which documents were
    dropped is not kept by a preparation)."""
    import numpy as np

    from pipeline.data.minhash_index import Signer, find_duplicates
    from pipeline.data.prepare import NEAR_DUP, _exact_keys, _TokenizerRun, tokenize_texts

    docs = list(generated_documents(count, seed=1))
    texts = [text for text, _, _ in docs]
    signer = Signer(NEAR_DUP)
    tokens, starts = tokenize_texts(_TokenizerRun(tokenizer), texts)
    bands = signer.band_keys(signer.signatures(tokens, starts))
    parent, _ = find_duplicates(len(texts), _exact_keys(texts), lambda b: bands[:, b], signer.num_bands,
                                lambda i: signer.shingle_set(tokens[starts[i]:starts[i + 1]]), NEAR_DUP.threshold)
    dropped = set(np.flatnonzero(parent != np.arange(len(texts))).tolist())
    planted = {i for i, (_, source, near) in enumerate(docs) if near}
    distant = sum(1 for _, source, near in docs if source is not None and not near)
    hits = len(dropped & planted)
    return {"quality_documents": count, "planted": len(planted), "distant_copies_to_keep": distant,
            "dropped": len(dropped), "recall": round(hits / len(planted), 4),
            "precision": round(hits / len(dropped), 4) if dropped else 1.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", help="a text source (any format `pipeline data validate` reads); default: demo corpus")
    parser.add_argument("--documents", type=int, default=4000, help="demo documents when --text is not given")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prepare_mb", type=float, help="benchmark `prepare` end to end on a generated corpus")
    parser.add_argument("--quality_docs", type=int, default=20000, help="documents for the near-duplicate check")
    parser.add_argument("--work_dir", help="where the generated corpus and shards go (default: a temporary folder)")
    parser.add_argument("--workers", type=int, help="prepare's worker processes (default: one per core)")
    args = parser.parse_args(argv)
    if args.prepare_mb:
        result = prepare_benchmark(args)
        print(json.dumps(result, indent=2))
        return result

    datasets.disable_progress_bars()
    docs = documents(args)
    tokenizer = train_tokenizer(docs[:2000], vocab_size=args.vocab_size, show_progress=False)
    dataset = Dataset.from_dict({"text": docs})
    raw, ours = [], []
    for _ in range(args.repeats):
        raw.append(raw_tokens_per_second(tokenizer, docs))
        speed, report = ours_tokens_per_second(tokenizer, dataset, args)
        ours.append(speed)
    result = {
        "documents": len(docs), "tokens": report.num_tokens, "blocks": report.num_blocks,
        "raw_encode_batch_tok_s": round(statistics.median(raw)),
        "tokenize_and_pack_tok_s": round(statistics.median(ours)),
        "ratio": round(statistics.median(ours) / statistics.median(raw), 3),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    print(json.dumps(result, indent=2))
    print(f"tokenize+pack / raw encode_batch = {result['ratio']:.3f} (goal >= 0.5)")
    return result


if __name__ == "__main__":
    main()
