"""Weight averaging (Lightning's ``StochasticWeightAveraging`` and ``WeightAveraging``/EMA) on FP32 values.

Both callbacks copy weights by hand: they average ``pl_module.parameters()`` into an FP32 copy of
the model, swap the average in for validation through ``.data.copy_``, and copy it back at the
end. On 16-bit weights that averages rounded iterates and rounds the average itself at every
swap (an EMA with small updates then stalls, the mantissa trap again). :func:`average_fp32`
routes those three moves through the plugin's store, so they average, swap and copy the exact
FP32 values, as under ``32-true``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mp.masters import MasterStore


class _FP32Parameters:
    """Stands in for a module where its parameters are read: they come out as their FP32 values."""

    def __init__(self, module: nn.Module, store: MasterStore) -> None:
        self.module, self.store = module, store

    def parameters(self) -> Iterator[Tensor]:
        return iter(self.store.values(list(self.module.parameters())))

    def buffers(self) -> Iterator[Tensor]:
        return self.module.buffers()


@torch.no_grad()
def _copy(store: MasterStore, sources: Any, targets: Any) -> None:
    """``targets`` (the model's parameters and buffers) take ``sources``' values, FP32 ones through the store."""
    for source, target in zip(sources, targets):
        if store.kind(target) is not None:
            store.set_value(target, source)
        else:
            target.detach().copy_(source.detach().to(target.device))


@torch.no_grad()
def _swap(store: MasterStore, average: nn.Module, model: nn.Module) -> None:
    averaged = itertools.chain(average.parameters(), average.buffers())
    current = itertools.chain(model.parameters(), model.buffers())
    for a, c in zip(averaged, current):
        if store.kind(c) is not None:
            value = store.value(c).clone()
            store.set_value(c, a)
            a.copy_(value)
        else:
            tmp = a.detach().clone()
            a.copy_(c.detach())
            c.detach().copy_(tmp)


def average_fp32(callback: Any, store: MasterStore) -> None:
    """Make ``callback`` average, swap and copy FP32 values, if it is one of Lightning's averaging callbacks."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging
    from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

    if isinstance(callback, StochasticWeightAveraging):
        update = type(callback).update_parameters
        callback.update_parameters = lambda avg, model, *args: update(avg, _FP32Parameters(model, store), *args)
        callback.transfer_weights = lambda src, dst: _copy(store, src.parameters(), dst.parameters())
    elif isinstance(callback, WeightAveraging) and callback._average_model is not None:
        average = callback._average_model
        update = type(average).update_parameters
        average.update_parameters = lambda model: update(average, _FP32Parameters(model, store))
        callback._swap_models = lambda pl_module: _swap(store, average.module, pl_module)
        callback._copy_average_to_current = lambda pl_module: _copy(
            store,
            itertools.chain(average.module.parameters(), average.module.buffers()),
            itertools.chain(pl_module.parameters(), pl_module.buffers()),
        )
