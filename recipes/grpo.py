"""GRPO (TRL GRPOTrainer) from an SFT policy, rewarded by the demo verifier and/or a reward model.

    accelerate launch recipes/grpo.py --config recipes/configs/demo/grpo.yaml [--reward_model_path DIR] [--key value ...]
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.common import parse_stage_args
from pipeline.stages.grpo import GRPOArguments, GRPOConfig, run_grpo  # GRPOConfig: TRL's


def main(argv=None):
    args, training = parse_stage_args((GRPOArguments, GRPOConfig), argv)
    run_grpo(args, training)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
