"""Chat templates for any model family: choosing one, the end-of-turn token, and the assistant-token mask.

A stage's `chat_template` key picks the template: the tokenizer's own (default), a built-in name (see
`BUILTIN_TEMPLATES`), or a path to a Jinja file. Templates need no `{% generation %}` markers: the reply tokens are
found by rendering the conversation up to each assistant turn with `add_generation_prompt=True` and taking what the
next turn adds, after checking that the template keeps earlier turns unchanged (a template that rewrites history
cannot be masked this way, and is refused with the reason).

    tokenizer = load_chat_tokenizer("Qwen/Qwen2.5-0.5B", chat_template=None)
    ids, mask = assistant_tokens(tokenizer, messages)      # mask: reply tokens + end-of-turn token
    model.generate(..., eos_token_id=stop_token_ids(tokenizer))
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.data.tokenizer import CHAT_TEMPLATE, load_tokenizer
from pipeline.errors import ConfigError

# Built-in templates, written for training: each turn renders the same whether or not later turns follow, and an
# assistant turn ends with an end-of-turn token the model learns to emit. The special tokens each one needs are
# added to a tokenizer that lacks them (the model's embeddings grow to match).
BUILTIN_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pipeline": (CHAT_TEMPLATE, ()),
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
        ("<|im_start|>", "<|im_end|>")),
    "llama3": (
        "{{- bos_token or '' -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "zephyr": (
        "{%- for message in messages -%}"
        "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}",
        ()),
    "mistral": (
        "{{- bos_token or '' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{- '[INST] ' + message['content'] + ' [/INST]' + eos_token -}}"
        "{%- elif message['role'] == 'user' -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}"
        "{%- endfor -%}",
        ("[INST]", "[/INST]")),
    "gemma": (
        "{{- bos_token or '' -}}"
        "{%- for message in messages -%}"
        "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
        " + message['content'] | trim + '<end_of_turn>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}",
        ("<start_of_turn>", "<end_of_turn>")),
}

_PROBE_REPLY = "Zq7 reply"  # an unlikely reply, found again in the rendering to see what follows it


class ChatTemplateError(ConfigError):
    """A chat template that is missing, unknown, or cannot be used for assistant-only training."""


def load_chat_tokenizer(path: str, chat_template: str | None = None, *, key: str = "chat_template"):
    """The tokenizer at `path` (a folder or a Hub id) with the chosen chat template and a pad token."""
    tokenizer = load_tokenizer(path)
    use_chat_template(tokenizer, chat_template, key=key)
    ensure_pad_token(tokenizer)
    return tokenizer


def use_chat_template(tokenizer, choice: str | None, *, key: str = "chat_template") -> list[str]:
    """Set `tokenizer.chat_template` from `choice` (None: keep the tokenizer's own); returns the special tokens
    added for a built-in template (the caller resizes the model's embeddings)."""
    if choice is None:
        if not tokenizer.chat_template:
            raise ChatTemplateError(
                f"{key}: the tokenizer has no chat template (a base model); choose one with `{key}: NAME` "
                f"(built-in: {', '.join(BUILTIN_TEMPLATES)}) or `{key}: path/to/template.jinja`")
        return []
    if choice in BUILTIN_TEMPLATES:
        template, needed = BUILTIN_TEMPLATES[choice]
        missing = [t for t in needed if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        tokenizer.chat_template = template
        return missing
    path = Path(choice)
    if path.suffix in (".jinja", ".j2", ".txt") or path.exists():
        if not path.is_file():
            raise ChatTemplateError(f"{key}: no template file at {path}")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
        return []
    raise ChatTemplateError(f"{key}: {choice!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
                            f"nor a .jinja file")


def ensure_pad_token(tokenizer) -> None:
    """A tokenizer without a pad token gets one that never appears in text: an unused reserved token when the
    vocabulary has one, else unk, else eos (padding is masked out of every loss, so eos stays trainable)."""
    if tokenizer.pad_token is not None:
        return
    added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
    unused = sorted((t for t in added if "pad" in t.lower() or t.startswith("<|reserved_special_token")),
                    key=added.get)
    choice = unused[0] if unused else tokenizer.unk_token or tokenizer.eos_token
    if choice is None:
        raise ChatTemplateError("tokenizer: no pad, unk or eos token to pad with; add a pad token to the tokenizer")
    tokenizer.pad_token = choice
    print(f"pad token: the tokenizer has none; padding with {choice!r} (masked out of every loss)")


def _render(tokenizer, messages: Sequence[dict], *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def end_of_turn_token(tokenizer) -> int | None:
    """The token a template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, eos ...), or None when the
    turn ends with no special token."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    text = _render(tokenizer, messages)
    at = text.rfind(_PROBE_REPLY)
    tail = text[at + len(_PROBE_REPLY):].strip() if at >= 0 else ""
    if not tail:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1]
    return first[0] if first and first[0] in special else None


def stop_token_ids(tokenizer) -> list[int]:
    """What ends a reply: the end-of-turn token, then eos (the same when a template closes turns with eos). A
    tokenizer without a chat template stops at eos alone."""
    ids = [end_of_turn_token(tokenizer) if getattr(tokenizer, "chat_template", None) else None, tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generation_eos(tokenizer) -> int | list[int]:
    """`generation_config.eos_token_id` for a model served with this tokenizer: one id, or the list of stop ids."""
    stops = stop_token_ids(tokenizer)
    return stops[0] if len(stops) == 1 else stops


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "generation" in template and "endgeneration" in template


def assistant_tokens(tokenizer, messages: Sequence[dict], *, where: str = "row") -> tuple[list[int], list[int]]:
    """`(input_ids, mask)` for a conversation: mask is 1 on every assistant reply's tokens and the end-of-turn token
    that closes it, 0 elsewhere. The ids are exactly `apply_chat_template(messages, tokenize=True)`. A template with
    `{% generation %}` markers gives its own mask; any other is located by rendering (see the module docstring).

    Raises ChatTemplateError (naming `where`) when the template renders an earlier turn differently once later
    turns follow, which would make the training context differ from what the model sees when it answers.
    """
    if has_generation_markers(tokenizer.chat_template):  # the template marks its replies itself
        encoded = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        return encoded["input_ids"], encoded["assistant_masks"]
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("tokenizer: assistant-only loss needs a fast tokenizer (tokenizer.json) for offsets")
    full = _render(tokenizer, messages)
    regions = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not upto.startswith(prompt):
            raise ChatTemplateError(
                f"{where}: the chat template renders the prompt of assistant turn {i} differently with and without "
                f"the reply ({_first_difference(prompt, upto)}), so the reply cannot be located; choose a built-in "
                f"template with `chat_template: NAME` ({', '.join(BUILTIN_TEMPLATES)}) or set assistant_only_loss: false")
        if not full.startswith(upto.rstrip()):
            raise ChatTemplateError(
                f"{where}: the chat template rewrites assistant turn {i} once later turns follow "
                f"({_first_difference(upto, full)}); training on it would not match what the model sees when it "
                f"answers. Choose a built-in template with `chat_template: NAME` ({', '.join(BUILTIN_TEMPLATES)})")
        regions.append((len(prompt), len(upto.rstrip())))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    mask = [int(any(start <= begin < end for start, end in regions)) for begin, _ in offsets]
    return ids, mask


def _first_difference(a: str, b: str) -> str:
    at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {at}: {a[at:at + 30]!r} vs {b[at:at + 30]!r}"


def tokenize_for_assistant_loss(rows: Sequence[dict], tokenizer, max_length: int | None = None
                                ) -> tuple[list[dict], int]:
    """SFT rows (`messages`) as `{input_ids, assistant_masks}`, cut to `max_length` tokens; rows left with no reply
    token (an empty reply, or every reply beyond `max_length`) are dropped and counted."""
    out, empty = [], 0
    for n, row in enumerate(rows):
        ids, mask = assistant_tokens(tokenizer, row["messages"], where=f"row {n}")
        ids, mask = ids[:max_length], mask[:max_length]
        if 1 not in mask:
            empty += 1
            continue
        out.append({"input_ids": ids, "assistant_masks": mask})
    if rows and not out:
        raise ChatTemplateError(f"max_length: every one of the {len(rows)} rows has its replies beyond "
                                f"max_length={max_length} tokens (or empty); raise max_length")
    return out, empty


# Conversations a template is checked on before export: system prompts, several turns, spaces and newlines at the
# edges of replies, non-ASCII text.
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Green."}, {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Blue, or perhaps teal."}],
    [{"role": "user", "content": "Write two lines."}, {"role": "assistant", "content": "First line.\nSecond line."}],
    [{"role": "user", "content": "Übersetze: cat"}, {"role": "assistant", "content": " Katze (die)"}],
)


def check_train_serve_parity(tokenizer, conversations=PROBE_CONVERSATIONS) -> int:
    """Check that, for every assistant turn, the tokens training masks in equal what serving produces:
    `apply_chat_template(history, add_generation_prompt=True)` followed by the reply's tokens and the end-of-turn
    token. Returns the number of turns checked; raises ChatTemplateError naming the row and the first differing
    token (template drift between training and serving is otherwise silent)."""
    stops = stop_token_ids(tokenizer)
    checked = 0
    for n, messages in enumerate(conversations):
        ids, mask = assistant_tokens(tokenizer, messages, where=f"probe conversation {n}")
        spans, start = [], None
        for k, bit in enumerate(mask + [0]):
            if bit and start is None:
                start = k
            elif not bit and start is not None:
                spans.append((start, k))
                start = None
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(spans) != len(turns):
            raise ChatTemplateError(f"probe conversation {n}: {len(turns)} assistant turns but {len(spans)} masked "
                                    f"spans; the template does not separate replies from prompts")
        for (begin, end), i in zip(spans, turns):
            prompt = tokenizer.apply_chat_template(list(messages[:i]), tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
            trained_prompt, reply = ids[:begin], ids[begin:end]
            if trained_prompt != prompt:
                raise ChatTemplateError(f"probe conversation {n}, turn {i}: the prompt trained on differs from the "
                                        f"prompt served {_first_token_difference(tokenizer, trained_prompt, prompt)}")
            if not reply or reply[-1] not in stops:
                last = tokenizer.convert_ids_to_tokens(reply[-1:]) if reply else "nothing"
                raise ChatTemplateError(f"probe conversation {n}, turn {i}: the reply trained on ends with {last}, not "
                                        f"an end-of-turn token ({tokenizer.convert_ids_to_tokens(stops)}), so "
                                        f"generation would not learn to stop")
            checked += 1
    return checked


def _first_token_difference(tokenizer, a: list[int], b: list[int]) -> str:
    at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shown = [tokenizer.convert_ids_to_tokens(seq[at:at + 1]) or ["<end>"] for seq in (a, b)]
    return f"at token {at}: {shown[0][0]!r} (trained) vs {shown[1][0]!r} (served)"
