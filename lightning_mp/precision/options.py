"""What a master-weight plugin's arguments choose, shared by the single-process, FSDP1 and FSDP2
plugins: the 16-bit dtype, the storage policy (and the line that reports it), the loss scaler,
the device to autocast on; and the LightningModule inside a strategy's wrapper, whose parameter
names the checkpoints use."""

from __future__ import annotations

import weakref
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim import Optimizer

from lightning_mp import messages
from lightning_mp.scaler import LossScaler
from lightning_mp.storage import MASTER_POLICIES

MASTER_DTYPES = {"bf16-master": torch.bfloat16, "16-master": torch.float16}


def check_master_options(precision: str, master: str, max_consecutive_skips: Optional[int], kept: str) -> None:
    """The storage policy and skip limit a master-weight plugin accepts (``kept``: what holds the
    16-bit values, weights or shards)."""
    if master not in ("auto", *MASTER_POLICIES):
        raise ValueError(f"master must be 'auto' or one of {', '.join(MASTER_POLICIES)}, got {master!r}")
    if master not in ("auto", "fp32") and precision != "bf16-master":
        raise ValueError(f"master={master!r} stores bfloat16 {kept}: use it with 'bf16-master', not {precision!r}")
    if max_consecutive_skips is not None and max_consecutive_skips < 1:
        raise ValueError(f"max_consecutive_skips must be >= 1 or None, got {max_consecutive_skips}")


def store_policy(master: str, dtype: torch.dtype) -> str:
    """The store's policy: ``"auto"`` is the cheapest exact one for the weights' dtype."""
    if master == "auto":
        return "remainder" if dtype == torch.bfloat16 else "fp32"
    return master


STORAGE = {  # how each policy keeps a weight's FP32 value, in the words of the start line
    "fp32": "as an FP32 master (4 bytes per parameter)",
    "remainder": "as an int16 remainder beside the weight (exact, 2 bytes per parameter)",
    "kahan": "as a bf16 Kahan compensation (about 16 bits, 2 bytes per parameter)",
    "stochastic": "in the bf16 weight alone, rounded stochastically (0 bytes)",
}


_REPORTED: weakref.WeakKeyDictionary[Optimizer, str] = weakref.WeakKeyDictionary()  # optimizer -> its line


def report_storage(precision: str, what: str, optimizers: list[Optimizer], storage: list[str]) -> None:
    """One line at the start: how each optimizer's 16-bit ``what`` (weight, shard) keeps its FP32
    value; not again for the same optimizers and storage (``trainer.validate`` after ``fit``
    connects the fitted optimizers once more)."""
    if not optimizers:
        return
    line = (f"lightning-mp: {precision} keeps each {what}'s FP32 value "
            + "; ".join(f"for {type(o).__qualname__} {kind}" for o, kind in zip(optimizers, storage)))
    if all(_REPORTED.get(o) == line for o in optimizers):
        return
    for o in optimizers:
        _REPORTED[o] = line
    messages.info(line)


def make_scaler(
    precision: str, loss_scale: Any, init_scale: float, growth_factor: float, backoff_factor: float,
    growth_interval: int, hysteresis: int, min_scale: float,
) -> Optional[LossScaler]:
    """The loss scaler the options ask for: dynamic by default under ``16-master``, none under ``bf16-master``."""
    if loss_scale is None:
        loss_scale = "dynamic" if precision == "16-master" else None
    if loss_scale is None:
        return None
    if loss_scale == "dynamic":
        return LossScaler(init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                          growth_interval=growth_interval, hysteresis=hysteresis, min_scale=min_scale)
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and loss_scale > 0:
        return LossScaler(float(loss_scale), dynamic=False)
    raise ValueError(f"loss_scale must be 'dynamic' or a positive number, got {loss_scale!r}")


def device_type(model: nn.Module) -> str:
    """Where ``model`` runs (its first parameter's device type; a DTensor's is its mesh's): the
    autocast device of a plugin not given one, taken from the run rather than from the machine."""
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def lightning_module(model: nn.Module) -> nn.Module:
    """The LightningModule inside a strategy's wrapper (DDP...), whose names the checkpoint uses."""
    if isinstance(model, pl.LightningModule):
        return model
    return next((m for m in model.modules() if isinstance(m, pl.LightningModule)), model)


def user_step_hooks(model: "pl.LightningModule") -> bool:
    """Whether the user's code runs in the step's hooks, where it may read or change gradients: an
    ``on_before_optimizer_step`` of the module or of a callback, or the module's
    ``configure_gradient_clipping``. lightning-mp's own (``MoEModule``'s, the monitor's) do not
    count: they know where the gradients are."""
    callbacks = model.trainer.callbacks if model._trainer is not None else []

    def overrides(obj: Any, name: str, parent: type) -> bool:
        return is_overridden(name, obj, parent) and not getattr(obj, name).__module__.startswith("lightning_mp.")

    return (
        overrides(model, "on_before_optimizer_step", pl.LightningModule)
        or overrides(model, "configure_gradient_clipping", pl.LightningModule)
        or any(overrides(callback, "on_before_optimizer_step", pl.Callback) for callback in callbacks)
    )
