"""PipelineGPT: a decoder-only transformer whose architecture is chosen by its config.

This file travels with every saved model (Hub remote code): it imports only `torch`, `transformers` and its sibling
configuration file. Module and parameter names follow transformers' Llama (`model.layers.N.self_attn.q_proj`, ...)
so PEFT target names, tensor-parallel plans and the Llama-format export work without renaming.
"""

from collections.abc import Callable

import torch
from torch import nn

# ---- transformers internals this file depends on (all in one place on purpose) -------------------------------------
# Remote code may import only `torch`, absolute `transformers.*` modules and the sibling config below. Several of
# these names are semi-private (not in transformers' top-level namespace) and move between minor releases: this
# block is what to check when pyproject's `transformers` pin is raised. Verified against transformers 5.23.
from transformers import initialization as init  # init.normal_/copy_: respected by meta-device loading
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask  # semi-private
from transformers.modeling_layers import GradientCheckpointingLayer  # semi-private
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update  # semi-private
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep  # semi-private
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults  # semi-private decorators
from transformers.utils.generic import is_flash_attention_requested  # semi-private: "flash" in the implementation
from transformers.utils.output_capturing import capture_outputs  # semi-private: fills hidden_states/attentions
# ----------------------------------------------------------------------------------------------------------------------

from .configuration_pipeline_gpt import PipelineGPTConfig


class PipelineGPTRMSNorm(nn.Module):
    """RMSNorm computed in float32 (as Llama does) so half-precision training stays stable."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def build_norm(config: PipelineGPTConfig, size: int) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return PipelineGPTRMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps)


class PipelineGPTRotaryEmbedding(nn.Module):
    """cos/sin tables for rotary positions; any transformers rope_type (linear, dynamic, yarn, llama3, ...) works.

    The name ends in RotaryEmbedding and keeps `original_inv_freq` on purpose: transformers' `_init_weights`
    recognises both and rebuilds these non-persistent buffers after a meta-device load.
    """

    def __init__(self, config: PipelineGPTConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: PipelineGPTConfig, device=None, seq_len=None):
        dim = config.head_dim
        base = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads: (B, 1, T, D)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention (B, H, T, D); keys/values repeated for grouped-query attention."""
    groups = module.num_key_value_groups
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, H, D)
    return out, probs


