"""`pipeline export | push | chat | report` subcommands (registered by `pipeline.cli`)."""

from __future__ import annotations

import json
import sys


def export(args) -> int:
    from pipeline.hub.export import export_model

    out = export_model(args.source, args.output_dir, format=args.format, overwrite=args.overwrite,
                       repo_id=args.repo_id)
    print(f"exported {args.source} to {out} ({args.format} format)")
    return 0


def push(args) -> int:
    from pipeline.hub.push import MissingTokenError, push_folder

    try:
        files = push_folder(args.folder, args.repo_id, private=not args.public, dry_run=args.dry_run,
                            token=args.token)
    except MissingTokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files to {args.repo_id} ({'public' if args.public else 'private'}):")
    print("\n".join(f"  {f}" for f in files))
    return 0


def chat(args) -> int:
    from pipeline.evaluation.chat import chat_loop

    chat_loop(args.model_dir, system=args.system, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return 0


def report(args) -> int:
    from pipeline.evaluation.report import write_report

    stages = json.loads(open(args.report_json).read())["stages"]
    for path in write_report(stages, args.output_dir):
        print(path)
    return 0


def register_commands(commands) -> None:
    p = commands.add_parser("export", help="write a stage output as a Hub-ready folder (or a plain Llama folder)")
    p.add_argument("source", help="a finished stage output (LoRA adapters are merged)")
    p.add_argument("output_dir")
    p.add_argument("--format", default="pipeline", choices=("pipeline", "llama"),
                   help="pipeline: PipelineGPT with remote code; llama: LlamaForCausalLM when the architecture allows")
    p.add_argument("--repo-id", dest="repo_id", help="the Hub repository named in the model card")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=export)

    p = commands.add_parser("push", help="upload an export folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("repo_id", help="user/name")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="list the files, upload nothing")
    p.add_argument("--token", help="a Hub token (default: HF_TOKEN or the stored login); never printed")
    p.set_defaults(func=push)

    p = commands.add_parser("chat", help="chat with a model through its chat template (streams; /exit quits)")
    p.add_argument("model_dir")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    p.add_argument("--top-k", dest="top_k", type=int, default=0)
    p.set_defaults(func=chat)

    p = commands.add_parser("report", help="rewrite report.md and plots from a report.json")
    p.add_argument("report_json")
    p.add_argument("output_dir")
    p.set_defaults(func=report)
