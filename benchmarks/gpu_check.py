"""Everything this project has never run on a GPU, in one command and one results file.

    python benchmarks/gpu_check.py                  # on a GPU machine: about 8 minutes on an H100
    python benchmarks/gpu_check.py --dry-run        # the same sections at tiny sizes on a CPU (CI runs it)

Sections, each timed and recorded even when it fails (an exception is a result too):

1. ``pytest -m gpu``: the tests marked for CUDA.
2. Sync-free skipping: ``16-master`` with torch's ``AdamW(fused=True)``, scale growths every step and
   injected overflows (back-off, hysteresis), ``sync_free=True`` against the synced path, masters
   compared bit for bit; on CUDA the sync-free steps run under ``torch.cuda.set_sync_debug_mode("warn")``
   and the host syncs it reports are counted.
3. The optimizer step: ``lightning_mp.optim.AdamW`` under every storage policy and moment dtype against
   torch's ``AdamW(fused=True)`` on FP32 and on bf16 parameters of the same shapes, median ms.
4. The compiled step against the eager one per storage policy: ulps of the update, dynamo's graph
   and recompile counts.
5. Whole runs of ``recipe=gpu-100m`` for a fixed number of steps under ``32-true``, ``bf16-mixed``,
   ``bf16-true``, ``bf16-master`` (default and ``master=remainder``) and ``16-master``: tokens/s,
   peak memory, final loss, from each run's ``summary.json``.
6. One MoE layer in bf16, forward and backward, against a dense SwiGLU of the same active width.

Writes ``--out`` (JSON, one entry per section) and prints a Markdown table of each section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from lightning_mp.machine import describe

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = [("32-true", []), ("bf16-mixed", []), ("bf16-true", []), ("bf16-master", []),
              ("bf16-master", ["precision.master=remainder"]), ("16-master", [])]


def gpu_tests(device: str, dry: bool) -> dict[str, Any]:
    """``pytest -m gpu``: on a CPU every test skips, which is what the dry run checks."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                            cwd=ROOT, capture_output=True, text=True, timeout=480)
    last = (result.stdout.strip().splitlines() or [""])[-1]
    return {"exit_status": result.returncode, "summary": last, "failures": result.stdout[-4000:] if result.returncode else ""}


def sync_free(device: str, dry: bool) -> dict[str, Any]:
    """Synced against sync-free skipping over scale growths and injected overflows, bit for bit."""
    import lightning.pytorch as L

    from lightning_mp import MasterWeightPrecision

    steps, overflow_at = 12, [3, 4, 8]  # two in a row: hysteresis 2, then a back-off

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.net(batch[0]).float().square().mean()
            return loss * float("inf") if batch_idx in overflow_at else loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)

    class Watch(L.Callback):
        def __init__(self) -> None:
            self.scales: list[float] = []
            self.syncs = 0

        def on_train_batch_start(self, *args: Any) -> None:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
            self.scales.append(float(trainer.precision_plugin.scaler.scale))

    def run(sync: bool) -> tuple[list[torch.Tensor], int, list[float]]:
        torch.manual_seed(0)
        model, watch = Model(), Watch()
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(steps * 8, 16)), batch_size=8)
        plugin = MasterWeightPrecision("16-master", init_scale=2.0**4, growth_interval=1, sync_free=not sync)
        trainer = L.Trainer(accelerator=device, devices=1, max_steps=steps, plugins=[plugin], callbacks=[watch],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, data)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        masters = [plugin.store.value(p).detach().cpu().clone() for p in model.parameters()]
        return masters, syncs, watch.scales

    synced, _, scales = run(sync=True)
    free, syncs, free_scales = run(sync=False)
    return {"bit_exact": all(torch.equal(a, b) for a, b in zip(synced, free)),
            "host_sync_warnings_in_sync_free_steps": syncs if device == "cuda" else None,
            "scales_synced": scales, "scales_sync_free": free_scales, "overflows_at": overflow_at}


def optimizer_step(device: str, dry: bool) -> dict[str, Any]:
    """Median step time of each storage policy and moment dtype against torch's fused AdamW."""
    width, layers, repeats = (64, 2, 3) if dry else (1024, 12, 30)
    dims = [(width, width)] * layers + [(width,)] * (2 * layers)
    rows: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "torch AdamW(fused=True), FP32": lambda: _torch_adamw(dims, torch.float32, device),
        "torch AdamW(fused=True), bf16": lambda: _torch_adamw(dims, torch.bfloat16, device),
    }
    for master in ("fp32", "remainder", "kahan", "stochastic"):
        for moments in (torch.float32, torch.bfloat16):
            label = f"lightning_mp AdamW master={master}, {str(moments).split('.')[1]} moments"
            rows[label] = lambda m=master, d=moments: _ours(dims, m, d, device)
    times = {}
    for label, make in rows.items():
        opt = make()
        opt.step()  # a first step: state, compiles
        samples = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            opt.step()
            _sync(device)
            samples.append(time.perf_counter() - start)
        times[label] = statistics.median(samples) * 1e3
    base = times["torch AdamW(fused=True), FP32"]
    return {"parameters": sum(torch.Size(d).numel() for d in dims),
            "rows": {k: {"median_ms": round(v, 4), "vs_fused_fp32": round(v / base, 3)} for k, v in times.items()}}


def _torch_adamw(dims, dtype, device):
    params = [torch.randn(d, device=device, dtype=dtype).mul_(0.02).requires_grad_() for d in dims]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)


