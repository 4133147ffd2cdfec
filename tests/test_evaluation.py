"""Metrics load as local `evaluate` modules and compute hand-computed values; evaluators and the report work on a
tiny model and a tiny tokenizer."""

import copy
import json
import math

import evaluate
import pytest
import torch
from torch import nn

from pipeline.data.demo_tasks import Task, eval_tasks, qa_line, training_tasks
from pipeline.data.tokenizer import train_tokenizer
from pipeline.evaluation import METRICS, load_metric, metric_path
from pipeline.evaluation.evaluators import (
    demo_exact_match, exact_match_by_kind, few_shot_exact_match, few_shot_prompt, greedy_answers,
    pairwise_reward_accuracy, perplexity, reward_scores, select_shots, win_rate_vs_baseline,
)
from pipeline.evaluation.report import write_report
from pipeline.modeling import PipelineGPTConfig, PipelineGPTForCausalLM, PipelineGPTForSequenceClassification

# --------------------------------------------------------------------------- metric modules


@pytest.mark.parametrize("name", METRICS)
def test_metric_modules_load_offline_from_folder_and_script(name):
    assert evaluate.load(metric_path(name)).name == name
    assert evaluate.load(f"{metric_path(name)}/{name}.py").name == name


def test_exact_match_normalises_whitespace():
    metric = load_metric("exact_match")
    assert metric.compute(predictions=["a  b", " c\n", "d", "e f"], references=["a b", "c", "e", "ef"]) == \
        {"exact_match": 0.5}
    with pytest.raises(ValueError, match="predictions is empty"):
        metric.compute(predictions=[], references=[])


def test_perplexity_pools_tokens_not_examples():
    metric = load_metric("perplexity")
    # (2 + 6) nats over (2 + 6) tokens: 1 nat per token, though the per-example means are 1 and 1.
    assert metric.compute(nll_sum=[2.0, 6.0], token_count=[2, 6]) == {"perplexity": math.e, "mean_nll": 1.0}
    result = metric.compute(nll_sum=[1.0, 5.0], token_count=[1, 3])  # 6 / 4 = 1.5, not mean(1, 5/3)
    assert result["mean_nll"] == 1.5 and math.isclose(result["perplexity"], math.exp(1.5))
    with pytest.raises(ValueError, match="no tokens to score"):
        metric.compute(nll_sum=[0.0], token_count=[0])


def test_reward_accuracy_and_win_rate_values():
    assert load_metric("reward_accuracy").compute(chosen_scores=[1, 0.5, 2, 3], rejected_scores=[0, 1, 1, 3]) == \
        {"accuracy": 0.5, "margin": 0.375}  # the tie (3, 3) is not a win; margins (1 - 0.5 + 1 + 0) / 4
    assert load_metric("win_rate").compute(scores=[1, 1, 0, 3], baseline_scores=[0, 1, 1, 2]) == \
        {"win_rate": 0.625, "wins": 2, "ties": 1, "losses": 1}  # (2 + 0.5) / 4


def test_unknown_metric_and_mismatched_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="metric: unknown 'bleu'; use one of exact_match"):
        metric_path("bleu")
    with pytest.raises(ValueError, match="Mismatch in the number of predictions"):
        load_metric("exact_match").compute(predictions=["a", "b"], references=["a"])


# --------------------------------------------------------------------------- evaluators on a tiny model


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["\n".join(qa_line(t) for t in training_tasks(16, seed=5)[i:i + 4]) for i in range(0, 16, 4)]
    return train_tokenizer(texts, vocab_size=300, show_progress=False)


def tiny_config(tokenizer, **extra):
    return PipelineGPTConfig.preset("llama", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return PipelineGPTForCausalLM(tiny_config(tokenizer)).eval()


def always_emits(model, token_id: int):
    """A copy of `model` whose logits are the same at every position, with `token_id` on top."""
    fixed = copy.deepcopy(model)
    head = nn.Linear(fixed.config.hidden_size, fixed.config.vocab_size, bias=True)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[token_id] = 5.0
    fixed.lm_head = head
    return fixed


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens in the test tokenizer"
    return ids[0]


def test_greedy_answers_are_deterministic_strings_and_batch_invariant(model, tokenizer):
    prompts = [t.prompt for t in eval_tasks(7, seed=0)]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=4)
    assert len(answers) == 7 and all(isinstance(a, str) and a == a.strip() for a in answers)
    assert greedy_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=3) == answers
    assert tokenizer.padding_side == "right" and not model.training  # both restored


