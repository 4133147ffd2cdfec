"""Pretrain a PipelineGPT from scratch on packed text blocks (transformers Trainer).

    accelerate launch recipes/pretrain.py --config recipes/configs/demo/pretrain.yaml [--key value ...]
"""

from transformers import TrainingArguments

from pipeline.stages.common import parse_stage_args
from pipeline.stages.pretrain import PretrainArguments, run_pretrain


def main(argv=None):
    args, training = parse_stage_args((PretrainArguments, TrainingArguments), argv)
    run_pretrain(args, training)


if __name__ == "__main__":
    main()
