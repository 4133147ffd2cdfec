"""PPO stage: our PPOTrainer on an SFT policy, scored by a reward model (optionally plus the demo verifier).

The value model starts from the reward model (`value_model_path`, default `reward_model_path`). With `method: lora`
a fresh adapter trains on the merged SFT weights and the reference is the policy with the adapter disabled. The
reward model may use another tokenizer: responses are decoded and re-encoded for it. With `ptx_coef > 0`,
`ptx_dataset` (text, messages or prompt/completion rows) supplies the language-model loss of PPO-ptx.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import parse_flag_from_env
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline.alignment.ppo_trainer import PPOConfig, PPOTrainer
from pipeline.data.mixing import load_mixture
from pipeline.data.chat_templates import assistant_tokens, load_chat_tokenizer
from pipeline.data.tokenizer import load_tokenizer
from pipeline.adapters import MethodArguments, full_weights_dir, load_for_method, merged_for_saving
from pipeline.artifacts import StageOutput, check_parent, latest_checkpoint, tokenizer_hash
from pipeline.data.demo_tasks import verify
from pipeline.evaluation.evaluators import held_out_demo_metrics, reward_kl_trend, reward_trend, score_token_rows
from pipeline.evaluation.report import REWARD_KL_PLOT, reward_kl_plot
from pipeline.stages.common import check_distributed_setup
from pipeline.stages.training import (
    DataArguments, dataset_records, resolve_mixture, run_fingerprint, write_stage_output,
)
from pipeline.errors import ConfigError


@dataclass
class PPOArguments(MethodArguments, DataArguments):
    model_name_or_path: str = field(default="outputs/demo/sft", metadata={"help": "the SFT policy (full or adapter)"})
    reward_model_path: str = field(default="outputs/demo/reward", metadata={"help": "a reward stage output"})
    value_model_path: str | None = field(default=None, metadata={"help": "value model init; default: the reward model"})
    reward_model_weight: float = field(default=1.0, metadata={
        "help": "scale of the reward model's score in the reward (lower it when the reward model is weak on some "
                "tasks and a verifier can carry them: a policy learns to exploit a reward model's blind spots)"})
    verifier_weight: float = field(default=0.0, metadata={
        "help": "add this times the demo verifier (1 if the answer is right) to the reward-model score"})
    ptx_dataset: dict = field(default_factory=dict, metadata={
        "help": "PPO-ptx data, a mixture spec like `dataset` (text rows: loss on every token; messages: on the "
                "assistant turns; prompt/completion: on the completion); used when ptx_coef > 0"})
    ptx_max_length: int = field(default=256, metadata={"help": "ptx rows are cut to this many tokens"})
    cpu_threads: int = field(default=0, metadata={
        "help": "torch CPU threads for this stage (0 = torch's default): sampling short answers from a small model "
                "is faster on fewer threads (the demo's PPO: 139 s on one thread, 177 s on two)"})
    eval_demo_tasks: int = field(default=0, metadata={"help": "exact match on held-out demo tasks after training"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished output_dir"})


def reward_function(reward_model, reward_tokenizer, policy_tokenizer, references: dict | None, weight: float,
                    reward_model_weight: float = 1.0):
    """(prompt ids, response ids) -> scores: `reward_model_weight` x the reward model's score of the rendered chat,
    plus `weight` x verifier."""
    same = tokenizer_hash(reward_tokenizer) == tokenizer_hash(policy_tokenizer)
    reward_model.eval()

    @torch.no_grad()
    def score(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        if same:
            rows = [p + r for p, r in zip(prompts, responses)]
        else:  # another tokenizer: go through text, special tokens included, so the chat structure survives
            texts = [policy_tokenizer.decode(p + r, skip_special_tokens=False) for p, r in zip(prompts, responses)]
            rows = reward_tokenizer(texts, add_special_tokens=False, padding=False)["input_ids"]
        scores = reward_model_weight * score_token_rows(reward_model, rows, reward_tokenizer.pad_token_id,
                                                        batch_size=None)
        if weight and references is not None:
            answers = [policy_tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
            right = [verify(a, references.get(tuple(p), "\0")) for a, p in zip(answers, prompts)]
            scores = scores + weight * torch.tensor(right, dtype=scores.dtype)
        return scores

    return score


def ptx_rows(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Mixture rows -> {"input_ids", "labels"} for the PPO-ptx loss (-100 marks tokens without loss)."""
    out = []
    for row in rows:
        if "messages" in row:
            ids, mask = assistant_tokens(tokenizer, row["messages"])
            labels = [t if m else -100 for t, m in zip(ids, mask)]
        elif "completion" in row:
            if isinstance(row["prompt"], str):
                prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
                ids = prompt + tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [
                    tokenizer.eos_token_id]
            else:
                prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                                       return_dict=True)["input_ids"]
                ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], return_dict=True)["input_ids"]
            labels = [-100] * len(prompt) + ids[len(prompt):]
        else:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            labels = list(ids)
        ids, labels = ids[:max_length], labels[:max_length]
        if any(t != -100 for t in labels[1:]):  # a row cut before its answer carries no loss
            out.append({"input_ids": ids, "labels": labels})
    if len(out) < len(rows):
        print(f"ptx_dataset: {len(rows) - len(out)} of {len(rows)} rows have no trained token within "
              f"ptx_max_length={max_length} and are skipped")
    return out


