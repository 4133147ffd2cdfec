"""Format detection and normalisation of raw rows into TRL's canonical formats.

Canonical formats (DESIGN.md): `text` {"text"}; `messages` {"messages": [{"role", "content"}, ...]};
`prompt_completion` {"prompt", "completion"}; `preference` {"prompt": [...], "chosen": [...], "rejected": [...]}
(conversational); `classification` {"text", "label"}. Input formats map onto them:

| input format       | looks like                                         | canonical          |
| ------------------ | -------------------------------------------------- | ------------------ |
| text               | {"text"} or a line/paragraph of a .txt file        | text               |
| poetry             | {"paragraphs": [...]} or {"content": [...]}        | text               |
| alpaca             | {"instruction", "input", "output"}                 | messages           |
| sharegpt           | {"conversations": [{"from", "value"}, ...]}        | messages           |
| messages           | {"messages": [{"role", "content"}, ...]}           | messages           |
| prompt_completion  | {"prompt", "completion"}                           | prompt_completion  |
| preference         | {"prompt"?, "chosen", "rejected"}                  | preference         |
| hh                 | {"chosen", "rejected"} as "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts | preference |
| classification     | {"text", "label"}                                  | classification     |
| seed_tasks         | {"instruction", "instances": [{"input", "output"}]} | prompt_completion (one row per instance) |

A normaliser raises `RowProblem(field, problem, fix)` for a row it cannot use; the validator turns that into
`path:line: field: problem (fix)`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Mapping

from pipeline.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
TEXT_LIST_FIELDS = ("paragraphs", "content")  # the chinese-poetry shapes: a poem or chapter as a list of lines
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")

CANONICAL = {"text": "text", "poetry": "text", "alpaca": "messages", "sharegpt": "messages", "messages": "messages",
             "prompt_completion": "prompt_completion", "preference": "preference", "hh": "preference",
             "classification": "classification", "seed_tasks": "prompt_completion"}
FORMATS = tuple(CANONICAL)


class RowProblem(DataError):
    """A row that cannot be used: which field, what is wrong, how to fix it."""

    def __init__(self, field: str, problem: str, fix: str):
        super().__init__(f"{field}: {problem} ({fix})")
        self.field, self.problem, self.fix = field, problem, fix


def detect_format(row: Any) -> str | None:
    """The input format a raw row looks like, or None when nothing matches."""
    if isinstance(row, str):
        return "text"
    if not isinstance(row, Mapping):
        return None
    keys = set(row)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"chosen", "rejected"} <= keys:
        chosen = row["chosen"]
        if "prompt" not in keys and isinstance(chosen, str) and chosen.lstrip("\n").startswith("Human:"):
            return "hh"
        return "preference"
    if {"instruction", "instances"} <= keys:
        return "seed_tasks"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    if any(isinstance(row.get(k), list) for k in TEXT_LIST_FIELDS):
        return "poetry"
    return None


def apply_field_map(row: Any, fields: Mapping[str, str] | None) -> Any:
    """Rename source keys to the names a format expects: `fields` maps expected name → source key."""
    if not fields or not isinstance(row, Mapping):
        return row
    out = dict(row)
    for target, source in fields.items():
        if source not in row:
            raise RowProblem(source, f"missing (mapped to {target!r} by the field map)",
                             f"check the field map {target}={source} against this row's keys {sorted(row)}")
        out[target] = out.pop(source) if source != target else row[source]
    return out


def normalize(row: Any, fmt: str) -> list[dict[str, Any]]:
    """Canonical rows for one raw row (most formats give exactly one; seed_tasks one per instance)."""
    if fmt not in NORMALIZERS:
        raise ValueError(f"format: unknown {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "text" and not isinstance(row, Mapping):
        raise RowProblem("(row)", f"is a {type(row).__name__}, not an object", f"format {fmt} needs JSON objects")
    out = NORMALIZERS[fmt](row)
    return out if isinstance(out, list) else [out]


# --------------------------------------------------------------------------- field checks


def _text(row: Mapping, key: str, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise RowProblem(key, "missing", f"add a {key!r} field or map one with --field {key}=<your key>")
    value = row[key]
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise RowProblem(key, f"expected text, got {type(value).__name__}", "store it as a JSON string")
    if not allow_empty and not value.strip():
        raise RowProblem(key, "empty", "remove the row or fill the field")
    return value


def _messages(value: Any, key: str, role_key: str = "role", content_key: str = "content",
              roles: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowProblem(key, "expected a non-empty list of turns", f"give [{{{role_key!r}: ..., {content_key!r}: ...}}, ...]")
    out = []
    for i, turn in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
            raise RowProblem(where, f"expected an object with {role_key!r} and {content_key!r}", "fix this turn")
        role = turn[role_key]
        role = (roles or {r: r for r in ROLES}).get(role.lower() if isinstance(role, str) else role)
        if role is None:
            allowed = sorted(roles or ROLES)
            raise RowProblem(f"{where}.{role_key}", f"unknown role {turn[role_key]!r}", f"use one of {allowed}")
        content = turn[content_key]
        if not isinstance(content, str):
            raise RowProblem(f"{where}.{content_key}", f"expected text, got {type(content).__name__}", "store it as a string")
        if not content.strip():
            raise RowProblem(f"{where}.{content_key}", "empty", "remove the turn or the row")
        out.append({"role": role, "content": content})
    return out


def _check_dialogue(messages: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or body[-1]["role"] != "assistant":
        raise RowProblem(key, "does not end with an assistant turn", "the last turn must be the answer to train on")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise RowProblem(key, f"turn {i + len(messages) - len(body)} is {turn['role']!r} where {expected!r} belongs",
                             "alternate user and assistant turns (one optional system turn first)")
    return messages


# --------------------------------------------------------------------------- normalisers


def _from_text(row: Any) -> dict:
    if isinstance(row, str):
        if not row.strip():
            raise RowProblem("text", "empty", "remove the blank record")
        return {"text": row}
    return {"text": _text(row, "text")}


def _from_poetry(row: Mapping) -> dict:
    key = next((k for k in TEXT_LIST_FIELDS if k in row), None)
    if key is None:
        raise RowProblem("paragraphs", "missing", "give the lines as 'paragraphs' or 'content', or map with --field")
    lines = row[key]
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise RowProblem(key, "expected a list of strings", "store the lines as a JSON array of strings")
    text = "\n".join(x for x in lines if x.strip())
    if not text:
        raise RowProblem(key, "empty", "remove the row")
    title = row.get("title") or row.get("chapter")
    return {"text": f"{title}\n{text}" if isinstance(title, str) and title.strip() else text}


def _from_alpaca(row: Mapping) -> dict:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", allow_empty=True) if "input" in row else ""
    output = _text(row, "output")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


def _from_sharegpt(row: Mapping) -> dict:
    turns = _messages(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    return {"messages": _check_dialogue(turns, "conversations")}


def _from_messages(row: Mapping) -> dict:
    return {"messages": _check_dialogue(_messages(row.get("messages"), "messages"), "messages")}


def _from_prompt_completion(row: Mapping) -> dict:
    if isinstance(row.get("prompt"), list):
        prompt = _messages(row["prompt"], "prompt")
        completion = _messages(row.get("completion"), "completion")
        return {"prompt": prompt, "completion": completion}
    return {"prompt": _text(row, "prompt"), "completion": _text(row, "completion")}


def _answer(value: Any, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(key, "empty", "remove the row or give an answer")
        return [{"role": "assistant", "content": value}]
    return _messages(value, key)


def _from_preference(row: Mapping) -> dict:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowProblem(key, "missing", "preference rows need 'chosen' and 'rejected'")
    if "prompt" in row:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": _text(row, "prompt")}] if not isinstance(prompt, list) \
            else _messages(prompt, "prompt")
        chosen, rejected = _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")
    else:  # implicit prompt: the conversations share their opening turns
        chosen, rejected = _messages(row["chosen"], "chosen"), _messages(row["rejected"], "rejected")
        prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
    return _checked_pair(prompt, chosen, rejected)


def _split_shared_prefix(chosen: list, rejected: list) -> tuple[list, list, list]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _checked_pair(prompt: list, chosen: list, rejected: list) -> dict:
    if not prompt or prompt[-1]["role"] != "user":
        raise RowProblem("prompt", "does not end with a user turn", "the shared prompt must end with the question")
    if chosen == rejected:
        raise RowProblem("rejected", "identical to chosen", "a pair without a difference teaches nothing: drop it")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer:
            raise RowProblem(key, "has no turns after the shared prompt", "give both conversations a final answer")
        if answer[0]["role"] != "assistant":
            raise RowProblem(key, f"diverges at a {answer[0]['role']!r} turn, not at an assistant answer",
                             "make both conversations share every turn before the final answers")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def parse_hh_transcript(text: str, key: str) -> list[dict[str, str]]:
    """Turns of an Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    if not isinstance(text, str):
        raise RowProblem(key, f"expected a transcript string, got {type(text).__name__}", "store it as a string")
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowProblem(key, "text before the first 'Human:' turn", "start the transcript with '\\n\\nHuman:'")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
             for who, body in zip(parts[1::2], parts[2::2])]
    if not any(t["role"] == "assistant" for t in turns):
        raise RowProblem(key, "has no 'Assistant:' turn", "each transcript needs the answer being compared")
    return turns


