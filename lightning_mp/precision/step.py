"""Where the step happens: prepare the gradients, skip or clip, step the FP32 values, store them back.

One optimizer step of :class:`~lightning_mp.MasterWeightPrecision`, in named phases (as
Megatron-LM's ``MixedPrecisionOptimizer.step``):

1. :meth:`MasterStep.prepare`: the FP32 gradient of each parameter (the FP32 sum of its
   micro-batches, under every storage), all-reduced when the plugin reduces under DDP, unscaled, and one
   fused inf/NaN check. Manual clipping before ``opt.step()`` prepares early; the step reuses it.
2. skip: an overflowing step is dropped whole (weights, optimizer state, LR schedulers).
3. clip and step: under ``master="fp32"`` the optimizer holds the FP32 masters for the step,
   with their FP32 gradients, so Lightning's ``on_before_optimizer_step`` hooks, gradient
   clipping and any ``torch.optim`` optimizer work on FP32 as under ``32-true``. Under the
   storage policies :mod:`lightning_mp.optim` steps the 16-bit weights through the store and
   applies unscaling and clipping to its FP32 copies of the gradients.
4. store back: the masters are rounded into the 16-bit weights, and the optimizer holds the
   model's parameters again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_mp import fused
from lightning_mp.masters import MasterStore
from lightning_mp.optim.base import StoredMasterOptimizer
from lightning_mp.precision.ddp import GradReducer
from lightning_mp.precision.grads import FP32Grads
from lightning_mp.precision.skips import SkipTracker
from lightning_mp.scaler import LossScaler
from lightning_mp.storage import HALF


@dataclass
class Prepared:
    """One optimizer's gradients, ready for its step."""

    params: list[Tensor]  # the optimizer's parameters, each once
    fp32: dict[Tensor, Tensor]  # FP32 gradients taken from the parameters (micro-batch sums, upcasts)
    found_inf: Tensor  # 0-dim, 1.0 when any gradient holds inf/NaN
    stored: bool  # a lightning_mp.optim optimizer: it unscales and clips its FP32 copies of the grads
    unscaled: bool = False  # the fp32 gradients were unscaled in place (they must be re-scaled to accumulate again)
    factor: Optional[Tensor] = None  # stored: what the optimizer multiplies its FP32 grads by
    clamp: Optional[float] = None  # stored: clip by value, on the FP32 grads
    loss: Any = field(default=None)

    def grads(self) -> list[Tensor]:
        """Every gradient the step uses, in the parameters' order."""
        return [g for p in self.params if (g := self.fp32.get(p, p.grad)) is not None]


def unwrap(optimizer: Any) -> Optimizer:
    """The optimizer inside Lightning's ``LightningOptimizer`` (attributes set on the wrapper are lost)."""
    return getattr(optimizer, "_optimizer", optimizer)


