"""`make demo` shortened: the whole chain runs, the report has its structure, every artifact loads."""

import json
import subprocess
import sys

import pytest

import pipeline  # noqa: F401  (registers PipelineGPT)
from conftest import REPO, with_local_standins
from test_docs import make_recipe

TINY_CHAIN = [
    "tokenizer.dataset_path=demo:pretrain?n=150", "tokenizer.vocab_size=300",
    "pretrain.dataset_path=demo:pretrain?n=150", "pretrain.max_steps=4", "pretrain.hidden_size=32",
    "pretrain.num_hidden_layers=2", "pretrain.num_attention_heads=2", "pretrain.intermediate_size=64",
    "pretrain.block_size=32", "pretrain.per_device_train_batch_size=4",
    "sft.dataset_path=demo:sft?n=100", "sft.max_steps=3", "sft.per_device_train_batch_size=4", "sft.lora_r=4",
    "reward.dataset_path=demo:preference?n=100", "reward.max_steps=3", "reward.per_device_train_batch_size=4",
    "ppo.dataset_path=demo:prompts?n=40", "ppo.max_steps=2", "ppo.batch_size=4", "ppo.mini_batch_size=2",
    "dpo.dataset_path=demo:prompts?n=40", "dpo.max_steps=2", "dpo.per_device_train_batch_size=4",
    "dpo.on_policy_samples=2",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    (root / "recipes").symlink_to(REPO / "recipes")
    (command,) = make_recipe("demo")  # exactly what `make demo` runs, plus tiny overrides
    args = command.split()[1:] + ["--eval_tasks", "6"] + [x for item in TINY_CHAIN for x in ("--set", item)]
    proc = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "outputs" / "demo", proc.stdout


def test_report_structure(demo):
    out, _ = demo
    report = json.loads((out / "report.json").read_text())
    stages = [row["stage"] for row in report["stages"]]
    assert stages == ["tokenizer", "pretrain", "sft", "reward", "ppo", "dpo", "export"]
    metrics = {row["stage"]: row["metrics"] for row in report["stages"]}
    manifests = {s: json.loads((out / s / "pipeline_manifest.json").read_text())["metrics"] for s in stages[1:-1]}
    # The report copies each stage's own measurements from its manifest, unchanged.
    for stage, keys in {"pretrain": ["perplexity"], "sft": ["exact_match"], "dpo": ["exact_match"],
                        "reward": ["reward_accuracy", "reward_margin"],
                        "ppo": ["exact_match", "mean_reward", "mean_reward_first"]}.items():
        assert {k: metrics[stage][k] for k in keys} == {k: manifests[stage][k] for k in keys}, stage
    assert metrics["pretrain"]["perplexity"] > 1
    for stage in ("pretrain", "sft", "ppo", "dpo"):  # --eval_tasks 6: exact match is a count of sixths
        assert metrics[stage]["exact_match"] * 6 == pytest.approx(round(metrics[stage]["exact_match"] * 6)), stage
    assert metrics["reward"]["reward_accuracy"] * 5 == pytest.approx(round(metrics["reward"]["reward_accuracy"] * 5))
    assert metrics["ppo"]["mean_reward"] == pytest.approx(manifests["ppo"]["reward_history"][-1])  # 2 steps: last
    # The base model's few-shot score is recomputed from the saved pretrain model.
    from pipeline.stages.chain import base_model_scores

    assert base_model_scores(out, 6)["exact_match"] == metrics["pretrain"]["exact_match"]
    assert all(m["wall_seconds"] > 0 for m in metrics.values())
    table = (out / "report.md").read_text()
    assert all(f"| {s} |" in table for s in stages)
    assert (out / "metrics.png").is_file() and (out / "loss_curves.png").is_file()


def test_every_artifact_loads(demo):
    out, stdout = demo
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.data.tokenizer import load_tokenizer

    load_tokenizer(out / "tokenizer")
    for stage in ("pretrain", "ppo", "dpo", "export"):
        AutoModelForCausalLM.from_pretrained(out / stage, trust_remote_code=True)
    AutoModelForSequenceClassification.from_pretrained(out / "reward")
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(out / "sft")
    # the demo model's smeared keys have no Llama equivalent: the Llama-format export is skipped with the reason
    assert not (out / "export-llama").exists() and "key_smear=2 (Llama has 0)" in stdout
    assert "skipped: Llama-format export" in stdout and not any(l.startswith("error:") for l in stdout.splitlines())
    assert "clean-process load of" in stdout
    report = (out / "report.md").read_text()
    assert "held-out demo questions" in report and report.count("right: ") + report.count("wrong: ") == 5


def test_repeated_set_flags_all_reach_their_stages():
    from pipeline.stages.chain import ChainArguments, gather_repeated, stage_command

    argv = gather_repeated("--set", ["--set", "sft.max_steps=7", "--stages", "sft", "--set", "seed=3",
                                     "--set", "reward.max_steps=9"])
    assert argv == ["--stages", "sft", "--set", "sft.max_steps=7", "seed=3", "reward.max_steps=9"]
    args = ChainArguments(set=argv[-3:])
    sft = stage_command("sft", args)
    assert sft[sft.index("--max_steps") + 1] == "7" and sft[sft.index("--seed") + 1] == "3"
    reward = stage_command("reward", args)
    assert reward[reward.index("--max_steps") + 1] == "9"
    with pytest.raises(ValueError, match="STAGE"):
        stage_command("sft", ChainArguments(set=["no-equals-sign"]))
    from pipeline.stages.chain import run_chain

    with pytest.raises(ValueError, match="unknown stage 'sftt'"):
        run_chain(ChainArguments(set=["sftt.max_steps=3"]))


def test_readme_real_data_chain_runs(shared_data, tmp_path):
    """The README's `make demo ARGS=...` on Alpaca and HH (local slices standing in for the Hub ids), with tiny
    model and step overrides."""
    import re
    import shlex

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    documented = re.search(r'^make demo ARGS="(.*?)"$', readme, flags=re.S | re.M).group(1).replace("\\\n", " ")
    documented = shlex.split(with_local_standins(documented))
    stages = documented[documented.index("--stages") + 1].split(",")
    tiny = [x for item in TINY_CHAIN if item.split(".")[0] in stages and not item.startswith(("sft.dataset_path",
            "reward.dataset_path")) for x in ("--set", item)]
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    (command,) = make_recipe("demo")
    proc = subprocess.run([sys.executable, *command.split()[1:], *documented, *tiny, "--eval_tasks", "6"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "outputs" / "demo"
    report = json.loads((out / "report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == stages
    sft = json.loads((out / "sft" / "pipeline_manifest.json").read_text())
    reward = json.loads((out / "reward" / "pipeline_manifest.json").read_text())
    assert sft["datasets"][0]["name"].endswith("alpaca_en_0-3252.json") and sft["datasets"][0]["rows"] > 3000
    assert reward["datasets"][0]["rows"] == 1800
    reported = {row["stage"]: row["metrics"] for row in report["stages"]}["reward"]
    assert reported["reward_accuracy"] == reward["metrics"]["reward_accuracy"]  # measured on held-out HH pairs
    assert reported["reward_margin"] == reward["metrics"]["reward_margin"]
    # The saved reward model reproduces that accuracy on the held-out HH pairs, rebuilt from its manifest.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.evaluation.evaluators import pairwise_reward_accuracy
    from pipeline.stages.reward import RewardArguments
    from test_stages_lm import held_out_rows

    pairs = held_out_rows(reward, RewardArguments, 0.05)
    model = AutoModelForSequenceClassification.from_pretrained(out / "reward").eval()
    again = pairwise_reward_accuracy(model, AutoTokenizer.from_pretrained(out / "reward"), pairs)
    assert reward["metrics"]["reward_accuracy"] == pytest.approx(again["accuracy"], abs=1e-9)
    assert len(pairs) > 80  # about 5% of the 1,800 pairs
