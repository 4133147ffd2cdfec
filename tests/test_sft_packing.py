"""Packed SFT batches (TRL's best-fit packing, padding-free) give every sequence the loss it has on its own."""

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from pipeline.data.demo_tasks import sft_rows
from pipeline.data.tokenizer import train_tokenizer
from pipeline.modeling import PipelineGPTConfig, PipelineGPTForCausalLM


def packed_sft_batch(tmp_path, rows: int, seed: int):
    """A tiny model and the first batch SFTTrainer's packing collator gives it."""
    rows = sft_rows(rows, seed=seed)
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=300,
                                show_progress=False)
    torch.manual_seed(0)
    model = PipelineGPTForCausalLM(PipelineGPTConfig.preset(
        "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    config = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=96, per_device_train_batch_size=4,
                       assistant_only_loss=True, bf16=False, use_cpu=True, report_to=[], activation_checkpointing=False)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    return model, next(iter(trainer.get_train_dataloader()))


def test_packed_sequences_have_their_unpacked_losses(tmp_path):
    model, batch = packed_sft_batch(tmp_path, 40, seed=3)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # flattened, padding-free

    model.eval()
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    segments = [(a, b) for a, b in zip(starts, starts[1:]) if b > a]
    assert len(segments) >= 3  # several conversations share the row
    for a, b in segments:
        ids, labels = batch["input_ids"][:, a:b], batch["labels"][:, a:b]
        with torch.no_grad():
            alone = model(input_ids=ids, labels=labels)
        assert torch.allclose(packed_logits[a:b], alone.logits[0], atol=1e-5)
        shifted = torch.nn.functional.cross_entropy(packed_logits[a:b - 1], labels[0, 1:], ignore_index=-100)
        assert torch.allclose(shifted, alone.loss, atol=1e-6)

    # The collator also hands over the sequence boundaries for variable-length attention kernels (flash attention
    # reads them from the model's **kwargs); the whole batch goes through the model as the trainer passes it.
    assert batch["cu_seq_lens_q"].tolist() == starts and batch["cu_seq_lens_k"].tolist() == starts
    assert batch["max_length_q"] == batch["max_length_k"] == max(b - a for a, b in segments)
    with torch.no_grad():
        as_trained = model(**batch).logits[0]
    torch.testing.assert_close(as_trained, packed_logits, atol=1e-6, rtol=0)


def test_flex_attention_on_a_packed_sft_batch_equals_sdpa(tmp_path, monkeypatch):
    from test_modeling import unfused_flex_attention

    unfused_flex_attention(monkeypatch)
    model, batch = packed_sft_batch(tmp_path, 12, seed=4)
    model.eval()
    with torch.no_grad():
        by_sdpa = model(**batch).logits
        model.set_attn_implementation("flex_attention")
        by_flex = model(**batch).logits
    torch.testing.assert_close(by_flex, by_sdpa, atol=1e-5, rtol=0)
