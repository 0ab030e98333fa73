"""One ``lightning-mp-train`` job: train, validate at the end, and write the run's summary."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_mp import fused
from lightning_mp.cli import console
from lightning_mp.cli.components import build, output_dir
from lightning_mp.cli.checkpoints import check_resume, checkpoint_path, init_from_path
from lightning_mp.cli.console import Progress, log
from lightning_mp.memory import bytes_per_param, memory_audit
from lightning_mp.parallel import leave_process_group


class _Validations(L.Callback):
    """The step of the last validation run during ``fit``."""

    step = -1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


class _Interrupted(L.Callback):
    """Ctrl-C: Lightning stops and exits with status 1; say how to continue the run."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        try:
            given = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "ckpt_path="))]
        except ValueError:
            given = []
        command = " ".join(["lightning-mp-train", *given, f"resume={_shown(self.run_dir)}"])
        _point_latest(self.run_dir)
        log.info(f"\ninterrupted at step {trainer.global_step}; to continue from its last checkpoint: {command}")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says and return (and write) the run's summary."""
    run_dir = Path(output_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    lead = rank_zero_only.rank == 0  # under DDP/FSDP every process runs this; one writes the files
    terminal = sys.stdout.isatty()
    console.setup(terminal)
    ckpt, init_from = checkpoint_path(cfg), init_from_path(cfg)
    if lead:
        log.info(f"run directory: {_shown(run_dir)}")
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, datamodule, trainer = build(cfg, terminal)
    if ckpt is not None:
        check_resume(model, ckpt, cfg)
    validations = _Validations()
    trainer.callbacks += [validations, _Interrupted(run_dir)]
    progress = next(c for c in trainer.callbacks if isinstance(c, Progress))
    device = trainer.strategy.root_device.type  # the run's device, not the machine's
    if device == "cpu":
        fused.available()  # the one-time build of the CPU step kernel, before the run's clock starts
    memory_kind = _reset_peak_memory(device)
    trainer.fit(model, datamodule, ckpt_path=ckpt, weights_only=not cfg.get("trust_checkpoint", False))
    elapsed = progress.seconds  # the step lines' clock: the summary agrees with the last one
    if trainer.is_global_zero:  # after training: processes Lightning starts during fit resolve `latest` too
        _point_latest(run_dir)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.limit_val_batches != 0 and validations.step != trainer.global_step:
        trainer.validate(model, datamodule, verbose=False)  # every run ends with a validation
        metrics.update({k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    summary = {
        "precision": cfg.precision.name,
        "master": cfg.precision.get("master"),
        "seed": cfg.seed,
        "recipe": cfg.recipe,
        "init_from": str(init_from) if init_from else None,
        "resumed_from": ckpt,
        "steps": trainer.global_step,
        "train_loss": metrics.get("train/loss"),
        "val_loss": metrics.get("val/loss"),
        "val_bits_per_byte": metrics.get("val/bits_per_byte"),
        "skipped_steps": metrics.get("precision/skipped_steps", 0.0),
        "tokens_per_sec": progress.tokens / elapsed if elapsed > 0 else None,
        "fit_seconds": elapsed,
        "peak_memory_bytes": _peak_memory(device),
        "peak_memory_kind": memory_kind,
        "n_params": sum(p.numel() for p in model.parameters()),
        "bytes_per_param": bytes_per_param(_training_state(model, trainer))["total"],
    }
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary, run_dir)
    leave_process_group()
    return summary


def _training_state(model: L.LightningModule, trainer: L.Trainer) -> dict[str, int]:
    """The memory audit of the training state: under FSDP2 the units resharded first (after the
    final validation's forward FSDP2 keeps the root unit's parameters gathered, for a backward
    that does not come)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return memory_audit(model, trainer.optimizers, trainer.precision_plugin)


def _print_summary(s: dict[str, Any], run_dir: Path) -> None:
    def fmt(x: Any, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    log.info(
        f"done: {s['steps']} steps, {console.duration(s['fit_seconds'])}, "
        f"{console.rate(s['tokens_per_sec'] or 0)} tok/s | train loss {fmt(s['train_loss'], '.4f')} | "
        f"val loss {fmt(s['val_loss'], '.4f')}, {fmt(s['val_bits_per_byte'], '.2f')} bits/byte | "
        f"skipped steps {int(s['skipped_steps'])} | peak memory {s['peak_memory_bytes'] / 1e9:.2f} GB"
    )
    log.info(f"run directory: {_shown(run_dir)} (summary.json, metrics.csv, checkpoints/)")


def _shown(path: Path) -> str:
    """Relative to where the command was run, when it lies below it (what the user types next)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _point_latest(run_dir: Path) -> None:
    """``<recipe>/latest`` names the newest run (``outputs/tiny/latest``), or the newest sweep
    (``multirun/mantissa-trap/latest``), for the next command: ``resume=outputs/tiny/latest``."""
    try:
        sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return  # not under lightning-mp-train
    target = run_dir.parent if sweep else run_dir
    link = target.parent / "latest"
    temporary = target.parent / f".latest-{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target.name, target_is_directory=True)
        os.replace(temporary, link)
    except OSError:  # a filesystem without symlinks: the run directory itself is printed anyway
        temporary.unlink(missing_ok=True)


def _reset_peak_memory(device: str) -> str:
    """Start measuring this job's peak on ``device`` (a --multirun runs its jobs in one process)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return "cuda max_memory_allocated"
    gc.collect()  # the previous job's tensors, and (glibc) the freed memory malloc still holds
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak resident set (VmHWM) to the current
        return "process peak RSS during this run"
    except OSError:
        return "process peak RSS since the process started"


def _peak_memory(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
