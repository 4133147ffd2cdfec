"""Upload an export folder to the Hub. The token is looked up, used, and never printed.

One file list (`upload_plan`) is what a dry run prints and what the commit uploads, nothing else. What goes up is a
sanitised copy made in a temporary folder: the manifest, lineage and model card lose absolute local paths (each
becomes its last path component, a Hub id stays as it is) and any `samples` field (PPO rollout texts are training
data). New repositories are created private unless `public=True`; an existing public repository is refused unless
`public=True`; the visibility reported is the one the Hub returns, never an assumption.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import RepositoryNotFoundError

from pipeline.artifacts import read_manifest
from pipeline.errors import UserError
from pipeline.hub.export import list_export_files

SANITISED_JSON = ("pipeline_manifest.json", "pipeline_lineage.json")
SANITISED_TEXT = ("README.md",)
DROPPED_KEYS = ("samples",)  # decoded rollouts (prompt, response, score): training data, not metadata
# An absolute POSIX or Windows path not inside a URL: "/home/u/outputs/sft", "C:\\runs\\sft".
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/\\-])(?:/|[A-Za-z]:\\)(?:[\w.@+-]+[/\\])*[\w.@+-]+")


class MissingTokenError(UserError, RuntimeError):
    pass


class PushRefusedError(UserError, RuntimeError):
    pass


@dataclass
class PushResult:
    files: list[str]  # relative paths, exactly the ones uploaded (or listed by a dry run)
    private: bool | None  # the repository's visibility as the Hub reports it; None in a dry run
    created: bool = False  # the push created the repository


def find_token(explicit: str | None = None) -> str:
    """`explicit` (the --token flag), else HF_TOKEN, else the token `huggingface-cli login` stored."""
    from huggingface_hub import get_token

    token = explicit or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise MissingTokenError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`; "
                                "pushing needs write access to the repository")
    return token


def upload_plan(folder: str | Path) -> list[str]:
    """The relative paths a push of `folder` uploads, sorted: the one list the dry run prints."""
    return list_export_files(folder)


def _strip_path(match: re.Match) -> str:
    return re.split(r"[/\\]", match.group(0))[-1]


def sanitise_text(text: str) -> str:
    """Every absolute local path in `text` replaced by its last component (`/home/u/outputs/sft` -> `sft`)."""
    return _ABSOLUTE_PATH.sub(_strip_path, text)


def sanitise(value):
    """A JSON value without `samples` fields and with absolute paths in strings reduced to their last component."""
    if isinstance(value, dict):
        return {k: sanitise(v) for k, v in value.items() if k not in DROPPED_KEYS}
    if isinstance(value, list):
        return [sanitise(v) for v in value]
    if isinstance(value, str):
        return sanitise_text(value)
    return value


def sanitised_copy(folder: Path, files: list[str], target: Path) -> Path:
    """Copy `files` of `folder` into `target`, the metadata files sanitised; `folder` itself is not touched."""
    for name in files:
        source, dest = folder / name, target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if name in SANITISED_JSON:
            data = sanitise(json.loads(source.read_text(encoding="utf-8")))
            dest.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        elif name in SANITISED_TEXT:
            dest.write_text(sanitise_text(source.read_text(encoding="utf-8")), encoding="utf-8")
        else:
            shutil.copy2(source, dest)
    return target


def push_folder(folder: str | Path, repo_id: str, *, public: bool = False, dry_run: bool = False,
                token: str | None = None) -> PushResult:
    """Upload `folder` (a finished export) to `repo_id` as one commit of exactly `upload_plan(folder)`."""
    folder = Path(folder)
    read_manifest(folder)  # only finished outputs are pushed
    files = upload_plan(folder)
    if dry_run:
        return PushResult(files, private=None)
    api = HfApi(token=find_token(token))
    created = False
    try:
        private = api.repo_info(repo_id, repo_type="model").private
    except RepositoryNotFoundError:
        api.create_repo(repo_id, repo_type="model", private=not public)
        private, created = api.repo_info(repo_id, repo_type="model").private, True
    if private is False and not public and not created:
        raise PushRefusedError(f"{repo_id} exists and is public: pass --public to push to a public repository")
    with tempfile.TemporaryDirectory(prefix="pipeline-push-") as tmp:
        staged = sanitised_copy(folder, files, Path(tmp))
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(staged / name)) for name in files]
        api.create_commit(repo_id, operations=operations, repo_type="model",
                          commit_message="Upload PipelineGPT export")
    return PushResult(files, private=bool(private), created=created)
