"""Tokenizer stage: a byte-level BPE with the chat template, trained on the stage's text sources."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.data.formats import iter_texts
from pipeline.data.tokenizer import train_tokenizer
from pipeline.artifacts import StageOutput, build_manifest, write_once
from pipeline.stages.common import check_distributed_setup
from pipeline.stages.training import DataArguments, dataset_records, resolve_mixture


@dataclass
class TokenizerArguments(DataArguments):
    output_dir: str = field(default="outputs/demo/tokenizer", metadata={"help": "where the tokenizer is written"})
    vocab_size: int = field(default=1024, metadata={"help": "vocabulary size, special tokens included"})
    min_frequency: int = field(default=2, metadata={"help": "merges seen fewer times are not learned"})
    model_max_length: int = field(default=2048, metadata={"help": "recorded in tokenizer_config.json"})
    split_cjk_characters: bool = field(default=True, metadata={
        "help": "make every CJK character its own pre-token, so merges never span several Chinese words"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished output_dir"})
    seed: int = field(default=0, metadata={"help": "mixture sampling seed"})


def run_tokenizer(args: TokenizerArguments) -> Path:
    """Train and write the tokenizer, on the main process alone when several are launched (the others wait)."""
    check_distributed_setup(None)
    write_once(lambda: _train(args), done=lambda: False)
    return Path(args.output_dir)


def _train(args: TokenizerArguments) -> None:
    started = time.monotonic()
    with StageOutput(args.output_dir, overwrite=args.overwrite) as out:
        mixture = resolve_mixture(args)
        texts = [text for row in mixture.train for text in iter_texts(row)]
        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                                    model_max_length=args.model_max_length,
                                    split_cjk_characters=args.split_cjk_characters)
        tokenizer.save_pretrained(out.work)
        chars = sum(len(t) for t in texts)
        tokens = sum(len(ids) for ids in tokenizer(texts[:2000])["input_ids"])
        sample_chars = sum(len(t) for t in texts[:2000])
        metrics = {"vocab_size": len(tokenizer), "texts": len(texts), "chars": chars,
                   "chars_per_token": round(sample_chars / max(tokens, 1), 3),
                   "wall_seconds": round(time.monotonic() - started, 1)}
        out.finish(build_manifest("tokenizer", artifact="tokenizer", config={"stage": asdict(args)},
                                  tokenizer=tokenizer, datasets=dataset_records(mixture, args), metrics=metrics))
    print(f"tokenizer: {metrics}")
