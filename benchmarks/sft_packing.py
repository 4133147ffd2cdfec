"""SFT throughput with packing vs padding: non-pad tokens per second through TRL's SFTTrainer data path.

Both sides take batches from `SFTTrainer.get_train_dataloader()` (packing: best-fit decreasing, padding-free rows;
padding: one conversation per row, padded to the longest in the batch) and run forward + backward + AdamW on the
same PipelineGPT. Only real (non-pad) tokens count. Both sides train on about the same number of real tokens per
optimiser step: by default the packed batch holds as many full rows as the padded batches' real tokens fill
(to the nearest row), so neither side wins by taking bigger steps. Runs alternate; the median is reported.
Goal: ratio >= 1.5.

    python benchmarks/sft_packing.py                       # Alpaca from ../shared/data/sft when present, else demo
    python benchmarks/sft_packing.py --data demo:sft?n=2000 --steps 20
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from pipeline.data.tokenizer import train_tokenizer
from pipeline.data.validation import load_rows
from pipeline.modeling import PipelineGPTConfig, PipelineGPTForCausalLM

def batches(rows, tokenizer, model, *, packing: bool, args, workdir: str):
    config = SFTConfig(output_dir=workdir, packing=packing, max_length=args.max_length,
                       per_device_train_batch_size=args.batch_size if not packing else args.packed_rows,
                       assistant_only_loss=True, bf16=False, use_cpu=True, report_to=[],
                       activation_checkpointing=False, seed=0, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    loader = iter(trainer.get_train_dataloader())
    return [next(loader) for _ in range(args.steps)]


def tokens_per_second(model, batch_list) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    tokens, start = 0, time.perf_counter()
    for batch in batch_list:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels")}
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="demo:sft?n=3000",
                        help="SFT rows: a file, folder, Hub id (e.g. tatsu-lab/alpaca) or demo:sft?n=N")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8, help="conversations per padded batch")
    parser.add_argument("--packed_rows", type=int, default=0,
                        help="packed rows of max_length tokens per batch; 0: as many as the padded batches' real "
                             "tokens fill, to the nearest row")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    datasets.disable_progress_bars()
    rows = load_rows(args.data).rows
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=args.vocab_size,
                                show_progress=False)
    torch.manual_seed(0)
    model = PipelineGPTForCausalLM(PipelineGPTConfig.preset(
        "llama", vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=4, max_position_embeddings=args.max_length,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with tempfile.TemporaryDirectory() as workdir:
        padded = batches(rows, tokenizer, model, packing=False, args=args, workdir=workdir)
        real_per_batch = statistics.mean(int(b["attention_mask"].sum()) for b in padded)
        if args.packed_rows <= 0:
            args.packed_rows = max(1, round(real_per_batch / args.max_length))
        packed = batches(rows, tokenizer, model, packing=True, args=args, workdir=workdir)
    fill = statistics.mean(float(b["attention_mask"].float().mean()) for b in padded)
    pad_speed, pack_speed = [], []
    for _ in range(args.repeats):
        pad_speed.append(tokens_per_second(model, padded))
        pack_speed.append(tokens_per_second(model, packed))
    result = {"data": args.data, "rows": len(rows), "padded_batch_fill": round(fill, 3),
              "padded_real_tokens_per_step": round(real_per_batch), "packed_tokens_per_step": args.packed_rows * args.max_length,
              "padding_tok_s": round(statistics.median(pad_speed)), "packing_tok_s": round(statistics.median(pack_speed)),
              "ratio": round(statistics.median(pack_speed) / statistics.median(pad_speed), 3)}
    print(json.dumps(result, indent=2))
    print(f"packing / padding non-pad tokens per second = {result['ratio']:.3f} (goal >= 1.5)")
    return result


if __name__ == "__main__":
    main()
