"""Stage arguments (YAML + overrides, errors with file:line), atomic outputs, manifests and lineage checks."""

import dataclasses
import json

import pytest

from conftest import REPO
from transformers import TrainingArguments

from pipeline.data.tokenizer import train_tokenizer
from pipeline.artifacts import (
    MANIFEST_NAME, LineageError, StageOutput, build_manifest, check_parent, latest_checkpoint, read_manifest,
)
from pipeline.stages.common import ConfigError, check_distributed_setup, parse_stage_args
from pipeline.stages.pretrain import PretrainArguments
from pipeline.stages.sft import SFTArguments


def write(path, text):
    path.write_text(text)
    return path


def test_yaml_values_and_command_line_overrides(tmp_path):
    config = write(tmp_path / "c.yaml", "output_dir: out\nhidden_size: 64\nmax_steps: 5\nlearning_rate: 1.0e-3\n"
                                        "dataset:\n  sources:\n    - path: demo:pretrain?n=10\n")
    args, training = parse_stage_args((PretrainArguments, TrainingArguments),
                                      ["--config", str(config), "--max_steps", "7"])
    assert (args.hidden_size, training.max_steps, training.learning_rate) == (64, 7, 1e-3)
    assert args.dataset == {"sources": [{"path": "demo:pretrain?n=10"}]}
    assert training.output_dir == "out"


