"""The `pipeline` command: data tools, artifact export/push/merge, chat, reports.

    pipeline data validate PATH [--format F] [--strict]      kept/dropped summary; exit 1 on a bad row in strict mode
    pipeline data convert PATH OUT.jsonl [--format F]        canonical rows as JSONL
    pipeline data inspect --config STAGE.yaml [-n N]         samples exactly as the trainer sees them
    pipeline data inspect --prepared DIR [-n N]              prepared shards: counts, token totals, decoded blocks
    pipeline data prepare --config STAGE.yaml [--key value]  pretraining data streamed into reusable shards
    pipeline data card PATH --out CARD.md --license L ...    a dataset card from measured statistics
    pipeline merge ADAPTER_DIR OUTPUT_DIR                    fold a LoRA adapter into a full model
    pipeline env                                             versions and hardware, to paste into a bug report

A mistake you can fix (a config key, a path, a data file, a stage's lineage) prints one `error:` line and exits 1;
add --debug (or set PIPELINE_DEBUG=1) to see its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.data.formats import FORMATS
from pipeline.errors import ConfigError, did_you_mean, run_entry_point
from pipeline.hub.commands import register_commands


def _field_map(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--field {item!r}: expected NAME=YOUR_KEY, e.g. --field text=paragraphs")
        name, key = item.split("=", 1)
        out[name] = key
    return out


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a file (.jsonl .json .txt .csv .parquet), a folder of them, or a Hub dataset id")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: detected per file)")
    parser.add_argument("--field", action="append", metavar="NAME=KEY",
                        help="read the expected field NAME from your KEY (repeatable), e.g. text=paragraphs")
    parser.add_argument("--text-unit", default="paragraph", choices=("file", "paragraph", "line"),
                        help="how a .txt file splits into documents")
    parser.add_argument("--split", default="train", help="split of a Hub dataset")


def _load(args, strict: bool = False):
    from pipeline.data.validation import load_rows

    return load_rows(args.path, format=args.format, fields=_field_map(args.field), strict=strict,
                     text_unit=args.text_unit, split=args.split)


def data_validate(args) -> int:
    from pipeline.data.validation import DataValidationError

    try:
        result = _load(args, strict=args.strict)
    except DataValidationError as e:
        print(e, file=sys.stderr)
        return 1
    print(result.report.table(show_issues=args.show))
    return 0


def data_convert(args) -> int:
    result = _load(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".incomplete")
    with open(partial, "w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, out)  # a half-written file never carries the final name
    print(result.report.table(show_issues=3), file=sys.stderr)
    print(f"wrote {len(result.rows)} {result.canonical_format} rows to {out}", file=sys.stderr)
    return 0


def data_card(args) -> int:
    from pipeline.data.cards import dataset_card

    result = _load(args)
    card = dataset_card(result, name=args.name or Path(args.path).stem, license=args.license,
                        language=args.language, source=args.source or str(args.path),
                        description=args.description or "", known_issues=args.known_issue or ())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(str(card), encoding="utf-8")
    print(f"wrote {out} ({result.report.kept} rows)")
    return 0


def data_inspect(args) -> int:
    from pipeline.stages.inspect import inspect_prepared, inspect_stage_config

    if args.prepared:
        print(inspect_prepared(args.prepared, samples=args.samples))
    elif args.config:
        print(inspect_stage_config(args.config, samples=args.samples, overrides=args.overrides, stage=args.stage))
    else:
        raise ConfigError("pipeline data inspect: pass --config STAGE.yaml or --prepared DIR")
    return 0


def data_prepare(args) -> int:
    from pipeline.stages.pretrain import prepare_from_config

    print(prepare_from_config(args.config, args.overrides).summary())  # a bad shard: ValueError naming the file
    return 0


def merge(args) -> int:
    from pipeline.stages.merge import merge_adapter

    print(f"merged into {merge_adapter(args.adapter_dir, args.output_dir, overwrite=args.overwrite)}")
    return 0


def env(args) -> int:
    from pipeline.env_report import environment_report

    print(environment_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Taken off the command line wherever it stands (pipeline.errors.run_entry_point); listed here for --help.
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="validate, convert, inspect datasets; write dataset cards")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    validate = data_commands.add_parser("validate", help="check every row; print kept/dropped by reason")
    _add_source_arguments(validate)
    validate.add_argument("--strict", action="store_true", help="stop at the first bad row (exit 1)")
    validate.add_argument("--show", type=int, default=10, help="problems to print")
    validate.set_defaults(func=data_validate)

    convert = data_commands.add_parser("convert", help="write canonical rows as JSONL")
    _add_source_arguments(convert)
    convert.add_argument("out", help="output .jsonl")
    convert.set_defaults(func=data_convert)

    card = data_commands.add_parser("card", help="write a Hugging Face dataset card from measured statistics")
    _add_source_arguments(card)
    card.add_argument("--out", required=True, help="card file to write (e.g. data_cards/NAME.md)")
    card.add_argument("--name", help="pretty name (default: the file name)")
    card.add_argument("--license", required=True, help="SPDX-style licence id, e.g. mit, cc-by-nc-4.0")
    card.add_argument("--language", nargs="+", default=["en"], help="language codes, e.g. en zh")
    card.add_argument("--source", help="where the data comes from (URL or Hub id)")
    card.add_argument("--description", help="one paragraph on what the data is")
    card.add_argument("--known-issue", action="append", help="a known issue to list (repeatable)")
    card.set_defaults(func=data_card)

    inspect = data_commands.add_parser("inspect", help="render samples exactly as a stage's trainer sees them")
    inspect.add_argument("--config", help="a stage YAML, e.g. recipes/configs/demo/sft.yaml")
    inspect.add_argument("--prepared", help="a folder written by `pipeline data prepare`")
    inspect.add_argument("-n", "--samples", type=int, default=3)
    inspect.add_argument("--stage", help="the stage, when the config's file name does not start with it")
    inspect.set_defaults(overrides=[])  # any other --key value pairs override the config (see main)
    inspect.set_defaults(func=data_inspect)

    prepare = data_commands.add_parser("prepare", help="stream a pretraining config's data into reusable shards")
    prepare.add_argument("--config", required=True, help="a pretrain YAML, e.g. recipes/configs/demo/pretrain.yaml")
    prepare.set_defaults(overrides=[])  # --dataset_path, --tokenizer_name_or_path, --output_dir, … as for the stage
    prepare.set_defaults(func=data_prepare)

    merge_parser = commands.add_parser("merge", help="fold a LoRA adapter stage output into a full model")
    merge_parser.add_argument("adapter_dir", help="a stage output holding an adapter (its manifest names the base)")
    merge_parser.add_argument("output_dir", help="where the merged model is written")
    merge_parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    merge_parser.set_defaults(func=merge)

    env_parser = commands.add_parser("env", help="versions, accelerate config and hardware for a bug report")
    env_parser.set_defaults(func=env)

    register_commands(commands)  # export, push, chat, report: they live beside the code they drive
    return parser


def _leaf_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)parser of the command that was given, e.g. the one of `pipeline data validate`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _leaf_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None:
        args.overrides = list(args.overrides) + extra
    elif extra:
        leaf = _leaf_parser(parser, args)
        known = [s for a in leaf._actions for s in a.option_strings if s.startswith("--")]
        leaf.error("; ".join(f"{x}: unknown flag{did_you_mean(x.split('=', 1)[0], known)}"
                                    if x.startswith("-") else f"unexpected argument {x!r}" for x in extra))
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """User errors (pipeline.errors) print `error: message` and return 1; `--debug` shows their traceback."""
    return run_entry_point(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
