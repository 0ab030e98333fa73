"""How an FP32 value is kept beside a 16-bit weight: the four storage policies and their bit-level primitives.

- ``"fp32"``: a separate FP32 tensor, the master (4 bytes per parameter);
- ``"remainder"``: an int16 tensor with the low 16 bits of the FP32 value; weight and remainder
  are the FP32 value bit for bit (2 bytes);
- ``"kahan"``: a bf16 compensation, what rounding the weight lost (2 bytes, ~16 significant bits);
- ``"stochastic"``: nothing; the weight is the value, rounded stochastically by its optimizer.

A fifth kind, ``"weight"``, is no policy to choose: nothing beside a weight whose value is a
16-bit number, for parameters no optimizer steps (:mod:`lightning_mp.masters` picks it).

Everything works on lists of tensors with ``torch._foreach_*`` ops: a few kernels for a whole
list, whatever its number of tensors. :mod:`lightning_mp.masters` keeps a model's values with them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_mp import fused

MASTER_POLICIES: tuple[str, ...] = ("fp32", "remainder", "stochastic", "kahan")
HALF = (torch.float16, torch.bfloat16)


class _Policy:
    """How one kind of storage keeps FP32 values beside 16-bit weights (lists of tensors, foreach ops)."""

    name = ""
    #: the optimizer state key the storage tensor goes under (torch's keys plus these two)
    state_key: Optional[str] = None

    def new_storage(self, weight: Tensor) -> Optional[Tensor]:
        return None

    def decode(self, weights: list[Tensor], storage: list[Tensor]) -> list[Tensor]:
        """FP32 values of ``weights`` with their ``storage``, in new tensors."""
        return upcast(weights)

    def encode(self, values: list[Tensor], weights: list[Tensor], storage: list[Tensor], generator: Any) -> None:
        """Write FP32 ``values`` into ``weights`` and their ``storage`` (may overwrite ``values``)."""
        torch._foreach_copy_(weights, values)  # round to nearest even


class _FP32(_Policy):
    name = "fp32"

    def new_storage(self, weight: Tensor) -> Tensor:
        return torch.empty_like(weight, dtype=torch.float32)

    def decode(self, weights: list[Tensor], storage: list[Tensor]) -> list[Tensor]:
        return storage  # the masters themselves: no copy

    def encode(self, values: list[Tensor], weights: list[Tensor], storage: list[Tensor], generator: Any) -> None:
        changed = [(s, v) for s, v in zip(storage, values) if s is not v]
        if changed:
            torch._foreach_copy_([s for s, _ in changed], [v for _, v in changed])
        if fused.applies(*weights, *storage) and fused.available():
            fused.round_into(weights, storage)  # one call over all tensors
        else:
            torch._foreach_copy_(weights, storage)  # round to nearest even, as round_into


class _Remainder(_Policy):
    name, state_key = "remainder", "remainder"

    def new_storage(self, weight: Tensor) -> Tensor:
        return torch.zeros_like(weight, dtype=torch.int16)

    def decode(self, weights: list[Tensor], storage: list[Tensor]) -> list[Tensor]:
        out = [torch.empty_like(w, dtype=torch.float32) for w in weights]
        join_(out, weights, storage)
        return out

    def encode(self, values: list[Tensor], weights: list[Tensor], storage: list[Tensor], generator: Any) -> None:
        split_(values, weights, storage)


class _Kahan(_Policy):
    name, state_key = "kahan", "compensation"

    def new_storage(self, weight: Tensor) -> Tensor:
        return torch.zeros_like(weight)

    def decode(self, weights: list[Tensor], storage: list[Tensor]) -> list[Tensor]:
        out = [torch.empty_like(w, dtype=torch.float32) for w in weights]
        uncompensate_(out, weights, storage)
        return out

    def encode(self, values: list[Tensor], weights: list[Tensor], storage: list[Tensor], generator: Any) -> None:
        compensate_(values, weights, storage)


class _Weight(_Policy):
    """Nothing beside the weight, because nothing is missing: the FP32 value is a 16-bit number,
    the weight itself. Not a policy to choose: :mod:`lightning_mp.masters` gives it to parameters
    that no optimizer steps (a frozen base loaded from a bf16 checkpoint), whose values it keeps
    exact at no cost, and gives them exact storage again before any other value is written."""

    name = "weight"


class _Stochastic(_Policy):
    name = "stochastic"

    def encode(self, values: list[Tensor], weights: list[Tensor], storage: list[Tensor], generator: Any) -> None:
        stochastic_round_(values, weights, generator)


try:  # FSDP2's parameters, gradients and optimizer state are DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]
_DTENSOR = DTensor if DTensor is not None else ()  # (isinstance(t, ()) is False)


def sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's parameters, gradients, optimizer state)."""
    return isinstance(t, _DTENSOR)


