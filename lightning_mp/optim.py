"""Where the step happens for 16-bit weights without a separate FP32 master: AdamW and SGD.

Each optimizer steps the model's bfloat16 weights directly. The FP32 value it updates is kept
by a storage policy (:data:`MASTER_POLICIES`), chosen with ``master=`` or by
:class:`~lightning_mp.MasterWeightPrecision`:

- ``"remainder"``: beside each bf16 weight an int16 tensor holds the low 16 bits of the FP32
  master; weight and remainder are the FP32 value bit for bit (2 extra bytes per parameter);
- ``"stochastic"``: nothing beside the weight; each update is rounded up or down at random
  with the probability that keeps it unbiased, so updates below half a bf16 step still move
  the weight in expectation;
- ``"kahan"``: a bf16 compensation buffer holds what rounding the weight lost.

A step reconstructs FP32 values, runs torch's own AdamW or SGD arithmetic on them (the same
``torch._foreach_*`` ops in the same order, so ``"remainder"`` is bit-exact with
``torch.optim.AdamW`` on FP32 masters) and stores them back: a few kernels per parameter group
and chunk, not a Python loop of kernels per tensor. Weight decay is part of that FP32 update,
never a separate 16-bit multiply (which rounds away whenever ``lr * weight_decay`` is below
half a bf16 step). FP32 parameters (norms under ``keep_fp32``) are stepped in place as by torch.

State keys match torch's (``step``, ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) plus
``remainder`` or ``compensation``, so a state saved by ``torch.optim.AdamW`` loads here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_mp.masters import MasterStore
from lightning_mp.storage import MASTER_POLICIES, POLICY, STATE_KEYS, _upcast, stochastic_round_

# Elements stepped at once (see _blocks): on a CPU 2 MiB of FP32 per temporary, which stays in
# cache across a step's ops; elsewhere 64 MiB, which bounds the step's temporaries.
_BLOCK_NUMEL = {"cpu": 1 << 19, "cuda": 1 << 24}

Params = Union[Iterable[Tensor], Iterable[dict[str, Any]]]


class _StoredMasterOptimizer(Optimizer):
    """Shared machinery: FP32 values out of the store, the subclass's update, values back into it."""

    _state_keys: tuple[str, ...] = ()  # moment tensors, kept in ``moment_dtype``

    def _moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._state_keys

    def __init__(
        self,
        params: Params,
        defaults: dict[str, Any],
        *,
        master: Optional[str],
        moment_dtype: torch.dtype,
        seed: int,
    ) -> None:
        if master is not None and master not in MASTER_POLICIES:
            raise ValueError(f"master must be one of {', '.join(MASTER_POLICIES)}, got {master!r}")
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moment_dtype must be torch.float32 or torch.bfloat16, got {moment_dtype}")
        super().__init__(params, defaults)
        self.master = master
        self.moment_dtype = moment_dtype
        self.seed = seed
        # Where the bf16 weights' FP32 values live: this optimizer's own store, or the one
        # MasterWeightPrecision hands it (use_store), which also keeps the model's other parameters.
        self.store = MasterStore(torch.bfloat16, master or "fp32", seed)
        # Transforms of the next step's gradients, applied to their FP32 copies (scaling a bf16 grad
        # would round): MasterWeightPrecision's unscaling and clipping set them.
        self.grad_factor: Optional[Tensor] = None
        self.grad_clamp: Optional[float] = None

    def use_store(self, store: MasterStore) -> None:
        """Step the bf16 weights through ``store`` (its policy must be a storage policy)."""
        if self.master not in (None, store.policy):
            raise ValueError(f"the optimizer was built with master={self.master!r} but the plugin has master={store.policy!r}")
        self.master, self.store = store.policy, store

    # -- the policy of one tensor ------------------------------------------------------------

    def _policy(self, p: Tensor) -> str:
        if p.dtype == torch.float32:
            return "fp32"
        if p.dtype != torch.bfloat16:
            raise TypeError(f"{type(self).__name__} steps float32 or bfloat16 parameters, got {p.dtype}")
        if self.store.policy == "fp32":
            raise ValueError(
                f"{type(self).__name__} got bfloat16 parameters but no storage policy for their FP32 "
                "value: pass master='remainder', 'stochastic' or 'kahan', or train under "
                "lightning_mp.MasterWeightPrecision, which keeps FP32 masters."
            )
        return self.store.policy

    def _sync_storage(self, params: list[Tensor]) -> None:
        """Give bf16 ``params`` the policy's storage (re-derived where a weight was written outside
        the optimizer), and show it in their state under torch-style keys."""
        policy = self._policy(params[0])
        self.store.sync(params)
        self.store.ensure(params, policy)
        key = POLICY[policy].state_key
        for p in params:
            state = self.state[p]
            for other in STATE_KEYS:
                if other != key:
                    state.pop(other, None)
            if key is not None:
                state[key] = self.store.storage(p)

    @torch.no_grad()
    def master_value(self, p: Tensor) -> Tensor:
        """The FP32 value the optimizer holds for parameter ``p`` (for checkpoints and diagnostics)."""
        if p.dtype == torch.float32:
            return p.detach()
        self._sync_storage([p])
        return self.store.value(p)

    @torch.no_grad()
    def set_master(self, p: Tensor, value: Tensor) -> None:
        """Make ``value`` (FP32) the value of parameter ``p``: its weight and, by the policy, its storage."""
        if p.dtype != torch.float32:
            self._sync_storage([p])
        self.store.set_value(p, value)

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        transform = (self.grad_factor, self.grad_clamp)
        self.grad_factor, self.grad_clamp = None, None
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, dtype), params in buckets.items():
                if dtype != torch.float32:
                    self._sync_storage(params)
                scalars = self._prepare(group, params)
                for block in _blocks(params, _BLOCK_NUMEL.get(device.type, _BLOCK_NUMEL["cuda"])):
                    self._step_block(group, block, scalars, transform)
                self.store.record(params)
        return loss

    def _step_block(
        self,
        group: dict[str, Any],
        block: list[_Segment],
        scalars: dict[Tensor, Any],
        transform: tuple[Optional[Tensor], Optional[float]],
    ) -> None:
        """One block of segments: FP32 values in, the subclass's update, values and moments out."""
        weights = [seg.of(seg.param) for seg in block]
        half = weights[0].dtype != torch.float32
        policy = POLICY[self._policy(block[0].param)]
        storage = [seg.of(self.store.storage(seg.param)) for seg in block] if policy.state_key else []
        values = policy.decode(weights, storage) if half else weights  # FP32 parameters step in place
        grads = [seg.of(seg.param.grad) for seg in block]
        if grads[0].dtype != torch.float32:
            grads = _upcast(grads)
        factor, clamp = transform
        if factor is not None:
            # in place on FP32 parameters' own grads, as unscaling and clipping scale them
            torch._foreach_mul_(grads, factor.to(grads[0].device))
        if clamp is not None:
            torch._foreach_clamp_min_(grads, -clamp)
            torch._foreach_clamp_max_(grads, clamp)
        stored = {key: [seg.of(self.state[seg.param][key]) for seg in block] for key in self._moment_keys(group)}
        moments = {key: t if self.moment_dtype == torch.float32 else _upcast(t) for key, t in stored.items()}
        self._update(group, values, grads, moments, [scalars[seg.param] for seg in block])
        if self.moment_dtype != torch.float32:  # a bf16 `v * 0.999` never changes: round stochastically
            for key, tensors in moments.items():
                stochastic_round_(tensors, stored[key], self.store.generator(weights[0].device))
        if half:
            generator = self.store.generator(weights[0].device) if policy.name == "stochastic" else None
            policy.encode(values, weights, storage, generator)

    def _prepare(self, group: dict[str, Any], params: list[Tensor]) -> dict[Tensor, Any]:
        """Create missing state for ``params``; return what each needs this step (step sizes...)."""
        raise NotImplementedError

    def _update(
        self,
        group: dict[str, Any],
        values: list[Tensor],
        grads: list[Tensor],
        moments: dict[str, list[Tensor]],
        scalars: list[Any],
    ) -> None:
        """Update FP32 ``values`` and ``moments`` in place from FP32 ``grads``."""
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in enumerate(params):
            exact = self.store.exact_state(p)  # a Kahan pair's weight, which its FP32 value cannot give back
            if exact:
                state["state"][index] = {**state["state"].get(index, {}), **exact}
        if self.store.policy == "stochastic" or self.moment_dtype != torch.float32:
            for device in {p.device for p in params}:  # the rounding's generators, even before their first use
                self.store.generator(device)
        state["master"] = self.master
        state["generators"] = self.store.state_dict()["generators"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this optimizer (under any policy) or by torch's.

        torch casts every floating state tensor to its parameter's dtype; here moments keep
        ``moment_dtype`` and storage keeps its own. Storage saved under another policy is
        dropped: a weight then keeps the storage it has (set from the checkpoint's FP32 values by
        the precision plugin) or starts exact.
        """
        state_dict = dict(state_dict)
        generators = state_dict.pop("generators", {})
        state_dict.pop("master", None)
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(saved_ids, params):
            saved = state_dict["state"].get(index, {})
            state = self.state[p]
            for key, value in saved.items():
                if isinstance(value, Tensor) and key != "step" and key in self._state_keys:
                    state[key] = value.to(device=p.device, dtype=self.moment_dtype)
            state.pop("weight", None)
            for key in STATE_KEYS:
                state.pop(key, None)
            if p.dtype == torch.bfloat16 and self.store.policy != "fp32":
                self._sync_storage([p])
                self.store.load_exact_state(p, {k: v.to(p.device) for k, v in saved.items() if isinstance(v, Tensor)})
        self.store.load_state_dict({"generators": generators})


class _Segment(NamedTuple):
    """Elements ``start:stop`` of a parameter (and of its grad and state), or all of it (``start`` None)."""

    param: Tensor
    start: Optional[int] = None
    stop: Optional[int] = None

    def of(self, t: Tensor) -> Tensor:
        return t if self.start is None else t.view(-1)[self.start : self.stop]


def _blocks(params: list[Tensor], block_numel: int) -> Iterable[list[_Segment]]:
    """Group ``params`` (or any tensors) into blocks of about ``block_numel`` elements, splitting
    large contiguous ones (whose gradient, if any, is contiguous too).

    A step runs all its ops on one block before the next: on a CPU a block's temporaries then
    stay in cache between ops, which makes the dozen passes of a step cost about as much as
    torch's eight over whole tensors. On CUDA blocks are large (kernel launches dominate).
    """
    block: list[_Segment] = []
    numel = 0
    for p in params:
        n = p.numel()
        whole = n <= block_numel or not (p.is_contiguous() and (p.grad is None or p.grad.is_contiguous()))
        pieces = [_Segment(p)] if whole else [_Segment(p, s, min(s + block_numel, n)) for s in range(0, n, block_numel)]
        for seg in pieces:
            size = n if seg.start is None else seg.stop - seg.start
            if block and numel + size > block_numel:
                yield block
                block, numel = [], 0
            block.append(seg)
            numel += size
    if block:
        yield block


class AdamW(_StoredMasterOptimizer):
    """``torch.optim.AdamW`` (same defaults and arithmetic) on 16-bit weights with stored FP32 values.

    Args:
        params, lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (no ``amsgrad``).
        master: storage policy of bfloat16 parameters, one of :data:`MASTER_POLICIES`; ``None``
            (default) leaves it to :class:`~lightning_mp.MasterWeightPrecision`.
        moment_dtype: ``torch.float32`` (default) or ``torch.bfloat16``, whose moments are then
            updated with stochastic rounding (4 bytes per parameter instead of 8).
        seed: seeds the stochastic rounding (per device), saved in ``state_dict``.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        master: Optional[str] = None,
        moment_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, master=master, moment_dtype=moment_dtype, seed=seed)

    def _prepare(self, group: dict[str, Any], params: list[Tensor]) -> dict[Tensor, Any]:
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)  # on the CPU, as torch keeps it: reading it never syncs
                state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        # torch's step size and bias correction, per tensor, in Python floats
        return {
            p: ((lr / (1 - beta1**t)) * -1, (1 - beta2**t) ** 0.5) for p, t in zip(params, (s.item() for s in steps))
        }

    def _update(self, group, values, grads, moments, scalars):  # type: ignore[override]
        # torch's _multi_tensor_adam with decoupled weight decay, op for op.
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = moments["exp_avg"], moments["exp_avg_sq"]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if wd != 0:
            torch._foreach_mul_(values, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [bias_correction2_sqrt for _, bias_correction2_sqrt in scalars])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(values, exp_avgs, denom, [step_size for step_size, _ in scalars])