def packed_segments(position_ids: torch.Tensor, batch_size: int) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) spans of the sequences packed into it: a sequence starts wherever the position id
    does not continue the previous one (padding-free packing restarts positions at 0 for each sequence)."""
    rows = position_ids.expand(batch_size, -1).tolist()
    spans = []
    for row in rows:
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1] + 1]
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def sequence_starts(position_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, T) bool, True where a packed sequence starts: at each row's first token and wherever the position id does
    not continue the previous one (the rule of packed_segments, on the device, without a host sync)."""
    positions = position_ids.expand(batch_size, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return starts


def varlen_boundaries(position_ids: torch.Tensor, batch_size: int) -> dict:
    """The variable-length kwargs of transformers' flash-attention integration for packed rows: cumulative sequence
    lengths over the B*T tokens flattened row after row (a row start always starts a sequence) and the longest one.

    transformers derives them from position ids by itself only for a single row, and then in every layer; a
    padding-free collator (TRL's) computes them on the CPU and they arrive in `**kwargs` instead.
    """
    starts = sequence_starts(position_ids, batch_size).flatten()
    ends = starts.new_tensor([starts.numel()], dtype=torch.long)
    cu_seqlens = torch.cat([starts.nonzero().flatten(), ends]).to(torch.int32)
    longest = int(cu_seqlens.diff().max())
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": longest, "max_length_k": longest}


def document_block_mask(position_ids: torch.Tensor, batch_size: int, device: torch.device):
    """A flex-attention BlockMask for packed rows: a token attends to earlier tokens of its own sequence only.

    Blocks that straddle no sequence boundary are skipped or run unmasked by the kernel, so the cost follows the
    sum of the squared sequence lengths rather than the row's. Compiled on a GPU, where the uncompiled builder would
    hold the whole (B, T, T) mask; uncompiled elsewhere (compiling takes seconds on a CPU, and CPU rows are short).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    documents = sequence_starts(position_ids, batch_size).cumsum(-1).to(device)  # (B, T) sequence index per token

    def same_sequence_causal(b, h, q_idx, kv_idx):
        return (documents[b, q_idx] == documents[b, kv_idx]) & (q_idx >= kv_idx)

    build = torch.compile(create_block_mask) if device.type == "cuda" else create_block_mask
    length = documents.shape[1]
    return build(same_sequence_causal, B=batch_size, H=None, Q_LEN=length, KV_LEN=length, device=device)


def segment_attention(query, key, value, segments, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention inside each packed sequence only, sequence by sequence, (B, H, T, D) in, (B, T, H, D) out.

    A block-diagonal mask over the whole row costs T^2 per head; attending span by span costs the sum of the
    squared lengths and lets SDPA use its causal kernel without a mask.
    """
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, spans in enumerate(segments):
        rows.append(torch.cat([
            nn.functional.scaled_dot_product_attention(
                query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], is_causal=True,
                dropout_p=dropout, scale=scaling, enable_gqa=gqa)
            for s, e in spans], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()


def cached_previous_keys(cache: Cache | None, layer_idx: int, like: torch.Tensor, count: int) -> torch.Tensor:
    """The unsmeared keys of the last `count` cached positions, (B, Hkv, count, D), zeros where fewer are cached.

    With smeared keys the cache holds [smeared key | own key] along the last dim (see PipelineGPTAttention), so
    a new token can mix in its predecessors' own keys. Only transformers' DynamicCache layout is read.
    """
    width = like.shape[-1]
    previous = like.new_zeros(*like.shape[:2], count, width)
    cached = cache.get_seq_length(layer_idx) if cache is not None else 0
    if cached == 0:
        return previous
    layer = cache.layers[layer_idx]
    if type(layer) is not DynamicLayer or layer.keys.shape[-1] != 2 * width:
        raise ValueError(
            f"key_smear: generation needs transformers' DynamicCache (the default), got {type(cache).__name__} "
            f"with {type(layer).__name__}; drop cache_implementation or generate without key_smear"
        )
    kept = min(count, cached)
    previous[:, :, count - kept:] = layer.keys[..., cached - kept:, width:]
    return previous


def smear_keys(keys: torch.Tensor, previous: torch.Tensor, logits: torch.Tensor,
               position_ids: torch.Tensor | None) -> torch.Tensor:
    """sum_i w_i * k_(t-i) per key head, i = 0..n, w = softmax(logits[head]) of shape (Hkv, n + 1).

    `previous` holds the n keys before the first of `keys` (oldest first). A key i steps back is only mixed in
    where the position id is at least i: position 0 starts a sequence (a packed document, or the first real
    token after left padding), so nothing crosses sequences.
    """
    count, length = previous.shape[2], keys.shape[2]
    extended = torch.cat([previous, keys], dim=2)  # (B, Hkv, n + T, D)
    weights = torch.softmax(logits.float(), dim=-1).to(keys.dtype)  # (Hkv, n + 1)
    out = keys * weights[:, 0].view(1, -1, 1, 1)
    for back in range(1, count + 1):
        shifted = extended[:, :, count - back:count - back + length]
        if position_ids is not None:
            shifted = shifted.masked_fill((position_ids < back).to(keys.device)[:, None, :, None], 0.0)
        out = out + shifted * weights[:, back].view(1, -1, 1, 1)
    return out


class PipelineGPTAttention(nn.Module):
    """Multi-head attention with grouped key/value heads (MHA, GQA, MQA), optional QK-norm and rotary positions."""

    def __init__(self, config: PipelineGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_width, kv_width = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_bias)
        self.q_norm = build_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = build_norm(config, self.head_dim) if config.qk_norm else None
        self.key_smear = None
        if config.key_smear:  # mixing logits per key head: own key, then 1, 2, ... positions back
            self.key_smear = nn.Parameter(torch.zeros(config.num_key_value_heads, config.key_smear + 1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_time = hidden_states.shape[:-1]
        split_heads = (*batch_time, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(split_heads)  # (B, T, H, D)
        k = self.k_proj(hidden_states).view(split_heads)  # (B, T, Hkv, D)
        v = self.v_proj(hidden_states).view(split_heads).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if position_embeddings is not None:
            q, k = apply_rotary(q, k, *position_embeddings)
        if self.key_smear is not None:
            previous = cached_previous_keys(past_key_values, self.layer_idx, k, self.key_smear.shape[1] - 1)
            own, k = k, smear_keys(k, previous, self.key_smear, kwargs.get("position_ids"))
            if past_key_values is not None:
                both, v = past_key_values.update(torch.cat([k, own], dim=-1), v, self.layer_idx)
                k = both[..., : self.head_dim]
        elif past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        segments = kwargs.pop("packed_segments", None)
        if segments is not None:
            dropout = self.attention_dropout if self.training else 0.0
            out = segment_attention(q, k, v, segments, self.scaling, dropout)
            return self.o_proj(out.reshape(*batch_time, -1)), None

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(*batch_time, -1).contiguous()), weights


class PipelineGPTMLP(nn.Module):
    """Gated (SwiGLU/GeGLU: down(act(gate(x)) * up(x))) or plain (down(act(up(x)))) feed-forward block."""

    def __init__(self, config: PipelineGPTConfig):
        super().__init__()
        width, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(width, inner, bias=config.mlp_bias) if config.mlp_type == "gated" else None
        self.up_proj = nn.Linear(width, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, width, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PipelineGPTDecoderLayer(GradientCheckpointingLayer):
    """One block: attention then MLP, each with a residual; the norm sits before ("pre") or after ("post")."""

    def __init__(self, config: PipelineGPTConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = PipelineGPTAttention(config, layer_idx)
        self.mlp = PipelineGPTMLP(config)
        self.input_layernorm = build_norm(config, config.hidden_size)
        self.post_attention_layernorm = build_norm(config, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self.pre_norm:
            attn, _ = self.self_attn(
                self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values, **kwargs
            )
            hidden_states = hidden_states + self.dropout(attn)
            return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        attn, _ = self.self_attn(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        hidden_states = self.input_layernorm(hidden_states + self.dropout(attn))
        return self.post_attention_layernorm(hidden_states + self.dropout(self.mlp(hidden_states)))


# Initial mixing logit of a key's own part (the previous keys' start at 0): with one previous key a smeared key
# starts as 0.73 its own and 0.27 its predecessor's.
KEY_SMEAR_OWN_INIT = 1.0


class PipelineGPTPreTrainedModel(PreTrainedModel):
    config: PipelineGPTConfig
    config_class = PipelineGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PipelineGPTDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": PipelineGPTDecoderLayer, "attentions": PipelineGPTAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # GPT-2's scaled init: projections that write into the residual stream get std / sqrt(2 * layers),
        # so the stream's variance does not grow with depth.
        if isinstance(module, (PipelineGPTAttention, PipelineGPTMLP)):
            proj = module.o_proj if isinstance(module, PipelineGPTAttention) else module.down_proj
            std = self.config.initializer_range / (2 * self.config.num_hidden_layers) ** 0.5
            init.normal_(proj.weight, mean=0.0, std=std)
        if isinstance(module, PipelineGPTAttention) and module.key_smear is not None:
            start = torch.zeros_like(module.key_smear)
            start[:, 0] = KEY_SMEAR_OWN_INIT
            init.copy_(module.key_smear, start)


class PipelineGPTModel(PipelineGPTPreTrainedModel):
    """The decoder stack without a head: embeddings, blocks, final norm."""

    def __init__(self, config: PipelineGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        learned = config.position_embedding == "learned"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        self.rotary_emb = None if learned else PipelineGPTRotaryEmbedding(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(PipelineGPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        # Post-norm blocks already end in a norm; a final one would normalise twice.
        self.norm = build_norm(config, config.hidden_size) if config.norm_position == "pre" else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("PipelineGPTModel.forward: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)

        # Position ids without an attention mask mean packed rows: a cache would switch off the mask that keeps
        # them apart, so none is built implicitly then (nor while training, where it is never read).
        packed_call = position_ids is not None and attention_mask is None
        if use_cache and past_key_values is None and not self.training and not packed_call:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        # Packed rows keep their sequences apart: under SDPA sequence by sequence (see segment_attention), under
        # flash attention through its variable-length kernel (sequence boundaries from the collator, else from the
        # position ids), under flex attention through a block mask of the sequences; eager gets transformers' mask.
        implementation, batch = self.config._attn_implementation, inputs_embeds.shape[0]
        packed_rows = packed_call and past_key_values is None
        segments, mask = None, None
        if packed_rows and implementation == "sdpa":
            segments = packed_segments(position_ids, batch)
            kwargs["packed_segments"] = segments
        elif packed_rows and implementation == "flex_attention":
            mask = document_block_mask(position_ids, batch, inputs_embeds.device)
        else:
            if packed_rows and is_flash_attention_requested(self.config) and "cu_seq_lens_q" not in kwargs:
                kwargs.update(varlen_boundaries(position_ids, batch))
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
            )
        hidden_states = inputs_embeds
        position_embeddings = None
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids.clamp(min=0))
        else:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        hidden_states = self.dropout(hidden_states)

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class PipelineGPTForCausalLM(PipelineGPTPreTrainedModel, GenerationMixin):
    """Language-model head on the decoder; the head shares the embedding when `tie_word_embeddings`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: PipelineGPTConfig):
        super().__init__(config)
        self.model = PipelineGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple  # return_dict=False (call or config) gives transformers' tuple: (loss?, logits, cache?, ...)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # the head reads fields; its own tuple (if asked) comes from can_return_tuple
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class PipelineGPTForSequenceClassification(PipelineGPTPreTrainedModel):
    """A score per sequence read at its last real token: classifier, reward model (num_labels=1), value model.

    The backbone is built directly rather than through AutoModel, which would need `trust_remote_code` again.
    The last real token comes from the attention mask when there is one, so it is right whether padding is on the
    left or the right and even when the pad token is also the EOS token.
    """

    def __init__(self, config: PipelineGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PipelineGPTModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,  # the head reads fields; its own tuple (if asked) comes from can_return_tuple
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # (B, T, num_labels)
        batch, length = logits.shape[:2]
        positions = torch.arange(length, device=logits.device)
        if attention_mask is not None and attention_mask.ndim == 2:
            last = (positions * attention_mask[:, -length:].to(logits.device).long()).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = (input_ids != self.config.pad_token_id).to(logits.device).long()
            last = (positions * real).argmax(-1)
        elif batch == 1:
            last = torch.full((batch,), length - 1, device=logits.device)
        else:
            raise ValueError(
                "PipelineGPTForSequenceClassification: a batch of several sequences needs an attention_mask or "
                "config.pad_token_id to find each sequence's last token"
            )
        pooled = logits[torch.arange(batch, device=logits.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "PipelineGPTPreTrainedModel",
    "PipelineGPTModel",
    "PipelineGPTForCausalLM",
    "PipelineGPTForSequenceClassification",
]
