"""Bytes per parameter of the training state, and optimizer-step time, per precision mode.

    python benchmarks/precision_memory_and_step.py [--layers 12] [--width 1024] [--repeats 40]

Memory: a real Lightning run (2 AdamW steps) per mode on the same model; bytes are summed
from the live tensors' storages (``lightning_mp.memory_audit``) after the last step and, for
gradients, also at the optimizer step (where they peak). Step time: the optimizer step of
``bf16-master`` (upcast grads, overflow check, AdamW on FP32 masters, round back to bf16)
against ``32-true``'s AdamW on FP32 parameters, timed alternately in one process; the median
of the per-round ratios is printed, with its quartiles. Timings on a CPU say nothing about bf16 compute speed: only the
optimizer step, which is memory-bound FP32 work in both modes, is compared.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import MasterWeightPrecision, bytes_per_param, memory_audit, precision_plugin

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


def time_steps(layers: int, width: int, repeats: int) -> tuple[list[float], list[float], int]:
    torch.manual_seed(0)
    fp32_model = MLP(layers, width)
    master_model = MLP(layers, width)
    master_model.load_state_dict(fp32_model.state_dict())
    fp32_opt = torch.optim.AdamW(fp32_model.parameters(), lr=1e-4)
    plugin = MasterWeightPrecision("bf16-master")
    plugin.convert_module(master_model)
    master_opt = torch.optim.AdamW(master_model.parameters(), lr=1e-4)
    plugin.connect(master_model, [master_opt], [])
    fp32_grads = [torch.randn_like(p) * 1e-3 for p in fp32_model.parameters()]
    half_grads = [g.to(p.dtype) for g, p in zip(fp32_grads, master_model.parameters())]

    def set_grads(params, grads):
        for p, g in zip(params, grads):
            p.grad = g.clone()
            if plugin.grads is not None and p.dtype != torch.float32:
                plugin.grads.record(p)  # as a backward pass leaves it

    fp32_times, master_times = [], []
    for i in range(repeats + 2):  # 2 warm-up rounds, then alternate the two modes
        set_grads(fp32_model.parameters(), fp32_grads)
        t0 = time.perf_counter()
        fp32_opt.step()
        t1 = time.perf_counter()
        set_grads(master_model.parameters(), half_grads)
        t2 = time.perf_counter()
        plugin.optimizer_step(master_opt, master_model.net, closure=lambda: True)  # no Trainer: no hooks
        t3 = time.perf_counter()
        if i >= 2:
            fp32_times.append(t1 - t0)
            master_times.append(t3 - t2)
    return fp32_times, master_times, sum(p.numel() for p in fp32_model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
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

    fp32_times, master_times, n = time_steps(args.layers, args.width, args.repeats)
    # Paired rounds: this machine's memory bandwidth drifts between runs, so compare within a round.
    ratios = [m / f for f, m in zip(fp32_times, master_times)]
    fp32_ms, master_ms = 1e3 * statistics.median(fp32_times), 1e3 * statistics.median(master_times)
    print(f"\nOptimizer step, AdamW, {n / 1e6:.1f}M parameters, {args.repeats} alternating rounds")
    print(f"median 32-true: {fp32_ms:.1f} ms   median bf16-master: {master_ms:.1f} ms")
    print(f"ratio bf16-master / 32-true: median of per-round ratios {statistics.median(ratios):.2f}x, "
          f"quartiles {statistics.quantiles(ratios, n=4)[0]:.2f}x-{statistics.quantiles(ratios, n=4)[2]:.2f}x, "
          f"of minimum times {min(master_times) / min(fp32_times):.2f}x")

if __name__ == "__main__":
    main()
