"""Train a reward model (TRL RewardTrainer, PipelineGPTForSequenceClassification) from an SFT artifact.

    accelerate launch recipes/reward.py --config recipes/configs/demo/reward.yaml [--key value ...]
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.common import parse_stage_args
from pipeline.stages.reward import RewardArguments, RewardConfig, run_reward  # RewardConfig: TRL's


def main(argv=None):
    args, training = parse_stage_args((RewardArguments, RewardConfig), argv)
    run_reward(args, training)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
