"""Reward model: TRL's RewardTrainer on PipelineGPTForSequenceClassification initialised from an SFT artifact."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from pipeline.data.chat_templates import load_chat_tokenizer
from pipeline.adapters import (
    MethodArguments, count_trainable, full_weights_dir, load_for_method, merged_for_saving,
)
from pipeline.artifacts import StageOutput, check_parent
from pipeline.evaluation.evaluators import pairwise_reward_accuracy
from pipeline.stages.common import check_distributed_setup
from pipeline.stages.training import (
    DataArguments, finish_stage, guards, on_cpu_only, resolve_mixture, rows_dropped_by_trainer, train_resuming,
)
from pipeline.errors import ConfigError


@dataclass
class RewardArguments(MethodArguments, DataArguments):
    model_name_or_path: str = field(default="outputs/demo/sft", metadata={"help": "an SFT output (full or adapter)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished output_dir"})
    max_seconds: float | None = field(default=None, metadata={"help": "save and stop after this many seconds"})


def run_reward(args: RewardArguments, training: RewardConfig) -> Path:
    if args.method not in ("full", "lora", "freeze"):
        raise ConfigError(f"method: {args.method} is not supported for reward models; use full, lora or freeze")
    check_distributed_setup(training)
    on_cpu_only(training)
    started, destination = time.monotonic(), Path(training.output_dir)
    with StageOutput(training.output_dir, overwrite=args.overwrite) as out:
        tokenizer = load_chat_tokenizer(args.model_name_or_path, args.chat_template)
        check_parent(args.model_name_or_path, tokenizer)
        mixture = resolve_mixture(args, default_test_size=0.05)
        if mixture.canonical_format != "preference":
            raise ConfigError(f"dataset: the reward model trains on preference pairs, not {mixture.canonical_format}")
        base = full_weights_dir(args.model_name_or_path, out.work / "initial-weights")
        config = AutoConfig.from_pretrained(base, num_labels=1, pad_token_id=tokenizer.pad_token_id)
        model = load_for_method(base, args, tokenizer, model_class=AutoModelForSequenceClassification, config=config,
                                seed=training.seed)
        trainable, total = count_trainable(model)
        print(f"reward model ({args.method}): training {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters")

        training.output_dir = str(out.checkpoints_dir)
        callbacks, limit, history = guards(args.max_seconds)
        trainer = RewardTrainer(model=model, args=training, processing_class=tokenizer,
                                train_dataset=Dataset.from_list(mixture.train),
                                eval_dataset=Dataset.from_list(mixture.eval) if mixture.eval else None,
                                callbacks=callbacks)
        dropped_rows = rows_dropped_by_trainer(trainer, mixture.train, mixture.eval, training.max_length)
        result = train_resuming(trainer, out, training, args=args, parents=[args.model_name_or_path], mixture=mixture)
        metrics = {"train_loss": result.training_loss, **dropped_rows}
        if mixture.eval:
            metrics.update(pairwise_metrics(trainer.model, tokenizer, mixture.eval))
        metrics.update(wall_seconds=round(time.monotonic() - started, 1), stopped_by_time_limit=limit.hit,
                       loss_history=history.points)
        # Saved merged: PPO and the evaluators load a reward model directly.
        finish_stage(trainer, out, "reward", tokenizer=tokenizer, artifact="model",
                     config={"stage": asdict(args), "training": training.to_dict()}, parent=args.model_name_or_path,
                     mixture=mixture, data=args, metrics=metrics,
                     model=merged_for_saving(trainer.model) if args.method == "lora" else None)
    print(f"reward model done: accuracy {metrics.get('reward_accuracy')}, margin {metrics.get('reward_margin')}")
    return destination


@torch.no_grad()
def pairwise_metrics(model, tokenizer, pairs: list[dict]) -> dict:
    """Held-out pairwise accuracy (chosen scored above rejected) and mean margin."""
    result = pairwise_reward_accuracy(model, tokenizer, pairs)
    return {"reward_accuracy": result["accuracy"], "reward_margin": result["margin"]}
