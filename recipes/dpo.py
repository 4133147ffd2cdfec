"""Direct preference optimisation (TRL DPOTrainer) from an SFT artifact; loss variant via `loss_type`.

    accelerate launch recipes/dpo.py --config recipes/configs/demo/dpo.yaml [--loss_type ipo] [--key value ...]
"""

import sys

from pipeline.errors import run_entry_point
from pipeline.stages.common import parse_stage_args
from pipeline.stages.dpo import DPOArguments, DPOConfig, run_dpo  # DPOConfig: TRL's


def main(argv=None):
    args, training = parse_stage_args((DPOArguments, DPOConfig), argv)
    run_dpo(args, training)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
