"""SFT speed per model family at one shape: reply-mask preparation (rows/s) and training (tokens/s).

Each family's tiny tokenizer and template come from tests/families.py (Llama 3 header tokens, Qwen2 ChatML without
generation markers, Mistral [INST], GPT-2 with the built-in chatml template) and our own tokenizer with its
marked template. Preparation is `assistant_tokens` over the rows: transformers' mask for a marked template, the
rendering search for the others, so a slowdown from masking shows as a lower rows/s. Training runs TRL's
SFTTrainer (assistant-only labels, padding) for a few steps at the same model shape; only non-pad tokens count.

    python benchmarks/sft_families.py                      # hidden 256, 4 layers, 600 demo rows, 10 steps
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from families import family_config, family_tokenizer  # noqa: E402

from pipeline.data.chat_templates import assistant_tokens, ensure_pad_token, use_chat_template  # noqa: E402
from pipeline.data.demo_tasks import sft_rows  # noqa: E402
from pipeline.data.tokenizer import train_tokenizer  # noqa: E402


def tokenizer_for(family: str, texts):
    if family == "pipeline":
        return train_tokenizer(texts, vocab_size=400, show_progress=False)
    tokenizer = family_tokenizer(family)
    use_chat_template(tokenizer, "chatml" if family == "gpt2" else None)
    ensure_pad_token(tokenizer)
    return tokenizer


def model_for(family: str, tokenizer, args):
    torch.manual_seed(0)
    name = "llama" if family == "pipeline" else family
    config = family_config(name, len(tokenizer), tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                           kv_heads=args.heads)
    if family == "pipeline":
        from pipeline.modeling import PipelineGPTConfig

        config = PipelineGPTConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.heads, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


def measure(family: str, rows, args) -> dict:
    tokenizer = tokenizer_for(family, [m["content"] for r in rows for m in r["messages"]])
    started = time.perf_counter()
    prepared = []
    for row in rows:
        ids, mask = assistant_tokens(tokenizer, row["messages"])
        prepared.append({"input_ids": ids[:args.max_length], "assistant_masks": mask[:args.max_length]})
    prep_rows_per_s = len(rows) / (time.perf_counter() - started)
    model = model_for(family, tokenizer, args)
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                           max_length=args.max_length, learning_rate=1e-4, bf16=False, use_cpu=True, report_to=[],
                           activation_checkpointing=False, logging_steps=1000, save_strategy="no", seed=0,
                           disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(prepared))
        batches = [b for _, b in zip(range(args.steps), trainer.get_train_dataloader())]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    return {"family": family, "prep_rows_per_s": prep_rows_per_s, "train_tokens_per_s": tokens / seconds,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--families", default="pipeline,llama,qwen2,mistral,gpt2")
    args = parser.parse_args(argv)
    rows = sft_rows(args.rows, seed=0)
    print("| family | parameters | mask preparation rows/s | SFT train tokens/s |")
    print("| --- | --- | --- | --- |")
    for family in args.families.split(","):
        r = measure(family, rows, args)
        print(f"| {family} | {r['parameters'] / 1e6:.2f}M | {r['prep_rows_per_s']:.0f} | {r['train_tokens_per_s']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
