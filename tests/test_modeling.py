"""PipelineGPT: parity with transformers' Llama and GPT-2, attention backends, cache, padding, packing, knobs."""

import itertools
import os
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pipeline.modeling import PipelineGPTConfig, PipelineGPTForCausalLM, PipelineGPTForSequenceClassification
from pipeline.modeling.convert import (
    config_from_gpt2,
    config_from_llama,
    llama_config_from,
    llama_incompatibilities,
    state_dict_from_gpt2,
)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny(preset="llama", **overrides):
    """A tiny model; preset "smeared" is the Llama block with keys smeared over 2 previous positions, its mixing
    weights spread so heads and offsets differ."""
    torch.manual_seed(0)
    if preset == "smeared":
        preset, overrides = "llama", {**overrides, "key_smear": 2}
    config = PipelineGPTConfig.preset(preset, **{**TINY, **overrides})
    model = PipelineGPTForCausalLM(config).eval()
    if config.key_smear:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.key_smear.copy_(torch.linspace(-2.0, 2.0, layer.self_attn.key_smear.numel())
                                                .view_as(layer.self_attn.key_smear))
    return model


def tokens(batch=2, length=12, seed=1):
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# --- parity with transformers' own implementations -------------------------------------------------------------

@pytest.mark.parametrize("kv_heads,rope", [(4, None), (2, None), (1, {"rope_type": "linear", "factor": 2.0}),
                                            (2, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})])
def test_llama_preset_equals_llama(kv_heads, rope):
    torch.manual_seed(0)
    llama_config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                               rope_parameters={"rope_theta": 10000.0, **(rope or {"rope_type": "default"})})
    llama = LlamaForCausalLM(llama_config).eval()
    ours = PipelineGPTForCausalLM(config_from_llama(llama_config)).eval()
    ours.load_state_dict(llama.state_dict(), strict=True)  # same parameter names: no mapping needed
    x = tokens(length=40)
    expected, got = llama(x, labels=x), ours(x, labels=x)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    # and back: our config converts to an equal Llama config
    assert llama_config_from(ours.config).num_key_value_heads == kv_heads


def test_gpt2_preset_equals_gpt2():
    torch.manual_seed(0)
    gpt2_config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    gpt2 = GPT2LMHeadModel(gpt2_config).eval()
    config = config_from_gpt2(gpt2_config)
    ours = PipelineGPTForCausalLM(config).eval()
    ours.load_state_dict(state_dict_from_gpt2(gpt2.state_dict(), config), strict=True)
    x = tokens(length=30)
    expected, got = gpt2(x, labels=x), ours(x, labels=x)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


def test_llama_export_refuses_other_architectures_with_reason():
    config = PipelineGPTConfig.preset("gpt2", **TINY)
    reasons = llama_incompatibilities(config)
    assert any(r.startswith("position_embedding='learned'") for r in reasons)
    with pytest.raises(ValueError, match="norm_type='layernorm'"):
        llama_config_from(config)


def test_llama_export_refuses_smeared_keys():
    config = PipelineGPTConfig.preset("llama", **TINY, key_smear=1)
    assert llama_incompatibilities(config) == ["key_smear=1 (Llama has 0)"]


# --- smeared keys -------------------------------------------------------------------------------------------------

def test_smear_keys_weights_previous_keys_and_stops_at_sequence_starts():
    from pipeline.modeling.modeling_pipeline_gpt import smear_keys

    keys = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 1, 4, 1).repeat(1, 2, 1, 1)  # (B, Hkv, T, D), 2 heads
    previous = torch.tensor([20.0, 10.0]).view(1, 1, 2, 1).repeat(1, 2, 1, 1)  # the 2 keys before, oldest first
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]]))  # softmax gives these weights back
    out = smear_keys(keys, previous, logits, None)
    # head 0, position 0: 0.5 * 1 + 0.25 * 10 + 0.25 * 20; position 3: 0.5 * 8 + 0.25 * 4 + 0.25 * 2
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([8.0, 3.75, 2.75, 5.5]))
    torch.testing.assert_close(out[0, 1, :, 0], torch.tensor([4.7, 2.6, 3.3, 6.6]))
    # a position id below i keeps the key i steps back out: here a sequence restarts at the third position
    out = smear_keys(keys, previous, logits, torch.tensor([[0, 1, 0, 1]]))
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([0.5, 1.25, 2.0, 5.0]))


