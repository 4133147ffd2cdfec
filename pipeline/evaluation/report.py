"""The stage report of a chain run: `report.json`, `report.md` (one row per stage) and PNG plots.

A stage row is {"stage": name, "metrics": {...}} plus, optionally, "loss_history" [(step, loss), ...],
"reward_history" [mean reward per step, ...], "kl_history" [KL per step, as many] (an RL stage: a reward-KL note),
and for the export row "source" and "showcase" [{"question",
"expected", "answer"}, ...]: held-out demo questions the exported model answered, each marked right or wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from pipeline.data.demo_tasks import verify
from pipeline.evaluation.evaluators import reward_kl_trend

# (metric key, column title, format): the table's columns, in order.
COLUMNS = (("perplexity", "perplexity", "{:.2f}"), ("exact_match", "exact match", "{:.3f}"),
           ("reward_accuracy", "reward accuracy", "{:.3f}"), ("mean_reward", "mean reward", "{:.3f}"),
           ("wall_seconds", "wall s", "{:.0f}"))
REPORT_METRICS = tuple(key for key, _, _ in COLUMNS)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_stages(stages: list[dict]) -> None:
    if not isinstance(stages, list):
        raise TypeError(f"stages: expected a list of {{'stage', 'metrics'}} dicts, got {type(stages).__name__}")
    for i, row in enumerate(stages):
        if not isinstance(row, dict) or not isinstance(row.get("stage"), str):
            raise ValueError(f"stages[{i}]: expected a dict with a 'stage' name, got {row!r:.80}")
        if not isinstance(row.get("metrics", {}), dict):
            raise ValueError(f"stages[{i}] ({row['stage']}): 'metrics' must be a dict of metric name -> value")
        for point in row.get("loss_history") or []:
            if not (isinstance(point, (list, tuple)) and len(point) == 2):
                raise ValueError(f"stages[{i}] ({row['stage']}): loss_history entries must be (step, loss) pairs, "
                                 f"got {point!r}")


def _json_safe(value):
    """NaN and infinity become null: they are not JSON, and a diverged metric should read as missing."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def markdown_table(stages: list[dict]) -> str:
    """One row per stage, one column per report metric; a cell is blank when the stage lacks that metric."""
    lines = ["| stage | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "| --- |" + " --- |" * len(COLUMNS)]
    for row in stages:
        metrics = row.get("metrics", {})
        cells = [fmt.format(metrics[key]) if _is_number(metrics.get(key)) else "" for key, _, fmt in COLUMNS]
        lines.append(f"| {row['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(stages: list[dict]) -> list[str]:
    notes = []
    for row in stages:
        history = row.get("reward_history") or []
        if history:
            quarter = max(1, len(history) // 4)
            notes.append(f"- {row['stage']} reward curve: {len(history)} steps, mean reward "
                         f"{sum(history[:quarter]) / quarter:.3f} (first quarter) → "
                         f"{sum(history[-quarter:]) / quarter:.3f} (last quarter)")
        kls = row.get("kl_history") or []
        if kls and len(kls) == len(history):
            trend = reward_kl_trend(history, kls)
            per_kl = trend["reward_gain_per_kl"]
            notes.append(f"- {row['stage']} reward–KL: mean KL {trend['mean_kl']:.3f} over the last quarter for a reward "
                         f"gain of {trend['reward_gain']:+.3f}" + (f" ({per_kl:+.2f} per unit of KL)" if per_kl else "")
                         + f"; plot: {row['stage']}/{REWARD_KL_PLOT}")
        if row.get("showcase"):
            notes += showcase_lines(row)
    return notes


def showcase_lines(row: dict) -> list[str]:
    """The export row's held-out questions, each answer marked ✓ right or ✗ wrong against the expected answer."""
    items = row["showcase"]
    right = [verify(item["answer"], item["expected"]) for item in items]
    lines = [f"- {row['stage']} ({row.get('source')}): {sum(right)} of {len(items)} held-out demo questions "
             "answered right by the exported model, loaded in a clean process:"]
    for item, ok in zip(items, right):
        answer = item["answer"] or "(no answer)"
        lines.append(f"  - ✓ right: {item['question']} → {answer}" if ok else
                     f"  - ✗ wrong: {item['question']} → {answer} (expected {item['expected']})")
    return lines


def write_report(stages: list[dict], out_dir: str | Path, *, title: str = "Demo chain report") -> list[Path]:
    """Write report.json, report.md and the plots (metrics.png, loss_curves.png when there is data for them)
    into `out_dir`; return the paths written."""
    _check_stages(stages)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "report.md"]
    paths[0].write_text(json.dumps({"stages": _json_safe(stages)}, indent=2, ensure_ascii=False) + "\n")
    text = f"# {title}\n\n" + markdown_table(stages) + "\n"
    notes = _notes(stages)
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    text += ("\nExact match is greedy answers against held-out demo tasks (the pretrain row: the base model prompted "
             "with 3 solved examples); reward accuracy is the reward model's held-out pairwise accuracy; a blank "
             "cell means the stage does not produce that metric.\n")
    paths[1].write_text(text)
    return paths + _plots(stages, out_dir)


def _figure(width: float, height: float):
    # A bare Figure on the Agg canvas: no pyplot global state and no interactive backend, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _plots(stages: list[dict], out_dir: Path) -> list[Path]:
    written = []
    scored = [(r["stage"], r["metrics"]["exact_match"]) for r in stages
              if _is_number(r.get("metrics", {}).get("exact_match"))]
    if scored:
        fig = _figure(max(4.0, 1.1 * len(scored) + 1.5), 3.5)
        ax = fig.add_subplot()
        ax.bar([s for s, _ in scored], [v for _, v in scored], color="#4c72b0")
        ax.set_ylabel("held-out exact match")
        ax.set_ylim(0, 1.08)
        for i, (_, v) in enumerate(scored):
            ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png", dpi=100)
        written.append(out_dir / "metrics.png")

    # One panel per stage: losses of different objectives (LM, pairwise, DPO) do not share a scale.
    panels = [(r["stage"], "training loss", [p[0] for p in r["loss_history"]], [p[1] for p in r["loss_history"]])
              for r in stages if r.get("loss_history")]
    panels += [(r["stage"], "mean reward", list(range(1, len(r["reward_history"]) + 1)), r["reward_history"])
               for r in stages if r.get("reward_history")]
    if panels:
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig = _figure(4.0 * cols, 3.0 * rows)
        for i, (stage, ylabel, steps, values) in enumerate(panels):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.plot(steps, values, color="#dd8452" if ylabel == "mean reward" else "#4c72b0")
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(out_dir / "loss_curves.png", dpi=100)
        written.append(out_dir / "loss_curves.png")
    return written


REWARD_KL_PLOT = "reward_kl.png"


def reward_kl_plot(rewards: Sequence[float], kls: Sequence[float], path: str | Path) -> Path:
    """The reward-KL frontier of an RL run: mean reward against KL to the reference, one point per step coloured
    by step, so the price of each reward gain in drift from the reference is visible."""
    path = Path(path)
    fig = _figure(5.0, 3.8)
    ax = fig.add_subplot()
    steps = list(range(1, len(rewards) + 1))
    ax.plot(kls, rewards, color="#bbbbbb", linewidth=1, zorder=1)
    points = ax.scatter(kls, rewards, c=steps, cmap="viridis", s=18, zorder=2)
    fig.colorbar(points, ax=ax, label="step")
    ax.set_xlabel("KL(policy || reference) per response")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL over training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
