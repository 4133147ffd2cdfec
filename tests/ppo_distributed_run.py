"""One PPO run on the tiny models of test_ppo_trainer, under `accelerate launch` (test_scale_out starts it).

    accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml tests/ppo_distributed_run.py OUT [--batch_size 4]
        [--top_k 1] [--max_steps 2] [--save_steps 1] [--die_in_step 3] [--resume]

Rank 0 writes OUT/parameters.pt (policy and value parameters) and OUT/history.json. `--die_in_step N` makes rank 0
kill itself with SIGKILL in the middle of step N's update, after the rollout, as a crash would.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_ppo_trainer import contains_target, parameters, prompts, tiny_models  # noqa: E402

from pipeline.alignment import PPOConfig, PPOTrainer  # noqa: E402
from pipeline.data.tokenizer import train_tokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--die_in_step", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    trainer = run(**vars(args))
    if trainer.accelerator.is_main_process:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save(parameters(trainer), Path(args.out) / "parameters.pt")
        (Path(args.out) / "history.json").write_text(json.dumps(trainer.history))


def run(out, batch_size=4, top_k=0, max_steps=2, save_steps=0, die_in_step=0, resume=False) -> PPOTrainer:
    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran far away", "one two three four five"] * 20,
                                vocab_size=300, show_progress=False)
    policy, ref, value = tiny_models()
    config = PPOConfig(output_dir=str(out), batch_size=batch_size, mini_batch_size=batch_size, ppo_epochs=2,
                       max_steps=max_steps, save_steps=save_steps, response_length=6, temperature=1.0, top_k=top_k,
                       learning_rate=1e-3, value_learning_rate=1e-3, seed=7)
    trainer = PPOTrainer(config, policy=policy, tokenizer=tokenizer, value_model=value, reward_fn=contains_target,
                         prompts=prompts(16), ref_model=ref)
    if die_in_step:
        optimize = trainer._optimize

        def optimize_then_maybe_die(batch, step):
            if step + 1 == die_in_step and trainer.accelerator.is_main_process:
                os.kill(os.getpid(), signal.SIGKILL)
            return optimize(batch, step)

        trainer._optimize = optimize_then_maybe_die
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer

if __name__ == "__main__":
    main()
