"""Model cards with Hub metadata, written from the stage lineage (manifests) of an artifact."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pipeline.artifacts import MANIFEST_NAME, read_manifest

METRIC_NAMES = {"exact_match": "exact match (held-out tasks)", "perplexity": "perplexity",
                "reward_accuracy": "pairwise reward accuracy", "mean_reward": "mean reward", "accuracy": "accuracy"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def lineage(source: str | Path) -> list[dict]:
    """The manifests from `source` back to the first stage, newest first (path added to each)."""
    chain, seen, path = [], set(), Path(source)
    while path is not None and (path / MANIFEST_NAME).is_file() and str(path) not in seen:
        seen.add(str(path))
        manifest = read_manifest(path)
        chain.append({"path": str(path), **{k: manifest.get(k) for k in (
            "stage", "artifact", "created", "base_model", "datasets", "metrics", "tokenizer_hash", "git_commit")}})
        parent = manifest.get("parent")
        path = Path(parent["path"]) if parent else None
    for entry in chain:  # long per-step histories stay in the manifests, not in the card
        entry["metrics"] = {k: v for k, v in (entry["metrics"] or {}).items() if not isinstance(v, (list, dict))}
    return chain


def licences(chain: list[dict]) -> list[str]:
    return sorted({d["license"] for entry in chain for d in entry.get("datasets") or [] if d.get("license")})


def model_card(chain: list[dict], *, head: str, format: str, repo_id: str | None = None,
               model_type: str = "pipeline_gpt") -> ModelCard:
    """The card of an export; `model_type` other than ours (a third-party family fine-tuned here) loads without
    remote code."""
    native = format == "llama" or model_type != "pipeline_gpt"
    found = licences(chain)
    datasets = sorted({d["name"] for entry in chain for d in entry.get("datasets") or [] if _HUB_ID.match(d["name"])})
    bases = [e["base_model"] for e in chain if e.get("base_model") and _HUB_ID.match(str(e["base_model"]))]
    results = []
    for key, title in METRIC_NAMES.items():
        value = chain[0]["metrics"].get(key) if chain else None
        if isinstance(value, (int, float)):
            results.append(EvalResult(task_type="text-generation" if head == "causal_lm" else "text-classification",
                                      dataset_type="demo-tasks" if key == "exact_match" else "held-out",
                                      dataset_name="held-out evaluation split", metric_type=key, metric_name=title,
                                      metric_value=float(value)))
    data = ModelCardData(
        license=found[0] if len(found) == 1 else "other", library_name="transformers",
        tags=(["pipeline-gpt", "custom_code"] if not native else [])
        + [chain[0]["stage"] if chain else "model"] + (["llama"] if format == "llama" else [])
        + ([model_type] if model_type != "pipeline_gpt" else []),
        datasets=datasets or None, base_model=bases[0] if bases else None,
        pipeline_tag="text-generation" if head == "causal_lm" else "text-classification",
        model_name=repo_id or "pipeline-gpt", eval_results=results or None,
    )
    remote = "" if native else ", trust_remote_code=True"
    loading = (f"AutoModelForCausalLM.from_pretrained(repo{remote})" if head == "causal_lm" else
               f"AutoModelForSequenceClassification.from_pretrained(repo{remote})")
    rows = "\n".join(f"| {e['stage']} | {e['artifact']} | {e['created']} | "
                     f"{', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in e['metrics'].items() if k in METRIC_NAMES or k == 'wall_seconds')} |"
                     for e in chain)
    data_rows = "\n".join(f"- {d['name']} ({d.get('license') or 'licence unknown'}, {d.get('rows')} rows) — {e['stage']}"
                          for e in chain for d in e.get("datasets") or [])
    body = f"""
# {repo_id or 'PipelineGPT model'}

A {'PipelineGPT' if model_type == 'pipeline_gpt' else model_type} {'causal language model' if head == 'causal_lm' else 'sequence classifier'}
{'exported as a plain `LlamaForCausalLM`' if format == 'llama' else 'with its modeling code included' if not native else 'in its native transformers architecture'}.

```python
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
repo = "{repo_id or 'path/to/this/folder'}"
model = {loading}
tokenizer = AutoTokenizer.from_pretrained(repo)
```

## Lineage (newest first)

| stage | artifact | created | metrics |
| --- | --- | --- | --- |
{rows}

## Training data

{data_rows or '- not recorded'}

Licences of the training data: {', '.join(found) or 'not recorded'}.
The full per-stage manifests (configs, package versions, git commit) are in `pipeline_lineage.json`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
