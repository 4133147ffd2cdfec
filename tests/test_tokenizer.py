import json

import pytest
from transformers import AutoTokenizer

from pipeline.data.tokenizer import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    load_tokenizer,
    train_tokenizer,
)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "Add 12 and 30 to get 42; multiply 7 by 8 to get 56.",
    "In 1969 the first people walked on the moon.",
    "Tokenizers split text into pieces that a model can read.",
]
CHINESE = [
    "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。",
    "关关雎鸠，在河之洲。窈窕淑女，君子好逑。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "今天是2024年3月15日，天气很好。",
    "三加四等于七，五乘六等于三十。",
]
# Frequent multi-digit numbers: without per-digit splitting BPE would merge them.
DIGITS = [f"{a} + {b} = {a + b}" for a in range(0, 100, 7) for b in range(3, 60, 11)] + ["12345 2024 100 42"] * 50

# Strings the tokenizer must reproduce byte for byte; several contain characters absent from the corpus.
TRICKY = [
    "hello world",
    " leading space",
    "trailing space ",
    "  two  spaces   three    four",
    "line one\nline two\n\nafter blank\n",
    "\ttab\tseparated\t",
    "\r\nwindows line end\r\n",
    "简体中文：我们在学习。",
    "繁體中文：我們在學習。",
    "mixed 中英 text, 123 数字 456!",
    "emoji 😀👍🏽 and family 👨‍👩‍👧",
    "   ",
    "\n",
    "ümlaut, café, naïve, Ωμέγα, привет",
    "code: def f(x):\n    return x ** 2  # square",
    "<|bos|> literal special <|eos|> tokens",
    "space before punctuation , . ! ? and contractions do n't , I 'm",
]


def _corpus():
    # A few hundred lines mixing English, Chinese and arithmetic.
    return (ENGLISH + CHINESE) * 20 + DIGITS


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), vocab_size=400, show_progress=False)


def test_special_token_ids_and_attributes(tok):
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert [tok.convert_tokens_to_ids(ROLE_TOKENS[r]) for r in ("system", "user", "assistant")] == [3, 4, 5]
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.model_max_length == 2048
    assert tok.padding_side == "right"
    assert len(tok) <= 400
    for token in SPECIAL_TOKENS:
        ids = tok.encode(token)
        assert len(ids) == 1, token
        assert ids[0] in tok.all_special_ids
    # Special tokens embedded in running text stay single ids.
    ids = tok.encode(f"a{ROLE_TOKENS['user']}b{EOS_TOKEN}")
    assert ROLE_TOKENS["user"] in tok.convert_ids_to_tokens(ids)
    assert tok.eos_token_id in ids


def test_every_digit_is_its_own_token(tok):
    for digit in "0123456789":
        assert len(tok.encode(digit)) == 1
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert tok.convert_ids_to_tokens(ids) == list("12345")
    # Even digits seen together many times in training never merge.
    assert len(tok.encode("42")) == 2
    assert all(len(tok.decode([i])) == 1 for i in tok.encode("9876543210"))


def test_plain_call_adds_no_bos_or_eos(tok):
    ids = tok("hello")["input_ids"]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids) == "hello"


def test_vocab_has_merges_and_every_byte(tok):
    vocab = tok.get_vocab()
    assert len(vocab) == 400  # the corpus is rich enough to fill the budget with merges
    # A rare character never seen in training still encodes without an unknown token.
    assert tok.decode(tok.encode("龘")) == "龘"
    assert tok.unk_token is None


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"]) == text


def test_batch_padding_is_right_by_default_and_configurable():
    tok = train_tokenizer(_corpus(), vocab_size=300, show_progress=False)
    batch = tok(["a", "a longer sentence"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id
    assert batch["attention_mask"][0][-1] == 0
    left = train_tokenizer(_corpus(), vocab_size=300, show_progress=False, padding_side="left")
    batch = left(["a", "a longer sentence"], padding=True)
    assert batch["input_ids"][0][0] == left.pad_token_id


def _real_texts(data):
    shijing = json.loads((data / "pretrain/shijing.json").read_text(encoding="utf-8"))
    tang = json.loads((data / "pretrain/quan_tang_shi_0.json").read_text(encoding="utf-8"))
    shakespeare = (data / "pretrain/tinyshakespeare.txt").read_text(encoding="utf-8")
    alpaca = json.loads((data / "sft/alpaca_zh_0-3252.json").read_text(encoding="utf-8"))
    return (
        ["\n".join([p["title"], *p["content"]]) for p in shijing],
        ["\n".join([p["title"], p["author"], *p["paragraphs"]]) for p in tang],
        shakespeare.split("\n\n"),
        ["\n".join([r["instruction"], r["input"], r["output"]]) for r in alpaca],
    )


def test_real_data_round_trip(shared_data):
    shijing, tang, shakespeare, alpaca = _real_texts(shared_data)
    train = shijing[:100] + tang[:200] + shakespeare[:1000] + alpaca[:300]
    tok = train_tokenizer(train, vocab_size=1024, show_progress=False)
    assert len(tok) == 1024
    # Held-out texts (never seen in training) plus a few training ones.
    held_out = shijing[-50:] + tang[-100:] + shakespeare[-300:] + alpaca[-300:]
    for text in held_out + train[::50]:
        assert tok.decode(tok.encode(text)) == text
    # The merges learned something: real text compresses well below one token per UTF-8 byte.
    english = "\n\n".join(shakespeare[-300:])
    assert len(tok.encode(english)) < 0.6 * len(english.encode("utf-8"))


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        for text in TRICKY + CHINESE:
            assert loaded.encode(text) == tok.encode(text)
            assert loaded.decode(loaded.encode(text)) == text
        assert loaded.all_special_tokens == tok.all_special_tokens
        assert loaded.all_special_ids == tok.all_special_ids
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
        assert loaded.chat_template == CHAT_TEMPLATE
        assert loaded.model_max_length == tok.model_max_length
        assert loaded.padding_side == "right"
        assert loaded.clean_up_tokenization_spaces is False
        assert loaded("hello")["input_ids"] == tok("hello")["input_ids"]


def test_load_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "用中文说一遍。"},
    {"role": "assistant", "content": " 五。\n就这样 😀"},
]


