"""GPU check: every stage for a few steps under DDP, FSDP2 and DeepSpeed ZeRO-3 in bf16, plus a pretraining MFU.

On a CUDA machine, one command (expected to take 5-8 minutes on one H200; not yet run on a GPU):

    python benchmarks/gpu_check.py                        # every stage x ddp, fsdp2, deepspeed_zero3, then the MFU
    python benchmarks/gpu_check.py --engines ddp --stages pretrain,sft --steps 20
    python benchmarks/gpu_check.py --peak_tflops 312      # an A100: MFU against its dense bf16 peak

Anywhere (no GPU needed):

    python benchmarks/gpu_check.py --dry_run              # print the plan: every (stage, engine) and its command
    python benchmarks/gpu_check.py --dry_run --cpu        # and run the stages on CPU (cpu_ddp.yaml, 1 process)

Each stage is the shipped recipe with the demo config and tiny overrides (hidden 64, 2 layers, a few steps), started
with `accelerate launch --config_file recipes/accelerate/ENGINE.yaml --mixed_precision bf16 --num_processes N`
(N: the GPUs here). The tokenizer is trained once, and the DDP chain's outputs are the parents of every engine's
stages, so one engine's failure does not hide the next. A row per (stage, engine): ok or the error's last line;
tokens/s where the stage's Trainer counts tokens (pretrain, SFT: steps 2..N, so the first step's warm-up is left
out), else samples/s over the whole training call; the peak of torch.cuda.max_memory_allocated over the ranks,
measured by a small wrapper around the recipe; PPO's KL at its first step (`kl` of step 1 in its history, where
policy and reference still agree up to bf16 noise). FSDP and DeepSpeed rows are never launched without GPUs (the
stages refuse them there: pipeline.stages.common.check_distributed_setup).

The MFU row trains the PipelineGPT of recipes/configs/125m/pretrain.yaml (vocabulary 32768: the 125m tokenizer's
32000 would give 124.7M parameters; 32768 gives 125.8M) on random tokens, one process on one GPU, bf16 autocast,
fused AdamW, batch and length from that config: MFU = 6 * parameters * tokens/s / peak bf16 FLOP/s. The peak
defaults to 989 TFLOP/s, the dense bf16 figure of an H100 SXM and of an H200; pass --peak_tflops for other GPUs.
6N counts the matrix multiplies of forward and backward, not attention's T^2 term (about 7% more at 1024 tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
ACCELERATE = REPO / "recipes" / "accelerate"
STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")
ENGINES = {"ddp": "ddp.yaml", "fsdp2": "fsdp2.yaml", "deepspeed_zero3": "deepspeed_zero3.yaml"}
GPU_ONLY = ("fsdp2", "deepspeed_zero3")  # the stages refuse these without GPUs
TRAINER_STAGES = ("pretrain", "sft", "reward", "dpo", "grpo")  # transformers/TRL Trainer; PPO is ours
H100_H200_DENSE_BF16_TFLOPS = 989.0
MFU_VOCAB = 32768
FIRST_PORT = 29531


def stage_arguments(stage: str, output_dir: Path, work: Path, steps: int, gpu: bool) -> list[str]:
    """The recipe's command-line arguments: its demo config with tiny overrides; the parents are the tokenizer in
    `work` and the DDP chain's outputs in `work`/ddp."""
    out = ["--config", str(CONFIGS / "demo" / f"{stage}.yaml"), "--output_dir", str(output_dir), "--overwrite", "true"]
    if stage == "tokenizer":
        return out + ["--dataset_path", "demo:pretrain?n=1000", "--vocab_size", "512"]
    parents = work / "ddp"
    out += ["--max_steps", str(steps), "--seed", "0"]
    if stage in TRAINER_STAGES:
        out += ["--logging_steps", "1", "--save_steps", "1000", "--include_num_input_tokens_seen", "true",
                "--use_cpu", str(not gpu).lower(), "--bf16", str(gpu).lower()]
    if stage == "pretrain":
        out += ["--tokenizer_name_or_path", str(work / "tokenizer"), "--dataset_path",
                "demo:pretrain?n=1000", "--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads",
                "2", "--intermediate_size", "128", "--block_size", "64", "--per_device_train_batch_size", "8"]
    elif stage == "sft":
        out += ["--model_name_or_path", str(parents / "pretrain"), "--dataset_path", "demo:sft?n=300",
                "--per_device_train_batch_size", "8", "--lora_r", "8", "--lora_alpha", "16", "--eval_demo_tasks", "0"]
    elif stage == "reward":
        out += ["--model_name_or_path", str(parents / "sft"), "--dataset_path", "demo:preference?n=300",
                "--per_device_train_batch_size", "8"]
    elif stage == "dpo":
        out += ["--model_name_or_path", str(parents / "sft"), "--dataset_path", "demo:prompts?n=64",
                "--on_policy_samples", "2", "--per_device_train_batch_size", "8", "--eval_demo_tasks", "0"]
    elif stage == "ppo":
        out += ["--model_name_or_path", str(parents / "sft"), "--reward_model_path", str(parents / "reward"),
                "--dataset_path", "demo:prompts?n=64", "--batch_size", "8", "--mini_batch_size", "4",
                "--save_steps", "0", "--eval_demo_tasks", "0"]
    elif stage == "grpo":
        out += ["--model_name_or_path", str(parents / "sft"), "--dataset_path", "demo:prompts?n=64",
                "--num_generations", "4", "--per_device_train_batch_size", "8", "--eval_demo_tasks", "0"]
    return out


