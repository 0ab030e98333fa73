"""Bytes per parameter of the training state, and optimizer-step time, per precision mode.

    python benchmarks/precision_memory_and_step.py [--layers 12] [--width 1024] [--repeats 40]

Memory: a real Lightning run (2 AdamW steps) per mode on the same model; bytes are summed
from the live tensors' storages (``lightning_mp.memory_audit``) after the last step and, for
gradients, also at the optimizer step (where they peak).

Step time: the whole optimizer step of ``bf16-master`` (``MasterWeightPrecision.optimizer_step``
after a backward: FP32 gradients, overflow check, AdamW on the FP32 values, rounding back into
bf16) against ``32-true``'s ``torch.optim.AdamW(fused=True)`` on FP32 parameters of the same
model, each step (with the ``zero_grad`` that follows it in Lightning's loop, which frees the
gradients: ``bf16-master`` frees them inside its step) timed in turn in one process (each round
starting one further down the list);
the median of the per-round ratios is printed with its quartiles. Gradients are set as a backward
leaves them (bf16 under ``bf16-master``). Only the optimizer step is timed: it is memory-bound
FP32 work in every mode, so a CPU says nothing here about bf16 compute speed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import MasterWeightPrecision, bytes_per_param, memory_audit, precision_plugin
from lightning_mp.machine import describe
from lightning_mp.optim import AdamW

MODES = ("32-true", "bf16-mixed", "bf16-true", "bf16-master")


class MLP(L.LightningModule):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        blocks = [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(layers)]
        self.net = nn.Sequential(*blocks, nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class Audit(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.at_step = memory_audit(pl_module, trainer.optimizers, trainer.precision_plugin)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step = memory_audit(pl_module, trainer.optimizers, trainer.precision_plugin)


def audited_fit(model: L.LightningModule, plugin: Precision, width: int) -> tuple[dict, dict]:
    """Bytes per parameter after 2 steps of ``model`` under ``plugin``, and at the last step."""
    data = DataLoader(TensorDataset(torch.randn(16, width), torch.randn(16, 1)), batch_size=8)
    audit = Audit()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, plugins=[plugin], callbacks=[audit],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, data)
    return bytes_per_param(audit.after_step), bytes_per_param(audit.at_step)


def measure_memory(mode: str, layers: int, width: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    return audited_fit(MLP(layers, width), precision_plugin(mode), width)


# (label, precision, optimizer): what a user would write in configure_optimizers
STEPS = [
    ("`32-true`, torch `AdamW(fused=True)`", "32-true", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
    ("`32-true`, torch `AdamW` (foreach, torch's default)", "32-true", lambda ps: torch.optim.AdamW(ps, lr=1e-4)),
    ("`bf16-master`, torch `AdamW(fused=True)`", "bf16-master", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
    ("`bf16-master`, torch `AdamW` (foreach)", "bf16-master", lambda ps: torch.optim.AdamW(ps, lr=1e-4)),
    ("`bf16-master`, `lightning_mp.optim.AdamW`", "bf16-master", lambda ps: AdamW(ps, lr=1e-4)),
]


class Stepper:
    """One model and optimizer under one precision, stepped as Lightning steps it (no Trainer hooks)."""

    def __init__(self, precision: str, make_optimizer, state: dict, layers: int, width: int) -> None:
        self.model = MLP(layers, width)
        self.model.load_state_dict(state)
        self.plugin = MasterWeightPrecision("bf16-master") if precision == "bf16-master" else None
        if self.plugin is not None:
            self.plugin.convert_module(self.model)
        self.optimizer = make_optimizer(list(self.model.parameters()))
        if self.plugin is not None:
            self.plugin.connect(self.model, [self.optimizer], [])
        g = torch.Generator().manual_seed(1)
        self.grads = [(torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype) for p in self.model.parameters()]

    def step(self) -> float:
        for p, grad in zip(self.model.parameters(), self.grads):
            p.grad = grad.clone()
            if self.plugin is not None and self.plugin.grads is not None and p.dtype != torch.float32:
                self.plugin.grads.record(p)  # as a backward pass leaves it
        start = time.perf_counter()
        if self.plugin is None:
            self.optimizer.step()
        else:  # the plugin's step as Lightning's automatic loop runs it: its gradients die with it
            self.plugin.step_runner.run(self.optimizer, lambda: None, loss=None, keep_grads=False)
        self.optimizer.zero_grad()  # Lightning's, before the next backward: frees 32-true's gradients
        return time.perf_counter() - start


def time_steps(layers: int, width: int, repeats: int) -> tuple[dict[str, list[float]], int]:
    torch.manual_seed(0)
    state = MLP(layers, width).state_dict()
    steppers = {label: Stepper(precision, make, state, layers, width) for label, precision, make in STEPS}
    labels = list(steppers)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(repeats + 3):  # 3 warm-up rounds (the first builds the fused kernel if needed)
        for label in labels[i % len(labels):] + labels[: i % len(labels)]:
            elapsed = steppers[label].step()
            if i >= 3:
                times[label].append(elapsed)
    return times, sum(p.numel() for p in steppers[labels[0]].model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()

    print(f"machine: {describe()}")
    rows = {mode: measure_memory(mode, args.layers, args.width) for mode in MODES}
    n = sum(p.numel() for p in MLP(args.layers, args.width).parameters())
    print(f"\nBytes per parameter with AdamW after a step ({n / 1e6:.1f}M parameters, measured from live tensors)\n")
    print("| precision | weights | masters | gradients | optimizer state | total | gradients at the step |")
    print("|---|---|---|---|---|---|---|")
    for mode, (after, at_step) in rows.items():
        print(
            f"| `{mode}` | {after['weights']:.2f} | {after['masters']:.2f} | {after['gradients']:.2f} | "
            f"{after['optimizer_state']:.2f} | **{after['total']:.2f}** | {at_step['gradients']:.2f} |"
        )

    times, n = time_steps(args.layers, args.width, args.repeats)
    anchor = times[STEPS[0][0]]
    print(f"\nOptimizer step with AdamW, {n / 1e6:.1f}M parameters, {args.repeats} rounds\n")
    print("| step | median ms | vs `32-true` `AdamW(fused=True)` (median of per-round ratios, quartiles) |")
    print("|---|---|---|")
    for label, _, _ in STEPS:
        ratios = [t / a for t, a in zip(times[label], anchor)]
        q = statistics.quantiles(ratios, n=4)
        print(f"| {label} | {1e3 * statistics.median(times[label]):.1f} | "
              f"{statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[2]:.2f}) |")


if __name__ == "__main__":
    main()