def test_exact_match_equals_the_metric_over_greedy_answers(model, tokenizer):
    tasks = eval_tasks(10, seed=0)
    answers = greedy_answers(model, tokenizer, [t.prompt for t in tasks], max_new_tokens=4)
    result = demo_exact_match(model, tokenizer, tasks, max_new_tokens=4)
    # By hand: an answer matches when its whitespace-separated words equal the reference's.
    hits = [a.split() == t.answer.split() for a, t in zip(answers, tasks)]
    assert result["exact_match"] == sum(hits) / 10
    for kind in {t.kind for t in tasks}:
        mine = [h for h, t in zip(hits, tasks) if t.kind == kind]
        assert result["per_kind"][kind] == sum(mine) / len(mine), kind
    assert set(result["per_kind"]) == {t.kind for t in tasks}


def test_a_model_that_always_says_seven_scores_exactly_the_sevens(model, tokenizer):
    sevens = always_emits(model, single_token(tokenizer, "7"))
    tasks = [Task("add", "en", "What is 770 plus 7?", "777"), Task("add", "en", "What is 70 plus 7?", "77"),
             Task("count", "en", "How many a in a a a?", "3"), Task("add", "zh", "770 加 7 等于多少？", "777")]
    assert greedy_answers(sevens, tokenizer, [t.prompt for t in tasks], max_new_tokens=3) == ["777"] * 4
    assert demo_exact_match(sevens, tokenizer, tasks, max_new_tokens=3) == \
        {"exact_match": 0.5, "per_kind": {"add": 2 / 3, "count": 0.0}}
    assert demo_exact_match(sevens, tokenizer, tasks, chat=False, max_new_tokens=3)["exact_match"] == 0.5
    silent = always_emits(model, tokenizer.eos_token_id)
    assert greedy_answers(silent, tokenizer, ["What is 1 plus 2?"]) == [""]


def test_plain_text_generation_stops_at_the_newline(model, tokenizer, monkeypatch):
    newline = always_emits(model, single_token(tokenizer, "\n"))
    lengths = []
    generate = newline.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(newline, "generate", spy)
    assert greedy_answers(newline, tokenizer, ["Sort b a. A:"], chat=False, max_new_tokens=8) == [""]
    assert greedy_answers(newline, tokenizer, ["Sort b a."], chat=True, max_new_tokens=8) == [""]
    assert lengths == [1, 8]  # plain text stops at the first newline; a chat answer only at eos


def test_few_shot_prompt_and_shot_selection():
    shots = [Task("add", "en", "What is 10 plus 1?", "11"), Task("add", "zh", "10 加 1 等于多少？", "11"),
             Task("sort", "zh", "把 b a 排序。", "a b"), Task("add", "zh", "20 加 2 等于多少？", "22")]
    task = Task("add", "zh", "20 加 2 等于多少？", "22")
    chosen = select_shots(task, shots, k=3)
    assert chosen == [shots[1], shots[2], shots[0]]  # same kind+language, same language, other; never itself
    assert few_shot_prompt(task, chosen[:1]) == "10 加 1 等于多少？ 答：11\n20 加 2 等于多少？ 答："
    english = Task("sort", "en", "Sort c a.", "a c")
    assert few_shot_prompt(english, [Task("sort", "en", "Sort b a.", "a b")]) == "Sort b a. A: a b\nSort c a. A:"


def test_few_shot_exact_match_reads_the_answer_up_to_the_newline(model, tokenizer):
    tasks = eval_tasks(5, seed=0)
    shots = training_tasks(20, seed=0)
    result = few_shot_exact_match(model, tokenizer, tasks, shots, 2, max_new_tokens=6)
    answers = greedy_answers(model, tokenizer, [few_shot_prompt(t, select_shots(t, shots, 2)) for t in tasks],
                             chat=False, max_new_tokens=6)
    assert all("\n" not in a for a in answers)
    assert result == exact_match_by_kind(answers, tasks)
    with pytest.raises(ValueError, match="shots: empty but k=3"):
        few_shot_exact_match(model, tokenizer, tasks, [])


def test_perplexity_equals_exp_of_the_models_own_loss(model):
    torch.manual_seed(1)
    blocks = torch.randint(3, 300, (5, 16))
    expected = math.exp(model(input_ids=blocks, labels=blocks).loss.item())
    result = perplexity(model, None, blocks.tolist(), batch_size=2)
    assert math.isclose(result["perplexity"], expected, rel_tol=1e-5)
    assert math.isclose(result["mean_nll"], math.log(expected), rel_tol=1e-5)
    assert perplexity(model, None, blocks) == perplexity(model, None, [{"input_ids": b} for b in blocks.tolist()])


def test_perplexity_of_rows_of_different_lengths_weights_tokens(model, tokenizer):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("What is 12 plus 3? A: 15", "Sort b a.")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    expected = math.exp(model(input_ids=ids, attention_mask=mask, labels=labels).loss.item())
    assert math.isclose(perplexity(model, None, rows, batch_size=1)["perplexity"], expected, rel_tol=1e-5)
    texts = perplexity(model, tokenizer, [{"text": "What is 12 plus 3? A: 15"}, "Sort b a."])
    assert math.isclose(texts["perplexity"], expected, rel_tol=1e-5)
    with pytest.raises(ValueError, match=r"data\[0\] is text: pass a tokenizer"):
        perplexity(model, None, ["Sort b a."])


