"""The mantissa trap, side by side: the same model, data and seed under each precision.

    python benchmarks/mantissa_trap.py [--steps 400] [--lr 1e-4]

A small MLP learns a fixed random teacher with AdamW. AdamW moves each weight by about
``lr`` per step; with ``lr=1e-4`` and weights of order 0.1 that is below half a bf16 step
(2**-9 of the weight) for most of them, so under ``bf16-true`` the updates round away and
the loss stalls, while ``bf16-master`` keeps them in FP32 masters and tracks ``32-true``.
Prints each mode's final loss, its ratio to ``32-true``'s, and the share of stored hidden
weights that still changed over the last 50 steps. Times are CPU times: bf16 is emulated
and slow here, so they say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import precision_plugin
from lightning_mp.machine import describe

MODES = ("32-true", "bf16-mixed", "bf16-true", "bf16-master", "16-master")


class Student(L.LightningModule):
    def __init__(self, d_in: int = 32, width: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.log("loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def teacher_data(n: int = 4096, d_in: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    teacher = nn.Sequential(nn.Linear(d_in, 64), nn.Tanh(), nn.Linear(64, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)  # targets of order 1
        y = teacher(x)
    return TensorDataset(x, y)


class LateSnapshot(Callback):
    """The hidden layer's stored (16-bit or FP32) weight, ``window`` steps before the end."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.weight = at_step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            self.weight = pl_module.net[2].weight.detach().float().clone()


def run(mode: str, steps: int, lr: float, data: TensorDataset, window: int = 50) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = Student(lr=lr)
    snapshot = LateSnapshot(steps - window)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, plugins=[precision_plugin(mode, device="cpu")],
        callbacks=[snapshot],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)))
    elapsed = time.perf_counter() - start
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        x, y = data.tensors
        loss = nn.functional.mse_loss(model.net(trainer.precision_plugin.convert_input(x)).float(), y).item()
    moved = (model.net[2].weight.detach().float() != snapshot.weight).float().mean().item()
    return loss, moved, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    data = teacher_data()
    results = {mode: run(mode, args.steps, args.lr, data) for mode in MODES}
    base = results["32-true"][0]
    print(f"\nAdamW lr={args.lr}, {args.steps} steps, same seed and data; loss on the training set at the end\n")
    print("| precision | final loss | loss / 32-true's | hidden weights that moved in the last 50 steps | time (s) |")
    print("|---|---|---|---|---|")
    for mode, (loss, moved, elapsed) in results.items():
        print(f"| `{mode}` | {loss:.4f} | {loss / base:.2f}x | {100 * moved:.1f} % | {elapsed:.1f} |")


if __name__ == "__main__":
    main()
