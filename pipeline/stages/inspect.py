"""`pipeline data inspect --config STAGE.yaml`: samples rendered exactly as the stage's trainer will see them.

The stage is read from the config's file name (`sft.yaml`, `sft_qlora.yaml`, `dpo_hh.yaml`, …) unless given. The
dataset block is resolved the way the stage resolves it (validation, cleaning, dedup, split), the tokenizer is the
one the stage would load, and each sample shows its token count, which tokens carry loss, and whether `max_length`
(or the block size) cuts it. A final line counts truncated rows over the whole training split.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError

# stage -> (its module and arguments class, the trainer config class): what the stage's recipe parses.
_STAGE_TYPES = {
    "pretrain": ("pipeline.stages.pretrain:PretrainArguments", "transformers:TrainingArguments"),
    "sft": ("pipeline.stages.sft:SFTArguments", "trl:SFTConfig"),
    "classify": ("pipeline.stages.classify:ClassifyArguments", "transformers:TrainingArguments"),
    "reward": ("pipeline.stages.reward:RewardArguments", "trl:RewardConfig"),
    "dpo": ("pipeline.stages.dpo:DPOArguments", "trl:DPOConfig"),
    "ppo": ("pipeline.stages.ppo:PPOArguments", "pipeline.stages.ppo:PPOConfig"),
    "grpo": ("pipeline.stages.grpo:GRPOArguments", "trl:GRPOConfig"),
}
STAGES = tuple(_STAGE_TYPES)


def _stage_types(stage: str) -> tuple:
    """The dataclasses the stage's recipe parses (imported on demand: each module pulls in its trainer)."""
    import importlib

    def load(spec: str):
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)

    return tuple(load(spec) for spec in _STAGE_TYPES[stage])


def stage_of(config: str | Path, stage: str | None = None) -> str:
    if stage:
        if stage not in STAGES:
            raise ConfigError(f"--stage: {stage!r} is not one of {', '.join(STAGES)}")
        return stage
    name = Path(config).stem.split("_")[0]
    if name not in STAGES:
        raise ConfigError(f"{config}: cannot tell the stage from the file name; pass --stage ({', '.join(STAGES)})")
    return name


