"""Every command in the README runs (with tiny overrides), so the docs cannot drift from the code."""

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED_DATA, names_hub_data, with_local_standins

README = (REPO / "README.md").read_text(encoding="utf-8")

# Appended to a documented command (argparse keeps the last value), keeping each run to seconds.
TINY = {
    "python recipes/quickstart.py": "--max_steps 2 --documents 40 --hidden_size 32 --num_hidden_layers 1 "
                                    "--block_size 32 --batch_size 2 --vocab_size 300",
    "python benchmarks/model_speed.py": "--vocab 128 --hidden 32 --layers 1 --heads 2 --kv_heads 2 --batch 2 "
                                        "--seq_len 16 --train_steps 1 --prompt_len 4 --decode_batch 1 "
                                        "--new_tokens 2 --repeats 1",
}
TINY.update({
    "pipeline data validate": "", "pipeline data convert": "", "pipeline data card": "",
    "pipeline data inspect": "--dataset_path demo:sft?n=50",
    "pipeline data prepare": "--dataset_path demo:pretrain?n=150 --block_size 32",
    "python benchmarks/data_prep.py": "--documents 50 --vocab_size 300 --block_size 32 --repeats 1",
})
# Accumulation 1: the hub configs accumulate 4-8 micro-batches per step, which only multiplies a tiny run's work
# (the demo configs already use 1).
CHAIN_TINY = "--per_device_train_batch_size 4 --gradient_accumulation_steps 1 --logging_steps 1"
TINY.update({
    "accelerate launch recipes/tokenizer.py": "--dataset_path demo:pretrain?n=150 --vocab_size 300",
    "accelerate launch recipes/pretrain.py": "--dataset_path demo:pretrain?n=150 --max_steps 4 --hidden_size 32 "
                                             "--num_hidden_layers 2 --num_attention_heads 2 --intermediate_size 64 "
                                             f"--block_size 32 {CHAIN_TINY}",
    "accelerate launch recipes/sft.py": f"--dataset_path demo:sft?n=100 --max_steps 3 --eval_demo_tasks 4 --lora_r 4 "
                                        f"{CHAIN_TINY}",
    "accelerate launch recipes/classify.py": f"--dataset_path demo:classification?n=80 --max_steps 2 {CHAIN_TINY}",
    "accelerate launch recipes/reward.py": f"--dataset_path demo:preference?n=100 --max_steps 3 {CHAIN_TINY}",
    "accelerate launch recipes/dpo.py": "--dataset_path demo:prompts?n=40 --max_steps 2 --eval_demo_tasks 4 "
                                        f"--on_policy_samples 2 {CHAIN_TINY}",
    "accelerate launch recipes/ppo.py": "--dataset_path demo:prompts?n=40 --max_steps 2 --batch_size 4 "
                                        "--mini_batch_size 2 --eval_demo_tasks 4 --response_length 10",  # hub: 128
    "accelerate launch recipes/grpo.py": "--dataset_path demo:prompts?n=40 --max_steps 2 --num_generations 4 "
                                         f"--eval_demo_tasks 4 {CHAIN_TINY}",
    "pipeline merge": "", "pipeline export": "", "pipeline push": "", "pipeline env": "",
    "python benchmarks/ppo_speed.py": "--steps 1 --batch_size 4 --mini_batch_size 2 --held_out 8 --exact_match 4",
    "python benchmarks/sft_families.py": "--rows 30 --steps 1 --batch_size 4 --hidden 32 --layers 1",
    "python benchmarks/gpu_check.py": "--dry_run",  # the plan only: the stages need GPUs (tests/test_gpu_check.py)
    "python benchmarks/sft_packing.py": "--data demo:sft?n=60 --max_length 64 --batch_size 2 --hidden 32 --layers 1 "
                                        "--vocab_size 300 --steps 2 --repeats 1",
})
OUTPUT_FLAGS = {"python recipes/quickstart.py": "--output_dir"}
LINKED = ("recipes", "benchmarks", "data_cards")  # what documented commands read, relative to the repository root


