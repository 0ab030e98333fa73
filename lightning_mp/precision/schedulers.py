"""LR schedulers that do not advance on a skipped optimizer step.

A skipped step did not update the weights, so the schedule should not move either (as in
Megatron-LM; Lightning's AMP advances it). Each scheduler holds its own next ``step()`` after a
skipped optimizer step, so two schedulers on one optimizer both hold, and so do schedulers a
user steps by hand in manual optimization.
"""

from __future__ import annotations

from typing import Any

_HOLD = "_lightning_mp_hold"  # set on a scheduler whose next step() must do nothing
_SKIP_AWARE_CLASSES: dict[type, type] = {}


def _skip_aware_step(self: Any, *args: Any, **kwargs: Any) -> Any:
    if getattr(self, _HOLD, False):
        setattr(self, _HOLD, False)
        return None
    return super(type(self), self).step(*args, **kwargs)


def _new_instance(cls: type) -> Any:
    return cls.__new__(cls)


def _reduce_to_base(self: Any, protocol: int) -> Any:
    # Pickle (and deepcopy) as the user's own scheduler class: the subclass exists only here.
    return _new_instance, (type(self).__bases__[0],), self.__dict__


def make_skip_aware(scheduler: Any) -> None:
    """Give ``scheduler`` a subclass whose ``step`` does nothing once after :func:`hold`.

    The instance keeps its ``__dict__`` (so ``state_dict``, checkpoints, ``LearningRateMonitor``
    and ``isinstance`` checks are unchanged), the way Lightning wraps optimizers.
    """
    base = type(scheduler)
    if base in _SKIP_AWARE_CLASSES.values():
        return
    if base not in _SKIP_AWARE_CLASSES:
        _SKIP_AWARE_CLASSES[base] = type(
            base.__name__, (base,), {"step": _skip_aware_step, "__reduce_ex__": _reduce_to_base}
        )
    scheduler.__class__ = _SKIP_AWARE_CLASSES[base]


def hold(scheduler: Any) -> None:
    """The scheduler's next ``step()`` does nothing (its optimizer's step was skipped)."""
    setattr(scheduler, _HOLD, True)
