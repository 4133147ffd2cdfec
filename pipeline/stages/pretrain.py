"""Pretraining: a PipelineGPT built from a config, trained from scratch on packed text blocks with Trainer."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from pipeline.artifacts import StageOutput, check_parent
from pipeline.data.prepare import Prepared
from pipeline.data.tokenizer import load_tokenizer
from pipeline.modeling import PipelineGPTConfig, PipelineGPTForCausalLM
from pipeline.stages.common import check_distributed_setup
from pipeline.stages.training import (
    DataArguments, finish_stage, guards, on_cpu_only, prepared_data, train_resuming,
)


@dataclass
class PretrainArguments(DataArguments):
    tokenizer_name_or_path: str = field(default="outputs/demo/tokenizer", metadata={"help": "a tokenizer stage output"})
    preset: str = field(default="llama", metadata={"help": "architecture preset: llama, gpt2, qk_norm"})
    hidden_size: int = field(default=192, metadata={"help": "model width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "query heads"})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "key/value heads (GQA); default = heads"})
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width; default from the preset"})
    model_config: dict = field(default_factory=dict, metadata={"help": "any other PipelineGPTConfig fields"})
    block_size: int = field(default=128, metadata={"help": "tokens per packed training block"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished output_dir"})
    max_seconds: float | None = field(default=None, metadata={"help": "save and stop after this many seconds"})
    prepared_dir: str | None = field(default=None, metadata={
        "help": "where prepared shards are kept (one folder per fingerprint); default: `prepared` beside output_dir"})
    shard_blocks: int | None = field(default=None, metadata={"help": "blocks per shard; default: about 4M tokens"})


def build_model(args: PretrainArguments, tokenizer) -> PipelineGPTForCausalLM:
    sizes = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                 num_attention_heads=args.num_attention_heads,
                 num_key_value_heads=args.num_key_value_heads or args.num_attention_heads)
    if args.intermediate_size:
        sizes["intermediate_size"] = args.intermediate_size
    elif args.preset != "gpt2":  # gated MLPs keep the parameter count of a 4x plain MLP
        sizes["intermediate_size"] = args.hidden_size * 8 // 3 // 8 * 8
    config = PipelineGPTConfig.preset(
        args.preset, vocab_size=len(tokenizer), max_position_embeddings=args.block_size, **sizes,
        **args.model_config, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return PipelineGPTForCausalLM(config)


def prepare_from_config(config: str | Path, overrides: list[str] | None = None) -> Prepared:
    """`pipeline data prepare --config STAGE.yaml [--key value …]`: the stage's own arguments, the stage's data."""
    from pipeline.stages.common import parse_stage_args

    args, training = parse_stage_args((PretrainArguments, TrainingArguments),
                                      ["--config", str(config), *(overrides or [])])
    if not Path(args.tokenizer_name_or_path).is_dir():
        raise FileNotFoundError(f"{config}: tokenizer_name_or_path: {args.tokenizer_name_or_path} does not exist; "
                                f"run the tokenizer stage first or pass --tokenizer_name_or_path DIR")
    return prepared_data(args, load_tokenizer(args.tokenizer_name_or_path), training.output_dir)


def run_pretrain(args: PretrainArguments, training: TrainingArguments) -> Path:
    check_distributed_setup(training)
    on_cpu_only(training)
    started, destination = time.monotonic(), Path(training.output_dir)
    with StageOutput(training.output_dir, overwrite=args.overwrite) as out:
        tokenizer = load_tokenizer(args.tokenizer_name_or_path)
        check_parent(args.tokenizer_name_or_path, tokenizer)
        data = prepared_data(args, tokenizer, str(destination))
        print(data.summary())
        packed = {split: data.dataset(split) for split in data.manifest["splits"]}
        torch.manual_seed(training.seed)
        model = build_model(args, tokenizer)
        print(f"PipelineGPT ({args.preset}): {model.num_parameters() / 1e6:.2f}M parameters, "
              f"{len(packed['train'])} training blocks of {args.block_size} tokens")

        training.output_dir = str(out.checkpoints_dir)
        callbacks, limit, history = guards(args.max_seconds)
        trainer = Trainer(model=model, args=training, train_dataset=packed["train"], eval_dataset=packed.get("eval"),
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=callbacks)
        result = train_resuming(trainer, out, training, args=args, mixture=data,
                                parents=[args.tokenizer_name_or_path])
        metrics = {"train_loss": result.training_loss}
        if "eval" in packed:
            eval_loss = trainer.evaluate()["eval_loss"]
            metrics.update(eval_loss=eval_loss, perplexity=math.exp(eval_loss))
        metrics.update(wall_seconds=round(time.monotonic() - started, 1), stopped_by_time_limit=limit.hit,
                       loss_history=history.points)

        model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                       bos_token_id=tokenizer.bos_token_id)
        finish_stage(trainer, out, "pretrain", tokenizer=tokenizer, artifact="model",
                     config={"stage": asdict(args), "training": training.to_dict()},
                     parent=args.tokenizer_name_or_path, mixture=data, data=args, metrics=metrics)
    print(f"pretraining done: {metrics}")
    return destination
