"""Where the master weights live: FP32 copies of the 16-bit parameters that the optimizer steps.

The model keeps 16-bit weights for compute; each optimizer's ``param_groups`` hold FP32
masters instead. Gradients move from the 16-bit ``.grad`` into FP32 master grads after each
backward, the inner optimizer updates the masters, and the masters are rounded back into
the 16-bit weights. Parameters that are already FP32 (norms, routers) are their own masters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

_HALF = (torch.float16, torch.bfloat16)


class FP32Masters:
    """FP32 masters for every parameter that some optimizer updates."""

    def __init__(self) -> None:
        self._pending: dict[Tensor, Tensor] = {}  # param -> its FP32 value from before the cast
        self.master_of: dict[Tensor, Tensor] = {}  # model param -> master (itself when FP32)
        self.param_of: dict[Tensor, Tensor] = {}  # master -> 16-bit model param (separate masters only)

    def capture(self, param: nn.Parameter) -> None:
        """Remember ``param``'s value before it is cast to 16 bits: it becomes the master bit for bit."""
        if param in self.master_of:  # a second fit: the existing master is more precise
            return
        # For an FP32 parameter this keeps the original storage alive (no copy): the cast
        # replaces ``param.data`` and this tensor becomes the master.
        self._pending[param] = param.data if param.dtype == torch.float32 else param.data.float()

    def take_captured(self, param: Tensor) -> Optional[Tensor]:
        """The FP32 value ``param`` had before the cast (once), for storage policies without a master."""
        return self._pending.pop(param, None)

    def discard_pending(self) -> None:
        """Forget captured values that no optimizer claimed (frozen or unused parameters)."""
        self._pending.clear()

    def master_for(self, param: Tensor) -> Tensor:
        if param in self.master_of:
            return self.master_of[param]
        if param.dtype not in _HALF:
            master = param
        else:
            value = self._pending.pop(param, None)
            if value is None:  # created 16-bit: the exact upcast is all there is
                value = param.detach().float()
            master = nn.Parameter(value.to(param.device), requires_grad=param.requires_grad)
            self.param_of[master] = param
        self.master_of[param] = master
        return master

    def attach(self, optimizer: Optimizer) -> None:
        """Swap ``optimizer``'s parameters for their masters in place.

        Groups and their options stay as they are; existing per-parameter state (Adagrad
        builds it in its constructor, a resumed optimizer has it) is re-keyed to the master
        and its 16-bit tensors upcast, so the inner optimizer sees FP32 everywhere.
        """
        for group in optimizer.param_groups:
            masters = []
            for param in group["params"]:
                master = self.master_for(param)
                if master is not param and param in optimizer.state:
                    state = optimizer.state.pop(param)
                    optimizer.state[master] = {
                        k: v.float() if isinstance(v, Tensor) and v.dtype in _HALF else v for k, v in state.items()
                    }
                masters.append(master)
            group["params"] = masters

    def pairs(self, optimizer: Optimizer | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """(16-bit param, FP32 master) for every separate master, or only ``optimizer``'s."""
        if optimizer is None:
            yield from ((p, m) for m, p in self.param_of.items())
            return
        for group in optimizer.param_groups:
            for master in group["params"]:
                param = self.param_of.get(master)
                if param is not None:
                    yield param, master

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """Add each 16-bit ``.grad`` into its master's FP32 ``.grad`` and free the 16-bit one.

        Called after every backward: with gradient accumulation the micro-batch gradients
        are summed in FP32 (a 16-bit running sum would round every addition).
        """
        for param, master in self.pairs():
            grad = param.grad
            if grad is None:
                continue
            if master.grad is None:
                master.grad = grad.float()  # exact upcast
            else:
                master.grad.add_(grad)  # accumulates in FP32
            param.grad = None

    @torch.no_grad()
    def masters_to_params(self, optimizer: Optimizer | None = None) -> None:
        """Round the masters into the 16-bit weights (round to nearest even)."""
        pairs = list(self.pairs(optimizer))
        if pairs:
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])

    def release_grads(self, optimizer: Optimizer) -> None:
        """Drop the FP32 master grads of separate masters: they must not outlive the step."""
        for _, master in self.pairs(optimizer):
            master.grad = None


