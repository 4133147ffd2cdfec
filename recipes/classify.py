"""Fine-tune PipelineGPTForSequenceClassification on (text, label) rows (transformers Trainer).

    accelerate launch recipes/classify.py --config recipes/configs/demo/classify.yaml [--key value ...]
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.classify import ClassifyArguments, TrainingArguments, run_classify  # TrainingArguments: transformers'
from pipeline.stages.common import parse_stage_args


def main(argv=None):
    args, training = parse_stage_args((ClassifyArguments, TrainingArguments), argv)
    run_classify(args, training)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
