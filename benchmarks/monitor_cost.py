"""The swallowed-update monitor's cost: the same training with and without it, side by side.

    python benchmarks/monitor_cost.py [--steps 150] [--every 50]

The default recipe's tiny MoE model and data, per precision mode, trained twice in one
process (with and without ``SwallowedUpdateMonitor(every_n_steps=--every)``, order alternated)
after a warm-up run; prints the ratio of fit times.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as L
import torch

from lightning_mp import MoEModule, SwallowedUpdateMonitor, precision_plugin
from lightning_mp.data import ByteTextDataModule

MODES = ("32-true", "bf16-true", "bf16-master")


def fit_seconds(mode: str, steps: int, monitor: bool, every: int, data: ByteTextDataModule) -> float:
    torch.manual_seed(0)
    model = MoEModule(d_model=64, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_ff=128, max_seq_len=64, warmup_steps=20)
    callbacks = [SwallowedUpdateMonitor(every_n_steps=every)] if monitor else []
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, plugins=[precision_plugin(mode, device="cpu")], callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()
    data = ByteTextDataModule(seq_len=64, batch_size=16)
    data.setup()
    print(f"tiny MoE, {args.steps} steps, monitor every {args.every} steps, 2 CPU threads\n")
    print("| precision | without (s) | with (s) | overhead |")
    print("|---|---|---|---|")
    for mode in MODES:
        fit_seconds(mode, 10, True, 5, data)  # warm-up, and the monitor's code path once
        with_a = fit_seconds(mode, args.steps, True, args.every, data)
        without = fit_seconds(mode, args.steps, False, args.every, data)
        with_b = fit_seconds(mode, args.steps, True, args.every, data)
        with_ = (with_a + with_b) / 2
        print(f"| `{mode}` | {without:.1f} | {with_:.1f} | {100 * (with_ / without - 1):+.1f} % |")


if __name__ == "__main__":
    main()
