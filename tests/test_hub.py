"""Export (remote-code folder, Llama format), model cards, lineage and push, on tiny stage outputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard

import pipeline  # noqa: F401  (registers PipelineGPT)
from conftest import REPO
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


def stage(root, name, model, tokenizer, parent=None, license="apache-2.0"):
    with StageOutput(root / name) as out:
        model.save_pretrained(out.work)
        tokenizer.save_pretrained(out.work)
        out.finish(build_manifest(name, artifact="model", config={}, parent_dir=parent, tokenizer=tokenizer,
                                  datasets=[{"name": f"demo:{name}", "license": license, "rows": 10}],
                                  metrics={"exact_match": 0.5, "perplexity": 3.2, "loss_history": [(1, 2.0)]}))
    return root / name


def tiny(preset="llama", head=PipelineGPTForCausalLM, **extra):
    torch.manual_seed(0)
    config = PipelineGPTConfig.preset(preset, vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, **extra)
    return head(config).eval()


def clean_load(path, cls="AutoModelForCausalLM", remote=True):
    code = ("import sys, torch; sys.modules['pipeline'] = None\n"
            f"from transformers import {cls}\n"
            f"m = {cls}.from_pretrained({str(path)!r}{', trust_remote_code=True' if remote else ''}).eval()\n"
            f"print(type(m).__name__); print(m(torch.tensor({IDS.tolist()})).logits.flatten()[:20].tolist())\n")
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd="/", env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    name, logits = out.stdout.strip().splitlines()
    return name, torch.tensor(json.loads(logits))


def test_export_loads_in_a_clean_process_with_equal_logits(tmp_path, tokenizer):
    model = tiny()
    pre = stage(tmp_path, "pretrain", tiny(), tokenizer, license="mit")
    source = stage(tmp_path, "sft", model, tokenizer, parent=pre)
    out = export_model(source, tmp_path / "export")
    name, logits = clean_load(out)
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


def test_llama_export_loads_without_remote_code(tmp_path, tokenizer):
    model = tiny(num_key_value_heads=1)
    out = export_model(stage(tmp_path, "sft", model, tokenizer), tmp_path / "llama", format="llama")
    name, logits = clean_load(out, remote=False)
    assert name == "LlamaForCausalLM"
    assert torch.allclose(logits, model(IDS).logits.flatten()[:20], atol=1e-5)
    assert not (out / "modeling_pipeline_gpt.py").exists()


def test_non_llama_architecture_is_refused_with_the_reason(tmp_path, tokenizer):
    source = stage(tmp_path, "sft", tiny("gpt2"), tokenizer)
    with pytest.raises(ValueError, match="no Llama equivalent: .*position_embedding"):
        export_model(source, tmp_path / "llama", format="llama")
    assert not (tmp_path / "llama").exists()


def test_sequence_classifier_export(tmp_path, tokenizer):
    model = tiny(head=PipelineGPTForSequenceClassification, num_labels=1, pad_token_id=0)
    out = export_model(stage(tmp_path, "reward", model, tokenizer), tmp_path / "export")
    name, logits = clean_load(out, cls="AutoModelForSequenceClassification")
    assert name == "PipelineGPTForSequenceClassification"
    assert torch.allclose(logits, model(IDS).logits.flatten()[:20], atol=1e-5)


def test_push_dry_run_lists_exactly_the_files_and_token_rules(tmp_path, tokenizer):
    out = export_model(stage(tmp_path, "sft", tiny(), tokenizer), tmp_path / "export")
    cli = [sys.executable, "-m", "pipeline.cli", "push", str(out), "someone/tiny"]
    env = {**ENV, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_TOKEN", None)
    dry = subprocess.run(cli + ["--dry-run"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-2000:]
    listed = [line.strip() for line in dry.stdout.splitlines()[1:]]
    assert listed == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "(private)" in dry.stdout
    missing = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "no Hugging Face token" in missing.stderr
    secret = "hf_secretsecretsecret123"
    offline = subprocess.run(cli + ["--token", secret], env=env, capture_output=True, text=True)
    assert offline.returncode != 0  # no network here: the upload fails, and says so
    assert secret not in offline.stdout + offline.stderr
