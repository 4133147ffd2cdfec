"""Cleaning, deduplication and contamination checks (pipeline.data.cleaning / .dedup)."""

import json
import re
import time
import unicodedata

import pytest

from pipeline.data.cleaning import (
    CleanReport,
    MaxLength,
    MinLength,
    RepetitionFilter,
    clean_rows,
    is_unspaced,
    normalize_text,
    text_units,
)
from pipeline.data.dedup import (
    contamination,
    dedup_rows,
    dedup_texts,
    exact_dedup,
    near_dedup,
    text_hash,
    train_eval_split,
)

SIMPLIFIED = "学而时习之，不亦说乎？有朋自远方来，不亦乐乎！他说：「今天天气很好；我们去公园吧。」"
TRADITIONAL = "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。『靜夜思』——李白（唐）《唐詩三百首》、…"
FULL_WIDTH = "，。！？：；「」『』（）《》、～＃＠ＡＢＣａｂｃ１２３　全角空格"

PARAGRAPH = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, "
    "carrying a small brass lantern and a notebook in which he recorded the weather, "
    "the ships that passed, and the number of gulls resting on the rocks below. "
    "Nobody in the village had ever read the notebook, but everyone agreed it must "
    "contain the most complete history of the harbour ever written."
)
OTHER_PARAGRAPHS = [
    "Quantum computers use qubits, which can represent both zero and one at the same "
    "time, allowing certain calculations to be performed far faster than on classical "
    "machines; building them remains difficult because qubits are fragile.",
    "To bake sourdough bread, mix flour, water and salt with an active starter, let the "
    "dough rise slowly overnight, shape it gently, and bake it in a very hot oven until "
    "the crust is deep brown and sounds hollow when tapped.",
    "The committee will meet on Thursday to review the budget proposal, discuss the "
    "hiring plan for next year, and vote on whether to move the annual conference to "
    "a larger venue closer to the city centre.",
]
ZH_PARAGRAPH = (
    "春天来了，山坡上的小草从泥土里钻出来，嫩嫩的，绿绿的。园子里，田野里，瞧去，"
    "一大片一大片满是的。桃树、杏树、梨树，你不让我，我不让你，都开满了花赶趟儿。"
    "红的像火，粉的像霞，白的像雪。花里带着甜味儿，闭了眼，树上仿佛已经满是桃儿、杏儿、梨儿。"
)
ZH_OTHER = (
    "计算机科学是研究信息与计算的理论基础，以及它们在计算机系统中如何实现与应用的学科。"
    "它包括算法、数据结构、程序设计语言、操作系统、网络与人工智能等许多分支领域。"
)


# ---------------------------------------------------------------------------
# normalize_text
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", [SIMPLIFIED, TRADITIONAL, FULL_WIDTH, ZH_PARAGRAPH])
def test_normalize_leaves_chinese_and_full_width_punctuation_untouched(text):
    assert normalize_text(text) == text
    assert normalize_text(text + "\n" + text) == text + "\n" + text


def test_full_width_sample_would_be_damaged_by_nfkc():
    # Guards the test above: if NFKC were used, FULL_WIDTH would change.
    assert unicodedata.normalize("NFKC", FULL_WIDTH) != FULL_WIDTH


def test_normalize_removes_control_and_zero_width_characters():
    dirty = "a\x00b\x07c\x1bd\x7fe\x85f\u200bg\u200ch\u200di\ufeffj"
    assert normalize_text(dirty) == "abcdefghij"
    assert normalize_text("\ufeff你好\u200b，世界") == "你好，世界"


def test_normalize_keeps_tabs_and_newlines_and_unifies_line_endings():
    assert normalize_text("a\tb\r\nc\rd\ne") == "a\tb\nc\nd\ne"


def test_normalize_strips_trailing_spaces_and_collapses_blank_lines():
    assert normalize_text("line one   \nline two\t\n") == "line one\nline two\n"
    assert normalize_text("a\n\n\n\n\n\nb") == "a\n\n\nb"  # 5 blank lines -> 2
    assert normalize_text("a\n  \n \t \n\n\nb") == "a\n\n\nb"  # whitespace-only lines are blank
    assert normalize_text("a\n\n\nb") == "a\n\n\nb"  # 2 blank lines stay
    assert normalize_text("  indented") == "  indented"  # leading spaces are content


def test_normalize_composes_to_nfc_and_is_idempotent():
    assert normalize_text("cafe\u0301") == "caf\u00e9"
    messy = "x\r\n\r\n\r\n\r\n\r\ny  \u200b\x00 z"
    assert normalize_text(normalize_text(messy)) == normalize_text(messy)


