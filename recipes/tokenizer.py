"""Train the tokenizer (byte-level BPE + chat template) on the configured text.

    accelerate launch recipes/tokenizer.py --config recipes/configs/demo/tokenizer.yaml [--key value ...]
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.common import parse_stage_args
from pipeline.stages.tokenizer import TokenizerArguments, run_tokenizer


def main(argv=None):
    (args,) = parse_stage_args((TokenizerArguments,), argv)
    run_tokenizer(args)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
