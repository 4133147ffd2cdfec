"""Preference pairs from the policy's own mistakes: chosen = the reference answer, rejected = a sampled wrong one.

DPO on off-policy synthetic pairs hurt the demo model; pairs whose rejected side is what the policy actually says
moved it the right way (docs/experiments.md). Needs prompts with reference answers and a verifier.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from pipeline.data.chat_templates import stop_token_ids
from pipeline.data.padding import padded_batch


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: list[list[dict]], *, samples: int, temperature: float,
                   max_new_tokens: int, batch_size: int = 64, seed: int = 0) -> list[list[str]]:
    """`samples` sampled answers per conversational prompt (chat template, stop at EOS)."""
    torch.manual_seed(seed)
    model.eval()
    answers: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in chunk]
        rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids, mask = (t.to(model.device) for t in padded_batch(rows, tokenizer.pad_token_id, side="left"))
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=samples,
                             eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        answers += [[d.strip() for d in decoded[i * samples:(i + 1) * samples]] for i in range(len(chunk))]
    return answers


def on_policy_pairs(model, tokenizer, rows: list[dict], verify: Callable[[str, str], bool], *, samples: int = 4,
                    temperature: float = 1.0, max_new_tokens: int = 16, seed: int = 0,
                    fallback: Callable[[dict, random.Random], str] | None = None) -> tuple[list[dict], dict]:
    """Pairs for rows {"prompt": [turns], "answer": reference}; returns (pairs, counts).

    A prompt where every sample was right gives no pair unless `fallback(row, rng)` supplies a wrong answer.
    """
    rng = random.Random(seed)
    sampled = sample_answers(model, tokenizer, [r["prompt"] for r in rows], samples=samples,
                             temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    pairs, counts = [], {"prompts": len(rows), "with_policy_mistake": 0, "fallback": 0, "skipped": 0}
    for row, answers in zip(rows, sampled):
        wrong = [a for a in answers if a and not verify(a, row["answer"])]
        if wrong:
            counts["with_policy_mistake"] += 1
            rejected = rng.choice(wrong)
        elif fallback is not None:
            counts["fallback"] += 1
            rejected = fallback(row, rng)
        else:
            counts["skipped"] += 1
            continue
        pairs.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["answer"]}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs, counts