def test_key_smear_must_count_previous_keys():
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="key_smear: must be a number of previous keys"):
            PipelineGPTConfig.preset("llama", **TINY, key_smear=bad)


def test_smeared_keys_look_back_not_ahead_and_reduce_to_llama_without_mixing():
    model = tiny("smeared")
    ids = tokens(1, 10)
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1 - 3) % (TINY["vocab_size"] - 3) + 3
    # positions before the change are untouched; with all weight on a key's own part it is the plain Llama block
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=0, rtol=0)
    plain = tiny("llama")
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == [f"model.layers.{i}.self_attn.key_smear" for i in range(TINY["num_hidden_layers"])]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.key_smear.zero_()[:, 0] = 100.0
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)


def test_smeared_keys_refuse_a_cache_they_cannot_read():
    model = tiny("smeared")
    with pytest.raises(ValueError, match="key_smear: generation needs transformers' DynamicCache"):
        model.generate(tokens(1, 4), max_new_tokens=3, do_sample=False, cache_implementation="static",
                       pad_token_id=0)


# --- attention backends, cache, padding, packing ------------------------------------------------------------------

def left_padded(model, lengths=(12, 7, 3)):
    rows = [tokens(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), TINY["pad_token_id"])
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return rows, ids, mask


@pytest.mark.parametrize("preset", ["llama", "gpt2", "qk_norm", "smeared"])
def test_eager_equals_sdpa_with_left_padding(preset):
    eager, sdpa = tiny(preset), tiny(preset)
    eager.set_attn_implementation("eager")
    sdpa.set_attn_implementation("sdpa")
    _, ids, mask = left_padded(eager)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    a = eager(ids, attention_mask=mask, position_ids=positions).logits
    b = sdpa(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["llama", "gpt2", "smeared"])
def test_left_padded_rows_equal_rows_alone(preset):
    model = tiny(preset)
    rows, ids, mask = left_padded(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=positions).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(logits[i, -len(row):], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["llama", "gpt2", "smeared"])
def test_generate_with_cache_equals_without(preset):
    model = tiny(preset)
    prompt = tokens(2, 6)
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 16)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("preset", ["llama", "gpt2", "smeared"])
def test_batched_left_padded_generate_equals_one_by_one(preset):
    model = tiny(preset)
    rows, ids, mask = left_padded(model)
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    batched = model.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    for i, row in enumerate(rows):
        alone = model.generate(row[None], **kwargs)[0, len(row):]
        assert torch.equal(batched[i], alone), f"row {i} differs when batched with left padding"


@pytest.mark.parametrize("preset", ["llama", "gpt2", "smeared"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_packed_rows_equal_rows_alone(preset, implementation):
    model = tiny(preset)
    model.set_attn_implementation(implementation)
    docs = [tokens(1, n, seed=n)[0] for n in (5, 9, 4)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed_logits = model(packed, position_ids=position_ids).logits[0]
    start = 0
    for doc in docs:
        alone = model(doc[None]).logits[0]
        torch.testing.assert_close(packed_logits[start:start + len(doc)], alone, atol=1e-5, rtol=0)
        start += len(doc)
    # in training mode too (no cache is built, so the packed mask stays on)
    model.train()
    loss_packed = model(packed, position_ids=position_ids, labels=packed).logits
    torch.testing.assert_close(loss_packed[0], packed_logits, atol=1e-5, rtol=0)


def test_packed_sdpa_attends_span_by_span_and_matches_the_masked_eager_path():
    from pipeline.modeling.modeling_pipeline_gpt import packed_segments

    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert packed_segments(position_ids, 2) == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 9)]]
    ids = tokens(2, 9, seed=3)
    grads = {}
    for implementation in ("eager", "sdpa"):
        model = tiny("llama")
        model.set_attn_implementation(implementation)
        model.train()
        loss = model(ids, position_ids=position_ids, labels=ids).loss
        loss.backward()
        grads[implementation] = (loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads["sdpa"][0], grads["eager"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads["sdpa"][1], grads["eager"][1], atol=1e-5, rtol=1e-4)


def unfused_flex_attention(monkeypatch) -> list:
    """Route transformers' flex attention through torch's unfused implementation (compiling it takes minutes on a
    CPU); returns the list of block masks it is called with."""
    import transformers.integrations.flex_attention as flex_integration
    from torch.nn.attention.flex_attention import flex_attention

    calls = []

    def unfused(query, key, value, training=False, **kwargs):
        calls.append(kwargs.get("block_mask"))
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(flex_integration, "compile_friendly_flex_attention", unfused)
    return calls


PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 0, 1]])