# -- 16-bit storage of FP32 values without a separate master (policies "remainder", "stochastic",
# "kahan"). Each function works on lists of tensors with torch._foreach_* ops: a few kernels for
# a whole parameter group, whatever its number of tensors.
#
# Bit layout of the split: an FP32 bit pattern x (read as int32) is hi * 2**16 + lo, where hi
# is a bfloat16 bit pattern and lo a signed 16-bit integer. Taking lo as the low 16 bits read as
# signed makes hi the FP32 value rounded to the nearest bfloat16, ties away from zero (low bits
# >= 0x8000 carry into hi), and lo always fits int16, as in Apex's remainder storage. Round to
# nearest *even* would not: at a tie with hi even, lo would be +2**15.


def _ints(values: list[Tensor]) -> list[Tensor]:
    return [v.view(torch.int32) for v in values]


@torch.no_grad()
def join_(out: list[Tensor], weights: list[Tensor], remainders: list[Tensor]) -> None:
    """``out`` (FP32) = the exact FP32 values stored as bfloat16 ``weights`` plus int16 ``remainders``."""
    torch._foreach_copy_(out, weights)  # exact: a bf16 value is the high 16 bits of its FP32 pattern
    torch._foreach_add_(_ints(out), remainders)  # + the signed low part (int32 arithmetic wraps like the split)


@torch.no_grad()
def split_(values: list[Tensor], weights: list[Tensor], remainders: list[Tensor]) -> None:
    """Store FP32 ``values`` as bfloat16 ``weights`` (nearest, ties away) and exact int16 ``remainders``.

    Overwrites ``values`` with the rounded weights (as FP32).
    """
    ints = _ints(values)
    torch._foreach_copy_(remainders, ints)  # int32 -> int16 keeps the low 16 bits, read as signed
    torch._foreach_sub_(ints, remainders)  # a multiple of 2**16: the rounded value, low bits zero
    torch._foreach_copy_(weights, values)  # exact, nothing left to round


@torch.no_grad()
def stochastic_round_(values: list[Tensor], out: list[Tensor], generator: torch.Generator) -> None:
    """Round FP32 ``values`` into bfloat16 ``out`` up or down with probability given by the distance.

    Adds uniform integer noise in [-2**15, 2**15) to the FP32 bit patterns, then rounds to
    nearest: an element whose low 16 bits are ``L`` moves up one bfloat16 step with probability
    exactly ``L / 2**16``, so the rounding is unbiased and an update far below half a step still
    moves the weight in expectation. Magnitudes round, so negative values behave as positive
    ones; values near zero round to a signed zero. Overwrites ``values``.
    """
    noise = [_int16_noise(v, generator) for v in values]
    torch._foreach_add_(_ints(values), noise)
    split_(values, out, noise)  # the noise buffers take the (discarded) remainders


def _int16_noise(like: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform int16 noise shaped like ``like``: four lanes of each random 64-bit draw (2.4x fewer
    generator calls than drawing int16 values one by one)."""
    n = like.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    draws.random_(-(2**63), 2**63 - 1, generator=generator)  # the whole int64 range but one value
    return draws.view(torch.int16)[:n].view(like.shape)


@torch.no_grad()
def compensate_(values: list[Tensor], weights: list[Tensor], compensations: list[Tensor]) -> None:
    """Kahan storage: ``weights`` = FP32 ``values`` rounded to nearest, ``compensations`` = what that lost.

    The compensation is itself rounded to the 16-bit dtype: weight plus compensation keep about
    twice the 16-bit significand. Overwrites ``values``.
    """
    torch._foreach_copy_(weights, values)
    torch._foreach_sub_(values, weights)  # exact (Sterbenz): the rounding error of the weight
    torch._foreach_copy_(compensations, values)


@torch.no_grad()
def uncompensate_(out: list[Tensor], weights: list[Tensor], compensations: list[Tensor]) -> None:
    """``out`` (FP32) = 16-bit ``weights`` plus their Kahan ``compensations``."""
    torch._foreach_copy_(out, weights)
    torch._foreach_add_(out, compensations)