def test_a_model_with_uniform_logits_has_perplexity_equal_to_the_vocabulary_size(model):
    uniform = always_emits(model, 0)
    with torch.no_grad():
        uniform.lm_head.bias.zero_()
    assert math.isclose(perplexity(uniform, None, [[5, 6, 7, 8], [9, 10]])["perplexity"], model.config.vocab_size,
                        rel_tol=1e-6)


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    torch.manual_seed(2)
    return PipelineGPTForSequenceClassification(tiny_config(tokenizer, num_labels=1)).eval()


def pairs_for(tasks):
    return [{"prompt": [{"role": "user", "content": t.prompt}], "chosen": [{"role": "assistant", "content": t.answer}],
             "rejected": [{"role": "assistant", "content": "x y z"}]} for t in tasks]


def test_reward_scores_are_one_float_per_conversation_whatever_the_batching(reward_model, tokenizer):
    chats = [p["prompt"] + p["chosen"] for p in pairs_for(eval_tasks(5, seed=0))]
    scores = reward_scores(reward_model, tokenizer, chats)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    torch.testing.assert_close(reward_scores(reward_model, tokenizer, chats, batch_size=1), scores, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"conversations\[0\]: expected a list of"):
        reward_scores(reward_model, tokenizer, ["just text"])


def test_pairwise_reward_accuracy_is_the_metric_over_reward_scores(reward_model, tokenizer):
    pairs = pairs_for(eval_tasks(6, seed=0))
    chosen = reward_scores(reward_model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs]).tolist()
    rejected = reward_scores(reward_model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs]).tolist()
    expected = {"accuracy": sum(c > r for c, r in zip(chosen, rejected)) / 6,
                "margin": sum(c - r for c, r in zip(chosen, rejected)) / 6}
    result = pairwise_reward_accuracy(reward_model, tokenizer, pairs)
    assert result["accuracy"] == expected["accuracy"] and math.isclose(result["margin"], expected["margin"])
    swapped = pairwise_reward_accuracy(reward_model, tokenizer, [{**p, "chosen": p["rejected"],
                                                                  "rejected": p["chosen"]} for p in pairs])
    assert math.isclose(swapped["margin"], -result["margin"])
    assert pairwise_reward_accuracy(reward_model, tokenizer, [{**p, "rejected": p["chosen"]} for p in pairs]) == \
        {"accuracy": 0.0, "margin": 0.0}  # identical answers: never above, no margin
    with pytest.raises(ValueError, match=r"pairs\[0\]: missing \['rejected'\]"):
        pairwise_reward_accuracy(reward_model, tokenizer, [{"prompt": [], "chosen": []}])


def scored_by_reply(monkeypatch, table: dict):
    """reward_scores replaced by a lookup of each conversation's last message: the scores are literal numbers."""
    import pipeline.evaluation.evaluators as evaluators

    monkeypatch.setattr(evaluators, "reward_scores", lambda model, tokenizer, chats, batch_size=32: torch.tensor(
        [table[c[-1]["content"]] for c in chats]))


def test_pairwise_reward_accuracy_and_win_rate_from_literal_scores(monkeypatch):
    scored_by_reply(monkeypatch, {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.0, "e": 5.0, "f": -1.0})
    pairs = [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": c}],
              "rejected": [{"role": "assistant", "content": r}]}
             for c, r in [("a", "b"), ("b", "b"), ("c", "a"), ("d", "f"), ("e", "c")]]
    # chosen - rejected: 3-1=2, 1-1=0 (tie, no win), 2-3=-1, 0-(-1)=1, 5-2=3 -> 3 wins of 5, margin 5/5 = 1.0
    result = pairwise_reward_accuracy(None, None, pairs)
    assert result["accuracy"] == 0.6 and math.isclose(result["margin"], 1.0)
    # ours vs baseline: a>b win, b=b tie, c<a loss, d>f win -> 2 wins, 1 tie, 1 loss: (2 + 0.5) / 4 = 0.625
    assert win_rate_vs_baseline(None, None, ["q"] * 4, ["a", "b", "c", "d"], ["b", "b", "a", "f"]) == \
        {"win_rate": 0.625, "wins": 2, "ties": 1, "losses": 1}


