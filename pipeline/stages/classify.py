"""Sequence classification: PipelineGPTForSequenceClassification fine-tuned on (text, label) rows."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments, set_seed,
)

from pipeline.data.tokenizer import load_tokenizer
from pipeline.artifacts import StageOutput, check_parent
from pipeline.stages.common import check_distributed_setup
from pipeline.stages.training import (
    DataArguments, finish_stage, guards, on_cpu_only, resolve_mixture, train_resuming,
)
from pipeline.errors import ConfigError, DataError


@dataclass
class ClassifyArguments(DataArguments):
    model_name_or_path: str = field(default="outputs/demo/pretrain", metadata={"help": "a pretrain or SFT output"})
    max_length: int = field(default=128, metadata={"help": "texts are truncated to this many tokens"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished output_dir"})
    max_seconds: float | None = field(default=None, metadata={"help": "save and stop after this many seconds"})


def label_names(rows: list[dict]) -> list[str] | None:
    """Class names when labels are strings (sorted, so ids are stable); None for integer labels."""
    labels = {r["label"] for r in rows}
    if all(isinstance(x, int) for x in labels):
        return None
    if not all(isinstance(x, str) for x in labels):
        raise DataError("label: mixes integer ids and class names; use one kind")
    return sorted(labels)


def run_classify(args: ClassifyArguments, training: TrainingArguments) -> Path:
    check_distributed_setup(training)
    on_cpu_only(training)
    started, destination = time.monotonic(), Path(training.output_dir)
    with StageOutput(training.output_dir, overwrite=args.overwrite) as out:
        tokenizer = load_tokenizer(args.model_name_or_path)
        check_parent(args.model_name_or_path, tokenizer, expect_artifact="model")
        mixture = resolve_mixture(args, default_test_size=0.1)
        if mixture.canonical_format != "classification":
            raise ConfigError(f"dataset: classify trains on (text, label) rows, not {mixture.canonical_format}")
        names = label_names(mixture.train + mixture.eval)
        ids = {name: i for i, name in enumerate(names)} if names else None
        num_labels = len(names) if names else max(r["label"] for r in mixture.train + mixture.eval) + 1

        def encode(rows):
            enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=args.max_length)
            enc["labels"] = [ids[r["label"]] if ids else r["label"] for r in rows]
            return Dataset.from_dict(dict(enc))

        label_kwargs = {"id2label": dict(enumerate(names)), "label2id": ids} if names else {}
        set_seed(training.seed)  # the new score head: same weights in a run and in its resumed twin
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model_name_or_path, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, **label_kwargs)

        training.output_dir = str(out.checkpoints_dir)
        callbacks, limit, history = guards(args.max_seconds)
        trainer = Trainer(model=model, args=training, train_dataset=encode(mixture.train),
                          eval_dataset=encode(mixture.eval) if mixture.eval else None,
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                          callbacks=callbacks)
        result = train_resuming(trainer, out, training, args=args, parents=[args.model_name_or_path], mixture=mixture)
        metrics = {"train_loss": result.training_loss}
        if mixture.eval:
            evaluated = trainer.evaluate()
            metrics.update(eval_loss=evaluated["eval_loss"], accuracy=evaluated["eval_accuracy"])
        metrics.update(wall_seconds=round(time.monotonic() - started, 1), stopped_by_time_limit=limit.hit,
                       loss_history=history.points)
        finish_stage(trainer, out, "classify", tokenizer=tokenizer, artifact="model",
                     config={"stage": asdict(args), "training": training.to_dict()}, parent=args.model_name_or_path,
                     mixture=mixture, data=args, metrics=metrics)
    print(f"classification done: accuracy {metrics.get('accuracy')}")
    return destination


def accuracy(prediction) -> dict:
    logits, labels = prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}
