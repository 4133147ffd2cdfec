"""Run models on evaluation data and score them with the local metric modules.

Generation: greedy answers to chat or plain-text prompts; exact match on demo tasks, zero-shot and few-shot.
Scoring: perplexity of a causal LM on token rows; reward-model scores, pairwise accuracy and win rate.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from pipeline.data.chat_templates import stop_token_ids
from pipeline.data.padding import IGNORE_INDEX, padded_batch, padded_lm_batch
from pipeline.evaluation import load_metric


@contextmanager
def _inference(model):
    """eval() and no_grad for the duration, then the model's mode as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _require_pad_token(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: no pad token; batched evaluation pads prompts (set tokenizer.pad_token, "
                         "e.g. to the eos token)")


# --------------------------------------------------------------------------- generation


def greedy_answers(model, tokenizer, prompts: Sequence[str], *, chat: bool = True, max_new_tokens: int = 16,
                   batch_size: int = 32) -> list[str]:
    """Greedy completions of `prompts`, stripped of surrounding whitespace.

    chat=True renders each prompt as one user turn with the chat template and stops at eos (how a chat model
    answers). chat=False continues the raw text and stops at the end of the line or at eos (how a base model
    answers a few-shot prompt).
    """
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts[{bad[0]}]: expected a string, got {type(prompts[bad[0]]).__name__}")
    if chat and not tokenizer.chat_template:
        raise ValueError("tokenizer: no chat_template, so chat=True cannot render prompts; pass chat=False for "
                         "plain-text prompts or use a tokenizer from pipeline.data.tokenizer")
    _require_pad_token(tokenizer)
    answers: list[str] = []
    with _inference(model):
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            if chat:
                chunk = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                       tokenize=False) for p in chunk]
            # The chat template writes its own bos; plain text is continued as given. Left padding: every prompt
            # ends where generation starts.
            rows = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            ids, mask = (t.to(model.device) for t in padded_batch(rows, tokenizer.pad_token_id, side="left"))
            stop = {} if chat else {"stop_strings": ["\n"], "tokenizer": tokenizer}
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **stop)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            # A token may carry text past the newline that stopped generation: cut there.
            answers += [(t if chat else t.split("\n")[0]).strip() for t in texts]
    return answers


def exact_match_by_kind(predictions: Sequence[str], tasks) -> dict:
    """The exact_match metric over all tasks and per task kind: {"exact_match": float, "per_kind": {kind: float}}."""
    if len(predictions) != len(tasks):
        raise ValueError(f"predictions: {len(predictions)} answers for {len(tasks)} tasks; pass one per task")
    if not tasks:
        raise ValueError("tasks: empty; pass at least one Task to score")
    metric = load_metric("exact_match")
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        by_kind[task.kind].append(i)

    def score(indices):
        return metric.compute(predictions=[predictions[i] for i in indices],
                              references=[tasks[i].answer for i in indices])["exact_match"]

    return {"exact_match": score(range(len(tasks))),
            "per_kind": {kind: score(indices) for kind, indices in sorted(by_kind.items())}}


def answer_separator(task) -> str:
    # No space after "A:": pretraining text "A: d c" tokenises as "A", ":", " d", " c", so the model must choose
    # the space-prefixed answer token itself; a prompt ending in a space would start it mid-token.
    return "答：" if task.language == "zh" else "A:"


def question_line(task) -> str:
    """The question in the plain-text line format of `qa_line`, up to and including the answer separator."""
    return f"{task.prompt} {answer_separator(task)}"


