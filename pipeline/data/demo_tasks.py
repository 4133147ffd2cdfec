"""A seeded, bilingual world of small verifiable tasks: the embedded data of the demo.

Each task has a prompt and one correct answer, in English or Chinese templates, so every stage can be scored by
exact match. Sizes follow what a ~2-5M-parameter model learns on two CPU cores in minutes: 2-digit + 1-digit
addition, reversing and sorting 2-4 letters, counting a letter in a short string, and picking the larger of two
2-digit numbers. Letters are space-separated so each is one token.

Recalling one of two facts stated in the prompt ("What colour does Dan like, if Ann likes red and Dan likes blue?")
was a task too, and stayed at chance: binding a name to the colour two tokens after it took more than 1600 steps
of that task alone, so a fifth of every stage's data taught nothing and its reward pairs were coin flips.
"""

import random
import re
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASKS = ("add", "reverse", "sort", "count", "compare")


@dataclass(frozen=True)
class Task:
    kind: str  # one of TASKS
    language: str  # "en" or "zh"
    prompt: str
    answer: str
    statement: str = ""  # the same fact as a plain sentence (pretraining text)


def _letters(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(LETTERS, rng.randint(low, high))


def make_task(kind: str, rng: random.Random, language: str) -> Task:
    zh = language == "zh"
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        prompt = f"{a} 加 {b} 等于多少？" if zh else f"What is {a} plus {b}?"
        answer = str(a + b)
        statement = f"{a} 加 {b} 等于 {answer}。" if zh else f"{a} plus {b} is {answer}."
    elif kind in ("reverse", "sort"):
        letters = _letters(rng, 2, 4)
        shown = " ".join(letters)
        if kind == "reverse":
            prompt = f"把 {shown} 倒过来。" if zh else f"Reverse {shown}."
            answer = " ".join(reversed(letters))
            statement = f"{shown} 倒过来是 {answer}。" if zh else f"{shown} backwards is {answer}."
        else:
            prompt = f"把 {shown} 排序。" if zh else f"Sort {shown}."
            answer = " ".join(sorted(letters))
            statement = f"{shown} 排好序是 {answer}。" if zh else f"{shown} in order is {answer}."
    elif kind == "count":
        pool = rng.sample(LETTERS, 2)
        letters = [rng.choice(pool) for _ in range(rng.randint(3, 6))]
        target = rng.choice(pool)
        shown = " ".join(letters)
        prompt = f"{shown} 里有几个 {target}？" if zh else f"How many {target} in {shown}?"
        answer = str(letters.count(target))
        statement = f"{shown} 里有 {answer} 个 {target}。" if zh else f"There are {answer} {target} in {shown}."
    elif kind == "compare":
        a, b = rng.sample(range(10, 100), 2)
        answer = str(max(a, b))
        prompt = f"{a} 和 {b} 哪个大？" if zh else f"Which is larger, {a} or {b}?"
        statement = f"{a} 和 {b} 里 {answer} 大。" if zh else f"Of {a} and {b}, {answer} is larger."
    else:
        raise ValueError(f"kind: unknown task {kind!r}; use one of {list(TASKS)}")
    return Task(kind, language, prompt, answer, statement)


def sample_tasks(n: int, seed: int, kinds: tuple[str, ...] = TASKS) -> list[Task]:
    """`n` tasks, kinds in rotation, languages alternating; the same seed gives the same list."""
    rng = random.Random(seed)
    return [make_task(kinds[i % len(kinds)], rng, "zh" if (i // len(kinds)) % 2 else "en") for i in range(n)]


def qa_line(task: Task) -> str:
    """The plain-text form used in pretraining and few-shot prompts: question and answer on one line."""
    sep = "答：" if task.language == "zh" else "A: "
    return f"{task.prompt} {sep}{task.answer}"


def filler_line(rng: random.Random) -> str:
    """A run of the alphabet or of consecutive numbers: the orders that sorting and adding lean on."""
    if rng.random() < 0.5:
        start = rng.randrange(len(LETTERS) - 3)
        return " ".join(LETTERS[start:start + rng.randint(4, 10)])
    start = rng.randint(1, 100)
    return " ".join(str(n) for n in range(start, start + rng.randint(4, 10)))


def pretraining_corpus(n_docs: int, seed: int, lines_per_doc: int = 8) -> list[str]:
    """The text a base model is pretrained on (held-out prompts excluded): documents of lines, about half
    question-answer lines, 45% the same facts as plain sentences and 5% runs of the alphabet or of numbers.

    The sentences show each operation outside the Q/A frame, and the runs teach letter and number order; with
    question-answer lines alone a 2M-parameter model learned the frame but hardly the operations.
    """
    rng = random.Random(seed + 41)
    tasks = training_tasks(n_docs * lines_per_doc, seed)
    lines = []
    for task in tasks:
        draw = rng.random()
        lines.append(qa_line(task) if draw < 0.5 else task.statement if draw < 0.95 else filler_line(rng))
    return ["\n".join(lines[i:i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]


# --------------------------------------------------------------------------- stage datasets
# Evaluation tasks come from their own seed stream and every training generator skips their prompts, so held-out
# exact match measures generalisation, not recall.

EVAL_SEED_OFFSET = 1_000_003


def eval_tasks(n: int, seed: int = 0) -> list[Task]:
    """Held-out tasks with reference answers (never present in any training set built with the same seed)."""
    return sample_tasks(n, seed + EVAL_SEED_OFFSET)


def training_tasks(n: int, seed: int, *, held_out: int = 300, stream: int = 0) -> list[Task]:
    """`n` tasks that avoid the prompts of `eval_tasks(held_out, seed)`; `stream` separates stages' draws."""
    banned = {t.prompt for t in eval_tasks(held_out, seed)}
    out: list[Task] = []
    batch_seed = seed * 7919 + stream * 104_729
    while len(out) < n:
        out += [t for t in sample_tasks(2 * (n - len(out)) + 10, batch_seed) if t.prompt not in banned]
        batch_seed += 1
    return out[:n]


def wrong_answer(task: Task, rng: random.Random) -> str:
    """A plausible but wrong answer: off by one, the letters unchanged or in the other order, the smaller number."""
    if task.kind in ("add", "count"):
        value = int(task.answer)
        if task.kind == "add":
            options = [value + 1, value - 1, value + 10]
        else:  # "0" must be a rejected answer as often as a chosen one, or a reward model learns that "0" is right
            options = [value + 1, value - 1] if value > 0 else [value + 1, value + 2]
        return str(rng.choice(options))
    if task.kind in ("reverse", "sort"):
        letters = task.answer.split()
        candidates = {" ".join(letters[::-1]), " ".join(sorted(letters)), " ".join(sorted(letters, reverse=True)),
                      " ".join(letters[1:] + letters[:1])} - {task.answer}
        return rng.choice(sorted(candidates))
    if task.kind == "compare":  # mostly the smaller number (the tempting mistake), else the larger one off by one
        smaller = min(int(n) for n in re.findall(r"\d+", task.prompt))
        return str(smaller if rng.random() < 0.75 else int(task.answer) + rng.choice((1, -1)))
    raise ValueError(f"kind: unknown task {task.kind!r}")


def chat(prompt: str, answer: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": prompt}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Chat-format SFT rows {"messages": [user, assistant]}."""
    return [{"messages": chat(t.prompt, t.answer)} for t in training_tasks(n, seed, stream=1)]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversational preference rows: the correct answer is chosen, a plausible wrong one rejected."""
    rng = random.Random(seed + 17)
    return [{"prompt": chat(t.prompt), "chosen": [{"role": "assistant", "content": t.answer}],
             "rejected": [{"role": "assistant", "content": wrong_answer(t, rng)}]}
            for t in training_tasks(n, seed, stream=2)]


def rl_prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompts for online RL, with the reference answer a rule-based verifier checks against."""
    return [{"prompt": chat(t.prompt), "answer": t.answer, "kind": t.kind} for t in training_tasks(n, seed, stream=3)]


def classification_rows(n: int, seed: int = 0) -> list[dict]:
    """(text, label) rows: is the stated answer right (1) or wrong (0)? The demo of a classification head."""
    rng = random.Random(seed + 29)
    rows = []
    for t in training_tasks(n, seed, stream=4):
        correct = rng.random() < 0.5
        answer = t.answer if correct else wrong_answer(t, rng)
        rows.append({"text": qa_line(Task(t.kind, t.language, t.prompt, answer)), "label": int(correct)})
    return rows


def verify(answer: str, reference: str) -> bool:
    """The rule-based verifier: exact match after whitespace normalisation."""
    return " ".join(answer.split()) == " ".join(reference.split())