def test_dict_options_take_json_on_the_command_line(tmp_path, capsys):
    config = write(tmp_path / "c.yaml", "output_dir: out\nmodel_config:\n  qk_norm: true\n")
    args, _ = parse_stage_args((PretrainArguments, TrainingArguments), ["--config", str(config)])
    assert args.model_config == {"qk_norm": True}
    args, _ = parse_stage_args((PretrainArguments, TrainingArguments),
                               ["--config", str(config), "--model_config", '{"key_smear": true}'])
    assert args.model_config == {"key_smear": True}
    with pytest.raises(SystemExit):
        parse_stage_args((PretrainArguments, TrainingArguments), ["--output_dir", "o", "--model_config", "[1]"])
    assert "--model-config: expected a JSON object such as" in capsys.readouterr().err


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    config = write(tmp_path / "c.yaml", "output_dir: out\n\nlearning_rat: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"^{config}:3: learning_rat: unknown key \(did you mean learning_rate\?\)"):
        parse_stage_args((PretrainArguments, TrainingArguments), ["--config", str(config)])


def test_wrong_type_and_bad_choice_name_file_line(tmp_path):
    config = write(tmp_path / "c.yaml", "output_dir: out\nmax_steps: ten\n")
    with pytest.raises(ConfigError, match=rf"^{config}:2: max_steps: 'ten' is not a valid int"):
        parse_stage_args((PretrainArguments, TrainingArguments), ["--config", str(config)])
    config = write(tmp_path / "d.yaml", "output_dir: out\nmethod: lorra\n")
    from trl import SFTConfig

    with pytest.raises(ConfigError, match="method: 'lorra' is not one of full, lora"):
        parse_stage_args((SFTArguments, SFTConfig), ["--config", str(config)])


def test_invalid_yaml_is_located(tmp_path):
    config = write(tmp_path / "c.yaml", "output_dir: out\nmax_steps: [1,\n")
    with pytest.raises(ConfigError, match=rf"^{config}:\d+: invalid YAML"):
        parse_stage_args((PretrainArguments, TrainingArguments), ["--config", str(config)])


def test_stage_output_appears_only_when_finished(tmp_path):
    out = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with StageOutput(out) as work:
            (work.work / "weights.bin").write_text("half")
            raise RuntimeError("killed")
    assert not out.exists() and not (work.work / MANIFEST_NAME).exists()
    with StageOutput(out) as work:  # a rerun keeps the partial work (checkpoints) and finishes
        assert (work.work / "weights.bin").exists()
        work.finish({"stage": "x", "artifact": "model"})
    assert read_manifest(out)["stage"] == "x" and not work.work.exists()
    with pytest.raises(FileExistsError, match="--overwrite true"):
        StageOutput(out).__enter__()
    with StageOutput(out, overwrite=True) as again:
        (again.work / "new.bin").write_text("new")
        again.finish({"stage": "y", "artifact": "model"})
    assert read_manifest(out)["stage"] == "y" and (out / "new.bin").exists() and not (out / "weights.bin").exists()


def test_resume_goes_ahead_only_with_the_same_settings(tmp_path):
    from types import SimpleNamespace

    from trl import SFTConfig

    from pipeline.artifacts import ResumeMismatchError
    from pipeline.stages.training import run_fingerprint

    data = SimpleNamespace(fingerprint=lambda: "data-a")

    def fingerprint(mixture=data, **overrides):
        settings = {"learning_rate": 1e-3, "max_steps": 10, "save_steps": 5, **overrides}
        training = SFTConfig(output_dir=str(tmp_path / "ckpt"), use_cpu=True, bf16=False, **settings)
        return run_fingerprint({"stage": {"method": "lora", "overwrite": False}, "training": training.to_dict()},
                               [None], mixture)

    out = tmp_path / "sft"
    with StageOutput(out) as first:
        first.guard_resume(fingerprint())
        (first.checkpoints_dir / "checkpoint-5").mkdir(parents=True)
        (first.checkpoints_dir / "checkpoint-5" / "trainer_state.json").write_text("{}")
    with StageOutput(out) as again:  # interrupted: a longer run and other save/logging steps still resume
        again.guard_resume(fingerprint(max_steps=20, save_steps=2, logging_steps=3))
        with pytest.raises(ResumeMismatchError, match=r"training\.learning_rate \(0\.001 -> 0\.002\)"):
            again.guard_resume(fingerprint(learning_rate=2e-3))
        with pytest.raises(ResumeMismatchError, match=r"data \('data-a' -> 'data-b'\).*--overwrite true"):
            again.guard_resume(fingerprint(mixture=SimpleNamespace(fingerprint=lambda: "data-b")))
    with StageOutput(out, overwrite=True) as clean:  # overwrite starts clean: the old checkpoints are gone
        assert latest_checkpoint(clean.checkpoints_dir) is None
        clean.guard_resume(fingerprint(learning_rate=2e-3))
    (out.with_name("sft.incomplete") / "run_fingerprint.json").unlink()
    (out.with_name("sft.incomplete") / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (out.with_name("sft.incomplete") / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    with StageOutput(out) as unknown, pytest.raises(ResumeMismatchError, match="without a run_fingerprint.json"):
        unknown.guard_resume(fingerprint())


def test_latest_checkpoint_skips_unfinished_ones(tmp_path):
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert latest_checkpoint(tmp_path / "missing") is None


@pytest.fixture(scope="module")
def tokenizers():
    a = train_tokenizer(["the cat sat on the mat"] * 20 + ["a b c d"] * 20, vocab_size=280, show_progress=False)
    b = train_tokenizer(["猫坐在垫子上"] * 20 + ["one two three"] * 20, vocab_size=290, show_progress=False)
    return a, b


def test_manifest_lineage(tmp_path, tokenizers):
    a, b = tokenizers
    parent = tmp_path / "parent"
    parent.mkdir()
    manifest = build_manifest("pretrain", artifact="model", config={"x": 1}, tokenizer=a, metrics={"perplexity": 3.0})
    (parent / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert check_parent(parent, a)["stage"] == "pretrain"
    with pytest.raises(LineageError, match="tokenizer: differs from the one"):
        check_parent(parent, b)
    child = build_manifest("sft", artifact="adapter", config={}, parent_dir=parent, tokenizer=a)
    assert child["parent"]["stage"] == "pretrain" and len(child["parent"]["manifest_sha256"]) == 64
    assert child["versions"]["transformers"] and child["created"].endswith("Z")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / MANIFEST_NAME).write_text(json.dumps(child))
    with pytest.raises(LineageError, match="merge it first: pipeline merge"):
        check_parent(adapter, a, expect_artifact="model")
    with pytest.raises(FileNotFoundError, match="not a finished stage output"):
        check_parent(tmp_path / "nothing")


def test_world_size_without_process_group_is_refused(monkeypatch):
    import accelerate
    from accelerate.utils import DistributedType

    class Alone:  # what each process of an FSDP launch on a CPU-only machine reports
        def __init__(self, cpu=False):
            self.distributed_type, self.num_processes = DistributedType.NO, 1

    monkeypatch.setattr(accelerate, "PartialState", Alone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="each process would train its own copy.*cpu_ddp.yaml"):
        check_distributed_setup()
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_distributed_setup()  # a single process needs no group


ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.stem for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.compute_environment.value == "LOCAL_MACHINE"
    expected = {"cpu_ddp": "MULTI_GPU", "ddp": "MULTI_GPU", "multi_node": "MULTI_GPU", "fsdp2": "FSDP",
                "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert config.distributed_type.value == expected[path.stem]
    assert {p.stem for p in ACCELERATE_CONFIGS} == set(expected)


def _recipe_types(stage: str):
    from trl import DPOConfig, GRPOConfig, RewardConfig, SFTConfig

    from pipeline.alignment.ppo_trainer import PPOConfig
    from pipeline.stages.classify import ClassifyArguments
    from pipeline.stages.dpo import DPOArguments
    from pipeline.stages.grpo import GRPOArguments
    from pipeline.stages.ppo import PPOArguments
    from pipeline.stages.reward import RewardArguments
    from pipeline.stages.tokenizer import TokenizerArguments

    return {"tokenizer": (TokenizerArguments,), "pretrain": (PretrainArguments, TrainingArguments),
            "sft": (SFTArguments, SFTConfig), "classify": (ClassifyArguments, TrainingArguments),
            "reward": (RewardArguments, RewardConfig), "dpo": (DPOArguments, DPOConfig),
            "ppo": (PPOArguments, PPOConfig), "grpo": (GRPOArguments, GRPOConfig)}[stage]


SHIPPED = sorted((REPO / "recipes" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[f"{p.parent.name}/{p.stem}" for p in SHIPPED])
def test_every_shipped_config_parses(path):
    import torch

    stage = path.stem.split("_")[0]
    argv = ["--config", str(path)]
    if "bf16: true" in path.read_text() and not torch.cuda.is_available():
        argv += ["--bf16", "false"]  # GPU configs: transformers refuses bf16 on a CPU-only machine at parse time
    parsed = parse_stage_args(_recipe_types(stage), argv)
    # Every key of the file reaches its dataclass field with the file's value.
    import yaml

    written = yaml.safe_load(path.read_text())
    if "--bf16" in argv:
        written["bf16"] = False
    mismatched, unplaced = {}, []
    for key, value in written.items():
        owners = [p for p in parsed if key in {f.name for f in dataclasses.fields(p)}]
        if not owners:
            unplaced.append(key)
            continue
        got = getattr(owners[0], key)
        got = getattr(got, "value", got)  # enums (lr_scheduler_type, ...) compare by their string value
        if key == "report_to" and value == "none":
            value = got if got in ("none", [], ["none"]) else value  # transformers normalises "none"
        if got != value and not (isinstance(value, str) and isinstance(got, list) and got == [value]):
            mismatched[key] = (value, got)
    assert not unplaced and not mismatched, (unplaced, mismatched)
    # A user has only this repository: data comes from Hub ids or the embedded demo, never from beside the checkout.
    assert "../" not in path.read_text(), f"{path.name} reads a path outside the repository"
