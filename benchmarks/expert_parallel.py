"""Expert parallelism on CPU processes (gloo): per-rank bytes of the routed experts, between
steps (weight shards, FP32 values and AdamW state) and all-gathered for a layer's forward (from
the live tensors), the bytes the experts' all-to-alls and all-gathers move, and step time, for
ep = 1, 2, 4.

    python benchmarks/expert_parallel.py [--devices 4] [--steps 6]

Prints the machine first. One process per ``ep`` value runs ``MoEModule`` (the ``small`` shape,
8 experts) under ``trainer=fsdp2``'s strategy and ``bf16-master`` on ``--devices`` processes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import lightning.pytorch as L
import torch

from lightning_mp.machine import describe


def expert_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer, plugin) -> int:
    """This rank's bytes of the routed experts: their weight shards, the store's FP32 values
    (remainders under the default storage) and the optimizer state of those shards."""
    total, seen = 0, set()
    for layer in module.moe_layers:
        for p in layer.experts.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.untyped_storage().nbytes()
            store = getattr(plugin, "store", None)
            entry = store._entries.get(p) if store is not None else None  # the remainders / FP32 values
            if entry is not None and entry.storage is not None:
                total += entry.storage.untyped_storage().nbytes()
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.numel() > 1:
                    value = value.to_local() if hasattr(value, "to_local") else value
                    if value.untyped_storage().data_ptr() not in seen:
                        seen.add(value.untyped_storage().data_ptr())
                        total += value.untyped_storage().nbytes()
    return total


def worker(args: dict) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_mp import MoEModule, precision_plugin
    from lightning_mp.trainer import FSDP2Strategy

    L.seed_everything(0)
    seq, rows = 128, 8 * args["devices"] * (args["steps"] + 1)
    tokens = torch.randint(0, 256, (rows, seq + 1))
    model = MoEModule(d_model=256, n_layers=4, n_heads=8, n_experts=8, top_k=2, d_ff=512, max_seq_len=seq,
                      expert_parallel=args["ep"])

    from lightning_mp import dispatch

    moved = {"rows": 0}
    plan = dispatch.plan

    def counting_plan(counts, group):  # rows this rank sends to the other ranks of its EP group
        p = plan(counts, group)
        moved["rows"] += sum(n for r, n in enumerate(p.send_splits) if r != group.rank)
        return p

    dispatch.plan = counting_plan
    gathered = {"bytes": 0}

    def watch(layer):
        def seen(*_):  # the experts' weights as this rank holds them now: all-gathered inside a forward
            local = sum((w.to_local() if hasattr(w, "to_local") else w).untyped_storage().nbytes()
                        for w in layer.experts.parameters())
            gathered["bytes"] = max(gathered["bytes"], local)
        # ep = 1: the block's unit all-gathers them before the layer's forward (which may not call the
        # experts module: the sliced path); ep > 1: their own unit, before the experts' forward
        layer.register_forward_pre_hook(seen)
        layer.experts.register_forward_pre_hook(seen)

    class Measure(L.Callback):
        times: list[float] = []

        def on_train_start(self, trainer, module):
            for layer in module.moe_layers:
                watch(layer)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.start)

        def on_train_end(self, trainer, module):
            steps = trainer.global_step
            mine = torch.tensor([float(expert_bytes(module, trainer.optimizers[0], trainer.precision_plugin)),
                                 float(gathered["bytes"]), float(moved["rows"]) / steps])
            everyone = [torch.zeros(3) for _ in range(trainer.world_size)]
            torch.distributed.all_gather(everyone, mine)
            if trainer.global_rank == 0:
                steady = sorted(self.times[1:])[len(self.times[1:]) // 2]  # the median after the first
                print("RESULT " + json.dumps({"ep": args["ep"], "expert_bytes": [int(t[0]) for t in everyone],
                                              "gathered_bytes": [int(t[1]) for t in everyone],
                                              "rows_sent": [float(t[2]) for t in everyone],
                                              "replicas": args["devices"] // args["ep"], "step_s": steady}),
                      flush=True)

    trainer = L.Trainer(accelerator="cpu", devices=args["devices"], strategy=FSDP2Strategy(),
                        plugins=[precision_plugin("bf16-master", strategy="fsdp2")], max_steps=args["steps"],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Measure()])
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    trainer.fit(model, DataLoader(data, batch_size=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    print(describe())
    print(f"{args.devices} gloo processes, MoEModule d_model 256, 4 layers of 8 experts (d_ff 512), bf16-master, "
          f"batch 8 x 128 tokens per rank")
    rows = []
    for ep in (e for e in (1, 2, 4) if args.devices % e == 0):
        job = {"ep": ep, "devices": args.devices, "steps": args.steps}
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(line[7:]))
    # Per step and rank: the all-to-all moves each row sent away in bf16 (d_model 256 x 2 bytes) 4 times
    # (dispatch and combine, forward and backward); FSDP2 all-gathers a layer's expert shards for the
    # forward and again for the backward (reshard after forward), receiving (replicas - 1) / replicas of them.
    base = max(rows[0]["gathered_bytes"])
    print(f"{'ep':>3} {'MB/rank between steps':>22} {'MB/rank all-gathered':>21} {'vs ep=1':>8} "
          f"{'all-to-all MB/step':>19} {'expert all-gather MB/step':>26} {'step s':>7}")
    for r in rows:
        gathered = max(r["gathered_bytes"])
        a2a = max(r["rows_sent"]) * 256 * 2 * 4 / 1e6
        all_gather = 4 * 2 * gathered * (r["replicas"] - 1) / r["replicas"] / 1e6  # 4 layers, fwd + bwd
        print(f"{r['ep']:>3} {max(r['expert_bytes']) / 1e6:>22.2f} {gathered / 1e6:>21.2f} {gathered / base:>8.3f} "
              f"{a2a:>19.2f} {all_gather:>26.2f} {r['step_s']:>7.3f}")


if __name__ == "__main__":
    main()
