"""Evaluation: metrics as local `evaluate` modules, evaluators that run models, the stage report.

Each metric is a script in `metrics/<name>/<name>.py`, shipped as package data, so `evaluate.load(metric_path(name))`
works offline; nothing here ever loads a metric from the Hub.
"""

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
METRICS = ("exact_match", "perplexity", "reward_accuracy", "win_rate")


def metric_path(name: str) -> str:
    """The folder of a metric module: `evaluate.load(metric_path("exact_match"))` works offline."""
    if name not in METRICS:
        raise ValueError(f"metric: unknown {name!r}; use one of {', '.join(METRICS)}")
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"metric {name!r}: {folder / f'{name}.py'} is missing; the package was installed "
                                f"without its package data (pyproject [tool.setuptools.package-data])")
    return str(folder)


def load_metric(name: str):
    """`evaluate.load` of a local metric module, kept in memory (no cache files shared between processes)."""
    import evaluate

    return evaluate.load(metric_path(name), keep_in_memory=True)