def _from_hh(row: Mapping) -> dict:
    chosen = parse_hh_transcript(row.get("chosen"), "chosen")
    rejected = parse_hh_transcript(row.get("rejected"), "rejected")
    prompt, chosen_tail, rejected_tail = _split_shared_prefix(chosen, rejected)
    # An empty final answer ("Assistant:" with nothing after) is a real HH case: keep the turn, note nothing.
    return _checked_pair(prompt, chosen_tail, rejected_tail)


def _from_classification(row: Mapping) -> dict:
    text = _text(row, "text")
    if "label" not in row:
        raise RowProblem("label", "missing", "add the class as an integer id or a name")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, str) and not label.strip()):
        raise RowProblem("label", f"expected an integer id or a class name, got {label!r}", "fix the label")
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():  # CSV cells arrive as text
        label = int(label)
    return {"text": text, "label": label}


def _from_seed_tasks(row: Mapping) -> list[dict]:
    instruction = _text(row, "instruction")
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RowProblem("instances", "expected a non-empty list of {input, output}", "fix the row")
    out = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, Mapping):
            raise RowProblem(f"instances[{i}]", "expected an object", "give {'input': ..., 'output': ...}")
        extra = _text(inst, "input", allow_empty=True) if "input" in inst else ""
        output = _text(inst, "output")
        out.append({"prompt": f"{instruction}\n\n{extra}" if extra.strip() else instruction, "completion": output})
    return out


NORMALIZERS: dict[str, Callable[[Any], dict | list[dict]]] = {
    "text": _from_text, "poetry": _from_poetry, "alpaca": _from_alpaca, "sharegpt": _from_sharegpt,
    "messages": _from_messages, "prompt_completion": _from_prompt_completion, "preference": _from_preference,
    "hh": _from_hh, "classification": _from_classification, "seed_tasks": _from_seed_tasks,
}


def iter_texts(row: Mapping[str, Any]) -> Iterator[str]:
    """Every piece of free text in a canonical row (for cleaning, dedup and statistics)."""
    for key in ("text", "prompt", "completion", "messages", "chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from (turn["content"] for turn in value)
