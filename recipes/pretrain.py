"""Pretrain a PipelineGPT from scratch on packed text blocks (transformers Trainer).

    accelerate launch recipes/pretrain.py --config recipes/configs/demo/pretrain.yaml [--key value ...]
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.common import parse_stage_args
from pipeline.stages.pretrain import PretrainArguments, TrainingArguments, run_pretrain  # TrainingArguments: transformers'


def main(argv=None):
    args, training = parse_stage_args((PretrainArguments, TrainingArguments), argv)
    run_pretrain(args, training)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
