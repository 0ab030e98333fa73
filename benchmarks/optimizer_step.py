"""The optimizer step under every storage policy against torch's fused FP32 AdamW, and its bandwidth floor.

    python benchmarks/optimizer_step.py [--layers 12] [--width 1024] [--repeats 30] [--threads N] [--from-step S]

13.6M parameters (12 x width^2, 24 x width, 4 x width/4 x width, as the issue's measurement),
AdamW, one process. Each round steps every optimizer once, in turn (each round starting one further
down the list, so that no step always follows the same one); the table gives the median
time and the median of the per-round ratios to ``torch.optim.AdamW(fused=True)`` on FP32
parameters of the same shapes (with quartiles). Bytes moved per parameter count what a step must
read and write (a bf16 weight and gradient are 2 bytes, FP32 moments and masters 4, a remainder or
compensation 2, 8-bit moments 1 each, their block scales rounded away); the floor is those bytes at the machine's in-place streaming rate, measured here.
Where the kernel runs 8-bit moments through its hand-written AVX-512 loop, two more rows step them
with the portable build (``fused.portable()``), side by side. ``--from-step S`` sets every
optimizer's step counters to ``S`` after the first round: the steps of a long run (from step 16628
at beta2 0.999, sqrt(1 - beta2**step) rounds to 1.0 in FP32, and the hand-written loop leaves out
that division).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from lightning_mp import fused
from lightning_mp.machine import describe
from lightning_mp.optim import AdamW
from lightning_mp.optim.adopt import adopt

BF16 = torch.bfloat16

# (label, how to build, bytes read + written per parameter)
ROWS = [
    ("torch `AdamW(fused=True)`, FP32", "torch-fused", 16 + 12),
    ("torch `AdamW(foreach=True)`, FP32", "torch-foreach", 16 + 12),
    ("`lightning_mp.optim.AdamW`, `master=\"fp32\"` (bf16 weights, FP32 masters)", ("fp32", torch.float32, None), 14 + 14),
    ("`lightning_mp.optim.AdamW`, `master=\"remainder\"`", ("remainder", torch.float32, None), 14 + 12),
    ("torch `AdamW` adopted by the default storage (`master=\"auto\"`: int16 remainders)", "adopted", 14 + 12),
    ("`lightning_mp.optim.AdamW`, `master=\"kahan\"`", ("kahan", torch.float32, None), 14 + 12),
    ("`lightning_mp.optim.AdamW`, `master=\"stochastic\"`", ("stochastic", torch.float32, None), 12 + 10),
    ("`lightning_mp.optim.AdamW`, `master=\"stochastic\"`, bf16 moments", ("stochastic", BF16, None), 8 + 6),
    ("`lightning_mp.optim.AdamW`, `master=\"remainder\"`, 8-bit moments", ("remainder", "8bit", None), 8 + 8),
    ("`lightning_mp.optim.AdamW`, `master=\"stochastic\"`, 8-bit moments", ("stochastic", "8bit", None), 6 + 4),
    ("`lightning_mp.optim.AdamW`, `master=\"remainder\"`, `compile=True` (torch.compile, inductor's C++)", ("remainder", torch.float32, True), 14 + 12),
    ("`lightning_mp.optim.AdamW`, `master=\"remainder\"`, `compile=False` (torch's foreach ops)", ("remainder", torch.float32, False), 14 + 12),
]
# where the 8-bit rows run the hand-written AVX-512 loop: the same rows with the portable build, beside them
PORTABLE = [(f"the same, portable loop (`-DLMP_PORTABLE`): {label.split(', ', 1)[1]}", kind, nbytes)
            for label, kind, nbytes in ROWS if kind[1:2] == ("8bit",)]


def shapes(layers: int, width: int) -> list[tuple[int, ...]]:
    return [(width, width)] * layers + [(width,)] * (2 * layers) + [(width // 4, width)] * 4


def build(kind, dims: list[tuple[int, ...]]):
    g = torch.Generator().manual_seed(0)
    if kind == "adopted":  # a user's torch.optim.AdamW on bf16 weights, as MasterWeightPrecision adopts it
        params = [torch.zeros(s, dtype=BF16, requires_grad=True) for s in dims]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
        adopt(opt, "remainder")
        for p in params:
            opt.set_master(p, torch.randn(p.shape, generator=g) * 0.02)
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(BF16)
        return opt
    if isinstance(kind, str):  # torch's AdamW on FP32 parameters
        params = [(torch.randn(s, generator=g) * 0.02).requires_grad_() for s in dims]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **{kind.split("-")[1]: True})
    master, moments, compile = kind
    params = [torch.zeros(s, dtype=BF16, requires_grad=True) for s in dims]
    opt = AdamW(params, lr=1e-4, weight_decay=0.1, master=master, moment_dtype=moments, compile=compile)
    for p in params:
        opt.set_master(p, torch.randn(p.shape, generator=g) * 0.02)
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(BF16)
    return opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch's (and the kernel's) threads; default: torch's")
    parser.add_argument("--from-step", type=int, default=0, help="every step counter set to this after the first round")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    if not fused.available():
        print("the fused step is not available here (no C++ compiler): lightning_mp.optim rows run eagerly")
    dims = shapes(args.layers, args.width)
    n = sum(torch.Size(s).numel() for s in dims)
    bandwidth = fused.stream_bandwidth() if fused.available() else float("nan")
    print(f"{n / 1e6:.1f}M parameters; in-place streaming rate {bandwidth / 1e9:.1f} GB/s (read + write)"
          + (f"; step counters from {args.from_step}" if args.from_step else "") + "\n")
    rows, portable = ROWS, set()
    if fused.available():
        print(f"8-bit AdamW step: {'hand-written AVX-512 loop' if fused.avx512() else 'portable loop (no AVX-512 here)'}")
        if fused.avx512():
            after = max(i for i, (_, kind, _) in enumerate(ROWS) if kind[1:2] == ("8bit",)) + 1  # after the 8-bit rows
            rows, portable = ROWS[:after] + PORTABLE + ROWS[after:], {label for label, _, _ in PORTABLE}
    opts = {label: build(kind, dims) for label, kind, _ in rows}
    times: dict[str, list[float]] = {label: [] for label in opts}
    labels = list(opts)
    for i in range(args.repeats + 3):  # 3 warm-up rounds (the first builds the kernel if needed)
        # each round starts one later in the list: every step follows every other equally often
        for label in labels[i % len(labels):] + labels[: i % len(labels)]:
            opt = opts[label]
            with fused.portable() if label in portable else contextlib.nullcontext():
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
            if i >= 3:
                times[label].append(elapsed)
            if i == 0 and args.from_step:
                for state in opt.state.values():
                    state["step"].fill_(args.from_step)  # (AdamW's counters: FP32 tensors on the CPU, torch's too)
    anchor = times[ROWS[0][0]]
    print("| step | median ms | vs `AdamW(fused=True)` FP32 (median, quartiles) | bytes/param | floor ms | time / floor |")
    print("|---|---|---|---|---|---|")
    for label, _, nbytes in rows:
        ratios = [t / a for t, a in zip(times[label], anchor)]
        q = statistics.quantiles(ratios, n=4)
        median = statistics.median(times[label])
        floor = nbytes * n / bandwidth
        print(f"| {label} | {1e3 * median:.1f} | {statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[2]:.2f}) | {nbytes} | "
              f"{1e3 * floor:.1f} | {median / floor:.2f} |")


if __name__ == "__main__":
    main()
