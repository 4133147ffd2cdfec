"""The whole InstructGPT chain in one command (`make demo`): every stage as its own `accelerate launch` process,
then evaluation, export, a clean-process load of the export, and the stage report.

Stages read their demo configs (`recipes/configs/demo/<stage>.yaml`) and chain through `<root>/<stage>`. Overrides
go to one stage (`--set sft.max_steps=100`) or to all that accept them (`--set seed=1`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CHAIN = ("tokenizer", "pretrain", "sft", "reward", "ppo", "dpo")


@dataclass
class ChainArguments:
    output_root: str = field(default="outputs/demo", metadata={"help": "stage outputs go to <output_root>/<stage>"})
    stages: str = field(default=",".join(CHAIN), metadata={"help": "comma-separated stages to run, in chain order"})
    config_dir: str = field(default="recipes/configs/demo", metadata={"help": "where <stage>.yaml configs live"})
    set: list[str] = field(default_factory=list, metadata={
        "help": "overrides: STAGE.KEY=VALUE for one stage, KEY=VALUE for every stage (repeatable)"})
    eval_tasks: int = field(default=300, metadata={"help": "held-out demo tasks every stage is scored on"})
    overwrite: bool = field(default=False, metadata={"help": "replace finished stage outputs"})
    export: bool = field(default=True, metadata={"help": "export the final policy and load it in a clean process"})


def gather_repeated(flag: str, argv: list[str]) -> list[str]:
    """`--set a=1 --set b=2` -> `--set a=1 b=2`: argparse keeps only the last of a repeated `nargs="+"` flag."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


def stage_command(stage: str, args: ChainArguments) -> list[str]:
    root = Path(args.output_root)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               str(REPO / "recipes" / f"{stage}.py"), "--config", str(Path(args.config_dir) / f"{stage}.yaml"),
               "--output_dir", str(root / stage)]
    parents = {"pretrain": ["--tokenizer_name_or_path", root / "tokenizer"],
               "sft": ["--model_name_or_path", root / "pretrain"],
               "reward": ["--model_name_or_path", root / "sft"],
               "ppo": ["--model_name_or_path", root / "sft", "--reward_model_path", root / "reward"],
               "dpo": ["--model_name_or_path", root / "sft"],
               "grpo": ["--model_name_or_path", root / "sft"]}
    command += [str(x) for x in parents.get(stage, [])]
    if stage in ("sft", "ppo", "dpo", "grpo"):
        command += ["--eval_demo_tasks", str(args.eval_tasks)]
    if args.overwrite:
        command += ["--overwrite", "true"]
    for item in args.set:
        key, equals, value = item.partition("=")
        target, _, name = key.rpartition(".")
        if not equals or not name:
            raise ConfigError(f"--set {item!r}: expected [STAGE.]KEY=VALUE")
        if target in ("", stage):
            command += [f"--{name}", value]
    return command


def run_stage(stage: str, args: ChainArguments, log_dir: Path) -> float:
    command = stage_command(stage, args)
    print(f"\n=== {stage}: {shlex.join(command[3:])}", flush=True)
    started = time.monotonic()
    with open(log_dir / f"{stage}.log", "w") as log:
        proc = subprocess.run(command, cwd=os.getcwd(), stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        tail = (log_dir / f"{stage}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); log: {log_dir / f'{stage}.log'}\n{tail}")
    print(f"=== {stage} done in {seconds:.0f}s", flush=True)
    return seconds


def base_model_scores(root: Path, eval_tasks: int) -> dict:
    """Few-shot exact match of the pretrained base model (the bar SFT must clear)."""
    from transformers import AutoModelForCausalLM

    import pipeline  # noqa: F401  (registers PipelineGPT)
    from pipeline.data.demo_tasks import eval_tasks as held_out, training_tasks
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.evaluation.evaluators import few_shot_exact_match

    model = AutoModelForCausalLM.from_pretrained(root / "pretrain")
    tokenizer = load_tokenizer(root / "pretrain")
    shots = training_tasks(200, seed=0, stream=9)
    result = few_shot_exact_match(model, tokenizer, held_out(eval_tasks, seed=0), shots, k=3)
    return {"exact_match": result["exact_match"], "exact_match_per_kind": result["per_kind"]}


def stage_metrics(root: Path, stage: str) -> dict:
    manifest = json.loads((root / stage / "pipeline_manifest.json").read_text())
    return manifest["metrics"]


def run_chain(args: ChainArguments) -> dict:
    from tqdm.auto import tqdm

    from pipeline.evaluation.report import write_report

    root = Path(args.output_root)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in CHAIN + ("grpo", "classify")]
    if unknown:
        raise ConfigError(f"stages: unknown {unknown}; the chain is {', '.join(CHAIN)} (+ grpo, classify)")
    for item in args.set:  # a misspelt stage name would otherwise silently override nothing
        target = item.partition("=")[0].rpartition(".")[0]
        if target and target not in CHAIN + ("grpo", "classify"):
            raise ConfigError(f"--set {item!r}: unknown stage {target!r}; stages are {', '.join(CHAIN)}, grpo, classify")
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    report: list[dict] = []
    for stage in tqdm(stages, desc="demo chain", unit="stage"):
        seconds = run_stage(stage, args, log_dir)
        metrics = stage_metrics(root, stage)
        row = {"stage": stage, "metrics": {"wall_seconds": round(seconds, 1)}}
        if stage == "pretrain":
            row["metrics"].update(perplexity=metrics.get("perplexity"), **base_model_scores(root, args.eval_tasks))
        for key in ("exact_match", "reward_accuracy", "mean_reward", "mean_reward_first", "reward_margin"):
            if metrics.get(key) is not None:
                row["metrics"][key] = metrics[key]
        row["loss_history"] = metrics.get("loss_history") or []
        if stage == "ppo":
            row["reward_history"] = metrics.get("reward_history", [])
            row["kl_history"] = metrics.get("kl_history", [])
        report.append(row)
        print(f"    {row['metrics']}", flush=True)
    if args.export and {"ppo", "dpo", "grpo"} & set(stages):
        report.append(export_and_load(root, best_policy(report), args))
    paths = write_report(report, root)
    print(f"\nreport: {', '.join(str(p) for p in paths)}")
    print((root / "report.md").read_text())
    return {"stages": report}


