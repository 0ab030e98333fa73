"""The swallowed-update monitor's cost, as a share of training time.

    python benchmarks/monitor_cost.py [--steps 150] [--every 50]

The default recipe's tiny MoE model and data, per precision mode: one run with
``SwallowedUpdateMonitor(every_n_steps=--every)`` whose hooks are timed, so the monitor's own
time is compared with the rest of the same run (whole-run timings on this shared 2-core
machine vary by more than the monitor costs). A run without the monitor is timed beside it.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as L
import torch

from lightning_mp import MoEModule, SwallowedUpdateMonitor, precision_plugin
from lightning_mp.data import ByteTextDataModule
from lightning_mp.machine import describe

MODES = ("32-true", "bf16-true", "bf16-master")


class TimedMonitor(SwallowedUpdateMonitor):
    """The monitor, with the time spent in its two hooks added up."""

    seconds = 0.0

    def on_before_optimizer_step(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_before_optimizer_step(*args, **kwargs)
        self.seconds += time.perf_counter() - start

    def on_train_batch_end(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.seconds += time.perf_counter() - start


def fit_seconds(mode: str, steps: int, monitor: TimedMonitor | None, data: ByteTextDataModule) -> float:
    torch.manual_seed(0)
    model = MoEModule(d_model=64, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_ff=128, max_seq_len=64, warmup_steps=20)
    callbacks = [monitor] if monitor else []
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
    print(f"machine: {describe()}")
    print(f"tiny MoE, {args.steps} steps, monitor every {args.every} steps\n")
    print("| precision | fit without the monitor (s) | fit with it (s) | of which in the monitor (s) | monitor share |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        fit_seconds(mode, 10, TimedMonitor(every_n_steps=5), data)  # warm-up, and the monitor's code path once
        monitor = TimedMonitor(every_n_steps=args.every)
        with_ = fit_seconds(mode, args.steps, monitor, data)
        without = fit_seconds(mode, args.steps, None, data)
        share = monitor.seconds / (with_ - monitor.seconds)
        print(f"| `{mode}` | {without:.1f} | {with_:.1f} | {monitor.seconds:.2f} | {100 * share:.1f} % |")


if __name__ == "__main__":
    main()
