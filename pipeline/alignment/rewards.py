"""Reward functions with TRL's GRPO/RLOO signature: `f(prompts, completions, completion_ids, **columns) -> list`."""

from __future__ import annotations

from typing import Callable


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def verifier_reward(verify: Callable[[str, str], bool], answer_column: str = "answer") -> Callable:
    """1.0 when `verify(completion, the row's reference answer)` holds, else 0.0."""

    def verifier(prompts, completions, completion_ids=None, **columns):
        references = columns[answer_column]
        return [float(verify(_text(c), ref)) for c, ref in zip(completions, references)]

    verifier.__name__ = "verifier"
    return verifier


def missing_eos_penalty(eos_token_id: int | list[int], penalty: float = -1.0) -> Callable:
    """`penalty` for a completion that never emitted EOS (cut at the length limit), else 0.0. `eos_token_id` may list
    several stop tokens (the chat template's end of turn and eos): any of them ends the completion.

    The chat template closes every turn with EOS, so a reward model scoring the rendered chat would otherwise see a
    clean ending on a truncated answer.
    """

    stops = set(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else {eos_token_id}

    def missing_eos(prompts, completions, completion_ids, **columns):
        return [0.0 if stops.intersection(ids) else penalty for ids in completion_ids]

    missing_eos.__name__ = "missing_eos"
    return missing_eos