@dataclass
class Run:
    stage: str
    engine: str  # ddp | fsdp2 | deepspeed_zero3 | setup (the tokenizer) | single GPU (the MFU)
    command: list[str]
    metrics: Path  # the wrapper writes METRICS.rank<R>.json per rank
    skip: str | None = None  # why the run is not launched


def plan(work: Path, engines: list[str], stages: list[str], steps: int, processes: int, cpu: bool,
         mfu_steps: int) -> list[Run]:
    """Every run in order: the tokenizer, each engine's stages (DDP first: its outputs are every engine's parents),
    then the MFU measurement."""
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    wrapper = str(Path(__file__).resolve())
    tokenizer = work / "tokenizer.metrics"
    runs = [Run("tokenizer", "setup", [*launch, "--num_processes", "1", "--cpu", wrapper, "--worker", "tokenizer",
                                       str(tokenizer), "--", *stage_arguments("tokenizer", work / "tokenizer", work,
                                                                              steps, not cpu)], tokenizer)]
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    for engine in sorted(engines, key=lambda e: e != "ddp"):
        folder = work / engine
        for stage in stages:
            port = FIRST_PORT + len(runs)
            if cpu:
                launcher = [*launch, "--config_file", str(ACCELERATE / "cpu_ddp.yaml"), "--mixed_precision", "no",
                            "--num_processes", "1", "--main_process_port", str(port)]
            else:
                launcher = [*launch, "--config_file", str(ACCELERATE / ENGINES[engine]), "--mixed_precision", "bf16",
                            "--num_processes", str(processes), "--main_process_port", str(port)]
            metrics = folder / f"{stage}.metrics"
            command = [*launcher, wrapper, "--worker", stage, str(metrics), "--",
                       *stage_arguments(stage, folder / stage, work, steps, gpu=not cpu)]
            skip = None
            if cpu and engine in GPU_ONLY:
                skip = "skipped: needs GPUs (the stages refuse FSDP and DeepSpeed without them)"
            elif engine == "deepspeed_zero3" and not deepspeed:
                skip = "skipped: deepspeed is not installed (pip install deepspeed)"
            runs.append(Run(stage, engine, command, metrics, skip))
    mfu = Run("mfu", "single GPU", [sys.executable, wrapper, "--worker", "mfu", str(work / "mfu.metrics"), "--",
                                    "--config", str(CONFIGS / "125m" / "pretrain.yaml"), "--vocab_size",
                                    str(MFU_VOCAB), "--steps", str(mfu_steps)], work / "mfu.metrics")
    if cpu:
        mfu.skip = "skipped: a 125M-parameter MFU measurement needs a GPU"
    return runs + [mfu]


# ---- the results table ----------------------------------------------------------------------------------------------

