"""Quickstart: train a tokenizer and a tiny PipelineGPT on the embedded demo text, then generate from it.

    python recipes/quickstart.py --output_dir outputs/demo/quickstart [--max_steps 300] [--preset gpt2]

The output folder holds the model (loadable with AutoModelForCausalLM, trust_remote_code=True) and its tokenizer.
"""

import sys

from transformers import HfArgumentParser

from pipeline.stages.quickstart import QuickstartArguments, run_quickstart


def main(argv=None) -> None:
    (args,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses(argv)
    try:
        run_quickstart(args)
    except FileExistsError as error:
        sys.exit(str(error))


if __name__ == "__main__":
    main()
