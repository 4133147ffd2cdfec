"""Quickstart: train a tokenizer and a tiny PipelineGPT on the embedded demo text, then generate from it.

    python recipes/quickstart.py --output_dir outputs/demo/quickstart [--max_steps 300] [--preset gpt2]

The output folder holds the model (loadable with AutoModelForCausalLM, trust_remote_code=True) and its tokenizer.
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.common import parse_stage_args
from pipeline.stages.quickstart import QuickstartArguments, run_quickstart


def main(argv=None) -> None:
    (args,) = parse_stage_args((QuickstartArguments,), argv)
    run_quickstart(args)  # an existing output_dir without --overwrite true: one `error:` line, exit 1


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