def inspect_stage_config(config: str | Path, *, samples: int = 3, overrides: list[str] | None = None,
                         stage: str | None = None) -> str:
    from pipeline.data.chat_templates import load_chat_tokenizer
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.stages.common import parse_stage_args
    from pipeline.stages.training import resolve_mixture

    stage = stage_of(config, stage)
    args, training = parse_stage_args(_stage_types(stage), ["--config", str(config), *(overrides or [])])
    key = "tokenizer_name_or_path" if getattr(args, "tokenizer_name_or_path", None) else "model_name_or_path"
    source = getattr(args, key)
    try:  # a folder or a Hub id; chat stages with their chat_template choice, as the stage loads it
        tokenizer = (load_tokenizer(source) if stage in ("pretrain", "tokenizer", "classify")
                     else load_chat_tokenizer(source, getattr(args, "chat_template", None)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{config}: {key}: {source} does not exist; inspect uses the tokenizer the stage "
                                f"would load: run the earlier stage first or pass --{key} DIR") from None
    if stage == "pretrain":  # shards already prepared for this config: show them, without reading the corpus
        from pipeline.data.prepare import describe
        from pipeline.stages.training import prepared_data

        prepared = prepared_data(args, tokenizer, training.output_dir, reuse_only=True)
        if prepared is not None:
            return describe(prepared, tokenizer, samples=samples)
    mixture = resolve_mixture(args)
    rows = mixture.train
    limit = getattr(args, "block_size", None) if stage == "pretrain" else getattr(training, "max_length", None)
    limit = limit or getattr(args, "max_length", None)
    lines = [f"stage {stage}: {len(rows)} training rows ({mixture.canonical_format}), tokenizer {source}, "
             f"{'block size' if stage == 'pretrain' else 'max_length'} {limit}"]
    if stage == "pretrain":
        lines += _render_pretrain(rows, tokenizer, limit, samples)
        return "\n".join(lines)
    assistant_only = bool(getattr(training, "assistant_only_loss", False))
    truncated = 0
    for i, row in enumerate(rows):
        text, ids, trained = _render_row(row, tokenizer, assistant_only)
        over = limit is not None and max(len(x) for x in ids) > limit
        truncated += over
        if i < samples:
            lines.append(f"\n--- sample {i + 1}: {' + '.join(str(len(x)) for x in ids)} tokens"
                         + (f", CUT at {limit}" if over else ""))
            lines.append(text)
            if trained is not None:
                lines.append(f"[loss on] {trained!r}")
    lines.append(f"\n{truncated} of {len(rows)} rows exceed max_length {limit} and are cut (or filtered) by the trainer")
    return "\n".join(lines)


def inspect_prepared(folder: str | Path, *, samples: int = 1) -> str:
    """`pipeline data inspect --prepared DIR`: a preparation's counts, shards and decoded blocks."""
    from pipeline.data.prepare import describe, open_prepared
    from pipeline.data.tokenizer import load_tokenizer

    prepared = open_prepared(folder)
    source = prepared.manifest.get("tokenizer_name_or_path")
    tokenizer = load_tokenizer(source) if source and Path(source).is_dir() else None
    return describe(prepared, tokenizer, samples=samples)


def _render_pretrain(rows: list[dict], tokenizer, block_size: int, samples: int) -> list[str]:
    from datasets import Dataset

    from pipeline.data.packing import tokenize_and_pack

    packed, report = tokenize_and_pack(Dataset.from_list(rows), tokenizer, block_size=block_size)
    out = [str(report)]
    for i in range(min(samples, len(packed))):
        out.append(f"\n--- block {i + 1} ({block_size} tokens, loss on every token; "
                   f"{tokenizer.eos_token} separates documents)")
        out.append(tokenizer.decode(packed[i]["input_ids"]))
    return out


def _chat(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                         return_dict=True)["input_ids"]


def _render_row(row: dict, tokenizer, assistant_only: bool):
    """(text as the model sees it, token id lists, the part that carries loss or None when all of it does)."""
    if "messages" in row:
        from pipeline.data.chat_templates import assistant_tokens

        ids, mask = assistant_tokens(tokenizer, row["messages"])
        trained = None
        if assistant_only:
            trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        return tokenizer.decode(ids), [ids], trained
    if "chosen" in row:  # preference: the trainer sees prompt + chosen and prompt + rejected
        prompt = row.get("prompt") or []
        if isinstance(prompt, str):
            chosen, rejected = (tokenizer(prompt + row[k])["input_ids"] for k in ("chosen", "rejected"))
        else:
            chosen, rejected = (_chat(tokenizer, prompt + row[k]) for k in ("chosen", "rejected"))
        text = f"[chosen]   {tokenizer.decode(chosen)}\n[rejected] {tokenizer.decode(rejected)}"
        return text, [chosen, rejected], None
    if "completion" in row:
        if isinstance(row["prompt"], str):
            prompt_ids = tokenizer(row["prompt"])["input_ids"]
            ids = prompt_ids + tokenizer(row["completion"])["input_ids"]
        else:
            prompt_ids = _chat(tokenizer, row["prompt"], generation_prompt=True)
            ids = _chat(tokenizer, row["prompt"] + row["completion"])
        return tokenizer.decode(ids), [ids], tokenizer.decode(ids[len(prompt_ids):])
    if "prompt" in row:  # RL prompts: the policy generates after the assistant header
        prompt = row["prompt"]
        ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else _chat(tokenizer, prompt,
                                                                                     generation_prompt=True)
        reference = f"   (reference answer: {row['answer']!r})" if "answer" in row else ""
        return tokenizer.decode(ids) + reference, [ids], None
    ids = tokenizer(row["text"])["input_ids"]
    label = f"   (label: {row['label']!r})" if "label" in row else ""
    return tokenizer.decode(ids) + label, [ids], None
