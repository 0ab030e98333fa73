"""A user's own ``torch.optim.AdamW``, ``Adam`` or ``SGD``, stepped through the storage policies in place.

``MasterWeightPrecision`` keeps the cheapest exact storage by default (int16 remainders, 2 bytes per
parameter, where a separate FP32 master takes 4). That needs an optimizer that steps the bf16
weights through their storage: :class:`~lightning_mp.optim.AdamW` and
:class:`~lightning_mp.optim.SGD` do. :func:`adopt` gives a user's torch optimizer the same step
*without replacing it*: the object, its ``param_groups`` (schedulers, ``LearningRateMonitor``),
its state under torch's keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``), FP32,
and ``isinstance`` checks all stay the user's; a ``state_dict()`` it saves loads into a plain
torch optimizer (which ignores the ``remainder`` entries) and the other way round. Its class
becomes a subclass of both (as ``make_skip_aware`` does for schedulers), so the step is
:mod:`lightning_mp.optim.base`'s: the C++ kernel on CPU, a compiled pass on CUDA.

Only the options that step does exactly as torch: AdamW without ``amsgrad``, Adam with no weight
decay or ``decoupled_weight_decay=True`` (then it is AdamW), SGD with any momentum, dampening,
Nesterov and weight decay; float learning rates; neither ``capturable`` nor ``differentiable``.
Anything else, and any other optimizer class (a subclass may change the step), is not adopted:
the plugin keeps FP32 masters for it.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch.optim import Optimizer

from lightning_mp.optim.adamw import AdamW
from lightning_mp.optim.sgd import SGD

_OURS: dict[type, type] = {torch.optim.AdamW: AdamW, torch.optim.Adam: AdamW, torch.optim.SGD: SGD}
_ADOPTED: dict[type, type] = {}


def why_not(optimizer: Optimizer) -> Optional[str]:
    """``None`` where :func:`adopt` can take ``optimizer``, else the reason, in a few words."""
    cls = type(optimizer)
    if cls in _ADOPTED.values():
        return None
    if cls not in _OURS:
        return f"{cls.__qualname__} is not torch's AdamW, Adam or SGD"
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], float) and not isinstance(group["lr"], int):
            return "a tensor learning rate"
        for option in ("amsgrad", "capturable", "differentiable"):
            if group.get(option):
                return f"{option}=True"
        if cls is torch.optim.Adam and group["weight_decay"] != 0 and not group.get("decoupled_weight_decay"):
            return "Adam's L2 weight decay (AdamW's decoupled one is adopted)"
    return None


def adopt(optimizer: Optimizer, master: Optional[str] = None) -> bool:
    """Make ``optimizer`` (in place) step its 16-bit weights through their storage; ``False`` where
    :func:`why_not` says it cannot, leaving it untouched."""
    if why_not(optimizer) is not None:
        return False
    cls = type(optimizer)
    if cls not in _ADOPTED.values():
        ours = _OURS[cls]
        if cls not in _ADOPTED:
            _ADOPTED[cls] = type(cls.__name__, (ours, cls), {"__module__": cls.__module__, "__reduce_ex__": _reduce})
        optimizer.__class__ = _ADOPTED[cls]
        # torch's fused flag would promise found_inf handling (the sync-free skip), which this step does not do
        optimizer.__dict__.pop("_step_supports_amp_scaling", None)
        _rewrap_scheduler_step(optimizer)
        optimizer._setup(master, torch.float32, 0, None)  # FP32 moments: the user's state format
        for state in optimizer.state.values():  # torch casts loaded moments to a bf16 parameter's dtype
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16):
                    state[key] = value.float()
    return True


def _rewrap_scheduler_step(optimizer: Optimizer) -> None:
    """An LR scheduler built before adoption wrapped the instance's ``step`` around the *old*
    class's function (to notice the optimizer stepped); wrap the adopted class's step instead."""
    old = optimizer.__dict__.get("step")
    if old is None or not getattr(old, "_wrapped_by_lr_sched", False):
        return
    ref = weakref.ref(optimizer)

    def step(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return type(opt).step(opt, *args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]


def _new(cls: type) -> Any:
    return cls.__new__(cls)


def _reduce(self: Any, protocol: int) -> Any:
    # pickle and deep-copy as the user's own class (the adopted one exists only in this process), with
    # torch's own state (defaults, state, param groups), as torch pickles an optimizer
    return _new, (type(self).__bases__[1],), Optimizer.__getstate__(self)
