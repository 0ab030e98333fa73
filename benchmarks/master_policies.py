"""Master storage policies: bytes per parameter, and the optimizer step against torch's AdamW.

    python benchmarks/master_policies.py [--layers 12] [--width 1024] [--repeats 30] [--keep-freed-memory]

Memory: a real Lightning run (2 AdamW steps) per mode and policy on the same 12.6M-parameter
MLP; bytes are summed from the live tensors' storages (``lightning_mp.memory_audit``) after
the last step, and the gradients also at the optimizer step.

Step time: ``lightning_mp.optim.AdamW`` on bf16 weights under each policy against
``torch.optim.AdamW(foreach=True)`` on FP32 parameters of the same shapes (and, on CUDA,
``fused=True``), timed alternately in one process; the median of the per-round ratios is
printed with its quartiles. ``--keep-freed-memory`` stops glibc from returning freed memory to
the OS (``mallopt``): otherwise each step's temporaries page-fault anew on a CPU, a cost
CUDA's caching allocator does not have.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
from precision_memory_and_step import MLP, audited_fit

from lightning_mp import precision_plugin
from lightning_mp.machine import describe
from lightning_mp.optim import AdamW

# (label, precision, master policy, moment dtype)
ROWS = [
    ("`32-true`", "32-true", None, torch.float32),
    ("`bf16-mixed`", "bf16-mixed", None, torch.float32),
    ("`bf16-true` (the trap)", "bf16-true", None, torch.float32),
    ("`bf16-master` (default `master=auto`, torch's AdamW adopted)", "bf16-master", "auto", torch.float32),
    ("`bf16-master`, `master=fp32` (torch's AdamW)", "bf16-master", "fp32", torch.float32),
    ("`bf16-master`, `master=remainder`", "bf16-master", "remainder", torch.float32),
    ("`bf16-master`, `master=kahan`", "bf16-master", "kahan", torch.float32),
    ("`bf16-master`, `master=stochastic`", "bf16-master", "stochastic", torch.float32),
    ("`bf16-master`, `master=stochastic`, bf16 moments", "bf16-master", "stochastic", torch.bfloat16),
    ("`bf16-master`, `master=remainder`, 8-bit moments", "bf16-master", "remainder", "8bit"),
    ("`bf16-master`, `master=stochastic`, 8-bit moments", "bf16-master", "stochastic", "8bit"),
]


class PolicyMLP(MLP):
    def __init__(self, layers: int, width: int, moment_dtype: torch.dtype) -> None:
        super().__init__(layers, width)
        self.moment_dtype = moment_dtype

    def configure_optimizers(self):
        return AdamW(self.parameters(), lr=1e-4, moment_dtype=self.moment_dtype)


def measure_memory(precision: str, master: str | None, moment_dtype: torch.dtype, layers: int, width: int):
    torch.manual_seed(0)
    if master is None:  # Lightning's own modes
        return audited_fit(MLP(layers, width), precision_plugin(precision), width)
    if master in ("auto", "fp32"):  # the user's torch.optim.AdamW, adopted (auto) or on FP32 masters
        return audited_fit(MLP(layers, width), precision_plugin(precision, master=master), width)
    return audited_fit(PolicyMLP(layers, width, moment_dtype), precision_plugin(precision, master=master), width)


def time_steps(layers: int, width: int, repeats: int, device: str) -> tuple[dict[str, list[float]], int]:
    """Seconds per optimizer step, per optimizer, in alternating rounds."""
    torch.manual_seed(0)
    shapes = [p.shape for p in MLP(layers, width).parameters()]
    values = [torch.randn(s, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device) * 1e-3 for s in shapes]
    runs = {}

    def fp32(kind: str):
        params = [v.clone().requires_grad_() for v in values]
        opt = torch.optim.AdamW(params, lr=1e-4, **{kind: True})
        return params, [g.clone() for g in grads], opt

    def policy(master: str, moment_dtype=torch.float32):
        params = [torch.empty_like(v, dtype=torch.bfloat16, requires_grad=True) for v in values]
        opt = AdamW(params, lr=1e-4, master=master, moment_dtype=moment_dtype)
        for p, v in zip(params, values):
            opt.set_master(p, v)
        return params, [g.to(torch.bfloat16) for g in grads], opt

    runs["torch AdamW(foreach) FP32"] = fp32("foreach")
    if device == "cuda":
        runs["torch AdamW(fused) FP32"] = fp32("fused")
    runs["remainder"] = policy("remainder")
    runs["kahan"] = policy("kahan")
    runs["stochastic"] = policy("stochastic")
    runs["stochastic, bf16 moments"] = policy("stochastic", torch.bfloat16)
    runs["remainder, 8-bit moments"] = policy("remainder", "8bit")
    runs["stochastic, 8-bit moments"] = policy("stochastic", "8bit")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats + 2):  # 2 warm-up rounds
        for name, (params, grads_, opt) in runs.items():
            for p, g in zip(params, grads_):
                p.grad = g
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return times, sum(v.numel() for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--keep-freed-memory", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.keep_freed_memory:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: keep freed memory
        libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: large blocks from the heap, not mmap
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {describe()}")

    if not args.skip_memory:
        n = sum(p.numel() for p in MLP(args.layers, args.width).parameters())
        print(f"\nBytes per parameter with AdamW after a step ({n / 1e6:.1f}M parameters, live tensors)\n")
        print("| precision | weights | masters | gradients | optimizer state | total | gradients at the step |")
        print("|---|---|---|---|---|---|---|")
        for label, precision, master, moment_dtype in ROWS:
            after, at_step = measure_memory(precision, master, moment_dtype, args.layers, args.width)
            print(f"| {label} | {after['weights']:.2f} | {after['masters']:.2f} | {after['gradients']:.2f} | "
                  f"{after['optimizer_state']:.2f} | **{after['total']:.2f}** | {at_step['gradients']:.2f} |")

    times, n = time_steps(args.layers, args.width, args.repeats, device)
    base = next(iter(times))
    print(f"\nOptimizer step, {n / 1e6:.1f}M parameters, {args.repeats} alternating rounds, "
          f"{'glibc keeps freed memory' if args.keep_freed_memory else 'default allocator'}\n")
    print(f"| optimizer | median ms | ratio to {base} (median, quartiles) |")
    print("|---|---|---|")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        q = statistics.quantiles(ratios, n=4)
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} | {statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[2]:.2f}) |")


if __name__ == "__main__":
    main()