# ---------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------


def test_length_filters():
    assert MinLength(5)("abcd") == "too_short"
    assert MinLength(5)("  abcd   ") == "too_short"
    assert MinLength(5)("abcde") is None
    assert MaxLength(5)("abcdef") == "too_long"
    assert MaxLength(5)("abcde") is None


def test_repetition_filter_flags_duplicate_lines():
    text = "\n".join(["Click here to subscribe!"] * 5 + ["A real sentence.", "Another one."])
    assert RepetitionFilter()(text) == "dup_line_frac"


def test_repetition_filter_flags_duplicate_line_characters():
    # 1 of 5 lines repeats (20% <= 30%), but it carries most of the characters.
    long_line = "this very long line is repeated " * 4
    text = "\n".join([long_line, "a", "b", "c", long_line])
    assert RepetitionFilter()(text) == "dup_line_char_frac"


def test_repetition_filter_flags_repeated_ngrams():
    spam = " ".join(["buy cheap"] * 40 + PARAGRAPH.split()[:20])
    assert RepetitionFilter()(spam) == "top_2gram_frac"
    # ~75% of the characters sit in "buy cheap" occurrences.
    assert RepetitionFilter(top_ngram_max_frac={2: 0.8, 3: 0.8, 4: 0.8})(spam) is None
    assert RepetitionFilter(top_ngram_max_frac={2: 0.7})(spam) == "top_2gram_frac"


def test_repetition_filter_flags_repeated_chinese_character_ngrams():
    assert RepetitionFilter()("点击这里" * 30) == "top_2gram_frac"


def test_repetition_filter_keeps_normal_prose():
    f = RepetitionFilter()
    for text in [PARAGRAPH, *OTHER_PARAGRAPHS, ZH_PARAGRAPH, SIMPLIFIED + TRADITIONAL]:
        assert f(text) is None, text
    # Short texts are never judged on n-grams, however repetitive.
    assert f("it shall be so, it shall be so; let him away") is None


def test_units_use_characters_for_chinese_and_words_otherwise():
    assert is_unspaced(ZH_PARAGRAPH) and not is_unspaced(PARAGRAPH)
    assert is_unspaced("我们用Python训练模型")  # mixed, mostly Chinese
    assert text_units("Hello, World! Hello.") == ["hello", "world", "hello"]
    assert text_units("你好，世界！") == ["你", "好", "世", "界"]


# ---------------------------------------------------------------------------
# clean_rows
# ---------------------------------------------------------------------------


def test_clean_rows_counts_every_drop_by_reason():
    rows = [
        {"text": PARAGRAPH},  # 0 kept
        {"text": "   \u200b\n\n  "},  # 1 empty after normalisation
        {"text": "hi"},  # 2 too_short
        {"text": "x" * 500},  # 3 too_long
        {"text": "\n".join(["same line"] * 10)},  # 4 dup_line_frac
        {"other": "no text field"},  # 5 missing_field
        {"text": None},  # 6 invalid_field
        {"text": ZH_PARAGRAPH + "\r\n"},  # 7 kept, normalised
        {"text": "ok text"},  # 8 kept
    ]
    filters = [MinLength(3), MaxLength(400), RepetitionFilter()]
    kept, report = clean_rows(rows, filters=filters)

    assert isinstance(report, CleanReport)
    assert report.total == len(rows)
    assert report.kept == len(kept) == 3
    assert report.kept + report.num_dropped == report.total
    assert dict(report.dropped) == {
        "empty": 1,
        "too_short": 1,
        "too_long": 1,
        "dup_line_frac": 1,
        "missing_field": 1,
        "invalid_field": 1,
    }
    assert report.dropped_indices["too_long"] == [3]
    assert report.dropped_indices["missing_field"] == [5]
    assert [r["text"] for r in kept] == [PARAGRAPH, ZH_PARAGRAPH + "\n", "ok text"]
    table = str(report)
    assert table == report.table()
    for reason in report.dropped:
        assert f"dropped: {reason}" in table
    assert re.search(r"kept\s+3\b", table) and re.search(r"total\s+9\b", table)


