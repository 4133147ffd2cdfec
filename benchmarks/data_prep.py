"""Pretraining data preparation speed: tokenize + pack through `datasets.map` vs raw `tokenizers` encode_batch.

Both sides tokenise the same documents with the same trained tokenizer; ours also appends EOS, packs into fixed
blocks and builds an Arrow dataset. Runs alternate and the median is reported; the goal is a ratio >= 0.5.

    python benchmarks/data_prep.py                                        # embedded demo corpus
    python benchmarks/data_prep.py --text ../shared/data/pretrain/tinyshakespeare.txt --repeats 5
"""

import argparse
import json
import platform
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", help="a text source (any format `pipeline data validate` reads); default: demo corpus")
    parser.add_argument("--documents", type=int, default=4000, help="demo documents when --text is not given")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

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