def demo_exact_match(model, tokenizer, tasks, *, chat: bool = True, max_new_tokens: int = 16,
                     batch_size: int = 32) -> dict:
    """Exact match of greedy answers to demo tasks (`pipeline.data.demo_tasks.Task`), overall and per kind.

    chat=True asks each prompt as a user turn; chat=False asks zero-shot in the plain "question A:" line format.
    """
    prompts = [t.prompt if chat else question_line(t) for t in tasks]
    answers = greedy_answers(model, tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    return exact_match_by_kind(answers, tasks)


def held_out_demo_metrics(model, tokenizer, n: int) -> dict:
    """A stage's metrics on `n` held-out demo tasks asked as chat: {"exact_match", "exact_match_per_kind"}."""
    from pipeline.data.demo_tasks import eval_tasks

    result = demo_exact_match(model, tokenizer, eval_tasks(n, seed=0), chat=True)
    return {"exact_match": result["exact_match"], "exact_match_per_kind": result.get("per_kind", {})}


def reward_trend(rewards: Sequence[float]) -> dict:
    """Mean reward over the first and the last quarter of training: {"mean_reward_first", "mean_reward"} (None
    when nothing was logged)."""
    quarter = max(1, len(rewards) // 4)
    return {"mean_reward_first": sum(rewards[:quarter]) / quarter if rewards else None,
            "mean_reward": sum(rewards[-quarter:]) / quarter if rewards else None}


def reward_kl_trend(rewards: Sequence[float], kls: Sequence[float]) -> dict:
    """The reward-KL trade-off of an RL run from its per-step mean reward and KL: {"mean_kl": mean KL of the last
    quarter, "reward_gain": last-quarter minus first-quarter mean reward, "reward_gain_per_kl": their ratio (None
    when the KL is not positive)}."""
    if not rewards or len(rewards) != len(kls):
        raise ValueError(f"reward_kl_trend: needs as many KL values ({len(kls)}) as rewards ({len(rewards)}), >= 1")
    trend = reward_trend(rewards)
    quarter = max(1, len(kls) // 4)
    mean_kl = sum(kls[-quarter:]) / quarter
    gain = trend["mean_reward"] - trend["mean_reward_first"]
    return {"mean_kl": mean_kl, "reward_gain": gain, "reward_gain_per_kl": gain / mean_kl if mean_kl > 0 else None}


def select_shots(task, shots: Iterable, k: int) -> list:
    """Up to `k` solved examples for `task`: same kind and language first, then same language, then any.

    A shot with the task's own prompt is skipped, so the answer never appears in its own prompt.
    """
    pool = [s for s in shots if s.prompt != task.prompt]
    ranked = ([s for s in pool if (s.kind, s.language) == (task.kind, task.language)]
              + [s for s in pool if s.language == task.language and s.kind != task.kind]
              + [s for s in pool if s.language != task.language])
    return ranked[:k]


def few_shot_prompt(task, shots: Sequence) -> str:
    """The given solved examples as `qa_line`s, one per line, then the question with its answer separator."""
    from pipeline.data.demo_tasks import qa_line

    return "\n".join([qa_line(s) for s in shots] + [question_line(task)])


def few_shot_exact_match(model, tokenizer, tasks, shots, k: int = 3, *, max_new_tokens: int = 16,
                         batch_size: int = 32) -> dict:
    """Exact match of a base model prompted in context with `k` solved examples (see `select_shots`)."""
    if k < 0:
        raise ValueError(f"k: {k} solved examples; pass k >= 0")
    shots = list(shots)
    if k and not shots:
        raise ValueError(f"shots: empty but k={k}; pass solved Tasks (e.g. demo_tasks.training_tasks) or k=0")
    prompts = [few_shot_prompt(t, select_shots(t, shots, k)) for t in tasks]
    answers = greedy_answers(model, tokenizer, prompts, chat=False, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    return exact_match_by_kind(answers, tasks)


# --------------------------------------------------------------------------- perplexity


def _scored_rows(data, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row. Rows: id sequences, {"input_ids"[, "labels"]}, or with a tokenizer text/{"text"}."""
    rows = []
    for i, row in enumerate(data):
        if isinstance(row, dict) and "input_ids" in row:
            ids, labels = row["input_ids"], row.get("labels")
        elif isinstance(row, (str, dict)):
            text = row if isinstance(row, str) else row.get("text")
            if not isinstance(text, str):
                raise ValueError(f"data[{i}]: expected token ids, an 'input_ids' field or a 'text' field; "
                                 f"got fields {sorted(row)}")
            if tokenizer is None:
                raise ValueError(f"data[{i}] is text: pass a tokenizer to perplexity(), or pre-tokenised rows")
            ids, labels = tokenizer(text, add_special_tokens=False)["input_ids"], None
        else:
            ids, labels = row, None
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(t) for t in ids]
        labels = list(ids) if labels is None else (labels.tolist() if isinstance(labels, torch.Tensor)
                                                   else [int(t) for t in labels])
        if len(labels) != len(ids):
            raise ValueError(f"data[{i}]: {len(labels)} labels for {len(ids)} input_ids; they must align")
        rows.append((ids, labels))
    return rows


def perplexity(model, tokenizer, data, batch_size: int = 16) -> dict:
    """Perplexity of a causal LM: {"perplexity", "mean_nll"}, pooled over every predicted token.

    `data`: token-id rows (lists, a 2-D tensor), rows with "input_ids" (a datasets.Dataset; a "labels" field with
    -100 marks tokens not to score), or, when `tokenizer` is given, texts or {"text"} rows. `tokenizer` may be None.
    Rows may differ in length. Each row predicts its tokens 2..n from the ones before, as with `labels=input_ids`.
    """
    rows = _scored_rows(data, tokenizer)
    if not rows:
        raise ValueError("data: no rows to score")
    nll_sum, token_count = [], []
    with _inference(model):
        for start in range(0, len(rows), batch_size):
            chunk = [{"input_ids": ids, "labels": labels} for ids, labels in rows[start:start + batch_size]]
            # Right padding with the pad positions masked out: a causal model's real tokens never see them.
            ids, mask, labels = (t.to(model.device) for t in padded_lm_batch(chunk, pad_id=0))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            targets = labels[:, 1:]  # (B, T-1)
            nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
            nll_sum += nll.sum(dim=1).tolist()
            token_count += (targets != IGNORE_INDEX).sum(dim=1).tolist()
    return load_metric("perplexity").compute(nll_sum=nll_sum, token_count=token_count)


# --------------------------------------------------------------------------- reward models


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ValueError(f"{where}: expected a list of {{'role', 'content'}} messages (TRL conversational format), "
                         f"got {type(messages).__name__}")
    return messages


def reward_scores(reward_model, tokenizer, conversations: Sequence[list[dict]], *, batch_size: int = 32
                  ) -> torch.Tensor:
    """Scalar scores (float32, CPU, shape (N,)) of conversations rendered with the chat template.

    `reward_model` is a sequence-classification model with num_labels=1 that reads each row's last real token.
    """
    labels = getattr(reward_model.config, "num_labels", 1)
    if labels != 1:
        raise ValueError(f"reward_model: num_labels={labels}; a reward model scores with num_labels=1")
    _require_pad_token(tokenizer)
    texts = [tokenizer.apply_chat_template(_check_messages(c, f"conversations[{i}]"), tokenize=False)
             for i, c in enumerate(conversations)]
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return score_token_rows(reward_model, rows, tokenizer.pad_token_id, batch_size=batch_size)


def score_token_rows(reward_model, rows: Sequence[Sequence[int]], pad_id: int, *, batch_size: int | None = 32
                     ) -> torch.Tensor:
    """Scalar scores (float32, CPU, shape (N,)) of token-id rows, right-padded `batch_size` rows at a time
    (None: all rows in one batch). The model reads each row's last real token."""
    scores = [torch.empty(0)]
    step = batch_size or max(1, len(rows))
    with _inference(reward_model):
        for start in range(0, len(rows), step):
            ids, mask = (t.to(reward_model.device) for t in padded_batch(rows[start:start + step], pad_id))
            scores.append(reward_model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu())
    return torch.cat(scores)


def pairwise_reward_accuracy(reward_model, tokenizer, pairs: Sequence[dict], *, batch_size: int = 32) -> dict:
    """{"accuracy", "margin"}: how often the chosen conversation scores above the rejected one, and by how much.

    Rows are TRL conversational preference rows {"prompt": messages, "chosen": messages, "rejected": messages};
    "prompt" may be left out when chosen and rejected hold the whole conversation.
    """
    chosen, rejected = [], []
    for i, row in enumerate(pairs):
        missing = {"chosen", "rejected"} - set(row)
        if missing:
            raise ValueError(f"pairs[{i}]: missing {sorted(missing)}; rows need 'chosen' and 'rejected' "
                             f"(and usually 'prompt') as message lists")
        prompt = _check_messages(row.get("prompt", []), f"pairs[{i}]['prompt']")
        chosen.append(prompt + _check_messages(row["chosen"], f"pairs[{i}]['chosen']"))
        rejected.append(prompt + _check_messages(row["rejected"], f"pairs[{i}]['rejected']"))
    return load_metric("reward_accuracy").compute(
        chosen_scores=reward_scores(reward_model, tokenizer, chosen, batch_size=batch_size).tolist(),
        rejected_scores=reward_scores(reward_model, tokenizer, rejected, batch_size=batch_size).tolist())


def win_rate_vs_baseline(reward_model, tokenizer, prompts: Sequence, answers: Sequence[str],
                         baseline_answers: Sequence[str], *, batch_size: int = 32) -> dict:
    """{"win_rate", "wins", "ties", "losses"}: how often the reward model prefers `answers` to `baseline_answers`.

    `prompts` are user strings or message lists; answers come e.g. from `greedy_answers` of the policy and of the
    model it started from.
    """
    if not len(prompts) == len(answers) == len(baseline_answers):
        raise ValueError(f"win_rate_vs_baseline: {len(prompts)} prompts, {len(answers)} answers and "
                         f"{len(baseline_answers)} baseline_answers; pass one of each per prompt")

    def chats(replies):
        turns = [[{"role": "user", "content": p}] if isinstance(p, str) else _check_messages(p, f"prompts[{i}]")
                 for i, p in enumerate(prompts)]
        return [t + [{"role": "assistant", "content": r}] for t, r in zip(turns, replies)]

    ours = reward_scores(reward_model, tokenizer, chats(answers), batch_size=batch_size)
    theirs = reward_scores(reward_model, tokenizer, chats(baseline_answers), batch_size=batch_size)
    return load_metric("win_rate").compute(scores=ours.tolist(), baseline_scores=theirs.tolist())
