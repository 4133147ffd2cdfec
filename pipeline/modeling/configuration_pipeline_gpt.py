"""PipelineGPT configuration.

This file travels with every saved model (Hub remote code): it imports only `transformers`, never `pipeline`.
Field names follow transformers' Llama config so tools that read `hidden_size`, `num_key_value_heads`, ... work.
"""

from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Every head is listed whatever head was saved, so one folder serves AutoModel, AutoModelForCausalLM and
# AutoModelForSequenceClassification (a reward model becomes a value model, an SFT model a reward model).
AUTO_MAP = {
    "AutoConfig": "configuration_pipeline_gpt.PipelineGPTConfig",
    "AutoModel": "modeling_pipeline_gpt.PipelineGPTModel",
    "AutoModelForCausalLM": "modeling_pipeline_gpt.PipelineGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_pipeline_gpt.PipelineGPTForSequenceClassification",
}

POSITION_EMBEDDINGS = ("rope", "learned")
NORM_TYPES = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post")
MLP_TYPES = ("gated", "plain")

# Presets are data: the architecture knobs of well-known families. Sizes come from the caller.
PRESETS = {
    # Llama 2/3: RoPE, RMSNorm before each block, SwiGLU, no biases, untied head.
    "llama": dict(
        position_embedding="rope", norm_type="rmsnorm", norm_position="pre", norm_eps=1e-6, mlp_type="gated",
        hidden_act="silu", attention_bias=False, mlp_bias=False, qk_norm=False, tie_word_embeddings=False,
    ),
    # GPT-2: learned absolute positions, LayerNorm before each block, plain GELU MLP (4x), biases, tied head.
    "gpt2": dict(
        position_embedding="learned", norm_type="layernorm", norm_position="pre", norm_eps=1e-5, mlp_type="plain",
        hidden_act="gelu_new", attention_bias=True, mlp_bias=True, qk_norm=False, tie_word_embeddings=True,
    ),
    # Qwen3/OLMo-2 style: the Llama block plus RMSNorm on queries and keys per head, tied head.
    "qk_norm": dict(
        position_embedding="rope", norm_type="rmsnorm", norm_position="pre", norm_eps=1e-6, mlp_type="gated",
        hidden_act="silu", attention_bias=False, mlp_bias=False, qk_norm=True, tie_word_embeddings=True,
    ),
}


class PipelineGPTConfig(PreTrainedConfig):
    r"""Configuration of a PipelineGPT decoder-only model.

    >>> config = PipelineGPTConfig.preset("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    """

    model_type = "pipeline_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 1024  # tokens in the vocabulary (rows of the embedding)
    hidden_size: int = 256  # width of the residual stream
    intermediate_size: int = 688  # width of the MLP's inner layer
    num_hidden_layers: int = 4  # decoder blocks
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int | None = None  # key/value heads: None = MHA, 1 = MQA, a divisor of the heads = GQA
    head_dim: int | None = None  # per-head width; None = hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # longest sequence (size of the learned position table)
    position_embedding: str = "rope"  # "rope" (rotary, see rope_parameters) or "learned" (absolute, GPT-2)
    rope_parameters: dict | None = None  # transformers' RoPE dict: rope_type, rope_theta, scaling factors
    norm_type: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_eps: float = 1e-6  # epsilon of every norm
    norm_position: str = "pre"  # "pre" (norm, sublayer, add) or "post" (sublayer, add, norm)
    mlp_type: str = "gated"  # "gated": down(act(gate(x)) * up(x)) (SwiGLU, GeGLU); "plain": down(act(up(x)))
    hidden_act: str = "silu"  # activation, any key of transformers.activations.ACT2FN
    qk_norm: bool = False  # normalise queries and keys per head before RoPE
    key_smear: int = 0  # mix into each key the keys of this many previous positions, with learned per-head
    # weights (smeared keys); 0 = off. One layer can then match "the token after an earlier copy of the tokens
    # before me", which small models otherwise learn slowly with two layers. Generation needs DynamicCache.
    attention_bias: bool = False  # biases on q/k/v/o projections
    mlp_bias: bool = False  # biases on MLP projections
    attention_dropout: float = 0.0  # dropout on attention probabilities (training only)
    hidden_dropout: float = 0.0  # dropout on embeddings and on each sublayer's output (training only)
    tie_word_embeddings: bool = True  # share the input embedding with the output head
    initializer_range: float = 0.02  # std of the normal initialisation
    use_cache: bool = True  # return the key/value cache for generation
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check_fields()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.position_embedding == "rope":
            rope_type = self.rope_parameters.get("rope_type", "default")
            if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(
                    f"rope_parameters.rope_type: unknown value {rope_type!r}; "
                    f"use 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}"
                )
            if self.head_dim % 2:
                raise ValueError(f"head_dim: rotary positions need an even head_dim, got {self.head_dim}")
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)

    def _check_fields(self):
        """Refuse combinations the model cannot build, naming the field at fault."""
        choices = {
            "position_embedding": POSITION_EMBEDDINGS,
            "norm_type": NORM_TYPES,
            "norm_position": NORM_POSITIONS,
            "mlp_type": MLP_TYPES,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}: unknown value {getattr(self, field)!r}; use one of {list(allowed)}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act: unknown activation {self.hidden_act!r}; use one of {sorted(ACT2FN)}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"{field}: must be a positive integer, got {getattr(self, field)!r}")
        if isinstance(self.key_smear, bool) or not isinstance(self.key_smear, int) or self.key_smear < 0:
            raise ValueError(f"key_smear: must be a number of previous keys (0 = off), got {self.key_smear!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: {self.num_attention_heads} heads do not divide hidden_size "
                f"{self.hidden_size}; pick a divisor or set head_dim explicitly"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} key/value heads do not divide "
                f"num_attention_heads {self.num_attention_heads}; use a divisor (1 = MQA)"
            )

    def validate_architecture(self):
        self._check_fields()

    @classmethod
    def preset(cls, name: str, **overrides) -> "PipelineGPTConfig":
        """A config with the architecture of a known family (`PRESETS`); sizes and any knob from `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown name {name!r}; use one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        if name == "gpt2" and "intermediate_size" not in overrides and "hidden_size" in overrides:
            fields["intermediate_size"] = 4 * overrides["hidden_size"]
        fields.update(overrides)
        return cls(**fields)


__all__ = ["PipelineGPTConfig", "PRESETS"]
