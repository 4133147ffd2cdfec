"""Our PPOTrainer against TRL 1.12's PPOTrainer (`trl.experimental.ppo`, removed in TRL 1.13) on the demo task.

TRL 1.12 is not a dependency (the project pins a later TRL): install it apart and name the folder,

    pip install --no-deps --target /tmp/trl112 trl==1.12.0
    python benchmarks/ppo_vs_trl.py --trl_path /tmp/trl112 --seeds 0 1 2 3

Each (side, seed) trains in its own process (TRL 1.12 goes first on sys.path in its side's process only), on one
thread, from the demo's merged SFT policy (run `make demo` first), with the demo reward model as the reward and the
value model's start, the same prompts, batch 64 in 4 mini-batches, 2 epochs, 10-token responses, temperature 1, a
fixed KL coefficient 0.2 (k1) in the reward, AdamW 5e-5 (policy) / 1e-4 (value) decaying linearly to 0 (TRL's
schedule), a missing-EOS penalty of 1 and 30 updates, float32 without gradient checkpointing (TRL's config turns
on bf16 and checkpointing by default). Neither clips gradients (ours: `max_grad_norm`, off by default). TRL gets a
torch AdamW with two parameter groups and no weight decay (its Trainer's default optimiser settings).
`--variant KEY=VALUE[,KEY=VALUE]` adds one more arm of ours with those PPOConfig settings changed, e.g.
`--variant max_grad_norm=0` (repeatable); every arm trains on the same seeds.
The parent then measures every saved policy the same way: one sampled answer to each of `--held_out` held-out
prompts scored by the reward model, before and after, its KL to the SFT policy, and greedy exact match on
`--exact_match` held-out tasks.

`--same_rollouts --steps N` checks the update instead: ours trains N updates without clipping and records its
rollouts and mini-batch orders; TRL's trainer replays them (its sampling and shuffles replaced, everything else its
own code) and the script prints how far the two final weights differ, relative to how far they moved.
"""

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH, MINI_BATCHES, EPOCHS, LENGTH, KL, LR, VALUE_LR = 64, 4, 2, 10, 0.2, 5e-5, 1e-4


def models(sft: str, reward: str, scratch: Path):
    # Imported here: TRL 1.12 must be on sys.path before anything imports trl in its side's process.
    from ppo_speed import demo_models

    return demo_models(sft, reward, scratch)


def prompts(tokenizer, steps: int) -> list[list[int]]:
    from ppo_speed import chat_prompts

    from pipeline.data.demo_tasks import rl_prompt_rows

    return chat_prompts(tokenizer, [r["prompt"] for r in rl_prompt_rows(BATCH * steps, seed=0)])


def variant_settings(variant: str) -> dict:
    """`KEY=VALUE,KEY=VALUE` as PPOConfig keyword arguments (values read as Python literals, else strings)."""
    settings = {}
    for pair in filter(None, variant.split(",")):
        key, _, value = pair.partition("=")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    return settings


def ours_trainer(args, out: Path):
    from pipeline.alignment.ppo_trainer import PPOConfig, PPOTrainer
    from pipeline.stages.ppo import reward_function

    tokenizer, policy, reference, reward, value = models(args.sft, args.reward, out)
    config = PPOConfig(output_dir=str(out / "run"), batch_size=BATCH, mini_batch_size=BATCH // MINI_BATCHES,
                       ppo_epochs=EPOCHS, max_steps=args.steps, response_length=LENGTH, temperature=1.0, init_kl_coef=KL,
                       kl_estimator="k1", learning_rate=LR, value_learning_rate=VALUE_LR, lr_scheduler_type="linear",
                       missing_eos_penalty=1.0, seed=args.seed, **variant_settings(args.variant or ""))
    return PPOTrainer(config, policy=policy, tokenizer=tokenizer, value_model=value, ref_model=reference,
                      reward_fn=reward_function(reward, tokenizer, tokenizer, None, 0.0),
                      prompts=prompts(tokenizer, args.steps))


def train_ours(args, out: Path) -> dict:
    trainer = ours_trainer(args, out)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.policy.save_pretrained(out / "policy")
    return {"seconds": seconds, "kl": [h["kl"] for h in trainer.history],
            "score": [h["mean_score"] for h in trainer.history]}


