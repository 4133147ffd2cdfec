"""PPO on the demo task: throughput, reward gain per minute and per unit of KL, over several seeds.

Runs our PPOTrainer from the demo SFT policy against the demo reward model alone (no verifier; run `make demo`, or
at least the tokenizer, pretrain, sft and reward stages, first), with the settings of `--config` plus `--set`
overrides, once per seed, and reports per seed and as mean ± standard deviation over seeds:

- tokens/s: prompt + response tokens of the rollouts per second of PPO steps (rollout and update);
- batch reward: the mean score of the first and last quarter of the steps (one step's mean over 64 prompts moves
  by about ±0.15 on its own), and its gain per minute;
- held-out reward and KL: one sampled response for each of `--held_out` held-out demo prompts, scored by the reward
  model, before and after training (a lower-noise measure), the gain per minute and per unit of final KL;
- exact match: greedy answers on `--exact_match` held-out demo tasks after training.

    python benchmarks/ppo_speed.py                                      # uses outputs/demo/{sft,reward}
    python benchmarks/ppo_speed.py --seeds 0 1 2 3 --set ptx_coef=0 --set lr_scheduler_type=linear
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import pipeline  # noqa: F401  (registers PipelineGPT)
from pipeline.adapters import full_weights_dir
from pipeline.alignment.ppo_trainer import PPOConfig, PPOTrainer
from pipeline.data.demo_tasks import chat, eval_tasks, rl_prompt_rows
from pipeline.data.tokenizer import load_tokenizer
from pipeline.evaluation.evaluators import held_out_demo_metrics
from pipeline.stages.common import parse_stage_args
from pipeline.stages.ppo import PPOArguments, load_ptx, reward_function


def demo_models(sft: str, reward: str, scratch: Path):
    """The demo's tokenizer, SFT policy (LoRA merged), a frozen copy of it as the reference, the reward model and
    the value model's start (a second copy of the reward model). Shared by the PPO benchmarks."""
    tokenizer = load_tokenizer(sft)
    base = full_weights_dir(sft, scratch / "sft")
    return (tokenizer, AutoModelForCausalLM.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base),
            AutoModelForSequenceClassification.from_pretrained(reward),
            AutoModelForSequenceClassification.from_pretrained(reward))


def chat_prompts(tokenizer, conversations) -> list[list[int]]:
    """Token ids of each conversation with the generation prompt, as the PPO stage encodes its prompts."""
    return [tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
            for messages in conversations]


def override_flags(pairs: list[str]) -> list[str]:
    """`--set KEY=VALUE` items as the stage parser's flags."""
    return [item for pair in pairs for item in ("--" + pair.split("=", 1)[0], pair.split("=", 1)[1])]


def one_seed(args, seed: int, scratch: Path) -> dict:
    tokenizer, policy, reference, reward, value = demo_models(args.sft, args.reward, scratch)
    prompts = chat_prompts(tokenizer, [r["prompt"] for r in rl_prompt_rows(args.batch_size * args.steps, seed=0)])
    held_out = chat_prompts(tokenizer, [chat(t.prompt) for t in eval_tasks(args.held_out, seed=0)])
    stage, config = parse_stage_args((PPOArguments, PPOConfig), [
        "--config", args.config, "--output_dir", str(scratch / "ppo"), "--max_steps", str(args.steps),
        "--batch_size", str(args.batch_size), "--mini_batch_size", str(args.mini_batch_size),
        "--response_length", str(args.response_length), "--save_steps", "0", "--seed", str(seed),
        *override_flags(args.set)])
    ptx, _ = load_ptx(stage, config, tokenizer)  # the config's PPO-ptx rows, as the demo trains
    if stage.cpu_threads:
        torch.set_num_threads(stage.cpu_threads)
    trainer = PPOTrainer(config, policy=policy, tokenizer=tokenizer, value_model=value,
                         reward_fn=reward_function(reward, tokenizer, tokenizer, None, 0.0), prompts=prompts,
                         ref_model=reference, ptx_data=ptx)
    torch.manual_seed(seed)
    before = trainer.evaluate(held_out, batch_size=64) if args.held_out else None
    start = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - start
    after = trainer.evaluate(held_out, batch_size=64) if args.held_out else None
    exact = held_out_demo_metrics(trainer.policy, tokenizer, args.exact_match)["exact_match"] if (
        args.exact_match) else None

    prompt_tokens = sum(len(p) for p in prompts[: args.batch_size * args.steps])
    response_tokens = sum(h["response_length"] for h in history) * args.batch_size
    window = max(1, len(history) // 4)
    first = sum(h["mean_score"] for h in history[:window]) / window
    last = sum(h["mean_score"] for h in history[-window:]) / window
    final_kl = sum(h["kl"] for h in history[-window:]) / window
    result = {"seed": seed, "seconds": round(seconds, 1),
              "tokens_per_second": round((prompt_tokens + response_tokens) / seconds),
              "batch_reward_first_quarter": round(first, 3), "batch_reward_last_quarter": round(last, 3),
              "batch_reward_gain_per_minute": round((last - first) / seconds * 60, 3),
              "batch_kl_last_quarter": round(final_kl, 3), "exact_match": exact,
              "frontier": [(round(h["kl"], 4), round(h["mean_score"], 4)) for h in history]}
    if before and after:
        gain = after["reward"] - before["reward"]
        result.update(held_out_reward_before=round(before["reward"], 3), held_out_reward_after=round(after["reward"], 3),
                      held_out_kl=round(after["kl"], 3), held_out_gain_per_minute=round(gain / seconds * 60, 3),
                      held_out_gain_per_kl=round(gain / after["kl"], 3) if after["kl"] > 0 else None)
    return result


def summary(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every numeric figure."""
    out = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs]
        if key == "seed" or not all(isinstance(v, (int, float)) for v in values):
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key] = {"mean": round(statistics.fmean(values), 3), "std": round(spread, 3)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="outputs/demo/sft")
    parser.add_argument("--reward", default="outputs/demo/reward")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--mini_batch_size", type=int, default=16)
    parser.add_argument("--response_length", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--held_out", type=int, default=1200, help="held-out prompts sampled before and after")
    parser.add_argument("--exact_match", type=int, default=300, help="held-out tasks answered greedily after")
    parser.add_argument("--config", default="recipes/configs/demo/ppo.yaml", help="PPO settings (learning rates, KL, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set ptx_coef=0 --set lr_scheduler_type=linear")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    for path in (args.sft, args.reward):
        if not (Path(path) / "pipeline_manifest.json").is_file():
            parser.error(f"{path} is not a finished stage output: run `make demo` first")
    bad = [pair for pair in args.set if "=" not in pair]
    if bad:
        parser.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
    runs = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as scratch:
            runs.append(one_seed(args, seed, Path(scratch)))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "frontier"}))
    result = {"settings": {"config": args.config, "set": args.set, "steps": args.steps, "batch_size": args.batch_size,
                           "mini_batch_size": args.mini_batch_size, "response_length": args.response_length},
              "summary": summary(runs), "runs": runs,
              "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