def _ours(dims, master, moments, device):
    from lightning_mp.optim import AdamW

    params = [torch.zeros(d, device=device, dtype=torch.bfloat16, requires_grad=True) for d in dims]
    opt = AdamW(params, lr=1e-4, weight_decay=0.1, master=master, moment_dtype=moments)
    for p in params:
        opt.set_master(p, torch.randn(p.shape, device=device) * 0.02)
        p.grad = (torch.randn(p.shape, device=device) * 1e-3).to(torch.bfloat16)
    return opt


def compiled_vs_eager(device: str, dry: bool) -> dict[str, Any]:
    """One AdamW step from the same state, compiled (Triton on CUDA) against eager (torch's foreach
    ops), per storage policy: the largest difference in ulps of the update, and dynamo's graph and
    recompile counts over a few steps (Triton's division may be approximate: this measures it)."""
    from torch._dynamo.utils import counters

    from lightning_mp.optim import AdamW

    policies = ["remainder"] if dry else ["fp32", "remainder", "kahan", "stochastic"]
    rows = {}
    for master in policies:
        counters.clear()
        runs = []
        for compile in (False, True):
            torch.manual_seed(0)
            params = [torch.zeros(s, device=device, dtype=torch.bfloat16, requires_grad=True) for s in ((257, 33), (1,), (40,))]
            opt = AdamW(params, lr=1e-2, master=master, compile=compile)
            for p in params:
                opt.set_master(p, torch.randn(p.shape, device=device))
            before = [opt.master_value(p).clone() for p in params]
            for p in params:
                p.grad = torch.randn(p.shape, device=device).to(torch.bfloat16)
            opt.step()  # one step from the same state
            runs.append((before, [opt.master_value(p).clone() for p in params]))
        (before, eager), (_, fast) = runs
        update = max(float(((e - f).abs() / _ulp(e - b)).max()) for b, e, f in zip(before, eager, fast))
        rows[master] = {"max_ulps_of_the_update": round(update, 2),
                        "graphs": counters["stats"]["unique_graphs"], "recompiles": sum(counters["recompiles"].values())}
    return {"rows": rows}


def _ulp(x: torch.Tensor) -> torch.Tensor:
    exponent = torch.frexp(x.abs())[1]
    return torch.where(x != 0, torch.ldexp(torch.ones_like(x), exponent - 24), torch.full_like(x, 2.0**-149))


def whole_runs(device: str, dry: bool) -> dict[str, Any]:
    """``lightning-mp-train`` per precision, each in its own process: summary.json's numbers."""
    base = (["recipe=tiny", "trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.limit_val_batches=1",
             "data.max_bytes=100000", "callbacks=none", "logger=none"] if dry else
            ["recipe=gpu-100m", "trainer.max_steps=60", "trainer.val_check_interval=60", "trainer.limit_val_batches=4",
             "callbacks=none", "logger=none"])
    precisions = PRECISIONS[3:5] if dry else PRECISIONS
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for name, extra in precisions:
            label = " ".join([name, *extra])
            result = subprocess.run([sys.executable, "-m", "lightning_mp", *base, f"precision={name}", *extra],
                                    cwd=work, capture_output=True, text=True, timeout=300)
            if result.returncode:
                rows[label] = {"exit_status": result.returncode, "error": result.stderr[-1500:]}
                continue
            summary = json.loads(next(Path(work).glob("outputs/*/latest/summary.json")).read_text())
            rows[label] = {k: summary.get(k) for k in ("tokens_per_sec", "peak_memory_bytes", "peak_memory_kind",
                                                        "train_loss", "val_loss", "bytes_per_param", "steps")}
    return {"command": " ".join(base), "rows": rows}


def moe_layer(device: str, dry: bool) -> dict[str, Any]:
    """One MoE layer in bf16, forward and backward, against a dense SwiGLU of the same active width."""
    from lightning_mp.experts import SwiGLU
    from lightning_mp.moe import MoEConfig, MoELayer

    tokens, d, d_ff, experts, top_k, repeats = (256, 64, 128, 8, 2, 3) if dry else (8192, 1024, 2816, 8, 2, 20)
    layer = MoELayer(MoEConfig(d_model=d, d_ff=d_ff, n_experts=experts, top_k=top_k)).to(device, torch.bfloat16)
    dense = SwiGLU(d, d_ff * top_k).to(device, torch.bfloat16)
    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    times = {}
    for label, module in (("MoELayer", layer), ("dense SwiGLU", dense)):
        samples = []
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            module(x).float().square().mean().backward()
            _sync(device)
            if i:  # the first is warm-up
                samples.append(time.perf_counter() - start)
        times[label] = statistics.median(samples) * 1e3
    return {"shape": {"tokens": tokens, "d_model": d, "d_ff": d_ff, "experts": experts, "top_k": top_k},
            "median_ms": {k: round(v, 3) for k, v in times.items()},
            "moe_vs_dense": round(times["MoELayer"] / times["dense SwiGLU"], 3)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


SECTIONS = {"gpu_tests": gpu_tests, "sync_free": sync_free, "optimizer_step": optimizer_step,
            "compiled_vs_eager": compiled_vs_eager, "whole_runs": whole_runs, "moe_layer": moe_layer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the plumbing, not numbers")
    parser.add_argument("--out", default=None, help="results file (JSON); default benchmarks/results/gpu_check-<date>.json")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections only")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu_check-{time.strftime('%Y-%m-%d')}.json")
    results: dict[str, Any] = {"machine": describe(), "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"machine: {results['machine']}", flush=True)
    for name in args.only or SECTIONS:
        start = time.perf_counter()
        try:
            results[name] = SECTIONS[name](device, args.dry_run)
        except Exception:  # a failing section is a result: record it and go on
            results[name] = {"error": traceback.format_exc(limit=8)}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"## {name} ({results[name]['seconds']} s)\n{json.dumps(results[name], indent=1)}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))  # after every section: a timeout still leaves the rest
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
