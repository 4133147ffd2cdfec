"""Upload an export folder to the Hub (private by default). The token is looked up, used, and never printed."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.hub.export import list_export_files
from pipeline.artifacts import read_manifest
from pipeline.errors import UserError


class MissingTokenError(UserError, RuntimeError):
    pass


def find_token(explicit: str | None = None) -> str:
    """--token, else HF_TOKEN, else the token `huggingface-cli login` stored."""
    from huggingface_hub import get_token

    token = explicit or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise MissingTokenError("no Hugging Face token: set HF_TOKEN, run `huggingface-cli login`, or pass --token; "
                                "pushing needs write access to the repository")
    return token


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, dry_run: bool = False,
                token: str | None = None) -> list[str]:
    """Upload `folder` (a finished export) to `repo_id`; returns the uploaded paths. dry_run only lists them."""
    folder = Path(folder)
    read_manifest(folder)  # only finished outputs are pushed
    files = list_export_files(folder)
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi(token=find_token(token))
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload PipelineGPT export")
    return files