def local(t: Tensor) -> Tensor:
    """The elements of ``t`` this process holds: a DTensor's local shard, any other tensor itself.
    Storage, kernels and foreach ops work on these; the DTensors stay what checkpoints see.
    (Called for every tensor at every step: one isinstance, no further call.)"""
    return t._local_tensor if isinstance(t, _DTENSOR) else t


def shard_offset(t: Tensor) -> int:
    """Where this process's elements of ``t`` start in the whole tensor (0 for a plain tensor)."""
    if not sharded(t):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return sum(o * s for o, s in zip(offset, t.stride()))


def like(value: Tensor, p: Tensor) -> Tensor:
    """``value``, the local elements of a tensor shaped as ``p``, as such a tensor: a DTensor with
    ``p``'s mesh and placements (sharing ``value``'s memory) when ``p`` is one, else ``value``."""
    if not sharded(p) or sharded(value):
        return value
    return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def as_local(value: Tensor, p: Tensor) -> Tensor:
    """``p``'s local elements of ``value``, a tensor shaped as ``p``: a DTensor (redistributed to
    ``p``'s placements if need be) or, for a DTensor ``p``, a whole tensor every rank holds."""
    if sharded(value) and sharded(p) and value.device_mesh != p.device_mesh:
        value = value.full_tensor()  # e.g. an expert's value over its EP group, p over EP and replicas: gathered
    if sharded(value):
        if sharded(p) and value.placements != p.placements:
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local()
    if sharded(p) and value.shape == p.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()  # no communication
    return value


POLICY: dict[str, _Policy] = {p.name: p for p in (_FP32(), _Remainder(), _Kahan(), _Stochastic(), _Weight())}
STATE_KEYS: tuple[str, ...] = tuple(p.state_key for p in POLICY.values() if p.state_key)


def is_16bit(value: Tensor, dtype: torch.dtype) -> bool:
    """Whether every element of the FP32 ``value`` is a ``dtype`` number, so that a ``dtype``
    weight holds it exactly (NaN never is: the weight would not say which NaN)."""
    return bool(torch.equal(value.to(dtype).float(), value))


def upcast(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor's FP32 copy, in new tensors (16-bit values upcast exactly)."""
    out = [torch.empty_like(t, dtype=torch.float32) for t in tensors]
    if out:
        torch._foreach_copy_(out, list(tensors))  # exact
    return out


# -- bit-level primitives -----------------------------------------------------------------------

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
    for w, i in zip(weights, ints):
        high = _high_halves(i)
        if high is not None and w.is_contiguous():  # the bits themselves: a NaN's payload survives too
            w.view(torch.int16).view(w.shape).copy_(high)
        else:
            w.copy_(i.view(torch.float32))  # exact for every number (a NaN becomes the canonical one)


def _high_halves(ints: Tensor) -> Optional[Tensor]:
    """The high 16 bits of each int32 of a contiguous ``ints``, as int16 (a strided view, no copy)."""
    if not ints.is_contiguous() or sys.byteorder != "little":
        return None
    return ints.view(torch.int16).view(*ints.shape, 2)[..., 1]


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
