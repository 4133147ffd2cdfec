"""Stage artifacts, the bottom layer: atomic output folders, lineage manifests, hashes, checkpoint discovery.

Stages, hub and evaluation import this module; it imports nothing of the package but `pipeline.errors`.

    with StageOutput(output_dir, overwrite=False) as out:
        ...train with checkpoints in out.checkpoints_dir, save into out.work...
        out.finish(build_manifest(...))   # manifest written last, then <output_dir>.incomplete renamed into place

`pipeline_manifest.json` (its presence means "complete") holds: format, stage, created, artifact ("model" |
"adapter" | "tokenizer"), parent {path, stage, manifest_sha256}, base_model, tokenizer_hash, chat_template_hash,
datasets [{name, fingerprint, rows, license}], config (the full resolved stage config), versions, git_commit,
metrics. A stage that starts from an earlier output checks it with `check_parent` before training, so a chain
cannot silently mix tokenizers or train on an unmerged adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.errors import UserError

MANIFEST_NAME = "pipeline_manifest.json"
FINGERPRINT_NAME = "run_fingerprint.json"  # in <output_dir>.incomplete: what the interrupted run trained with
FORMAT = 1
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "bitsandbytes", "pipeline")


class LineageError(UserError, ValueError):
    """A stage was pointed at a parent it cannot safely continue from."""


class ResumeMismatchError(UserError, ValueError):
    """An interrupted run's checkpoints were made with other settings, parents or data than this run's."""


# --------------------------------------------------------------------------- hashes and versions


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:  # in blocks: weight files can be gigabytes
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer, *, legacy: bool = False) -> str:
    """sha256 of what decides the token ids: the backend definition (vocabulary, merges, normalisers) for fast
    tokenizers, the vocabulary otherwise, plus EOS. Padding and truncation settings are left out: a batched call
    can leave them set in the backend, and they never change a token id. `legacy`: the whole backend definition,
    as manifests written before this rule recorded it."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
        if not legacy:
            definition = json.loads(text)
            definition.pop("padding", None), definition.pop("truncation", None)
            text = json.dumps(definition, ensure_ascii=False)
        h.update(text.encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(repr(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def chat_template_hash(tokenizer) -> str:
    return hashlib.sha256((getattr(tokenizer, "chat_template", None) or "").encode()).hexdigest()


def env_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# --------------------------------------------------------------------------- manifests


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
        parent = {"path": str(parent_dir), "stage": None, "manifest_sha256": None, **outside_parent(parent_dir)}
    return _jsonable({
        "format": FORMAT, "stage": stage, "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "artifact": artifact, "parent": parent, "base_model": base_model,
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "chat_template_hash": chat_template_hash(tokenizer) if tokenizer is not None else None,
        "datasets": list(datasets), "config": config, "versions": env_versions(), "git_commit": git_commit(),
        "metrics": metrics or {},
    })


def is_hub_model_id(reference: str | os.PathLike) -> bool:
    """Whether a model or tokenizer reference that is not a local folder names a Hub repository ("gpt2",
    "org/name") rather than a missing path ("./x", "/abs/x", "a/b/c")."""
    text = str(reference)
    return (not Path(text).exists() and bool(text) and not text.startswith((".", "/", "~")) and "\\" not in text
            and text.count("/") <= 1 and all(text.split("/")))


def outside_parent(path: str | os.PathLike) -> dict:
    """What identifies a parent that is not a stage output: a local folder by the hashes of its config and weight
    files, a Hub id by its revision (the commit of the cached snapshot, when one is cached)."""
    folder = Path(path)
    if folder.is_dir():
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
        config = folder / "config.json"
        return {"config_sha256": file_sha256(config) if config.is_file() else None,
                "weights_sha256": {p.name: file_sha256(p) for p in weights}}
    revision = None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(path), "config.json")
        if isinstance(cached, str):
            revision = Path(cached).parent.name  # .../snapshots/<commit>/config.json
    except Exception:  # an id the cache cannot parse: no revision to record
        revision = None
    return {"hub_id": str(path), "revision": revision}


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


def artifact_kind(directory: str | os.PathLike) -> str | None:
    """The manifest's artifact ("model", "adapter", "tokenizer"), or None for a folder without a manifest."""
    return read_manifest(directory)["artifact"] if (Path(directory) / MANIFEST_NAME).is_file() else None


def check_parent(parent_dir: str | os.PathLike, tokenizer=None, *, expect_artifact: str | None = None) -> dict | None:
    """The parent's manifest, after checking it can be continued from with `tokenizer`.

    A plain Hugging Face folder (config.json, no manifest) is accepted with a warning: its lineage is unknown.
    """
    parent = Path(parent_dir)
    if is_hub_model_id(parent_dir):
        return None  # a Hub id: a third-party checkpoint, recorded by id and revision in the manifest
    if not (parent / MANIFEST_NAME).is_file():
        if (parent / "config.json").is_file() or (parent / "tokenizer.json").is_file():
            warnings.warn(f"{parent} has no {MANIFEST_NAME}: using it without lineage checks", stacklevel=2)
            return None
        read_manifest(parent)  # raises the explanatory error
    manifest = read_manifest(parent)
    if tokenizer is not None and manifest.get("tokenizer_hash"):
        ours = tokenizer_hash(tokenizer)
        if manifest["tokenizer_hash"] not in (ours, tokenizer_hash(tokenizer, legacy=True)):
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


# --------------------------------------------------------------------------- outputs and checkpoints


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """The highest `checkpoint-N` in `directory` that finished saving (trainer_state.json is written last, by
    transformers' Trainer and by our PPO trainer alike); None when there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [p for p in directory.glob("checkpoint-*")
            if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[1]))) if done else None


class StageOutput:
    """An output folder that appears only when complete.

    Work happens in `<output_dir>.incomplete` (kept after an interruption, so its checkpoints resume the run);
    `finish(manifest)` writes the manifest last and renames the folder into place. Refuses to replace a finished
    output unless `overwrite`.
    """

    def __init__(self, output_dir: str | os.PathLike, *, overwrite: bool = False, keep_checkpoints: bool = False):
        self.output_dir = Path(output_dir)
        self.work = self.output_dir.with_name(self.output_dir.name + ".incomplete")
        self.checkpoints_dir = self.work / "checkpoints"
        self.overwrite, self.keep_checkpoints = overwrite, keep_checkpoints
        self.finished = False

    def __enter__(self) -> "StageOutput":
        if self.output_dir.exists() and not self.overwrite:
            raise FileExistsError(f"{self.output_dir} already exists (a finished stage output); pass --overwrite true "
                                  f"to replace it, or choose another --output_dir")
        if self.overwrite and self.work.exists() and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(self.work)  # overwrite starts clean: an interrupted run's checkpoints are discarded
        if (self.work / MANIFEST_NAME).exists():  # cannot happen through finish(); never let it pass as complete
            (self.work / MANIFEST_NAME).unlink()
        self.work.mkdir(parents=True, exist_ok=True)
        return self

    def guard_resume(self, fingerprint: dict) -> None:
        """Record what this run trains with, or, when the work folder holds an interrupted run, check that it
        trained with the same: resuming another run's checkpoints would mix two trainings under one manifest.

        `fingerprint` maps names (config keys, "parent", "data", package versions) to values; the error lists every
        name whose value differs."""
        path = self.work / FINGERPRINT_NAME
        if path.is_file():
            before = json.loads(path.read_text(encoding="utf-8"))
            now = _jsonable(fingerprint)
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if changed:
                shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed[:8])
                more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
                raise ResumeMismatchError(
                    f"{self.work} holds an interrupted run with other settings: {shown}{more}. Rerun with the "
                    f"interrupted run's settings to resume it, or pass --overwrite true to start over")
            return
        if latest_checkpoint(self.checkpoints_dir) is not None:
            raise ResumeMismatchError(f"{self.work} holds checkpoints without a {FINGERPRINT_NAME}, so nothing shows "
                                      f"what they were trained with; pass --overwrite true to start over")
        partial = path.with_name(f"{FINGERPRINT_NAME}.{os.getpid()}.partial")
        partial.write_text(json.dumps(_jsonable(fingerprint), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, path)

    def finish(self, manifest: dict) -> Path:
        """Main process only: drop checkpoints (unless kept), write the manifest, rename into place."""
        if not self.keep_checkpoints:
            shutil.rmtree(self.checkpoints_dir, ignore_errors=True)
        write_manifest(self.work, manifest)
        if self.output_dir.exists():
            old = self.output_dir.with_name(self.output_dir.name + ".replaced")
            shutil.rmtree(old, ignore_errors=True)
            self.output_dir.rename(old)
            self.work.rename(self.output_dir)
            shutil.rmtree(old)
        else:
            self.work.rename(self.output_dir)
        self.finished = True
        return self.output_dir

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False  # on error the work folder stays for a resume; nothing is renamed


def write_once(write: Callable[[], Any], *, done: Callable[[], bool]) -> None:
    """Run `write()` on the main process only (when `done()` says the result is not there yet), then let every
    process continue: a folder all ranks read is written once, not by every rank at the same path."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if not done():
            write()
        return
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # without GPUs, the CPU process group (gloo)
    if state.is_main_process and not done():
        write()
    state.wait_for_everyone()