def best_policy(report: list[dict]) -> str:
    """The aligned policy with the highest held-out exact match (PPO or DPO)."""
    aligned = [r for r in report if r["stage"] in ("ppo", "dpo", "grpo")]
    return max(aligned, key=lambda r: r["metrics"].get("exact_match", 0))["stage"]


SHOWCASE_TASKS = 5  # held-out demo questions the exported model answers in the clean-process load


def llama_export(source: Path, output_dir: Path, hub_export: Path) -> str:
    """Export `source` in Llama format when its architecture has a Llama equivalent; one line saying what happened.

    Most PipelineGPT variants (learned positions, LayerNorm, key smear, ...) have no Llama equivalent: a skip, not an
    error. `hub_export` is the already-written PipelineGPT export, whose config decides.
    """
    from transformers import AutoConfig

    from pipeline.modeling.convert import llama_incompatibilities

    config = AutoConfig.from_pretrained(hub_export)
    if config.model_type != "pipeline_gpt":
        return f"skipped: Llama-format export (the model is {config.model_type!r}, already a transformers family)"
    reasons = llama_incompatibilities(config)
    if reasons:
        return f"skipped: Llama-format export (this PipelineGPT architecture has no Llama equivalent: " \
               f"{'; '.join(reasons)})"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(source), str(output_dir),
                           "--format", "llama", "--overwrite"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the Llama-format export of {source} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip()


# Runs with `pipeline` unimportable: the export must stand alone. Asks each question as one chat turn, greedily,
# as the held-out exact-match evaluation does (pipeline.evaluation.evaluators.greedy_answers).
CLEAN_LOAD_PROBE = """import json, sys
sys.modules['pipeline'] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
path, questions = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
answers = []
for question in questions:
    ids = tok.apply_chat_template([{'role': 'user', 'content': question}], add_generation_prompt=True,
                                  return_tensors='pt', return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answers.append(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True).strip())
print(json.dumps(answers, ensure_ascii=False))
"""


def export_and_load(root: Path, stage: str, args: ChainArguments) -> dict:
    """Export `stage` (hub folder and, when possible, Llama format), then, in a clean process, load the export and
    answer a few held-out demo questions (the report marks each answer right or wrong)."""
    from pipeline.data.demo_tasks import eval_tasks

    started = time.monotonic()
    export = root / "export"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(root / stage), str(export), "--overwrite"],
                   check=True)
    print(llama_export(root / stage, root / "export-llama", export))
    tasks = eval_tasks(SHOWCASE_TASKS, seed=0)
    loaded = subprocess.run([sys.executable, "-P", "-c", CLEAN_LOAD_PROBE, str(export.resolve()),
                             json.dumps([t.prompt for t in tasks], ensure_ascii=False)],
                            cwd="/", capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if loaded.returncode != 0:
        raise RuntimeError(f"the export at {export} did not load in a clean process:\n{loaded.stderr[-3000:]}")
    answers = json.loads(loaded.stdout.strip().splitlines()[-1])
    print(f"clean-process load of {export}: answered {len(answers)} held-out questions")
    showcase = [{"question": t.prompt, "expected": t.answer, "answer": a} for t, a in zip(tasks, answers)]
    return {"stage": "export", "metrics": {"wall_seconds": round(time.monotonic() - started, 1)},
            "source": stage, "showcase": showcase}
