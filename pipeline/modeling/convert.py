"""Weight and config conversion between PipelineGPT and transformers' Llama and GPT-2.

PipelineGPT uses Llama's parameter names, so Llama conversion is a config translation; GPT-2 stores its
projections as Conv1D (transposed) with fused q/k/v, so its weights are split and transposed.
"""

import torch
from transformers import GPT2Config, LlamaConfig

from .configuration_pipeline_gpt import PipelineGPTConfig

_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def config_from_llama(llama: LlamaConfig) -> PipelineGPTConfig:
    return PipelineGPTConfig.preset(
        "llama",
        vocab_size=llama.vocab_size,
        hidden_size=llama.hidden_size,
        intermediate_size=llama.intermediate_size,
        num_hidden_layers=llama.num_hidden_layers,
        num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads,
        head_dim=llama.head_dim,
        max_position_embeddings=llama.max_position_embeddings,
        rope_parameters=dict(llama.rope_parameters),
        norm_eps=llama.rms_norm_eps,
        hidden_act=llama.hidden_act,
        attention_bias=llama.attention_bias,
        mlp_bias=llama.mlp_bias,
        tie_word_embeddings=llama.tie_word_embeddings,
        initializer_range=llama.initializer_range,
        **{name: getattr(llama, name) for name in _TOKEN_IDS},
    )


def llama_incompatibilities(config: PipelineGPTConfig) -> list[str]:
    """Reasons a PipelineGPT config cannot be expressed as a LlamaConfig (empty when it can)."""
    wanted = {
        "position_embedding": "rope",
        "norm_type": "rmsnorm",
        "norm_position": "pre",
        "mlp_type": "gated",
        "qk_norm": False,
        "key_smear": 0,
        "hidden_dropout": 0.0,
    }
    return [
        f"{field}={getattr(config, field)!r} (Llama has {value!r})"
        for field, value in wanted.items()
        if getattr(config, field) != value
    ]


def llama_config_from(config: PipelineGPTConfig) -> LlamaConfig:
    """The LlamaConfig with the same architecture; ValueError listing every mismatch when there is none."""
    reasons = llama_incompatibilities(config)
    if reasons:
        raise ValueError("this PipelineGPT architecture has no Llama equivalent: " + "; ".join(reasons))
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters),
        rms_norm_eps=config.norm_eps,
        hidden_act=config.hidden_act,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        attention_dropout=config.attention_dropout,
        tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
        **{name: getattr(config, name) for name in _TOKEN_IDS},
    )


def config_from_gpt2(gpt2: GPT2Config) -> PipelineGPTConfig:
    if gpt2.scale_attn_by_inverse_layer_idx or gpt2.reorder_and_upcast_attn or not gpt2.scale_attn_weights:
        raise ValueError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, "
                         "scale_attn_weights=False) have no PipelineGPT equivalent")
    return PipelineGPTConfig.preset(
        "gpt2",
        vocab_size=gpt2.vocab_size,
        hidden_size=gpt2.n_embd,
        intermediate_size=gpt2.n_inner or 4 * gpt2.n_embd,
        num_hidden_layers=gpt2.n_layer,
        num_attention_heads=gpt2.n_head,
        max_position_embeddings=gpt2.n_positions,
        norm_eps=gpt2.layer_norm_epsilon,
        hidden_act=gpt2.activation_function,
        attention_dropout=gpt2.attn_pdrop,
        hidden_dropout=gpt2.resid_pdrop,
        tie_word_embeddings=gpt2.tie_word_embeddings,
        initializer_range=gpt2.initializer_range,
        **{name: getattr(gpt2, name) for name in _TOKEN_IDS},
    )


def state_dict_from_gpt2(gpt2_state: dict[str, torch.Tensor], config: PipelineGPTConfig) -> dict[str, torch.Tensor]:
    """Map a GPT2LMHeadModel state dict onto PipelineGPTForCausalLM names."""
    sd = {k.removeprefix("transformer."): v for k, v in gpt2_state.items()}
    width = config.hidden_size
    out = {
        "model.embed_tokens.weight": sd["wte.weight"],
        "model.embed_positions.weight": sd["wpe.weight"],
        "model.norm.weight": sd["ln_f.weight"],
        "model.norm.bias": sd["ln_f.bias"],
        "lm_head.weight": sd.get("lm_head.weight", sd["wte.weight"]),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"h.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.c_attn.weight"].split(width, dim=1)  # Conv1D stores (in, out)
        qb, kb, vb = sd[src + "attn.c_attn.bias"].split(width)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[dst + f"self_attn.{name}.weight"] = w.t().contiguous()
            out[dst + f"self_attn.{name}.bias"] = b
        conv1d = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
        for gpt2_name, name in conv1d.items():
            out[dst + name + ".weight"] = sd[src + gpt2_name + ".weight"].t().contiguous()
            out[dst + name + ".bias"] = sd[src + gpt2_name + ".bias"]
        for gpt2_name, name in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[dst + name + ".weight"] = sd[src + gpt2_name + ".weight"]
            out[dst + name + ".bias"] = sd[src + gpt2_name + ".bias"]
    return out
