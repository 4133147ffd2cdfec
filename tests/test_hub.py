"""Export (remote-code folder, Llama format), model cards, lineage and push, on tiny stage outputs."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard

import pipeline  # noqa: F401  (registers PipelineGPT)
from pipeline.data.tokenizer import train_tokenizer
from pipeline.hub.export import export_model, list_export_files
from pipeline.artifacts import StageOutput, build_manifest
from pipeline.modeling import PipelineGPTConfig, PipelineGPTForCausalLM, PipelineGPTForSequenceClassification

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
IDS = torch.tensor([[1, 4, 10, 11, 12, 2, 5, 13]])


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["What is 12 plus 3? A: 15", "Sort b a. A: a b", "猫坐在垫子上"] * 30, vocab_size=300,
                           show_progress=False)


def stage(root, name, model, tokenizer, parent=None, license="apache-2.0", config=None, metrics=None):
    with StageOutput(root / name) as out:
        model.save_pretrained(out.work)
        tokenizer.save_pretrained(out.work)
        out.finish(build_manifest(name, artifact="model", config=config or {}, parent_dir=parent, tokenizer=tokenizer,
                                  datasets=[{"name": f"demo:{name}", "license": license, "rows": 10}],
                                  metrics={"exact_match": 0.5, "perplexity": 3.2, "loss_history": [(1, 2.0)],
                                           **(metrics or {})}))
    return root / name


def tiny(preset="llama", head=PipelineGPTForCausalLM, **extra):
    torch.manual_seed(0)
    config = PipelineGPTConfig.preset(preset, vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, **extra)
    return head(config).eval()


def clean_load_all(jobs):
    """Load every (path, auto class, trust_remote_code) in ONE fresh process where `pipeline` is not importable
    (one interpreter start instead of one per export); returns [(class name, first 20 logits)]."""
    code = ("import sys, json, torch; sys.modules['pipeline'] = None\n"
            "import transformers\n"
            "for path, cls, remote in json.loads(sys.argv[1]):\n"
            "    m = getattr(transformers, cls).from_pretrained(path, trust_remote_code=remote).eval()\n"
            f"    logits = m(torch.tensor({IDS.tolist()})).logits.flatten()[:20].tolist()\n"
            "    print(json.dumps([type(m).__name__, logits]))\n")
    out = subprocess.run([sys.executable, "-P", "-c", code, json.dumps([[str(p), c, r] for p, c, r in jobs])],
                         cwd="/", env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return [(name, torch.tensor(logits)) for name, logits in map(json.loads, out.stdout.strip().splitlines())]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    """The three export kinds (remote-code causal LM, plain Llama, remote-code classifier) and their clean loads."""
    root = tmp_path_factory.mktemp("exports")
    causal, llama = tiny(), tiny(num_key_value_heads=1)
    classifier = tiny(head=PipelineGPTForSequenceClassification, num_labels=1, pad_token_id=0)
    pre = stage(root, "pretrain", tiny(), tokenizer, license="mit")
    made = {"causal": (causal, export_model(stage(root, "sft", causal, tokenizer, parent=pre), root / "export")),
            "llama": (llama, export_model(stage(root, "sft-l", llama, tokenizer), root / "llama", format="llama")),
            "classifier": (classifier, export_model(stage(root, "reward", classifier, tokenizer), root / "cls"))}
    loaded = clean_load_all([(made["causal"][1], "AutoModelForCausalLM", True),
                             (made["llama"][1], "AutoModelForCausalLM", False),
                             (made["classifier"][1], "AutoModelForSequenceClassification", True)])
    return {key: (*made[key], *result) for key, result in zip(made, loaded)}


def test_export_loads_in_a_clean_process_with_equal_logits(exports, tokenizer):
    model, out, name, logits = exports["causal"]
    assert name == "PipelineGPTForCausalLM"
    assert torch.allclose(logits, model(IDS).logits.flatten()[:20], atol=1e-5)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    assert {"configuration_pipeline_gpt.py", "modeling_pipeline_gpt.py", "model.safetensors",
            "README.md", "pipeline_lineage.json"} <= set(list_export_files(out))
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other" and "apache-2.0" in card.text and "mit" in card.text  # both data licences
    assert card.data.eval_results[0].metric_type == "exact_match" and card.data.eval_results[0].metric_value == 0.5
    lineage = json.loads((out / "pipeline_lineage.json").read_text())
    assert [e["stage"] for e in lineage] == ["sft", "pretrain"]


def test_single_licence_is_inherited(tmp_path, tokenizer):
    out = export_model(stage(tmp_path, "sft", tiny(), tokenizer), tmp_path / "export")
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"


def test_llama_export_loads_without_remote_code(exports):
    model, out, name, logits = exports["llama"]
    assert name == "LlamaForCausalLM"
    assert torch.allclose(logits, model(IDS).logits.flatten()[:20], atol=1e-5)
    assert not (out / "modeling_pipeline_gpt.py").exists()


def test_non_llama_architecture_is_refused_with_the_reason(tmp_path, tokenizer):
    source = stage(tmp_path, "sft", tiny("gpt2"), tokenizer)
    with pytest.raises(ValueError, match="no Llama equivalent: .*position_embedding"):
        export_model(source, tmp_path / "llama", format="llama")
    assert not (tmp_path / "llama").exists()


def test_sequence_classifier_export(exports):
    model, out, name, logits = exports["classifier"]
    assert name == "PipelineGPTForSequenceClassification"
    assert torch.allclose(logits, model(IDS).logits.flatten()[:20], atol=1e-5)


SAMPLE = "PRIVATE-ROLLOUT What is 12 plus 3?"  # a PPO sample text: training data, must not be uploaded
EXPORT_FILES = ["README.md", "chat_template.jinja", "config.json", "configuration_pipeline_gpt.py",
                "generation_config.json", "model.safetensors", "modeling_pipeline_gpt.py", "pipeline_lineage.json",
                "pipeline_manifest.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def ppo_export(tmp_path_factory, tokenizer):
    """An export of a PPO-like stage whose manifests name absolute local paths and hold rollout samples."""
    root = tmp_path_factory.mktemp("push")
    pre = stage(root, "pretrain", tiny(), tokenizer, config={"output_dir": str(root / "pretrain")})
    ppo = stage(root, "ppo", tiny(), tokenizer, parent=pre,
                config={"output_dir": str(root / "ppo"), "model_name_or_path": str(pre)},
                metrics={"samples": [{"prompt": SAMPLE, "response": "15", "score": 1.0}]})
    return export_model(ppo, root / "export"), root


def push_cli(capsys, *argv):
    from pipeline.cli import main

    code = main(["push", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either


def hub(private: bool | None):
    """A mocked HfApi class; `private=None`: the repository does not exist yet (created private by the push)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    api = mock.MagicMock(name="HfApi()")
    missing = RepositoryNotFoundError("404 not found", response=mock.MagicMock())
    api.repo_info.side_effect = [missing, SimpleNamespace(private=True)] if private is None else None
    api.repo_info.return_value = SimpleNamespace(private=private)
    api.uploaded = {}

    def create_commit(repo_id, *, operations, **kwargs):  # read the files while the staging folder exists
        api.uploaded.update({op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations})

    api.create_commit.side_effect = create_commit
    return mock.patch("pipeline.hub.push.HfApi", return_value=api), api


