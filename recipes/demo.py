"""The whole chain on the embedded demo tasks (what `make demo` runs): tokenizer -> pretrain -> SFT (LoRA) ->
reward -> PPO and DPO -> evaluation -> export -> clean-process load; writes outputs/demo/report.{json,md} + plots.

    python recipes/demo.py --overwrite true [--set sft.max_steps=100] [--set seed=1] [--stages tokenizer,pretrain]
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.chain import ChainArguments, gather_repeated, run_chain
from pipeline.stages.common import parse_stage_args


def main(argv=None):
    argv = gather_repeated("--set", list(sys.argv[1:] if argv is None else argv))
    (args,) = parse_stage_args((ChainArguments,), argv)
    run_chain(args)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
