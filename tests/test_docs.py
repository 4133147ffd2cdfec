"""Every command in the README runs (with tiny overrides), so the docs cannot drift from the code."""

import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")

# Appended to a documented command (argparse keeps the last value), keeping each run to seconds.
TINY = {
    "python recipes/quickstart.py": "--max_steps 2 --documents 40 --hidden_size 32 --num_hidden_layers 1 "
                                    "--block_size 32 --batch_size 2 --vocab_size 300",
    "python benchmarks/model_speed.py": "--vocab 128 --hidden 32 --layers 1 --heads 2 --kv_heads 2 --batch 2 "
                                        "--seq_len 16 --train_steps 1 --prompt_len 4 --decode_batch 1 "
                                        "--new_tokens 2 --repeats 1",
}
OUTPUT_FLAGS = {"python recipes/quickstart.py": "--output_dir"}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def bash_commands() -> list[str]:
    lines = [line.split("#")[0].strip() for block in code_blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line]


def make_recipe(target: str) -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert body, f"Makefile has no '{target}' target"
    return [line.strip().replace("$(PY)", "python") for line in body.group(1).splitlines()]


def run(command: str, tmp_path) -> subprocess.CompletedProcess:
    prefix = next((p for p in TINY if command.startswith(p)), None)
    assert prefix, f"README command {command!r} has no tiny override in tests/test_docs.py: add one"
    args = shlex.split(command) + shlex.split(TINY[prefix])
    if prefix in OUTPUT_FLAGS:
        args += [OUTPUT_FLAGS[prefix], str(tmp_path / "out")]
    args[0] = sys.executable
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_readme_starts_with_make_demo_and_make_test():
    assert bash_commands()[:2] == ["make demo", "make test"]
    assert any("pytest" in line for line in make_recipe("test"))


def test_make_demo_runs_the_documented_command():
    (demo,) = [line for line in make_recipe("demo")]
    assert demo in bash_commands(), "README must show the command `make demo` runs"


@pytest.mark.parametrize("command", [c for c in bash_commands() if not c.startswith("make ")])
def test_readme_command_runs(command, tmp_path):
    proc = run(command, tmp_path)
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
