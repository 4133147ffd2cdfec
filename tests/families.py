"""Tiny random checkpoints of third-party model families, each with a tokenizer and chat template shaped like its
family's real one, saved as plain transformers folders (no pipeline manifest), as a Hub download would be."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_TEXT = ["What is 3 plus 4? It is 7.", "Name a colour. Green is a colour.", "Say hello. Hello there, friend!",
         "The quick brown fox jumps over the lazy dog.", "Reply yes or no. Yes."] * 20

# Templates written in each family's shape (not copies): ChatML with a default system prompt and no generation
# markers (Qwen2), header tokens closed by <|eot_id|> (Llama 3), [INST] turns closed by eos (Mistral).
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}")
MISTRAL_TEMPLATE = (
    "{{- bos_token -}}{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '[INST] ' + m['content'] + ' [/INST]' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + eos_token -}}{%- endif -%}{%- endfor -%}")
# A template that moves the system prompt into the last user turn: earlier turns change once later ones follow.
HISTORY_REWRITING_TEMPLATE = (
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{{- '[INST] ' + (messages[0]['content'] + ' ' if loop.last and messages[0]['role'] == 'system' else '')"
    " + m['content'] + ' [/INST]' -}}{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + eos_token -}}"
    "{%- endif -%}{%- endfor -%}")


def _byte_level(special: list[str], vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _metaspace(special: list[str], vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=False, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = sorted(set("".join(_TEXT)) | set("\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!"))
    tok.train_from_iterator(_TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                      initial_alphabet=alphabet))
    return tok


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    if family == "qwen2":
        backend = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                       extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                                       chat_template=QWEN2_TEMPLATE, clean_up_tokenization_spaces=False)
    if family == "llama":
        special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|finetune_right_pad_id|>"]
        return PreTrainedTokenizerFast(tokenizer_object=_byte_level(special), bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>", extra_special_tokens=special[2:],
                                       chat_template=LLAMA3_TEMPLATE, clean_up_tokenization_spaces=False)
    if family == "mistral":
        special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
        return PreTrainedTokenizerFast(tokenizer_object=_metaspace(special), bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", extra_special_tokens=["[INST]", "[/INST]"],
                                       chat_template=MISTRAL_TEMPLATE, clean_up_tokenization_spaces=False)
    if family == "gpt2":  # a base model: no chat template, no pad token
        return PreTrainedTokenizerFast(tokenizer_object=_byte_level(["<|endoftext|>"]), bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


def family_config(family: str, vocab_size: int, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    shape = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "llama":
        return LlamaConfig(**shape, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**shape, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**shape, sliding_window=None, tie_word_embeddings=False)
    return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def save_family(family: str, directory: Path, seed: int = 0) -> Path:
    """A random tiny `family` checkpoint and its tokenizer in `directory` (a plain transformers folder)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = family_tokenizer(family)
    model = AutoModelForCausalLM.from_config(family_config(family, len(tokenizer), tokenizer))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
