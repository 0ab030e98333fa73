"""Memory per parameter: measured from the live tensors (:func:`memory_audit`), or predicted from
the parameter count (:func:`estimate_memory`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp.masters import MasterStore
from lightning_mp.optim.quant import BLOCK

CATEGORIES = ("weights", "masters", "gradients", "optimizer_state", "loss_scaler")


def plain_tensors(t: Tensor) -> Iterable[Tensor]:
    """``t``, or the plain tensors inside a wrapper subclass (torchao's quantized optimizer states:
    codes, scales, code table)."""
    if type(t) in (Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        yield t
        return
    names, _ = t.__tensor_flatten__()
    for name in names:
        yield from plain_tensors(getattr(t, name))


def _storage_key(t: Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return str(t.device), storage.data_ptr()


def _scaler_tensors(precision_plugin: Any) -> list[Tensor]:
    """Tensors a plugin's loss scaler holds: torch's GradScaler keeps two; lightning-mp's keeps floats."""
    scaler = getattr(precision_plugin, "scaler", None)
    return [t for t in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)) if t is not None]


def memory_audit(module: nn.Module, optimizers: Iterable[Optimizer] = (), precision_plugin: Any = None) -> dict[str, int]:
    """Bytes held right now in each category, from the live tensors' storages.

    - ``weights``: the module's parameters (what forward reads);
    - ``masters``: what keeps the FP32 values beside 16-bit weights (the plugin's
      :class:`~lightning_mp.masters.MasterStore`: FP32 masters, remainders, compensations), and
      tensors in the optimizers' ``param_groups`` that are not module parameters;
    - ``gradients``: ``.grad`` of both, and FP32 gradient sums kept between micro-batches;
    - ``optimizer_state``: every tensor in the optimizers' ``state``;
    - ``loss_scaler``: tensors of ``precision_plugin``'s loss scaler.

    Each storage is counted once, in the first category that reaches it (tied weights, views
    and a master that *is* its parameter are not counted twice). Also returns ``"total"`` and
    ``"n_params"`` (elements of the module's parameters). Sharded (DTensor, FSDP2) tensors
    count this rank's shard, ``n_params`` the whole model: bytes per parameter per rank.
    """
    seen: set[tuple[str, int]] = set()
    sizes = dict.fromkeys(CATEGORIES, 0)

    def add(category: str, tensors: Iterable[Optional[Tensor]]) -> None:
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            if hasattr(t, "to_local"):  # a DTensor (FSDP2): this rank's shard
                t = t.to_local()
            for inner in plain_tensors(t):
                key = _storage_key(inner)
                if key in seen:
                    continue
                seen.add(key)
                sizes[category] += inner.untyped_storage().nbytes()

    optimizers = list(optimizers)
    params = list(module.parameters())
    in_groups = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    store = getattr(precision_plugin, "store", None) or MasterStore.of(module)
    add("weights", params)
    add("masters", store.tensors() if store is not None else ())
    add("masters", in_groups)
    add("gradients", (p.grad for p in [*params, *in_groups]))
    grads = getattr(precision_plugin, "grads", None)
    add("gradients", grads.sums() if grads is not None else ())
    add(
        "optimizer_state",
        (v for opt in optimizers for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)),
    )
    add("loss_scaler", _scaler_tensors(precision_plugin))
    sizes["total"] = sum(sizes[c] for c in CATEGORIES)
    sizes["n_params"] = sum(p.numel() for p in params)
    return sizes


def bytes_per_param(audit: dict[str, int]) -> dict[str, float]:
    """The audit divided by the number of parameters."""
    n = max(audit["n_params"], 1)
    return {k: v / n for k, v in audit.items() if k != "n_params"}


_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "sgd-no-momentum": 0, "adagrad": 1}  # tensors per parameter
_STEP_COUNTERS = ("adamw", "adam", "adagrad")  # a 4-byte `step` tensor per parameter tensor


def estimate_memory(
    n_params: int,
    precision: str,
    optimizer: str = "adamw",
    n_tensors: int = 0,
    master: str = "auto",
    moment_dtype: str = "float32",
) -> dict[str, int]:
    """What :func:`memory_audit` measures after a step, predicted from the parameter count alone.

    Assumes every parameter is stored in the mode's weight dtype (``keep_fp32`` norms, a
    handful of parameters, are FP32 in the ``*-master`` modes). ``optimizer``: ``adamw``,
    ``adam``, ``sgd`` (with momentum), ``sgd-no-momentum`` or ``adagrad``; ``n_tensors``, the
    number of parameter tensors, adds Adam's and Adagrad's 4-byte ``step`` counter per tensor.
    ``master`` is the storage policy: ``"auto"`` (the plugin's default) is ``"remainder"`` under
    ``bf16-master`` for AdamW, Adam and SGD, ``"fp32"`` otherwise; ``"remainder"`` and ``"kahan"``
    keep 2 bytes beside the weight, ``"stochastic"`` none (``bf16-master`` only). Gradients are
    freed inside the step. ``moment_dtype="bfloat16"`` halves the optimizer state, ``"8bit"``
    keeps 1 byte per moment plus an FP32 scale per 256 (:mod:`lightning_mp.optim`; per-tensor
    rounding up of the blocks is left out).
    """
    from lightning_mp.precision import PRECISION_NAMES  # a circular import at module level

    if precision not in PRECISION_NAMES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_NAMES)}")
    if optimizer not in _OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(_OPTIMIZER_STATES)}")
    if master not in ("auto", "fp32") and precision != "bf16-master":
        raise ValueError(f"master={master!r} applies to bf16-master only, not {precision!r}")
    if master == "auto":  # what MasterWeightPrecision picks (lightning_mp.optim.adopt)
        master = "remainder" if precision == "bf16-master" and optimizer in ("adamw", "adam", "sgd", "sgd-no-momentum") else "fp32"
    has_masters = precision.endswith("-master")
    weight = {"64-true": 8, "bf16-true": 2, "16-true": 2}.get(precision, 2 if has_masters else 4)
    state_dtype: float = 4 if has_masters else weight  # a *-true optimizer keeps 16-bit state; masters keep FP32
    if moment_dtype == "bfloat16":
        state_dtype = 2
    elif moment_dtype == "8bit":  # a code per element and an FP32 scale per block
        if optimizer not in ("adamw", "adam"):
            raise ValueError(f"moment_dtype='8bit' applies to adamw and adam, not {optimizer!r}")
        state_dtype = 1 + 4 / BLOCK
    elif moment_dtype != "float32":
        raise ValueError(f"unknown moment_dtype {moment_dtype!r}; choose float32, bfloat16 or 8bit")
    master_bytes = {"fp32": 4, "remainder": 2, "kahan": 2, "stochastic": 0}[master] if has_masters else 0
    sizes = {
        "weights": weight * n_params,
        "masters": master_bytes * n_params,
        "gradients": 0 if has_masters else weight * n_params,  # *-master grads die with the step
        "optimizer_state": math.ceil(_OPTIMIZER_STATES[optimizer] * state_dtype * n_params)
        + (4 * n_tensors if optimizer in _STEP_COUNTERS else 0),
        "loss_scaler": 8 if precision == "16-mixed" else 0,  # GradScaler: float32 scale + int32 tracker
    }
    sizes["total"] = sum(sizes.values())
    sizes["n_params"] = n_params
    return sizes


# -- the swallowed-update monitor ---------------------------------------------------------------
