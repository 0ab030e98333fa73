"""Tokens per second and peak memory of whole training runs, per precision mode.

    python benchmarks/end_to_end.py [--model small] [--steps 250] [--modes 32-true bf16-mixed ...]

Each mode trains ``lightning-mp-train model=<model> trainer.max_steps=<steps>`` (the default recipe
otherwise: its data, optimizer and callbacks; validation off) in its own process. Tokens/s is the
run's own ``summary.json`` figure (training tokens over fit time). Memory is the process's resident
set, sampled every 0.2 s from ``/proc``: its peak, and its median over the second half of the run
(where a leak would show as growth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning_mp.machine import describe

MODES = {
    "32-true": ["precision=32-true"],
    "bf16-mixed": ["precision=bf16-mixed"],
    "bf16-true": ["precision=bf16-true"],
    "bf16-master": ["precision=bf16-master"],
    "bf16-master, remainder": ["precision=bf16-master", "precision.master=remainder"],
    "bf16-master, stochastic": ["precision=bf16-master", "precision.master=stochastic"],
}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def run(overrides: list[str], model: str, steps: int, workdir: Path) -> tuple[dict, list[tuple[float, int]]]:
    cmd = [str(Path(sys.executable).parent / "lightning-mp-train"), f"model={model}", f"trainer.max_steps={steps}",
           "trainer.limit_val_batches=0", f"hydra.run.dir={workdir}", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, start = [], time.perf_counter()
    while proc.poll() is None:
        try:
            samples.append((time.perf_counter() - start, rss(proc.pid)))
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed: {proc.stderr.read().strip().splitlines()[-1:]}")
    return json.loads((workdir / "summary.json").read_text()), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    print(f"machine: {describe()}")
    print(f"model={args.model}, {args.steps} steps, the default recipe otherwise\n")
    print("| precision | tokens/s | vs `32-true` | peak RSS (GB) | median RSS, second half (GB) |")
    print("|---|---|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, mode in enumerate(args.modes):
            summary, samples = run(MODES[mode], args.model, args.steps, Path(tmp) / str(i))
            tokens = summary["tokens_per_sec"]
            base = base or tokens
            second_half = [r for t, r in samples if t >= samples[-1][0] / 2] or [0]
            print(f"| `{mode}` | {tokens:.0f} | {tokens / base:.2f}x | {max(r for _, r in samples) / 1e9:.2f} | "
                  f"{statistics.median(second_half) / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
