"""Diagnostics that make precision costs visible: memory per parameter, measured from live tensors."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from torch.optim import Optimizer

CATEGORIES = ("weights", "masters", "gradients", "optimizer_state")


def _storage_key(t: Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return str(t.device), storage.data_ptr()


def memory_audit(module: nn.Module, optimizers: Iterable[Optimizer] = ()) -> dict[str, int]:
    """Bytes held right now in each category, from the live tensors' storages.

    - ``weights``: the module's parameters (what forward reads);
    - ``masters``: tensors in the optimizers' ``param_groups`` that are not module parameters;
    - ``gradients``: ``.grad`` of both;
    - ``optimizer_state``: every tensor in the optimizers' ``state``.

    Each storage is counted once, in the first category that reaches it (tied weights, views
    and a master that *is* its parameter are not counted twice). Also returns ``"total"`` and
    ``"n_params"`` (elements of the module's parameters).
    """
    seen: set[tuple[str, int]] = set()
    sizes = dict.fromkeys(CATEGORIES, 0)

    def add(category: str, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            sizes[category] += t.untyped_storage().nbytes()

    optimizers = list(optimizers)
    params = list(module.parameters())
    in_groups = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    add("weights", params)
    add("masters", in_groups)
    add("gradients", (p.grad for p in [*params, *in_groups]))
    add(
        "optimizer_state",
        (v for opt in optimizers for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)),
    )
    sizes["total"] = sum(sizes[c] for c in CATEGORIES)
    sizes["n_params"] = sum(p.numel() for p in params)
    return sizes


def bytes_per_param(audit: dict[str, int]) -> dict[str, float]:
    """The audit divided by the number of parameters."""
    n = max(audit["n_params"], 1)
    return {k: v / n for k, v in audit.items() if k != "n_params"}