@dataclass
class Row:
    stage: str
    engine: str
    error: str | None = None  # None: ok
    skip: str | None = None
    tokens_per_second: float | None = None
    samples_per_second: float | None = None
    peak_memory_bytes: int | None = None
    kl_step1: float | None = None
    mfu: float | None = None
    parameters: int | None = None
    seconds: float | None = None
    notes: list[str] = field(default_factory=list)


HEADER = ("stage", "engine", "result", "throughput", "peak GPU memory", "PPO KL, step 1", "MFU", "wall s")


def table_cells(row: Row) -> tuple[str, ...]:
    result = row.skip or ("ok" if row.error is None else f"error: {row.error}")
    result = result.replace("|", "\\|").replace("\n", " ")
    if len(result) > 160:
        result = result[:157] + "..."
    if row.tokens_per_second is not None:
        throughput = f"{row.tokens_per_second:,.0f} tok/s"
    elif row.samples_per_second is not None:
        throughput = f"{row.samples_per_second:,.1f} samples/s"
    else:
        throughput = "-"
    memory = "-" if row.peak_memory_bytes is None else f"{row.peak_memory_bytes / 2**30:.2f} GiB"
    kl = f"{row.kl_step1:.3g}" if row.kl_step1 is not None else ("-" if row.stage == "ppo" else "")
    mfu = "" if row.mfu is None else f"{100 * row.mfu:.1f}% ({row.parameters / 1e6:.1f}M params)"
    seconds = "-" if row.seconds is None else f"{row.seconds:.0f}"
    return row.stage, row.engine, result, throughput, memory, kl, mfu, seconds


def format_table(rows: list[Row]) -> str:
    lines = [f"| {' | '.join(HEADER)} |", f"|{'|'.join(' --- ' for _ in HEADER)}|"]
    lines += [f"| {' | '.join(table_cells(row))} |" for row in rows]
    return "\n".join(lines)


