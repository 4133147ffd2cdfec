"""Byte-level BPE tokenizer training and the chat template shared by SFT, preference training and generation.

Design decisions that callers rely on:

* Special token ids are fixed: ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|eos|>`` = 2, then the role tokens
  ``<|system|>`` = 3, ``<|user|>`` = 4, ``<|assistant|>`` = 5. Byte tokens and merges follow.
* Every byte is in the base vocabulary, so there is no unknown token: Chinese, emoji or binary junk all encode.
* Every digit is its own token (digits are split before BPE), which keeps arithmetic data position-aligned.
* By default every CJK character is its own pre-token, so merges never fuse a name, a verb and an object into one
  token ("安喜欢红色"): a small vocabulary then spends its merges on byte sequences of single characters.
* The chat template writes one space before each message's content (leading whitespace of the content is
  dropped), as SentencePiece tokenizers do: the first word of a reply is then the same token as that word in
  running text (" green", not "green"), so a model pretrained on plain text starts its chat answers with tokens
  it knows.
* ``tokenizer(text)`` adds NO bos/eos. The chat template adds bos itself, and pretraining packing inserts eos
  between documents itself; adding them here as well would double them.
* ``decode(encode(text)) == text`` exactly: no normaliser, no prefix space, no clean-up of spaces.
* Padding side defaults to right (what training collators expect); generation callers must set
  ``tokenizer.padding_side = "left"`` so the prompts end where generation starts.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.artifacts import is_hub_model_id
from pipeline.errors import ConfigError, DataError

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

# The order is the id assignment: pad is 0 so zero-filled buffers are padding, bos/eos come next.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS.values()]

_BYTE_ALPHABET_SIZE = 256

# The eos token closes every turn, so a model stops generating at the end of its answer. For assistant turns the
# content and that eos sit inside {% generation %} so that the assistant-token mask (and so TRL's
# assistant_only_loss) trains the model to emit the eos as well as the answer. The space before the content is
# inside the generation block too: the model writes " green", the way the word appears mid-sentence.
CHAT_TEMPLATE = (
    "{{- '" + BOS_TOKEN + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '" + ROLE_TOKENS["assistant"] + "\\n' -}}"
    "{%- generation -%}"
    "{{- ' ' + message['content'].lstrip() + '" + EOS_TOKEN + "' -}}"
    "{%- endgeneration -%}"
    "{%- elif message['role'] == 'user' or message['role'] == 'system' -%}"
    "{{- '<|' + message['role'] + '|>\\n ' + message['content'].lstrip() + '" + EOS_TOKEN + "' -}}"
    "{%- else -%}"
    "{{- raise_exception('Unknown chat role \"' + message['role'] + '\"; expected system, user or assistant.') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + ROLE_TOKENS["assistant"] + "\\n' -}}"
    "{%- endif -%}"
)


def _non_empty_texts(texts: Iterable[str]) -> Iterator[str]:
    """Yield the non-empty strings of ``texts``, failing early on anything that is not a string."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer expects strings, got {type(text).__name__}")
        if text:
            yield text


# CJK Unified Ideographs (+ extension A) and the compatibility block: the characters Chinese text is written in.
_CJK_CHARACTER = r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"


def _build_backend(split_cjk_characters: bool = True) -> Tokenizer:
    """An untrained byte-level BPE tokenizer with per-digit (and per-CJK-character) splitting, lossless decoding."""
    tokenizer = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(_CJK_CHARACTER), behavior="isolated")] if split_cjk_characters else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *splits,
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Untrimmed offsets keep every character (leading spaces included) mapped to a token, which the assistant-mask
    # computation in apply_chat_template depends on.
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    return tokenizer


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    show_progress: bool = True,
    padding_side: str = "right",
    split_cjk_characters: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    ``vocab_size`` counts the special tokens and the 256 byte tokens; what is left becomes merges. The result carries
    bos/eos/pad tokens and :data:`CHAT_TEMPLATE`, and does not add bos/eos when called on plain text.
    Raises ``ValueError`` when ``vocab_size`` cannot hold the bytes and special tokens, or when ``texts`` is empty.
    """
    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: it must be at least {minimum} "
            f"({_BYTE_ALPHABET_SIZE} byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

    stream = _non_empty_texts(texts)
    first = next(stream, None)
    if first is None:
        raise DataError("cannot train a tokenizer: the text iterator yielded no non-empty text")

    backend = _build_backend(split_cjk_characters)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(itertools.chain([first], stream), trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a folder saved with ``save_pretrained`` or from a Hub id (``org/name``); raises
    ``FileNotFoundError`` naming ``path`` if neither holds one."""
    local = Path(path)
    if local.is_dir():
        if not (local / "tokenizer.json").is_file() and not (local / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"{local} has no tokenizer.json; save the tokenizer with save_pretrained first")
        return AutoTokenizer.from_pretrained(local)
    text = str(path)
    if not is_hub_model_id(text):
        raise FileNotFoundError(f"no saved tokenizer directory at {path}")
    try:
        return AutoTokenizer.from_pretrained(text)
    except OSError as e:
        raise FileNotFoundError(f"no saved tokenizer directory at {path}, and no Hub tokenizer {text!r} "
                                f"could be loaded ({str(e).splitlines()[0]})") from None
