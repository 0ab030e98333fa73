"""Training quality of the peers' cheap AdamW against lightning-mp's, on the command line's two tasks, 3 seeds.

    pip install torchao torch-optimi torch==<your torch>     # optional: missing peers are skipped
    python benchmarks/peers_quality.py [--seeds 0 1 2] [--out outputs/peers_quality]

Runs ``lightning-mp-train`` for every row and seed, one process each, on two tasks:

- ``default``: the default recipe (tiny MoE model, 250 steps from scratch);
- ``mantissa-trap``: the fine-tune at lr 3e-5 (200 steps) from one default-recipe model (trained
  first, seed 0, default precision), where an update below half a bf16 step rounds away.

Rows: ``32-true``, ``bf16-mixed``, ``bf16-true`` (torch's AdamW on bf16 weights: the trap),
``bf16-master`` (default storage, FP32 moments), ``bf16-master`` with 8-bit moments under
``remainder`` and ``stochastic``, and ``bf16-true`` with each peer (``optimizer.impl``):
torchao's ``_AdamW`` and ``AdamW8bit`` with bf16 stochastic rounding, optimi's Kahan AdamW.

Per run: the validation loss the run logged (in its own precision), the validation loss of its
final weights re-evaluated in FP32 (``32-true``, from ``checkpoints/last.ckpt``: a bf16 forward
adds its own error, larger than the differences between exact optimizers), the bytes per
parameter between steps (``summary.json``: weights, FP32 values' storage and optimizer state,
from the live tensors) and the training time. The table gives each row's seeds, mean and spread
(max - min) of the FP32 re-evaluated loss.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_mp import MoEModule
from lightning_mp.machine import describe
from lightning_mp.optim import peers

ROWS = [  # label, overrides
    ("32-true", ["precision=32-true"]),
    ("bf16-mixed", ["precision=bf16-mixed"]),
    ("bf16-true (torch AdamW)", ["precision=bf16-true"]),
    ("bf16-master, FP32 moments", ["precision=bf16-master"]),
    ("bf16-master, remainder + 8-bit moments", ["precision=bf16-master", "precision.master=remainder", "optimizer.moment_dtype=8bit"]),
    ("bf16-master, stochastic + 8-bit moments", ["precision=bf16-master", "precision.master=stochastic", "optimizer.moment_dtype=8bit"]),
    ("torchao `_AdamW`, bf16 SR", ["precision=bf16-true", "optimizer.impl=torchao-adamw"]),
    ("torchao `AdamW8bit`, bf16 SR", ["precision=bf16-true", "optimizer.impl=torchao-adamw8bit"]),
    ("optimi `AdamW`, Kahan", ["precision=bf16-true", "optimizer.impl=optimi-adamw"]),
]


def train(args: list[str], run_dir: Path) -> dict:
    """One ``lightning-mp-train`` run in ``run_dir`` (reused when its summary exists)."""
    if not (run_dir / "summary.json").exists():
        cmd = [sys.executable, "-m", "lightning_mp", *args, f"hydra.run.dir={run_dir}", "logger=none"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads((run_dir / "summary.json").read_text())


def fp32_val_loss(run_dir: Path) -> float:
    """The run's final weights (its last checkpoint) validated under 32-true on the run's data."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    # (weights_only=False: our own files; a torchao 8-bit state is a tensor subclass, not plain data)
    model = MoEModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False).float()
    data = instantiate(cfg.data, _convert_="all")
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=cfg.trainer.get("limit_val_batches", 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(trainer.validate(model, data, verbose=False)[0]["val/loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/peers_quality"))
    parser.add_argument("--tasks", nargs="+", default=["default", "mantissa-trap"])
    args = parser.parse_args()
    print(f"machine: {describe()}")
    rows = []
    for label, overrides in ROWS:
        impl = next((o.split("=")[1] for o in overrides if o.startswith("optimizer.impl=")), None)
        module, package = peers.REQUIRES[impl] if impl else (None, None)
        if module and importlib.util.find_spec(module) is None:
            print(f"{package} is not installed: the row {label!r} is skipped")
            continue
        rows.append((label, overrides))
    base = train([], args.out / "base")  # the model the mantissa-trap task fine-tunes
    print(f"base model (default recipe, seed 0): val loss {base['val_loss']:.4f}\n")
    for task in args.tasks:
        task_args = [] if task == "default" else ["recipe=mantissa-trap", f"init_from={args.out / 'base'}"]
        print(f"## {task}\n")
        print("| row | B/param between steps | val loss (own precision), seeds | FP32 re-evaluated, seeds | mean | spread | s/run |")
        print("|---|---|---|---|---|---|---|")
        for label, overrides in rows:
            runs = []
            for seed in args.seeds:
                run_dir = args.out / task / "_".join(o.replace("=", "-") for o in overrides) / f"seed{seed}"
                summary = train([*task_args, *overrides, f"seed={seed}"], run_dir)
                runs.append((summary, fp32_val_loss(run_dir)))
            own = " / ".join(f"{s['val_loss']:.4f}" for s, _ in runs)
            fp32 = [f for _, f in runs]
            print(f"| {label} | {runs[0][0]['bytes_per_param']:.2f} | {own} | {' / '.join(f'{f:.4f}' for f in fp32)} | "
                  f"**{statistics.mean(fp32):.4f}** | {max(fp32) - min(fp32):.4f} | "
                  f"{statistics.mean(s['fit_seconds'] for s, _ in runs):.0f} |", flush=True)
        print()
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
