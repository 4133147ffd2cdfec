"""Supervised fine-tuning (TRL SFTTrainer): full, LoRA, QLoRA, freeze or prompt tuning, chosen by `method`.

    accelerate launch recipes/sft.py --config recipes/configs/demo/sft.yaml [--method lora] [--key value ...]
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.common import parse_stage_args
from pipeline.stages.sft import SFTArguments, SFTConfig, run_sft  # SFTConfig: TRL's


def main(argv=None):
    args, training = parse_stage_args((SFTArguments, SFTConfig), argv)
    run_sft(args, training)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
