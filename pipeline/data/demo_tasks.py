"""A seeded, bilingual world of small verifiable tasks: the embedded data of the demo.

Each task has a prompt and one correct answer, in English or Chinese templates, so every stage can be scored by
exact match. Sizes follow what a ~2-5M-parameter model learns on two CPU cores in minutes: 2-digit + 1-digit
addition, reversing and sorting 2-4 letters, counting a letter in a short string, and recalling one of two facts
given in the prompt. Letters are space-separated so each is one token.
"""

import random
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
COLOURS = {"red": "红", "blue": "蓝", "green": "绿", "yellow": "黄", "black": "黑", "white": "白"}
NAMES = {"Ann": "安", "Bob": "鲍勃", "Cai": "蔡", "Dan": "丹", "Eve": "伊芙", "Fay": "菲"}
TASKS = ("add", "reverse", "sort", "count", "lookup")


@dataclass(frozen=True)
class Task:
    kind: str  # one of TASKS
    language: str  # "en" or "zh"
    prompt: str
    answer: str


def _letters(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(LETTERS, rng.randint(low, high))


def make_task(kind: str, rng: random.Random, language: str) -> Task:
    zh = language == "zh"
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        prompt = f"{a} 加 {b} 等于多少？" if zh else f"What is {a} plus {b}?"
        answer = str(a + b)
    elif kind in ("reverse", "sort"):
        letters = _letters(rng, 2, 4)
        shown = " ".join(letters)
        if kind == "reverse":
            prompt = f"把 {shown} 倒过来。" if zh else f"Reverse {shown}."
            answer = " ".join(reversed(letters))
        else:
            prompt = f"把 {shown} 排序。" if zh else f"Sort {shown}."
            answer = " ".join(sorted(letters))
    elif kind == "count":
        pool = rng.sample(LETTERS, 2)
        letters = [rng.choice(pool) for _ in range(rng.randint(3, 6))]
        target = rng.choice(pool)
        shown = " ".join(letters)
        prompt = f"{shown} 里有几个 {target}？" if zh else f"How many {target} in {shown}?"
        answer = str(letters.count(target))
    elif kind == "lookup":
        people = rng.sample(sorted(NAMES), 2)
        colours = rng.sample(sorted(COLOURS), 2)
        asked = rng.randrange(2)
        if zh:
            facts = "，".join(f"{NAMES[p]}喜欢{COLOURS[c]}色" for p, c in zip(people, colours))
            prompt = f"{facts}。{NAMES[people[asked]]}喜欢什么颜色？"
            answer = COLOURS[colours[asked]] + "色"
        else:
            facts = ", ".join(f"{p} likes {c}" for p, c in zip(people, colours))
            prompt = f"{facts}. What colour does {people[asked]} like?"
            answer = colours[asked]
    else:
        raise ValueError(f"kind: unknown task {kind!r}; use one of {list(TASKS)}")
    return Task(kind, language, prompt, answer)


def sample_tasks(n: int, seed: int, kinds: tuple[str, ...] = TASKS) -> list[Task]:
    """`n` tasks, kinds in rotation, languages alternating; the same seed gives the same list."""
    rng = random.Random(seed)
    return [make_task(kinds[i % len(kinds)], rng, "zh" if (i // len(kinds)) % 2 else "en") for i in range(n)]


def qa_line(task: Task) -> str:
    """The plain-text form used in pretraining and few-shot prompts: question and answer on one line."""
    sep = "答：" if task.language == "zh" else "A: "
    return f"{task.prompt} {sep}{task.answer}"


def pretraining_corpus(n_docs: int, seed: int, lines_per_doc: int = 8) -> list[str]:
    """Documents of question-answer lines: the text a base model is pretrained on."""
    tasks = sample_tasks(n_docs * lines_per_doc, seed)
    return ["\n".join(qa_line(t) for t in tasks[i:i + lines_per_doc]) for i in range(0, len(tasks), lines_per_doc)]