def test_clean_rows_works_on_other_formats():
    rows = [
        {"prompt": "Translate: \u200bhello", "completion": "你好。  "},
        {"prompt": "", "completion": ""},
    ]
    kept, report = clean_rows(rows, field=["prompt", "completion"])
    assert kept == [{"prompt": "Translate: hello", "completion": "你好。"}]
    assert dict(report.dropped) == {"empty": 1}

    chats = [
        {
            "messages": [
                {"role": "user", "content": "Hi\x00!"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {"messages": [{"role": "user", "content": "x"}]},
    ]
    kept, report = clean_rows(chats, field="messages", filters=[MinLength(4)])
    assert kept[0]["messages"][0] == {"role": "user", "content": "Hi!"}
    assert report.kept == 1 and dict(report.dropped) == {"too_short": 1}

    # text_of decides what the filters judge.
    kept, report = clean_rows(
        [{"text": "aaaa", "id": 1}, {"text": "bbbb", "id": 2}],
        text_of=lambda r: "long enough" if r["id"] == 1 else "",
        filters=[MinLength(1)],
    )
    assert [r["id"] for r in kept] == [1] and dict(report.dropped) == {"empty": 1}


# ---------------------------------------------------------------------------
# dedup
# ---------------------------------------------------------------------------


def test_exact_dedup_catches_whitespace_and_case_variants():
    texts = [
        "Hello   World",
        "The quick brown fox.",
        "hello world",
        " HELLO\tWORLD\r\n",
        "Hello World!",  # punctuation differs: not an exact duplicate
        "the quick  BROWN fox.",
        "Hello\u200b World",
    ]
    report = exact_dedup(texts)
    assert report.kept_indices == [0, 1, 4]
    assert report.duplicate_of == {2: 0, 3: 0, 5: 1, 6: 0}
    assert report.removed_indices == [2, 3, 5, 6] and report.num_removed == 4
    assert text_hash("A  b") == text_hash("a b") != text_hash("a c")


def _one_word_changed(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_near_dedup_catches_one_word_edit_and_keeps_distinct_texts():
    variant = _one_word_changed(PARAGRAPH, "brass", "copper")
    texts = [OTHER_PARAGRAPHS[0], PARAGRAPH, OTHER_PARAGRAPHS[1], variant, OTHER_PARAGRAPHS[2]]
    report = near_dedup(texts)
    assert report.kept_indices == [0, 1, 2, 4]
    assert report.duplicate_of == {3: 1}
    assert report.method == {3: "near"}
    # Same inputs, same seed: identical outcome.
    again = near_dedup(texts)
    assert (again.kept_indices, again.duplicate_of) == (report.kept_indices, report.duplicate_of)


def test_near_dedup_threshold_is_respected():
    one_word = _one_word_changed(PARAGRAPH, "brass", "copper")  # Jaccard ~0.95
    rewritten = _one_word_changed(  # one clause rewritten: Jaccard ~0.78
        PARAGRAPH,
        "Nobody in the village had ever read the notebook",
        "The mayor once tried to buy the notebook for a fortune",
    )
    strict = near_dedup([PARAGRAPH, one_word, rewritten], threshold=0.88)
    assert strict.removed_indices == [1]
    loose = near_dedup([PARAGRAPH, one_word, rewritten], threshold=0.5)
    assert loose.duplicate_of == {1: 0, 2: 0}


def test_near_dedup_catches_chinese_near_duplicate():
    variant = _one_word_changed(ZH_PARAGRAPH, "桃树", "李树")
    report = near_dedup([ZH_PARAGRAPH, ZH_OTHER, variant, SIMPLIFIED])
    assert report.kept_indices == [0, 1, 3]
    assert report.duplicate_of == {2: 0}


def test_dedup_rows_combines_exact_and_near_with_original_indices():
    rows = [
        {"text": PARAGRAPH},
        {"text": OTHER_PARAGRAPHS[0]},
        {"text": PARAGRAPH.upper()},  # exact (casefolded) duplicate of 0
        {"text": OTHER_PARAGRAPHS[1]},
        {"text": _one_word_changed(OTHER_PARAGRAPHS[0], "fragile", "delicate")},  # near dup of 1
        {"text": ZH_PARAGRAPH},
        {"text": _one_word_changed(ZH_PARAGRAPH, "白的像雪", "白的像云")},  # near dup of 5
    ]
    kept, report = dedup_rows(rows)
    assert kept == [rows[0], rows[1], rows[3], rows[5]]
    assert report.duplicate_of == {2: 0, 4: 1, 6: 5}
    assert report.method == {2: "exact", 4: "near", 6: "near"}
    assert report.count("exact") == 1 and report.count("near") == 2
    assert "removed: near" in str(report)

    only_exact = dedup_texts([r["text"] for r in rows], near=False)
    assert only_exact.removed_indices == [2]


# ---------------------------------------------------------------------------
# contamination
# ---------------------------------------------------------------------------

PLANTED = "the committee will publish the final results of the regional science fair next month"
TRAIN_DOCS = [
    PARAGRAPH,
    "Local news. " + OTHER_PARAGRAPHS[0] + " In other news, The Committee will publish the "
    "final results of the regional science fair next month! Tickets are free.",
    OTHER_PARAGRAPHS[1],
    "古文选读。" + ZH_PARAGRAPH + "以上为节选。",
]


def test_contamination_flags_planted_item_and_not_clean_ones():
    evals = [
        OTHER_PARAGRAPHS[2],  # clean
        PLANTED.capitalize() + ".",  # inside TRAIN_DOCS[1], different case/punctuation
        "What is the capital of France and why did it become the capital city?",  # clean
        "红的像火，粉的像霞，白的像雪。花里带着甜味儿",  # inside the Chinese train doc
        "这是一个完全不同的句子，和训练数据没有任何关系。",  # clean Chinese
    ]
    report = contamination(TRAIN_DOCS, evals, n=13)
    assert report.flagged_indices == [1, 3]
    assert report.fraction == pytest.approx(2 / 5)
    assert report.examples[1] in PLANTED
    assert len(report.examples[1].split()) == 13
    assert len(report.examples[3]) == 13 and report.examples[3] in "红的像火粉的像霞白的像雪花里带着甜味儿"
    assert "contaminated" in str(report)


def test_contamination_checks_short_items_whole_and_skips_tiny_ones():
    evals = [
        "publish the final results of the regional science",  # 8 words, in train
        "publish the final results of the regional museum",  # 8 words, not in train
        "science fair",  # too short to judge
    ]
    report = contamination(TRAIN_DOCS, evals, n=13)
    assert report.flagged_indices == [0]
    assert report.skipped_indices == [2]
    # Word boundaries matter: a whole-item match must not start mid-word.
    item = "the cat sat on the mat today ok"
    assert contamination(["x" + item], [item]).clean
    assert not contamination(["so " + item + " now"], [item]).clean


def test_train_eval_split_is_deterministic_and_reports_contamination():
    unique = [
        {"text": f"document number {i} talks about topic {i * 7 % 11} in detail"} for i in range(40)
    ]
    leaked = {"text": PLANTED}
    rows = unique[:20] + [leaked] * 10 + unique[20:]

    train, evals, report = train_eval_split(rows, test_size=0.2, seed=3)
    assert len(evals) == 10 and len(train) == 40
    assert sorted(map(str, train + evals)) == sorted(map(str, rows))
    assert (train, evals) == train_eval_split(rows, test_size=0.2, seed=3)[:2]
    assert evals != train_eval_split(rows, test_size=0.2, seed=4)[1]

    leaked_in_eval = [i for i, r in enumerate(evals) if r is leaked]
    assert leaked_in_eval and any(r is leaked for r in train)  # precondition of this seed
    assert report.flagged_indices == leaked_in_eval
    assert report.num_eval == 10

    _, evals_n, _ = train_eval_split(rows, test_size=5, seed=3)
    assert len(evals_n) == 5
    with pytest.raises(ValueError):
        train_eval_split(rows, test_size=0, seed=0)


# ---------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------


def test_real_tinyshakespeare_normalize_and_dedup(shared_data):
    text = (shared_data / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    start = time.perf_counter()
    kept, clean_report = clean_rows({"text": p} for p in paragraphs)
    deduped, dedup_report = dedup_rows(kept)
    elapsed = time.perf_counter() - start
    print(f"\ntinyshakespeare: {len(paragraphs)} paragraphs, {elapsed:.1f}s")
    print(f"{clean_report}\n{dedup_report}")

    assert clean_report.total == len(paragraphs) > 5000
    assert clean_report.kept + clean_report.num_dropped == clean_report.total
    assert clean_report.kept > 0.95 * len(paragraphs)  # literary text is not spam
    assert len(deduped) + dedup_report.num_removed == len(kept)
    # Short speeches like "CATESBY:\nMy lord?" recur verbatim across the plays.
    assert 0 < dedup_report.count("exact") < 0.05 * len(kept)
    for i, j in dedup_report.duplicate_of.items():
        assert j < i and j in dedup_report.kept_indices


def test_real_alpaca_instructions_dedup(shared_data):
    rows = json.loads((shared_data / "sft" / "alpaca_en_0-3252.json").read_text(encoding="utf-8"))
    kept, report = dedup_rows(rows, field="instruction")
    print(f"\nalpaca_en instructions: {len(rows)} rows\n{report}")
    assert report.total == len(rows) == 3252
    assert 0 <= report.num_removed <= len(rows)
    assert len(kept) + report.num_removed == len(rows)
    assert kept[0] is rows[0]
