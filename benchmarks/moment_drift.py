"""How far an 8-bit second moment drifts from the FP32 one when it changes slower than its code's spacing.

    python benchmarks/moment_drift.py [--steps 3000]

One block of elements, AdamW with betas (0.9, 0.999): element 0 gets a gradient of 1 every step
(the block's largest second moment, growing to 1 as 1 - 0.999**t), element 1 a gradient of 0.5
at the first step only, element 2 a gradient of 0.01 for the first 100 steps. In FP32, elements
1 and 2 decay by 0.999 a step. Rounded to nearest with 3 mantissa bits, a code moves only when
its value over the block's scale moves by half a code's spacing (1/32 to 1/16): ``v`` changes by
at most about 0.1 % a step, so once the scale grows by less than that the codes stay put and
elements 1 and 2 follow the scale instead of their own average. Prints each element's
``exp_avg_sq`` at the end under lightning-mp's 8-bit moments, torchao's ``AdamW8bit`` (if
installed; its 8-bit state needs 4096 elements or more), lightning-mp's bf16 moments (stochastically
rounded) and FP32 moments.
"""

from __future__ import annotations

import argparse

import torch

from lightning_mp.machine import describe
from lightning_mp.optim import AdamW, quant

N = 4096


def gradient(t: int) -> torch.Tensor:
    g = torch.zeros(N)
    g[0] = 1.0
    g[1] = 0.5 if t == 0 else 0.0
    g[2] = 0.01 if t < 100 else 0.0
    return g


def run(make, steps: int) -> tuple[torch.optim.Optimizer, torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.zeros(N))
    opt = make([p])
    for t in range(steps):
        p.grad = gradient(t)
        opt.step()
    return opt, p


def second_moment(opt, p) -> torch.Tensor:
    state = opt.state[p]
    v = state["exp_avg_sq"]
    if v.dtype == torch.uint8:  # lightning-mp's codes
        return quant.decode("exp_avg_sq", v, state["exp_avg_sq" + quant.SCALE])
    return v.dequantize() if hasattr(v, "dequantize") else v.float()  # torchao's subclass, or bf16 / FP32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    print(f"machine: {describe()} (the arithmetic is the same on any)\n")
    kw = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    makers = {"FP32 moments": lambda ps: AdamW(ps, **kw),
              "lightning-mp, 8-bit moments": lambda ps: AdamW(ps, **kw, moment_dtype="8bit"),
              "lightning-mp, bf16 moments (stochastic rounding)": lambda ps: AdamW(ps, **kw, moment_dtype=torch.bfloat16)}
    try:
        from torchao.optim import AdamW8bit

        makers["torchao `AdamW8bit`"] = lambda ps: AdamW8bit(ps, **kw)
    except ImportError:
        print("torchao is not installed: its row is skipped")
    v = {label: second_moment(*run(make, args.steps)) for label, make in makers.items()}
    ref = v["FP32 moments"]
    print(f"`exp_avg_sq` after {args.steps} steps (ratio to FP32 moments)\n")
    print("| moments | element 0 (the block's largest) | element 1 | element 2 |")
    print("|---|---|---|---|")
    for label, x in v.items():
        cells = " | ".join(f"{x[i].item():.3g} ({x[i].item() / ref[i].item():.3g}x)" for i in range(3))
        print(f"| {label} | {cells} |")


if __name__ == "__main__":
    main()
