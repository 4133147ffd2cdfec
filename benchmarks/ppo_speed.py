"""PPO throughput and reward gain per wall-clock second on the demo task.

Runs our PPOTrainer from the demo SFT policy against the demo reward model (run `make demo`, or at least the
tokenizer, pretrain, sft and reward stages, first), with the config's settings, PPO-ptx rows and thread count, and
reports rollout+update tokens/s (prompt + response tokens processed per second of PPO step) and the mean-reward
gain per minute, from the mean score of the first quarter of the steps to that of the last quarter (one step's mean
over 64 prompts moves by ±0.15 on its own).

    python benchmarks/ppo_speed.py                                   # uses outputs/demo/{sft,reward}
    python benchmarks/ppo_speed.py --steps 40 --batch_size 32
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import pipeline  # noqa: F401  (registers PipelineGPT)
from pipeline.alignment.ppo_trainer import PPOConfig, PPOTrainer
from pipeline.data.demo_tasks import rl_prompt_rows
from pipeline.data.tokenizer import load_tokenizer
from pipeline.stages.common import parse_stage_args
from pipeline.stages.ppo import PPOArguments, load_ptx, reward_function
from pipeline.adapters import full_weights_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="outputs/demo/sft")
    parser.add_argument("--reward", default="outputs/demo/reward")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--mini_batch_size", type=int, default=16)
    parser.add_argument("--response_length", type=int, default=10)
    parser.add_argument("--config", default="recipes/configs/demo/ppo.yaml", help="PPO settings (learning rates, KL, ...)")
    args = parser.parse_args(argv)
    for path in (args.sft, args.reward):
        if not (Path(path) / "pipeline_manifest.json").is_file():
            parser.error(f"{path} is not a finished stage output: run `make demo` first")

    tokenizer = load_tokenizer(args.sft)
    with tempfile.TemporaryDirectory() as scratch:
        base = full_weights_dir(args.sft, Path(scratch) / "sft")
        policy, reference = AutoModelForCausalLM.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
        reward = AutoModelForSequenceClassification.from_pretrained(args.reward)
        value = AutoModelForSequenceClassification.from_pretrained(args.reward)
        rows = rl_prompt_rows(args.batch_size * args.steps, seed=0)
        prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
                   for r in rows]
        stage, config = parse_stage_args((PPOArguments, PPOConfig), [
            "--config", args.config, "--output_dir", str(Path(scratch) / "ppo"), "--max_steps", str(args.steps),
            "--batch_size", str(args.batch_size), "--mini_batch_size", str(args.mini_batch_size),
            "--response_length", str(args.response_length), "--save_steps", "0"])
        ptx, _ = load_ptx(stage, config, tokenizer)  # the config's PPO-ptx rows and threads, as the demo trains
        if stage.cpu_threads:
            torch.set_num_threads(stage.cpu_threads)
        trainer = PPOTrainer(config, policy=policy, tokenizer=tokenizer, value_model=value,
                             reward_fn=reward_function(reward, tokenizer, tokenizer, None, 0.0), prompts=prompts,
                             ref_model=reference, ptx_data=ptx)
        start = time.perf_counter()
        history = trainer.train()
        seconds = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p in prompts[: args.batch_size * args.steps])
    response_tokens = sum(h["response_length"] for h in history) * args.batch_size
    window = max(1, len(history) // 4)
    first = sum(h["mean_score"] for h in history[:window]) / window
    last = sum(h["mean_score"] for h in history[-window:]) / window
    result = {"steps": args.steps, "batch_size": args.batch_size, "ptx_coef": config.ptx_coef,
              "seconds": round(seconds, 1),
              "tokens_per_second": round((prompt_tokens + response_tokens) / seconds),
              "response_tokens_per_second": round(response_tokens / seconds, 1),
              "mean_reward_first_quarter": round(first, 3), "mean_reward_last_quarter": round(last, 3),
              "reward_gain_per_minute": round((last - first) / seconds * 60, 3),
              "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
