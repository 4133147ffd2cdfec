"""Tokenizer, pretraining, SFT and classification stages end to end through `accelerate launch`, on tiny overrides
of the shipped demo configs: artifacts load, lineage is checked, interrupted runs resume exactly."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipeline  # noqa: F401  (registers PipelineGPT with the Auto classes)
from conftest import REPO

CONFIGS = REPO / "recipes" / "configs" / "demo"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# Hidden 64: bitsandbytes' CPU 4-bit kernel (QLoRA) needs layer inputs in multiples of 64.
TINY_MODEL = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2",
              "--intermediate_size", "64", "--block_size", "32"]
TINY_TRAIN = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_seconds", "600"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: str, *args: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """The recipe in its own process(es). One process: the recipe run directly with the environment
    `accelerate launch --num_processes 1 --cpu` gives it (the launcher's own start-up costs 2 s; the README's
    `accelerate launch` commands run through it in test_docs.py). More: through `accelerate launch`."""
    env = ENV
    if processes == 1:
        command = [sys.executable]
        env = {**ENV, "ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(free_port())]
    command += [str(REPO / "recipes" / f"{stage}.py"), "--config", str(CONFIGS / f"{stage}.yaml"), *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def run_in_process(stage: str, *args: str) -> subprocess.CompletedProcess:
    """The recipe's entry point in this interpreter, for runs refused before they train (or as light as a
    tokenizer): the same `error:` line and exit status as a launch, without a torch+transformers start-up."""
    from test_docs import _recipe_main, in_process

    from pipeline.errors import run_entry_point

    main = _recipe_main(REPO / "recipes" / f"{stage}.py")
    return in_process(lambda: run_entry_point(main, ["--config", str(CONFIGS / f"{stage}.yaml"), *args]), REPO)


def manifest(path: Path) -> dict:
    return json.loads((path / "pipeline_manifest.json").read_text())


def held_out_rows(meta: dict, arguments, test_size: float) -> list[dict]:
    """The evaluation split a stage measured, rebuilt from the stage arguments its manifest recorded."""
    from pipeline.stages.training import resolve_mixture

    return resolve_mixture(arguments(**meta["config"]["stage"]), default_test_size=test_size).eval


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    launch("tokenizer", "--output_dir", str(root / "tokenizer"), "--dataset_path", "demo:pretrain?n=150",
           "--vocab_size", "300")
    launch("pretrain", "--output_dir", str(root / "pretrain"), "--tokenizer_name_or_path", str(root / "tokenizer"),
           "--dataset_path", "demo:pretrain?n=150", "--max_steps", "6", "--save_steps", "3", *TINY_MODEL, *TINY_TRAIN)
    return root


def sft_args(chain: Path, out: Path, method: str, *extra: str) -> list[str]:
    return ["--output_dir", str(out), "--model_name_or_path", str(chain / "pretrain"), "--method", method,
            "--dataset_path", "demo:sft?n=120", "--max_steps", "4", "--save_steps", "2", "--eval_demo_tasks", "6",
            "--lora_r", "4", "--lora_alpha", "8", "--num_virtual_tokens", "4", "--freeze_trainable_layers", "1",
            *TINY_TRAIN, *extra]


def test_tokenizer_and_pretrain_artifacts(chain):
    tok, pre = manifest(chain / "tokenizer"), manifest(chain / "pretrain")
    assert tok["stage"] == "tokenizer" and tok["artifact"] == "tokenizer"
    assert pre["parent"]["path"] == str(chain / "tokenizer") and pre["tokenizer_hash"] == tok["tokenizer_hash"]
    assert pre["metrics"]["perplexity"] > 1 and pre["config"]["training"]["max_steps"] == 6
    assert not (chain / "pretrain.incomplete").exists()
    check = ("from transformers import AutoModelForCausalLM;"
             f"m = AutoModelForCausalLM.from_pretrained({str(chain / 'pretrain')!r}, trust_remote_code=True);"
             "print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-P", "-c", "import sys; sys.modules['pipeline'] = None;" + check],
                         cwd="/", env={**ENV, "PYTHONPATH": ""}, capture_output=True, text=True)
    assert out.stdout.strip() == "PipelineGPTForCausalLM", out.stderr[-2000:]


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "freeze", "prompt_tuning"])
def test_sft_methods_run_and_load(chain, tmp_path, method):
    out = tmp_path / f"sft-{method}"
    launch("sft", *sft_args(chain, out, method))
    meta = manifest(out)
    assert meta["artifact"] == ("model" if method in ("full", "freeze") else "adapter")
    assert meta["parent"]["path"] == str(chain / "pretrain")
    assert meta["metrics"]["train_loss"] > 0
    # exact match over 6 held-out tasks is a count of sixths, and the per-kind rates add up to it
    solved = meta["metrics"]["exact_match"] * 6
    assert solved == pytest.approx(round(solved), abs=1e-9)
    if method in ("full", "freeze"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out)
        if method == "freeze":  # frozen layers are bit-identical to the parent's
            before = load_file(chain / "pretrain" / "model.safetensors")
            after = load_file(out / "model.safetensors")
            assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
            assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    else:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, 5, 6]])).logits.shape[-1] == 300
    if method in ("full", "lora"):  # the saved model scores what the stage reported, on the same 6 tasks
        from transformers import AutoTokenizer

        from pipeline.evaluation.evaluators import held_out_demo_metrics

        again = held_out_demo_metrics(model.eval(), AutoTokenizer.from_pretrained(out), 6)
        assert again["exact_match"] == meta["metrics"]["exact_match"]
    if method == "lora":
        merged = tmp_path / "merged"
        from pipeline.cli import main  # in process: a fresh interpreter would prove nothing more here

        assert main(["merge", str(out), str(merged)]) == 0
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(merged)
        ids = torch.tensor([[1, 4, 10, 11, 2, 5]])
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
        assert manifest(merged)["artifact"] == "model" and manifest(merged)["parent"]["path"] == str(out)
        # The special tokens' embeddings trained with the adapter (<|assistant|> = 5); ordinary tokens stayed put.
        before = load_file(chain / "pretrain" / "model.safetensors")["model.embed_tokens.weight"]
        after = plain.get_input_embeddings().weight.detach()
        assert not torch.equal(after[5], before[5]) and torch.equal(after[6:], before[6:])


def test_output_is_refused_without_overwrite_and_tokenizer_mismatch_is_refused(chain, tmp_path):
    # In process: every launch of tests/test_stages_lm.py goes through the same entry point and its error handling.
    again = run_in_process("pretrain", "--output_dir", str(chain / "pretrain"), "--tokenizer_name_or_path",
                           str(chain / "tokenizer"), "--dataset_path", "demo:pretrain?n=150", "--max_steps", "1",
                           *TINY_MODEL, *TINY_TRAIN)
    assert again.returncode != 0 and "--overwrite true" in again.stderr
    other = tmp_path / "other-tokenizer"
    made = run_in_process("tokenizer", "--output_dir", str(other), "--dataset_path", "demo:sft?n=150",
                          "--vocab_size", "280")
    assert made.returncode == 0, made.stderr[-2000:]
    mismatch = run_in_process("sft", *sft_args(chain, tmp_path / "sft", "full", "--tokenizer_name_or_path", str(other)))
    assert mismatch.returncode != 0 and "tokenizer" in mismatch.stderr.lower()
    assert not (tmp_path / "sft").exists()


# Runs a recipe whose process SIGKILLs itself right after saving checkpoint `step`: a crash at a known point,
# with no race between a fast run finishing and a poller noticing the checkpoint.
KILL_AFTER_SAVE = """
import os, runpy, signal, sys
from transformers import Trainer
save = Trainer._save_checkpoint
def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    if self.state.global_step >= {step}:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer._save_checkpoint = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _kill_after_checkpoint(recipe_and_args: list[str], work: Path, step: int) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE.format(step=step), *recipe_and_args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (work / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_sigkill_then_resume_equals_uninterrupted(chain, tmp_path, stage):
    if stage == "pretrain":
        extra = ["--tokenizer_name_or_path", str(chain / "tokenizer"), "--dataset_path", "demo:pretrain?n=150",
                 "--max_steps", "8", "--save_steps", "2", *TINY_MODEL, *TINY_TRAIN]
        make = lambda out: ["--output_dir", str(out), *extra]  # noqa: E731
        weights = "model.safetensors"
    else:
        make = lambda out: sft_args(chain, out, "lora", "--max_steps", "8", "--save_steps", "2")  # noqa: E731
        weights = "adapter_model.safetensors"
    launch(stage, *make(tmp_path / "straight"))
    killed = tmp_path / "killed"
    command = [str(REPO / "recipes" / f"{stage}.py"), "--config", str(CONFIGS / f"{stage}.yaml"), *make(killed)]
    _kill_after_checkpoint(command, killed.with_name("killed.incomplete"), step=4)
    assert not killed.exists()  # an interrupted run leaves nothing that looks finished
    assert not (killed.with_name("killed.incomplete") / "pipeline_manifest.json").exists()
    if stage == "pretrain":  # a resume under other settings or data is refused, naming what differs
        for flag, value, named in (("--learning_rate", "1e-2", "training.learning_rate"),
                                   ("--dataset_path", "demo:pretrain?n=160", "data")):
            refused = run_in_process(stage, *make(killed), flag, value)
            assert refused.returncode != 0 and named in refused.stderr, refused.stderr[-2000:]
        assert (killed.with_name("killed.incomplete") / "checkpoints" / "checkpoint-4").is_dir()  # kept for a resume
    resumed = launch(stage, *make(killed))  # picks up checkpoint-4 by itself
    assert "resuming from" in resumed.stdout and "checkpoint-4" in resumed.stdout
    a, b = load_file(tmp_path / "straight" / weights), load_file(killed / weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_two_process_ddp_equals_one_process_with_double_batch(chain, tmp_path):
    common = ["--tokenizer_name_or_path", str(chain / "tokenizer"), "--dataset_path", "demo:pretrain?n=150",
              "--max_steps", "3", "--save_steps", "100", *TINY_MODEL, "--logging_steps", "1", "--max_seconds", "600"]
    launch("pretrain", "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4", *common)
    launch("pretrain", "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2", *common,
           processes=2)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert manifest(tmp_path / "two")["stage"] == "pretrain"


def test_sft_on_two_processes_equals_one_process_with_double_batch(chain, tmp_path):
    """SFT (TRL's SFTTrainer, loss on replies): 2 processes x batch 2 train the weights of 1 process x batch 4 —
    the samplers hand both runs the same rows per step and the token mean spans both processes."""
    common = ["--max_steps", "3", "--save_steps", "100", "--eval_demo_tasks", "0"]
    launch("sft", *sft_args(chain, tmp_path / "one", "full", *common, "--per_device_train_batch_size", "4"))
    launch("sft", *sft_args(chain, tmp_path / "two", "full", *common, "--per_device_train_batch_size", "2"),
           processes=2)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(chain / "pretrain" / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in start) > 1e-4  # training moved the weights
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_classify_stage_reports_accuracy(chain, tmp_path):
    out = tmp_path / "classify"
    launch("classify", "--output_dir", str(out), "--model_name_or_path", str(chain / "pretrain"),
           "--dataset_path", "demo:classification?n=120", "--max_steps", "4", *TINY_TRAIN)
    meta = manifest(out)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.stages.classify import ClassifyArguments

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 2
    # Recomputed by hand from the saved model, one held-out row at a time (no padding involved).
    rows, tokenizer = held_out_rows(meta, ClassifyArguments, 0.1), AutoTokenizer.from_pretrained(out)
    assert len(rows) >= 5  # about 10% of 120 rows, after the loader's cleaning
    right = 0
    for row in rows:
        ids = tokenizer(row["text"], truncation=True, max_length=meta["config"]["stage"]["max_length"],
                        return_tensors="pt")["input_ids"]
        with torch.no_grad():
            right += int(model(ids).logits.argmax(-1).item() == row["label"])
    assert meta["metrics"]["accuracy"] == pytest.approx(right / len(rows), abs=1e-9)


# --------------------------------------------------------------------------- alignment stages


@pytest.fixture(scope="module")
def sft_lora(chain):  # two CPU processes (gloo): the alignment stages below run distributed too
    launch("sft", *sft_args(chain, chain / "sft", "lora"), processes=2)
    return chain / "sft"


def load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def reward(chain, sft_lora):
    launch("reward", "--output_dir", str(chain / "reward"), "--model_name_or_path", str(sft_lora),
           "--dataset_path", "demo:preference?n=120", "--max_steps", "4", *TINY_TRAIN, processes=2)
    return chain / "reward"


def test_reward_model_from_a_lora_sft(reward):
    meta = manifest(reward)
    assert meta["artifact"] == "model"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.evaluation.evaluators import pairwise_reward_accuracy
    from pipeline.stages.reward import RewardArguments

    model = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    assert model.config.num_labels == 1 and type(model).__name__ == "PipelineGPTForSequenceClassification"
    # The saved (merged) model reproduces the reported accuracy and margin on the same held-out pairs.
    pairs = held_out_rows(meta, RewardArguments, 0.05)
    assert len(pairs) == 6  # 5% of 120
    again = pairwise_reward_accuracy(model, AutoTokenizer.from_pretrained(reward), pairs)
    assert meta["metrics"]["reward_accuracy"] == pytest.approx(again["accuracy"], abs=1e-9)
    assert meta["metrics"]["reward_margin"] == pytest.approx(again["margin"], abs=1e-4)
    assert meta["metrics"]["reward_accuracy"] * 6 == pytest.approx(round(meta["metrics"]["reward_accuracy"] * 6))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ppo_stage_writes_a_loadable_policy(chain, sft_lora, reward, tmp_path, method):
    out = tmp_path / "ppo"
    launch("ppo", "--output_dir", str(out), "--model_name_or_path", str(sft_lora), "--reward_model_path", str(reward),
           "--dataset_path", "demo:prompts?n=40", "--max_steps", "3", "--batch_size", "4", "--mini_batch_size", "2",
           "--save_steps", "2", "--eval_demo_tasks", "6", "--method", method, "--lora_r", "4",
           processes=2 if method == "full" else 1)
    meta = manifest(out)
    assert meta["stage"] == "ppo" and len(meta["metrics"]["reward_history"]) == 3
    assert meta["config"]["ppo"]["max_steps"] == 3
    solved = meta["metrics"]["exact_match"] * 6  # a count of sixths over the 6 held-out tasks
    assert solved == pytest.approx(round(solved), abs=1e-9)
    # mean_reward is the mean of the last quarter of the per-step rewards (one step of three)
    assert meta["metrics"]["mean_reward"] == pytest.approx(meta["metrics"]["reward_history"][-1])
    # the reward-KL trade-off: per-step KL, its last-quarter mean (one step), the gain per unit of KL, the plot
    metrics = meta["metrics"]
    assert len(metrics["kl_history"]) == 3 and metrics["mean_kl"] == pytest.approx(metrics["kl_history"][-1])
    if metrics["mean_kl"] > 0:
        assert metrics["reward_gain_per_kl"] == pytest.approx(
            (metrics["mean_reward"] - metrics["mean_reward_first"]) / metrics["mean_kl"])
    from PIL import Image

    assert Image.open(out / "reward_kl.png").size == (500, 380)
    assert load_causal_lm(out)(torch.tensor([[1, 4, 5]])).logits.shape[-1] == 300


def test_dpo_on_policy_and_grpo(chain, sft_lora, tmp_path):
    launch("dpo", "--output_dir", str(tmp_path / "dpo"), "--model_name_or_path", str(sft_lora),
           "--dataset_path", "demo:prompts?n=40", "--max_steps", "2", "--on_policy_samples", "2",
           "--eval_demo_tasks", "6", "--loss_type", "ipo", "--loss_weights", "1.0", *TINY_TRAIN, processes=2)
    meta = manifest(tmp_path / "dpo")
    assert meta["metrics"]["pairs_prompts"] > 30 and meta["config"]["training"]["loss_type"] == ["ipo"]
    # Step 1 starts with policy == reference (full fine-tuning, no dropout), so every pair's log-ratio margin is 0
    # and the IPO loss is (0 - 1 / (2 * beta))^2 = (1 / 0.2)^2 = 25 with beta 0.1; step 2 has moved away from it.
    assert meta["config"]["training"]["beta"] == 0.1
    (step1, loss1), (step2, loss2) = meta["metrics"]["loss_history"]
    assert (step1, step2) == (1, 2) and loss1 == pytest.approx(25.0, rel=1e-3)
    assert loss2 == loss2 and abs(loss2 - 25.0) > 1e-3
    load_causal_lm(tmp_path / "dpo")
    launch("grpo", "--output_dir", str(tmp_path / "grpo"), "--model_name_or_path", str(sft_lora),
           "--dataset_path", "demo:prompts?n=40", "--max_steps", "2", "--num_generations", "4",
           "--eval_demo_tasks", "6", *TINY_TRAIN, processes=2)
    grpo = manifest(tmp_path / "grpo")["metrics"]
    assert len(grpo["reward_history"]) == 2  # one logged reward per step (logging_steps=1)
    assert (grpo["mean_reward_first"], grpo["mean_reward"]) == tuple(grpo["reward_history"])  # quarter = 1 step
    assert [step for step, _ in grpo["loss_history"]] == [1, 2]
    load_causal_lm(tmp_path / "grpo")
