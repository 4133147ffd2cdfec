"""Fine-tune PipelineGPTForSequenceClassification on (text, label) rows (transformers Trainer).

    accelerate launch recipes/classify.py --config recipes/configs/demo/classify.yaml [--key value ...]
"""

from transformers import TrainingArguments

from pipeline.stages.classify import ClassifyArguments, run_classify
from pipeline.stages.common import parse_stage_args


def main(argv=None):
    args, training = parse_stage_args((ClassifyArguments, TrainingArguments), argv)
    run_classify(args, training)


if __name__ == "__main__":
    main()