class SGD(_StoredMasterOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay; same defaults and arithmetic)
    on 16-bit weights with stored FP32 values. ``master``, ``moment_dtype`` and ``seed`` as :class:`AdamW`.
    """

    _state_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        master: Optional[str] = None,
        moment_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
        )
        super().__init__(params, defaults, master=master, moment_dtype=moment_dtype, seed=seed)

    def _moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._state_keys if group["momentum"] != 0 else ()

    def _prepare(self, group: dict[str, Any], params: list[Tensor]) -> dict[Tensor, Any]:
        """Whether each parameter's momentum buffer is new: torch starts it at the gradient itself."""
        fresh = {}
        for p in params:
            state = self.state[p]
            fresh[p] = group["momentum"] != 0 and state.get("momentum_buffer") is None
            if fresh[p]:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=self.moment_dtype)
        return fresh

    def _update(self, group, values, grads, moments, scalars):  # type: ignore[override]
        # torch's _multi_tensor_sgd, op for op.
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, values, alpha=group["weight_decay"])
        if momentum != 0:
            bufs = moments["momentum_buffer"]
            old = [i for i, fresh in enumerate(scalars) if not fresh]
            new = [i for i, fresh in enumerate(scalars) if fresh]
            if old:
                torch._foreach_mul_([bufs[i] for i in old], momentum)
                torch._foreach_add_([bufs[i] for i in old], [grads[i] for i in old], alpha=1 - dampening)
            if new:
                torch._foreach_copy_([bufs[i] for i in new], [grads[i] for i in new])
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(values, grads, alpha=-lr)
