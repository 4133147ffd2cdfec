"""Fine-tuning methods chosen in YAML (full, LoRA, QLoRA, freeze, prompt tuning) and loading stage outputs with
their adapters merged.

`load_for_method` returns the model to train (a PEFT model for the adapter methods) so every stage that fine-tunes
picks a method the same way; `merge_lora`, `full_weights_dir` and `merged_for_saving` are the one way a LoRA
adapter is folded into full weights (by stages, `pipeline merge` and export alike).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from pipeline.artifacts import artifact_kind, write_once
from pipeline.data.chat_templates import generation_eos
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import ConfigError

METHODS = ("full", "lora", "qlora", "freeze", "prompt_tuning")
ADAPTER_METHODS = ("lora", "qlora", "prompt_tuning")


@dataclass
class MethodArguments:
    method: str = field(default="full", metadata={"help": f"fine-tuning method: {', '.join(METHODS)}"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "'all-linear' or comma-separated module names, e.g. q_proj,v_proj"})
    freeze_trainable_layers: int = field(default=1, metadata={"help": "freeze: train only the last N decoder layers"})
    freeze_trainable_modules: str = field(default="", metadata={
        "help": "freeze: also train parameters whose names contain any of these (comma-separated, e.g. norm,lm_head)"})
    lora_train_special_tokens: bool = field(default=True, metadata={
        "help": "LoRA/QLoRA: also train the input embeddings of the tokenizer's special tokens (the chat role "
                "markers a base model pretrained on plain text has never seen); the rest stays frozen"})
    chat_template: str | None = field(default=None, metadata={
        "help": "the tokenizer's own template (default), a built-in name (pipeline, chatml, llama3, zephyr, mistral, "
                "gemma) or a path to a Jinja file; saved with the output's tokenizer"})
    num_virtual_tokens: int = field(default=16, metadata={"help": "prompt tuning: learned prefix length"})
    prompt_tuning_init_text: str | None = field(default=None, metadata={
        "help": "prompt tuning: initialise the prefix from this text's embeddings (random when unset)"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")

    @property
    def is_adapter(self) -> bool:
        return self.method in ADAPTER_METHODS


def quantization_config() -> BitsAndBytesConfig:
    """4-bit NF4 with double quantisation (QLoRA); computes in bf16 on GPUs that have it, else float32."""
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if gpu_bf16 else torch.float32)


def load_for_method(path: str, method: MethodArguments, tokenizer=None, model_class=AutoModelForCausalLM, *,
                    seed: int, **kwargs):
    """The model at `path`, prepared for `method.method` (PEFT-wrapped for the adapter methods).

    Seeds first: new weights (LoRA matrices, prompt embeddings, a fresh score head) must be the same in a run and
    in its resumed twin, and Trainer seeds only after the model exists.
    """
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    set_seed(seed)

    if Path(path).is_dir():  # adapters record their base: an absolute path loads from any working directory
        path = str(Path(path).resolve())
    if method.method == "qlora":
        kwargs["quantization_config"] = quantization_config()
    model = model_class.from_pretrained(path, **kwargs)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # a built-in chat template added its role tokens: new rows start at the mean embedding
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None and getattr(model, "generation_config", None) is not None:
        # generation (ours, TRL's GRPO, whoever loads the saved output) stops at the template's end of turn too
        model.generation_config.eos_token_id = generation_eos(tokenizer)
    task_type = "SEQ_CLS" if "SequenceClassification" in type(model).__name__ else "CAUSAL_LM"
    if method.method == "full":
        return model
    if method.method == "freeze":
        return freeze_all_but(model, method.freeze_trainable_layers, _names(method.freeze_trainable_modules))
    if method.method == "prompt_tuning":
        init = {"prompt_tuning_init": PromptTuningInit.RANDOM}
        if method.prompt_tuning_init_text:
            init = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": method.prompt_tuning_init_text,
                    "tokenizer_name_or_path": path}
        return get_peft_model(model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens,
                                                        **init))
    if method.method == "qlora":
        check_cpu_4bit_shapes(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = method.lora_target_modules
    targets = targets if targets == "all-linear" else _names(targets)
    train_tokens = special_token_ids(tokenizer) if method.lora_train_special_tokens else None
    if train_tokens and task_type == "CAUSAL_LM" and getattr(model.config, "tie_word_embeddings", False):
        # PEFT 0.21 wraps a tied output head in a TrainableTokensWrapper, which TRL 1.16's fused LM head cannot read
        print("lora_train_special_tokens: off for a model with tied input and output embeddings (PEFT 0.21 with "
              "TRL 1.16 cannot train them); special-token embeddings stay as loaded")
        train_tokens = None
    config = LoraConfig(task_type=task_type, r=method.lora_r, lora_alpha=method.lora_alpha,
                        lora_dropout=method.lora_dropout, target_modules=targets, trainable_token_indices=train_tokens)
    return get_peft_model(model, config)


def special_token_ids(tokenizer) -> list[int] | None:
    """Ids of the tokenizer's special tokens except padding: under LoRA their embeddings would otherwise stay at
    their random initialisation when the base model never saw them (role markers, bos). None without a tokenizer."""
    if tokenizer is None:
        return None
    ids = sorted(set(tokenizer.all_special_ids) - {tokenizer.pad_token_id})
    return ids or None


CPU_4BIT_BLOCK = 64  # bitsandbytes 0.50's CPU 4-bit kernel packs each weight row in blocks of 64 inputs


def check_cpu_4bit_shapes(model) -> None:
    """bitsandbytes 0.50 fails deep inside its CPU kernel ("shape '[32, 0]' is invalid") when a quantised layer's
    input size is not a multiple of 64; say so up front, naming the layer."""
    if torch.cuda.is_available():
        return
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.in_features % CPU_4BIT_BLOCK:
            raise ConfigError(
                f"method: qlora on CPU needs every quantised layer's input size to be a multiple of "
                f"{CPU_4BIT_BLOCK}, but {name} takes {module.in_features}; use hidden_size and intermediate_size "
                f"multiples of {CPU_4BIT_BLOCK}, a GPU, or method: lora")


def freeze_all_but(model, last_layers: int, module_names: list[str]):
    """Train only the last `last_layers` decoder layers and parameters whose names contain one of `module_names`."""
    layers = model.model.layers
    if not 0 <= last_layers <= len(layers):
        raise ConfigError(f"freeze_trainable_layers: {last_layers} is not between 0 and the model's {len(layers)} layers")
    trainable = {f"model.layers.{i}." for i in range(len(layers) - last_layers, len(layers))}
    for name, param in model.named_parameters():
        param.requires_grad = any(name.startswith(p) for p in trainable) or any(m in name for m in module_names)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("freeze: nothing left to train; raise freeze_trainable_layers or name modules to train")
    return model


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def count_trainable(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def merged_for_saving(model):
    """A plain transformers model to save: LoRA merged into the weights; other models as they are.

    Alignment stages start from a merged SFT model, so their LoRA adapters have no persistent base to point at.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if type(model.peft_config[model.active_adapter]).__name__ != "LoraConfig":
            raise ConfigError("method: only LoRA adapters can be merged into a saved alignment model")
        return model.merge_and_unload()
    return model


def merge_lora(adapter_dir: str | Path):
    """The causal LM of a saved LoRA adapter folder, loaded on its recorded base with the adapter merged in."""
    from peft import AutoPeftModelForCausalLM, PeftConfig

    kind = PeftConfig.from_pretrained(str(adapter_dir)).peft_type
    if kind != "LORA":
        raise ConfigError(f"{adapter_dir}: a {kind} adapter cannot be merged into the weights; only LoRA adapters can "
                         "(prompt tuning keeps its virtual tokens)")
    return AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).merge_and_unload()


def full_weights_dir(path: str, scratch: Path) -> str:
    """A folder holding full weights for `path`: itself, or (for a LoRA adapter stage output) its merge, written
    with its tokenizer to `scratch`."""
    if artifact_kind(path) != "adapter":
        return path

    def merge() -> None:
        merge_lora(path).save_pretrained(scratch)
        load_tokenizer(path).save_pretrained(scratch)
        (Path(scratch) / ".merged").touch()  # last: a folder without it is a merge cut short

    write_once(merge, done=lambda: (Path(scratch) / ".merged").is_file())  # rank 0 merges, the others wait
    return str(scratch)
