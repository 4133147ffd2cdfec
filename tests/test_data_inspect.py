"""`pipeline data inspect`: samples rendered as the trainer sees them, loss spans shown, truncation counted."""

import pytest

from pipeline.cli import main
from pipeline.data.demo_tasks import pretraining_corpus
from pipeline.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "tokenizer"
    train_tokenizer(pretraining_corpus(200, seed=0), vocab_size=300).save_pretrained(out)
    return out


def write_config(path, tokenizer_dir, body: str):
    path.write_text(f"model_name_or_path: {tokenizer_dir}\n{body}")  # only the tokenizer is read from there
    return path


def test_sft_samples_show_the_loss_span_and_count_cut_rows(tokenizer_dir, tmp_path, capsys):
    config = write_config(tmp_path / "sft.yaml", tokenizer_dir,
                          "dataset: {sources: [{path: 'demo:sft?n=40'}], test_size: 0}\nassistant_only_loss: true\n")
    assert main(["data", "inspect", "--config", str(config), "-n", "2", "--max_length", "1000"]) == 0
    out = capsys.readouterr().out
    assert "stage sft: 40 training rows (messages)" in out and out.count("--- sample") == 2
    assert "[loss on] '" in out and "<|eos|>'" in out  # the reply and its end token carry the loss
    assert "<|user|>" in out.split("[loss on]")[0]      # the prompt is shown but not trained on
    assert "0 of 40 rows exceed max_length 1000" in out

    assert main(["data", "inspect", "--config", str(config), "-n", "1", "--max_length", "5"]) == 0
    assert "40 of 40 rows exceed max_length 5" in capsys.readouterr().out


def test_preference_and_pretrain_configs(tokenizer_dir, tmp_path, capsys):
    config = write_config(tmp_path / "dpo_demo.yaml", tokenizer_dir,
                          "dataset: {sources: [{path: 'demo:preference?n=10'}], test_size: 0}\nmax_length: 64\n")
    assert main(["data", "inspect", "--config", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "stage dpo:" in out and "[chosen]" in out and "[rejected]" in out

    config = tmp_path / "pretrain.yaml"
    config.write_text(f"tokenizer_name_or_path: {tokenizer_dir}\nblock_size: 32\n"
                      "dataset: {sources: [{path: 'demo:pretrain?n=20'}], test_size: 0, dedup: false, clean: false}\n")
    assert main(["data", "inspect", "--config", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "packed 20 documents" in out and "blocks of 32" in out and "--- block 1" in out


def test_unknown_stage_and_missing_tokenizer_are_explained(tokenizer_dir, tmp_path, capsys):
    config = write_config(tmp_path / "mystery.yaml", tokenizer_dir, "")
    assert main(["data", "inspect", "--config", str(config)]) == 1
    assert "pass --stage" in capsys.readouterr().err
    config = tmp_path / "sft.yaml"
    config.write_text("model_name_or_path: nowhere/sft\n")
    assert main(["data", "inspect", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "model_name_or_path: nowhere/sft does not exist" in err and str(config) in err
