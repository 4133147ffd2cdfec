"""GRPO stage: TRL's GRPOTrainer with rule-based and/or reward-model rewards, from an SFT policy."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForSequenceClassification
from trl import GRPOConfig, GRPOTrainer

from pipeline.alignment.rewards import missing_eos_penalty, verifier_reward
from pipeline.data.chat_templates import load_chat_tokenizer, stop_token_ids
from pipeline.data.tokenizer import load_tokenizer
from pipeline.adapters import MethodArguments, full_weights_dir, load_for_method, merged_for_saving
from pipeline.artifacts import StageOutput, check_parent
from pipeline.data.demo_tasks import verify
from pipeline.evaluation.evaluators import held_out_demo_metrics, reward_trend
from pipeline.stages.common import check_distributed_setup
from pipeline.stages.training import (
    DataArguments, finish_stage, guards, on_cpu_only, resolve_mixture, train_resuming,
)
from pipeline.errors import ConfigError

REWARDS = ("verifier", "reward_model", "missing_eos")


@dataclass
class GRPOArguments(MethodArguments, DataArguments):
    model_name_or_path: str = field(default="outputs/demo/sft", metadata={"help": "the SFT policy (full or adapter)"})
    rewards: str = field(default="verifier,missing_eos", metadata={
        "help": f"comma-separated reward functions, summed with reward_weights: {', '.join(REWARDS)}"})
    reward_model_path: str | None = field(default=None, metadata={"help": "a reward stage output (for reward_model)"})
    eval_demo_tasks: int = field(default=0, metadata={"help": "exact match on held-out demo tasks after training"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished output_dir"})
    max_seconds: float | None = field(default=None, metadata={"help": "save and stop after this many seconds"})


def reward_functions(args: GRPOArguments, tokenizer) -> tuple[list, list]:
    funcs, processing = [], []
    for name in [n.strip() for n in args.rewards.split(",") if n.strip()]:
        if name == "verifier":
            funcs.append(verifier_reward(verify, "answer"))
            processing.append(None)
        elif name == "missing_eos":
            funcs.append(missing_eos_penalty(stop_token_ids(tokenizer)))
            processing.append(None)
        elif name == "reward_model":
            if not args.reward_model_path:
                raise ConfigError("reward_model_path: needed by the reward_model reward; pass a reward stage output")
            reward_tokenizer = load_tokenizer(args.reward_model_path)
            check_parent(args.reward_model_path, reward_tokenizer, expect_artifact="model")
            funcs.append(AutoModelForSequenceClassification.from_pretrained(args.reward_model_path))
            processing.append(reward_tokenizer)
        else:
            raise ConfigError(f"rewards: unknown {name!r}; use {', '.join(REWARDS)}")
    if not funcs:
        raise ConfigError("rewards: empty; name at least one reward function")
    return funcs, processing


def run_grpo(args: GRPOArguments, training: GRPOConfig) -> Path:
    check_distributed_setup(training)
    on_cpu_only(training)
    started, destination = time.monotonic(), Path(training.output_dir)
    with StageOutput(training.output_dir, overwrite=args.overwrite) as out:
        tokenizer = load_chat_tokenizer(args.model_name_or_path, args.chat_template)
        check_parent(args.model_name_or_path, tokenizer)
        mixture = resolve_mixture(args)
        if mixture.canonical_format != "prompt_completion":
            raise ConfigError(f"dataset: GRPO needs prompts with reference answers (prompt/completion rows), "
                             f"not {mixture.canonical_format}")
        rows = [{"prompt": r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}],
                 "answer": r["completion"][-1]["content"] if isinstance(r["completion"], list) else r["completion"]}
                for r in mixture.train]
        funcs, processing = reward_functions(args, tokenizer)
        base = full_weights_dir(args.model_name_or_path, out.work / "initial-weights")
        policy = load_for_method(base, args, tokenizer, seed=training.seed)

        training.output_dir = str(out.checkpoints_dir)
        callbacks, limit, history = guards(args.max_seconds)
        trainer = GRPOTrainer(model=policy, reward_funcs=funcs, args=training, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, reward_processing_classes=processing, callbacks=callbacks)
        result = train_resuming(trainer, out, training, args=args, mixture=mixture,
                                parents=[args.model_name_or_path, args.reward_model_path])
        rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
        metrics = {"train_loss": result.training_loss, "reward_history": rewards, **reward_trend(rewards)}
        final = merged_for_saving(trainer.model)
        if args.eval_demo_tasks:
            metrics.update(held_out_demo_metrics(final, tokenizer, args.eval_demo_tasks))
        metrics.update(wall_seconds=round(time.monotonic() - started, 1), stopped_by_time_limit=limit.hit,
                       loss_history=history.points)
        finish_stage(trainer, out, "grpo", tokenizer=tokenizer, artifact="model",
                     config={"stage": asdict(args), "training": training.to_dict()}, parent=args.model_name_or_path,
                     mixture=mixture, data=args, metrics=metrics, model=final if args.is_adapter else None)
    print(f"GRPO done: reward {metrics['mean_reward_first']} -> {metrics['mean_reward']}, "
          f"exact match {metrics.get('exact_match')}")
    return destination
