"""Training-state memory of a LoRA fine-tune of litgpt's GPT, loaded as ``litgpt finetune_lora`` loads it.

    python benchmarks/lora_memory.py [--layers 4] [--width 256] [--rank 8]

A LLaMA-style litgpt ``GPT`` with LoRA on the query and value projections
(``litgpt.lora.GPT``): the base frozen with ``mark_only_lora_as_trainable``, ``fabric.setup``,
the base checkpoint loaded after it, ``AdamW`` given every parameter (as litgpt does; the frozen
ones have no gradient) through ``fabric.setup_optimizers``, two steps. The base checkpoint is
saved in bf16, fp16 and FP32. Per precision and checkpoint: the training state's bytes per parameter after the second step,
measured from the live tensors (``lightning_mp.memory_audit``), and whether the model's state
dict then holds the checkpoint's values exactly. Needs ``litgpt`` (``pip install litgpt``, with
``torch`` pinned).
"""

from __future__ import annotations

import argparse
import logging

import torch

import lightning_mp
from lightning_mp import bytes_per_param, memory_audit
from lightning_mp.machine import describe

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "bf16-master", "16-true", "16-master")
CATEGORIES = ("weights", "masters", "gradients", "optimizer_state")


def config(layers: int, width: int, rank: int):
    from litgpt.lora import Config

    return Config(block_size=128, vocab_size=256, padded_vocab_size=256, n_layer=layers, n_head=4, n_embd=width,
                  bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=width * 8 // 3,
                  rotary_percentage=1.0, parallel_residual=False, lora_r=rank, lora_alpha=2 * rank,
                  lora_query=True, lora_value=True)


def run(precision: str, base: dict[str, torch.Tensor], cfg) -> tuple[dict[str, float], bool, int, int]:
    """Bytes per parameter after two steps, whether the base's values came through exactly, and
    the numbers of parameters and of trainable ones."""
    from litgpt.lora import GPT, mark_only_lora_as_trainable

    fabric = lightning_mp.Fabric(accelerator="cpu", devices=1, precision=precision)
    torch.manual_seed(0)
    with fabric.init_module(empty_init=False):
        model = GPT(cfg)
    mark_only_lora_as_trainable(model)
    model = fabric.setup_module(model)
    model.load_state_dict(base, strict=False)  # litgpt's load_checkpoint(..., strict=False) on one device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-4))  # every one, as litgpt
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randint(0, 256, (2, 128), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, 256).float(), x[:, 1:].reshape(-1))
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated: the state at the step
    audit = memory_audit(model, [optimizer], fabric.strategy.precision)
    state = model.state_dict()
    renamed = {k: k if k in state else ".linear.".join(k.rsplit(".", 1)) for k in base}  # LoRA's wrapped Linears
    exact = all(torch.equal(state[renamed[k]].float(), v.float()) for k, v in base.items())
    return bytes_per_param(audit), exact, audit["n_params"], sum(p.numel() for p in trainable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    for name in ("lightning.fabric", "lightning.pytorch", "lightning_mp"):  # their start lines would split the table
        logging.getLogger(name).setLevel(logging.WARNING)
    from litgpt import GPT as BaseGPT

    cfg = config(args.layers, args.width, args.rank)
    torch.manual_seed(1)
    pretrained = {k: v + 1e-4 * torch.randn_like(v) for k, v in BaseGPT(cfg).state_dict().items()}  # bf16 cannot hold
    print(describe())
    print(f"litgpt LoRA GPT: {args.layers} layers, width {args.width}, rank {args.rank} on query and value; "
          "bytes per parameter after two AdamW steps (gradients kept)\n")
    print("| precision | base checkpoint | " + " | ".join(CATEGORIES) + " | total | base values exact |")
    print("|---|---|" + "---|" * (len(CATEGORIES) + 2))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        base = {k: v.to(dtype) for k, v in pretrained.items()}
        for precision in PRECISIONS:
            per, exact, n, trainable = run(precision, base, cfg)
            cells = " | ".join(f"{per[c]:.2f}" for c in CATEGORIES)
            name = str(dtype).replace("torch.", "")
            print(f"| `{precision}` | {name} | {cells} | **{per['total']:.2f}** | {'yes' if exact else 'no'} |")
    print(f"\n{n:,} parameters, {trainable:,} of them trained ({trainable / n:.2%})")


if __name__ == "__main__":
    main()
