"""What every stage's entry point shares: YAML + command-line arguments, and a distributed sanity check.

    args, training = parse_stage_args((SFTArguments, SFTConfig), argv)

Atomic outputs, manifests and checkpoint discovery live in `pipeline.artifacts`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import HfArgumentParser

from pipeline.errors import ConfigError, LaunchError, did_you_mean

__all__ = ["ConfigError", "check_distributed_setup", "parse_stage_args"]


# --------------------------------------------------------------------------- arguments


def _yaml_with_lines(path: Path) -> tuple[dict, dict[str, int]]:
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{path}:{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}:1: expected a mapping of key: value lines")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value} if node is not None else {}
    return values, lines


def _convert(action, value: Any, where: str) -> Any:
    """`value` from YAML, checked and converted the way the command line would convert it."""
    if value is None or action.type is None or isinstance(value, dict):
        return value
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and action.nargs not in ("+", "*"):
        raise ConfigError(f"{where}: expected one value, got a list")
    out = []
    for item in items:
        try:
            converted = action.type(str(item).lower() if isinstance(item, bool) else str(item))
        except (TypeError, ValueError, Exception) as e:  # argparse types raise assorted errors
            expected = getattr(action.type, "__name__", str(action.type))
            raise ConfigError(f"{where}: {item!r} is not a valid {expected} ({e})") from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigError(f"{where}: {item!r} is not one of {list(action.choices)}")
        out.append(converted)
    return out if isinstance(value, list) else out[0]


def _json_object(text: str) -> dict:
    """A dict-typed option on the command line: a JSON object such as '{"key_smear": true}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"key\": 1}}', got {text!r} ({e})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


def parse_stage_args(dataclass_types: Sequence[type], argv: list[str] | None = None) -> tuple:
    """Dataclass instances from `--config FILE.yaml` plus `--key value` overrides (the command line wins).

    Unknown or ill-typed YAML keys fail with `file:line: key: problem (did you mean ...?)`, a misspelt flag with
    `--flag: unknown flag (did you mean --flag?)`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    for action in parser._actions:
        if action.type is dict:  # argparse would call dict("{...}") and fail
            action.type = _json_object
    config_path, defaults = None, None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config: expected a YAML file path")
        config_path = Path(argv[i + 1])
        del argv[i:i + 2]
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"--config: {config_path} does not exist")
        values, lines = _yaml_with_lines(config_path)
        actions = {a.dest: a for a in parser._actions if a.dest != "help"}
        defaults = {}
        for key, value in values.items():
            where = f"{config_path}:{lines.get(key, 1)}: {key}"
            if key not in actions:
                raise ConfigError(f"{where}: unknown key{did_you_mean(key, actions)}")
            defaults[key] = _convert(actions[key], value, where)
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a YAML value satisfies a required argument
            if action.dest in defaults:
                action.required = False
    if not _has_gpu() and any(a.dest == "bf16" for a in parser._actions) and "bf16" not in (defaults or {}):
        # TRL 1.16 configs default to bf16=True and refuse it at parse time on a machine without a GPU; an
        # explicit --bf16 true still gets that error.
        parser.set_defaults(bf16=False)
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # a dataclass __post_init__ rejected a value
        source = f"{config_path}: " if config_path else ""
        raise ConfigError(f"{source}{e}") from e
    if unknown:
        raise ConfigError(_unknown_flags(parser, unknown))
    return tuple(parsed)


def _unknown_flags(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """`--learnign_rate: unknown flag (did you mean --learning_rate?)`, the same hint as for a YAML key."""
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
    if not flags:
        return f"unexpected argument(s) {unknown}; options are given as --key value"
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and "-" not in s[2:]]
    return "; ".join(f"{flag}: unknown flag{did_you_mean(flag, known)}" for flag in flags)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- distributed


def check_distributed_setup(training=None) -> None:
    """Refuse an FSDP or DeepSpeed launch on a machine without GPUs (Accelerate would fall back to CPU DDP without a
    word), and N independent copies: WORLD_SIZE > 1 but Accelerate did not set up a process group.

    Pass the training arguments: Accelerate's process state is created once, and on a machine without GPUs it
    joins the CPU process group only when created with cpu=True (as Trainer does for use_cpu).
    """
    import torch

    engine = next((name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                   if os.environ.get(var, "").lower() in ("1", "true")), None)
    if engine and not torch.cuda.is_available():
        raise LaunchError(
            f"the Accelerate config asks for {engine}, which needs GPUs, and this machine has none: Accelerate would "
            f"quietly train plain CPU data parallel instead. Use `accelerate launch --config_file "
            f"recipes/accelerate/cpu_ddp.yaml` for CPU processes, or run on GPUs")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    cpu = bool(getattr(training, "use_cpu", False)) or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.distributed_type == DistributedType.NO or state.num_processes != world:
        raise LaunchError(
            f"WORLD_SIZE={world} but Accelerate runs {state.num_processes} process(es) of type "
            f"{state.distributed_type}: each process would train its own copy. On CPU use "
            f"`accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml`; FSDP and DeepSpeed need GPUs")

