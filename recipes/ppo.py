"""PPO (our trainer: policy, frozen reference, reward model, value model, GAE) from an SFT policy.

    accelerate launch recipes/ppo.py --config recipes/configs/demo/ppo.yaml [--reward_model_path DIR] [--key value ...]
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.common import parse_stage_args
from pipeline.stages.ppo import PPOArguments, PPOConfig, run_ppo


def main(argv=None):
    args, config = parse_stage_args((PPOArguments, PPOConfig), argv)
    run_ppo(args, config)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
