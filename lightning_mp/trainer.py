"""``lightning_mp.Trainer``: Lightning's Trainer, which also takes lightning-mp's precision names."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as L
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_mp import loading
from lightning_mp.precision import precision_plugin
from lightning_mp.precision.factory import with_master_plugin


class Trainer(L.Trainer):
    """``lightning.pytorch.Trainer`` that also takes ``precision="bf16-master"`` and ``"16-master"``.

    For those names it builds the plugin that fits the strategy (:class:`~lightning_mp.MasterWeightPrecision`,
    :class:`~lightning_mp.precision.FSDPMasterWeightPrecision` under FSDP,
    :class:`~lightning_mp.precision.FSDP2MasterWeightPrecision` under ``ModelParallelStrategy``) and passes it in
    ``plugins``; every other argument, and every other precision, goes to Lightning unchanged.
    For the plugin's options (``master="remainder"``, a loss scale...) pass the plugin itself in
    ``plugins=[MasterWeightPrecision(...)]``.
    """

    def __init__(self, *args: Any, precision: Optional[Any] = None, plugins: Optional[Any] = None, **kwargs: Any) -> None:
        strategy = kwargs.get("strategy", "auto")
        fsdp = isinstance(strategy, FSDPStrategy) or (isinstance(strategy, str) and strategy.startswith("fsdp"))
        kind = "fsdp2" if isinstance(strategy, ModelParallelStrategy) else "fsdp" if fsdp else None
        plugins, precision = with_master_plugin(precision, plugins, Precision,
                                                lambda name: precision_plugin(name, strategy=kind))
        super().__init__(*args, precision=precision, plugins=plugins, **kwargs)

    def _run(self, model: Any, ckpt_path: Optional[Any] = None, weights_only: Optional[bool] = None) -> Any:
        """Where ``fit``, ``validate``, ``test`` and ``predict`` meet, with ``ckpt_path`` resolved
        (``"last"``, ``"best"``): a checkpoint file is checked to hold plain data before Lightning
        reads it (torch would refuse the rest too, in a page of text), in one line naming the file,
        what it holds and ``weights_only=False``, the opt-in for a file you trust."""
        if ckpt_path is not None:
            loading.check(ckpt_path, trust=weights_only is False)
        return super()._run(model, ckpt_path=ckpt_path, weights_only=weights_only)


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` sharding over every process, without tensor parallelism: FSDP2
    data parallelism as ``FSDPStrategy`` is for FSDP1 (``trainer=fsdp2``). Lightning's ``"auto"``
    would give the data-parallel dimension the number of nodes only."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
