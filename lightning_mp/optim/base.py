"""What AdamW and SGD share: FP32 values out of the store, the update, values back into it.

Three ways to run a step, with the same arithmetic:

- fused (``compile=None``, the default): on CPU tensors one pass per element through the C++
  kernel of :mod:`lightning_mp.fused`, built once for this CPU; on CUDA tensors one
  ``torch.compile``'d pass per tensor (:mod:`lightning_mp.optim.compiled`, Triton);
- compiled (``compile=True``): the ``torch.compile``'d pass on any device;
- eager (``compile=False``, or where neither applies): torch's ``_foreach_*`` ops, the same ops
  in the same order as ``torch.optim``'s foreach implementations, over blocks of elements that stay
  in cache between ops. SGD and AdamW are then bit-exact with torch's.

The C++ kernel's SGD is bit-exact too; its AdamW takes IEEE square roots, where torch's CPU
``sqrt`` (MKL) is 1 ulp off for about 0.7 % of values: its FP32 values differ from torch's AdamW
by at most 2 ulps of the update and 1 of the value after a step. The compiled pass rounds the
products ATen fuses into multiply-adds: a few ulps of the update (tests measure both).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_mp import fused
from lightning_mp.masters import MasterStore
from lightning_mp.optim import compiled, quant
from lightning_mp.optim.blocks import Piece, block_numel, blocks
from lightning_mp.optim.moments import EIGHT_BIT, decoded_moments, loaded_moment, moment_dtype_of, stored_dtypes
from lightning_mp.storage import HALF, MASTER_POLICIES, POLICY, STATE_KEYS, upcast, like, local, shard_offset, sharded, stochastic_round_

Params = Union[Iterable[Tensor], Iterable[dict[str, Any]]]


class StoredMasterOptimizer(Optimizer):
    """Shared machinery of :class:`~lightning_mp.optim.AdamW` and :class:`~lightning_mp.optim.SGD`."""

    _state_keys: tuple[str, ...] = ()  # moment tensors, kept in ``moment_dtype``
    _kernel = ""  # the fused kernel: "adamw" or "sgd"

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
        compile: Optional[bool],
    ) -> None:
        if master is not None and master not in MASTER_POLICIES:
            raise ValueError(f"master must be one of {', '.join(MASTER_POLICIES)}, got {master!r}")
        super().__init__(params, defaults)
        self._setup(master, moment_dtype_of(moment_dtype), seed, compile)

    def _setup(self, master: Optional[str], moment_dtype: torch.dtype, seed: int, compile: Optional[bool]) -> None:
        """What this class keeps beside torch's ``Optimizer`` (also for a torch optimizer it adopts:
        :mod:`lightning_mp.optim.adopt`)."""
        self.master = master
        self.moment_dtype = moment_dtype
        self.seed = seed
        self.compile = compile
        # Where the 16-bit weights' FP32 values live: this optimizer's own store, or the one
        # MasterWeightPrecision hands it (use_store), which also keeps the model's other parameters.
        half = next((p.dtype for g in self.param_groups for p in g["params"] if p.dtype in HALF), torch.bfloat16)
        self.store = MasterStore(half if master in (None, "fp32") else torch.bfloat16, master or "fp32", seed)
        # Transforms of the next step's gradients, applied to their FP32 copies (scaling a bf16 grad
        # would round): MasterWeightPrecision's unscaling and clipping set them.
        self.grad_factor: Optional[Tensor] = None
        self.grad_clamp: Optional[float] = None
        # FP32 gradients to step with instead of .grad (MasterWeightPrecision's micro-batch sums).
        self.step_grads: dict[Tensor, Tensor] = {}
        self._noise_step = 0  # counter of the fused kernel's stochastic-rounding noise

    def use_store(self, store: MasterStore) -> None:
        """Step the 16-bit weights through ``store``, with its policy."""
        if self.master not in (None, store.policy):
            raise ValueError(f"the optimizer was built with master={self.master!r} but the plugin has master={store.policy!r}")
        self.master, self.store = store.policy, store

    # -- the policy of one tensor ------------------------------------------------------------

    def _policy(self, p: Tensor) -> Optional[str]:
        """The storage kind of ``p``'s FP32 value; ``None`` for an FP32 parameter (stepped in place)."""
        if p.dtype == torch.float32:
            return None
        if p.dtype not in HALF or (p.dtype == torch.float16 and self.store.policy != "fp32"):
            raise TypeError(f"{type(self).__name__} steps float32 or bfloat16 parameters (float16 ones with "
                            f"master='fp32'), got {p.dtype}")
        if self.master is None:
            raise ValueError(
                f"{type(self).__name__} got {p.dtype} parameters but no storage for their FP32 value: pass "
                "master='remainder', 'stochastic' or 'kahan' (or 'fp32'), or train under "
                "lightning_mp.MasterWeightPrecision, which keeps it."
            )
        return self.store.policy

    def _sync_storage(self, params: list[Tensor]) -> None:
        """Give 16-bit ``params`` the policy's storage (re-derived where a weight was written outside
        the optimizer), and show it in their state under torch-style keys."""
        policy = self._policy(params[0])
        self.store.sync(params)
        self.store.ensure(params, policy)
        key = POLICY[policy].state_key
        storage = self.store.storage
        for p in params:
            state = self.state[p]
            if key is not None and state.get(key) is storage(p):
                continue  # shown already (every step after the first, where the parameter is not a DTensor)
            for other in STATE_KEYS:
                if other != key:
                    state.pop(other, None)
            # Not a sharded int16 remainder: int16 travels through neither NCCL nor gloo, and the
            # model's checkpoint holds the exact FP32 values, which give the remainders back.
            if key is not None and not (key == "remainder" and sharded(p)):
                state[key] = like(storage(p), p)  # a DTensor beside a DTensor parameter

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
        grads, self.step_grads = self.step_grads, {}
        self._noise_step += 1
        first = 0  # each parameter's first element in the optimizer's numbering (the fused noise's counter)
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[_Item]] = {}
            for p in group["params"]:
                grad = grads.get(p, p.grad) if grads else p.grad
                if grad is not None:
                    if grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    # (a shard's elements numbered as in the whole tensor: its rounding noise is
                    # a single process's, not the same as the other ranks')
                    buckets.setdefault((p.device, p.dtype), []).append(_Item(p, grad, first + shard_offset(p)))
                first += p.numel()
            for (device, dtype), items in buckets.items():
                params = [item.param for item in items]
                if dtype != torch.float32:
                    self._sync_storage(params)
                scalars = self._prepare(group, params)
                if not (self._fused_step(group, items, scalars, transform)
                        or self._compiled_step(group, items, scalars, transform)):
                    by_param = dict(zip(params, scalars))
                    for block in blocks(params, block_numel(device.type), grads):
                        self._step_block(group, block, by_param, transform, grads)
                self.store.record(params)
        return loss

    # -- eager: torch's foreach ops, block by block ---------------------------------------------

    def _step_block(
        self,
        group: dict[str, Any],
        block: list[Piece],
        scalars: dict[Tensor, Any],
        transform: tuple[Optional[Tensor], Optional[float]],
        step_grads: dict[Tensor, Tensor],
    ) -> None:
        """One block of pieces: FP32 values in, the subclass's update, values and moments out."""
        weights = [piece.of(piece.param) for piece in block]  # (the local shards of DTensors)
        kind = self._policy(block[0].param)
        policy = POLICY[kind] if kind is not None else None
        storage = [piece.of(s) for piece in block if (s := self.store.storage(piece.param)) is not None]
        values = policy.decode(weights, storage) if policy else weights  # FP32 parameters step in place
        grads = [piece.of(step_grads.get(piece.param, piece.param.grad)) for piece in block]
        grads = [g if g.dtype == torch.float32 else g.float() for g in grads]  # exact upcasts
        factor, clamp = transform
        if factor is not None:
            # in place on FP32 parameters' own grads, as unscaling and clipping scale them
            torch._foreach_mul_(grads, factor.to(grads[0].device))
        if clamp is not None:
            torch._foreach_clamp_min_(grads, -clamp)
            torch._foreach_clamp_max_(grads, clamp)
        stored = {key: [piece.of(self.state[piece.param][key]) for piece in block] for key in self._moment_keys(group)}
        if self.moment_dtype == EIGHT_BIT:
            scales = {key: [piece.scales(self.state[piece.param][key + quant.SCALE]) for piece in block] for key in stored}
            moments = {key: [quant.decode(key, c, a) for c, a in zip(stored[key], scales[key])] for key in stored}
        else:
            moments = {key: t if self.moment_dtype == torch.float32 else upcast(t) for key, t in stored.items()}
        self._update(group, values, grads, moments, [scalars[piece.param] for piece in block])
        if self.moment_dtype == EIGHT_BIT:  # the weights stepped with the FP32 moments; these are stored
            for key, tensors in moments.items():
                for value, c, a in zip(tensors, stored[key], scales[key]):
                    quant.encode_(key, value, c, a)
        elif self.moment_dtype != torch.float32:  # a bf16 `v * 0.999` never changes: round stochastically
            for key, tensors in moments.items():
                stochastic_round_(tensors, stored[key], self.store.generator(weights[0].device))
        if policy:
            generator = self.store.generator(weights[0].device) if kind == "stochastic" else None
            policy.encode(values, weights, storage, generator)

    def _prepare(self, group: dict[str, Any], params: list[Tensor]) -> list[Any]:
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

    # -- fused: one pass per element ----------------------------------------------------------

    def _fused_step(
        self,
        group: dict[str, Any],
        items: list[_Item],
        scalars: list[Any],
        transform: tuple[Optional[Tensor], Optional[float]],
    ) -> bool:
        """Step ``items`` (one device and dtype) through the fused kernel; ``False`` where it does
        not apply (``compile=False``, no compiler, CUDA or non-contiguous tensors): nothing was done."""
        if self.compile is not None or items[0].param.device.type != "cpu" or not fused.available():
            return False  # (the kernel is built only for a step on CPU tensors)
        kind = self._policy(items[0].param)  # one per bucket: the parameters share a dtype
        code = fused.F32_PARAM if kind is None else fused.KIND[kind]
        mkey, vkey = (*self._state_keys, None)[:2]  # (SGD: a momentum buffer and no second moment)
        mscale, vscale = (None if k is None else k + quant.SCALE for k in (mkey, vkey))
        storage, state_of, segment, moment_dtype = self.store.storage, self.state, self._segment, self.moment_dtype
        stored = stored_dtypes(moment_dtype)  # the dtypes of the moments the kernel reads
        rows: dict[torch.dtype, list[tuple]] = {}
        for item, scalar in zip(items, scalars):  # (every step, for every tensor: kept lean)
            state = state_of[item.param]
            m, v = state.get(mkey), state.get(vkey)
            m, v = None if m is None else local(m), None if v is None else local(v)
            ms, vs = state.get(mscale), state.get(vscale)
            s = None if kind is None else storage(item.param)
            p, g = local(item.param), local(item.grad)
            if not fused.applies(p, g, s, m, v, ms, vs):
                return False
            # the kernel reads the moments as moment_dtype
            bad = m if m is not None and m.dtype not in stored else v if v is not None and v.dtype not in stored else None
            if bad is not None:
                raise TypeError(f"{type(self).__name__}'s moments are {moment_dtype}, found {bad.dtype} state")
            rows.setdefault(g.dtype, []).append((p, s, g, m, v, item.first, *segment(scalar), ms, vs))
        factor, clamp = transform
        h = fused.hyper(**self._hyper(group), factor=0.0 if factor is None else float(factor),
                        has_factor=factor is not None, clamp=0.0 if clamp is None else float(clamp),
                        has_clamp=clamp is not None, maximize=bool(group["maximize"]), seed=self.seed % 2**64,
                        counter=self._noise_step)
        for gdtype, group_rows in rows.items():
            fused.run(self._kernel, code, items[0].param.dtype, gdtype, self.moment_dtype, fused.segments(group_rows), h)
        return True

    # -- compiled: one torch.compile'd pass per tensor (CUDA, or compile=True) -------------------

    def _compiled_step(
        self,
        group: dict[str, Any],
        items: list[_Item],
        scalars: list[Any],
        transform: tuple[Optional[Tensor], Optional[float]],
    ) -> bool:
        """Step ``items`` with :mod:`lightning_mp.optim.compiled`; ``False`` where it does not apply."""
        device = items[0].param.device
        wanted = self.compile is True or (self.compile is None and device.type == "cuda")
        if not wanted or not compiled.available(device):
            return False
        kind = self._policy(items[0].param)
        factor, clamp = transform
        rows = [[1.0, math.inf if clamp is None else clamp, *self._compiled_row(group, scalar)] for scalar in scalars]
        hf = compiled.to_device(torch.tensor(rows, dtype=torch.float32), device)  # every step's numbers: one copy
        if factor is not None:
            hf[:, 0] = factor.to(device)  # stays on the device: no host sync
        hi = compiled.noise_keys(self.seed, self._noise_step, [item.first for item in items], device)
        signature = (type(self).__name__, kind, items[0].param.dtype, self.moment_dtype, device.type)
        start = None if signature in compiled.REPORTED else time.perf_counter()
        calls = []
        for item, f, i in zip(items, hf.unbind(0), hi):
            p = item.param
            s = None if kind is None else self.store.storage(p)
            state = {k: local(v) if isinstance(v, Tensor) else v for k, v in self.state[p].items()}
            args = self._compiled_args(kind, group, local(p), s, local(item.grad), state, f, i)
            if all(a.is_contiguous() for a in args if isinstance(a, Tensor)):  # flat: one graph for every shape
                args = tuple(compiled.flat(a) if isinstance(a, Tensor) else a for a in args)
            calls.append(args)
        # every tensor's variant compiled (on copies) before any is stepped: a failure leaves all to the eager path
        steps = []
        for args in calls:
            step = compiled.checked(self._kernel + ("_q8" if self.moment_dtype == EIGHT_BIT else ""), args)
            if step is None:
                return False  # (at the first variant that fails: one warning)
            steps.append(step)
        for step, args in zip(steps, calls):
            step(*args)
        if start is not None:
            compiled.report(signature, time.perf_counter() - start)
        return True

    def _compiled_row(self, group: dict[str, Any], scalar: Any) -> list[float]:
        """The compiled step's per-tensor numbers after the clip factor and value."""
        raise NotImplementedError

    def _compiled_args(self, kind: Optional[str], group: dict[str, Any], w: Tensor, s: Optional[Tensor], g: Tensor,
                       state: dict[str, Any], hf: Tensor, hi: Tensor) -> tuple[Any, ...]:
        """The compiled step's arguments for one tensor."""
        raise NotImplementedError

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The fused kernel's hyper-parameters of ``group``."""
        raise NotImplementedError

    def _segment(self, scalars: Any) -> tuple[float, float]:
        """The fused kernel's per-tensor scalars, from what :meth:`_prepare` returned."""
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in enumerate(params):
            exact = self.store.exact_state(p)  # a Kahan pair's weight, which its FP32 value cannot give back
            if exact:
                state["state"][index] = {**state["state"].get(index, {}), **exact}
            if sharded(p) and quant.is_quantized(state["state"].get(index, {})):
                state["state"][index] = decoded_moments(state["state"][index], self._state_keys, p)  # for DCP
        if self.store.policy == "stochastic" or self.moment_dtype != torch.float32:
            for device in {p.device for p in params}:  # the rounding's generators, even before their first use
                self.store.generator(device)
        state["master"] = self.master
        state["generators"] = self.store.state_dict()["generators"]
        state["noise_step"] = self._noise_step
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
        self._noise_step = int(state_dict.pop("noise_step", 0))
        state_dict.pop("master", None)
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(saved_ids, params):
            saved = state_dict["state"].get(index, {})
            state = self.state[p]
            for key in self._state_keys:
                if isinstance(saved.get(key), Tensor):
                    state.pop(key + quant.SCALE, None)
                    state.update(loaded_moment(p, key, saved, self.moment_dtype))
            state.pop("weight", None)
            for key in STATE_KEYS:
                state.pop(key, None)
            if p.dtype in HALF and self.master is not None:
                self._sync_storage([p])
                self.store.load_exact_state(p, {k: v.to(p.device) for k, v in saved.items() if isinstance(v, Tensor)})
        self.store.load_state_dict({"generators": generators})


class _Item(NamedTuple):
    """A parameter to step, its gradient, and its first element in the optimizer's numbering."""

    param: Tensor
    grad: Tensor
    first: int
