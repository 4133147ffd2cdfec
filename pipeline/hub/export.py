"""Hub-ready exports of a stage output: merged weights, remote code, tokenizer, generation config, model card,
lineage; or a plain `LlamaForCausalLM` folder when the architecture has a Llama equivalent.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.adapters import merge_lora
from pipeline.artifacts import StageOutput, build_manifest, chat_template_hash, read_manifest
from pipeline.data.chat_templates import ChatTemplateError, check_train_serve_parity, generation_eos
from pipeline.hub.model_card import lineage, model_card
from pipeline.errors import ConfigError

FORMATS = ("pipeline", "llama")


def _load(source: Path):
    """The model of a stage output, LoRA merged; (model, tokenizer, head) with head 'causal_lm' or 'sequence_classification'."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import pipeline  # noqa: F401  (registers PipelineGPT)

    tokenizer = AutoTokenizer.from_pretrained(source)
    if (source / "adapter_config.json").is_file():
        return merge_lora(source), tokenizer, "causal_lm"
    config = AutoConfig.from_pretrained(source)
    if any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return AutoModelForSequenceClassification.from_pretrained(source), tokenizer, "sequence_classification"
    return AutoModelForCausalLM.from_pretrained(source), tokenizer, "causal_lm"


def export_model(source: str | Path, output_dir: str | Path, *, format: str = "pipeline", overwrite: bool = False,
                 repo_id: str | None = None) -> Path:
    """Write `source` (a finished stage output) as a self-contained Hub folder at `output_dir`."""
    if format not in FORMATS:
        raise ConfigError(f"format: {format!r} is not one of {', '.join(FORMATS)}")
    source = Path(source)
    manifest = read_manifest(source)
    model, tokenizer, head = _load(source)
    if format == "llama":
        model = _as_llama(model, head)
    if head == "causal_lm":
        check_chat_template(source, manifest, tokenizer)
        # generation stops at the end of turn (and eos) wherever the model is loaded
        model.generation_config.update(eos_token_id=generation_eos(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                       bos_token_id=tokenizer.bos_token_id)
    with StageOutput(output_dir, overwrite=overwrite) as out:
        model.save_pretrained(out.work)  # safetensors; PipelineGPT adds auto_map and its two modeling files
        tokenizer.save_pretrained(out.work)
        chain = lineage(source)
        (out.work / "pipeline_lineage.json").write_text(json.dumps(chain, indent=2, ensure_ascii=False) + "\n")
        card = model_card(chain, head=head, format=format, repo_id=repo_id, model_type=model.config.model_type)
        card.save(out.work / "README.md")
        out.finish(build_manifest("export", artifact="model", config={"source": str(source), "format": format},
                                  parent_dir=source, base_model=manifest.get("base_model"), tokenizer=tokenizer,
                                  datasets=manifest.get("datasets", []), metrics=manifest.get("metrics", {})))
    return Path(output_dir)


def check_chat_template(source: Path, manifest: dict, tokenizer) -> None:
    """The exported tokenizer serves with the template the model was trained with, and that template renders
    prompts exactly as training saw them (see `check_train_serve_parity`)."""
    recorded = manifest.get("chat_template_hash")
    if recorded and chat_template_hash(tokenizer) != recorded:
        raise ChatTemplateError(f"{source}: the tokenizer's chat template differs from the one this model was trained "
                                f"with (hash {chat_template_hash(tokenizer)[:12]} vs {recorded[:12]} in "
                                f"{source / 'pipeline_manifest.json'}); restore the trained tokenizer files")
    if tokenizer.chat_template:
        check_train_serve_parity(tokenizer)


def _as_llama(model, head: str):
    """A LlamaForCausalLM with the same weights; ValueError with the reasons when the architecture differs."""
    from transformers import LlamaForCausalLM

    from pipeline.modeling.convert import llama_config_from

    if head != "causal_lm":
        raise ConfigError("format llama: only causal language models export to LlamaForCausalLM")
    try:
        config = llama_config_from(model.config)  # raises with every reason it cannot
    except ValueError as e:
        raise ConfigError(f"format llama: {e}") from None
    llama = LlamaForCausalLM(config)
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"format llama: weights do not map (missing {missing}, unexpected {unexpected})")
    llama.generation_config = model.generation_config
    return llama


def list_export_files(folder: str | Path) -> list[str]:
    """Files a push uploads (relative paths, sorted); the manifest and lineage are included, caches are not."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith("."))

