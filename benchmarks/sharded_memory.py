"""Bytes per parameter per rank of the training state on 2 processes: DDP, FSDP2 with torch's
policy alone (torchtitan's setup), FSDP2 under lightning-mp (FP32 shards, bf16 shards with int16
remainders, bf16 shards with stochastic rounding).

    python benchmarks/sharded_memory.py [--layers 8] [--width 512] [--devices 2] [--accelerator cpu]

Each configuration is a real Lightning run of 3 AdamW steps on 2 CPU processes (gloo) of the same
MLP (LayerNorm -> Linear -> GELU blocks), launched as its own job. On each rank
``lightning_mp.memory_audit`` sums the live tensors' storages (each rank's shard of a DTensor;
``n_params`` is the whole model's: bytes per parameter per rank) at three moments of the third
step: in ``training_step`` (the forward, where activations peak: what the previous step left
alive), at ``on_before_optimizer_step`` (the gradients exist) and after the step. Rank 0's numbers
are printed (the ranks hold equal shards, up to padding).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import bytes_per_param, memory_audit, precision_plugin
from lightning_mp.machine import describe
from lightning_mp.optim import AdamW
from lightning_mp.parallel import leave_process_group
from lightning_mp.precision import FSDP2MasterWeightPrecision

CONFIGS = {
    "ddp-bf16-master": "DDP, `bf16-master` (FP32 masters, not sharded)",
    "fsdp2-torch-policy": "FSDP2, torch's `MixedPrecisionPolicy` (bf16, FP32 reduce) alone, torch `AdamW`",
    "fsdp2-fp32": "FSDP2, `bf16-master`: FP32 shards",
    "fsdp2-remainder": "FSDP2, `bf16-master`, `master=\"remainder\"`: bf16 shards + int16",
    "fsdp2-stochastic": "FSDP2, `bf16-master`, `master=\"stochastic\"`: bf16 shards",
}
MOMENTS = ("forward", "at_step", "after_step")


class MLP(L.LightningModule):
    def __init__(self, layers: int, width: int, config: str) -> None:
        super().__init__()
        self.config = config
        blocks = [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(layers)]
        self.net = nn.Sequential(*blocks, nn.Linear(width, 1))
        self.audits: dict[str, dict[str, int]] = {}

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        mesh = self.device_mesh["data_parallel"]
        if self.config == "fsdp2-torch-policy":  # what torchtitan does: fully_shard with torch's policy
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for unit in [*self.net[:-1], self.net]:  # the units plugin.shard() makes here
                fully_shard(unit, mesh=mesh, mp_policy=policy)
            fully_shard(self, mesh=mesh, mp_policy=policy)
        else:
            self.trainer.precision_plugin.shard(self, mesh, blocks=[nn.Sequential])

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.config == "fsdp2-torch-policy":  # the FP32 norms' outputs meet bf16 Linears: autocast, as torchtitan
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(self.net(x).float(), y)
        else:  # the plugins' forward context does it
            loss = nn.functional.mse_loss(self.net(x).float(), y)
        if batch_idx == 2:  # the third step's forward: what the previous step left alive
            self.audits["forward"] = memory_audit(self, self.trainer.optimizers, self.trainer.precision_plugin)
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.global_step == 2:
            self.audits["at_step"] = memory_audit(self, self.trainer.optimizers, self.trainer.precision_plugin)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx == 2:
            self.audits["after_step"] = memory_audit(self, self.trainer.optimizers, self.trainer.precision_plugin)

    def configure_optimizers(self):
        if self.config == "fsdp2-torch-policy":
            return torch.optim.AdamW(self.parameters(), lr=1e-4)
        return AdamW(self.parameters(), lr=1e-4)


def run_one(config: str, args: argparse.Namespace) -> None:
    """One configuration, in this process and the one Lightning starts for rank 1."""
    if config == "ddp-bf16-master":
        strategy, plugins = "ddp", [precision_plugin("bf16-master", grad_reduce_dtype="fp32")]
    elif config == "fsdp2-torch-policy":
        strategy, plugins = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1), []
    else:
        master = config.removeprefix("fsdp2-")
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
        plugins = [FSDP2MasterWeightPrecision("bf16-master", master=master, device=args.accelerator)]
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, plugins=plugins,
                        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    torch.manual_seed(0)
    model = MLP(args.layers, args.width, config)
    data = TensorDataset(torch.randn(3 * 8 * args.devices, args.width), torch.randn(3 * 8 * args.devices, 1))
    trainer.fit(model, DataLoader(data, batch_size=8))
    leave_process_group()
    if trainer.global_rank == 0:
        Path(args.out).write_text(json.dumps(model.audits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # one job
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return run_one(args.config, args)
    print(describe())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in CONFIGS:
            out = Path(tmp) / f"{config}.json"
            cmd = [sys.executable, __file__, "--config", config, "--out", str(out), "--layers", str(args.layers),
                   "--width", str(args.width), "--devices", str(args.devices), "--accelerator", args.accelerator]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            if done.returncode != 0:
                sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
            results[config] = json.loads(out.read_text())
    n = next(iter(results.values()))["forward"]["n_params"]
    print(f"{args.layers} blocks of width {args.width}: {n / 1e6:.2f}M parameters, {args.devices} processes, "
          f"bytes per parameter per rank (rank 0), AdamW\n")
    print("| configuration | weights | masters | gradients | optimizer state | **during the forward** | at the step | after the step |")
    print("|---|---|---|---|---|---|---|---|")
    for config, audits in results.items():
        at = {m: bytes_per_param(audits[m]) for m in MOMENTS}
        parts = " | ".join(f"{at['at_step'][k]:.2f}" for k in ("weights", "masters", "gradients", "optimizer_state"))
        print(f"| {CONFIGS[config]} | {parts} | **{at['forward']['total']:.2f}** | {at['at_step']['total']:.2f} | "
              f"{at['after_step']['total']:.2f} |")
    print("\n(weights, masters, gradients, optimizer state: at the step)")


if __name__ == "__main__":
    main()