def test_chat_template_renders_expected_text(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    # One space before each content, whatever leading whitespace the content had.
    assert text == (
        "<|bos|><|system|>\n You are terse.<|eos|>"
        "<|user|>\n What is 2 + 3?<|eos|>"
        "<|assistant|>\n 5<|eos|>"
        "<|user|>\n 用中文说一遍。<|eos|>"
        "<|assistant|>\n 五。\n就这样 😀<|eos|>"
    )
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.eos_token_id) == len(CONVERSATION)
    assert tok.decode(ids) == text


def test_assistant_mask_covers_exactly_assistant_content_and_eos(tok):
    out = tok.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # Split masked tokens into contiguous spans: one span per assistant turn.
    spans, current = [], []
    for token_id, bit in zip(ids, mask):
        if bit:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    expected = [" " + m["content"].lstrip() + EOS_TOKEN for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(span) for span in spans] == expected
    # Every eos that closes an assistant turn is trained, no eos closing another turn is.
    masked_eos = [i for i, (t, b) in enumerate(zip(ids, mask)) if t == tok.eos_token_id and b]
    assert len(masked_eos) == 2


def test_reply_starts_with_the_running_text_token(tok):
    # " green" mid-sentence and at the start of a reply is one and the same token, so a model pretrained on
    # plain text begins chat replies with tokens it has seen.
    word = tok(" fox")["input_ids"]
    reply = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fox"}],
                                    tokenize=True, return_dict=False)
    assert reply[-1 - len(word):-1] == word == tok("The quick brown fox")["input_ids"][-len(word):]
    assert tok.convert_ids_to_tokens(word[0]).startswith("\u0120")  # the byte-level space


def test_cjk_characters_are_never_merged_together():
    text = "安喜欢红色"
    corpus = [f"{text}。"] * 200 + CHINESE * 20  # frequent enough that BPE fuses the phrase when allowed to

    def most_characters_in_one_token(tokenizer):
        return max(sum("\u4e00" <= ch <= "\u9fff" for ch in tokenizer.decode([i])) for i in tokenizer(text)["input_ids"])

    assert most_characters_in_one_token(train_tokenizer(corpus, vocab_size=400, show_progress=False)) == 1
    fused = train_tokenizer(corpus, vocab_size=400, show_progress=False, split_cjk_characters=False)
    assert most_characters_in_one_token(fused) == len(text)


def test_generation_prompt(tok):
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eos|><|assistant|>\n")
    ids = tok.apply_chat_template(CONVERSATION[:2], tokenize=True, return_dict=False, add_generation_prompt=True)
    assert tok.decode(ids[-2:]) == "<|assistant|>\n"
    no_prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert no_prompt.endswith("<|eos|>")


def test_unknown_role_raises(tok):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match='Unknown chat role "tool"'):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_trl_accepts_template_for_assistant_only_loss(tok):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    # SFTTrainer keeps a template with generation markers as is (otherwise it swaps in its own) and warns when the
    # end-of-turn token is not in the assistant mask; both checks must pass for our template.
    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)


def test_trl_sft_step_masks_non_assistant_tokens(tok, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    conversations = [
        CONVERSATION,
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
    ]
    dataset = Dataset.from_dict({"messages": conversations})
    args = SFTConfig(
        output_dir=str(tmp_path),
        assistant_only_loss=True,
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        max_length=256,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    # Our template must be used as is, not replaced with a TRL training template.
    assert trainer.chat_template is None

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for row, conversation in enumerate(conversations):
        input_ids, labels = batch["input_ids"][row], batch["labels"][row]
        expected_ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert input_ids[: len(expected_ids)].tolist() == expected_ids
        reference = tok.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )["assistant_masks"]
        reference = reference + [0] * (len(labels) - len(reference))  # padding is never trained
        assert [label != -100 for label in labels.tolist()] == [bool(bit) for bit in reference]
        trained = labels[labels != -100].tolist()
        expected = "".join(" " + m["content"].lstrip() + EOS_TOKEN for m in conversation if m["role"] == "assistant")
        assert tok.decode(trained) == expected

    result = trainer.train()
    assert result.global_step == 1
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_too_small_vocab_raises():
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small: it must be at least 262"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(ValueError, match="at least 262"):
        train_tokenizer(["some text"], vocab_size=261)
    # The boundary itself is allowed: bytes and special tokens only.
    tok = train_tokenizer(["some text"], vocab_size=262, show_progress=False)
    assert len(tok) == 262
    assert tok.decode(tok.encode("some text 中")) == "some text 中"


def test_empty_iterator_raises():
    with pytest.raises(ValueError, match="yielded no non-empty text"):
        train_tokenizer(iter([]), vocab_size=300)
    with pytest.raises(ValueError, match="yielded no non-empty text"):
        train_tokenizer(["", ""], vocab_size=300)


def test_generator_input_is_consumed_once():
    def texts():
        yield from _corpus()

    tok = train_tokenizer(texts(), vocab_size=300, show_progress=False)
    assert tok.decode(tok.encode(CHINESE[0])) == CHINESE[0]


def test_non_string_text_raises():
    with pytest.raises(TypeError, match="expects strings, got int"):
        train_tokenizer(["fine", 3], vocab_size=300, show_progress=False)