def load_ptx(args: PPOArguments, config: PPOConfig, tokenizer) -> tuple[list[dict] | None, list[dict]]:
    """The PPO-ptx rows (None when ptx_coef is 0) and their manifest records; a missing or unusable `ptx_dataset`
    is an error."""
    if config.ptx_coef == 0:
        if args.ptx_dataset:
            print("ptx_dataset is set but ptx_coef is 0: PPO runs without the ptx loss")
        return None, []
    if not args.ptx_dataset:
        raise ConfigError(f"ptx_coef={config.ptx_coef} needs ptx_dataset (a mixture spec with sources, like "
                         "`dataset`); set it in the YAML or set ptx_coef: 0")
    mixture = load_mixture(args.ptx_dataset, where="ptx_dataset")
    print(mixture.summary())
    if mixture.canonical_format not in ("text", "messages", "prompt_completion"):
        raise ConfigError(f"ptx_dataset: PPO-ptx needs text, messages or prompt/completion rows, not "
                         f"{mixture.canonical_format}")
    rows = ptx_rows(mixture.train, tokenizer, args.ptx_max_length)
    if not rows:
        raise ConfigError(f"ptx_dataset: no row has a trained token within ptx_max_length={args.ptx_max_length}")
    return rows, dataset_records(mixture, DataArguments(dataset=args.ptx_dataset))


def run_ppo(args: PPOArguments, config: PPOConfig) -> Path:
    threads = torch.get_num_threads()
    try:
        return _train_ppo(args, config)
    finally:
        torch.set_num_threads(threads)  # cpu_threads holds for this stage, not for whoever called it


def _train_ppo(args: PPOArguments, config: PPOConfig) -> Path:
    check_distributed_setup(None)
    if args.cpu_threads < 0:
        raise ConfigError(f"cpu_threads: must be >= 0 (0 = torch's default), got {args.cpu_threads}")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    sharded = parse_flag_from_env("ACCELERATE_USE_FSDP") or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if args.is_adapter and sharded:  # before any model loads: `accelerate launch` names the engine in the environment
        raise ConfigError(f"method: {args.method} (an adapter policy) under FSDP or DeepSpeed is not supported by the "
                          "PPO stage yet; use method: full there, or DDP (recipes/accelerate/ddp.yaml) with an adapter")
    started, destination = time.monotonic(), Path(config.output_dir)
    with StageOutput(config.output_dir, overwrite=args.overwrite) as out:
        tokenizer = load_chat_tokenizer(args.model_name_or_path, args.chat_template)
        check_parent(args.model_name_or_path, tokenizer)
        reward_tokenizer = load_tokenizer(args.reward_model_path)
        check_parent(args.reward_model_path, reward_tokenizer, expect_artifact="model")
        mixture = resolve_mixture(args)
        if mixture.canonical_format not in ("prompt_completion", "preference"):
            raise ConfigError(f"dataset: PPO needs conversational prompts (prompt/completion or preference rows), "
                             f"not {mixture.canonical_format}")
        prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
                   for r in mixture.train]
        references = None
        if mixture.canonical_format == "prompt_completion":
            references = {tuple(p): (r["completion"][0]["content"] if isinstance(r["completion"], list)
                                     else r["completion"]) for p, r in zip(prompts, mixture.train)}

        ptx, ptx_records = load_ptx(args, config, tokenizer)

        base = full_weights_dir(args.model_name_or_path, out.work / "initial-weights")
        policy = load_for_method(base, args, tokenizer, seed=config.seed)
        ref_model = None if args.is_adapter else AutoModelForCausalLM.from_pretrained(base)
        reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward_model_path)
        value_model = AutoModelForSequenceClassification.from_pretrained(args.value_model_path or args.reward_model_path)
        reward_model.requires_grad_(False)

        config.output_dir = str(out.checkpoints_dir)
        trainer = PPOTrainer(config, policy=policy, tokenizer=tokenizer, value_model=value_model,
                             reward_fn=reward_function(reward_model, reward_tokenizer, tokenizer, references,
                                                       args.verifier_weight, args.reward_model_weight),
                             prompts=prompts, ref_model=ref_model, ptx_data=ptx)
        reward_model.to(trainer.accelerator.device)  # scored where the rollouts are
        out.guard_resume(run_fingerprint({"stage": asdict(args), "ppo": asdict(config)},
                                         [args.model_name_or_path, args.reward_model_path, args.value_model_path],
                                         mixture))
        history = trainer.train(resume_from_checkpoint=latest_checkpoint(out.checkpoints_dir))  # resume if killed
        scores, kls = [h["mean_score"] for h in history], [h["kl"] for h in history]
        metrics = {**reward_trend(scores), "final_kl": kls[-1] if kls else None, "reward_history": scores,
                   "kl_history": kls, "samples": trainer.samples}
        if history:
            metrics.update(reward_kl_trend(scores, kls))
        if trainer.sharded:  # the engine holds shards: gather one full copy into the output (every process)
            trainer.save_model(out.work)
            final = None
        else:
            final = merged_for_saving(trainer.policy)
        if args.eval_demo_tasks:
            metrics.update(held_out_demo_metrics(trainer.policy if final is None else final, tokenizer,
                                                  args.eval_demo_tasks))
        metrics["wall_seconds"] = round(time.monotonic() - started, 1)
        if trainer.accelerator.is_main_process:
            if history:  # the trade-off of this run, next to the model
                reward_kl_plot(scores, kls, out.work / REWARD_KL_PLOT)
            write_stage_output(out, "ppo", model=final, tokenizer=tokenizer, artifact="model",
                               config={"stage": asdict(args), "ppo": asdict(config)}, parent=args.model_name_or_path,
                               datasets=dataset_records(mixture, args) + ptx_records, metrics=metrics)
        trainer.accelerator.wait_for_everyone()
    print(f"PPO done: mean reward {metrics['mean_reward_first']:.3f} -> {metrics['mean_reward']:.3f} at KL "
          f"{metrics.get('mean_kl', 0.0):.3f}, exact match {metrics.get('exact_match')}")
    return destination
