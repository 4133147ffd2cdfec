"""PipelineGPT, registered with transformers' Auto classes on import.

After `import pipeline`, `AutoConfig.for_model("pipeline_gpt")` and every `AutoModel*.from_config/from_pretrained`
resolve to these classes; saved folders also carry the two modeling files so they load without this package
(`trust_remote_code=True`).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_pipeline_gpt import PRESETS, PipelineGPTConfig
from .modeling_pipeline_gpt import (
    PipelineGPTForCausalLM,
    PipelineGPTForSequenceClassification,
    PipelineGPTModel,
    PipelineGPTPreTrainedModel,
)

_AUTO_CLASSES = {
    PipelineGPTModel: AutoModel,
    PipelineGPTForCausalLM: AutoModelForCausalLM,
    PipelineGPTForSequenceClassification: AutoModelForSequenceClassification,
}


def register() -> None:
    """Register PipelineGPT with the Auto classes and mark it for remote-code export (idempotent)."""
    AutoConfig.register(PipelineGPTConfig.model_type, PipelineGPTConfig, exist_ok=True)
    PipelineGPTConfig.register_for_auto_class("AutoConfig")
    for model_class, auto_class in _AUTO_CLASSES.items():
        auto_class.register(PipelineGPTConfig, model_class, exist_ok=True)
        # save_pretrained copies the modeling files beside the weights for classes marked this way.
        model_class.register_for_auto_class(auto_class.__name__)


register()

__all__ = [
    "PRESETS",
    "PipelineGPTConfig",
    "PipelineGPTForCausalLM",
    "PipelineGPTForSequenceClassification",
    "PipelineGPTModel",
    "PipelineGPTPreTrainedModel",
    "register",
]
