"""``FSDPMasterWeightPrecision``: ``bf16-master`` and ``16-master`` under Lightning's ``FSDPStrategy`` (FSDP1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.optim import Optimizer

from lightning_mp.convert import TORCH_NORMS
from lightning_mp.model import RMSNorm
from lightning_mp.precision.options import MASTER_DTYPES, device_type
from lightning_mp.precision.skips import SkipTracker, sharded_step


class FSDPMasterWeightPrecision(FSDPPrecision):
    """``bf16-master`` and ``16-master`` for Lightning's ``FSDPStrategy``, which accepts only
    :class:`~lightning.pytorch.plugins.precision.FSDPPrecision` subclasses.

    FSDP keeps each rank's shard of the flat parameters in FP32: they are the masters, sharded,
    and the optimizer steps them. FSDP's mixed precision casts them to bf16 (fp16) for compute
    (``param_dtype``) and reduce-scatters gradients in FP32 (``reduce_dtype=float32``; Lightning's
    ``bf16-mixed`` reduces in bf16); buffers keep their dtype. Forward runs under autocast, so the
    op-level FP32 lists apply as in :class:`MasterWeightPrecision`. ``16-master`` uses FSDP's
    sharded grad scaler (skip on inf/NaN, dynamic scale).

    Args:
        precision: ``"bf16-master"`` or ``"16-master"``.
        keep_fp32: module classes that stay FP32 for compute (FSDP wraps them separately with
            mixed precision disabled; this needs an ``auto_wrap_policy``, as ``trainer=fsdp``
            sets). Default: torch's normalization layers and lightning-mp's ``RMSNorm``. FSDP
            takes classes only: a router computes in FP32 anyway (it upcasts its weights).
        master: ``"fp32"`` only: the shards are FP32 masters (the storage policies need the
            16-bit weights the optimizer steps, which FSDP does not have).
        loss_scale, init_scale, growth_factor, backoff_factor, growth_interval: ``16-master``'s
            dynamic scale, as torch's ``ShardedGradScaler`` takes them; it has no hysteresis, no
            minimum and no limit on skipped steps, so ``hysteresis``, ``min_scale`` and
            ``max_consecutive_skips`` must keep their defaults.
        grad_reduce_dtype: ``None`` or ``"fp32"``: both mean FP32, FSDP's reduction here.

    Gradient clipping by norm goes through ``FullyShardedDataParallel.clip_grad_norm_``, the
    norm over all shards (Lightning's ``FSDPPrecision`` refuses it).
    """

    def __init__(
        self,
        precision: Literal["bf16-master", "16-master"] = "bf16-master",
        *,
        keep_fp32: Sequence[type] = (*TORCH_NORMS, RMSNorm),
        device: Optional[str] = None,
        master: str = "auto",
        loss_scale: Optional[str] = "dynamic",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
        grad_reduce_dtype: Optional[Literal["fp32"]] = None,
        max_consecutive_skips: Optional[int] = 10,
    ) -> None:
        if grad_reduce_dtype not in (None, "fp32"):
            raise ValueError(f"under FSDP gradients are reduce-scattered in FP32; grad_reduce_dtype={grad_reduce_dtype!r}")
        if master not in ("auto", "fp32"):  # auto: the FP32 shards, FSDP1's only storage
            raise ValueError(f"under FSDP the sharded FP32 parameters are the masters: master={master!r} is not supported")
        if loss_scale != "dynamic" or hysteresis != 2 or min_scale != 1.0 or max_consecutive_skips != 10:
            raise ValueError("under FSDP the loss scale is torch's ShardedGradScaler: dynamic, no hysteresis, no minimum, no skip limit")
        if precision not in MASTER_DTYPES:
            raise ValueError(f"FSDPMasterWeightPrecision accepts {sorted(MASTER_DTYPES)}, got {precision!r}")
        if not all(isinstance(c, type) and issubclass(c, nn.Module) for c in keep_fp32):
            raise TypeError(f"under FSDP keep_fp32 takes nn.Module classes only, got {list(keep_fp32)!r}")
        scaler = None
        if precision == "16-master":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler(
                device=device or "cuda",  # rebuilt in connect for the run's device when none is given
                init_scale=init_scale,
                growth_factor=growth_factor,
                backoff_factor=backoff_factor,
                growth_interval=growth_interval,
            )
        mixed = "bf16-mixed" if precision == "bf16-master" else "16-mixed"
        self.precision = mixed  # type: ignore[assignment]  # FSDPPrecision checks it before setting it
        super().__init__(mixed, scaler)
        self.scaler = scaler  # FSDPPrecision drops a scaler it is given (it keeps only its own default)
        self.precision = precision  # type: ignore[assignment]
        self.dtype = MASTER_DTYPES[precision]
        self.keep_fp32 = tuple(keep_fp32)
        self.device = device  # None: the run's, from the wrapped model in connect
        self._root: Optional[nn.Module] = None
        self.skips = SkipTracker(None, max_consecutive_skips)  # bf16-master's skips; 16-master: the scaler's

    @property
    def mixed_precision_config(self) -> Any:
        from torch.distributed.fsdp import MixedPrecision as TorchMixedPrecision

        return TorchMixedPrecision(
            param_dtype=self.dtype,
            reduce_dtype=torch.float32,
            buffer_dtype=None,  # buffers keep their dtype (rotary tables stay FP32)
            _module_classes_to_ignore=self.keep_fp32,
        )

    def forward_context(self) -> AbstractContextManager:
        return torch.autocast(self.device or "cpu", dtype=self.dtype)

    def connect(
        self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
    ) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        self._root = model  # the root FSDP module, whose clip_grad_norm_ sees every shard
        if self.device is None:
            self.device = device_type(model)
            if self.scaler is not None and self.device != "cuda":  # torch's scaler disables itself off its device
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                s = self.scaler
                self.scaler = ShardedGradScaler(device=self.device, init_scale=s._init_scale, growth_factor=s._growth_factor,
                                                backoff_factor=s._backoff_factor, growth_interval=s._growth_interval)
        self.skips.watch_schedulers(model, lr_schedulers)
        return super().connect(model, optimizers, lr_schedulers)

    @property
    def skipped_steps(self) -> int:
        """``bf16-master`` steps skipped for inf/NaN gradients (``16-master``: torch's scaler skips)."""
        return self.skips.skipped_steps

    def optimizer_step(self, optimizer: Optimizer, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """``16-master``: torch's ``ShardedGradScaler`` step. ``bf16-master``: backward, then one
        decision on every rank: skip if any rank's gradient shards hold inf/NaN (the schedulers
        held), else Lightning's hooks and clipping and the step on the FP32 shards."""
        if self.scaler is not None:
            return super().optimizer_step(optimizer, model, closure, **kwargs)
        return sharded_step(self, self.skips, optimizer, model, closure, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """``16-master``: torch's scaler's state (Lightning's format); ``bf16-master``: the skip counts."""
        return super().state_dict() if self.scaler is not None else self.skips.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None:
            super().load_state_dict(state_dict)
        else:
            self.skips.load_state_dict(state_dict)

    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(self._root, FullyShardedDataParallel):
            raise MisconfigurationException(
                "gradient clipping by norm under FSDP needs the model wrapped whole by FullyShardedDataParallel "
                f"(got {type(self._root).__name__}); use gradient_clip_algorithm='value' or let FSDPStrategy wrap it"
            )
        self._root.clip_grad_norm_(clip_val)
