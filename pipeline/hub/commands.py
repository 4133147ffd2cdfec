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
    from pipeline.hub.push import MissingTokenError, PushRefusedError, push_folder

    if args.token:
        print("warning: --token puts the token in your shell history; prefer HF_TOKEN or `huggingface-cli login`",
              file=sys.stderr)
    try:
        result = push_folder(args.folder, args.repo_id, public=args.public, dry_run=args.dry_run, token=args.token)
    except (MissingTokenError, PushRefusedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        visibility = "public if created" if args.public else "private if created"
        print(f"would upload {len(result.files)} files to {args.repo_id} ({visibility}; "
              f"an existing repository keeps its visibility, and a public one needs --public):")
    else:
        visibility = "private" if result.private else "public"
        print(f"uploaded {len(result.files)} files to {args.repo_id} "
              f"({'created, ' if result.created else ''}{visibility} on the Hub):")
    print("\n".join(f"  {f}" for f in result.files))
    return 0


def chat(args) -> int:
    from pipeline.evaluation.chat import chat_loop

    chat_loop(args.model_dir, trust_remote_code=args.trust_remote_code, system=args.system,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
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
    p.add_argument("--public", action="store_true",
                   help="create the repository public (default: private); needed to push to an existing public one")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="list the files, upload nothing")
    p.add_argument("--token", help="a Hub token (default: HF_TOKEN or the stored login); never printed, but it lands "
                                   "in shell history")
    p.set_defaults(func=push)

    p = commands.add_parser("chat", help="chat with a model through its chat template (streams; /exit quits)")
    p.add_argument("model_dir")
    p.add_argument("--system", help="a system message")
    p.add_argument("--trust_remote_code", "--trust-remote-code", dest="trust_remote_code", action="store_true",
                   help="run modeling code shipped in the folder (not needed for PipelineGPT or transformers models)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    p.add_argument("--top-k", dest="top_k", type=int, default=0)
    p.set_defaults(func=chat)

    p = commands.add_parser("report", help="rewrite report.md and plots from a report.json")
    p.add_argument("report_json")
    p.add_argument("output_dir")
    p.set_defaults(func=report)
