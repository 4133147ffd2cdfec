"""Quickstart stage: a tokenizer and a tiny PipelineGPT trained on the embedded demo text, then sampled.

The output folder is built in a temporary sibling and renamed at the end, so an interrupted run never leaves a
complete-looking one.
"""

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from pipeline.data.demo_tasks import pretraining_corpus, qa_line, sample_tasks
from pipeline.data.packing import tokenize_and_pack
from pipeline.data.tokenizer import train_tokenizer
from pipeline.modeling import PipelineGPTConfig, PipelineGPTForCausalLM


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="outputs/demo/quickstart", metadata={"help": "where the model is written"})
    preset: str = field(default="llama", metadata={"help": "architecture preset: llama, gpt2, qk_norm"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    documents: int = field(default=2000, metadata={"help": "generated documents of 8 question-answer lines"})
    vocab_size: int = field(default=512)
    hidden_size: int = field(default=128)
    num_hidden_layers: int = field(default=4)
    block_size: int = field(default=128)
    batch_size: int = field(default=16)
    learning_rate: float = field(default=3e-3)
    seed: int = field(default=0)
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output_dir"})


def run_quickstart(args: QuickstartArguments) -> Path:
    """Train, save to `args.output_dir`, print a few greedy answers; returns the output folder."""
    out = Path(args.output_dir)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite true to replace it")
    work = out.with_name(out.name + ".incomplete")
    shutil.rmtree(work, ignore_errors=True)

    docs = pretraining_corpus(args.documents, seed=args.seed)
    tokenizer = train_tokenizer(docs, vocab_size=args.vocab_size)
    train, report = tokenize_and_pack(Dataset.from_dict({"text": docs}), tokenizer, block_size=args.block_size)
    print(report)
    sizes = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, num_attention_heads=4)
    if args.preset != "gpt2":  # the gpt2 preset derives its 4x MLP width itself
        sizes["intermediate_size"] = args.hidden_size * 8 // 3 // 8 * 8
    config = PipelineGPTConfig.preset(
        args.preset, vocab_size=len(tokenizer), max_position_embeddings=args.block_size, **sizes,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    model = PipelineGPTForCausalLM(config)
    print(f"PipelineGPT ({args.preset}): {model.num_parameters() / 1e6:.2f}M parameters")

    training = TrainingArguments(
        output_dir=str(work / "checkpoints"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=args.max_steps // 10,
        weight_decay=0.1, logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to=[],
        use_cpu=True, seed=args.seed, dataloader_num_workers=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    result = Trainer(model=model, args=training, train_dataset=train, data_collator=collator).train()
    print(f"final training loss {result.training_loss:.3f} (perplexity {math.exp(result.training_loss):.2f})")

    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)

    model.eval()
    newline = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))[0]
    for task in sample_tasks(5, seed=args.seed + 1):
        prompt = qa_line(task)[: -len(task.answer)].rstrip(" ")  # the answer's leading space is its own token
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[newline, tokenizer.eos_token_id])
        print(f"{prompt}{tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True).strip()}"
              f"    (expected {task.answer})")
    print(f"saved to {out}")

    return out
