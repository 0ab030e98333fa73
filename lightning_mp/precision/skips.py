"""Skipped steps: counted, LR schedulers held, the loss scale advanced; endless skipping stops the run.

An optimizer step whose gradients hold inf/NaN is skipped whole. With a dynamic fp16 loss scale
that is routine while the scale backs off; anything else is a run going wrong. A streak of
``max_consecutive_skips`` skipped steps without a back-off warns at half way and then raises
:class:`SkippedStepsError`, naming what went non-finite.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_mp.precision.schedulers import hold, make_skip_aware
from lightning_mp.scaler import LossScaleError, LossScaler


class SkippedStepsError(RuntimeError):
    """Raised when too many optimizer steps in a row had inf/NaN gradients: training has broken down."""


class SkipTracker:
    """The host bookkeeping of skipped steps for one plugin."""

    def __init__(self, scaler: Optional[LossScaler], max_consecutive: Optional[int]) -> None:
        self.scaler = scaler
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.streak = 0  # skipped steps in a row, since the last clean step or loss-scale back-off
        self._schedulers: dict[int, list[Any]] = {}  # id(optimizer) -> its skip-aware schedulers
        self._pending: list[tuple[Optimizer, Tensor, Any]] = []  # sync-free steps whose flags are in flight

    def watch(self, scheduler: Any) -> None:
        """Hold ``scheduler`` after each skipped step of its optimizer."""
        make_skip_aware(scheduler)
        self._schedulers.setdefault(id(scheduler.optimizer), []).append(scheduler)

    def watch_schedulers(self, module: Any, lr_schedulers: list[Any]) -> None:
        """Hold Lightning's step-interval schedulers (every one in manual optimization, where the
        user steps them) after each skipped step of their optimizer."""
        manual = isinstance(module, pl.LightningModule) and not module.automatic_optimization
        for config in lr_schedulers:
            if (manual or getattr(config, "interval", "step") == "step") and hasattr(config.scheduler, "optimizer"):
                self.watch(config.scheduler)

    def state_dict(self) -> dict[str, Any]:
        """The counts and the loss scaler, for the plugin's checkpoint state."""
        self.settle()
        state: dict[str, Any] = {"skipped_steps": self.skipped_steps, "skip_streak": self.streak}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.streak = int(state_dict.get("skip_streak", 0))
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])

    def record(self, optimizer: Optimizer, overflowed: bool, describe: Callable[[], str]) -> None:
        """A step's outcome, once its overflow flag is on the host. ``describe`` says what went
        non-finite; it is called only for a warning or an error (it may sync with the device)."""
        if not overflowed:
            self.streak = 0
            if self.scaler is not None:
                self.scaler.update(False)
            return
        self.skipped_steps += 1
        for scheduler in self._schedulers.get(id(optimizer), []):
            hold(scheduler)
        backed_off = False
        if self.scaler is not None:
            before = self.scaler.scale
            try:
                self.scaler.update(True)
            except LossScaleError as err:
                raise LossScaleError(f"{err} What went non-finite: {describe()}.") from None
            backed_off = self.scaler.scale != before
        self.streak = 0 if backed_off else self.streak + 1
        limit = self.max_consecutive
        if limit is None:
            return
        if self.streak >= limit:
            raise SkippedStepsError(
                f"{self.streak} optimizer steps in a row were skipped for inf/NaN gradients "
                f"({self.skipped_steps} in all): {describe()}. Training is not progressing; lower the "
                "learning rate, clip gradients, or find where the model produces inf/NaN."
            )
        if self.streak == math.ceil(limit / 2):
            warnings.warn(
                f"{self.streak} optimizer steps in a row were skipped for inf/NaN gradients: {describe()}. "
                f"Training stops with an error at {limit} (max_consecutive_skips).",
                stacklevel=4,
            )

    def defer(self, optimizer: Optimizer, found_inf: Tensor) -> None:
        """A sync-free step: copy its flag to the host without waiting; :meth:`settle` reads it."""
        if found_inf.is_cuda:
            flag = torch.empty((), pin_memory=True)
            flag.copy_(found_inf, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            flag, event = found_inf, None
        self._pending.append((optimizer, flag, event))

    def settle(self) -> None:
        """Record the sync-free steps whose flags are now on the host."""
        pending, self._pending = self._pending, []
        for optimizer, flag, event in pending:
            if event is not None:
                event.synchronize()  # waits for the flag's copy, queued a whole step ago
            self.record(optimizer, bool(flag.item()), lambda: "gradients or the loss (a fused step skips on the device)")


def any_rank_nonfinite(grads: list[Tensor]) -> bool:
    """Whether any gradient on any rank holds an inf or NaN: one all-reduce of one flag, one host
    sync (sharded gradients, FSDP's and DTensors, are checked shard by shard)."""
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    device = local[0].device if local else collective_device()  # a rank with no gradients still takes part
    flag = torch.zeros((), device=device)
    for g in local:
        if g.numel():
            flag = torch.maximum(flag, (~torch.isfinite(g)).any().float())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def collective_device() -> torch.device:
    """The device the default process group's collectives take tensors on: NCCL's GPU, else the CPU."""
    if (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_backend() == "nccl"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def step_gradients(optimizer: Optimizer, held: Optional[dict[Tensor, Tensor]] = None) -> dict[Tensor, Tensor]:
    """The gradient of each of ``optimizer``'s parameters: the one ``held`` apart, else ``.grad``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = {p: held[p] if held is not None and p in held else p.grad for p in params}
    return {p: g for p, g in grads.items() if g is not None}


def sharded_step(plugin: Any, skips: SkipTracker, optimizer: Optimizer, model: Any, closure: Callable[[], Any],
                 held: Optional[dict[Tensor, Tensor]] = None, unscaled: bool = False, **kwargs: Any) -> Any:
    """The step of the sharded plugins, whose FP32 shards are the masters: backward (the closure),
    unscale (with a loss scaler), then one decision on every rank: skip if any rank's gradients
    hold inf/NaN (schedulers held), else Lightning's hooks and clipping and the inner step; then
    the gradients are freed. ``held``: FP32 gradients the plugin keeps apart from ``.grad`` (filled by the backward), which
    the inner step (a ``lightning_mp.optim`` optimizer) then uses; ``unscaled``: the gradients were
    unscaled already."""
    closure_result = closure()
    lightning = isinstance(model, pl.LightningModule)
    if closure_result is None and lightning and model.automatic_optimization:
        return None
    step_grads = step_gradients(optimizer, held)
    grads = list(step_grads.values())
    if skips.scaler is not None and not unscaled:  # (unscaled: by Fabric's clipping, before the step)
        inv = 1.0 / skips.scaler.scale
        for grad in grads:
            grad.mul_(inv)
    overflowed = any_rank_nonfinite(grads)
    if not overflowed:
        if lightning:
            plugin._after_closure(model, optimizer)  # on_before_optimizer_step, gradient clipping
        if held is not None:
            optimizer.step_grads = step_grads  # type: ignore[attr-defined]
        optimizer.step(**kwargs)
    # Stepped or skipped, the gradients are done: freed now rather than at Lightning's zero_grad,
    # which comes after the next forward, at its activation peak (4 bytes per parameter, sharded).
    optimizer.zero_grad(set_to_none=True)
    skips.record(optimizer, overflowed, lambda: "inf/NaN gradients on at least one rank")
    if lightning and getattr(model, "_current_fx_name", None) is not None:
        model.log("precision/skipped_steps", float(skips.skipped_steps))
    return closure_result
