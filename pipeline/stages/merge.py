"""`pipeline merge`: fold a LoRA adapter into its base model and write a full model artifact."""

from __future__ import annotations

from pathlib import Path

from pipeline.adapters import merge_lora
from pipeline.artifacts import StageOutput, build_manifest, read_manifest
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import ConfigError


def merge_adapter(adapter_dir: str, output_dir: str, *, overwrite: bool = False) -> Path:
    """Load `adapter_dir` on its recorded base, merge the LoRA weights, save a plain model + tokenizer."""
    parent = read_manifest(adapter_dir)
    if parent["artifact"] != "adapter":
        raise ConfigError(f"{adapter_dir}: holds a full model ({parent['stage']} stage), not an adapter: nothing to merge")
    merged = merge_lora(adapter_dir)
    tokenizer = load_tokenizer(adapter_dir)
    with StageOutput(output_dir, overwrite=overwrite) as out:
        merged.save_pretrained(out.work)
        tokenizer.save_pretrained(out.work)
        out.finish(build_manifest("merge", artifact="model", config={"adapter_dir": adapter_dir},
                                  parent_dir=adapter_dir, base_model=parent.get("base_model"), tokenizer=tokenizer,
                                  metrics=dict(parent.get("metrics", {}))))
    return Path(output_dir)
