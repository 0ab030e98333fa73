"""``AdamW``: ``torch.optim.AdamW``'s defaults and arithmetic on 16-bit weights with stored FP32 values."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_mp import fused
from lightning_mp.optim import quant
from lightning_mp.optim.base import Params, StoredMasterOptimizer
from lightning_mp.optim.moments import EIGHT_BIT, MomentDtype

# Lightning's precisions whose weights this AdamW cannot step, and why: where MoEModule would pick
# it (bf16 or 8-bit moments), it and the commands refuse these before training
CANNOT_STEP = {
    "bf16-true": "its bf16 weights keep no FP32 values",
    "16-true": "its fp16 weights keep no FP32 values",
    "64-true": "its weights are float64",
}


class AdamW(StoredMasterOptimizer):
    """``torch.optim.AdamW`` (same defaults and arithmetic) on 16-bit weights with stored FP32 values.

    Args:
        params, lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (no ``amsgrad``).
        master: storage policy of bfloat16 parameters, one of :data:`MASTER_POLICIES`; ``None``
            (default) leaves it to :class:`~lightning_mp.MasterWeightPrecision`.
        moment_dtype: ``torch.float32`` (default); ``torch.bfloat16``, whose moments are then
            updated with stochastic rounding (4 bytes per parameter instead of 8); or ``"8bit"``:
            block-wise 8-bit codes with an FP32 scale per 256 elements (:mod:`lightning_mp.optim.quant`,
            2.03 bytes per parameter). Names (``"float32"``, ``"bfloat16"``) are accepted.
        seed: seeds the stochastic rounding (per device), saved in ``state_dict``.
        compile: ``None`` (default): one fused pass per element where it applies, the C++ kernel
            of :mod:`lightning_mp.fused` on CPU tensors and a ``torch.compile``'d pass
            (:mod:`lightning_mp.optim.compiled`, Triton) on CUDA ones, torch's foreach ops
            elsewhere; ``True``: the ``torch.compile``'d pass on any device; ``False``: always
            torch's foreach ops, bit-exact with ``torch.optim.AdamW``. The fused passes differ from
            it by a few ulps: the C++ kernel takes IEEE square roots (torch's CPU sqrt is 1 ulp
            off for about 0.7 % of elements), the compiled pass rounds the products that ATen
            fuses into multiply-adds.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _kernel = "adamw"

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
        moment_dtype: MomentDtype = torch.float32,
        seed: int = 0,
        compile: Optional[bool] = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, master=master, moment_dtype=moment_dtype, seed=seed, compile=compile)

    def _prepare(self, group: dict[str, Any], params: list[Tensor]) -> list[Any]:
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "step" not in state:
                state["step"] = torch.tensor(0.0)  # on the CPU, as torch keeps it: reading it never syncs
                for key in self._state_keys:
                    if self.moment_dtype == EIGHT_BIT:
                        state[key], state[key + quant.SCALE] = quant.zeros(key, p)
                    else:
                        state[key] = torch.zeros_like(p, dtype=self.moment_dtype)
        steps = [state["step"] for state in states]
        counts = fused.count(steps)  # (the same FP32 additions, in one call)
        if counts is None:
            torch._foreach_add_(steps, 1)
            counts = torch.stack(steps).tolist()  # (one read of the counts)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        # torch's step size and bias correction, per tensor, in Python floats (once per distinct count)
        scalars = {t: ((lr / (1 - beta1**t)) * -1, (1 - beta2**t) ** 0.5) for t in set(counts)}
        return [scalars[t] for t in counts]

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        return dict(decay=1 - lr * wd, has_decay=wd != 0, c1=1 - beta1, beta2=beta2, c2=1 - beta2, eps=group["eps"])

    def _segment(self, scalars: Any) -> tuple[float, float]:
        return scalars  # -step size, sqrt(bias correction 2)

    def _compiled_row(self, group: dict[str, Any], scalar: Any) -> list[float]:
        h = self._hyper(group)
        return [h["decay"] if h["has_decay"] else 1.0, h["c1"], h["beta2"], h["c2"], h["eps"], *scalar]

    def _compiled_args(self, kind, group, w, s, g, state, hf, hi):  # type: ignore[override]
        if self.moment_dtype == EIGHT_BIT:  # codes and block scales (compiled._adamw_q8)
            return (kind, bool(group["maximize"]), w, s, g, state["exp_avg"], state["exp_avg" + quant.SCALE],
                    state["exp_avg_sq"], state["exp_avg_sq" + quant.SCALE], hf, hi)
        return kind, bool(group["maximize"]), w, s, g, state["exp_avg"], state["exp_avg_sq"], hf, hi

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
