"""benchmarks/gpu_check.py without a GPU: the plan holds every (stage, engine) run with a command that parses, FSDP
and DeepSpeed are never launched on CPU, the table prints ok and error rows, the wrapper's numbers are read right."""

import importlib.util
import json
import runpy
import shlex
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(gpu_check)

RUNNERS = {"pretrain": "run_pretrain", "sft": "run_sft", "reward": "run_reward", "dpo": "run_dpo", "ppo": "run_ppo",
           "grpo": "run_grpo", "tokenizer": "run_tokenizer"}


def parsed_by_the_recipe(stage: str, arguments: list[str]):
    """What the recipe's own parser makes of `arguments` (its run function replaced by a recorder)."""
    main = runpy.run_path(str(REPO / "recipes" / f"{stage}.py"))["main"]
    seen = []
    main.__globals__[RUNNERS[stage]] = lambda *parsed: seen.append(parsed)
    main(arguments)
    return seen[0]


def test_dry_run_plans_every_stage_under_every_engine(tmp_path, capsys):
    assert gpu_check.main(["--dry_run", "--work_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    planned = {}
    for line in printed[1:]:
        label, command = line[1:].split("] ", 1)
        if command.startswith("(skipped"):
            command = command.split(") ", 1)[1]
        planned[tuple(label.split(" / "))] = shlex.split(command)
    rows = {(stage, engine) for stage in gpu_check.STAGES for engine in gpu_check.ENGINES}
    assert rows | {("tokenizer", "setup"), ("mfu", "single GPU")} == set(planned)
    assert not any(tmp_path.iterdir())  # a dry run writes nothing

    for (stage, engine), command in planned.items():
        if (stage, engine) == ("mfu", "single GPU"):
            assert command[command.index("--config") + 1].endswith("recipes/configs/125m/pretrain.yaml")
            continue
        launcher = command[:command.index("--worker") - 1]
        assert launcher[1:3] == ["-m", "accelerate.commands.launch"]
        if stage == "tokenizer":
            continue
        assert launcher[launcher.index("--config_file") + 1] == str(REPO / "recipes/accelerate" /
                                                                    gpu_check.ENGINES[engine])
        assert launcher[launcher.index("--mixed_precision") + 1] == "bf16"
        assert command[command.index("--worker") + 1] == stage
        recipe_args = command[command.index("--") + 1:]
        assert recipe_args[recipe_args.index("--output_dir") + 1] == str(tmp_path / engine / stage)
        if stage != "pretrain":  # every engine's stages start from the DDP chain
            parent = recipe_args[recipe_args.index("--model_name_or_path") + 1]
            assert parent.startswith(str(tmp_path / "ddp"))
        if stage != "ppo":
            assert recipe_args[recipe_args.index("--bf16") + 1] == "true"
            assert recipe_args[recipe_args.index("--use_cpu") + 1] == "false"

    # Each stage's arguments parse with its recipe's own parser (bf16 off: this machine has no GPU).
    for stage in gpu_check.STAGES:
        command = planned[(stage, "ddp")]
        arguments = command[command.index("--") + 1:]
        if "--bf16" in arguments:
            arguments[arguments.index("--bf16") + 1] = "false"
        parsed = parsed_by_the_recipe(stage, arguments)
        training = parsed[-1]
        assert training.max_steps == 8 and training.output_dir == str(tmp_path / "ddp" / stage)
        if stage != "ppo":
            assert training.logging_steps == 1 and training.include_num_input_tokens_seen == "all"
        if stage == "pretrain":
            assert parsed[0].hidden_size == 64 and parsed[0].num_hidden_layers == 2
    tokenizer = planned[("tokenizer", "setup")]
    (tokenizer_args,) = parsed_by_the_recipe("tokenizer", tokenizer[tokenizer.index("--") + 1:])
    assert tokenizer_args.vocab_size == 512


def test_cpu_plan_runs_ddp_under_cpu_ddp_and_never_launches_fsdp_or_deepspeed(tmp_path):
    runs = gpu_check.plan(tmp_path, list(gpu_check.ENGINES), list(gpu_check.STAGES), steps=2, processes=1, cpu=True,
                          mfu_steps=1)
    for run in runs:
        if run.engine in gpu_check.GPU_ONLY or run.stage == "mfu":
            assert run.skip and "skipped" in run.skip
            assert gpu_check.execute(run, timeout=1, cpu=True).skip == run.skip  # returns without launching
            continue
        assert run.skip is None
        if run.stage != "tokenizer":  # the tokenizer: one CPU process wherever it runs
            launcher = run.command[:run.command.index("--worker")]
            assert launcher[launcher.index("--config_file") + 1].endswith("cpu_ddp.yaml")
            assert launcher[launcher.index("--num_processes") + 1] == "1"
            assert launcher[launcher.index("--mixed_precision") + 1] == "no"
            arguments = run.command[run.command.index("--") + 1:]
            if run.stage != "ppo":
                assert arguments[arguments.index("--use_cpu") + 1] == "true"
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):  # a real run needs a GPU
        gpu_check.main(["--work_dir", str(tmp_path)])


def test_table_formats_ok_error_and_skipped_rows():
    rows = [gpu_check.Row("pretrain", "ddp", tokens_per_second=123456.7, peak_memory_bytes=3 * 2**30, seconds=21.4),
            gpu_check.Row("ppo", "fsdp2", error="RuntimeError: a | b", seconds=9),
            gpu_check.Row("ppo", "ddp", samples_per_second=12.34, kl_step1=0.00012, peak_memory_bytes=2**29),
            gpu_check.Row("grpo", "deepspeed_zero3", skip="skipped: deepspeed is not installed"),
            gpu_check.Row("mfu", "single GPU", tokens_per_second=9.5e5, parameters=125_848_320, mfu=0.4123)]
    lines = gpu_check.format_table(rows).splitlines()
    assert lines[0].startswith("| stage | engine | result |") and len(lines) == 2 + len(rows)
    assert all(line.count(" | ") == len(gpu_check.HEADER) - 1 for line in lines[:1] + lines[2:])
    assert lines[2] == "| pretrain | ddp | ok | 123,457 tok/s | 3.00 GiB |  |  | 21 |"
    assert lines[3] == "| ppo | fsdp2 | error: RuntimeError: a \\| b | - | - | - |  | 9 |"
    assert lines[4] == "| ppo | ddp | ok | 12.3 samples/s | 0.50 GiB | 0.00012 |  | - |"
    assert "skipped: deepspeed is not installed" in lines[5]
    assert "41.2% (125.8M params)" in lines[6]


def test_rows_are_read_from_the_wrapper_records_or_the_output(tmp_path):
    run = gpu_check.Run("ppo", "ddp", ["true"], tmp_path / "ppo.metrics")
    for rank, peak in ((0, 100), (1, 300)):
        (tmp_path / f"ppo.metrics.rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "samples_per_second": 5.0 + rank, "kl_step1": 0.01, "peak_memory_bytes": peak}))
    row = gpu_check.collect(run, 0, "", 3.0)
    assert (row.error, row.samples_per_second, row.kl_step1, row.peak_memory_bytes) == (None, 5.0, 0.01, 300)

    failed = gpu_check.Run("sft", "fsdp2", ["true"], tmp_path / "sft.metrics")
    output = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: the real reason\n"
              "Traceback (most recent call last):\nsubprocess.CalledProcessError: Command '[...]' returned 1.\n")
    assert gpu_check.collect(failed, 1, output, 1.0).error == "ValueError: the real reason"
    assert gpu_check.last_error_line("x\nerror: --learnign_rate: unknown flag\nCalledProcessError: y") == \
        "--learnign_rate: unknown flag"
    assert gpu_check.collect(failed, None, "", 300.0).error == "timed out after 300 s"


def test_trainer_throughput_leaves_out_the_first_step():
    logs = [{"loss": 1.0, "num_input_tokens_seen": 1000, "train_tokens_per_second": 100.0, "step": 1},  # at 10 s
            {"loss": 0.9, "num_input_tokens_seen": 3000, "train_tokens_per_second": 250.0, "step": 2},  # at 12 s
            {"train_runtime": 12.5, "train_samples_per_second": 4.0}]
    assert gpu_check.trainer_throughput(logs, {"train_samples_per_second": 4.0}) == {"tokens_per_second": 1000.0}
    no_tokens = [{"loss": 1.0, "num_input_tokens_seen": 0, "train_tokens_per_second": 0.0}]
    assert gpu_check.trainer_throughput(no_tokens, {"train_samples_per_second": 4.0}) == {"samples_per_second": 4.0}


def test_the_mfu_model_is_the_125m_config_and_its_speed_is_measured():
    import torch

    from pipeline.stages.common import parse_stage_args
    from pipeline.stages.pretrain import PretrainArguments, TrainingArguments, build_model

    config = str(REPO / "recipes/configs/125m/pretrain.yaml")
    args, _ = parse_stage_args((PretrainArguments, TrainingArguments), ["--config", config, "--bf16", "false"])
    with torch.device("meta"):
        parameters = build_model(args, gpu_check._VocabOnly(gpu_check.MFU_VOCAB)).num_parameters()
    assert parameters >= 125e6
    tiny = ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--num_key_value_heads",
            "1", "--intermediate_size", "64", "--block_size", "16"]
    speed = gpu_check.measure_training_speed(config, vocab_size=64, steps=1, warmup=1, batch=2, overrides=tiny)
    assert speed["tokens_per_second"] > 0 and speed["block_size"] == 16 and speed["device"] == "cpu"
    assert 0 < speed["parameters"] < 1e5
