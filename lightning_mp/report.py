"""``lightning-mp-report``: one picture and one table for a precision sweep (``--multirun`` directory)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (("train/loss", "training loss"), ("precision/swallowed_frac", "swallowed updates (fraction)"))


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's ``summary.json`` and its logged curves from ``metrics.csv``: {metric: [(step, value)]}."""
    summary = json.loads((run_dir / "summary.json").read_text())
    curves: dict[str, list[tuple[int, float]]] = {}
    metrics = run_dir / "metrics.csv"
    if metrics.exists():
        with open(metrics) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key != "step" and value not in ("", None) and row.get("step"):
                        curves.setdefault(key, []).append((int(row["step"]), float(value)))
    return {"dir": run_dir, "summary": summary, "curves": curves}


def _checks(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The steps where a periodic metric was measured: CSV rows repeat its last value until the next check."""
    return [p for i, p in enumerate(points) if i == 0 or p[1] != points[i - 1][1]]


def sweep_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    runs = [load_run(d) for d in sorted(sweep_dir.iterdir()) if (d / "summary.json").is_file()]
    if not runs:
        raise FileNotFoundError(f"no run directories with a summary.json under {str(sweep_dir)!r}")
    return runs


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def run_label(summary: dict[str, Any]) -> str:
    """A run's precision, with its master storage policy when that is not a separate FP32 master."""
    master = summary.get("master")
    return summary["precision"] + (f" master={master}" if master not in (None, "fp32") else "")


def markdown_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| precision | final train loss | final val loss | val bits/byte | swallowed updates (last check) "
        "| bytes/param (after the last step) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s, curves = run["summary"], run["curves"]
        swallowed = curves.get("precision/swallowed_frac", [(0, None)])[-1][1]
        lines.append(
            f"| `{run_label(s)}` | {_fmt(s.get('train_loss'))} | {_fmt(s.get('val_loss'))} | "
            f"{_fmt(s.get('val_bits_per_byte'), 2)} | {_fmt(swallowed, 3)} | {_fmt(s.get('bytes_per_param'), 2)} | "
            f"{_fmt(s.get('tokens_per_sec'), 0)} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(len(CURVES), 1, figsize=(8, 7), sharex=True)
    for ax, (key, label) in zip(axes, CURVES):
        for run in runs:
            points = run["curves"].get(key)
            if key.startswith("precision/") and points:
                points = _checks(points)
            if points:
                steps, values = zip(*points)
                periodic = key.startswith("precision/")
                ax.plot(steps, values, label=run_label(run["summary"]), linewidth=1.8, marker="o" if periodic else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(title="precision")
    axes[1].set_ylim(-0.02, 1.02)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("Same model, data and seed: training loss and updates lost to 16-bit rounding")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: Path) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` into ``sweep_dir``; return their paths."""
    runs = sweep_runs(sweep_dir)
    png, md = sweep_dir / "report.png", sweep_dir / "report.md"
    plot(runs, png)
    md.write_text(f"![training loss and swallowed updates](report.png)\n\n{markdown_table(runs)}")
    return png, md