def test_win_rate_vs_baseline(reward_model, tokenizer):
    tasks = eval_tasks(4, seed=0)
    prompts, answers, others = [t.prompt for t in tasks], [t.answer for t in tasks], ["x y z"] * 4
    assert win_rate_vs_baseline(reward_model, tokenizer, prompts, answers, answers) == \
        {"win_rate": 0.5, "wins": 0, "ties": 4, "losses": 0}

    def scores(replies):
        return reward_scores(reward_model, tokenizer, [[{"role": "user", "content": p}, {"role": "assistant",
                                                        "content": r}] for p, r in zip(prompts, replies)])

    wins = int((scores(answers) > scores(others)).sum())
    result = win_rate_vs_baseline(reward_model, tokenizer, prompts, answers, others)
    assert result["wins"] == wins and result["wins"] + result["ties"] + result["losses"] == 4
    with pytest.raises(ValueError, match="4 prompts, 4 answers and 3 baseline_answers"):
        win_rate_vs_baseline(reward_model, tokenizer, prompts, answers, others[:3])


def test_a_classifier_with_several_labels_is_not_a_reward_model(tokenizer):
    torch.manual_seed(3)
    classifier = PipelineGPTForSequenceClassification(tiny_config(tokenizer, num_labels=2))
    with pytest.raises(ValueError, match="num_labels=2; a reward model scores with num_labels=1"):
        reward_scores(classifier, tokenizer, [[{"role": "user", "content": "hi"}]])


# --------------------------------------------------------------------------- report

STAGES = [{"stage": "pretrain", "metrics": {"perplexity": 3.1, "exact_match": 0.2, "wall_seconds": 200}},
          {"stage": "sft", "metrics": {"exact_match": 0.4, "exact_match_per_kind": {"add": 0.5}},
           "loss_history": [(1, 2.0), (2, 1.5)]},
          {"stage": "reward", "metrics": {"reward_accuracy": 0.85, "mean_reward": float("nan")}},
          {"stage": "ppo", "metrics": {"exact_match": 0.45, "mean_reward": 1.2}, "reward_history": [0.1, 0.5, 1.2],
           "kl_history": [0.0, 0.2, 0.4]}]


def test_report_files(tmp_path):
    paths = write_report(STAGES, tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md", "metrics.png", "loss_curves.png"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["pretrain", "sft", "reward", "ppo"]
    assert report["stages"][2]["metrics"] == {"reward_accuracy": 0.85, "mean_reward": None}  # NaN is not JSON
    assert report["stages"][1]["loss_history"] == [[1, 2.0], [2, 1.5]]
    table = (tmp_path / "report.md").read_text()
    assert "| stage | perplexity | exact match | reward accuracy | mean reward | wall s |" in table
    assert "| pretrain | 3.10 | 0.200 |  |  | 200 |" in table and "| reward |  |  | 0.850 |  |  |" in table
    assert "| ppo |  | 0.450 |  | 1.200 |  |" in table
    for name in ("metrics.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 3 steps: quarters of one step; gain 1.2 - 0.1 = 1.1 at KL 0.4 -> 2.75 per unit of KL
    assert ("- ppo reward–KL: mean KL 0.400 over the last quarter for a reward gain of +1.100 (+2.75 per unit of "
            "KL); plot: ppo/reward_kl.png") in table


def test_reward_kl_trend_and_plot(tmp_path):
    from PIL import Image

    from pipeline.evaluation.evaluators import reward_kl_trend
    from pipeline.evaluation.report import reward_kl_plot

    # 8 steps: quarters of 2; rewards (1 + 2) / 2 = 1.5 -> (6 + 8) / 2 = 7, KL (0.5 + 1.5) / 2 = 1
    trend = reward_kl_trend([1, 2, 3, 4, 5, 5, 6, 8], [0, 0.1, 0.2, 0.2, 0.3, 0.4, 0.5, 1.5])
    assert trend == pytest.approx({"mean_kl": 1.0, "reward_gain": 5.5, "reward_gain_per_kl": 5.5})
    assert reward_kl_trend([1.0, 2.0], [0.0, 0.0])["reward_gain_per_kl"] is None  # no drift, no ratio
    with pytest.raises(ValueError, match="as many KL values"):
        reward_kl_trend([1.0, 2.0], [0.1])
    image = Image.open(reward_kl_plot([1, 2, 3], [0.0, 0.1, 0.3], tmp_path / "frontier.png"))
    assert image.size == (500, 380)


def test_report_without_histories_writes_no_loss_plot_and_rejects_bad_rows(tmp_path):
    paths = write_report([{"stage": "reward", "metrics": {"reward_accuracy": 0.9}}], tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md"]
    with pytest.raises(ValueError, match=r"stages\[1\]: expected a dict with a 'stage' name"):
        write_report([STAGES[0], {"metrics": {}}], tmp_path)
    with pytest.raises(ValueError, match=r"stages\[0\] \(sft\): loss_history entries must be \(step, loss\) pairs"):
        write_report([{"stage": "sft", "metrics": {}, "loss_history": [1.5, 1.2]}], tmp_path)