# Hub model ids in the shipped configs, stood in for offline by tiny random checkpoints of the same family.
HUB_MODEL_STANDINS = {"recipes/configs/hub/sft_lora.yaml": "qwen2"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch root where documented commands run in README order: outputs/ chains between them and stays here."""
    from families import save_family

    root = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    for config, family in HUB_MODEL_STANDINS.items():
        save_family(family, root / "standins" / family)
    return root


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def bash_commands() -> list[str]:
    lines = [line.split("#")[0].strip() for block in code_blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line]


def make_recipe(target: str) -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert body, f"Makefile has no '{target}' target"
    return [line.strip().replace("$(PY)", "python").replace(" $(ARGS)", "") for line in body.group(1).splitlines()]


def run(command: str, tmp_path, cwd=REPO) -> subprocess.CompletedProcess:
    prefix = next((p for p in TINY if command.startswith(p)), None)
    assert prefix, f"README command {command!r} has no tiny override in tests/test_docs.py: add one"
    if names_hub_data(command) and not SHARED_DATA.is_dir():
        pytest.skip(f"{command!r} reads Hub data, stood in for offline by slices at {SHARED_DATA}, absent here")
    args = shlex.split(command) + shlex.split(TINY[prefix])
    if prefix in OUTPUT_FLAGS:
        args += [OUTPUT_FLAGS[prefix], str(tmp_path / "out")]
    args = [with_local_standins(a) for a in args]
    for config, family in HUB_MODEL_STANDINS.items():
        if config in command:
            args += ["--model_name_or_path", str(cwd / "standins" / family)]
    config = next((REPO / a for a in args if a.startswith("recipes/configs/")), None)
    if config and "bf16: true" in config.read_text() and not torch.cuda.is_available():
        args += ["--bf16", "false"]  # GPU configs: transformers refuses bf16 on a CPU-only machine at parse time
    if args[:2] == ["accelerate", "launch"] and args[2].startswith("recipes/"):
        # One process on CPU: `accelerate launch` adds only its launcher, which tests/test_stages_lm.py runs for every
        # stage; here the recipe's own main() runs in this interpreter, saving a start-up per command.
        return in_process(lambda: _recipe_main(cwd / args[2])(args[3:]), cwd)
    if args[0] == "pipeline":
        from pipeline.cli import main

        return in_process(lambda: main(args[1:]), cwd)
    if args[0] == "python":
        args = [sys.executable, *args[1:]]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def _recipe_main(path: Path):
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def in_process(call, cwd: Path) -> subprocess.CompletedProcess:
    """Run `call()` with `cwd` as the working directory, as a command would: exit status, stdout, stderr."""
    import torch

    out, err, threads, before = io.StringIO(), io.StringIO(), torch.get_num_threads(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = call() or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess([], code, out.getvalue(), err.getvalue())


def test_readme_starts_with_make_demo_and_make_test():
    assert bash_commands()[:2] == ["make demo", "make test"]
    assert any("pytest" in line for line in make_recipe("test"))


def test_make_demo_runs_the_documented_command():
    (demo,) = [line for line in make_recipe("demo")]
    assert demo in bash_commands(), "README must show the command `make demo` runs"


# `make demo` and its chain command are run by tests/test_chain.py (shortened), `make test` is this suite.
@pytest.mark.parametrize("command", [c for c in bash_commands()
                                     if not c.startswith("make ") and c not in make_recipe("demo")])
def test_readme_command_runs(command, tmp_path, workdir):
    proc = run(command, tmp_path, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_python_snippets_run_in_order(tmp_path):
    script = "\n".join(code_blocks("python"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "my-model" / "modeling_pipeline_gpt.py").is_file()


def test_chinese_readme_shows_the_same_commands_and_code():
    def without_comments(text: str) -> list[str]:
        return [line.split("#")[0].rstrip() for line in text.splitlines() if line.split("#")[0].strip()]

    chinese = (REPO / "README.zh.md").read_text(encoding="utf-8")
    for language in ("bash", "python"):
        english_blocks = [without_comments(b) for b in code_blocks(language)]
        chinese_blocks = [without_comments(b) for b in re.findall(rf"```{language}\n(.*?)```", chinese, flags=re.S)]
        assert chinese_blocks == english_blocks, f"README.zh.md {language} blocks differ from README.md"
