"""FP32 sums of 16-bit gradients: micro-batches accumulate in FP32, zero_grad works as in 32-true.

Each 16-bit parameter whose FP32 value is a separate master keeps its latest gradient in its own
``.grad`` (16-bit), as usual, so ``zero_grad``, ``toggle_optimizer`` and hooks see what they
expect. When another backward is about to add into that ``.grad`` (a 16-bit sum would round at
every micro-batch), a pre-accumulation hook first moves it into an FP32 sum and clears it, so the
new gradient lands alone. The step takes ``sum + .grad`` in FP32.

The FP32 sum is valid only while ``.grad`` is the tensor the last backward left, unchanged:

- ``.grad`` set to ``None`` (``zero_grad()``): the sum is dropped;
- ``.grad`` zeroed in place (``zero_grad(set_to_none=False)``): the sum is dropped and the
  parameter keeps a zero gradient, so it is still stepped (momentum, weight decay), as in 32-true;
- ``.grad`` changed otherwise (a user scaled it): the change is kept and added to the sum; it
  reached that micro-batch's gradient only, not the sum as under 32-true, so a warning says so
  once (``fabric.clip_gradients`` and the Trainer's step hooks see the whole gradient).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_mp import fused


class FP32Grads:
    """The FP32 gradient sums of some 16-bit parameters (see the module docstring)."""

    def __init__(self) -> None:
        self._sums: dict[Tensor, Tensor] = {}
        self._seen: dict[Tensor, tuple[Any, int]] = {}  # parameter -> (its .grad after a backward, that grad's version)
        self._taken: set[Tensor] = set()  # parameters whose gradient the step holds (in _sums, .grad cleared)
        self._handles: list[Any] = []
        self._hooked: dict[int, Any] = {}  # id(parameter) -> weakref (weak sets compare tensors by value)
        self._warned = False  # (a gradient changed between a backward and the step: see _fold)

    def attach(self, params: Iterable[Tensor]) -> None:
        """Install the accumulation hooks on ``params`` (16-bit parameters that require grad)."""
        for p in params:
            ref = self._hooked.get(id(p))
            if ref is not None and ref() is p:
                continue
            self._hooked[id(p)] = weakref.ref(p)
            self._handles.append(p.register_hook(self._before_accumulation(p)))
            self._handles.append(p.register_post_accumulate_grad_hook(self.record))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        self._sums.clear()
        self._seen.clear()
        self._taken.clear()

    def sums(self) -> list[Tensor]:
        """The FP32 sums alive now (for the memory audit)."""
        return list(self._sums.values())

    def _before_accumulation(self, p: Tensor) -> Any:
        ref = weakref.ref(p)  # a hook must not keep its parameter alive

        def hook(grad: Tensor) -> None:
            param = ref()
            if param is not None:
                self._fold(param)

        return hook

    def record(self, p: Tensor) -> None:
        """Remember ``p.grad`` as a backward left it (also after DDP rewrote it with the reduced values)."""
        if p.grad is not None:
            self._seen[p] = (weakref.ref(p.grad), p.grad._version)

    @torch.no_grad()
    def _fold(self, p: Tensor) -> None:
        """Move ``p.grad`` into ``p``'s FP32 sum, or drop a sum that zero_grad made stale."""
        if p in self._taken:
            return  # the step holds it: its .grad is already in the sum
        grad = p.grad
        if grad is None:
            self._sums.pop(p, None)
            return
        seen = self._seen.get(p)
        fresh = seen is not None and seen[0]() is grad and seen[1] == grad._version
        if not fresh and not bool(grad.any()):  # zeroed in place (a host sync, in this rare case only)
            self._sums.pop(p, None)
            return
        total = self._sums.get(p)
        if not fresh and total is not None and not self._warned:
            self._warned = True
            warnings.warn("lightning-mp: a 16-bit .grad was changed after its backward while the earlier micro-batches' "
                          "sum was held apart in FP32: the change applies to that micro-batch's gradient, not to the sum "
                          "of all as under 32-true (to clip by hand use fabric.clip_gradients, or gradient_clip_val or "
                          "on_before_optimizer_step under the Trainer: they see the whole gradient)")
        self._sums[p] = grad.float() if total is None else total.add_(grad)
        p.grad = None

    def take(self, params: Sequence[Tensor], upcast: bool = True,
             inv_scale: Optional[float] = None) -> tuple[dict[Tensor, Tensor], set[Tensor], bool]:
        """The FP32 gradient of each parameter in ``params`` that has one; the step owns them until
        :meth:`release` (or :meth:`give_back`, when another backward comes first).

        ``upcast=False`` takes only the FP32 sums of accumulated micro-batches and leaves a single
        backward's 16-bit ``.grad`` where it is (an optimizer that reads 16-bit gradients). With
        ``upcast`` and ``inv_scale``, a 16-bit gradient is upcast, unscaled and checked in one pass
        (:mod:`lightning_mp.fused`). Returns the gradients, those already unscaled, and whether
        any of those held inf/NaN.
        """
        out: dict[Tensor, Tensor] = {}
        found = False
        single = []  # one backward's 16-bit gradient, nothing accumulated: upcast, unscale and check in one pass
        if upcast and inv_scale is not None and fused.available():
            single = [p for p in params if p not in self._taken and p not in self._sums and p.grad is not None
                      and p.grad.dtype != torch.float32 and fused.applies(p.grad)]
        if single:
            sums, found = fused.upcast_check([p.grad for p in single], inv_scale)
            for p, total in zip(single, sums):
                self._sums[p] = total
                p.grad = None
        done = set(single)
        for p in params:
            if p not in self._taken and p not in done and (upcast or p in self._sums):
                self._fold(p)
            if p in self._sums:
                out[p] = self._sums[p]
                self._taken.add(p)
        return out, done, found

    def give_back(self, scale: Union[float, Tensor, None] = None) -> None:
        """Another backward before the step: the taken sums accumulate again (re-scaled if unscaled;
        ``scale`` a float or a 0-dim tensor)."""
        if scale is not None and not (isinstance(scale, float) and scale == 1.0):
            taken = [self._sums[p] for p in self._taken if p in self._sums]
            if taken:
                torch._foreach_mul_(taken, scale)
        self._taken.clear()

    @torch.no_grad()
    def release(self, params: Iterable[Tensor], keep: Optional[torch.dtype] = None) -> None:
        """The step is done: drop the sums of ``params``, or with ``keep`` leave each as the
        parameter's ``.grad`` in that dtype (gradients outlive the step, as in 32-true)."""
        for p in params:
            total = self._sums.pop(p, None)
            self._taken.discard(p)
            if keep is not None and total is not None:
                p.grad = total.to(keep)
                self.record(p)
