"""``lightning-mp-report``: one picture and one table for a precision sweep (``--multirun`` directory)."""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


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


def _stores_16_bit(summary: dict[str, Any]) -> bool:
    """Whether the run's weights are 16-bit (its swallowed fraction is real, not what *would* be lost)."""
    return summary["precision"].endswith(("-true", "-master")) and summary["precision"] != "32-true"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| precision | final train loss | final val loss | val bits/byte | swallowed updates (last check) "
        "| bytes/param (after the last step) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s, curves = run["summary"], run["curves"]
        swallowed = _fmt(curves.get("precision/swallowed_frac", [(0, None)])[-1][1], 3)
        if swallowed != "n/a" and not _stores_16_bit(s):
            swallowed += " (would be, in 16 bits)"
        lines.append(
            f"| `{run_label(s)}` | {_fmt(s.get('train_loss'))} | {_fmt(s.get('val_loss'))} | "
            f"{_fmt(s.get('val_bits_per_byte'), 2)} | {swallowed} | {_fmt(s.get('bytes_per_param'), 2)} | "
            f"{_fmt(s.get('tokens_per_sec'), 0)} |"
        )
    return "\n".join(lines) + "\n"


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start): batch noise averaged out."""
    total, out = 0.0, []
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Every run on shared axes: training loss (a running mean over about a fifteenth of the
    logged steps, the raw points faint), validation loss when it was checked more than twice,
    and the swallowed fraction."""
    with_val = any(len(run["curves"].get("val/loss", [])) > 2 for run in runs)
    fig, axes = plt.subplots(3 if with_val else 2, 1, figsize=(8, 9.5 if with_val else 7), sharex=True)
    loss_ax, frac_ax = axes[0], axes[-1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    window = 1
    for i, (run, color) in enumerate(zip(runs, itertools.cycle(colors))):
        label = run_label(run["summary"])
        width = 1.5 + 1.2 * min(len(runs) - 1 - i, 3)  # earlier runs wider: coinciding curves stay visible
        points = run["curves"].get("train/loss")
        if points:
            steps, values = zip(*points)
            window = max(1, round(len(values) / 15))
            loss_ax.plot(steps, values, color=color, linewidth=0.8, alpha=0.25)
            loss_ax.plot(steps, running_mean(values, window), color=color, linewidth=width, label=label)
        if with_val and run["curves"].get("val/loss"):
            steps, values = zip(*run["curves"]["val/loss"])
            axes[1].plot(steps, values, color=color, linewidth=width, marker="o", markersize=2 + width, label=label)
        checks = run["curves"].get("precision/swallowed_frac")
        if checks:  # logged rows repeat the last check's value until the next: a step function
            steps, values = zip(*checks)
            real = _stores_16_bit(run["summary"])
            frac_ax.step(steps, values, where="post", color=color, linewidth=1.8, linestyle="-" if real else "--",
                         label=label if real else f"{label} (would be, in 16 bits)")
    loss_ax.set_ylabel("training loss" + (f"\n(mean of {window} logged steps)" if window > 1 else ""))
    loss_ax.legend(title="precision")
    if with_val:
        axes[1].set_ylabel("validation loss")
    frac_ax.set_ylabel("swallowed updates (fraction)")
    frac_ax.set_ylim(-0.02, 1.02)
    frac_ax.legend(fontsize="small", loc="center right")
    frac_ax.set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Same model, data and seed: loss and updates lost to 16-bit rounding")
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