def packed_batch():
    """Two packed rows of different boundaries, and each row's sequences as (row, start, end)."""
    from pipeline.modeling.modeling_pipeline_gpt import packed_segments

    spans = [(row, s, e) for row, segments in enumerate(packed_segments(PACKED_POSITIONS, 2)) for s, e in segments]
    return tokens(2, PACKED_POSITIONS.shape[1], seed=5), spans


@pytest.mark.parametrize("preset", ["llama", "smeared"])
def test_flex_document_mask_equals_the_segment_loop_and_rows_alone(preset, monkeypatch):
    calls = unfused_flex_attention(monkeypatch)
    ids, spans = packed_batch()
    loop, flex = tiny(preset, num_key_value_heads=2), tiny(preset, num_key_value_heads=2)
    loop.set_attn_implementation("sdpa")
    flex.set_attn_implementation("flex_attention")
    with torch.no_grad():  # flex attention has no CPU backward in torch 2.13
        by_loop = loop(ids, position_ids=PACKED_POSITIONS).logits
        by_flex = flex(ids, position_ids=PACKED_POSITIONS).logits
        torch.testing.assert_close(by_flex, by_loop, atol=1e-5, rtol=0)
        for row, start, end in spans:
            alone = loop(ids[row:row + 1, start:end]).logits[0]
            torch.testing.assert_close(by_flex[row, start:end], alone, atol=1e-5, rtol=0)
    mask = calls[0]
    assert len(calls) == 2 and all(m is mask for m in calls)  # one document mask, built once for every layer
    assert mask.shape[0] == 2 and mask.shape[-2:] == (PACKED_POSITIONS.shape[1],) * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex attention (and its backward) needs a GPU")
def test_flex_document_mask_on_gpu_trains_like_the_segment_loop():
    ids, _ = packed_batch()
    ids, positions = ids.cuda(), PACKED_POSITIONS.cuda()
    grads = {}
    for implementation in ("sdpa", "flex_attention"):
        model = tiny(num_key_value_heads=2).cuda().train()
        model.set_attn_implementation(implementation)
        loss = model(ids, position_ids=positions, labels=ids).loss
        loss.backward()
        grads[implementation] = (loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads["flex_attention"][0], grads["sdpa"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(grads["flex_attention"][1], grads["sdpa"][1], atol=1e-4, rtol=1e-3)


def test_varlen_boundaries_are_the_packed_sequences_of_the_flattened_rows():
    from pipeline.modeling.modeling_pipeline_gpt import varlen_boundaries

    _, spans = packed_batch()
    width = PACKED_POSITIONS.shape[1]
    flat = [row * width + start for row, start, _ in spans] + [2 * width]
    kwargs = varlen_boundaries(PACKED_POSITIONS, 2)
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["cu_seq_lens_q"].tolist() == flat
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == max(e - s for _, s, e in spans) == 9
    one_row = varlen_boundaries(torch.arange(6)[None], 3)  # unpacked rows: one sequence per row
    assert one_row["cu_seq_lens_q"].tolist() == [0, 6, 12, 18] and one_row["max_length_q"] == 6


def fake_flash_attention(monkeypatch) -> list:
    """Stand in for the flash-attn package inside transformers' flash integration: the variable-length kernel is
    causal SDPA per span of cu_seqlens. Returns the cu_seqlens each call received."""
    import transformers.modeling_flash_attention_utils as flash_utils

    seen = []

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=True,
               **kwargs):  # (total, H, D) in and out
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
        seen.append(cu_seqlens_q)
        bounds = cu_seqlens_q.tolist()
        assert max_seqlen_q == max(b - a for a, b in zip(bounds, bounds[1:]))
        out = [torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True,
            scale=softmax_scale, enable_gqa=True).transpose(0, 1) for a, b in zip(bounds, bounds[1:])]
        return torch.cat(out)

    def no_varlen(*args, **kwargs):
        raise AssertionError("packed rows reached the fixed-length flash kernel")

    def process(**kwargs):
        return {"max_seqlen_q": kwargs["max_seqlen_q"], "max_seqlen_k": kwargs["max_seqlen_k"],
                "softmax_scale": kwargs["softmax_scale"], "causal": kwargs["is_causal"]}

    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention",
                        lambda *args, **kwargs: ((no_varlen, varlen, None, None, None), (process, dict)))
    return seen


