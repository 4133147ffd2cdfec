"""A newcomer's mistakes: one `error:` line and exit 1 (traceback with --debug), did-you-mean for flags as for YAML
keys, bugs keep their traceback; `pipeline env`; the demo's Llama-export skip line and marked showcase answers."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

from pipeline.artifacts import LineageError, ResumeMismatchError, StageOutput, build_manifest, MANIFEST_NAME
from pipeline.cli import main as cli
from pipeline.errors import ConfigError, DataError, LaunchError, UserError, run_entry_point

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_WAIT_POLICY": "PASSIVE"}
ENV.pop("PIPELINE_DEBUG", None)


def recipe(name):
    """recipes/<name>.py as a module (recipes/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(capsys, expected_start: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected_start}"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)


@pytest.fixture
def misspelt_config(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("output_dir: out\nlearnign_rate: 1.0e-3\n")
    return config


# --------------------------------------------------------------------------- user errors: one line, exit 1


def test_misspelt_yaml_key_is_one_line_and_debug_shows_the_traceback(misspelt_config, capsys, monkeypatch):
    sft = recipe("sft")
    assert run_entry_point(sft.main, ["--config", str(misspelt_config)]) == 1
    one_error_line(capsys, f"{misspelt_config}:2: learnign_rate: unknown key (did you mean learning_rate?)")
    with pytest.raises(ConfigError, match="did you mean learning_rate"):
        run_entry_point(sft.main, ["--config", str(misspelt_config), "--debug"])
    monkeypatch.setenv("PIPELINE_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_entry_point(sft.main, ["--config", str(misspelt_config)])


def test_missing_dataset_file_from_the_cli_and_a_recipe(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert cli(["data", "validate", str(missing)]) == 1
    one_error_line(capsys, f"{missing}: no such file or folder")
    with pytest.raises(DataError):
        cli(["data", "validate", str(missing), "--debug"])
    tokenizer = recipe("tokenizer")
    argv = ["--config", str(REPO / "recipes/configs/demo/tokenizer.yaml"), "--dataset_path", str(missing),
            "--output_dir", str(tmp_path / "tok")]
    assert run_entry_point(tokenizer.main, argv) == 1
    one_error_line(capsys, "")


@pytest.fixture(scope="module")
def adapter_stage(tmp_path_factory):
    """A finished stage output that holds an adapter (with its tokenizer): SFT cannot start from it."""
    from pipeline.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("adapter") / "sft"
    folder.mkdir()
    tokenizer = train_tokenizer(["the cat sat on the mat"] * 20 + ["a b c d"] * 20, vocab_size=280,
                                show_progress=False)
    tokenizer.save_pretrained(folder)
    (folder / MANIFEST_NAME).write_text(json.dumps(build_manifest("sft", artifact="adapter", config={},
                                                                  tokenizer=tokenizer)))
    return folder


def test_lineage_refusal_from_a_recipe(adapter_stage, tmp_path, capsys):
    sft = recipe("sft")
    argv = ["--config", str(REPO / "recipes/configs/demo/sft.yaml"), "--model_name_or_path", str(adapter_stage),
            "--output_dir", str(tmp_path / "out")]
    assert run_entry_point(sft.main, argv) == 1
    err = one_error_line(capsys, f"model_name_or_path: {adapter_stage} holds a adapter")
    assert "merge it first: pipeline merge" in err
    with pytest.raises(LineageError):
        run_entry_point(sft.main, argv + ["--debug"])


def test_resume_mismatch_is_a_user_error(tmp_path, capsys):
    out = tmp_path / "stage"

    def interrupted_then_changed(argv):
        with StageOutput(out) as first:
            first.guard_resume({"learning_rate": 1e-3})
            (first.checkpoints_dir / "checkpoint-5").mkdir(parents=True)
            (first.checkpoints_dir / "checkpoint-5" / "trainer_state.json").write_text("{}")
            raise KeyboardInterrupt  # the run is stopped: its fingerprint and checkpoint stay for a resume
    with pytest.raises(KeyboardInterrupt):
        run_entry_point(interrupted_then_changed, [])

    def resumed(argv):
        with StageOutput(out) as again:
            again.guard_resume({"learning_rate": 2e-3})
    assert run_entry_point(resumed, []) == 1
    assert "learning_rate" in one_error_line(capsys, "")
    with pytest.raises(ResumeMismatchError):
        run_entry_point(resumed, ["--debug"])


def test_distributed_misconfiguration_from_a_recipe(tmp_path, capsys, monkeypatch):
    import accelerate
    from accelerate.utils import DistributedType

    from pipeline.stages.common import parse_stage_args
    from pipeline.stages.sft import SFTArguments, SFTConfig, run_sft

    class Alone:  # what each process of an FSDP launch on a CPU-only machine reports
        def __init__(self, cpu=False):
            self.distributed_type, self.num_processes = DistributedType.NO, 1

    args, training = parse_stage_args((SFTArguments, SFTConfig), [
        "--config", str(REPO / "recipes/configs/demo/sft.yaml"), "--output_dir", str(tmp_path / "out")])
    monkeypatch.setattr(accelerate, "PartialState", Alone)
    monkeypatch.setenv("WORLD_SIZE", "2")  # set after parsing: TrainingArguments would try to join a process group

    def sft(argv):
        run_sft(args, training)
    assert run_entry_point(sft, []) == 1
    assert "each process would train its own copy" in one_error_line(capsys, "WORLD_SIZE=2")
    with pytest.raises(LaunchError):
        run_entry_point(sft, ["--debug"])


def test_a_recipe_process_prints_one_line_and_exits_1(tmp_path):
    """The real entry point, as `python recipes/tokenizer.py` runs it; --debug brings the traceback back."""
    command = [sys.executable, str(REPO / "recipes/tokenizer.py"), "--config",
               str(REPO / "recipes/configs/demo/tokenizer.yaml"), "--dataset_path", str(tmp_path / "missing.jsonl"),
               "--output_dir", str(tmp_path / "tok")]
    plain = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1
    assert plain.stderr == f"error: {tmp_path / 'missing.jsonl'}: no such file or folder (and not a Hub dataset " \
                           "id like 'org/name')\n"
    from pipeline.data.sources import SourceError

    with pytest.raises(SourceError):  # in process: --debug lets the error through (a process prints its traceback)
        run_entry_point(recipe("tokenizer").main, command[2:] + ["--debug"])


# --------------------------------------------------------------------------- flags, bugs


def test_misspelt_flag_suggests_the_right_one(capsys):
    sft = recipe("sft")
    argv = ["--config", str(REPO / "recipes/configs/demo/sft.yaml"), "--learnign_rate", "0.1"]
    assert run_entry_point(sft.main, argv) == 1
    one_error_line(capsys, "--learnign_rate: unknown flag (did you mean --learning_rate?)")
    assert cli(["data", "prepare", "--config", str(REPO / "recipes/configs/demo/pretrain.yaml"), "--learnign_rate",
                "0.1"]) == 1
    one_error_line(capsys, "--learnign_rate: unknown flag (did you mean --learning_rate?)")
    demo = recipe("demo")
    assert run_entry_point(demo.main, ["--overwirte", "true"]) == 1
    one_error_line(capsys, "--overwirte: unknown flag (did you mean --overwrite?)")
    with pytest.raises(SystemExit) as stop:  # a flag of the `pipeline` command itself: argparse's usage error
        cli(["data", "validate", "x.jsonl", "--strcit"])
    assert stop.value.code == 2 and "--strcit: unknown flag (did you mean --strict?)" in capsys.readouterr().err


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch, capsys):
    def bug(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_entry_point(bug, [])
    assert capsys.readouterr().err == ""
    import pipeline.env_report

    monkeypatch.setattr(pipeline.env_report, "environment_report", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli(["env"])


def test_user_error_classes_live_in_one_place():
    from pipeline.data.shards import ShardError
    from pipeline.data.sources import SourceError
    from pipeline.data.validation import DataValidationError
    from pipeline.hub.push import MissingTokenError
    from pipeline.stages.common import ConfigError as StageConfigError
    from pipeline.stages.training import NonFiniteLossError

    assert StageConfigError is ConfigError
    for cls in (ConfigError, DataError, LaunchError, LineageError, ResumeMismatchError, SourceError,
                DataValidationError, ShardError, MissingTokenError, NonFiniteLossError):
        assert issubclass(cls, UserError), cls
    assert issubclass(LineageError, ValueError) and issubclass(LaunchError, RuntimeError)  # callers catching these


# --------------------------------------------------------------------------- pipeline env


def test_pipeline_env_lists_versions_and_hardware(capsys):
    assert cli(["env"]) == 0
    out = capsys.readouterr().out
    names = ("python", "platform", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes",
             "tokenizers", "evaluate", "pipeline", "accelerate config", "cpu", "gpu")
    lines = {line.split(":")[0] for line in out.splitlines()}
    assert set(names) <= lines | {"gpu"} and ("gpu" in lines or "gpu 0" in lines), out
    assert "CUDA available:" in out and "MPS available:" in out and "git commit:" in out and "ram:" in out


def test_bitsandbytes_kernel_warning_alone_is_dropped(caplog):
    import logging

    import pipeline  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
        logging.getLogger("bitsandbytes.cextension").warning("Failed to load CPU gemm_4bit_forward elsewhere")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["some other bitsandbytes warning", "Failed to load CPU gemm_4bit_forward elsewhere"]


# --------------------------------------------------------------------------- the demo's export line and report


def test_llama_export_of_an_incompatible_architecture_is_a_skip(tmp_path):
    from pipeline.modeling import PipelineGPTConfig
    from pipeline.stages.chain import llama_export

    export = tmp_path / "export"
    PipelineGPTConfig.preset("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, key_smear=2).save_pretrained(export)
    line = llama_export(tmp_path / "ppo", tmp_path / "export-llama", export)
    assert line == ("skipped: Llama-format export (this PipelineGPT architecture has no Llama equivalent: "
                    "key_smear=2 (Llama has 0))")
    assert not line.startswith("error:") and not (tmp_path / "export-llama").exists()


def test_report_marks_showcase_answers_right_and_wrong(tmp_path):
    from pipeline.evaluation.report import write_report

    showcase = [{"question": "What is 76 plus 6?", "expected": "82", "answer": "82"},
                {"question": "Sort n e.", "expected": "e n", "answer": "n e"}]
    write_report([{"stage": "ppo", "metrics": {"exact_match": 0.5}},
                  {"stage": "export", "metrics": {"wall_seconds": 3.0}, "source": "ppo", "showcase": showcase}],
                 tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "1 of 2 held-out demo questions answered right" in text
    assert "  - ✓ right: What is 76 plus 6? → 82\n" in text
    assert "  - ✗ wrong: Sort n e. → n e (expected e n)\n" in text
    assert json.loads((tmp_path / "report.json").read_text())["stages"][1]["showcase"] == showcase
