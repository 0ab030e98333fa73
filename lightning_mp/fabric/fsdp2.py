"""``FSDP2MasterWeightPrecision`` for Fabric's ``ModelParallelStrategy``: the Trainer's FSDP2 plugin behind Fabric's hooks.

Fabric's ``ModelParallelStrategy`` shards the model in the user's ``parallelize_fn``; there, the
plugin's :meth:`~FSDP2MasterWeightPrecision.shard` does what it does in a LightningModule's
``configure_model``: FP32 shards as masters (or, under the default storage, bf16 shards with
int16 remainders), FSDP2 all-gathering in 16 bits and reduce-scattering in FP32::

    def parallelize(model, mesh):
        return fabric.strategy.precision.shard(model, mesh["data_parallel"], blocks=[Block])

    fabric = lightning_mp.Fabric(strategy=ModelParallelStrategy(parallelize), precision="bf16-master")

The step is the Trainer plugin's (:func:`lightning_mp.precision.skips.sharded_step`): one
decision on every rank to skip a step whose gradients hold inf/NaN anywhere, LR schedulers held,
the optimizer stepping the shards' FP32 values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp.fabric.precision import Adapter, hold_schedulers_of
from lightning_mp.precision import fsdp2 as trainer_plugin
from lightning_mp.precision.skips import any_rank_nonfinite, step_gradients
from lightning_mp.precision.step import unwrap
from lightning_mp.storage import like, local


class FSDP2MasterWeightPrecision(Adapter):
    """Master weights under Fabric's ``ModelParallelStrategy`` (FSDP2); the arguments of
    :class:`lightning_mp.precision.FSDP2MasterWeightPrecision`. Shard with :meth:`shard` in the
    strategy's ``parallelize_fn``."""

    precision: Literal["bf16-master", "16-master"] = "bf16-master"

    def __init__(self, precision: Literal["bf16-master", "16-master"] = "bf16-master", **options: Any) -> None:
        self.core = trainer_plugin.FSDP2MasterWeightPrecision(precision, **options)
        self.precision = precision
        self._module: Optional[nn.Module] = None
        self._attached: dict[int, Optimizer] = {}
        self._unscaled: set[int] = set()

    # -- setup -------------------------------------------------------------------------------

    def shard(self, module: nn.Module, mesh: Any, blocks: Iterable[type] = ()) -> nn.Module:
        """``fully_shard`` ``module`` as the Trainer plugin's ``shard`` does; call it in ``parallelize_fn``."""
        self._module = self.core.shard(module, mesh, blocks)
        self.core.convert_module(self._module)  # the policies checked
        return self._module

    def attach(self, optimizer: Any) -> Optimizer:
        """The raw optimizer, stepping the shards through the store (``lightning_mp.Fabric`` calls
        it in ``setup_optimizers``; a plain Fabric at the first step)."""
        raw = unwrap(getattr(optimizer, "optimizer", optimizer))
        if id(raw) not in self._attached:
            if self._module is None:
                raise RuntimeError("FSDP2MasterWeightPrecision: shard the model with fabric.strategy.precision.shard("
                                   "model, mesh['data_parallel']) in ModelParallelStrategy's parallelize_fn")
            self._attached[id(raw)] = raw
            self.core.connect(self._module, [*self.core._optimizers, raw], [])
        return raw

    # -- compute -----------------------------------------------------------------------------

    def forward_context(self) -> AbstractContextManager:
        return self.core.forward_context()

    # -- the step ----------------------------------------------------------------------------

    def _held(self) -> Optional[dict[Tensor, Tensor]]:
        return self.grads.grads if self.grads is not None else None

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        raw = self.attach(optimizer)
        skipped = self.skipped_steps
        try:  # the Trainer plugin's step, with no closure (Fabric's backward ran before)
            self.core.optimizer_step(raw, None, lambda: True, unscaled=id(raw) in self._unscaled, **kwargs)
        finally:
            self._unscaled.discard(id(raw))
        if self.skipped_steps > skipped:
            hold_schedulers_of(raw)
        return None

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        raw = self.attach(optimizer)
        if self.scaler is not None and id(raw) not in self._unscaled:
            inv = 1.0 / self.scaler.scale
            for grad in step_gradients(raw, self._held()).values():
                grad.mul_(inv)
        self._unscaled.add(id(raw))

    def main_params(self, optimizer: Optimizer) -> Iterator[Tensor]:
        """The shards with their unscaled FP32 gradients, as DTensors (clipping takes their global
        norm); none on a step every rank will skip."""
        raw = self.attach(optimizer)
        grads = step_gradients(raw, self._held())
        if any_rank_nonfinite(list(grads.values())):
            return
        for p, g in grads.items():
            if g is p.grad:
                yield p  # an FP32 shard with its FP32 gradient
            else:  # a bf16 shard: a stand-in of its shape carrying the FP32 gradient (no memory)
                holder = like(torch.empty((), dtype=g.dtype, device=local(g).device).expand(local(g).shape), p)
                holder.grad = like(local(g), p)
                yield holder
