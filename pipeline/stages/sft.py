"""Supervised fine-tuning with TRL's SFTTrainer: chat template, assistant-only loss, packing, any method."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from pipeline.data.chat_templates import has_generation_markers, load_chat_tokenizer, tokenize_for_assistant_loss
from pipeline.adapters import MethodArguments, count_trainable, load_for_method
from pipeline.artifacts import StageOutput, check_parent
from pipeline.evaluation.evaluators import held_out_demo_metrics
from pipeline.stages.common import check_distributed_setup
from pipeline.stages.training import (
    DataArguments, finish_stage, guards, on_cpu_only, resolve_mixture, rows_dropped_by_trainer, train_resuming,
)
from pipeline.errors import ConfigError


@dataclass
class SFTArguments(MethodArguments, DataArguments):
    model_name_or_path: str = field(default="outputs/demo/pretrain", metadata={"help": "a pretrain stage output"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "default: the model's folder"})
    eval_demo_tasks: int = field(default=0, metadata={
        "help": "score exact match on this many held-out demo tasks after training (0: off)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished output_dir"})
    max_seconds: float | None = field(default=None, metadata={"help": "save and stop after this many seconds"})


def run_sft(args: SFTArguments, training: SFTConfig) -> Path:
    check_distributed_setup(training)
    on_cpu_only(training)
    started, destination = time.monotonic(), Path(training.output_dir)
    with StageOutput(training.output_dir, overwrite=args.overwrite) as out:
        tokenizer = load_chat_tokenizer(args.tokenizer_name_or_path or args.model_name_or_path, args.chat_template)
        check_parent(args.model_name_or_path, tokenizer, expect_artifact="model")
        mixture = resolve_mixture(args, default_test_size=0.02)
        if mixture.canonical_format not in ("messages", "prompt_completion", "text"):
            raise ConfigError(f"dataset: SFT trains on messages, prompt/completion or text rows, "
                             f"not {mixture.canonical_format}")
        if training.assistant_only_loss and mixture.canonical_format != "messages":
            raise ConfigError("assistant_only_loss: needs chat (messages) rows; set it false for prompt/completion "
                             "rows (their loss is on the completion already)")
        if args.method == "prompt_tuning" and training.packing:
            raise ConfigError("packing: prompt tuning prepends virtual tokens to every row, which packed rows cannot "
                             "share; set packing: false")
        model = load_for_method(args.model_name_or_path, args, tokenizer, seed=training.seed)
        trainable, total = count_trainable(model)
        print(f"{args.method}: training {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters")

        training.output_dir = str(out.checkpoints_dir)
        callbacks, limit, history = guards(args.max_seconds)
        train_rows, eval_rows, dropped = mixture.train, mixture.eval, 0
        own_masks = training.assistant_only_loss and not has_generation_markers(tokenizer.chat_template)
        if own_masks:  # TRL masks only templates with {% generation %} markers; locate the replies ourselves
            train_rows, dropped = tokenize_for_assistant_loss(train_rows, tokenizer, training.max_length)
            eval_rows, dropped_eval = tokenize_for_assistant_loss(eval_rows, tokenizer, training.max_length)
            dropped += dropped_eval
            print(f"assistant-only loss: reply tokens located through the chat template; {dropped} rows with no "
                  f"reply token within max_length={training.max_length} dropped")
            training.assistant_only_loss = False  # TRL would re-mask from markers; it builds labels from our column
        trainer = SFTTrainer(model=model, args=training, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(train_rows),
                             eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                             callbacks=callbacks)
        if own_masks:
            training.assistant_only_loss = True  # back to the setting the run used (fingerprint, manifest)
        dropped_rows = rows_dropped_by_trainer(trainer, train_rows, eval_rows, training.max_length)
        result = train_resuming(trainer, out, training, args=args, mixture=mixture,
                                parents=[args.model_name_or_path, args.tokenizer_name_or_path])
        metrics = {"train_loss": result.training_loss, **dropped_rows}
        if own_masks:
            metrics["rows_without_reply_tokens"] = dropped
        if mixture.eval:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        if args.eval_demo_tasks:
            metrics.update(held_out_demo_metrics(trainer.model, tokenizer, args.eval_demo_tasks))
        metrics.update(wall_seconds=round(time.monotonic() - started, 1), stopped_by_time_limit=limit.hit,
                       loss_history=history.points)

        # The PEFT methods save an adapter whose manifest names the parent as its base; the others a full model.
        finish_stage(trainer, out, "sft", tokenizer=tokenizer, artifact="adapter" if args.is_adapter else "model",
                     config={"stage": asdict(args), "training": training.to_dict()}, parent=args.model_name_or_path,
                     mixture=mixture, data=args, metrics=metrics)
    print(f"SFT done: { {k: v for k, v in metrics.items() if k != 'loss_history'} }")
    return destination
