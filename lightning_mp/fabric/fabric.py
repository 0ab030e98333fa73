"""``lightning_mp.Fabric``: Lightning Fabric, which also takes lightning-mp's precision names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_mp.fabric.fsdp2 import FSDP2MasterWeightPrecision
from lightning_mp.fabric.precision import MasterWeightPrecision
from lightning_mp.precision.factory import with_master_plugin
from lightning_mp.precision.options import MASTER_DTYPES

_STATE_KEY = "lightning_mp_precision"  # the plugin's state in files fabric.save writes
_PLUGINS = (MasterWeightPrecision, FSDP2MasterWeightPrecision)


class Fabric(L.Fabric):
    """``lightning.Fabric`` that also takes ``precision="bf16-master"`` and ``"16-master"``.

    For those names it builds :class:`lightning_mp.fabric.MasterWeightPrecision` (under
    ``ModelParallelStrategy``, :class:`lightning_mp.fabric.FSDP2MasterWeightPrecision`) and passes it in
    ``plugins``; every other precision and argument goes to Lightning unchanged. For the plugin's
    options (``master="remainder"``, a loss scale...) pass the plugin itself in ``plugins``.
    :meth:`save` and :meth:`load` also carry the plugin's state (loss scale, skip counts).
    """

    def __init__(self, *args: Any, precision: Optional[Any] = None, plugins: Optional[Any] = None, **kwargs: Any) -> None:
        strategy = kwargs.get("strategy", "auto")
        if isinstance(strategy, FSDPStrategy) or (isinstance(strategy, str) and strategy.startswith("fsdp")):
            if precision is not None and str(precision) in MASTER_DTYPES:
                raise ValueError(f"precision={precision!r} under Fabric's FSDPStrategy (FSDP1) is not supported yet: "
                                 "use ModelParallelStrategy (FSDP2), DDP or one device")
        plugin = FSDP2MasterWeightPrecision if isinstance(strategy, ModelParallelStrategy) else MasterWeightPrecision
        plugins, precision = with_master_plugin(precision, plugins, Precision, plugin)
        super().__init__(*args, precision=precision, plugins=plugins, **kwargs)

    def setup(self, module: Any, *optimizers: Any, **kwargs: Any) -> Any:
        result = super().setup(module, *optimizers, **kwargs)
        self._attach(result[1:] if isinstance(result, tuple) else ())
        return result

    def setup_optimizers(self, *optimizers: Any) -> Any:
        result = super().setup_optimizers(*optimizers)
        self._attach(result if isinstance(result, tuple) else (result,))
        return result

    def _attach(self, optimizers: Any) -> None:
        """Optimizers known to the plugin before anything loads their state (see its ``attach``)."""
        if isinstance(self._precision, _PLUGINS):
            for optimizer in optimizers:
                if hasattr(optimizer, "param_groups"):  # (not a scheduler returned by setup)
                    self._precision.attach(optimizer)

    def save(self, path: Union[str, Path], state: dict[str, Any], filter: Optional[dict[str, Any]] = None) -> None:
        if isinstance(self._precision, _PLUGINS) and _STATE_KEY not in state:
            state = {**state, _STATE_KEY: self._precision}
        super().save(path, state, filter=filter)

    def load(self, path: Union[str, Path], state: Optional[dict[str, Any]] = None, strict: bool = True, **kwargs: Any) -> dict[str, Any]:
        remainder = super().load(path, state, strict=strict, **kwargs)
        if state and isinstance(self._precision, _PLUGINS) and _STATE_KEY in remainder:
            self._precision.load_state_dict(remainder.pop(_STATE_KEY))
        return remainder
