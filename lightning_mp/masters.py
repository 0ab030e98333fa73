"""Where the FP32 values live: one :class:`MasterStore` per model, a storage policy per parameter.

The model keeps 16-bit weights, and every optimizer holds those very parameters. The store
keeps each 16-bit parameter's FP32 value beside its weight, in one of the four kinds of storage
of :mod:`lightning_mp.storage` (a separate FP32 master, an int16 remainder, a Kahan compensation,
or nothing under stochastic rounding).

Parameters that an optimizer steps get the run's policy; the others (frozen, unused) keep their
exact FP32 value in the cheapest exact form until an optimizer first steps them: nothing beside
the weight where the value is a 16-bit number (a base loaded from a bf16 checkpoint, as in a LoRA
fine-tune), else an int16 remainder beside a bf16 weight or an FP32 copy beside an fp16 one; a
value loaded into them picks the form again. FP32 parameters (norms, routers) are their own
values and are not in the store.

Everything that needs an FP32 value goes through :meth:`MasterStore.value` and
:meth:`MasterStore.set_value`: the optimizer step, every checkpoint path (the store hooks the module's ``state_dict`` and ``load_state_dict``), the
swallowed-update monitor and the memory audit. A weight written outside the store (an in-place
``copy_`` or ``clamp_`` under ``no_grad``, SWA's averaged weights, a ``p.data = ...`` swap) is noticed
by its version counter or its memory, before the next step and any read, and its FP32 value is
re-derived from it (:meth:`MasterStore.sync`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_mp.convert import unfollow_callers
from lightning_mp.storage import HALF, MASTER_POLICIES, POLICY, as_local, is_16bit, like, local, sharded

# -- the store ---------------------------------------------------------------------------------


@dataclass
class _Entry:
    kind: str
    storage: Optional[Tensor]
    version: int  # the weight's version counter when the store last wrote it
    # whether an optimizer steps the parameter (or may: the storage is then in its state). The
    # others keep the cheapest exact storage for their current value, which can change with it
    stepped: bool = True
    ptr: int = 0  # where the weight's elements were then: `p.data = ...` moves them, unversioned
    device: Optional[torch.device] = None

    def stamp(self, p: Tensor) -> None:
        """Note ``p``'s weight as the store leaves it (written by the store, or adopted)."""
        weight = local(p)
        self.version, self.ptr, self.device = weight._version, weight.data_ptr(), weight.device


_STORES: "weakref.WeakKeyDictionary[nn.Module, MasterStore]" = weakref.WeakKeyDictionary()
_UNKNOWN = -1  # the version of an entry copied along with its module
_REDERIVED = {  # what a write does to a weight's other elements, by storage
    "fp32": " (elements left alone keep their FP32 bits)",
    **dict.fromkeys(("remainder", "kahan"), " (every element's: its remainder or compensation cannot tell which "
                                            "changed, so each rounds to 16 bits once)"),
}