class MasterStep:
    """The optimizer steps of one plugin (see the module docstring)."""

    def __init__(
        self,
        store: MasterStore,
        grads: FP32Grads,
        scaler: Optional[LossScaler],
        skips: SkipTracker,
        sync_free: Optional[bool],
    ) -> None:
        self.store, self.grads, self.scaler, self.skips = store, grads, scaler, skips
        self.sync_free = sync_free
        self.device: Optional[str] = None
        self.reducer: Optional[GradReducer] = None
        self._prepared: dict[int, Prepared] = {}

    # -- 1. prepare ----------------------------------------------------------------------------

    def prepare(self, optimizer: Any) -> Prepared:
        """FP32 gradients, all-reduced and unscaled, and the inf/NaN flag (once per step).

        A :mod:`lightning_mp.optim` optimizer reads 16-bit gradients itself (and the FP32 sums of
        accumulated micro-batches), unscaling and clipping its FP32 copies. A ``torch.optim``
        optimizer (``master="fp32"``) gets FP32 gradients for its FP32 masters: upcast, unscaled and
        checked in one pass (:mod:`lightning_mp.fused`), or by torch's ops on devices the kernel
        does not cover.
        """
        optimizer = unwrap(optimizer)
        if id(optimizer) in self._prepared:
            return self._prepared[id(optimizer)]
        params = list(dict.fromkeys(p for group in optimizer.param_groups for p in group["params"]))
        half = [p for p in params if p.dtype in HALF]
        stored = isinstance(optimizer, StoredMasterOptimizer)
        inv_scale = None if self.scaler is None else self.scaler.inv_scale
        if not stored:  # a torch optimizer stepping FP32 masters: a parameter joining late gets its
            # master, from its exact value; a frozen one it holds keeps its storage (none for 16-bit numbers)
            self.store.ensure([p for p in half if p.requires_grad or p.grad is not None], "fp32")
        # the FP32 micro-batch sums, and for FP32 masters (or a reduction here) every FP32 gradient
        upcast = not stored or self.reducer is not None
        scale = None if stored or self.reducer is not None else (1.0 if self.scaler is None else self.scaler.host_inv_scale())
        fp32, done, found = self.grads.take(half, upcast=upcast, inv_scale=scale)
        prepared = Prepared(params, fp32, torch.zeros(()), stored=stored, unscaled=not stored)
        grads = prepared.grads()
        if self.reducer is not None:
            self.reducer.all_reduce(grads)
        rest = [g for p in params if p not in done and (g := fp32.get(p, p.grad)) is not None]
        prepared.found_inf = _check(rest, inv_scale, unscale=not stored)
        if found:
            prepared.found_inf.fill_(1.0)
        if stored and inv_scale is not None:
            prepared.factor = inv_scale(prepared.found_inf.device)
        self._prepared[id(optimizer)] = prepared
        return prepared

    def before_backward(self) -> None:
        """Another backward before the step: prepared gradients go back to accumulating."""
        if self._prepared:
            unscaled = any(p.unscaled for p in self._prepared.values())
            self.grads.give_back(self.scaler.current() if unscaled and self.scaler is not None else None)
        self._prepared.clear()

    # -- 3a. clipping -------------------------------------------------------------------------

    def clip_by_norm(self, optimizer: Any, max_norm: float) -> None:
        """Clip by the global norm of the unscaled FP32 gradients, as ``clip_grad_norm_`` does."""
        prepared = self.prepare(optimizer)
        grads = prepared.grads()
        if not grads:
            return
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        if prepared.factor is not None:  # bf16 grads not yet unscaled
            total = total * prepared.factor
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's formula; no host sync
        if prepared.stored:  # scaling 16-bit gradients would round: the optimizer scales its FP32 copies
            prepared.factor = coef if prepared.factor is None else prepared.factor * coef
        else:
            torch._foreach_mul_(grads, coef)

    def clip_by_value(self, optimizer: Any, clip_value: float) -> None:
        prepared = self.prepare(optimizer)
        if not prepared.stored:
            grads = prepared.grads()
            if grads:
                torch._foreach_clamp_min_(grads, -clip_value)
                torch._foreach_clamp_max_(grads, clip_value)
        else:
            prepared.clamp = clip_value

    def unscale(self, optimizer: Any) -> Prepared:
        """Every gradient of ``optimizer`` in FP32 and unscaled, for clipping by code that scales
        them in place (Fabric's ``clip_gradients``); the step then takes them as they are."""
        prepared = self.prepare(optimizer)
        if prepared.stored and not prepared.unscaled:
            for p in prepared.params:
                g = prepared.fp32.get(p, p.grad)
                if g is not None:
                    prepared.fp32[p] = g if g.dtype == torch.float32 else g.float()  # (an FP32 .grad: in place)
            if prepared.factor is not None:
                torch._foreach_mul_(list(prepared.fp32.values()), prepared.factor)
                prepared.factor = None
            prepared.unscaled = True
        return prepared

    # -- the whole step -----------------------------------------------------------------------

    def run(
        self,
        optimizer: Optimizer,
        before_step: Callable[[], None],
        loss: Any,
        keep_grads: bool,
        hooks: bool = False,
        **kwargs: Any,
    ) -> None:
        """Prepare, then skip or (hooks and clipping via ``before_step``) step, then store back.
        ``hooks``: ``before_step`` runs code that may read or change the parameters' ``.grad``."""
        self.skips.settle()  # the previous sync-free step's bookkeeping: its flag has long been copied
        prepared = self.prepare(optimizer)
        prepared.loss = loss
        try:
            if self._is_sync_free(optimizer):
                with self._fp32(optimizer, prepared):
                    with self._grads_on_params(optimizer, prepared, hooks):
                        before_step()  # an inf norm clips to NaN: the fused kernel skips anyway
                    self._hand_transforms(optimizer, prepared)
                    optimizer.found_inf, optimizer.grad_scale = prepared.found_inf, None  # torch's fused contract
                    try:
                        optimizer.step(**kwargs)
                    finally:
                        del optimizer.found_inf, optimizer.grad_scale
                self.skips.defer(optimizer, prepared.found_inf)
                if self.scaler is not None:  # the next loss's scale, from the flag, on the device
                    self.scaler.advance_on_device(prepared.found_inf)
            else:
                overflowed = bool(prepared.found_inf.item())  # the step's one host sync
                if not overflowed:
                    with self._fp32(optimizer, prepared):
                        with self._grads_on_params(optimizer, prepared, hooks):
                            before_step()
                        self._hand_transforms(optimizer, prepared)
                        optimizer.step(**kwargs)
                self.skips.record(optimizer, overflowed, lambda: self.describe(prepared))
                if self.scaler is not None:
                    self.scaler.level()  # settled above and recorded: the host's floats are the policy
        finally:
            self.release(optimizer, prepared, keep_grads)

    @contextmanager
    def _fp32(self, optimizer: Optimizer, prepared: Prepared) -> Iterator[None]:
        """A ``torch.optim`` optimizer under ``master="fp32"``: for the step it holds the FP32 masters
        (their FP32 gradients attached) in place of the 16-bit parameters, its state keyed by them;
        afterwards the masters are rounded into the weights. The parameters themselves never
        change dtype, which would reset their gradient accumulators (and orphan DDP's hooks)."""
        if prepared.stored:
            yield
            return
        self.store.sync(prepared.params)  # weights written since the last step (clipped, reset, swapped in)
        masters = {p: self.store.storage(p) for p in prepared.params if self.store.kind(p) == "fp32"}
        _substitute(optimizer, masters)
        for p, master in masters.items():
            master.grad = prepared.fp32.get(p)
        try:
            yield
        finally:
            for master in masters.values():
                master.grad = None
            _substitute(optimizer, {m: p for p, m in masters.items()})
            if masters:
                self.store.write(list(masters), list(masters.values()))  # round to nearest into the weights

    @contextmanager
    def _grads_on_params(self, optimizer: Optimizer, prepared: Prepared, hooks: bool) -> Iterator[None]:
        """While the step's hooks run, each 16-bit parameter whose gradient the step holds in FP32
        (micro-batch sums, FP32 masters' gradients) shows that FP32, unscaled gradient as its
        ``.grad``, as under ``32-true``: ``grad_norm(self)`` reads it, ``clip_grad_norm_(self.parameters())``
        scales it in place, and the step uses what they leave; a ``.grad`` the hook replaces is
        copied in, one set to ``None`` drops the parameter from the step. torch wants a gradient
        of the parameter's dtype, so the FP32 tensor is shown through a zero-size alias's ``.data``;
        the parameter gets its own ``.grad`` back after the hooks."""
        if not hooks:
            yield
            return
        if prepared.stored and prepared.factor is not None:
            self.unscale(optimizer)  # fp16's scaled gradients (or a clip not yet applied): FP32 copies, unscaled
        shown, zeros = {}, {}
        for p in prepared.params:
            grad = prepared.fp32.get(p)
            if grad is not None and p.dtype in HALF:
                zero = zeros.get((p.dtype, p.device))
                if zero is None:
                    zero = zeros[p.dtype, p.device] = torch.zeros((), dtype=p.dtype, device=p.device)
                alias = zero.expand(p.shape)  # (no memory)
                shown[p] = (alias, p.grad)
                p.grad = alias
                alias.data = grad
        try:
            yield
        finally:
            for p, (alias, own) in shown.items():
                if p.grad is None:  # dropped by the hook: not stepped, as under 32-true
                    prepared.fp32.pop(p)
                    if not prepared.stored:
                        self.store.storage(p).grad = None  # the master the optimizer holds
                elif p.grad is not alias:
                    prepared.fp32[p].copy_(p.grad)
                p.grad = own

    def _hand_transforms(self, optimizer: Optimizer, prepared: Prepared) -> None:
        if prepared.stored:  # lightning_mp.optim unscales and clips its FP32 copies of the grads
            optimizer.grad_factor, optimizer.grad_clamp = prepared.factor, prepared.clamp
            optimizer.step_grads = dict(prepared.fp32)

    def _is_sync_free(self, optimizer: Optimizer) -> bool:
        if not getattr(optimizer, "_step_supports_amp_scaling", False) or self.sync_free is False:
            return False
        return self.sync_free is True or self.device == "cuda"

    # -- 4. after the step ----------------------------------------------------------------------

    def release(self, optimizer: Optimizer, prepared: Prepared, keep_grads: bool) -> None:
        """Drop the step's gradients, or (``keep_grads``) leave them on the parameters, 16-bit."""
        self._prepared.pop(id(optimizer), None)
        half = [p for p in prepared.params if p.dtype in HALF]
        self.grads.release(half, keep=self.store.dtype if keep_grads else None)
        if not keep_grads:
            for p in prepared.params:
                p.grad = None

    def describe(self, prepared: Prepared) -> str:
        """What went non-finite: the loss, and which gradients (one host sync; only for messages)."""
        grads = [(p, prepared.fp32.get(p, p.grad)) for p in prepared.params]
        grads = [(p, g) for p, g in grads if g is not None]
        parts = []
        loss = prepared.loss
        if isinstance(loss, Tensor) and loss.numel() == 1 and not bool(torch.isfinite(loss)):
            parts.append(f"the loss is {loss.item()}")
        if grads:
            bad_flags = torch.stack([~torch.isfinite(g).all() for _, g in grads]).tolist()
            bad = [self.store.name(p) for (p, _), is_bad in zip(grads, bad_flags) if is_bad]
            if bad:
                shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
                parts.append(f"inf/NaN gradients in {shown}")
        return "; ".join(parts) or "inf/NaN gradients"


def _substitute(optimizer: Optimizer, mapping: dict[Tensor, Tensor]) -> None:
    """Replace tensors in ``optimizer``'s groups by ``mapping``, moving their state along."""
    if not mapping:
        return
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(p, p) for p in group["params"]]
    for old, new in mapping.items():
        if old in optimizer.state:
            optimizer.state[new] = optimizer.state.pop(old)


def _check(grads: list[Tensor], inv_scale: Union[Callable[[torch.device], Tensor], None], unscale: bool) -> Tensor:
    """One fused inf/NaN check per device (unscaling in place when ``unscale``); no host sync.
    Without unscaling, CPU gradients are only read (:func:`lightning_mp.fused.check`)."""
    if not unscale and grads and fused.applies(*grads) and fused.available():
        return torch.tensor(float(fused.check(grads)))
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    flags = []
    for device, tensors in by_device.items():
        found_inf = torch.zeros((), device=device)
        factor = inv_scale(device) if unscale and inv_scale is not None else torch.ones((), device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_inf, factor)
        flags.append(found_inf)
    if not flags:
        return torch.zeros(())
    found = flags[0]
    for flag in flags[1:]:  # parameters on several devices (rare): gather on the first
        found = torch.maximum(found, flag.to(found.device))
    return found
