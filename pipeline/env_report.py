"""`pipeline env`: the versions and hardware a bug report needs, as plain text. Offline and quick: package versions
come from installed metadata, and only torch is imported (for the accelerators)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from pipeline.artifacts import git_commit

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "tokenizers", "evaluate")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _ram_gib() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (AttributeError, ValueError, OSError):
        return "unknown"


def accelerate_config() -> str:
    """The config `accelerate launch` falls back to without --config_file: its path when it exists, else none."""
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    folder = Path(hf_home).expanduser() / "accelerate"
    found = [p for p in (folder / "default_config.yaml", folder / "default_config.json") if p.is_file()]
    return f"{found[0]} (default config file)" if found else "none (no default config file)"


def _torch_lines() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["torch: not importable"]
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    lines = [f"torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}; CUDA available: "
             f"{'yes' if cuda else 'no'}; MPS available: {'yes' if mps else 'no'})"]
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    elif mps:
        lines.append("gpu: Apple MPS device")
    else:
        lines.append("gpu: none")
    return lines


def environment_report() -> str:
    import pipeline

    location = Path(pipeline.__file__).resolve().parent
    lines = [f"pipeline: {pipeline.__version__} (git commit: {git_commit() or 'unknown'}; {location})",
             f"python: {platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
             f"platform: {platform.platform()} ({platform.machine()})"]
    torch_lines = _torch_lines()
    lines.append(torch_lines[0])
    lines += [f"{name}: {_version(name)}" for name in PACKAGES if name != "torch"]
    lines.append(f"accelerate config: {accelerate_config()}")
    lines.append(f"cpu: {os.cpu_count()} cores; ram: {_ram_gib()}")
    lines += torch_lines[1:]
    return "\n".join(lines)
