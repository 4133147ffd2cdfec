"""Tokenisation + packing of pretraining text into fixed blocks (pipeline.data.packing)."""

import itertools

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.data import packing
from pipeline.artifacts import tokenizer_hash
from pipeline.data.packing import PackReport, tokenize_and_pack

CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "",  # an empty document still contributes its EOS
    "First Citizen:\nYou are all resolved rather to die than to famish?",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎！",
    "x",
    "Let us kill him, and we'll have corn at our own price.\nIs't a verdict?",
    "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。",
    "No more talking on't; let it be done: away, away!",
    "One word.",
    "Second Citizen:\nOne word, good citizens.",
]


def make_tokenizer(lines, vocab_size=300, eos="<|eos|>", pad="<|pad|>"):
    """A tiny byte-level BPE tokenizer trained on ``lines``, wrapped for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in (eos, pad) if t]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    kwargs = {"eos_token": eos} if eos else {}
    if pad:
        kwargs["pad_token"] = pad
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(CORPUS * 3)


@pytest.fixture
def dataset():
    return Dataset.from_dict({"text": CORPUS, "id": list(range(len(CORPUS)))})


def doc_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_stream(tokenizer, texts, add_eos=True):
    eos = [tokenizer.eos_token_id] if add_eos else []
    return [t for text in texts for t in doc_ids(tokenizer, text) + eos]


def blocks_of(packed):
    return [row["input_ids"] for row in packed]


@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
def test_token_totals_and_block_count_are_exact(tokenizer, dataset, block_size):
    packed, report = tokenize_and_pack(dataset, tokenizer, block_size=block_size)
    stream = expected_stream(tokenizer, CORPUS)
    doc_tokens = sum(len(doc_ids(tokenizer, t)) for t in CORPUS)

    assert isinstance(report, PackReport) and not report.cache_hit
    assert report.num_documents == len(CORPUS)
    assert report.num_tokens == doc_tokens + len(CORPUS) == len(stream)
    assert report.num_blocks == len(packed) == len(stream) // block_size
    assert report.num_blocks * block_size + report.dropped_tokens == doc_tokens + len(CORPUS)
    assert report.dropped_tokens == len(stream) % block_size
    assert packed.column_names == ["input_ids"]
    assert all(len(block) == block_size for block in blocks_of(packed))
    # Global packing: the blocks are the concatenated stream, in order, minus the tail.
    flat = list(itertools.chain.from_iterable(blocks_of(packed)))
    assert flat == stream[: len(packed) * block_size]


def test_documents_are_separated_by_eos_at_cumulative_boundaries(tokenizer, dataset):
    packed, _ = tokenize_and_pack(dataset, tokenizer, block_size=8, drop_remainder=False)
    flat = list(itertools.chain.from_iterable(blocks_of(packed)))
    eos = tokenizer.eos_token_id

    lengths = [len(doc_ids(tokenizer, t)) + 1 for t in CORPUS]
    boundaries = list(itertools.accumulate(lengths))
    eos_positions = [i for i, t in enumerate(flat) if t == eos]
    assert eos_positions == [b - 1 for b in boundaries]
    assert len(flat) == boundaries[-1]

    # Decoding the segments between EOS tokens gives back the documents.
    starts = [0] + boundaries[:-1]
    decoded = [tokenizer.decode(flat[s : b - 1]) for s, b in zip(starts, boundaries)]
    assert decoded == CORPUS


def test_keep_remainder_gives_a_short_last_block(tokenizer, dataset):
    packed, report = tokenize_and_pack(dataset, tokenizer, block_size=16, drop_remainder=False)
    total = report.num_tokens
    assert report.dropped_tokens == 0 and total % 16 != 0  # the corpus has a tail to keep
    sizes = [len(b) for b in blocks_of(packed)]
    assert sizes[:-1] == [16] * (len(sizes) - 1) and sizes[-1] == total % 16
    assert sum(sizes) == total
    assert report.num_blocks == total // 16  # full blocks only


def test_without_eos_no_separator_is_added(tokenizer, dataset):
    packed, report = tokenize_and_pack(dataset, tokenizer, block_size=4, add_eos=False)
    flat = list(itertools.chain.from_iterable(blocks_of(packed)))
    assert tokenizer.eos_token_id not in flat
    assert report.num_tokens == len(expected_stream(tokenizer, CORPUS, add_eos=False))


def test_tokenizer_without_eos_is_rejected(dataset):
    no_eos = make_tokenizer(CORPUS, eos=None)
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match="eos"):
        tokenize_and_pack(dataset, no_eos, block_size=8)
    # Not needed when no separator is asked for.
    _, report = tokenize_and_pack(dataset, no_eos, block_size=8, add_eos=False)
    assert report.num_blocks > 0


def test_bad_arguments(tokenizer, dataset):
    with pytest.raises(ValueError, match="block_size"):
        tokenize_and_pack(dataset, tokenizer, block_size=0)
    with pytest.raises(ValueError, match="content"):
        tokenize_and_pack(dataset, tokenizer, block_size=8, text_field="content")
    with pytest.raises(ValueError, match="empty"):
        tokenize_and_pack(dataset.select([]), tokenizer, block_size=8)


def test_small_map_batches_still_pack_globally(tokenizer, dataset):
    # Many tokenisation batches must not leave a remainder per batch.
    whole, r1 = tokenize_and_pack(dataset, tokenizer, block_size=8)
    split, r2 = tokenize_and_pack(dataset, tokenizer, block_size=8, batch_size=2)
    assert blocks_of(split) == blocks_of(whole)
    assert r2.dropped_tokens == r1.dropped_tokens < 8


def test_num_proc_gives_identical_blocks(tokenizer, dataset):
    single, _ = tokenize_and_pack(dataset, tokenizer, block_size=8)
    multi, report = tokenize_and_pack(dataset, tokenizer, block_size=8, num_proc=2, batch_size=3)
    assert blocks_of(multi) == blocks_of(single)
    assert report.num_tokens == len(expected_stream(tokenizer, CORPUS))


def test_cache_hit_on_rerun(tokenizer, dataset, tmp_path, monkeypatch):
    first, r1 = tokenize_and_pack(dataset, tokenizer, block_size=8, cache_dir=tmp_path)
    assert not r1.cache_hit and r1.cache_path
    assert [p.name for p in tmp_path.iterdir()] == [r1.cache_path.split("/")[-1]]  # no temp left

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("tokenised again despite a cached result")

    monkeypatch.setattr(packing, "_tokenize_batch", must_not_tokenize)
    same_data = Dataset.from_dict({"text": CORPUS, "id": list(range(len(CORPUS)))})
    second, r2 = tokenize_and_pack(same_data, tokenizer, block_size=8, cache_dir=tmp_path)
    assert r2.cache_hit and r2.cache_path == r1.cache_path
    assert blocks_of(second) == blocks_of(first)
    assert r2.num_blocks == r1.num_blocks and r2.dropped_tokens == r1.dropped_tokens
    assert r2.num_tokens == r1.num_tokens

    # Any change to the inputs is a miss (and so tokenises, which now raises).
    for kwargs in ({"block_size": 16}, {"block_size": 8, "add_eos": False}):
        with pytest.raises(AssertionError, match="tokenised again"):
            tokenize_and_pack(dataset, tokenizer, cache_dir=tmp_path, **kwargs)
    other_data = dataset.select(range(3))
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_and_pack(other_data, tokenizer, block_size=8, cache_dir=tmp_path)
    other_tok = make_tokenizer(CORPUS, vocab_size=280)
    assert tokenizer_hash(other_tok) != tokenizer_hash(tokenizer)
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize_and_pack(dataset, other_tok, block_size=8, cache_dir=tmp_path)


def test_interrupted_cache_write_leaves_no_complete_looking_cache(
    tokenizer, dataset, tmp_path, monkeypatch
):
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Dataset, "save_to_disk", crash)
        with pytest.raises(KeyboardInterrupt):
            tokenize_and_pack(dataset, tokenizer, block_size=8, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []

    _, report = tokenize_and_pack(dataset, tokenizer, block_size=8, cache_dir=tmp_path)
    assert not report.cache_hit
    _, report = tokenize_and_pack(dataset, tokenizer, block_size=8, cache_dir=tmp_path)
    assert report.cache_hit


def test_real_tinyshakespeare_packs_exactly(shared_data):
    text = (shared_data / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    docs = [p for p in text.split("\n\n") if p.strip()][:2000]
    tok = make_tokenizer(docs, vocab_size=512)
    packed, report = tokenize_and_pack(Dataset.from_dict({"text": docs}), tok, block_size=128)
    encodings = tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    stream = [t for e in encodings for t in e.ids + [tok.eos_token_id]]
    assert report.num_tokens == len(stream)
    assert len(packed) * 128 + report.dropped_tokens == len(stream)
    assert report.dropped_tokens < 128
    assert list(itertools.chain.from_iterable(packed["input_ids"])) == stream[: len(packed) * 128]


def test_padding_helpers_pad_on_the_requested_side():
    from pipeline.data.padding import IGNORE_INDEX, padded_batch, padded_lm_batch

    ids, mask = padded_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = padded_batch([[5], [], [8, 9]], pad_id=3)
    assert ids.tolist() == [[5, 3], [3, 3], [8, 9]] and mask.tolist() == [[1, 0], [0, 0], [1, 1]]
    ids, mask, labels = padded_lm_batch([{"input_ids": [1, 2], "labels": [-100, 2]},
                                         {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert ids.tolist() == [[1, 2], [4, 0]] and labels.tolist() == [[-100, 2], [4, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="side: 'middle'"):
        padded_batch([[1]], 0, side="middle")


def test_tokenizer_hash_ignores_padding_left_in_the_backend(tokenizer, tmp_path):
    """A batched call with padding leaves the setting in the backend (and in a saved tokenizer.json); the ids do not
    change, so neither does the hash, while manifests with the old whole-backend hash still match."""
    before, legacy_before = tokenizer_hash(tokenizer), tokenizer_hash(tokenizer, legacy=True)
    tokenizer.backend_tokenizer.enable_padding(direction="left", pad_id=tokenizer.pad_token_id,
                                               pad_token=tokenizer.pad_token)
    try:
        assert tokenizer_hash(tokenizer) == before
        assert tokenizer_hash(tokenizer, legacy=True) != legacy_before
    finally:
        tokenizer.backend_tokenizer.no_padding()
    assert tokenizer_hash(tokenizer, legacy=True) == legacy_before
