"""litgpt's GPT fine-tuned in a loop shaped like litgpt's ``finetune/full.py``: 32-true, bf16-true, bf16-master.

    python benchmarks/litgpt_finetune.py [--pretrain-steps 400] [--steps 300] [--lr 3e-5] [--seeds 0 1 2]

Where the trap bites: a tiny litgpt ``GPT`` (LLaMA-style, 0.8M parameters, byte vocabulary) is
first trained under 32-true (``--pretrain-steps`` at lr 3e-3 on the standard library's ``*.py``
files), then fine-tuned at a small learning rate, as ``litgpt finetune_full`` does: the model built
in ``fabric.init_module(empty_init=True)``, ``fabric.setup``, the pretrained weights loaded with
``load_state_dict`` (litgpt's ``load_checkpoint`` on one device), ``AdamW`` through
``fabric.setup_optimizers``, a warm-up schedule, ``chunked_cross_entropy`` on shifted targets,
gradient clipping at norm 1 and accumulation over 2 micro-batches. litgpt's configs pick
``bf16-true``; ``lightning_mp.Fabric`` adds ``bf16-master`` (torch's AdamW, or
``lightning_mp.optim.AdamW`` with 8-bit moments). ``--peers`` adds torchao's ``_AdamW`` and
``AdamW8bit`` (bf16 stochastic rounding) and optimi's Kahan-summed AdamW on bf16 weights.

Per precision and seed (the fine-tune's data order): the validation loss of the fine-tuned model
evaluated in FP32 (its ``state_dict()``, which holds the FP32 values under ``bf16-master``, loaded
into an FP32 model), and the training state's bytes per parameter after a step
(``memory_audit``). Needs ``litgpt`` (``pip install litgpt``, with ``torch`` pinned).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

import lightning_mp
from lightning_mp import ByteTextDataModule, bytes_per_param, memory_audit
from lightning_mp.machine import describe

def adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.02, betas=(0.9, 0.95))


def ours_8bit(params, lr):
    from lightning_mp.optim import AdamW

    return AdamW(params, lr=lr, weight_decay=0.02, betas=(0.9, 0.95), moment_dtype="8bit")


def peers() -> list:
    """(label, precision, optimizer) of the peers that import here: bf16 weights (bf16-true), their optimizers."""
    rows = []
    try:
        from torchao.optim import AdamW8bit, _AdamW

        kw = dict(weight_decay=0.02, betas=(0.9, 0.95), bf16_stochastic_round=True)
        rows.append(("torchao `_AdamW`, bf16 SR", "bf16-true", lambda p, lr: _AdamW(p, lr=lr, **kw)))
        rows.append(("torchao `AdamW8bit`, bf16 SR", "bf16-true", lambda p, lr: AdamW8bit(p, lr=lr, **kw)))
    except ImportError:
        print("torchao is not installed: its rows are skipped")
    try:
        from optimi import AdamW as OptimiAdamW

        rows.append(("optimi `AdamW(kahan_sum=True)`", "bf16-true", lambda p, lr: OptimiAdamW(
            p, lr=lr, weight_decay=0.02, betas=(0.9, 0.95), eps=1e-8, kahan_sum=True)))
    except ImportError:
        print("optimi (torch-optimi) is not installed: its rows are skipped")
    return rows


ROWS = [
    ("`32-true`", "32-true", adamw),
    ("`bf16-true` (litgpt's default)", "bf16-true", adamw),
    ("`bf16-master` (torch's AdamW, adopted: int16 remainders)", "bf16-master", adamw),
    ("`bf16-master`, `lightning_mp.optim.AdamW(moment_dtype=\"8bit\")`", "bf16-master", ours_8bit),
]


def config():
    from litgpt import Config

    return Config(block_size=64, vocab_size=256, padded_vocab_size=256, n_layer=4, n_head=4, n_embd=128, bias=False,
                  norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=344, rotary_percentage=1.0,
                  parallel_residual=False)


def data(seed: int) -> ByteTextDataModule:
    torch.manual_seed(seed)
    module = ByteTextDataModule(seq_len=64, batch_size=16, max_bytes=2_000_000)
    module.setup("fit")
    return module


def batches(loader):
    while True:
        yield from loader


def loss_of(model, x):
    from litgpt.utils import chunked_cross_entropy

    logits = model(x)
    return chunked_cross_entropy(logits[..., :-1, :], x[..., 1:])  # output n predicts token n + 1


@torch.no_grad()
def validate(state: dict, module: ByteTextDataModule, n: int = 20) -> float:
    """The validation loss of the weights in ``state`` evaluated in FP32."""
    from litgpt import GPT

    model = GPT(config())
    model.load_state_dict({k: v.float() for k, v in state.items()})
    losses = [loss_of(model, x).item() for (x, _), _ in zip(module.val_dataloader(), range(n))]
    return statistics.mean(losses)


def pretrain(steps: int) -> dict:
    from litgpt import GPT

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.seed_everything(1234)
    model = GPT(config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    model, optimizer = fabric.setup(model, optimizer)
    for _, (x, _) in zip(range(steps), batches(data(1234).train_dataloader())):
        fabric.backward(loss_of(model, x))
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def finetune(precision: str, make_optimizer, pretrained: dict, steps: int, lr: float, seed: int):
    """litgpt's finetune/full.py loop, cut to its training steps."""
    from litgpt import GPT

    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision=precision)
    fabric.seed_everything(seed)
    with fabric.init_module(empty_init=True):
        model = GPT(config())
    model = fabric.setup(model)
    model.load_state_dict(pretrained)
    optimizer = fabric.setup_optimizers(make_optimizer(model.parameters(), lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))  # warm-up
    module = data(seed)
    accumulate, audit = 2, None
    start = time.perf_counter()
    train = batches(module.train_dataloader())
    for step in range(steps):
        for micro in range(accumulate):
            x, _ = next(train)
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                fabric.backward(loss_of(model, x) / accumulate)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        if audit is None:  # after the first step, gradients still on the parameters
            audit = bytes_per_param(memory_audit(model, [optimizer], fabric.strategy.precision))
        optimizer.zero_grad()
        scheduler.step()
    seconds = time.perf_counter() - start
    after = bytes_per_param(memory_audit(model, [optimizer], fabric.strategy.precision))
    return validate(model.state_dict(), module), after["total"], audit["total"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--peers", action="store_true", help="add torchao's and optimi's optimizers on bf16 weights")
    parser.add_argument("--only", default="", help="run only the rows whose label contains this text")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    pretrained = pretrain(args.pretrain_steps)
    n = sum(v.numel() for v in pretrained.values())
    before = validate(pretrained, data(0))
    print(f"litgpt GPT, {n / 1e6:.2f}M parameters; pretrained {args.pretrain_steps} steps under 32-true: "
          f"val loss {before:.4f}; fine-tune {args.steps} steps at lr {args.lr:g}\n")
    print("| precision, optimizer | val loss (FP32 eval), seeds " + " / ".join(map(str, args.seeds))
          + " | mean | moved by fine-tuning | bytes/param between steps | at the step | s per run |")
    print("|---|---|---|---|---|---|---|")
    for label, precision, make_optimizer in ROWS + (peers() if args.peers else []):
        if args.only not in label:
            continue
        runs = [finetune(precision, make_optimizer, pretrained, args.steps, args.lr, seed) for seed in args.seeds]
        losses = [r[0] for r in runs]
        mean = statistics.mean(losses)
        print(f"| {label} | {' / '.join(f'{v:.4f}' for v in losses)} | {mean:.4f} | {mean - before:+.4f} | "
              f"{runs[0][1]:.2f} | {runs[0][2]:.2f} | {statistics.mean(r[3] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
