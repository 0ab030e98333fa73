"""One training run of a tiny MoEModule for tests/test_expert_parallel.py: one process, or several
CPU processes (gloo) under FSDP2 with ``expert_parallel``. Usage: ``python ep_run.py '<json args>'``.

Every run sees the same global batch per optimizer step, cut into micro-batches of ``bs`` rows:
micro-batch ``m`` of a step goes to rank ``m % world``, so one process with ``accumulate=world *
accumulate`` runs exactly the micro-batches a multi-process run does. One step is one epoch (the
same 8 rows each step), so a checkpoint at a step is at an epoch's end and a resume sees the
batches a straight run sees. Rank ``r`` writes what a user can observe to ``out/rank{r}.pt``.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_mp import MoEModule, precision_plugin
from lightning_mp.parallel import exit_after_leaving, leave_process_group
from lightning_mp.trainer import FSDP2Strategy

args = json.loads(sys.argv[1])
out = Path(args["out"])
devices = args.get("devices", 1)
ROWS, SEQ, BS = 8, 16, 2
tokens = torch.randint(0, 256, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(1))
data = TensorDataset(tokens[:, :-1], tokens[:, 1:])


class RankMicroBatches(Sampler):
    """Micro-batch ``m`` (rows ``[m * BS, (m + 1) * BS)``) to rank ``m % world``."""

    def __iter__(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return iter([list(range(m * BS, (m + 1) * BS)) for m in range(rank, ROWS // BS, world)])

    def __len__(self):
        return ROWS // BS // devices


class Model(MoEModule):
    def configure_optimizers(self):
        if args.get("sgd"):
            return torch.optim.SGD(self.parameters(), lr=args["sgd"], momentum=0.9)  # state, as a resume needs
        return super().configure_optimizers()

    def on_after_backward(self):
        # a NaN in one expert's gradient shard of rank 1 only (FP32 shards: .grad is the shard)
        if args.get("nan_at") == self.trainer.global_step and self.global_rank == 1:
            local = self.moe_layers[0].experts.w2.grad.to_local()
            local.view(-1)[0] = float("nan")


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()


class Record(L.Callback):
    def __init__(self):
        self.seen = {"grads0": {}, "bias": [], "drops": [], "weights": []}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.step = trainer.global_step  # the step this micro-batch belongs to

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # every micro-batch: each layer's dropped share, keyed by (step, global micro-batch index)
        m = batch_idx * trainer.world_size + trainer.global_rank  # an epoch is a step: batch_idx restarts
        self.seen["drops"].append((self.step, m, [float(layer.stats["drop_frac"]) for layer in module.moe_layers]))
        if trainer.global_step > self.step:  # the optimizer stepped (or skipped) after this micro-batch
            self.seen["bias"].append([layer.balance.bias.clone() for layer in module.moe_layers])
            self.seen["weights"].append({n: full(p) for n, p in module.named_parameters()})

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == 0:
            self.seen["grads0"] = {n: full(p.grad) for n, p in module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = (get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
                 if trainer.world_size > 1 else module.state_dict())
        module.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():  # as Lightning's own eval
            logits = full(module(tokens[:4, :-1]))
        plugin = trainer.precision_plugin
        torch.save({**self.seen, "state": {k: full(v) for k, v in state.items()}, "logits": logits,
                    "skipped": getattr(plugin, "skipped_steps", 0), "local_experts": _local_experts(module),
                    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}},
                   out / f"rank{trainer.global_rank}.pt")


def _local_experts(module):
    """The shape and dtype of this rank's shard of the first MoE layer's expert weights."""
    w = module.moe_layers[0].experts.w1
    w = w.to_local() if hasattr(w, "to_local") else w
    return {"shape": list(w.shape), "dtype": str(w.dtype)}


L.seed_everything(0)
model = Model(d_model=32, n_layers=2, n_heads=2, n_experts=4, top_k=2, d_ff=64, max_seq_len=SEQ, lr=1e-2,
              warmup_steps=1, decay_steps=100, bias_update_rate=1e-3,
              capacity_factor=args.get("cf"), expert_parallel=args.get("ep", 1))
precision = args.get("precision", "32-true")
plugins = []
if devices > 1:
    strategy = FSDP2Strategy(save_distributed_checkpoint=args.get("dcp", False))
    if "master" in precision:
        plugins = [precision_plugin(precision, strategy="fsdp2", master=args.get("master", "auto"))]
else:
    strategy = "auto"
    if "master" in precision:
        plugins = [precision_plugin(precision, master=args.get("master", "auto"))]
checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=args.get("save_every", 0) or None,
                              save_top_k=-1, save_on_train_epoch_end=False) if args.get("save_every") else None
trainer = L.Trainer(
    accelerator="cpu", devices=devices, strategy=strategy, plugins=plugins,
    **({} if plugins else {"precision": precision}),
    max_steps=args.get("steps", 2), accumulate_grad_batches=args.get("accumulate", 1),
    gradient_clip_val=args.get("clip"), use_distributed_sampler=False, logger=False,
    enable_checkpointing=checkpoints is not None, enable_progress_bar=False, enable_model_summary=False,
    callbacks=[Record()] + ([checkpoints] if checkpoints else []),
)
trainer.fit(model, DataLoader(data, batch_sampler=RankMicroBatches()), ckpt_path=args.get("resume"))
leave_process_group()
exit_after_leaving()  # (without the interpreter's teardown, where torch may abort)