def trl_trainer(args, out: Path):
    sys.path.insert(0, args.trl_path)
    import torch
    import trl
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if trl.__version__ != "1.12.0":
        raise SystemExit(f"--trl_path holds trl {trl.__version__}, not 1.12.0")
    from pipeline.data.chat_templates import stop_token_ids

    tokenizer, policy, reference, reward, value = models(args.sft, args.reward, out)
    tokenizer.padding_side = "left"
    # TRL 1.12: the rollout batch is per_device_train_batch_size x gradient_accumulation_steps, split into
    # num_mini_batches mini-batches (one optimiser step each)
    config = PPOConfig(output_dir=str(out / "run"), per_device_train_batch_size=BATCH,
                       gradient_accumulation_steps=1, num_mini_batches=MINI_BATCHES, num_ppo_epochs=EPOCHS,
                       total_episodes=BATCH * args.steps, response_length=LENGTH, temperature=1.0, kl_coef=KL,
                       kl_estimator="k1", learning_rate=LR, stop_token_id=stop_token_ids(tokenizer)[0],
                       missing_eos_penalty=1.0, local_rollout_forward_batch_size=BATCH, num_sample_generations=0,
                       report_to=[], seed=args.seed, use_cpu=True, bf16=False, gradient_checkpointing=False,
                       save_strategy="no", logging_steps=1,
                       dataloader_drop_last=True)
    optimizer = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": LR},
                                   {"params": list(value.parameters()), "lr": VALUE_LR}], weight_decay=0.0)
    return PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                      reward_model=reward, value_model=value, optimizers=(optimizer, None),
                      train_dataset=Dataset.from_dict({"input_ids": prompts(tokenizer, args.steps)}))


def train_trl(args, out: Path) -> dict:
    trainer = trl_trainer(args, out)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.accelerator.unwrap_model(trainer.model).policy.save_pretrained(out / "policy")
    logs = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    if len(logs) != args.steps:  # one log per update: anything else means the batch settings were read otherwise
        raise SystemExit(f"TRL ran {len(logs)} updates, not {args.steps}: check its batch settings")
    return {"seconds": seconds, "kl": [e["objective/kl"] for e in logs], "score": [e["objective/scores"] for e in logs]}


def flat_weights(*modules):
    import torch

    return torch.cat([p.detach().flatten() for module in modules for p in module.parameters()])


def record_ours(args, out: Path) -> dict:
    """--same_rollouts, our side: train without clipping (as TRL) and keep every rollout's prompts,
    sampled sequences and generation logits, every step's mini-batch orders and the final weights."""
    import torch

    args.variant = "max_grad_norm=0"
    trainer = ours_trainer(args, out)
    generate, rollouts = trainer.policy.generate, []

    def recording_generate(*positional, **kwargs):
        output = generate(*positional, **kwargs)
        rollouts.append({"query": kwargs["input_ids"], "query_mask": kwargs["attention_mask"],
                         "sequences": output.sequences,
                         "logits": torch.stack(output.logits, dim=1)})
        return output

    trainer.policy.generate = recording_generate
    trainer.train()
    torch.save({"rollouts": rollouts, "orders": [trainer.minibatch_orders(step) for step in range(args.steps)],
                "policy": flat_weights(trainer.policy), "value": flat_weights(trainer.value_model)}, out / "ours.pt")
    # TRL ends a response at its first pad token; ours ends it at EOS only, so a sampled pad inside a response is
    # the one input on which the two compute different updates.
    inside = 0
    for rollout in rollouts:
        response = rollout["sequences"][:, rollout["query"].shape[1]:]
        pad_seen = (response == trainer.pad_id).long().cumsum(1) > 0
        inside += int((pad_seen & (response != trainer.pad_id)).any(1).sum())  # a token after a pad
    return {"kl": [h["kl"] for h in trainer.history], "responses_with_a_pad_inside": inside}


