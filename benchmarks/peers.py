"""The cheap optimizer states of the peers against lightning-mp's, measured side by side in one process.

    pip install torchao torch-optimi torch==<your torch>     # optional: missing peers are skipped
    python benchmarks/peers.py [--layers 12] [--width 1024] [--repeats 20]

Same parameter shapes as ``optimizer_step.py`` (13.7M parameters), AdamW at lr 1e-4, weight
decay 0.1. Per optimizer: bytes per parameter of the weights, the FP32 values' storage and the
optimizer state, counted from the live tensors after a step (a quantized state's inner tensors:
codes, scales, code tables), and the step time against ``torch.optim.AdamW(fused=True)`` on FP32
parameters, in alternating rounds (median of the per-round ratios, quartiles). Gradients (2 bytes
per parameter at the step for every 16-bit row, 4 for the FP32 one) are left out of the bytes.

- torchao ``_AdamW(bf16_stochastic_round=True)``: bf16 weights and FP32 moments, stochastic rounding;
- torchao ``AdamW8bit(bf16_stochastic_round=True)``: and 8-bit block-wise moments;
- optimi ``AdamW(kahan_sum=True)``: bf16 weights, bf16 moments and a bf16 Kahan compensation;
- lightning-mp: ``lightning_mp.optim.AdamW`` under each storage, FP32 or 8-bit moments.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from optimizer_step import shapes

from lightning_mp.memory import plain_tensors
from lightning_mp.machine import describe
from lightning_mp.optim import AdamW

BF16 = torch.bfloat16
KW = dict(lr=1e-4, weight_decay=0.1)


def nbytes(ts, seen: set) -> int:
    """Bytes of the storages of ``ts`` not in ``seen`` (each storage counted once, in its first category)."""
    total = 0
    for t in ts:
        for inner in plain_tensors(t):  # a quantized state: its codes, scales, code tables
            key = (inner.untyped_storage().data_ptr(), inner.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += inner.untyped_storage().nbytes()
    return total


def peers() -> dict:
    """Builders of each peer optimizer that imports here: (params in bf16) -> optimizer."""
    found = {}
    try:
        from torchao.optim import AdamW8bit, _AdamW

        found["torchao `_AdamW`, bf16 stochastic rounding"] = lambda p: _AdamW(p, **KW, bf16_stochastic_round=True)
        found["torchao `AdamW8bit`, bf16 stochastic rounding"] = lambda p: AdamW8bit(p, **KW, bf16_stochastic_round=True)
    except ImportError:
        print("torchao is not installed: its rows are skipped")
    try:
        from optimi import AdamW as OptimiAdamW

        found["optimi `AdamW(kahan_sum=True)`"] = lambda p: OptimiAdamW(p, **KW, kahan_sum=True, eps=1e-8, betas=(0.9, 0.999))
    except ImportError:
        print("optimi (torch-optimi) is not installed: its rows are skipped")
    return found


def ours(master: str, moments) -> callable:
    return lambda p: AdamW(p, **KW, master=master, moment_dtype=moments)


def build(make, dims, dtype):
    g = torch.Generator().manual_seed(0)
    params = [(torch.randn(s, generator=g) * 0.02).to(dtype).requires_grad_() for s in dims]
    opt = make(params)
    grads = [(torch.randn(s, generator=g) * 1e-3).to(dtype) for s in dims]
    return params, grads, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    dims = shapes(args.layers, args.width)
    rows = {"torch `AdamW(fused=True)`, FP32": (lambda p: torch.optim.AdamW(p, **KW, fused=True), torch.float32)}
    rows.update({label: (make, BF16) for label, make in peers().items()})
    rows.update({
        "lightning-mp, `master=\"remainder\"`, FP32 moments": (ours("remainder", torch.float32), BF16),
        "lightning-mp, `master=\"remainder\"`, 8-bit moments": (ours("remainder", "8bit"), BF16),
        "lightning-mp, `master=\"stochastic\"`, 8-bit moments": (ours("stochastic", "8bit"), BF16),
    })
    runs = {label: build(make, dims, dtype) for label, (make, dtype) in rows.items()}
    n = sum(p.numel() for p in runs[next(iter(runs))][0])
    print(f"{n / 1e6:.1f}M parameters, {args.repeats} alternating rounds after 3 warm-up ones "
          "(the first compiles torchao's steps)\n")
    times: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for i in range(args.repeats + 3):
        for label in labels[i % len(labels):] + labels[: i % len(labels)]:
            params, grads, opt = runs[label]
            for p, g in zip(params, grads):
                p.grad = g
            start = time.perf_counter()
            opt.step()
            if i >= 3:
                times[label].append(time.perf_counter() - start)
    anchor = times[labels[0]]
    print("| optimizer | weights | FP32 values' storage | optimizer state | bytes/param | step ms | vs torch fused FP32 (quartiles) |")
    print("|---|---|---|---|---|---|---|")
    for label, (params, _, opt) in runs.items():
        seen: set = set()
        weights = nbytes(params, seen) / n
        store = getattr(opt, "store", None)
        masters = nbytes(store.tensors(), seen) / n if store is not None else 0.0
        state = nbytes((v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)), seen) / n
        ratios = [t / a for t, a in zip(times[label], anchor)]
        q = statistics.quantiles(ratios, n=4)
        print(f"| {label} | {weights:.2f} | {masters:.2f} | {state:.2f} | **{weights + masters + state:.2f}** | "
              f"{1e3 * statistics.median(times[label]):.1f} | {statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[2]:.2f}) |")


if __name__ == "__main__":
    main()