def test_flash_attention_gets_the_packed_boundaries(monkeypatch):
    seen = fake_flash_attention(monkeypatch)
    ids, spans = packed_batch()
    loop, flash = tiny(num_key_value_heads=2), tiny(num_key_value_heads=2)
    loop.set_attn_implementation("sdpa")
    flash.config._attn_implementation = "flash_attention_2"  # the flash-attn package itself is faked above
    with torch.no_grad():
        expected = loop(ids, position_ids=PACKED_POSITIONS).logits
        # two packed rows: transformers alone would see a batch of 2 and run the fixed-length kernel across them
        torch.testing.assert_close(flash(ids, position_ids=PACKED_POSITIONS).logits, expected, atol=1e-5, rtol=0)
        assert len(seen) == 2 and seen[0].tolist()[-1] == ids.numel()
        # boundaries a padding-free collator computed are passed through as they are
        flat_ids, flat_positions = ids.reshape(1, -1), PACKED_POSITIONS.reshape(1, -1)
        given = torch.tensor([0, 5, 8, 14, 23, 26, 28], dtype=torch.int32)
        logits = flash(flat_ids, position_ids=flat_positions, cu_seq_lens_q=given, cu_seq_lens_k=given,
                       max_length_q=9, max_length_k=9).logits
        torch.testing.assert_close(logits.reshape(expected.shape), expected, atol=1e-5, rtol=0)
        assert all(c is given for c in seen[2:]) and len(seen) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a CUDA GPU")
def test_flash_attention_on_gpu_equals_the_segment_loop():
    pytest.importorskip("flash_attn", reason="the flash-attn package is not installed")
    ids, _ = packed_batch()
    loop, flash = tiny(num_key_value_heads=2), tiny(num_key_value_heads=2)
    loop.set_attn_implementation("sdpa")
    flash.set_attn_implementation("flash_attention_2")
    loop, flash = loop.to("cuda", torch.bfloat16), flash.to("cuda", torch.bfloat16)
    ids, positions = ids.cuda(), PACKED_POSITIONS.cuda()
    with torch.no_grad():
        torch.testing.assert_close(flash(ids, position_ids=positions).logits,
                                   loop(ids, position_ids=positions).logits, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not os.environ.get("PIPELINE_SLOW_TESTS"), reason="compiling flex attention takes minutes on CPU; "
                                                      "set PIPELINE_SLOW_TESTS=1"))])
def test_flex_attention_matches_eager_in_inference(compiled, monkeypatch):
    calls = [] if compiled else unfused_flex_attention(monkeypatch)
    eager, flex = tiny(), tiny()
    flex.set_attn_implementation("flex_attention")
    x = tokens(2, 16)
    with torch.no_grad():  # flex attention has no CPU backward in torch 2.13
        torch.testing.assert_close(flex(x).logits, eager(x).logits, atol=1e-5, rtol=0)
    if not compiled:
        assert len(calls) == 2 and all(mask is not None for mask in calls)  # one call per layer, with a block mask


# --- heads ---------------------------------------------------------------------------------------------------------