def last_error_line(output: str) -> str | None:
    """The line that says what went wrong: our stages' `error: ...`, else the last exception line that is not the
    launcher's own report of a failed child, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    ours = [line.split("error: ", 1)[1] for line in lines if line.startswith("error: ") or ": error: " in line]
    if ours:  # our stages' one-line errors and argparse's
        return ours[-1]
    launcher = ("CalledProcessError", "ChildFailedError", "torch.distributed.elastic")
    exceptions = [line for line in lines if not line.startswith(("File ", "^", "~", "[")) and not any(
        name in line for name in launcher) and (":" in line) and line.split(":")[0].rsplit(".", 1)[-1].endswith(
        ("Error", "Exception", "Interrupt", "Exit"))]
    if exceptions:
        return exceptions[-1]
    return lines[-1] if lines else None


def collect(run: Run, returncode: int | None, output: str, seconds: float) -> Row:
    """The row of a finished run, from the wrapper's per-rank records (max memory over ranks, rank 0's rates)."""
    row = Row(run.stage, run.engine, seconds=seconds)
    records = []
    for path in sorted(run.metrics.parent.glob(f"{run.metrics.name}.rank*.json")):
        records.append(json.loads(path.read_text()))
    records.sort(key=lambda r: r.get("rank", 0))
    errors = [r["error"] for r in records if r.get("error")]
    if returncode is None:
        row.error = f"timed out after {seconds:.0f} s"
    elif errors:
        row.error = errors[0]
    elif returncode != 0 or not records:
        row.error = last_error_line(output) or f"exit status {returncode}"
    peaks = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes") is not None]
    row.peak_memory_bytes = max(peaks) if peaks else None
    first = records[0] if records else {}
    for key in ("tokens_per_second", "samples_per_second", "kl_step1", "parameters"):
        setattr(row, key, first.get(key))
    return row


# ---- the wrapper around a recipe, run by accelerate launch in every rank --------------------------------------------

def trainer_throughput(log_history: list[dict], train_metrics: dict) -> dict:
    """tokens/s from the Trainer's per-step logs where it counted tokens (each log holds the tokens seen so far and
    their rate since training started, hence its time), between the first and the last log; else samples/s."""
    logs = [e for e in log_history if e.get("num_input_tokens_seen") and e.get("train_tokens_per_second")]
    if len(logs) >= 2:
        (a, b), at = (logs[0], logs[-1]), lambda e: e["num_input_tokens_seen"] / e["train_tokens_per_second"]
        if at(b) > at(a):
            return {"tokens_per_second": (b["num_input_tokens_seen"] - a["num_input_tokens_seen"]) / (at(b) - at(a))}
    if logs:
        return {"tokens_per_second": logs[-1]["train_tokens_per_second"]}
    return {"samples_per_second": train_metrics.get("train_samples_per_second")}


def run_worker(stage: str, metrics: Path, argv: list[str]) -> int:
    import runpy

    import torch
    from transformers import Trainer

    from pipeline.alignment.ppo_trainer import PPOTrainer
    from pipeline.errors import run_entry_point

    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"rank": rank, "stage": stage}
    trainer_train, ppo_train = Trainer.train, PPOTrainer.train

    def train_and_record(self, *args, **kwargs):
        output = trainer_train(self, *args, **kwargs)
        record.update(trainer_throughput(self.state.log_history, output.metrics))
        return output

    def ppo_train_and_record(self, *args, **kwargs):
        started, first_step = time.perf_counter(), self.step
        history = ppo_train(self, *args, **kwargs)
        seconds = time.perf_counter() - started
        rows = (self.step - first_step) * self.config.batch_size * self.accelerator.num_processes
        record["samples_per_second"] = rows / seconds if seconds > 0 else None
        if history:
            record["kl_step1"] = float(history[0]["kl"])
        return history

    Trainer.train, PPOTrainer.train = train_and_record, ppo_train_and_record
    main = runpy.run_path(str(REPO / "recipes" / f"{stage}.py"))["main"]

    def recorded(args):
        try:
            return main(args)
        except SystemExit:
            raise  # argparse said why on stderr; the driver reads it from there
        except BaseException as e:
            message = f"{type(e).__name__}: {e}".strip().splitlines()
            record["error"] = message[-1] if message else type(e).__name__
            raise

    try:
        return run_entry_point(recorded, argv)
    finally:
        if torch.cuda.is_available():
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        metrics.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{metrics}.rank{rank}.json").write_text(json.dumps(record))


class _VocabOnly:
    """What build_model reads from a tokenizer: its size and special-token ids."""
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def measure_training_speed(config: str, vocab_size: int, steps: int, warmup: int = 3, batch: int | None = None,
                           overrides: list[str] | None = None) -> dict:
    """Train the pretrain config's PipelineGPT (built as the pretrain stage builds it) on random tokens: tokens/s
    over `steps` steps after `warmup`, bf16 autocast and fused AdamW on a GPU, float32 on a CPU."""
    import torch

    from pipeline.stages.common import parse_stage_args
    from pipeline.stages.pretrain import PretrainArguments, TrainingArguments, build_model

    args, training = parse_stage_args((PretrainArguments, TrainingArguments),
                                      ["--config", config, "--bf16", "false", *(overrides or [])])
    batch = batch or training.per_device_train_batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(args, _VocabOnly(vocab_size)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    ids = torch.randint(3, vocab_size, (batch, args.block_size), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    seconds = time.perf_counter() - started
    return {"parameters": model.num_parameters(), "tokens_per_second": batch * args.block_size * steps / seconds,
            "batch": batch, "block_size": args.block_size, "device": device,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


def run_mfu_worker(metrics: Path, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--vocab_size", type=int, default=MFU_VOCAB)
    parser.add_argument("--steps", type=int, default=10)
    record = {"rank": 0, "stage": "mfu"}
    try:
        args = parser.parse_args(argv)
        record.update(measure_training_speed(args.config, args.vocab_size, args.steps))
        return 0
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[-1]
        raise
    finally:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{metrics}.rank0.json").write_text(json.dumps(record))


# ---- the driver --------------------------------------------------------------------------------------------------

def execute(run: Run, timeout: float, cpu: bool) -> Row:
    if run.skip:
        return Row(run.stage, run.engine, skip=run.skip)
    for old in run.metrics.parent.glob(f"{run.metrics.name}.rank*.json"):
        old.unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cpu:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    started = time.perf_counter()
    proc = subprocess.Popen(run.command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, returncode = proc.communicate(timeout=timeout)[0], proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, returncode = proc.communicate()[0], None
    seconds = time.perf_counter() - started
    run.metrics.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{run.metrics}.log").write_text(output)
    return collect(run, returncode, output, seconds)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # inside `accelerate launch` (or a plain process for the MFU)
        stage, metrics, rest = argv[1], Path(argv[2]), argv[3:]
        rest = rest[1:] if rest[:1] == ["--"] else rest
        return run_mfu_worker(metrics, rest) if stage == "mfu" else run_worker(stage, metrics, rest)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, of: " + ", ".join(ENGINES))
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of: " + ", ".join(STAGES))
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per stage (PPO: rollouts)")
    parser.add_argument("--num_processes", type=int, default=None, help="processes per launch; default: the GPUs")
    parser.add_argument("--mfu_steps", type=int, default=10, help="timed steps of the MFU run (after 3 warm-up)")
    parser.add_argument("--peak_tflops", type=float, default=H100_H200_DENSE_BF16_TFLOPS,
                        help="the GPU's dense bf16 peak in TFLOP/s for the MFU; default 989 (H100 SXM, H200)")
    parser.add_argument("--skip_mfu", action="store_true", help="leave out the MFU measurement")
    parser.add_argument("--work_dir", default=str(REPO / "outputs" / "gpu_check"))
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a run is stopped")
    parser.add_argument("--dry_run", action="store_true", help="print the plan; run nothing (unless --cpu)")
    parser.add_argument("--cpu", action="store_true",
                        help="with --dry_run: run the stages on CPU under cpu_ddp.yaml with 1 process")
    args = parser.parse_args(argv)
    engines, stages = args.engines.split(","), args.stages.split(",")
    unknown = [e for e in engines if e not in ENGINES] + [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown engine or stage: {', '.join(unknown)}")
    if args.cpu and not args.dry_run:
        parser.error("--cpu goes with --dry_run (on CPU only the plan and the CPU runs are possible)")

    import torch

    gpus = torch.cuda.device_count()
    if not args.dry_run and gpus == 0:
        parser.error("no CUDA GPU here: use --dry_run (the plan) or --dry_run --cpu (the stages on CPU)")
    processes = args.num_processes or max(gpus, 1)
    work = Path(args.work_dir).resolve()
    runs = plan(work, engines, stages, args.steps, processes, args.cpu, args.mfu_steps)
    if args.skip_mfu:
        runs = runs[:-1]
    where = "CPU (cpu_ddp.yaml, 1 process, float32)" if args.cpu else f"{processes} process(es), bf16"
    print(f"gpu_check plan: {len(stages)} stages x {len(engines)} engines, {args.steps} steps each, {where}; "
          f"work dir {work}")
    for run in runs:
        print(f"[{run.stage} / {run.engine}] {f'({run.skip}) ' if run.skip else ''}{shlex.join(run.command)}")
    if args.dry_run and not args.cpu:
        return 0

    rows, started = [], time.perf_counter()
    for run in runs:
        row = execute(run, args.timeout, args.cpu)
        if row.stage == "mfu" and row.tokens_per_second and row.error is None:
            row.mfu = 6 * row.parameters * row.tokens_per_second / (args.peak_tflops * 1e12)
        rows.append(row)
        print(f"  {' | '.join(c for c in table_cells(row) if c)}", flush=True)
    print(f"\n{format_table(rows)}\n")
    print(f"total {time.perf_counter() - started:.0f} s; MFU against a peak of {args.peak_tflops:g} dense bf16 "
          f"TFLOP/s{' (the H100/H200 default)' if args.peak_tflops == H100_H200_DENSE_BF16_TFLOPS else ''}; "
          f"logs: {work}/**/*.metrics.log")
    (work / "gpu_check.md").write_text(format_table(rows) + "\n")
    (work / "gpu_check.json").write_text(json.dumps([asdict(row) for row in rows], indent=1))
    return 0 if all(row.error is None for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
