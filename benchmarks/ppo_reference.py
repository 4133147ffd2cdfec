"""Our PPO's per-token rewards and advantages next to those of TRL's former PPOTrainer, on the same rollouts.

Takes `--batches` rollouts of our PPOTrainer (demo SFT policy, demo reward model alone, the demo config's settings
with `--set` overrides; run `make demo` first) and computes, from the same responses, log-probs, values and scores,
the targets of both: ours puts the score on the response's last real token (its EOS) and keeps the value there;
TRL 1.12's `trl.experimental.ppo` puts the score on the token after EOS (when the response has room for it) and
keeps the value there too, so the EOS is followed by one more state (written here from its algorithm: GAE over the
response with values beyond that token set to 0, advantages whitened over the real tokens). Printed per response
position: the mean per-token KL, each one's mean and standard deviation of the whitened advantages, and their
correlation; then the same over all tokens.

    python benchmarks/ppo_reference.py --batches 4
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from ppo_speed import chat_prompts, demo_models, override_flags  # this folder, first on sys.path for a script

import pipeline  # noqa: F401  (registers PipelineGPT)
from pipeline.alignment.ppo_core import apply_missing_eos_penalty, masked_whiten
from pipeline.alignment.ppo_trainer import PPOConfig, PPOTrainer, positions_from_mask, token_values
from pipeline.data.demo_tasks import rl_prompt_rows
from pipeline.stages.common import parse_stage_args
from pipeline.stages.ppo import PPOArguments, reward_function


def reference_advantages(batch: dict, scores: torch.Tensor, next_values: torch.Tensor, kl_coef: float,
                         gamma: float, lam: float) -> torch.Tensor:
    """TRL 1.12 PPOTrainer's targets: KL penalty on real tokens, the score one token after the last real one
    (or on it when the response is full), values kept up to that token, GAE, whitening over the real tokens."""
    mask = batch["response_mask"].bool()
    length = mask.shape[1]
    last = mask.long().sum(1) - 1                     # index of each row's EOS (or last generated token)
    positions = torch.arange(length).expand_as(mask)
    values = torch.where(positions <= last[:, None], batch["values"], 0.0)
    room = last + 1 < length
    after = torch.where(room, last + 1, last)
    values[room, after[room]] = next_values[room]      # the state after EOS keeps its own value
    rewards = -kl_coef * (batch["logprobs"] - batch["ref_logprobs"]) * mask
    rewards[torch.arange(len(scores)), after] += scores
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(scores)
    for t in reversed(range(length)):
        following = values[:, t + 1] if t + 1 < length else torch.zeros_like(scores)
        running = rewards[:, t] + gamma * following - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return masked_whiten(advantages, mask.float())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="outputs/demo/sft")
    parser.add_argument("--reward", default="outputs/demo/reward")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--config", default="recipes/configs/demo/ppo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    for path in (args.sft, args.reward):
        if not (Path(path) / "pipeline_manifest.json").is_file():
            parser.error(f"{path} is not a finished stage output: run `make demo` first")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer, policy, reference, reward, value = demo_models(args.sft, args.reward, Path(scratch))
        _, config = parse_stage_args((PPOArguments, PPOConfig), [
            "--config", args.config, "--output_dir", str(Path(scratch) / "ppo"), "--ptx_coef", "0",
            *override_flags(args.set)])
        prompts = chat_prompts(tokenizer, [r["prompt"] for r in rl_prompt_rows(config.batch_size * args.batches,
                                                                                 seed=0)])
        reward_fn = reward_function(reward, tokenizer, tokenizer, None, 0.0)
        trainer = PPOTrainer(config, policy=policy, tokenizer=tokenizer, value_model=value, reward_fn=reward_fn,
                             prompts=prompts, ref_model=reference)
        ours, theirs, kls, masks = [], [], [], []
        torch.manual_seed(config.seed)
        for step in range(args.batches):
            batch = trainer._rollout(step)["batch"]
            mask = batch["response_mask"]
            responses = [r[m.bool()].tolist() for r, m in zip(batch["response"], mask)]
            scores = torch.as_tensor(reward_fn(trainer._prompt_batch(step), responses), dtype=torch.float32)
            scores = apply_missing_eos_penalty(scores, batch["has_eos"], config.missing_eos_penalty)
            ids = torch.cat([batch["query"], batch["response"]], 1)
            attention = torch.cat([batch["query_mask"], mask], 1)
            with torch.no_grad():  # the value of the state after EOS: the hidden state at the EOS token
                all_values = token_values(value, ids, attention, positions_from_mask(attention))
            width = batch["query"].shape[1]
            last = mask.sum(1) - 1
            next_values = all_values[torch.arange(len(last)), (width + last).clamp(max=ids.shape[1] - 1)]
            theirs.append(reference_advantages(batch, scores, next_values, config.init_kl_coef, config.gamma,
                                               config.lam))
            ours.append(batch["advantages"])
            kls.append((batch["logprobs"] - batch["ref_logprobs"]) * mask)
            masks.append(mask)
            trainer._optimize(batch, step)  # move the policy, so later rollouts carry some KL
    ours, theirs, kls, masks = (torch.cat(t) for t in (ours, theirs, kls, masks))
    rows = []
    for t in range(masks.shape[1]):
        real = masks[:, t].bool()
        if real.sum() < 3:
            continue
        a, b = ours[real, t], theirs[real, t]
        rows.append({"position": t, "tokens": int(real.sum()), "mean_kl": round(kls[real, t].mean().item(), 4),
                     "ours_mean": round(a.mean().item(), 3), "ours_std": round(a.std().item(), 3),
                     "trl_mean": round(b.mean().item(), 3), "trl_std": round(b.std().item(), 3),
                     "correlation": round(torch.corrcoef(torch.stack([a, b]))[0, 1].item(), 4)})
    real = masks.bool()
    total = {"tokens": int(real.sum()), "correlation": round(torch.corrcoef(torch.stack([ours[real], theirs[real]]))[
        0, 1].item(), 4), "mean_abs_difference": round((ours[real] - theirs[real]).abs().mean().item(), 4)}
    print("| position | tokens | mean KL | ours: mean ± std | TRL: mean ± std | correlation |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['position']} | {r['tokens']} | {r['mean_kl']} | {r['ours_mean']} ± {r['ours_std']} | "
              f"{r['trl_mean']} ± {r['trl_std']} | {r['correlation']} |")
    print(json.dumps({"all_tokens": total}))
    return {"positions": rows, "all_tokens": total}


if __name__ == "__main__":
    main()
