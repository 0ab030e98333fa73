"""``SGD``: ``torch.optim.SGD``'s defaults and arithmetic on 16-bit weights with stored FP32 values."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_mp.optim.base import Params, StoredMasterOptimizer


class SGD(StoredMasterOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay; same defaults and arithmetic)
    on 16-bit weights with stored FP32 values. ``master``, ``moment_dtype``, ``seed`` and ``compile``
    as :class:`~lightning_mp.optim.AdamW`; the C++ kernel's SGD step is bit-exact with torch's too
    (the compiled one is a few ulps of the update apart, ``compile=False`` exact).
    """

    _state_keys = ("momentum_buffer",)
    _kernel = "sgd"

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
        compile: Optional[bool] = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if moment_dtype == "8bit":
            raise ValueError("moment_dtype='8bit' is for AdamW's moments; SGD's momentum buffer is float32 or bfloat16")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
        )
        super().__init__(params, defaults, master=master, moment_dtype=moment_dtype, seed=seed, compile=compile)

    def _moment_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._state_keys if group["momentum"] != 0 else ()

    def _prepare(self, group: dict[str, Any], params: list[Tensor]) -> list[Any]:
        """Whether each parameter's momentum buffer is new: torch starts it at the gradient itself."""
        fresh = []
        for p in params:
            state = self.state[p]
            fresh.append(group["momentum"] != 0 and state.get("momentum_buffer") is None)
            if fresh[-1]:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=self.moment_dtype)
        return fresh

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=group["lr"], wd=group["weight_decay"], momentum=group["momentum"],
                    dampening=group["dampening"], nesterov=bool(group["nesterov"]), has_momentum=group["momentum"] != 0)

    def _segment(self, scalars: Any) -> tuple[float, float]:
        return 0.0, 1.0 if scalars else 0.0  # b: the momentum buffer is new

    def _compiled_row(self, group: dict[str, Any], scalar: Any) -> list[float]:
        return [group["weight_decay"], group["momentum"], 1 - group["dampening"], -group["lr"], float(scalar)]

    def _compiled_args(self, kind, group, w, s, g, state, hf, hi):  # type: ignore[override]
        m = state["momentum_buffer"] if group["momentum"] != 0 else None
        return kind, bool(group["maximize"]), group["weight_decay"] != 0, bool(group["nesterov"]), w, s, g, m, hf, hi

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
