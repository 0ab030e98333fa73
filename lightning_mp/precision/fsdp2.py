"""``FSDP2MasterWeightPrecision``: ``bf16-master`` and ``16-master`` under Lightning's
``ModelParallelStrategy``, where ``configure_model`` shards the model with torch's
``fully_shard`` (FSDP2).

FSDP2 keeps each parameter as an FP32 DTensor shard and, with a ``MixedPrecisionPolicy``,
all-gathers it in 16 bits for compute and reduce-scatters the gradients in FP32: the shards are
the FP32 masters, sharded. What it lacks, and this plugin adds, is the rest of a master-weight
step: loss scaling for fp16, one decision on every rank to skip a step whose gradients hold an
inf/NaN anywhere (an all-reduce of one flag), LR schedulers held on a skipped step, a limit on
skipped steps in a row, and the loss scaler in checkpoints. Norm layers (and any ``keep_fp32``
module) are sharded with an FP32 policy and compute in FP32.

The user's side, in ``configure_model``::

    plugin = self.trainer.precision_plugin
    plugin.shard(self.model, self.device_mesh["data_parallel"], blocks=[Block])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp.convert import DEFAULT_KEEP_FP32, KeepFP32, _matcher
from lightning_mp.precision.master import MASTER_DTYPES, _make_scaler
from lightning_mp.precision.skips import SkipTracker, sharded_step


class FSDP2MasterWeightPrecision(Precision):
    """Master weights under FSDP2: the FP32 DTensor shards are the masters (see the module docstring).

    Args:
        precision: ``"bf16-master"`` or ``"16-master"`` (fp16 compute, dynamic loss scaling).
        keep_fp32: modules that compute in FP32 (default: every normalization layer), as in
            :class:`~lightning_mp.MasterWeightPrecision`; :meth:`shard` gives them an FP32 policy.
        device: the device type for ``torch.autocast`` (default: CUDA when available, else CPU).
        master: ``"fp32"`` only (the shards are FP32); grad_reduce_dtype: ``None`` or ``"fp32"``,
            both FP32 (the policy's ``reduce_dtype``).
        loss_scale, init_scale, growth_factor, backoff_factor, growth_interval, hysteresis,
        min_scale, max_consecutive_skips: as :class:`~lightning_mp.MasterWeightPrecision`'s.
    """

    def __init__(
        self,
        precision: str = "bf16-master",
        *,
        keep_fp32: Optional[Sequence[KeepFP32]] = None,
        device: Optional[str] = None,
        master: str = "fp32",
        grad_reduce_dtype: Optional[str] = None,
        loss_scale: Any = None,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
        max_consecutive_skips: Optional[int] = 10,
    ) -> None:
        if precision not in MASTER_DTYPES:
            raise ValueError(f"FSDP2MasterWeightPrecision accepts {sorted(MASTER_DTYPES)}, got {precision!r}")
        if master != "fp32":
            raise ValueError(f"under FSDP2 the FP32 shards are the masters: master={master!r} is not supported yet")
        if grad_reduce_dtype not in (None, "fp32"):
            raise ValueError(f"under FSDP2 gradients are reduce-scattered in FP32; grad_reduce_dtype={grad_reduce_dtype!r}")
        self.precision = precision  # type: ignore[assignment]
        self.dtype = MASTER_DTYPES[precision]
        self.keep_fp32 = tuple(DEFAULT_KEEP_FP32 if keep_fp32 is None else keep_fp32)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.scaler = _make_scaler(precision, loss_scale, init_scale, growth_factor, backoff_factor,
                                   growth_interval, hysteresis, min_scale)
        self.skips = SkipTracker(self.scaler, max_consecutive_skips)

    @property
    def skipped_steps(self) -> int:
        return self.skips.skipped_steps

    # -- sharding ------------------------------------------------------------------------------

    def mp_policy(self, fp32: bool = False) -> Any:
        """FSDP2's policy: 16-bit compute (FP32 for kept modules), FP32 gradient reduction."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.float32 if fp32 else self.dtype, reduce_dtype=torch.float32)

    def shard(self, module: nn.Module, mesh: Any, blocks: Iterable[type] = ()) -> nn.Module:
        """``fully_shard`` ``module``: the kept (FP32) modules first, each with an FP32 policy,
        then every instance of ``blocks`` (one FSDP unit each), then ``module`` itself."""
        from torch.distributed.fsdp import fully_shard

        matchers = [_matcher(entry) for entry in self.keep_fp32]
        kept = [m for name, m in module.named_modules() if name and (getattr(m, "keep_fp32", False) is True
                                                                      or any(f(name, m) for f in matchers))]
        for m in _outermost(kept):
            fully_shard(m, mesh=mesh, mp_policy=self.mp_policy(fp32=True))
        block_types = tuple(blocks)
        for m in module.modules():
            if block_types and isinstance(m, block_types) and m is not module:
                fully_shard(m, mesh=mesh, mp_policy=self.mp_policy())
        return fully_shard(module, mesh=mesh, mp_policy=self.mp_policy())

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Nothing to cast (FSDP2 casts at all-gather); check that the model was sharded with a
        policy that keeps the masters FP32 and reduces in FP32."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        if not units or not any(isinstance(p, DTensor) for p in module.parameters()):
            raise ValueError("FSDP2MasterWeightPrecision needs a model sharded in configure_model: "
                             "self.trainer.precision_plugin.shard(model, self.device_mesh['data_parallel'], blocks=[...])")
        for unit in units:  # (clipping by norm: Lightning's, on DTensor gradients, is the global norm)
            policy = unit._get_fsdp_state()._mp_policy
            if policy.param_dtype not in (self.dtype, torch.float32) or policy.reduce_dtype not in (None, torch.float32):
                raise ValueError(
                    f"{type(unit).__name__} is sharded with MixedPrecisionPolicy(param_dtype={policy.param_dtype}, "
                    f"reduce_dtype={policy.reduce_dtype}), which contradicts {self.precision}: use plugin.shard() "
                    "or plugin.mp_policy()"
                )
        for p in module.parameters():
            if p.dtype != torch.float32:
                raise ValueError(f"a {p.dtype} parameter: under {self.precision} the sharded parameters are the FP32 masters")
        return module

    def forward_context(self) -> AbstractContextManager:
        return torch.autocast(self.device, dtype=self.dtype)

    # -- the step --------------------------------------------------------------------------------

    def connect(self, model: nn.Module, optimizers: list[Optimizer], lr_schedulers: list[Any]) -> Any:
        self.skips.watch_schedulers(model, lr_schedulers)
        return super().connect(model, optimizers, lr_schedulers)

    def pre_backward(self, tensor: Tensor, module: Any) -> Tensor:
        return self.scaler.scale_loss(tensor) if self.scaler is not None else tensor

    def optimizer_step(self, optimizer: Optimizer, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """Backward, unscale, skip on every rank if any rank's gradients hold inf/NaN, else
        Lightning's hooks and clipping, then the inner step on the FP32 shards."""
        return sharded_step(self, self.skips, optimizer, model, closure, **kwargs)

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.skips.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skips.load_state_dict(state_dict)


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules not inside another one of them (a kept subtree is sharded once)."""
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inner]