def replay_trl(args, out: Path) -> dict:
    """--same_rollouts, TRL's side: its PPOTrainer takes our prompts in our order, our recorded rollouts in place of
    its own sampling and our mini-batch orders in place of its shuffles, then scores, computes values, rewards,
    advantages and losses and steps its optimiser itself; returns how far its weights end from ours."""
    import types

    import numpy as np
    import torch

    sys.path.insert(0, args.trl_path)
    import trl.experimental.ppo.ppo_trainer as trl_ppo

    recorded = torch.load(Path(args.child_out).parent / "ours" / "ours.pt")
    state = {"update": -1, "epoch": 0}

    def replayed_generation(model, queries, batch_size, pad_token_id, generation_config):
        state["update"] += 1
        state["epoch"] = 0
        rollout = recorded["rollouts"][state["update"]]
        if not torch.equal(queries, rollout["query"]):
            raise SystemExit(f"update {state['update'] + 1}: TRL's prompts differ from the recorded ones")
        # Full width, as ours pads: TRL's own responses are as wide as the batch's longest, so where every row
        # ended early its longest rows have no room after EOS and get the score on it.
        missing = queries.shape[1] + LENGTH - rollout["sequences"].shape[1]
        sequences = torch.nn.functional.pad(rollout["sequences"], (0, missing), value=pad_token_id)
        return sequences, torch.nn.functional.pad(rollout["logits"], (0, 0, 0, missing))

    def replayed_permutation(n):
        state["epoch"] += 1
        return recorded["orders"][state["update"]][state["epoch"] - 1].numpy()

    trl_ppo.batch_generation = replayed_generation
    trl_ppo.np = types.SimpleNamespace(random=types.SimpleNamespace(permutation=replayed_permutation))
    from datasets import Dataset
    from torch.utils.data import DataLoader

    trainer = trl_trainer(args, out)
    ordered = [q[m.bool()].tolist() for r in recorded["rollouts"] for q, m in zip(r["query"], r["query_mask"])]
    trainer.dataloader = DataLoader(Dataset.from_dict({"input_ids": ordered}), batch_size=BATCH, shuffle=False,
                                    collate_fn=trainer.data_collator, drop_last=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    start = {"policy": flat_weights(model.policy), "value": flat_weights(model.value_model)}
    trainer.train()
    result = {"updates": state["update"] + 1}
    for name, module in (("policy", model.policy), ("value", model.value_model)):
        theirs = flat_weights(module)
        result[name] = {"max_abs_difference": (recorded[name] - theirs).abs().max().item(),
                        "difference_over_movement": ((recorded[name] - theirs).norm()
                                                     / (theirs - start[name]).norm()).item()}
    result["kl"] = [e["objective/kl"] for e in trainer.state.log_history if "objective/kl" in e]
    return result


def child(args) -> None:
    import torch

    import pipeline  # noqa: F401  (registers PipelineGPT)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.child_out)
    if args.same_rollouts:
        result = (replay_trl if args.side == "trl" else record_ours)(args, out)
    else:
        result = (train_trl if args.side == "trl" else train_ours)(args, out)
    (out / "result.json").write_text(json.dumps(result))


def measure(args, policy_dir: Path | None, scratch: Path, seed: int) -> dict:
    """Held-out reward, KL to the SFT policy and exact match of a policy folder (None: the SFT policy itself)."""
    import torch
    from ppo_speed import chat_prompts
    from transformers import AutoModelForCausalLM

    from pipeline.alignment.ppo_trainer import PPOConfig, PPOTrainer
    from pipeline.data.demo_tasks import chat, eval_tasks
    from pipeline.evaluation.evaluators import held_out_demo_metrics
    from pipeline.stages.ppo import reward_function

    tokenizer, policy, reference, reward, value = models(args.sft, args.reward, scratch)
    if policy_dir is not None:
        policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    held_out = chat_prompts(tokenizer, [chat(t.prompt) for t in eval_tasks(args.held_out, seed=0)])
    probe = PPOTrainer(PPOConfig(output_dir=str(scratch / "probe"), batch_size=64, mini_batch_size=16,
                                 response_length=LENGTH, temperature=1.0), policy=policy, tokenizer=tokenizer,
                       value_model=value, ref_model=reference, prompts=held_out,
                       reward_fn=reward_function(reward, tokenizer, tokenizer, None, 0.0))
    torch.manual_seed(seed)
    result = probe.evaluate(held_out, batch_size=64)
    result["exact_match"] = held_out_demo_metrics(policy, tokenizer, args.exact_match)["exact_match"]
    return result


def same_rollouts(args) -> dict:
    """Both trainers from the same rollouts (ours sampled them) and mini-batch orders: their weights after
    `--steps` updates should differ only by floating-point rounding."""
    with tempfile.TemporaryDirectory() as scratch:
        results = {}
        for side in ("ours", "trl"):
            out = Path(scratch) / side
            out.mkdir()
            subprocess.run([sys.executable, __file__, "--side", side, "--same_rollouts", "--seed", str(args.seeds[0]),
                            "--child_out", str(out), "--sft", args.sft, "--reward", args.reward, "--trl_path",
                            args.trl_path, "--steps", str(args.steps)], check=True, cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"})
            results[side] = json.loads((out / "result.json").read_text())
    kl_trl = results["trl"].pop("kl")
    result = {**results["trl"], "kl_ours": results["ours"]["kl"], "kl_trl": kl_trl,
              "responses_with_a_pad_inside": results["ours"]["responses_with_a_pad_inside"]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation and standard error of the mean over seeds."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 3), "std": round(std, 3),
            "sem": round(std / len(values) ** 0.5, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="outputs/demo/sft")
    parser.add_argument("--reward", default="outputs/demo/reward")
    parser.add_argument("--trl_path", required=True, help="a folder holding trl 1.12.0 (pip install --target)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=30, help="PPO updates per run")
    parser.add_argument("--held_out", type=int, default=1200)
    parser.add_argument("--exact_match", type=int, default=300)
    parser.add_argument("--json", help="also write the rows, the summary and each run's per-update batch KL and score "
                        "to this file")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="one more arm of ours with these PPOConfig settings, e.g. max_grad_norm=0")
    parser.add_argument("--same_rollouts", action="store_true",
                        help="instead: our PPO and TRL's from the same rollouts and mini-batch orders (first seed, "
                             "--steps updates, no clipping); prints how far the final weights differ")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        args.variant = args.variant[0] if args.variant else None
        return child(args)
    if args.same_rollouts:
        return same_rollouts(args)
    from dataclasses import fields

    from pipeline.alignment.ppo_trainer import PPOConfig

    known = {f.name for f in fields(PPOConfig)}
    for variant in args.variant:  # checked before any training
        pairs = variant.split(",")
        if any("=" not in pair or pair.split("=", 1)[0] not in known for pair in pairs):
            parser.error(f"--variant takes KEY=VALUE[,KEY=VALUE] with PPOConfig keys, got {variant!r}")
    arms = [("ours", None), ("trl", None)] + [("ours", variant) for variant in args.variant]
    import pipeline  # noqa: F401

    rows, curves = [], []  # curves: each run's per-update batch KL and score, for the --json file
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for seed in args.seeds:
            before = measure(args, None, scratch / f"before{seed}", seed)
            for index, (side, variant) in enumerate(arms):
                arm = side if variant is None else f"ours[{variant}]"
                out = scratch / f"arm{index}-{seed}"
                out.mkdir()
                command = [sys.executable, __file__, "--side", side, "--seed", str(seed), "--child_out", str(out),
                           "--sft", args.sft, "--reward", args.reward, "--trl_path", args.trl_path, "--steps", str(args.steps)]
                if variant is not None:
                    command += ["--variant", variant]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
                subprocess.run(command, check=True, env=env, cwd=REPO)
                trained = json.loads((out / "result.json").read_text())
                after = measure(args, out / "policy", scratch / f"after{index}-{seed}", seed)
                gain = after["reward"] - before["reward"]
                quarter = max(1, len(trained["kl"]) // 4)
                rows.append({"side": arm, "seed": seed, "seconds": round(trained["seconds"], 1),
                             "held_out_gain": round(gain, 3), "held_out_kl": round(after["kl"], 3),
                             "gain_per_minute": round(gain / trained["seconds"] * 60, 3),
                             "batch_kl_last_quarter": round(sum(trained["kl"][-quarter:]) / quarter, 3),
                             "exact_match_before": before["exact_match"], "exact_match": after["exact_match"]})
                print(json.dumps(rows[-1]), flush=True)
                curves.append({"side": arm, "seed": seed, "batch_kl": trained["kl"], "batch_score": trained["score"]})
    summary = {}
    for side in dict.fromkeys(r["side"] for r in rows):
        mine = [r for r in rows if r["side"] == side]
        summary[side] = {key: spread([r[key] for r in mine]) for key in
                         ("seconds", "held_out_gain", "held_out_kl", "gain_per_minute", "batch_kl_last_quarter",
                          "exact_match")}
    def ratio(key: str, side: str, other: str) -> float | None:  # None where the other side's mean is 0
        mine, theirs = summary[side][key]["mean"], summary[other][key]["mean"]
        return round(mine / theirs, 3) if theirs else None

    summary["ours / trl"] = {"speed": ratio("seconds", "trl", "ours"),
                             "gain_per_minute": ratio("gain_per_minute", "ours", "trl")}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "curves": curves}, indent=2))
    return summary


if __name__ == "__main__":
    main()
