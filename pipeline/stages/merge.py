"""`pipeline merge`: fold a LoRA adapter into its base model and write a full model artifact."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.tokenizer import load_tokenizer
from pipeline.hub.manifest import build_manifest, read_manifest
from pipeline.stages.common import StageOutput


def merge_adapter(adapter_dir: str, output_dir: str, *, overwrite: bool = False) -> Path:
    """Load `adapter_dir` on its recorded base, merge the LoRA weights, save a plain model + tokenizer."""
    from peft import AutoPeftModelForCausalLM

    parent = read_manifest(adapter_dir)
    if parent["artifact"] != "adapter":
        raise ValueError(f"{adapter_dir}: holds a full model ({parent['stage']} stage), not an adapter: nothing to merge")
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    if type(model.peft_config["default"]).__name__ != "LoraConfig":
        raise ValueError(f"{adapter_dir}: a {type(model.peft_config['default']).__name__} adapter cannot be merged "
                         "into the weights; only LoRA adapters can (prompt tuning keeps its virtual tokens)")
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer(adapter_dir)
    with StageOutput(output_dir, overwrite=overwrite) as out:
        merged.save_pretrained(out.work)
        tokenizer.save_pretrained(out.work)
        out.finish(build_manifest("merge", artifact="model", config={"adapter_dir": adapter_dir},
                                  parent_dir=adapter_dir, base_model=parent.get("base_model"), tokenizer=tokenizer,
                                  metrics=dict(parent.get("metrics", {}))))
    return Path(output_dir)