def test_push_dry_run_prints_exactly_the_upload_plan(ppo_export, capsys):
    out, _ = ppo_export
    code, stdout, _ = push_cli(capsys, out, "someone/tiny", "--dry-run")
    assert code == 0
    assert stdout.splitlines()[0].startswith("would upload 11 files to someone/tiny (private if created;")
    assert [line.strip() for line in stdout.splitlines()[1:]] == EXPORT_FILES
    assert list_export_files(out) == EXPORT_FILES


def test_push_without_a_token_fails_before_touching_the_hub(ppo_export, capsys, no_token):
    patcher, api = hub(private=True)
    with patcher as cls:
        code, _, stderr = push_cli(capsys, ppo_export[0], "someone/tiny")
    assert code == 1 and "no Hugging Face token" in stderr
    cls.assert_not_called()


def test_push_refuses_an_existing_public_repository_without_public(ppo_export, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fromtheenvironment")
    patcher, api = hub(private=False)
    with patcher as cls:
        code, stdout, stderr = push_cli(capsys, ppo_export[0], "someone/tiny")
    assert code == 1 and "someone/tiny exists and is public: pass --public" in stderr
    assert "private" not in stdout + stderr
    cls.assert_called_once_with(token="hf_fromtheenvironment")
    api.repo_info.assert_called_once_with("someone/tiny", repo_type="model")
    api.create_repo.assert_not_called()
    api.create_commit.assert_not_called()


def test_push_uploads_the_dry_run_list_sanitised_and_reports_the_real_visibility(ppo_export, capsys, monkeypatch):
    out, root = ppo_export
    monkeypatch.setenv("HF_TOKEN", "hf_fromtheenvironment")
    local_before = {name: (out / name).read_bytes() for name in EXPORT_FILES}
    patcher, api = hub(private=False)
    with patcher:
        code, stdout, _ = push_cli(capsys, out, "someone/tiny", "--public")
    assert code == 0
    assert stdout.splitlines()[0] == "uploaded 11 files to someone/tiny (public on the Hub):"
    api.create_repo.assert_not_called()
    api.create_commit.assert_called_once()
    assert sorted(api.uploaded) == EXPORT_FILES  # exactly what the dry run printed
    assert all(str(root).encode() not in data and SAMPLE.encode() not in data for data in api.uploaded.values())
    manifest = json.loads(api.uploaded["pipeline_manifest.json"])
    assert "samples" not in manifest["metrics"] and manifest["metrics"]["exact_match"] == 0.5
    assert manifest["parent"]["path"] == "ppo" and manifest["config"]["source"] == "ppo"
    lineage = json.loads(api.uploaded["pipeline_lineage.json"])
    assert [(e["stage"], e["path"]) for e in lineage] == [("ppo", "ppo"), ("pretrain", "pretrain")]
    assert api.uploaded["model.safetensors"] == local_before["model.safetensors"]
    assert {name: (out / name).read_bytes() for name in EXPORT_FILES} == local_before  # the local export is untouched
    assert str(root).encode() in local_before["pipeline_manifest.json"]


def test_push_creates_a_new_repository_private_and_warns_about_token_flag(ppo_export, capsys, no_token):
    secret = "hf_secretsecretsecret123"
    patcher, api = hub(private=None)
    with patcher as cls:
        code, stdout, stderr = push_cli(capsys, ppo_export[0], "someone/new", "--token", secret)
    assert code == 0
    assert stdout.splitlines()[0] == "uploaded 11 files to someone/new (created, private on the Hub):"
    assert "shell history" in stderr and secret not in stdout + stderr
    cls.assert_called_once_with(token=secret)
    api.create_repo.assert_called_once_with("someone/new", repo_type="model", private=True)
    assert sorted(api.uploaded) == EXPORT_FILES


def test_sanitise_keeps_hub_ids_urls_and_relative_paths():
    from pipeline.hub.push import sanitise

    value = {"a": "/home/u/runs/sft", "b": "Qwen/Qwen3-0.6B", "c": "see https://huggingface.co/x/y",
             "d": "outputs/demo/sft", "e": ["C:\\runs\\rm", {"samples": [1]}], "samples": ["t"]}
    assert sanitise(value) == {"a": "sft", "b": "Qwen/Qwen3-0.6B", "c": "see https://huggingface.co/x/y",
                               "d": "outputs/demo/sft", "e": ["rm", {}]}


def test_chat_loads_our_export_without_remote_code(ppo_export, tmp_path):
    """PipelineGPT is registered by `import pipeline`: the shipped modeling files are not executed."""
    import shutil
    from transformers import AutoModelForCausalLM

    from pipeline.evaluation.chat import load_chat_model

    folder = tmp_path / "chat"
    shutil.copytree(ppo_export[0], folder)
    (folder / "modeling_pipeline_gpt.py").write_text("raise RuntimeError('remote code ran')\n")
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", wraps=AutoModelForCausalLM.from_pretrained) as load:
        model, _ = load_chat_model(folder)
    assert load.call_args.kwargs["trust_remote_code"] is False
    assert type(model).__module__ == "pipeline.modeling.modeling_pipeline_gpt"