def test_sequence_classification_reads_last_real_token_left_or_right_padded():
    torch.manual_seed(0)
    config = PipelineGPTConfig.preset("llama", num_labels=1, **TINY)
    model = PipelineGPTForSequenceClassification(config).eval()
    row = tokens(1, 7)[0]
    alone = model(row[None]).logits
    right = torch.cat([row, torch.zeros(3, dtype=torch.long)])[None]
    right_mask = (torch.arange(10) < 7).long()[None]
    torch.testing.assert_close(model(right, attention_mask=right_mask).logits, alone, atol=1e-5, rtol=0)
    left = torch.cat([torch.zeros(3, dtype=torch.long), row])[None]
    left_mask = (torch.arange(10) >= 3).long()[None]
    positions = (left_mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(model(left, attention_mask=left_mask, position_ids=positions).logits, alone,
                               atol=1e-5, rtol=0)
    assert alone.shape == (1, 1)


def test_classification_loss_trains_two_labels():
    torch.manual_seed(0)
    model = PipelineGPTForSequenceClassification(PipelineGPTConfig.preset("gpt2", num_labels=2, **TINY))
    x, labels = tokens(4, 8), torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(10):
        loss = model(x, attention_mask=torch.ones_like(x), labels=labels).loss
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first / 2


# --- knobs ---------------------------------------------------------------------------------------------------------

KNOBS = list(itertools.product(["rope", "learned"], ["rmsnorm", "layernorm"], ["pre", "post"],
                               [("gated", "silu"), ("gated", "gelu_pytorch_tanh"), ("plain", "relu")]))


@pytest.mark.parametrize("position,norm,place,mlp", KNOBS)
def test_every_knob_combination_trains_and_generates(position, norm, place, mlp):
    torch.manual_seed(0)
    config = PipelineGPTConfig(**TINY, position_embedding=position, norm_type=norm, norm_position=place,
                               mlp_type=mlp[0], hidden_act=mlp[1], num_key_value_heads=2,
                               qk_norm=(place == "pre"), attention_bias=(norm == "layernorm"),
                               tie_word_embeddings=(position == "rope"))
    model = PipelineGPTForCausalLM(config)
    x = tokens(2, 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    out = model.generate(x[:, :4], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (2, 8)
    has_gate = model.model.layers[0].mlp.gate_proj is not None
    assert has_gate == (mlp[0] == "gated")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == config.tie_word_embeddings


@pytest.mark.parametrize("overrides,field", [
    (dict(hidden_size=65), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(norm_type="batchnorm"), "norm_type"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(position_embedding="alibi"), "position_embedding"),
    (dict(mlp_type="moe"), "mlp_type"),
    (dict(hidden_act="swishy"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "spiral", "rope_theta": 1e4}), "rope_parameters.rope_type"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match="^" + re.escape(field)):
        PipelineGPTConfig(**{**TINY, **overrides})


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="gpt2"):
        PipelineGPTConfig.preset("gpt5")


def test_gpt2_preset_defaults_to_four_times_width():
    assert PipelineGPTConfig.preset("gpt2", hidden_size=48, num_attention_heads=4).intermediate_size == 192


# --- return_dict=False: every head returns transformers' tuple, element for element ---------------------------

def flatten(value):
    """Tensors of an output in order; a cache becomes its per-layer keys and values."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "layers"):  # DynamicCache
        return [t for layer in value.layers for t in (layer.keys, layer.values)]
    return [t for item in value for t in flatten(item)]


@pytest.mark.parametrize("head", ["base", "causal_lm", "sequence_classification"])
@pytest.mark.parametrize("how", ["call", "config"])
def test_return_dict_false_gives_the_dict_outputs_as_a_tuple(head, how):
    from pipeline.modeling import PipelineGPTModel

    causal = tiny()
    model = {"base": lambda: causal.model,
             "causal_lm": lambda: causal,
             "sequence_classification": lambda: PipelineGPTForSequenceClassification(causal.config).eval()}[head]()
    ids = tokens()
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, output_hidden_states=True)
    if head != "base":
        kwargs["labels"] = ids if head == "causal_lm" else torch.tensor([0, 1])
    with torch.no_grad():
        as_dict = model(**kwargs)
        if how == "call":
            as_tuple = model(**kwargs, return_dict=False)
        else:
            model.config.return_dict = False
            as_tuple = model(**kwargs)
            model.config.return_dict = True
    assert isinstance(as_tuple, tuple) and not hasattr(as_tuple, "keys")
    expected = [k for k, v in as_dict.items() if v is not None]  # transformers' to_tuple drops None fields
    assert expected == {"base": ["last_hidden_state", "past_key_values", "hidden_states"],
                        "causal_lm": ["loss", "logits", "past_key_values", "hidden_states"],
                        "sequence_classification": ["loss", "logits", "past_key_values", "hidden_states"]}[head]
    assert len(as_tuple) == len(expected)
    for name, value in zip(expected, as_tuple):
        left, right = flatten(as_dict[name]), flatten(value)
        assert len(left) == len(right) > 0, name
        for a, b in zip(left, right):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert isinstance(model, PipelineGPTModel) == (head == "base")
