"""Direct preference optimisation with TRL's DPOTrainer, from an SFT artifact.

The SFT model is the reference. With `method: lora` (or qlora) a fresh adapter trains on the merged SFT weights and
the reference is the same network with the adapter disabled, so no second copy is held in memory. Pairs come from
the dataset, or (`on_policy_samples > 0`) from the SFT model's own wrong answers to prompts with references.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from pipeline.data.chat_templates import load_chat_tokenizer
from pipeline.adapters import (
    MethodArguments, count_trainable, full_weights_dir, load_for_method, merged_for_saving,
)
from pipeline.artifacts import StageOutput, check_parent
from pipeline.evaluation.evaluators import held_out_demo_metrics
from pipeline.stages.common import check_distributed_setup
from pipeline.stages.training import (
    DataArguments, finish_stage, guards, on_cpu_only, resolve_mixture, rows_dropped_by_trainer, train_resuming,
)
from pipeline.errors import ConfigError


@dataclass
class DPOArguments(MethodArguments, DataArguments):
    model_name_or_path: str = field(default="outputs/demo/sft", metadata={"help": "an SFT output (full or adapter)"})
    on_policy_samples: int = field(default=0, metadata={
        "help": "build pairs from this many sampled answers per prompt (prompt/completion data with references)"})
    on_policy_temperature: float = field(default=1.0, metadata={"help": "sampling temperature for on-policy pairs"})
    eval_demo_tasks: int = field(default=0, metadata={"help": "exact match on held-out demo tasks after training"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished output_dir"})
    max_seconds: float | None = field(default=None, metadata={"help": "save and stop after this many seconds"})


def preference_rows(args: DPOArguments, mixture, model, tokenizer, seed: int) -> tuple[list, list, dict]:
    if mixture.canonical_format == "preference":
        return mixture.train, mixture.eval, {}
    if mixture.canonical_format != "prompt_completion" or not args.on_policy_samples:
        raise ConfigError(f"dataset: DPO needs preference pairs, or prompt/completion rows with on_policy_samples > 0 "
                         f"(got {mixture.canonical_format})")
    from pipeline.alignment.on_policy_pairs import on_policy_pairs
    from pipeline.data.demo_tasks import verify

    def with_answers(rows):
        return [{"prompt": r["prompt"], "answer": r["completion"][0]["content"] if isinstance(r["completion"], list)
                 else r["completion"]} for r in rows]

    train, counts = on_policy_pairs(model, tokenizer, with_answers(mixture.train), verify,
                                    samples=args.on_policy_samples, temperature=args.on_policy_temperature, seed=seed)
    evals, _ = on_policy_pairs(model, tokenizer, with_answers(mixture.eval), verify,
                               samples=args.on_policy_samples, temperature=args.on_policy_temperature, seed=seed + 1)
    print(f"on-policy pairs: {counts}")
    if not train:
        raise ConfigError("on_policy_samples: the model answered every training prompt correctly; no pairs to learn from")
    return train, evals, {f"pairs_{k}": v for k, v in counts.items()}


def run_dpo(args: DPOArguments, training: DPOConfig) -> Path:
    check_distributed_setup(training)
    on_cpu_only(training)
    started, destination = time.monotonic(), Path(training.output_dir)
    with StageOutput(training.output_dir, overwrite=args.overwrite) as out:
        tokenizer = load_chat_tokenizer(args.model_name_or_path, args.chat_template)
        check_parent(args.model_name_or_path, tokenizer)
        mixture = resolve_mixture(args, default_test_size=0.05)
        base = full_weights_dir(args.model_name_or_path, out.work / "initial-weights")
        model = load_for_method(base, args, tokenizer, seed=training.seed)
        ref_model = None if args.is_adapter else AutoModelForCausalLM.from_pretrained(base)
        if args.on_policy_samples:  # sample on this process's accelerator, not on the CPU copy the loader made
            (ref_model or model).to(training.device)
        train, evals, pair_counts = preference_rows(args, mixture, ref_model or model, tokenizer, training.seed)
        trainable, total = count_trainable(model)
        print(f"DPO ({args.method}, loss {training.loss_type}, beta {training.beta}): training "
              f"{trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters on {len(train)} pairs")

        training.output_dir = str(out.checkpoints_dir)
        callbacks, limit, history = guards(args.max_seconds)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=training, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(train),
                             eval_dataset=Dataset.from_list(evals) if evals else None, callbacks=callbacks)
        dropped_rows = rows_dropped_by_trainer(trainer, train, evals, training.max_length)
        result = train_resuming(trainer, out, training, args=args, parents=[args.model_name_or_path], mixture=mixture)
        metrics = {"train_loss": result.training_loss, **pair_counts, **dropped_rows}
        if evals:
            evaluated = trainer.evaluate()
            metrics.update({k.removeprefix("eval_"): v for k, v in evaluated.items()
                            if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")})
        policy = merged_for_saving(trainer.model)
        if args.eval_demo_tasks:
            metrics.update(held_out_demo_metrics(policy, tokenizer, args.eval_demo_tasks))
        metrics.update(wall_seconds=round(time.monotonic() - started, 1), stopped_by_time_limit=limit.hit,
                       loss_history=history.points)
        finish_stage(trainer, out, "dpo", tokenizer=tokenizer, artifact="model",
                     config={"stage": asdict(args), "training": training.to_dict()}, parent=args.model_name_or_path,
                     mixture=mixture, data=args, metrics=metrics, model=policy if args.is_adapter else None)
    print(f"DPO done: exact match {metrics.get('exact_match')}")
    return destination