class MasterStore:
    """The FP32 value of each 16-bit parameter, kept beside its weight by a storage policy.

    Args:
        dtype: the weights' 16-bit dtype.
        policy: the storage of parameters that an optimizer steps, one of :data:`MASTER_POLICIES`
            (all but ``"fp32"`` need bfloat16).
        seed: seeds stochastic rounding (one generator per device, saved in :meth:`state_dict`).
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16, policy: str = "fp32", seed: int = 0) -> None:
        if policy not in MASTER_POLICIES:
            raise ValueError(f"master must be one of {', '.join(MASTER_POLICIES)}, got {policy!r}")
        if policy != "fp32" and dtype != torch.bfloat16:
            raise ValueError(f"master={policy!r} stores bfloat16 weights, not {dtype}")
        self.dtype, self.policy, self.seed = dtype, policy, seed
        self._entries: dict[Tensor, _Entry] = {}
        self._captured: dict[Tensor, Tensor] = {}  # parameter -> its FP32 value from before the cast
        self._loading: dict[Tensor, Tensor] = {}  # parameter -> the FP32 value load_state_dict brings
        self._generators: dict[torch.device, torch.Generator] = {}
        self._names: dict[Tensor, str] = {}
        self._hooks: list[Any] = []
        self._cache: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()

    # -- a model's store ------------------------------------------------------------------------

    @staticmethod
    def of(module: nn.Module) -> Optional["MasterStore"]:
        """The store that keeps ``module``'s FP32 values, if a plugin converted it; also found
        through what wraps the converted module (Fabric's ``fabric.setup`` result, DDP,
        ``torch.compile``)."""
        seen: set[int] = set()
        while isinstance(module, nn.Module) and id(module) not in seen:
            store = _STORES.get(module)
            if store is not None:
                return store
            seen.add(id(module))
            inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
            module = inner if inner is not None else getattr(module, "module", None)  # Fabric's wrapper, DDP
        return None

    def attach(self, module: nn.Module) -> None:
        """Keep ``module``'s FP32 values: hook its ``state_dict`` (FP32 values out) and
        ``load_state_dict`` (FP32 values in, non-finite ones refused) on every submodule."""
        previous = _STORES.get(module)
        if previous is self:
            return
        if previous is not None:
            previous.detach()
        _STORES[module] = self
        self._names = {p: n for n, p in reversed(list(module.named_parameters(remove_duplicate=False)))}
        for sub in module.modules():
            if any(p is not None and p.is_floating_point() for p in sub._parameters.values()):
                self._hooks += [
                    sub.register_state_dict_post_hook(_Hook(self, "_state_dict_hook")),
                    sub.register_load_state_dict_pre_hook(_Hook(self, "_load_pre_hook")),
                    sub.register_load_state_dict_post_hook(_Hook(self, "_load_post_hook")),
                ]

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module, store in list(_STORES.items()):
            if store is self:
                del _STORES[module]

    def __getstate__(self) -> dict[str, Any]:
        # Pickling or deep-copying the module carries its store (and its FP32 values) along,
        # without what only lives in this process: hook handles, caches, generators.
        state = dict(self.__dict__)
        state.update(_hooks=[], _cache=None, _loading={}, _captured={}, _generators={})
        # a copied parameter's version counter starts again: the copy adopts it (see sync)
        state["_entries"] = {p: _Entry(e.kind, e.storage, _UNKNOWN, e.stepped) for p, e in self._entries.items()}
        state["_generator_states"] = self.state_dict()["generators"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        rng = state.pop("_generator_states", {})
        self.__dict__.update(state)
        self._cache = weakref.WeakValueDictionary()
        self.load_state_dict({"generators": rng})

    @torch.no_grad()
    def restore_fp32(self) -> None:
        """Turn every 16-bit parameter back into an FP32 one holding its exact value (the model
        leaves 16 bits, e.g. for FP32 inference or export), and stop keeping them."""
        params = self.params()
        for p, value in zip(params, self.values(params)):
            p.data = like(value.clone(), p)
        self._entries.clear()
        for module in [m for m, store in _STORES.items() if store is self]:
            unfollow_callers(module)
        self.detach()

    def name(self, p: Tensor) -> str:
        return self._names.get(p, f"<a {tuple(p.shape)} parameter>")

    # -- tracking parameters ------------------------------------------------------------------

    def capture(self, param: Tensor) -> None:
        """Remember ``param``'s FP32 value before it is cast to 16 bits (a parameter the store
        already keeps has a more precise value than its weight: it is left as it is)."""
        if param in self._entries or param in self._captured:
            return
        # An FP32 parameter keeps its own storage alive here (no copy): the cast replaces `.data`.
        self._captured[param] = param.data if param.dtype == torch.float32 else param.data.float()

    @torch.no_grad()
    def track(self, module: nn.Module, held: Iterable[Tensor]) -> None:
        """Give every 16-bit parameter of ``module`` its storage: the policy's for those an optimizer
        holds (``held``) that require a gradient, the cheapest exact storage for the others (a
        frozen one held gets the policy's when it first has a gradient). Consumes the captured
        FP32 values."""
        stepped = {p for p in held if p.requires_grad}
        for p in dict.fromkeys(p for p in module.parameters() if p.dtype in HALF):  # module order: ranks agree
            value = self._captured.pop(p, None)
            if p not in self._entries:
                value = local(p).detach().float() if value is None else value
                if p in stepped:
                    self._new(p, self.policy, value)
                else:
                    self._new(p, self._exact_kind(p, value), value, stepped=False)
            elif p in stepped:
                self.ensure([p], self.policy)
        self._captured.clear()

    def _exact_kind(self, p: Tensor, value: Optional[Tensor] = None) -> str:
        """The cheapest storage that keeps ``p``'s FP32 ``value`` exactly: none where the value is a
        16-bit number (not for FSDP2's shards, whose ranks would disagree), else an int16 remainder
        beside a bf16 weight or an FP32 copy beside an fp16 one."""
        if value is not None and not sharded(p) and is_16bit(value, p.dtype):
            return "weight"
        return "remainder" if p.dtype == torch.bfloat16 else "fp32"

    def _new(self, p: Tensor, kind: str, value: Tensor, stepped: bool = True) -> None:
        value = value.detach().to(device=p.device, dtype=torch.float32)
        if kind == "fp32" and value.is_contiguous() and value.data_ptr() != local(p).data_ptr():
            self._entries[p] = _Entry(kind, value, 0, stepped)  # the captured FP32 tensor becomes the master: no copy
            self._write([p], [value])
            return
        self._entries[p] = _Entry(kind, POLICY[kind].new_storage(local(p)), 0, stepped)
        self._write([p], [value.clone()])

    def take_over(self, previous: "MasterStore") -> None:
        """Keep the values of a store that another plugin kept for the same module (a new Trainer)."""
        for p in previous.params():
            self._captured.setdefault(p, previous.value(p).clone())
        previous.detach()

    @torch.no_grad()
    def ensure(self, params: Iterable[Tensor], kind: Optional[str] = None, stepped: bool = True) -> None:
        """Make ``kind`` (default: the policy) the storage of each 16-bit parameter in ``params``:
        one joining an optimizer late keeps its exact value in its new storage. ``stepped``: an
        optimizer steps them (from now on, their storage stays theirs)."""
        kind = kind or self.policy
        for p in params:
            if p.dtype not in HALF:
                continue
            entry = self._entries.get(p)
            if entry is None:
                self._new(p, kind, local(p).detach().float(), stepped)  # created 16-bit: its upcast is all there is
            elif entry.kind != kind:
                value = self.values([p])[0].clone()
                self._entries[p] = _Entry(kind, POLICY[kind].new_storage(local(p)), 0, entry.stepped or stepped)
                self._write([p], [value])
            elif stepped:
                entry.stepped = True

    def kind(self, p: Tensor) -> Optional[str]:
        entry = self._entries.get(p)
        return None if entry is None else entry.kind

    def storage(self, p: Tensor) -> Optional[Tensor]:
        """The tensor beside ``p``'s weight: its FP32 master, remainder or compensation (or None)."""
        entry = self._entries.get(p)
        return None if entry is None else entry.storage

    def params_of(self, tensors: Iterable[Tensor]) -> list[Tensor]:
        """For each tensor, the parameter whose FP32 master it is (an optimizer holds the masters
        during a ``master="fp32"`` step), else the tensor itself."""
        owner = {id(e.storage): p for p, e in self._entries.items() if e.kind == "fp32"}
        return [owner.get(id(t), t) for t in tensors]

    def params(self) -> list[Tensor]:
        return list(self._entries)

    def tensors(self) -> Iterator[Tensor]:
        """Every storage tensor (for the memory audit)."""
        return (e.storage for e in self._entries.values() if e.storage is not None)

    @torch.no_grad()
    def take_first_rank(self, broadcast: Callable[[list[Tensor]], None]) -> None:
        """Every weight and storage tensor as the first rank has them (DDP's setup), through
        ``broadcast``, which sends that rank's values of a list of tensors to the others.

        Each rank decided from its own values which parameters no optimizer steps need no storage
        (their values 16-bit numbers); those get their exact storage back first, so that every
        rank lists the same tensors. Afterwards, with the same values everywhere, the same rule
        drops it again on every rank."""
        for p, entry in list(self._entries.items()):
            if entry.kind == "weight":
                self.ensure([p], self._exact_kind(p), stepped=False)
        broadcast([local(p).data for p in self._entries] + list(self.tensors()))
        self.record(self.params())
        for p, entry in list(self._entries.items()):
            if not entry.stepped and self._exact_kind(p, self.value(p)) == "weight":
                self.ensure([p], "weight", stepped=False)

    # -- FP32 values in and out ------------------------------------------------------------------

    def value(self, p: Tensor) -> Tensor:
        """``p``'s FP32 value. For an ``"fp32"`` master this is the master itself: do not modify it."""
        return self.values([p])[0]

    @torch.no_grad()
    def values(self, params: Sequence[Tensor], verify: bool = False) -> list[Tensor]:
        """The FP32 values of ``params`` (parameters the store does not keep: their exact upcast).

        ``verify`` also notices weights written through ``.data`` (which version counters miss)
        under ``"fp32"`` storage, by comparing each weight with its rounded master: a read for a
        checkpoint does this, a step does not.
        """
        self.sync(params)
        if verify:
            self._adopt_data_writes(params)
        out: list[Optional[Tensor]] = [None] * len(params)
        by_kind: dict[str, list[int]] = {}
        for i, p in enumerate(params):
            entry = self._entries.get(p)
            if entry is None:
                out[i] = local(p).detach() if p.dtype == torch.float32 else local(p).detach().float()
            else:
                by_kind.setdefault(entry.kind, []).append(i)
        for kind, index in by_kind.items():
            weights = [local(params[i]).detach() for i in index]
            storage = [self._entries[params[i]].storage for i in index]
            for i, value in zip(index, POLICY[kind].decode(weights, storage)):  # type: ignore[arg-type]
                out[i] = value
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def set_value(self, p: Tensor, value: Tensor) -> None:
        """Make ``value`` ``p``'s FP32 value: its storage, and its weight rounded to nearest."""
        value = as_local(value.detach(), p).to(device=p.device, dtype=torch.float32)
        if p.dtype not in HALF:
            local(p).copy_(value)
            return
        entry = self._entries.get(p)
        if entry is None or not entry.stepped:  # the cheapest exact storage for this value
            kind = self._exact_kind(p, value)
            if entry is None or entry.kind != kind:  # (its old value goes: nothing to carry over)
                self._entries[p] = _Entry(kind, POLICY[kind].new_storage(local(p)), 0, stepped=False)
        self._write([p], [value if self._entries[p].kind in ("fp32", "stochastic", "weight") else value.clone()])

    def _write(self, params: list[Tensor], values: list[Tensor]) -> None:
        """Encode FP32 ``values`` into ``params`` (one kind per call) and record their versions."""
        kind = self._entries[params[0]].kind
        weights = [local(p).data for p in params]
        storage = [self._entries[p].storage for p in params]
        if kind == "stochastic":  # only an optimizer's update rounds stochastically; a set value rounds to nearest
            torch._foreach_copy_(weights, values)
        else:
            POLICY[kind].encode(values, weights, storage, None)  # type: ignore[arg-type]
        for p in params:
            self._entries[p].stamp(p)

    def write(self, params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
        """:meth:`set_value` for many parameters of one kind at once (a stepping optimizer's output)."""
        with torch.no_grad():
            self._write(list(params), list(values))

    def record(self, params: Iterable[Tensor]) -> None:
        """Note that ``params``' weights and storage were just written together (by an optimizer)."""
        for p in params:
            entry = self._entries.get(p)
            if entry is not None:
                entry.stamp(p)

    # -- weights written behind the store's back ------------------------------------------------

    @torch.no_grad()
    def sync(self, params: Iterable[Tensor]) -> None:
        """Follow what happened to the weights outside the store (every step and every read calls
        this first): a weight that left the store's dtype (``model.float()``) is no longer kept;
        storage follows a weight to another device; a weight written in place (its version moved)
        or swapped (``p.data = ...``: its memory moved) is re-derived (:meth:`_rederive`)."""
        stale = []
        for p in params:
            entry = self._entries.get(p)
            if entry is None:
                continue
            if p.dtype != self.dtype:
                del self._entries[p]
                continue
            weight = local(p)
            if weight.device != entry.device:  # the model moved to another device: not a write
                if entry.storage is not None:
                    entry.storage = entry.storage.to(weight.device)
                entry.ptr, entry.device = weight.data_ptr(), weight.device
            if entry.version == _UNKNOWN or entry.kind == "weight":  # (the weight is the whole value)
                entry.stamp(p)
            elif weight._version != entry.version or weight.data_ptr() != entry.ptr:
                stale.append(p)
        for p in stale:
            self._rederive(p)
        if stale:
            kinds = sorted({self._entries[p].kind for p in stale})
            names = ", ".join(self.name(p) for p in stale[:3]) + (", ..." if len(stale) > 3 else "")
            warnings.warn(
                f"{len(stale)} {self.dtype_name} weight(s) were written outside the optimizer ({names}): what they "
                f"hold now is their exact value{''.join(_REDERIVED.get(k, '') for k in kinds)}. To set FP32 values "
                "exactly, use lightning_mp.MasterStore.of(model).set_value(p, value).",
                stacklevel=3,
            )

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def _rederive(self, p: Tensor) -> None:
        """Take a written weight as ``p``'s value. An FP32 master keeps its bits wherever the weight
        still holds their rounding (elements the write left alone, or wrote back: an EMA swap and
        its restore); a remainder or compensation cannot tell which elements changed, so every
        element's value becomes its 16-bit weight (exact for a whole new tensor)."""
        entry = self._entries[p]
        weight = local(p).detach()
        if entry.kind == "fp32":
            master = entry.storage
            master.copy_(torch.where(master.to(weight.dtype) == weight, master, weight))  # type: ignore[union-attr]
        elif entry.storage is not None:
            entry.storage.zero_()
        entry.stamp(p)

    def _adopt_data_writes(self, params: Iterable[Tensor]) -> None:
        for p in params:
            entry = self._entries.get(p)
            if entry is None or entry.kind != "fp32":
                continue
            if not torch.equal(entry.storage.to(p.dtype), local(p).detach()):  # type: ignore[union-attr]
                self._rederive(p)

    # -- stochastic rounding ------------------------------------------------------------------

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The stochastic-rounding generators (the FP32 values are in the model's state dict)."""
        return {"generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for device, rng in state.get("generators", {}).items():
            self.generator(torch.device(device)).set_state(rng)

    def exact_state(self, p: Tensor) -> dict[str, Tensor]:
        """What an FP32 value cannot carry: a Kahan pair's compensation *and* weight (``w + c``
        rounds in FP32, so the value alone does not give the pair back)."""
        entry = self._entries.get(p)
        if entry is None or entry.kind != "kahan":
            return {}
        return {"compensation": like(entry.storage, p), "weight": like(local(p).detach().clone(), p)}  # type: ignore[dict-item]

    @torch.no_grad()
    def load_exact_state(self, p: Tensor, saved: dict[str, Tensor]) -> None:
        """Restore storage saved by :meth:`exact_state` (or an optimizer's ``remainder``), when
        ``p``'s storage is of the same kind."""
        entry = self._entries.get(p)
        if entry is None or entry.storage is None:
            return
        key = POLICY[entry.kind].state_key
        if key is None or key not in saved:
            return
        if "weight" in saved:
            local(p).copy_(as_local(saved["weight"], p))
        entry.storage.copy_(as_local(saved[key], p))
        entry.stamp(p)

    # -- module hooks: every state_dict and load_state_dict goes through the store ---------------

    def _state_dict_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, meta: Any) -> None:
        own = [(prefix + n, p) for n, p in module._parameters.items() if p is not None and p in self._entries]
        own = [(key, p) for key, p in own if key in state_dict and state_dict[key] is not p]  # not keep_vars
        if not own:
            return
        values = self.values([p for _, p in own], verify=True)
        for (key, p), value in zip(own, values):
            cached = self._cache.get(id(p))  # tied weights: one tensor under both names
            if cached is value or (cached is not None and torch.equal(cached, value)):
                value = cached
            else:
                self._cache[id(p)] = value
            state_dict[key] = like(value, p)  # a DTensor of FP32 shards under FSDP2

    def _load_pre_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name, p in module._parameters.items():
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) and hasattr(value, "_load_tensor"):  # Lightning's (litgpt's) lazy_load
                value = state_dict[prefix + name] = value._load_tensor()
            if p is None or not isinstance(value, Tensor) or not value.is_floating_point():
                continue
            check_finite(prefix + name, value)
            if p in self._entries:
                self._loading[p] = value

    def _load_post_hook(self, module: nn.Module, incompatible: Any) -> None:
        for p in [p for p in module._parameters.values() if p in self._loading]:
            self.set_value(p, self._loading.pop(p))


class _Hook:
    """A module hook that calls a store method: picklable (a module with its store can be saved
    whole) and, when the module is deep-copied, copied with the store, keyed by the copy's parameters."""

    def __init__(self, store: MasterStore, method: str) -> None:
        self.store, self.method = store, method

    def __call__(self, *args: Any) -> Any:
        return getattr(self.store, self.method)(*args)


def check_finite(name: str, value: Tensor) -> None:
    """Refuse a weight that holds NaN or inf: every step after it would be skipped."""
    if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"the checkpoint's weight {name!r} holds {bad} NaN/inf value(s) of {value.numel()}: it cannot be "
            "trained from (every step would be skipped); load an earlier checkpoint"
        )
