"""Stage lineage: `pipeline_manifest.json`, written last into every stage output (its presence means "complete").

Fields: format, stage, created, artifact ("model" | "adapter" | "tokenizer"), parent {path, stage, manifest_sha256},
base_model, tokenizer_hash, chat_template_hash, datasets [{name, fingerprint, rows, license}], config (the full
resolved stage config), versions, git_commit, metrics. A stage that starts from an earlier output checks it with
`check_parent` before training, so a chain cannot silently mix tokenizers or train on an unmerged adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

MANIFEST_NAME = "pipeline_manifest.json"
FORMAT = 1
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "bitsandbytes", "pipeline")


class LineageError(ValueError):
    """A stage was pointed at a parent it cannot safely continue from."""


def env_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def chat_template_hash(tokenizer) -> str:
    return hashlib.sha256((getattr(tokenizer, "chat_template", None) or "").encode()).hexdigest()


def _tokenizer_hash(tokenizer) -> str:
    from pipeline.data.packing import tokenizer_hash

    return tokenizer_hash(tokenizer)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def build_manifest(stage: str, *, artifact: str, config: dict, parent_dir: str | os.PathLike | None = None,
                   base_model: str | None = None, tokenizer=None, datasets: Iterable[dict] = (),
                   metrics: dict | None = None) -> dict:
    if artifact not in ("model", "adapter", "tokenizer"):
        raise ValueError(f"artifact: {artifact!r} is not one of model, adapter, tokenizer")
    parent = None
    if parent_dir is not None and (Path(parent_dir) / MANIFEST_NAME).is_file():
        parent_manifest = read_manifest(parent_dir)
        parent = {"path": str(parent_dir), "stage": parent_manifest["stage"],
                  "manifest_sha256": file_sha256(Path(parent_dir) / MANIFEST_NAME)}
    elif parent_dir is not None:
        parent = {"path": str(parent_dir), "stage": None, "manifest_sha256": None}
    return _jsonable({
        "format": FORMAT, "stage": stage, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "artifact": artifact, "parent": parent, "base_model": base_model,
        "tokenizer_hash": _tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "chat_template_hash": chat_template_hash(tokenizer) if tokenizer is not None else None,
        "datasets": list(datasets), "config": config, "versions": env_versions(), "git_commit": git_commit(),
        "metrics": metrics or {},
    })


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write atomically: a reader sees the old file, or the whole new one, never half of it."""
    path = Path(directory) / MANIFEST_NAME
    partial = path.with_name(MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        hint = (f" ({directory}.incomplete exists: an interrupted run; rerun the stage to resume it)"
                if Path(f"{directory}.incomplete").exists() else "")
        raise FileNotFoundError(f"{directory} has no {MANIFEST_NAME}: it is not a finished stage output{hint}")
    return json.loads(path.read_text(encoding="utf-8"))


def check_parent(parent_dir: str | os.PathLike, tokenizer=None, *, expect_artifact: str | None = None) -> dict | None:
    """The parent's manifest, after checking it can be continued from with `tokenizer`.

    A plain Hugging Face folder (config.json, no manifest) is accepted with a warning: its lineage is unknown.
    """
    parent = Path(parent_dir)
    if not (parent / MANIFEST_NAME).is_file():
        if (parent / "config.json").is_file() or (parent / "tokenizer.json").is_file():
            warnings.warn(f"{parent} has no {MANIFEST_NAME}: using it without lineage checks", stacklevel=2)
            return None
        read_manifest(parent)  # raises the explanatory error
    manifest = read_manifest(parent)
    if tokenizer is not None and manifest.get("tokenizer_hash"):
        ours = _tokenizer_hash(tokenizer)
        if ours != manifest["tokenizer_hash"]:
            raise LineageError(f"tokenizer: differs from the one {parent} ({manifest['stage']}) was trained with "
                               f"(hash {ours[:12]} vs {manifest['tokenizer_hash'][:12]}); token ids would not mean "
                               f"the same thing. Use the parent's tokenizer (omit tokenizer_name_or_path)")
        if chat_template_hash(tokenizer) != manifest.get("chat_template_hash", chat_template_hash(tokenizer)):
            raise LineageError(f"tokenizer: its chat template differs from {parent}'s; use the parent's tokenizer")
    if expect_artifact is not None and manifest["artifact"] != expect_artifact:
        hint = (f"; merge it first: pipeline merge {parent} {parent}-merged" if manifest["artifact"] == "adapter" else "")
        raise LineageError(f"model_name_or_path: {parent} holds a {manifest['artifact']} ({manifest['stage']} stage), "
                           f"this stage needs a {expect_artifact}{hint}")
    return manifest
