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


def run_label(summary: dict[str, Any], with_seed: bool = False) -> str:
    """A run's precision, with its master storage policy when one was forced (not the default
    ``auto``), and its seed when the sweep has several."""
    master = summary.get("master")
    label = summary["precision"] + (f" master={master}" if master not in (None, "auto") else "")
    return label + (f" seed={summary.get('seed')}" if with_seed else "")


def _several_seeds(runs: list[dict[str, Any]]) -> bool:
    return len({run["summary"].get("seed") for run in runs}) > 1


def _stores_16_bit(summary: dict[str, Any]) -> bool:
    """Whether the run's weights are 16-bit (its swallowed fraction is real, not what *would* be lost)."""
    return summary["precision"].endswith(("-true", "-master")) and summary["precision"] != "32-true"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| precision | final train loss | final val loss | val bits/byte | swallowed updates (last check) "
        "| bytes/param (after the last step) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    seeds = _several_seeds(runs)
    for run in runs:
        s, curves = run["summary"], run["curves"]
        swallowed = _fmt(curves.get("precision/swallowed_frac", [(0, None)])[-1][1], 3)
        if swallowed != "n/a" and not _stores_16_bit(s):
            swallowed += " (would be, in 16 bits)"
        lines.append(
            f"| `{run_label(s, seeds)}` | {_fmt(s.get('train_loss'))} | {_fmt(s.get('val_loss'))} | "
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


def _line(ax: Any, points: list[tuple[int, float]], few: bool, **style: Any) -> None:
    steps, values = zip(*points)
    ax.plot(steps, values, marker="o" if few else None, markersize=3 + style.get("linewidth", 1.5), **style)


def plot(runs: list[dict[str, Any]], path: Path) -> tuple[str, list[str]]:
    """Every run on shared axes: training loss (a running mean over about a fifteenth of the
    logged steps, the raw points faint), validation loss wherever it was checked, the swallowed
    fraction of runs that store 16-bit weights, and what it would be for runs that store FP32.
    Returns the title and each panel's y label."""
    seeds = _several_seeds(runs)
    labels = [run_label(run["summary"], seeds) for run in runs]
    real = [_stores_16_bit(run["summary"]) for run in runs]
    checked = [run["curves"].get("precision/swallowed_frac") for run in runs]
    panels = ["train"]
    panels += ["val"] if any(run["curves"].get("val/loss") for run in runs) else []
    panels += ["real"] if any(c and r for c, r in zip(checked, real)) else []
    panels += ["would"] if any(c and not r for c, r in zip(checked, real)) else []
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.5 + 2.7 * len(panels)), sharex=True, squeeze=False)
    ax = dict(zip(panels, axes[:, 0]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    window = 1
    for i, (run, label, color) in enumerate(zip(runs, labels, itertools.cycle(colors))):
        width = 1.5 + 1.2 * min(len(runs) - 1 - i, 3)  # earlier runs wider: coinciding curves stay visible
        points = run["curves"].get("train/loss")
        if points:
            steps, values = zip(*points)
            window = max(1, round(len(values) / 15))
            ax["train"].plot(steps, values, color=color, linewidth=0.8, alpha=0.25)
            _line(ax["train"], list(zip(steps, running_mean(values, window))), len(values) < 20,
                  color=color, linewidth=width, label=label)
        if run["curves"].get("val/loss"):
            _line(ax["val"], run["curves"]["val/loss"], True, color=color, linewidth=width, label=label)
        if checked[i]:  # logged rows repeat the last check's value until the next: a step function
            steps, values = zip(*checked[i])
            panel = ax["real" if real[i] else "would"]
            panel.step(steps, values, where="post", color=color, linewidth=width, label=label)
            if len(values) < 20:
                panel.plot(steps, values, "o", color=color, markersize=3 + width)
    ax["train"].set_ylabel("training loss" + (f"\n(mean of {window} logged steps)" if window > 1 else ""))
    ax["train"].legend(title="precision")
    if "val" in ax:
        ax["val"].set_ylabel("validation loss")
    for name, text in (("real", "swallowed updates\n(16-bit weights)"),
                       ("would", "updates 16-bit weights\nwould swallow (FP32 runs)")):
        if name in ax:
            ax[name].set_ylabel(text)
            ax[name].set_ylim(-0.02, 1.02)
            ax[name].legend(fontsize="small", loc="center right")
    axes[-1, 0].set_xlabel("optimizer step")
    for a in axes[:, 0]:
        a.grid(alpha=0.3)
    same = "same seed" if not seeds else f"seeds {', '.join(sorted({str(r['summary'].get('seed')) for r in runs}))}"
    title = f"Same model and data, {same}: loss and updates lost to 16-bit rounding"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return title, [a.get_ylabel() for a in axes[:, 0]]


def write_report(sweep_dir: Path) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` into ``sweep_dir``; return their paths."""
    runs = sweep_runs(sweep_dir)
    png, md = sweep_dir / "report.png", sweep_dir / "report.md"
    plot(runs, png)
    md.write_text(f"![training loss and swallowed updates](report.png)\n\n{markdown_table(runs)}")
    return png, md
